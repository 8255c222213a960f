"""The embedded fashion benchmark: exact FashionIQ layout, triplet semantics, determinism, idempotence."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlib.data.synth import fashion as bf
from cirlib.data.synth.fashion import FashionBenchConfig, SplitSizes
from cirlib.data.synth.meta import META_FILE

pytestmark = pytest.mark.skipif(
    not bf.fashion_mnist.DEBIAN_DIR.is_dir(), reason="needs Fashion-MNIST (Debian dataset-fashion-mnist)"
)

# A smaller config for tests that generate several copies.
TINY = replace(
    FashionBenchConfig.quick(),
    train=SplitSizes(items=6, renderings_per_item=3, queries=6),
    val=SplitSizes(items=4, renderings_per_item=3, queries=4),
    test=SplitSizes(items=3, renderings_per_item=2, queries=2),
    long_side=64,
)
TARGET_WORDS = {
    "pattern": {
        "stripes": ("stripe",),
        "dots": ("dot",),
        "checks": ("check", "gingham"),
        "zigzag": ("zigzag",),
        "diamonds": ("diamond",),
        "plain": ("plain", "no pattern", "solid", "remove", "without", "rid of", "anymore"),
    },
    "logo": {
        "none": ("no print", "no logo", "remove", "without", "rid of", "take off", "nothing printed", "blank",
                 "anymore")
    },
}


def mentions(caption: str, attr: str, value: str) -> bool:
    """Does ``caption`` name ``value`` (the target's new ``attr``) or its removal?"""
    words = TARGET_WORDS.get(attr, {}).get(value, (value,))
    return any(w in caption for w in words)


def read(root: Path, kind: str, category: str, split: str) -> list:
    folder, prefix = ("captions", "cap") if kind == "captions" else ("image_splits", "split")
    return json.loads((root / folder / f"{prefix}.{category}.{split}.json").read_text())


@pytest.fixture(scope="module")
def meta(quick_fashion_root: Path) -> dict:
    return bf.load_meta(quick_fashion_root)


def test_exact_fashioniq_layout(quick_fashion_root: Path, meta: dict) -> None:
    expected = {f"captions/cap.{c}.{s}.json" for c in bf.CATEGORIES for s in bf.SPLITS}
    expected |= {f"image_splits/split.{c}.{s}.json" for c in bf.CATEGORIES for s in bf.SPLITS}
    json_files = {str(p.relative_to(quick_fashion_root)) for p in quick_fashion_root.rglob("*.json")}
    assert json_files == expected | {META_FILE}
    for category in bf.CATEGORIES:
        for split in bf.SPLITS:
            captions = read(quick_fashion_root, "captions", category, split)
            keys = ["candidate", "captions"] if split == "test" else ["target", "candidate", "captions"]
            assert captions and all(list(t) == keys for t in captions), (category, split)
            for t in captions:
                assert len(t["captions"]) == 2
                assert all(isinstance(c, str) and c == c.strip() and c for c in t["captions"])
            gallery = read(quick_fashion_root, "image_splits", category, split)
            assert isinstance(gallery, list) and len(gallery) == len(set(gallery))
            assert all(isinstance(n, str) for n in gallery)
    assert set(meta) == {"generator", "version", "seed", "sizes", "fingerprint", "attributes"}
    assert meta["seed"] == 0 and meta["sizes"]["val"]["items"] == FashionBenchConfig.quick().val.items
    names = {p.stem for p in (quick_fashion_root / "images").iterdir()}
    assert {p.suffix for p in (quick_fashion_root / "images").iterdir()} == {".png"}
    assert names == set(meta["attributes"])


def test_attributes_and_images_agree(quick_fashion_root: Path, meta: dict) -> None:
    keys = {"item", "category", "colour", "pattern", "logo", "split", "width", "height"}
    for name, attrs in list(meta["attributes"].items())[::17]:
        assert set(attrs) == keys
        with Image.open(quick_fashion_root / "images" / f"{name}.png") as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (attrs["width"], attrs["height"])
        assert max(attrs["width"], attrs["height"]) == 128
    for category in bf.CATEGORIES:
        for split in bf.SPLITS:
            gallery = read(quick_fashion_root, "image_splits", category, split)
            placed = {(meta["attributes"][n]["split"], meta["attributes"][n]["category"]) for n in gallery}
            assert placed == {(split, category)}


def test_triplets_are_in_gallery_and_on_disk(quick_fashion_root: Path) -> None:
    for category in bf.CATEGORIES:
        for split in bf.SPLITS:
            gallery = set(read(quick_fashion_root, "image_splits", category, split))
            for t in read(quick_fashion_root, "captions", category, split):
                for name in (t["candidate"], t.get("target", t["candidate"])):
                    assert name in gallery and (quick_fashion_root / "images" / f"{name}.png").is_file()


def test_items_disjoint_across_splits(meta: dict) -> None:
    items = {s: {(a["category"], a["item"]) for a in meta["attributes"].values() if a["split"] == s} for s in bf.SPLITS}
    # val and test both draw from the Fashion-MNIST test set: they must not share an item;
    # train draws from the Fashion-MNIST train set (a different set of photos)
    assert not items["val"] & items["test"]
    cfg = FashionBenchConfig.quick()
    for split in bf.SPLITS:
        assert len(items[split]) == 3 * cfg.sizes(split).items


def test_target_is_another_item_the_captions_state_two_attributes(quick_fashion_root: Path, meta: dict) -> None:
    """Captions state one or two changes (and, for one, an attribute that stays); about half the
    targets also differ in the third attribute, which no caption mentions."""
    attrs = meta["attributes"]
    counts = {1: 0, 2: 0}
    incidental = n = 0
    left_out: set[str] = set()  # the attributes seen differing without a caption saying so
    for category in bf.CATEGORIES:
        for split in ("train", "val"):
            triplets = read(quick_fashion_root, "captions", category, split)
            pairs = [(t["candidate"], t["target"]) for t in triplets]
            assert len(set(pairs)) == len(pairs), (category, split)
            for t in triplets:
                ref, tgt = attrs[t["candidate"]], attrs[t["target"]]
                assert ref["item"] != tgt["item"], t  # another product ...
                assert ref["category"] == tgt["category"] == category  # ... of the same category
                assert ref["split"] == tgt["split"] == split
                c1, c2 = t["captions"]
                stated = [bf.stated_attributes(c, ref, tgt) for c in (c1, c2)]
                assert all(len(x) == 1 for x in stated) and stated[0] != stated[1], t  # one attribute each
                said = [a for a in bf.ATTRIBUTES if {a} in stated and ref[a] != tgt[a]]
                assert said, t  # at least one change is stated
                unsaid = bf.unsaid_attribute(t["captions"], ref, tgt)
                assert {unsaid} not in stated, t
                counts[len(said)] += 1
                incidental += ref[unsaid] != tgt[unsaid]
                n += 1
                if ref[unsaid] != tgt[unsaid]:
                    left_out.add(unsaid)
                for a in said:  # the caption names the target's value (or the removal)
                    assert mentions(c1, a, tgt[a]) or mentions(c2, a, tgt[a]), t
    assert counts[1] > 10 and counts[2] > 10
    # incidental_prob = 0.5: a binomial share of n (about 240 triplets) within 4.5 standard deviations
    assert abs(incidental / n - 0.5) < 4.5 * (0.25 / n) ** 0.5, (incidental, n)
    assert left_out == set(bf.ATTRIBUTES)  # any attribute can be the one left out
    # references recur across triplets, as in FashionIQ
    references = [t["candidate"] for c in bf.CATEGORIES for t in read(quick_fashion_root, "captions", c, "train")]
    assert len(set(references)) < len(references)


def test_one_gallery_shape_for_every_split(quick_fashion_root: Path, meta: dict) -> None:
    """Every item has at least ``renderings_per_item`` renderings, each with its own attributes, in every split."""
    attrs = meta["attributes"]
    cfg = FashionBenchConfig.quick()
    mean_per_item = {}
    for split in bf.SPLITS:
        per_item: dict[tuple[str, int], list[tuple[str, str, str]]] = {}
        for category in bf.CATEGORIES:
            for name in read(quick_fashion_root, "image_splits", category, split):
                a = attrs[name]
                per_item.setdefault((category, a["item"]), []).append(tuple(a[x] for x in bf.ATTRIBUTES))
        assert len(per_item) == len(bf.CATEGORIES) * cfg.sizes(split).items
        for key, combos in per_item.items():
            assert len(combos) >= cfg.sizes(split).renderings_per_item, (split, key)
            assert len(set(combos)) == len(combos), (split, key)  # no item rendered twice alike
        mean_per_item[split] = np.mean([len(c) for c in per_item.values()])
    assert abs(mean_per_item["train"] - mean_per_item["val"]) < 0.25 * mean_per_item["val"], mean_per_item


def test_aspect_ratio_by_category(quick_fashion_root: Path) -> None:
    table = bf.summary(quick_fashion_root).groupby("category")["mean_aspect"].mean()
    assert table["dress"] < table["shirt"] < table["toptee"]
    assert 0.55 <= table["dress"] <= 0.8 and 0.85 <= table["toptee"] <= 1.15


def test_summary_counts(quick_fashion_root: Path) -> None:
    cfg = FashionBenchConfig.quick()
    df = bf.summary(quick_fashion_root).set_index(["split", "category"])
    assert len(df) == 9
    for split in bf.SPLITS:
        for category in bf.CATEGORIES:
            row = df.loc[(split, category)]
            sizes = cfg.sizes(split)
            assert row["queries"] == sizes.queries
            assert row["items"] == sizes.items
            assert row["gallery"] == len(read(quick_fashion_root, "image_splits", category, split))
            assert row["gallery"] >= sizes.items * sizes.renderings_per_item
            if split != "test":
                assert sum(row[c] for c in bf.DIFFERENCE_COLUMNS) == row["queries"]
                assert (row["one_difference"] > 0 and row["three_differences"] > 0) or sizes.queries < 20


def test_idempotent(quick_fashion_root: Path) -> None:
    files = sorted(quick_fashion_root.rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    start = time.perf_counter()
    assert bf.generate_fashion(quick_fashion_root, FashionBenchConfig.quick(), workers=1) == quick_fashion_root
    assert time.perf_counter() - start < 3.0
    assert sorted(quick_fashion_root.rglob("*")) == files and [p.stat().st_mtime_ns for p in files] == mtimes


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = bf.generate_fashion(tmp_path / "a", TINY, workers=1)
    b = bf.generate_fashion(tmp_path / "b", TINY, workers=1)
    for rel in [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file()]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = bf.generate_fashion(tmp_path / "c", replace(TINY, seed=1), workers=1)
    assert read(a, "captions", "dress", "val") != read(c, "captions", "dress", "val")
    assert bf.load_meta(a)["fingerprint"] != bf.load_meta(c)["fingerprint"]
    # regenerating another seed into a root replaces the old benchmark, images included
    bf.generate_fashion(a, replace(TINY, seed=1), workers=1)
    assert (a / META_FILE).read_bytes() == (c / META_FILE).read_bytes()
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(p.name for p in (c / "images").iterdir())


def test_workers_do_not_change_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = bf.generate_fashion(tmp_path / "one", TINY, workers=1)
    monkeypatch.setattr(bf, "CHUNK_SIZE", 60)  # several chunks, so the process pool is used
    two = bf.generate_fashion(tmp_path / "two", TINY, workers=2)
    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == sorted(p.name for p in (two / "images").iterdir())
    for name in names:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes()


def test_absolute_caption() -> None:
    attrs = {"item": 3, "category": "dress", "colour": "red", "pattern": "stripes", "logo": "star", "split": "val"}
    assert bf.absolute_caption(attrs) == "a red striped dress with a star print"
    plain = {**attrs, "category": "toptee", "colour": "navy blue", "pattern": "plain", "logo": "none"}
    assert bf.absolute_caption(plain) == "a plain navy blue top"
    shirt = {**attrs, "pattern": "dots", "category": "shirt"}
    assert bf.absolute_caption(shirt) == "a red polka-dot shirt with a star print"


def test_relative_captions() -> None:
    rng = np.random.default_rng(0)
    ref = {"colour": "black", "pattern": "plain", "logo": "none"}
    for _ in range(20):
        c1, c2 = bf.relative_captions(ref, {**ref, "colour": "yellow", "logo": "heart"}, rng)
        assert {("yellow" in c1, "heart" in c2), ("heart" in c1, "yellow" in c2)} & {(True, True)}
        assert "darker" not in c1 + c2  # yellow is lighter than black: only true comparatives
        one = bf.relative_captions({**ref, "pattern": "dots"}, ref, rng)  # remove the dots
        assert [mentions(c, "pattern", "plain") for c in one].count(True) == 1, one
    with pytest.raises(ValueError, match="one or two"):
        bf.relative_captions(ref, ref, rng)
    with pytest.raises(ValueError, match="one or two"):
        bf.relative_captions(ref, {"colour": "red", "pattern": "dots", "logo": "star"}, rng)
    # the unsaid attribute may differ; neither caption mentions it, the other two are both stated
    for _ in range(20):
        tgt = {"colour": "yellow", "pattern": "plain", "logo": "heart"}
        captions = bf.relative_captions(ref, tgt, rng, unsaid="logo")
        assert not any("heart" in c or "print" in c or "logo" in c for c in captions), captions
        assert [mentions(c, "colour", "yellow") for c in captions].count(True) == 1, captions
        assert [("plain" in c or "pattern" in c) for c in captions].count(True) == 1, captions  # what stays
        c1, c2 = bf.relative_captions(ref, {**tgt, "pattern": "dots"}, rng, unsaid="logo")
        assert ("yellow" in c1 and "dot" in c2) or ("dot" in c1 and "yellow" in c2), (c1, c2)
        kept = bf.relative_captions(ref, {**ref, "colour": "yellow"}, rng, unsaid="logo")  # logo the same, unsaid
        assert not any("print" in c or "logo" in c or "front" in c for c in kept), kept
        assert sorted("yellow" in c for c in kept) == [False, True], kept  # the change, and ...
        assert any("plain" in c or "pattern" in c for c in kept), kept  # ... the pattern that stays
    with pytest.raises(ValueError, match="one or two changes, got \\[\\] besides the unsaid logo"):
        bf.relative_captions(ref, {**ref, "logo": "star"}, rng, unsaid="logo")
    with pytest.raises(ValueError, match="unknown attribute 'size'"):
        bf.relative_captions(ref, tgt, rng, unsaid="size")


def test_stated_and_unsaid_attributes_read_the_phrasebook() -> None:
    """Hand-written captions: a change, a value that stays, and the attribute left unsaid."""
    ref = {"colour": "black", "pattern": "plain", "logo": "none"}
    tgt = {"colour": "yellow", "pattern": "plain", "logo": "heart"}
    assert bf.stated_attributes("is yellow", ref, tgt) == {"colour"}
    assert bf.stated_attributes("make it yellow", ref, tgt) == {"colour"}  # either mood
    assert bf.stated_attributes("is still plain", ref, tgt) == {"pattern"}  # the value that stays
    assert bf.stated_attributes("has a heart print", ref, tgt) == {"logo"}
    assert bf.stated_attributes("is black", ref, tgt) == set()  # the reference's colour is no change to it
    assert bf.stated_attributes("is still yellow", ref, tgt) == set()  # the colour does not stay
    assert bf.stated_attributes("is a yellow dress", ref, tgt) == set()  # not one of the generator's phrasings
    # the logo differs and neither caption says so: an incidental difference
    assert bf.unsaid_attribute(["is yellow", "is still plain"], ref, tgt) == "logo"
    # two changes stated: the pattern is unsaid, and here it stays
    assert bf.unsaid_attribute(("has a heart print", "turn it yellow"), ref, tgt) == "pattern"
    with pytest.raises(ValueError, match=r"state \['colour'\] of"):
        bf.unsaid_attribute(["is yellow", "is a yellow dress"], ref, tgt)
    with pytest.raises(ValueError, match="state no attribute"):
        bf.unsaid_attribute(["has stripes", "is red"], ref, tgt)
    # the generator's own triplets, unsaid attribute kept or not, always read back
    rng = np.random.default_rng(3)
    for unsaid in bf.ATTRIBUTES:
        for changed in ({**ref, "colour": "red", unsaid: tgt[unsaid]}, {**ref, "pattern": "dots"}):
            if all(changed[a] == ref[a] for a in bf.ATTRIBUTES if a != unsaid):
                continue  # nothing to state besides the unsaid attribute
            captions = bf.relative_captions(ref, changed, rng, unsaid=unsaid)
            assert bf.unsaid_attribute(captions, ref, changed) == unsaid, captions


def test_too_many_items_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dress: asked for .* Fashion-MNIST has 6000"):
        too_many = SplitSizes(items=7000, renderings_per_item=1, queries=2)
        bf.generate_fashion(tmp_path, replace(TINY, train=too_many), workers=1)


def test_split_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="items >= 2"):
        SplitSizes(items=1, renderings_per_item=3, queries=1)  # a target needs another item
    with pytest.raises(ValueError, match="renderings_per_item >= 1"):
        SplitSizes(items=5, renderings_per_item=0, queries=1)
    assert SplitSizes(items=1, renderings_per_item=1, queries=0).queries == 0


def test_probabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="incidental_prob is a probability, got 1.5"):
        FashionBenchConfig(incidental_prob=1.5)
    with pytest.raises(ValueError, match="two_change_prob is a probability, got -0.1"):
        FashionBenchConfig(two_change_prob=-0.1)
