"""Loaders on hand-written fixtures in the real FashionIQ / CIRR / CIRCO layouts.

The fixtures (tests/fixtures/) reproduce the quirks of the real releases: FashionIQ test entries
without "target", a dead image link per dataset, an empty FashionIQ caption (16 in the real
release), CIRR img_sets of 6 with reference_rank/target_rank that are not member indices, CIRR
test1 without target fields and with a blank caption, CIRCO with several ground truths (one of them
a dead link), snake_case semantic aspects, a greyscale COCO JPEG, and a test split without targets.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlib.data import datasets
from cirlib.data.datasets import (
    AnnotationError,
    EmptyCaptionWarning,
    ImageLoadError,
    MissingImagesWarning,
    Query,
    load_circo,
    load_cirr,
    load_fashioniq,
    open_image,
    query_text,
)

FIXTURES = Path(__file__).parent / "fixtures"
FIQ, CIRR, CIRCO = FIXTURES / "fashioniq", FIXTURES / "cirr", FIXTURES / "circo"
FIQ_VAL, FIQ_TEST = "captions/cap.dress.val.json", "captions/cap.dress.test.json"
CIRR_VAL, CIRR_TEST1 = "cirr/captions/cap.rc2.val.json", "cirr/captions/cap.rc2.test1.json"
CIRCO_VAL, CIRCO_INFO = "annotations/val.json", "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"

CIRR_SET_A = ("dev-10-0-img0", "dev-10-0-img1", "dev-10-1-img0",
              "dev-11-0-img1", "dev-12-2-img0", "dev-12-3-img1")
CIRR_SET_B = ("dev-20-0-img0", "dev-20-1-img1", "dev-21-0-img0",
              "dev-21-2-img1", "dev-22-0-img0")  # the 6th member, dev-22-1-img1, is a dead link
CIRR_TEST = ("test1-5-0-img0", "test1-5-1-img1", "test1-6-0-img1",
             "test1-7-2-img0", "test1-8-0-img0", "test1-8-1-img1")


def load_recording(loader, *args):
    """Call a loader and return (split, {warning category: [messages]}), seeing every warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = loader(*args)
    by_cat: dict[type, list[str]] = {}
    for w in caught:
        by_cat.setdefault(w.category, []).append(str(w.message))
    return split, by_cat


def copy_fixture(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def fiq_val(root):
    return load_fashioniq(root, "dress", "val")


def fiq_test(root):
    return load_fashioniq(root, "dress", "test")


def cirr_val(root):
    return load_cirr(root, "val")


def circo_val(root):
    return load_circo(root, "val")


def fiq_query(reference: str, target: str, *captions: str) -> Query:
    return Query(reference, captions, target, (target,), category="dress")


def cirr_query(pair_id: int, reference: str, target: str, caption: str, group: tuple[str, ...]) -> Query:
    return Query(reference, (caption,), target, (target,), group, pair_id)


# ------------------------------------------------------------------------------------ FashionIQ


def test_fashioniq_val_hand_checked():
    split, warned = load_recording(load_fashioniq, FIQ, "dress", "val")
    assert (split.dataset, split.split, split.root) == ("fashioniq", "val", FIQ)
    assert split.queries == [
        fiq_query("B0001DRS01", "B0001DRS02", "is longer and red.", " has short sleeves"),
        fiq_query("B0001DRS03", "B0001DRS04", "Is more floral?", "is blue, "),
        # the third triplet's target B0001DRS05 is a dead link: dropped
        fiq_query("B0001DRS02", "B0001DRS06", "has a belt", "is shorter"),
    ]
    assert split.gallery == ["B0001DRS01", "B0001DRS02", "B0001DRS03", "B0001DRS04", "B0001DRS06"]
    assert split.n_missing == 1
    assert set(split.image_paths) == set(split.gallery)
    assert split.image_paths["B0001DRS01"] == FIQ / "images" / "B0001DRS01.jpg"  # real release: .jpg
    assert split.image_paths["B0001DRS04"] == FIQ / "images" / "B0001DRS04.png"  # embedded benchmark: .png
    assert list(warned) == [MissingImagesWarning] and len(warned[MissingImagesWarning]) == 1
    msg = warned[MissingImagesWarning][0]
    assert "1 of 6 referenced images are missing" in msg
    assert str(FIQ / "images" / "B0001DRS05.jpg") in msg
    assert "1 of 4 queries" in msg


def test_fashioniq_test_split_has_no_targets():
    split, warned = load_recording(load_fashioniq, FIQ, "dress", "test")
    assert warned == {}
    assert [(q.reference, q.target, q.ground_truths) for q in split.queries] == [
        ("B0002DRS01", None, ()),
        ("B0002DRS02", None, ()),
    ]
    assert split.queries[0].captions == ("is a lighter color", " green")
    assert split.gallery == ["B0002DRS01", "B0002DRS02", "B0002DRS03"]
    assert split.n_missing == 0


def test_fashioniq_empty_caption_is_kept_with_one_warning():
    # real release: e.g. cap.shirt.val.json[1928] has captions ["", "is grey with ..."]
    split, warned = load_recording(load_fashioniq, FIQ, "shirt", "train")
    assert list(warned) == [EmptyCaptionWarning] and len(warned[EmptyCaptionWarning]) == 1
    assert "cap.shirt.train.json[0] field 'captions'" in warned[EmptyCaptionWarning][0]
    assert split.queries[0].captions == ("", "is grey with a design on the back")
    assert query_text(split.queries[0]) == "Is grey with a design on the back"
    assert [q.category for q in split.queries] == ["shirt", "shirt"]


# ----------------------------------------------------------------------------------------- CIRR


def test_cirr_val_hand_checked():
    split, warned = load_recording(load_cirr, CIRR, "val")
    assert split.queries == [
        cirr_query(500, "dev-10-0-img0", "dev-11-0-img1", "has two cups instead of one", CIRR_SET_A),
        cirr_query(501, "dev-11-0-img1", "dev-12-2-img0", "Make the table wooden.", CIRR_SET_A),
        # img_set member dev-22-1-img1 is a dead link: removed from the group
        cirr_query(502, "dev-20-0-img0", "dev-21-0-img0", "show the dog from the side", CIRR_SET_B),
        # pairid 503 targets the dead link: dropped
    ]
    assert split.gallery == [*CIRR_SET_A, *CIRR_SET_B]
    assert split.image_paths["dev-10-0-img0"] == CIRR / "dev" / "dev-10-0-img0.png"
    assert split.n_missing == 1
    assert list(warned) == [MissingImagesWarning] and len(warned[MissingImagesWarning]) == 1
    msg = warned[MissingImagesWarning][0]
    assert "1 of 12 referenced images" in msg and "dev-22-1-img1.png" in msg and "1 of 4 queries" in msg


def test_cirr_test1_has_no_targets_and_keeps_blank_caption():
    # real release: cap.rc2.test1.json pairid 27098 has caption " "; every pairid must be submitted
    split, warned = load_recording(load_cirr, CIRR, "test1")
    assert list(warned) == [EmptyCaptionWarning]
    assert "cap.rc2.test1.json[1] field 'caption'" in warned[EmptyCaptionWarning][0]
    assert [(q.pair_id, q.reference, q.target, q.ground_truths) for q in split.queries] == [
        (900, "test1-5-0-img0", None, ()),
        (901, "test1-5-1-img1", None, ()),
    ]
    assert all(q.group == CIRR_TEST for q in split.queries)
    assert query_text(split.queries[1]) == " "
    assert split.gallery == list(CIRR_TEST) and split.n_missing == 0


def test_cirr_train_resolves_nested_folders():
    split, warned = load_recording(load_cirr, CIRR, "train")
    assert warned == {}
    assert split.image_paths["train-100-0-img0"] == CIRR / "train" / "0" / "train-100-0-img0.png"
    assert split.image_paths["train-100-1-img1"] == CIRR / "train" / "34" / "train-100-1-img1.png"
    (q,) = split.queries
    assert (q.reference, q.target, q.pair_id, len(q.group)) == ("train-100-0-img0", "train-100-1-img1", 1, 6)


# ---------------------------------------------------------------------------------------- CIRCO


def test_circo_val_hand_checked():
    split, warned = load_recording(load_circo, CIRCO, "val")
    q0, q1, q2 = split.queries
    assert q0 == Query(
        reference="101",
        captions=("shows two of them and has a darker background",),
        target="102",
        ground_truths=("102", "103"),  # 108 is a dead link ...
        n_ground_truths=3,  # ... that still counts in the official mAP denominator
        pair_id=0,
        shared_concept="a red kite",
        semantic_aspects=("cardinality", "statement_with_conjunction", "spatial_relations_background"),
    )
    assert (q1.reference, q1.target, q1.ground_truths) == ("104", "105", ("105",))
    assert q1.semantic_aspects == ("viewpoint",)
    assert (q2.pair_id, q2.ground_truths) == (2, ("107", "101", "103", "104"))
    assert split.gallery == ["101", "102", "103", "104", "105", "106", "107"]
    assert split.image_paths["103"] == CIRCO / "COCO2017_unlabeled" / "unlabeled2017" / "000000000103.jpg"
    assert split.n_missing == 1
    assert list(warned) == [MissingImagesWarning] and len(warned[MissingImagesWarning]) == 1
    msg = warned[MissingImagesWarning][0]
    assert "000000000108.jpg" in msg and "removed 1 missing ids from ground truths" in msg


def test_circo_test_has_no_targets():
    split, _ = load_recording(load_circo, CIRCO, "test")
    assert [(q.pair_id, q.reference, q.target, q.ground_truths, q.semantic_aspects) for q in split.queries] == [
        (0, "103", None, (), ()),
        (1, "105", None, (), ()),
    ]
    assert split.queries[1].shared_concept == "a wooden chair"


def test_every_fixture_image_opens_as_rgb_of_its_size():
    for split in (
        load_recording(load_fashioniq, FIQ, "dress", "val")[0],
        load_recording(load_cirr, CIRR, "val")[0],
        load_recording(load_circo, CIRCO, "val")[0],  # 103 is a greyscale JPEG, as some COCO images
    ):
        for path in split.image_paths.values():
            with Image.open(path) as raw:
                size = raw.size
            im = open_image(path)
            assert (im.mode, im.size) == ("RGB", size)


def test_split_repr_is_a_summary():
    split, _ = load_recording(load_cirr, CIRR, "val")
    assert repr(split).startswith("CIRSplit(cirr/val: 3 queries, 11 gallery images, 1 missing")


def test_images_digest_follows_the_bytes_not_the_location(tmp_path):
    original, _ = load_recording(load_cirr, CIRR, "val")
    moved_root = copy_fixture(CIRR, tmp_path / "elsewhere")
    moved, _ = load_recording(load_cirr, moved_root, "val")
    assert moved.root != original.root
    assert moved.images_digest() == original.images_digest()  # a moved dataset keeps its checkpoints
    path = moved.image_paths[CIRR_SET_A[1]]
    Image.eval(Image.open(path).convert("RGB"), lambda v: 255 - v).save(path)  # same name and folder, new pixels
    assert load_recording(load_cirr, moved_root, "val")[0].images_digest() != original.images_digest()


# ------------------------------------------------------------------------------------ query_text


def fiq(*captions: str) -> Query:
    return Query("r", captions, "t", ("t",), category="dress")


def test_query_text_eval_follows_clip4cir():
    assert query_text(fiq("is longer and red.", " has short sleeves")) == (
        "Is longer and red and has short sleeves"
    )
    assert query_text(fiq("Is more floral?", "is blue, ")) == "Is more floral and is blue"
    assert query_text(fiq("has a USA logo", "is navy")) == "Has a USA logo and is navy"  # only 1st letter
    assert query_text(fiq("", " and is a lighter color")) == "And is a lighter color"
    assert query_text(fiq("", " ")) == ""
    assert query_text(Query("a", ("Make the table wooden.",))) == "Make the table wooden."  # CIRR/CIRCO: as is


def test_query_text_augmentation_draws_clip4cir_variants_uniformly():
    q = fiq("is red.", "has stripes")
    rng = np.random.default_rng(0)
    counts = Counter(query_text(q, rng) for _ in range(4000))
    assert set(counts) == {"Is red and has stripes", "Has stripes and is red", "Is red", "Has stripes"}
    assert all(850 < c < 1150 for c in counts.values()), counts  # each ~1000 (sd ~27)
    draws = [query_text(q, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same text
    cirr = Query("a", ("Make the table wooden.",), "b", ("b",))
    assert query_text(cirr, rng) == "Make the table wooden."
    assert query_text(fiq("", "is red"), rng) == "Is red"


# -------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: load_fashioniq(FIQ, "skirt", "val"), "category 'skirt'; valid: dress, shirt, toptee"),
        (lambda: load_fashioniq(FIQ, "dress", "dev"), "unknown FashionIQ split 'dev'; valid: train, val, test"),
        (lambda: load_cirr(CIRR, "test"), "valid: train, val, test1 (CIRR's test split is called 'test1')"),
        (lambda: load_circo(CIRCO, "train"), "unknown CIRCO split 'train'; valid: val, test"),
    ],
)
def test_unknown_split_or_category_lists_valid_ones(call, expected):
    with pytest.raises(ValueError, match="unknown") as err:
        call()
    assert expected in str(err.value)


def test_split_constants():
    assert datasets.FASHIONIQ_CATEGORIES == ("dress", "shirt", "toptee")
    assert (datasets.FASHIONIQ_SPLITS, datasets.CIRR_SPLITS, datasets.CIRCO_SPLITS) == (
        ("train", "val", "test"),
        ("train", "val", "test1"),
        ("val", "test"),
    )


@pytest.mark.parametrize(
    ("fixture", "rel", "load", "layout_hint"),
    [
        (FIQ, "captions/cap.dress.val.json", fiq_val, "image_splits/split."),
        (FIQ, "image_splits/split.dress.val.json", fiq_val, "captions/cap."),
        (CIRR, "cirr/image_splits/split.rc2.val.json", cirr_val, "cirr/captions/cap.rc2."),
        (CIRCO, CIRCO_INFO, circo_val, "annotations/<split>."),
    ],
    ids=["fiq-captions", "fiq-split", "cirr-split", "circo-image-info"],
)
def test_missing_annotation_file_names_path_and_layout(tmp_path, fixture, rel, load, layout_hint):
    root = copy_fixture(fixture, tmp_path)
    (root / rel).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load(root)
    assert f"annotation file {root / rel} does not exist" in str(err.value) and layout_hint in str(err.value)


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory; a CIRCO root holds"):
        load_circo(tmp_path / "nowhere", "val")


# ------------------------------------------------------------------------------- bad annotations


def test_malformed_json_names_file_line_and_column(tmp_path):
    root = copy_fixture(FIQ, tmp_path)
    path = root / "captions" / "cap.dress.val.json"
    path.write_text('[\n  {"target": "a", "candidate": "b",\n   "captions": ["x" "y"]}\n]')
    with pytest.raises(AnnotationError) as err:
        load_fashioniq(root, "dress", "val")
    assert f"{path}: invalid JSON at line 3, column 21" in str(err.value)


def _del(key):
    return lambda entry: entry.pop(key)


def _set(key, value):
    return lambda entry: entry.__setitem__(key, value)


@pytest.mark.parametrize(
    ("fixture", "rel", "index", "edit", "expected", "load"),
    [
        pytest.param(FIQ, FIQ_VAL, 1, _del("captions"), "cap.dress.val.json[1]: missing field 'captions'",
                     fiq_val, id="fiq-no-captions"),
        pytest.param(FIQ, FIQ_VAL, 0, _del("target"), "cap.dress.val.json[0]: missing field 'target'",
                     fiq_val, id="fiq-val-no-target"),
        pytest.param(FIQ, FIQ_VAL, 2, _set("captions", "is red"),
                     "cap.dress.val.json[2]: field 'captions': expected a non-empty list of strings, got string",
                     fiq_val, id="fiq-captions-str"),
        pytest.param(FIQ, FIQ_TEST, 1, _set("captions", []),
                     "cap.dress.test.json[1]: field 'captions': expected a non-empty list of strings, got list",
                     fiq_test, id="fiq-captions-empty-list"),
        pytest.param(FIQ, FIQ_TEST, 0, _set("candidate", 17),
                     "cap.dress.test.json[0]: field 'candidate': expected a string, got int 17",
                     fiq_test, id="fiq-candidate-int"),
        pytest.param(CIRR, CIRR_VAL, 2, lambda e: e["img_set"].pop("members"),
                     "cap.rc2.val.json[2].img_set: missing field 'members'", cirr_val, id="cirr-no-members"),
        pytest.param(CIRR, CIRR_VAL, 1, _set("pairid", "501"),
                     "cap.rc2.val.json[1]: field 'pairid': expected an integer, got string '501'",
                     cirr_val, id="cirr-pairid-str"),
        pytest.param(CIRR, CIRR_VAL, 3, _del("target_hard"), "cap.rc2.val.json[3]: missing field 'target_hard'",
                     cirr_val, id="cirr-val-no-target"),
        pytest.param(CIRR, CIRR_TEST1, 0, _set("caption", None),
                     "cap.rc2.test1.json[0]: field 'caption': expected a string, got null",
                     lambda r: load_cirr(r, "test1"), id="cirr-caption-null"),
        pytest.param(CIRCO, CIRCO_VAL, 1, _del("gt_img_ids"), "val.json[1]: missing field 'gt_img_ids'",
                     circo_val, id="circo-no-gts"),
        pytest.param(CIRCO, CIRCO_VAL, 0, _set("gt_img_ids", ["102", "103"]),
                     "val.json[0]: field 'gt_img_ids': expected a non-empty list of integers",
                     circo_val, id="circo-gts-str"),
        pytest.param(CIRCO, CIRCO_VAL, 2, _set("gt_img_ids", [101, 103]),
                     "val.json[2]: field 'gt_img_ids' does not contain target_img_id 107",
                     circo_val, id="circo-gts-without-target"),
        pytest.param(CIRCO, CIRCO_VAL, 2, _set("semantic_aspects", ["viewpoint", 3]),
                     "val.json[2].semantic_aspects[1]: expected a string, got int",
                     circo_val, id="circo-aspect-int"),
        pytest.param(CIRCO, "annotations/test.json", 1, _del("shared_concept"),
                     "test.json[1]: missing field 'shared_concept'",
                     lambda r: load_circo(r, "test"), id="circo-test-no-concept"),
        pytest.param(CIRCO, CIRCO_INFO, None, lambda info: info["images"][4].pop("file_name"),
                     "image_info_unlabeled2017.json[images][4]: missing field 'file_name'",
                     circo_val, id="circo-info-no-file-name"),
    ],
)
def test_bad_entry_names_file_entry_and_field(tmp_path, fixture, rel, index, edit, expected, load):
    root = copy_fixture(fixture, tmp_path)
    edit_json(root / rel, lambda data: edit(data if index is None else data[index]))
    with pytest.raises(AnnotationError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(root)
    assert str(root / rel) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("fixture", "rel", "content", "expected", "load"),
    [
        pytest.param(FIQ, "image_splits/split.dress.val.json", ["B0001DRS01", None],
                     "split.dress.val.json[1]: expected a string", fiq_val, id="fiq-split-null"),
        pytest.param(FIQ, FIQ_VAL, {"a": 1}, "cap.dress.val.json: expected a list, got object",
                     fiq_val, id="fiq-captions-object"),
        pytest.param(CIRR, "cirr/image_splits/split.rc2.val.json", ["./dev/x.png"],
                     "split.rc2.val.json: expected a JSON object", cirr_val, id="cirr-split-list"),
        pytest.param(CIRCO, CIRCO_INFO, {"annotations": []}, "image_info_unlabeled2017.json: missing field 'images'",
                     circo_val, id="circo-info-no-images"),
    ],
)
def test_bad_file_structure_names_file(tmp_path, fixture, rel, content, expected, load):
    root = copy_fixture(fixture, tmp_path)
    (root / rel).write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match="expected|missing") as err:
        load(root)
    assert expected in str(err.value)


# ------------------------------------------------------------------------------- missing images


def test_missing_images_warn_once_with_count_and_example(tmp_path):
    root = copy_fixture(CIRR, tmp_path)
    for name in ("dev-10-0-img1", "dev-12-3-img1", "dev-20-0-img0"):  # group member, member, a reference
        (root / "dev" / f"{name}.png").unlink()
    split, warned = load_recording(load_cirr, root, "val")
    assert list(warned) == [MissingImagesWarning] and len(warned[MissingImagesWarning]) == 1
    msg = warned[MissingImagesWarning][0]
    assert "4 of 12 referenced images are missing" in msg and "2 of 4 queries" in msg
    assert str(root / "dev" / "dev-10-0-img1.png") in msg  # first missing, in gallery order
    assert split.n_missing == 4
    assert [q.pair_id for q in split.queries] == [500, 501]
    assert split.queries[0].group == ("dev-10-0-img0", "dev-10-1-img0", "dev-11-0-img1", "dev-12-2-img0")
    assert len(split.gallery) == 8 and "dev-20-0-img0" not in split.image_paths


def test_name_absent_from_the_split_file_counts_as_missing(tmp_path):
    root = copy_fixture(CIRR, tmp_path)
    shutil.copy(root / "dev" / "dev-22-0-img0.png", root / "dev" / "dev-22-1-img1.png")  # mend the dead link
    edit_json(root / "cirr/captions/cap.rc2.val.json", lambda d: d[0].__setitem__("reference", "dev-99-0-img0"))
    split, warned = load_recording(load_cirr, root, "val")
    (msg,) = warned[MissingImagesWarning]
    assert f"1 of 13 referenced images are missing (e.g. dev-99-0-img0 (not listed in {root}" in msg
    assert split.n_missing == 1 and [q.pair_id for q in split.queries] == [501, 502, 503]


def test_no_image_at_all_points_at_the_root(tmp_path):
    root = copy_fixture(FIQ, tmp_path)
    shutil.rmtree(root / "images")
    split, warned = load_recording(load_fashioniq, root, "dress", "val")
    (msg,) = warned[MissingImagesWarning]
    assert "6 of 6 referenced images are missing" in msg and f"is {root} the dataset root?" in msg
    assert split.queries == [] and split.gallery == [] and split.image_paths == {}


# ------------------------------------------------------------------------------------ open_image


def _rgb(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return im.getpixel(xy)


def test_open_image_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((3, 5, 4), np.uint8)
    arr[..., 0] = 200  # red everywhere
    arr[:, 0, 3] = 0  # transparent column
    arr[:, 1, 3] = 255  # opaque column
    arr[:, 2, 3] = 128  # half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    im = open_image(tmp_path / "a.png")
    assert (im.mode, im.size) == ("RGB", (5, 3))
    assert _rgb(im, (0, 0)) == (255, 255, 255)
    assert _rgb(im, (1, 0)) == (200, 0, 0)
    r, g, b = _rgb(im, (2, 0))
    assert abs(r - 227) <= 1 and abs(g - 127) <= 1 and g == b  # 50/50 blend of (200,0,0) and white


def test_open_image_greyscale_palette_bilevel_16bit_and_one_pixel_wide(tmp_path):
    Image.fromarray(np.full((4, 3), 90, np.uint8), "L").save(tmp_path / "grey.jpg", quality=100)
    Image.fromarray(np.full((2, 2, 2), [10, 0], np.uint8), "LA").save(tmp_path / "la.png")
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png")
    pal.save(tmp_path / "pal_t.png", transparency=0)  # palette index 0 (blue) is transparent
    Image.new("1", (3, 3), 1).save(tmp_path / "bw.png")
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(tmp_path / "g16.png")
    Image.new("RGB", (1, 40), (9, 8, 7)).save(tmp_path / "thin.png")
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")

    expect = {
        "grey.jpg": ((3, 4), (90, 90, 90)),
        "la.png": ((2, 2), (255, 255, 255)),  # alpha 0 -> white, not black
        "pal.png": ((4, 2), (0, 0, 255)),
        "pal_t.png": ((4, 2), (255, 255, 255)),
        "bw.png": ((3, 3), (255, 255, 255)),
        "g16.png": ((3, 1), (0, 0, 0)),
        "thin.png": ((1, 40), (9, 8, 7)),
        "cmyk.jpg": ((2, 2), (255, 255, 255)),
    }
    for name, (size, pixel) in expect.items():
        im = open_image(tmp_path / name)
        assert (im.mode, im.size) == ("RGB", size), name
        assert all(abs(a - b) <= 2 for a, b in zip(_rgb(im), pixel)), (name, _rgb(im))
    assert _rgb(open_image(tmp_path / "pal_t.png"), (1, 0)) == (255, 0, 0)
    g16 = open_image(tmp_path / "g16.png")
    assert [_rgb(g16, (x, 0))[0] for x in range(3)] == [0, 128, 255]  # rescaled, not clipped at 255


def test_open_image_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageLoadError, match=re.escape(f"{bad}: cannot decode image")):
        open_image(bad)
    buf = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.read_bytes()[:400])
    with pytest.raises(ImageLoadError, match=re.escape(f"{truncated}: cannot decode image")):
        open_image(truncated)
    with pytest.raises(ImageLoadError, match="does not exist"):
        open_image(tmp_path / "absent.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 64x64 image is > 2x the limit
    with pytest.raises(ImageLoadError, match=re.escape(f"{buf}: refusing to decode") + ".*MAX_IMAGE_PIXELS"):
        open_image(buf)
