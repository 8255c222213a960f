"""The embedded ``scenes`` benchmark: exact CIRR/CIRCO layouts, truthful captions, exact ground truths."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlib.data import datasets, stats
from cirlib.data.synth import scenes as bs
from cirlib.data.synth.scenes import Scene, SceneObject, ScenesBenchConfig
from cirlib.data.synth.scenes.captions import CLAUSE_STARTS, partial_caption

QUICK = ScenesBenchConfig.quick()


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------- an independent predicate evaluator
# Written from the constraint vocabulary's documentation, with the thresholds spelled out, so
# that the ground truths the generator lists are checked by code that does not share its logic.
def _obj_ok(o: dict, spec: dict) -> bool:
    if o["kind"] != spec["kind"]:
        return False
    if "colour" in spec and o["colour"] != spec["colour"]:
        return False
    if "size" in spec and o["size"] != spec["size"]:
        return False
    region = spec.get("region")
    if region == "left" and not o["x"] < 0.4:
        return False
    if region == "right" and not o["x"] > 0.6:
        return False
    if region == "top" and not o["y"] < 0.4:
        return False
    if region == "bottom" and not o["y"] > 0.6:
        return False
    return True


def holds(attrs: dict, constraints: list[dict]) -> bool:
    objs = attrs["objects"]
    for c in constraints:
        if c["op"] == "has":
            n = len([o for o in objs if _obj_ok(o, c)])
            if n < c["min"] or n > c.get("max", 99):
                return False
        elif c["op"] == "background":
            if "colour" in c and attrs["background"]["colour"] != c["colour"]:
                return False
            if "pattern" in c and attrs["background"]["pattern"] != c["pattern"]:
                return False
        elif c["op"] == "relation":
            gap = {"left of": lambda a, b: b["x"] - a["x"], "right of": lambda a, b: a["x"] - b["x"],
                   "above": lambda a, b: b["y"] - a["y"], "below": lambda a, b: a["y"] - b["y"]}[c["rel"]]
            pairs = [(a, b) for i, a in enumerate(objs) for j, b in enumerate(objs) if i != j]
            if not any(_obj_ok(a, c["a"]) and _obj_ok(b, c["b"]) and gap(a, b) > 0.15 for a, b in pairs):
                return False
        elif c["op"] == "objects":
            if not c["min"] <= len(objs) <= c["max"]:
                return False
        elif c["op"] == "view":
            if attrs["view"]["close_up"] != c["close_up"]:
                return False
        elif c["op"] == "layout":
            if attrs["view"]["mirrored"] != c["mirrored"]:
                return False
            for w in c["objects"]:
                if not any(o["kind"] == w["kind"] and o["colour"] == w["colour"]
                           and abs(o["x"] - w["x"]) < 0.12 and abs(o["y"] - w["y"]) < 0.12 for o in objs):
                    return False
        else:
            raise AssertionError(f"unexpected constraint {c}")
    return True


# ------------------------------------------------------------------------------------- CIRR
CIRR_NAME = re.compile(r"^(train|dev|test1)-\d+-[0-2]-img[01]$")


@pytest.mark.parametrize("split", ["train", "val", "test1"])
def test_cirr_layout_and_fields(quick_scenes_root: Path, split: str) -> None:
    cirr = quick_scenes_root / "CIRR"
    captions = read(cirr / "cirr" / "captions" / f"cap.rc2.{split}.json")
    name_to_rel = read(cirr / "cirr" / "image_splits" / f"split.rc2.{split}.json")
    assert len(captions) == QUICK.cirr_queries[split]
    assert len(name_to_rel) == 6 * QUICK.cirr_sets[split]
    prefix = {"train": "train", "val": "dev", "test1": "test1"}[split]
    for name, rel in name_to_rel.items():
        assert CIRR_NAME.match(name) and name.startswith(prefix + "-"), name
        folder = r"\./train/\d+/" if split == "train" else rf"\./{prefix}/"
        assert re.fullmatch(folder + re.escape(name) + r"\.png", rel), rel
        assert (cirr / rel).is_file()
    for q in captions:
        keys = ["pairid", "reference", "caption", "img_set"]
        set_keys = ["id", "members", "reference_rank"]
        if split != "test1":
            keys[2:2] = ["target_hard", "target_soft"]
            set_keys.append("target_rank")
        assert list(q) == keys
        assert list(q["img_set"]) == set_keys
        members = q["img_set"]["members"]
        assert len(members) == 6 and len(set(members)) == 6
        assert all(m in name_to_rel for m in [q["reference"], *members])
        assert members[q["img_set"]["reference_rank"]] == q["reference"]
        if split != "test1":
            assert q["target_soft"] == {q["target_hard"]: 1.0}
            assert members[q["img_set"]["target_rank"]] == q["target_hard"] != q["reference"]
        assert isinstance(q["pairid"], int) and q["caption"].strip()


def test_cirr_pairids_unique_and_sets_are_variations_of_one_scene(quick_scenes_root: Path) -> None:
    meta = bs.load_meta(quick_scenes_root / "CIRR")
    ids = [q["pairid"] for s in ("train", "val", "test1")
           for q in read(quick_scenes_root / "CIRR" / "cirr" / "captions" / f"cap.rc2.{s}.json")]
    assert len(ids) == len(set(ids))
    for q in read(quick_scenes_root / "CIRR" / "cirr" / "captions" / "cap.rc2.val.json"):
        sizes = {(meta["attributes"][m]["width"], meta["attributes"][m]["height"]) for m in q["img_set"]["members"]}
        assert len(sizes) == 1  # one canvas: the members are edits of one base scene
        assert all(meta["attributes"][m]["split"] == "val" for m in q["img_set"]["members"])
    for name, family in _families(meta["attributes"], "dev").items():
        assert len(family) == 6 * QUICK.cirr_family or name == max(_families(meta["attributes"], "dev"))
        assert len({(a["width"], a["height"]) for a in family}) == 1  # look-alikes: one base scene's canvas


def _families(attributes: dict, prefix: str) -> dict[int, list[dict]]:
    """The images of each family of ``cirr_family`` sets drawn from one base scene, by family index."""
    out: dict[int, list[dict]] = {}
    for name, a in attributes.items():
        if name.startswith(prefix + "-"):
            out.setdefault(int(name.split("-")[1]) // QUICK.cirr_family, []).append(a)
    return out


def test_cirr_captions_single_out_their_target_in_its_family(quick_scenes_root: Path) -> None:
    """No other image of the set (Recall_subset) or of the look-alike sets drawn from the same base fits."""
    meta = bs.load_meta(quick_scenes_root / "CIRR")
    attrs = meta["attributes"]
    absolute = 0
    for split in ("train", "val", "test1"):
        path = quick_scenes_root / "CIRR" / "cirr" / "captions" / f"cap.rc2.{split}.json"
        captions = {q["pairid"]: q for q in read(path)}
        prefix = bs.CIRR_SPLITS[split]
        family_of = {n: int(n.split("-")[1]) // QUICK.cirr_family for n in attrs if n.startswith(prefix + "-")}
        for record in meta["queries"][split]:
            assert record["reference"] == captions[record["pairid"]]["reference"]
            assert record["caption"] == captions[record["pairid"]]["caption"]
            assert holds(attrs[record["target"]], record["constraints"]), record
            assert not holds(attrs[record["reference"]], record["constraints"]), record
            family = [n for n, f in family_of.items() if f == family_of[record["target"]]]
            assert set(captions[record["pairid"]]["img_set"]["members"]) <= set(family)
            others = [n for n in family if n != record["target"]]
            assert not any(holds(attrs[n], record["constraints"]) for n in others), record
            absolute += record["absolute"]
    n = sum(len(meta["queries"][s]) for s in ("train", "val", "test1"))
    assert 0.5 * n < absolute < n  # most captions name the target's content, as many of CIRR's do; not all


def test_fashion_mnist_items_are_disjoint_across_splits(quick_scenes_root: Path) -> None:
    used: dict[str, set[tuple[str, int]]] = {}
    for name, sub in (("CIRR", None), ("CIRCO", "circo")):
        for attrs in bs.load_meta(quick_scenes_root / name)["attributes"].values():
            part = sub or attrs["split"]
            used.setdefault(part, set()).update((attrs["fmnist"], o["item"]) for o in attrs["objects"] if "item" in o)
    assert {f for f, _ in used["train"]} == {"train"}
    evaluation = [used[p] for p in ("val", "test1", "circo")]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not evaluation[i] & evaluation[j]


# ------------------------------------------------------------------------------------ CIRCO
def test_circo_layout_and_fields(quick_scenes_root: Path) -> None:
    circo = quick_scenes_root / "CIRCO"
    info = read(circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    ids = [img["id"] for img in info["images"]]
    assert len(ids) == len(set(ids)) >= QUICK.circo_gallery
    assert all(isinstance(i, int) and 0 < i <= 581_929 for i in ids)
    assert sorted(ids) != list(range(min(ids), min(ids) + len(ids)))  # sparse, like COCO ids
    for img in info["images"]:
        assert img["file_name"] == f"{img['id']:012d}.jpg"
        path = circo / "COCO2017_unlabeled" / "unlabeled2017" / img["file_name"]
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])
    gallery = set(ids)
    val = read(circo / "annotations" / "val.json")
    test = read(circo / "annotations" / "test.json")
    assert len(val) == QUICK.circo_queries["val"] and len(test) == QUICK.circo_queries["test"]
    assert [q["id"] for q in val] == list(range(len(val)))
    for q in val:
        assert list(q) == ["id", "reference_img_id", "target_img_id", "relative_caption", "shared_concept",
                           "gt_img_ids", "semantic_aspects"]
        assert q["gt_img_ids"][0] == q["target_img_id"]
        assert len(set(q["gt_img_ids"])) == len(q["gt_img_ids"])
        assert set(q["gt_img_ids"]) <= gallery and q["reference_img_id"] in gallery
        assert q["reference_img_id"] not in q["gt_img_ids"]
        assert q["shared_concept"].startswith(("a ", "an "))
        assert set(q["semantic_aspects"]) <= set(bs.ASPECTS) and q["semantic_aspects"]
    for q in test:
        assert list(q) == ["id", "reference_img_id", "relative_caption", "shared_concept"]
        assert q["reference_img_id"] in gallery


def test_circo_ground_truths_are_every_gallery_image_that_satisfies_the_query(quick_scenes_root: Path) -> None:
    meta = bs.load_meta(quick_scenes_root / "CIRCO")
    gallery = meta["attributes"]
    n_gts = []
    for split in ("val", "test"):
        for record in meta["queries"][split]:
            expected = {int(i) for i, a in gallery.items() if holds(a, record["constraints"])}
            assert set(record["gt_img_ids"]) == expected, record["caption"]
            assert record["gt_img_ids"][0] == record["target_img_id"]
            assert not holds(gallery[str(record["reference_img_id"])], record["constraints"])
            n_gts.append(len(expected))
    val = read(quick_scenes_root / "CIRCO" / "annotations" / "val.json")
    assert [q["gt_img_ids"] for q in val] == [r["gt_img_ids"] for r in meta["queries"]["val"]]
    assert np.mean(n_gts) > 2 and max(n_gts) >= 4  # several true positives, as in CIRCO


def test_circo_subject_comes_from_the_reference(quick_scenes_root: Path) -> None:
    """The shared concept is an object of the reference that every ground truth shows and the caption
    never names; the index set holds look-alikes of the reference (they show it too) that are not
    ground truths."""
    meta = bs.load_meta(quick_scenes_root / "CIRCO")
    gallery = meta["attributes"]
    look_alikes = []
    for record in meta["queries"]["val"]:
        colour_kind = record["shared_concept"].split(" ", 1)[1]
        noun = next(k for k in sorted(bs.KINDS, key=len, reverse=True) if colour_kind.endswith(_noun(k)))
        colour = colour_kind[: -len(_noun(noun))].strip()
        assert not re.search(rf"\b{noun}", record["caption"]), record
        assert record["caption"].startswith(CLAUSE_STARTS), record
        shows = [i for i, a in gallery.items()
                 if any(o["kind"] == noun and o["colour"] == colour for o in a["objects"])]
        assert str(record["reference_img_id"]) in shows and {str(i) for i in record["gt_img_ids"]} <= set(shows)
        look_alikes.append(len(set(shows) - {str(i) for i in record["gt_img_ids"]} - {str(record["reference_img_id"])}))
    assert np.median(look_alikes) >= 5, look_alikes


def _noun(kind: str) -> str:
    return "pair of trousers" if kind == "trousers" else kind


def test_circo_gallery_holds_hard_negatives(quick_scenes_root: Path) -> None:
    """Most queries have near misses: gallery images failing exactly one of the query's constraints."""
    meta = bs.load_meta(quick_scenes_root / "CIRCO")
    gallery = meta["attributes"].values()
    with_near_miss = 0
    for record in meta["queries"]["val"]:
        cons = record["constraints"]
        with_near_miss += any(sum(not holds(a, [c]) for c in cons) == 1 for a in gallery)
    assert with_near_miss >= 0.75 * len(meta["queries"]["val"])


# ------------------------------------------------------------------------------- aspects etc.
def test_all_nine_aspects_occur_and_coverage_table(quick_scenes_root: Path) -> None:
    val = read(quick_scenes_root / "CIRCO" / "annotations" / "val.json")
    splits = {"CIRCO val": datasets.load_circo(quick_scenes_root / "CIRCO", "val")}
    counts = stats.aspect_coverage(splits)
    assert list(counts.index) == list(bs.ASPECTS)
    by_hand = {a: sum(a in q["semantic_aspects"] for q in val) for a in bs.ASPECTS}
    assert counts[("CIRCO val", "queries")].to_dict() == by_hand
    assert (counts[("CIRCO val", "queries")] > 0).all()  # every one of the nine aspects occurs
    for q in val:  # captions with several statements are tagged as conjunctions
        assert ("statement_with_conjunction" in q["semantic_aspects"]) == (" and " in q["relative_caption"])


def test_loaders_read_the_generated_layouts(quick_scenes_root: Path) -> None:
    cirr = datasets.load_cirr(quick_scenes_root / "CIRR", "val")
    assert cirr.n_missing == 0 and len(cirr.queries) == QUICK.cirr_queries["val"]
    assert all(len(q.group) == 6 and q.target in q.group for q in cirr.queries)
    circo = datasets.load_circo(quick_scenes_root / "CIRCO", "val")
    assert circo.n_missing == 0 and all(q.target == q.ground_truths[0] for q in circo.queries)
    assert datasets.load_circo(quick_scenes_root / "CIRCO", "test").queries[0].target is None


# ---------------------------------------------------------------- determinism and idempotence
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_idempotent_and_regenerated_on_change(quick_scenes_root: Path, tmp_path: Path) -> None:
    again = bs.generate_scenes(tmp_path / "again", QUICK)
    assert _digest(again) == _digest(quick_scenes_root)
    meta = again / "CIRR" / "cirlib_meta.json"
    before = meta.stat().st_mtime_ns
    bs.generate_scenes(again, QUICK)  # same fingerprint: nothing is rewritten
    assert meta.stat().st_mtime_ns == before
    other = replace(QUICK, seed=1, cirr_sets={"train": 4, "val": 3, "test1": 2})
    bs.generate_scenes(again, other)
    names = read(again / "CIRR" / "cirr" / "image_splits" / "split.rc2.train.json")
    on_disk = {p.stem for p in (again / "CIRR" / "train").rglob("*.png")}
    assert on_disk == set(names) and len(names) == 24  # no stale image of the first run survives
    assert bs.load_meta(again / "CIRR")["seed"] == 1
    assert not (again / "CIRR" / bs.PARTIAL_MARKER).exists()


def test_refuses_to_overwrite_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / "CIRR" / "cirr").mkdir(parents=True)
    (tmp_path / "CIRR" / "cirr" / "real_annotations.json").write_text("[]")
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        bs.generate_scenes(tmp_path, QUICK)
    assert (tmp_path / "CIRR" / "cirr" / "real_annotations.json").exists()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_objects"):
        ScenesBenchConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="cirr_sets"):
        ScenesBenchConfig(cirr_sets={"train": 1})
    with pytest.raises(ValueError, match="cirr_shown_changes"):
        ScenesBenchConfig(cirr_shown_changes=(0, 2))  # no change would silently mean one to three
    with pytest.raises(ValueError, match="circo_near_misses"):
        ScenesBenchConfig(circo_near_misses=(5, 4))
    with pytest.raises(FileNotFoundError, match="cirlib_meta.json"):
        bs.load_meta(Path("/nonexistent"))


# ------------------------------------------------------------------- captions from graph diffs
def obj(i: int, kind: str, colour: str, cell: tuple[int, int], size: str = "large") -> SceneObject:
    return SceneObject(i, kind, colour, size, cell, (0.0, 0.0), 0 if kind in bs.ITEM_KINDS.values() else None)


def scene(*objects: SceneObject, bg: str = "light grey", pattern: str = "plain", **view: bool) -> Scene:
    # 2 x 3 grid: cell centres at x = 1/6, 1/2, 5/6 and y = 1/4, 3/4
    return Scene("val", "test", 128, 85, (2, 3), bg, pattern, tuple(objects), **view)


def captions_of(ref: Scene, tgt: Scene, n: int = 60, style: str = "cirr") -> dict[str, tuple[str, ...]]:
    """Every phrasing the captioner picks over ``n`` seeds, with its aspects; all must be true."""
    out = {}
    for seed in range(n):
        change = bs.describe_change(ref.attrs, tgt.attrs, np.random.default_rng(seed), style)
        assert change is not None
        assert holds(tgt.attrs, list(change.constraints)) and not holds(ref.attrs, list(change.constraints))
        out[change.caption] = change.aspects
    return out


BAG = obj(0, "bag", "red", (0, 0))  # x = 1/6, y = 1/4: left, top


def test_addition_captions() -> None:
    got = captions_of(scene(BAG), scene(BAG, obj(1, "circle", "navy blue", (1, 2))))  # right, bottom
    expected = {
        "add a navy blue circle": ("addition",),
        "also has a navy blue circle": ("addition",),
        "add a large navy blue circle": ("addition",),
        "add a navy blue circle on the right": ("addition", "spatial_relations_background"),
        "add a navy blue circle at the bottom": ("addition", "spatial_relations_background"),
        "add a navy blue circle to the right of the bag": ("addition", "spatial_relations_background"),
        "add a navy blue circle below the bag": ("addition", "spatial_relations_background"),
        "has a navy blue circle on the right": ("addition", "spatial_relations_background"),
        "has a navy blue circle at the bottom": ("addition", "spatial_relations_background"),
        "has a navy blue circle to the right of the bag": ("addition", "spatial_relations_background"),
        "has a navy blue circle below the bag": ("addition", "spatial_relations_background"),
    }
    assert got == expected


def test_negation_cardinality_and_comparative_captions() -> None:
    circle = obj(1, "circle", "green", (0, 1))
    assert captions_of(scene(BAG, circle), scene(BAG)) == {
        "remove the circle": ("negation",),
        "without the circle": ("negation",),
        "there is no circle anymore": ("negation",),
    }
    assert captions_of(scene(BAG), scene(BAG, obj(1, "bag", "pink", (1, 1)))) == {
        "has two bags instead of one": ("cardinality", "compare_change"),
        "shows two bags": ("cardinality",),
        "has more bags": ("comparative_statement",),
        "has one more bag": ("cardinality", "comparative_statement"),
    }
    small = replace(circle, size="small")
    got = captions_of(scene(replace(BAG, size="small"), small), scene(replace(BAG, size="small"), circle))
    assert got == {
        "the circle is bigger": ("comparative_statement",),
        "the circle is larger now": ("comparative_statement",),
        "make the circle large": ("direct_addressing",),
        "the circle is bigger than the bag": ("comparative_statement",),
        "has a bigger circle": ("comparative_statement",),
    }


def test_direct_addressing_compare_and_change_captions() -> None:
    assert captions_of(scene(BAG), scene(replace(BAG, colour="yellow"))) == {
        "the bag is yellow": ("direct_addressing",),
        "make the bag yellow": ("direct_addressing",),
        "the bag is yellow instead of red": ("direct_addressing", "compare_change"),
        "same bag but yellow": ("compare_change",),
        "has a yellow bag instead of a red one": ("compare_change",),
        "has a yellow bag": ("direct_addressing",),
    }
    two = (BAG, obj(1, "bag", "green", (1, 0)))  # two bags: point at one by its colour
    assert captions_of(scene(*two), scene(replace(BAG, colour="yellow"), two[1])) == {
        "the red bag is yellow instead": ("direct_addressing", "compare_change"),
        "change the red bag to yellow": ("direct_addressing", "compare_change"),
        "has a yellow bag instead of the red bag": ("compare_change",),
    }
    assert captions_of(scene(BAG), scene(replace(BAG, kind="coat"))) == {
        "replace the bag with a red coat": ("direct_addressing", "compare_change"),
        "has a red coat instead of the bag": ("compare_change",),
        "the bag is now a coat": ("compare_change",),
        "shows a red coat in place of the bag": ("compare_change",),
    }


def test_spatial_background_and_viewpoint_captions() -> None:
    coat = obj(1, "coat", "black", (0, 2))  # right, top
    moved = replace(BAG, cell=(1, 2))  # now right, bottom: below the coat
    spatial = ("spatial_relations_background",)
    assert captions_of(scene(BAG, coat), scene(moved, coat)) == {
        "move the bag to the right": ("direct_addressing", *spatial),
        "the bag is on the right": spatial,
        "move the bag to the bottom": ("direct_addressing", *spatial),
        "the bag is at the bottom": spatial,
        "the bag is below the coat": spatial,
        "the bag is now below the coat": spatial,
    }
    assert captions_of(scene(BAG), scene(BAG, bg="light blue")) == {
        "on a light blue background": spatial,
        "the background is light blue": ("direct_addressing", *spatial),
        "the background is light blue instead of light grey": ("compare_change", *spatial),
        "has a light blue background instead of a light grey one": ("compare_change", *spatial),
        "has a light blue background": spatial,
    }
    assert captions_of(scene(BAG), scene(BAG, pattern="stripes")) == {
        "on a striped background": spatial,
        "has a striped background": spatial,
        "the background is striped instead of plain": ("compare_change", *spatial),
    }
    assert captions_of(scene(BAG), scene(BAG, close_up=True)) == {
        "seen closer": ("viewpoint",), "a close-up of the same scene": ("viewpoint",), "zoomed in": ("viewpoint",),
        "zoom in": ("viewpoint",), "show it closer": ("viewpoint",),
    }
    assert set(captions_of(scene(BAG, coat), scene(BAG, coat, mirrored=True))) == {
        "mirrored", "seen from the opposite side", "flipped left to right", "flip it left to right", "mirror the scene"}


def test_circo_captions_are_clauses_around_an_unnamed_shared_object() -> None:
    coat = obj(1, "coat", "black", (0, 2))  # kept unchanged: the shared concept
    got = captions_of(scene(BAG, coat), scene(replace(BAG, colour="yellow"), coat), style="circo")
    assert got == {"has a yellow bag instead of a red one": ("compare_change",),
                   "has the bag in yellow": ("direct_addressing",), "has a yellow bag": ("direct_addressing",)}
    concepts = {bs.describe_change(scene(BAG, coat).attrs, scene(BAG, coat, bg="lavender").attrs,
                                   np.random.default_rng(seed), "circo").shared_concept for seed in range(10)}
    assert concepts == {"a red bag"}  # the first unchanged object the caption does not name
    got = captions_of(scene(BAG, coat), scene(BAG, coat, pattern="dots"), style="circo")
    assert set(got) == {"is on a polka-dot background", "has a polka-dot background"}
    got = captions_of(scene(BAG, coat), scene(BAG), style="circo")
    assert set(got) == {"has no coats", "does not have the coat"}
    # the only object changes: nothing both images share is left to be the subject
    assert bs.describe_change(scene(BAG).attrs, scene(replace(BAG, colour="yellow")).attrs,
                              np.random.default_rng(0), "circo") is None


def test_absolute_descriptions_of_the_target() -> None:
    coat = obj(1, "coat", "black", (0, 2))
    ref, tgt = scene(BAG, coat), scene(replace(BAG, colour="yellow"), coat, bg="lavender")
    change = bs.captions.describe_target(ref.attrs, tgt.attrs, np.random.default_rng(0))
    assert change.absolute and change.aspects == ()
    assert bs.absolute_caption(tgt.attrs) in change.caption
    assert holds(tgt.attrs, list(change.constraints)) and not holds(ref.attrs, list(change.constraints))
    extra = scene(replace(BAG, colour="yellow"), coat, obj(2, "star", "pink", (1, 1)), bg="lavender")
    assert not holds(extra.attrs, list(change.constraints))  # one object more is another scene
    assert bs.captions.describe_target(ref.attrs, ref.attrs, np.random.default_rng(0)) is None


def test_conjunction_and_unsayable_differences() -> None:
    got = captions_of(scene(BAG), scene(replace(BAG, colour="yellow"), obj(1, "star", "pink", (1, 1)), bg="lavender"))
    for caption, aspects in got.items():
        assert caption.count(",") == 1 and " and " in caption
        assert {"statement_with_conjunction", "addition", "spatial_relations_background"} <= set(aspects)
    rng = np.random.default_rng(0)
    two_changes_one_object = scene(replace(BAG, colour="yellow", size="small"))
    assert bs.describe_change(scene(BAG).attrs, two_changes_one_object.attrs, rng) is None
    twins = (BAG, obj(1, "bag", "red", (1, 1)))  # "the red bag" would not say which one
    assert bs.describe_change(scene(*twins).attrs, scene(replace(BAG, size="small"), twins[1]).attrs, rng) is None
    assert bs.describe_change(scene(BAG).attrs, scene(BAG).attrs, rng) is None


def test_geometry_of_attrs_and_predicates() -> None:
    s = scene(BAG, obj(1, "star", "pink", (1, 1)))
    bag, star = s.attrs["objects"]
    assert (bag["x"], bag["y"], star["x"], star["y"]) == (round(1 / 6, 4), 0.25, 0.5, 0.75)
    close = scene(BAG, close_up=True).attrs["objects"][0]  # zoom 1.35 about the centre
    assert (close["x"], close["y"]) == (round(0.5 - (0.5 - 1 / 6) * 1.35, 4), round(0.5 - 0.25 * 1.35, 4))
    assert scene(BAG, mirrored=True).attrs["objects"][0]["x"] == round(5 / 6, 4)
    a = s.attrs
    assert bs.satisfies(a, [{"op": "relation", "a": {"kind": "star"}, "b": {"kind": "bag"}, "rel": "below"}])
    assert not bs.satisfies(a, [{"op": "relation", "a": {"kind": "star"}, "b": {"kind": "bag"}, "rel": "left of"}])
    assert bs.satisfies(a, [{"op": "has", "kind": "star", "region": "bottom", "min": 1}])
    assert not bs.satisfies(a, [{"op": "has", "kind": "star", "region": "left", "min": 1}])  # middle column
    assert not bs.satisfies(a, [{"op": "has", "kind": "bag", "min": 0, "max": 0}])
    with pytest.raises(ValueError, match="unknown constraint"):
        bs.satisfies(a, [{"op": "near"}])


def test_absolute_caption() -> None:
    s = scene(obj(0, "bag", "red", (0, 0), "small"), obj(1, "bag", "red", (0, 2), "small"),
              obj(2, "trousers", "orange", (1, 1)), pattern="stripes", bg="light blue", close_up=True)
    assert bs.absolute_caption(s.attrs) == (
        "a close-up of two small red bags and a large orange pair of trousers on a striped light blue background")
    assert bs.absolute_caption(scene(obj(0, "ankle boot", "grey", (0, 0))).attrs) == (
        "a large grey ankle boot on a light grey background")


def test_scene_renderer_size_mirror_and_zoom() -> None:
    render = bs.SceneRenderer()
    s = scene(obj(0, "sneaker", "red", (0, 0)), obj(1, "triangle", "navy blue", (1, 2), "small"), pattern="dots")
    image = np.asarray(render(s.attrs))
    assert image.shape == (85, 128, 3)
    mirrored = np.asarray(render(replace(s, mirrored=True).attrs))
    assert np.array_equal(mirrored, image[:, ::-1])
    zoomed = np.asarray(render(replace(s, close_up=True).attrs))
    assert not np.array_equal(zoomed, image)
    red = np.array([205, 32, 40])
    # the sneaker sits in the top-left cell; the bottom-right cell holds only navy and background
    assert np.abs(image[:42, :42].astype(int) - red).sum(axis=2).min() < 120
    assert np.abs(image[43:, 86:].astype(int) - red).sum(axis=2).min() > 120


def test_partial_captions_name_only_what_the_scene_shows() -> None:
    rng = np.random.default_rng(0)
    obj = {"id": 0, "kind": "bag", "colour": "red", "size": "small", "cell": [0, 0], "x": 0.3, "y": 0.3}
    scene = {"objects": [obj, {**obj, "id": 1, "x": 0.7}, {**obj, "id": 2, "kind": "star", "colour": "navy blue",
                                                            "size": "large", "y": 0.7}],
             "background": {"colour": "lavender", "pattern": "stripes"}, "view": {"close_up": False, "mirrored": False}}
    seen = set()
    for _ in range(200):
        text = partial_caption(scene, rng)
        seen.add(text)
        assert re.fullmatch(r"(has |is on )?[a-z ,-]+", text) and "  " not in text, text
        assert not re.search(r"\b(coat|sneaker|heart|pink|green|plain|dotted)\b", text), text
        assert not re.search(r"\ba bags\b|\btwo [a-z ]*bag\b", text), text  # the two red bags are counted
        assert not re.search(r"\bsmall [a-z ]*star\b", text.split(" and ")[-1]), text  # the star is large
    assert len(seen) >= 20 and any(t.startswith("has ") for t in seen) and any("background" in t for t in seen)
