"""Zero-shot classification, and the labelled images it is scored on (generated or real roots)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from real_layout import real_layout_roots
from test_pretrain import COLOUR_NAMES, make_fashion_root

from cirlib.data.labels import AttributedImage, caption_function, labelled_images, load_attributed_images, probe_labels
from cirlib.data.pixels import PixelCache
from cirlib.data.synth import fashion as bf
from cirlib.data.synth.scenes.captions import counterfactual
from cirlib.evaluation import zero_shot as Z
from cirlib.models.backbone import TINY_MODEL, load_backbone
from cirlib.models.features import encode_pixels


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("bench") / "fashion")


def test_zero_shot_accuracy_reports_a_consistent_confusion_matrix(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    items = load_attributed_images([fashion_root], "val")
    result = Z.zero_shot_accuracy(bb, items, "colour")
    assert result.classes == sorted(COLOUR_NAMES) and result.n == len(items)
    assert result.confusion.shape == (4, 4) and result.confusion.sum() == len(items)
    assert result.confusion.sum(axis=1).tolist() == [3, 3, 3, 3]  # 3 categories x 1 image per colour
    assert result.accuracy == pytest.approx(np.trace(result.confusion) / len(items))
    assert result.confusion_frame().loc["red"].sum() == 3
    features = encode_pixels(bb, PixelCache([it.path for it in items], bb.image_size, "squarepad", progress=False))
    assert features.shape == (len(items), bb.embed_dim)
    again = Z.zero_shot_accuracy(bb, items, "colour", image_features=features)
    assert np.array_equal(again.confusion, result.confusion)
    with pytest.raises(ValueError, match=r"no item has attribute 'sleeve'.*colour"):
        Z.zero_shot_accuracy(bb, items, "sleeve")
    both = Z.zero_shot_accuracies(bb, items, ["colour", "category"])  # one encoding for every attribute
    assert list(both) == ["colour", "category"] and np.array_equal(both["colour"].confusion, result.confusion)
    assert np.array_equal(both["category"].confusion, Z.zero_shot_accuracy(bb, items, "category").confusion)


def test_generated_roots_give_their_attributes(fashion_root):
    items = labelled_images(fashion_root, "val")
    assert [it.name for it in items] == [it.name for it in load_attributed_images([fashion_root], "val")]
    assert {"colour", "pattern", "category"} <= set(items[0].attributes)
    assert Z.available_attributes(items, ("colour", "sleeve", "category")) == ["colour", "category"]


def test_a_real_fashioniq_root_gives_categories_only(tmp_path):
    roots = real_layout_roots(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixtures' dead links
        items = labelled_images(roots["fashioniq_root"], "val")
    assert items and all(set(it.attributes) == {"category"} and it.benchmark == "fashioniq" for it in items)
    assert len({it.name for it in items}) == len(items), "an image listed by two categories appears once"
    assert Z.available_attributes(items, ("colour", "pattern", "category")) == ["category"]
    assert caption_function("fashioniq")({"category": "toptee"}) == "a top"
    assert labelled_images(roots["cirr_root"], "val") == [], "real CIRR has no image labels"
    result = Z.zero_shot_accuracy(load_backbone(TINY_MODEL, device="cpu"), items, "category")
    assert result.n == len(items) and result.confusion.sum() == len(items)
    with pytest.raises(ValueError, match="expected 'fashion', 'scenes' or 'fashioniq'"):
        caption_function("cirr")


def test_caption_choice_scores_the_true_caption_against_a_changed_one(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    items = load_attributed_images([fashion_root], "val")
    texts = F.normalize(bb.encode_text([it.caption for it in items]).float(), dim=-1).detach()
    # images that *are* their true captions' embeddings: the true caption always wins
    perfect = Z.caption_choice_accuracies(bb, items, ["colour", "pattern"], image_features=texts)
    assert {a: (r.accuracy, r.n, r.chance) for a, r in perfect.items()} == {
        "colour": (1.0, len(items), 0.5), "pattern": (1.0, len(items), 0.5)}
    # images that are the changed captions' embeddings (same seed, same changes): it never wins
    rng = np.random.default_rng([0, 0])
    changed = [caption_function("fashion")(bf.counterfactual(it.attributes, "colour", rng)) for it in items]
    wrong = F.normalize(bb.encode_text(changed).float(), dim=-1).detach()
    assert Z.caption_choice_accuracies(bb, items, ["colour"], image_features=wrong)["colour"].accuracy == 0.0
    with pytest.raises(ValueError, match="unknown attribute 'sleeve'"):
        Z.caption_choice_accuracies(bb, items, ["sleeve"], image_features=texts)


def test_counterfactuals_change_exactly_one_thing():
    rng = np.random.default_rng(0)
    attrs = {"category": "dress", "colour": "red", "pattern": "plain", "logo": "none"}
    for attribute in ("colour", "pattern", "logo"):
        other = bf.counterfactual(attrs, attribute, rng)
        assert [k for k in attrs if other[k] != attrs[k]] == [attribute]
    obj = {"id": 0, "kind": "bag", "colour": "red", "size": "small", "cell": [0, 0], "x": 0.3, "y": 0.3}
    scene = {"objects": [obj, {**obj, "id": 1, "kind": "star", "x": 0.7}], "background": {"colour": "lavender",
             "pattern": "plain"}, "view": {"close_up": False, "mirrored": False}}
    for attribute in ("kind", "colour", "size"):
        other = counterfactual(scene, attribute, rng)
        diffs = [(a, b) for a, b in zip(scene["objects"], other["objects"]) if a != b]
        assert len(diffs) == 1 and [k for k in diffs[0][0] if diffs[0][0][k] != diffs[0][1][k]] == [attribute]
    assert len(counterfactual(scene, "count", rng)["objects"]) == 3
    full = {**scene, "objects": [{**obj, "id": i} for i in range(4)]}
    assert len(counterfactual(full, "count", rng)["objects"]) == 3  # a full scene loses a copy
    unique = {**scene, "objects": [{**obj, "id": i, "kind": k} for i, k in enumerate(("bag", "star", "coat", "heart"))]}
    assert counterfactual(unique, "count", rng) is None
    assert counterfactual(scene, "background", rng)["background"]["colour"] != "lavender"
    with pytest.raises(ValueError, match="unknown attribute"):
        counterfactual(scene, "texture", rng)


def test_probe_labels_are_image_level_attributes():
    garment = AttributedImage(Path("g.png"), "g", {"category": "dress", "colour": "red", "pattern": "plain",
                                                   "logo": "star"}, "fashion")
    assert probe_labels(garment) == {"colour": "red", "pattern": "plain", "logo": "star", "category": "dress"}
    obj = {"id": 0, "kind": "bag", "colour": "red", "size": "small", "cell": [0, 0], "x": 0.3, "y": 0.3}
    scene = {"objects": [obj], "background": {"colour": "lavender", "pattern": "dots"}}
    one = AttributedImage(Path("s.png"), "s", scene, "scenes")
    assert probe_labels(one) == {"background": "lavender", "objects": "1", "kind": "bag", "colour": "red",
                                 "size": "small"}
    two = AttributedImage(Path("t.png"), "t", {**scene, "objects": [obj, {**obj, "id": 1}]}, "scenes")
    assert probe_labels(two) == {"background": "lavender", "objects": "2"}  # no one object's kind
    with pytest.raises(ValueError, match="no probe labels for benchmark 'fashioniq'"):
        probe_labels(AttributedImage(Path("r.png"), "r", {"category": "dress"}, "fashioniq"))


def test_linear_probe_reads_what_the_features_hold_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    y_train, y_val = torch.arange(90) % 3, torch.arange(60) % 3
    noisy = lambda y: centres[y] + 0.3 * torch.randn(len(y), 16, generator=g)  # noqa: E731
    assert Z.linear_probe(noisy(y_train), y_train, noisy(y_val), y_val) == 1.0
    # labels the features know nothing of: near the majority share (1/3), far from perfect
    shuffled = y_val[torch.randperm(60, generator=g)]
    assert Z.linear_probe(noisy(y_train), y_train, noisy(y_val), shuffled) < 0.6
    # a val class never seen in training is an error, not a crash
    assert Z.linear_probe(noisy(y_train), y_train, noisy(y_val), torch.full((60,), 3)) == 0.0
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        Z.linear_probe(torch.zeros(4, 3), y_train[:4], torch.zeros(4, 5), y_val[:4])
    with pytest.raises(ValueError, match="4 train features for 3 labels"):
        Z.linear_probe(torch.zeros(4, 3), y_train[:3], torch.zeros(4, 3), y_val[:4])


def test_probe_table_probes_each_labelled_attribute(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    train, val = load_attributed_images([fashion_root], "train"), load_attributed_images([fashion_root], "val")
    table = Z.probe_table(bb, {"fashion": train}, {"fashion": val}, min_images=4)
    # the fixture's prints are all "none": one class, nothing to probe
    assert list(table.index) == [("fashion", "colour"), ("fashion", "pattern"), ("fashion", "category")]
    assert table.loc[("fashion", "colour"), "classes"] == 4 and table.loc[("fashion", "category"), "classes"] == 3
    assert (table["train images"] == len(train)).all() and (table["val images"] == len(val)).all()
    assert table["accuracy %"].between(0, 100).all()
    assert table.loc[("fashion", "colour"), "majority %"] == pytest.approx(25.0)
    assert Z.probe_table(bb, {"fashion": train}, {"fashion": val}, min_images=100).empty


def test_accuracy_by_pipeline_groups_and_matches_the_plain_accuracy(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    items = load_attributed_images([fashion_root], "val")
    table = Z.accuracy_by_pipeline(bb, items, ["colour"], ["squarepad", "clip"])
    categories = sorted({it.attributes["category"] for it in items})
    assert list(table.index) == [(c, k) for c in categories for k in ("squarepad", "clip")]
    assert table.index.names == ["category", "pipeline"]
    for category in categories:
        members = [it for it in items if it.attributes["category"] == category]
        assert table.loc[(category, "squarepad"), "images"] == len(members) == 4
        expected = Z.zero_shot_accuracy(bb, members, "colour", transform_kind="squarepad").accuracy
        assert table.loc[(category, "squarepad"), "colour"] == pytest.approx(100 * expected)
        clip = Z.zero_shot_accuracy(bb, members, "colour", transform_kind="clip").accuracy
        assert table.loc[(category, "clip"), "colour"] == pytest.approx(100 * clip)
    with pytest.raises(ValueError, match="'sleeve' to group by"):
        Z.accuracy_by_pipeline(bb, items, ["colour"], ["clip"], group="sleeve")


def test_measurements_on_the_same_images_share_one_feature_cache_entry(fashion_root, tmp_path, monkeypatch):
    bb = load_backbone(TINY_MODEL, device="cpu")
    items = load_attributed_images([fashion_root], "val")
    plain = Z.zero_shot_accuracies(bb, items, ["colour"])
    encoded = []
    real_encode = bb.encode_image
    monkeypatch.setattr(bb, "encode_image", lambda pixels: encoded.append(len(pixels)) or real_encode(pixels))
    cached = Z.zero_shot_accuracies(bb, items, ["colour"], cache_dir=tmp_path)
    assert sum(encoded) == len(items)  # encoded once, then stored
    assert np.array_equal(cached["colour"].confusion, plain["colour"].confusion)
    Z.caption_choice_accuracies(bb, items, ["colour"], cache_dir=tmp_path)
    Z.accuracy_by_pipeline(bb, items, ["colour"], ["squarepad"], cache_dir=tmp_path)
    assert sum(encoded) == len(items)  # both read the stored features
    Z.accuracy_by_pipeline(bb, items, ["colour"], ["clip"], cache_dir=tmp_path)
    assert sum(encoded) == 2 * len(items)  # another pipeline, other inputs: encoded once more
