"""The embedded ``fashion`` benchmark, written exactly in the FashionIQ layout.

Items are real Fashion-MNIST product photos (dress, shirt, T-shirt/top -> ``dress``, ``shirt``,
``toptee``). Every gallery image is one *rendering* of an item: colour x pattern x chest print,
on a canvas whose aspect ratio depends on the category (dresses tall, as in CLIP4Cir's Fig. 5).

A triplet is (reference rendering, two relative captions, target rendering), as in FashionIQ:
reference and target are *different products of the same category*. The captions state two of the
three attributes: one or two changes, and for one change an attribute that stays. In half the
triplets (``FashionBenchConfig.incidental_prob``) the third attribute, which no caption mentions,
differs too, as FashionIQ's annotators name only some of the differences between two products. The
target is rendered on another item of the split/category drawn at random. References recur
across triplets (half of them reuse a rendering already planned). After the triplets are planned,
every item of every split is topped up with random attributes to the same number of renderings
(a triplet's renderings count toward it), so the gallery is diverse and has one shape in all
splits, and no item is rendered twice with the same attributes. What each modality is worth:

- image-only retrieval is the weakest: the target is another product, so the images closest to
  the reference (the reference itself and the other renderings of its item) are not the answer;
- text carries most of the answer: the captions state two of the target's three attributes, which
  leave a small share of the gallery;
- the image helps in half the triplets only: there the attribute neither caption mentions is the
  reference's, and only the reference says what it is (text alone ties every rendering that
  matches the captions). In the other half it differs, and the reference's look-alikes pull an
  image + text query away from the target, which is one reason why FashionIQ's zero-shot text-only
  baseline can beat image + text.

With two changes the captions split them (c1 one, c2 the other), so both captions are needed;
with one change one caption says it and the other an attribute that stays, so a query
("C1 and c2") never says one attribute twice.

Layout (a FashionIQ root)::

    captions/cap.<category>.<split>.json        [{"target", "candidate", "captions": [c1, c2]}]
    image_splits/split.<category>.<split>.json  [name, ...]  (the split/category gallery)
    images/<name>.png
    cirlib_meta.json                            generator, version, seed, sizes, fingerprint, attributes

``test`` captions have no "target" (FashionIQ convention). ``cirlib_meta.json`` is ours: it gives
every image's attributes (absolute captions for pretraining, zero-shot labels, analyses); the
attribute ``item`` indexes the Fashion-MNIST train set for the ``train`` split and the test set
for ``val``/``test``, so items are disjoint across splits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cirlib.core import paths
from cirlib.core.io import fingerprint, write_json
from cirlib.data import fashion_mnist
from cirlib.data.synth import render
from cirlib.data.synth.meta import meta_path, peek_meta, read_meta, write_meta

GENERATOR = "cirlib.data.synth.fashion/1"
# Part of the fingerprint. 2: captions say each attribute once, in one mood. 3: the target is another item of
# the same category, not the reference re-rendered; every split's gallery has one shape (random renderings
# per item); sizes count queries per category. 4: in half the triplets the attribute no caption mentions differs too.
VERSION = 4
CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASS_OF: dict[str, int] = {cat: label for label, cat in fashion_mnist.FASHIONIQ_CATEGORIES.items()}
# Width / height ranges per category (CLIP4Cir Fig. 5: dresses are tall, tops nearly square).
ASPECT_RANGES: dict[str, tuple[float, float]] = {
    "dress": (0.55, 0.8),
    "shirt": (0.8, 1.0),
    "toptee": (0.85, 1.15),
}
ATTRIBUTES: tuple[str, ...] = ("colour", "pattern", "logo")
CATEGORY_NOUNS: dict[str, str] = {"dress": "dress", "shirt": "shirt", "toptee": "top"}
CHUNK_SIZE = 500  # images per worker task
PARALLEL_FROM = 3000  # images; smaller benchmarks render in-process by default
PNG_COMPRESS_LEVEL = 1  # twice as fast to encode as the default 6, files ~10 % larger

Combo = tuple[str, str, str]  # (colour, pattern, logo)
VOCAB: dict[str, tuple[str, ...]] = {
    "colour": tuple(render.COLOURS),
    "pattern": render.PATTERNS,
    "logo": render.LOGOS,
}


@dataclass(frozen=True)
class SplitSizes:
    """Sizes of one split, per category."""

    items: int  # Fashion-MNIST items
    renderings_per_item: int  # each item's gallery renderings are topped up to at least this many
    queries: int  # triplets

    def __post_init__(self) -> None:
        if self.renderings_per_item < 1 or self.queries < 0:
            raise ValueError(f"need renderings_per_item >= 1 and queries >= 0, got {self}")
        if self.queries and self.items < 2:
            raise ValueError(f"a target is another item than its reference: need items >= 2, got {self}")


@dataclass(frozen=True)
class FashionBenchConfig:
    """Everything that determines the generated benchmark (it is part of the fingerprint)."""

    train: SplitSizes = SplitSizes(items=2000, renderings_per_item=3, queries=3300)
    val: SplitSizes = SplitSizes(items=600, renderings_per_item=3, queries=300)
    test: SplitSizes = SplitSizes(items=300, renderings_per_item=3, queries=150)
    seed: int = 0
    long_side: int = 128
    two_change_prob: float = 0.5  # share of triplets whose captions state two changes
    incidental_prob: float = 0.5  # share whose target also differs in the attribute no caption mentions

    def __post_init__(self) -> None:
        for name in ("two_change_prob", "incidental_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> FashionBenchConfig:
        """Tiny sizes for tests and quick notebook runs (a few seconds); same code paths."""
        return cls(
            train=SplitSizes(items=40, renderings_per_item=3, queries=60),
            val=SplitSizes(items=40, renderings_per_item=3, queries=20),
            test=SplitSizes(items=12, renderings_per_item=3, queries=6),
        )

    def sizes(self, split: str) -> SplitSizes:
        return getattr(self, split)


# ------------------------------------------------------------------------------------ captions
# FashionIQ style: lower-case fragments, US spelling, no full stop; a query reads "C1 and c2".
# A query says each attribute once, in one mood: descriptive ("is red") or imperative ("make it red").
_PATTERN_NOUNS = {
    "stripes": "stripes",
    "dots": "polka dots",
    "checks": "checks",
    "zigzag": "zigzag pattern",
    "diamonds": "diamond pattern",
}
_PATTERN_PHRASES = {  # descriptive phrasings of a pattern, whatever it replaces
    "stripes": ("has stripes", "is striped", "has horizontal stripes", "is a striped one", "comes in stripes"),
    "dots": ("has polka dots", "is polka-dotted", "has dots all over", "is a polka-dot one", "is dotted"),
    "checks": ("has a check pattern", "is checkered", "is gingham", "is a checked one", "has a checked pattern"),
    "zigzag": ("has a zigzag pattern", "has zigzags", "is zigzag patterned", "has zigzag lines"),
    "diamonds": ("has a diamond pattern", "is covered in small diamonds", "has diamonds all over",
                 "is diamond patterned"),
}
_PATTERN_ORDERS = {  # imperative phrasings of a pattern
    "stripes": ("make it striped", "add stripes", "give it stripes"),
    "dots": ("make it polka dot", "add polka dots", "give it polka dots"),
    "checks": ("make it checked", "add checks", "give it a gingham pattern"),
    "zigzag": ("make it zigzag", "add a zigzag pattern", "give it zigzags"),
    "diamonds": ("make it diamond patterned", "add a diamond pattern", "give it small diamonds"),
}
_DESCRIPTIVE, _IMPERATIVE = 0, 1
P_IMPERATIVE = 0.3  # share of queries phrased as orders


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article: "a red one", "an orange one"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _indefinite(noun: str) -> str:
    """``"a zigzag pattern"`` but ``"stripes"``: plural nouns take no article."""
    return noun if noun.endswith("s") else _a(noun)


def _colour_phrases(ref: str, tgt: str, mood: int) -> list[str]:
    """Ways to say the colour changes from ``ref`` to ``tgt``; each names ``tgt``."""
    darker = render.luminance(render.COLOURS[tgt]) < render.luminance(render.COLOURS[ref]) - 60
    lighter = render.luminance(render.COLOURS[tgt]) > render.luminance(render.COLOURS[ref]) + 60
    if mood == _IMPERATIVE:
        out = [f"make it {tgt}", f"change the color to {tgt}", f"make it {tgt} instead of {ref}",
               f"change it from {ref} to {tgt}", f"turn it {tgt}", f"switch the color to {tgt}",
               f"make the color {tgt}", f"dye it {tgt}"]
        if darker or lighter:  # comparatives only where they are true
            out.append(f"make it {'darker' if darker else 'lighter'}, {tgt} rather than {ref}")
        return out
    out = [f"is {tgt}", f"is {tgt} instead of {ref}", f"comes in {tgt}", f"is {tgt} in color",
           f"is {_a(tgt)} one", f"is colored {tgt}", f"is in {tgt}", f"is now {tgt}",
           f"is {tgt} rather than {ref}", f"has {_a(tgt)} color", f"should be {tgt}", f"is {tgt}, not {ref}"]
    if darker or lighter:
        out.append(f"is {'darker' if darker else 'lighter'}, {tgt} rather than {ref}")
    return out


def _pattern_phrases(ref: str, tgt: str, mood: int) -> list[str]:
    """Ways to say the pattern changes from ``ref`` to ``tgt``; each names ``tgt`` or the removal."""
    if tgt == "plain":
        old = _PATTERN_NOUNS[ref]
        if mood == _IMPERATIVE:
            return [f"remove the {old}", "make it plain", f"get rid of the {old}", "remove the pattern",
                    f"make it plain without the {old}"]
        return ["is plain", "has no pattern", "is solid", "is plain without any pattern", f"has no {old} anymore",
                f"is without the {old}", "is a plain one", f"is plain instead of {render.PATTERN_ADJECTIVES[ref]}"]
    new = _indefinite(_PATTERN_NOUNS[tgt])
    if mood == _IMPERATIVE:
        out = list(_PATTERN_ORDERS[tgt]) + [f"change the pattern to {_PATTERN_NOUNS[tgt]}"]
        if ref != "plain":
            out.append(f"replace the {_PATTERN_NOUNS[ref]} with {new}")
        return out
    out = list(_PATTERN_PHRASES[tgt])
    if ref != "plain":
        out += [f"has {new} instead of the {_PATTERN_NOUNS[ref]}",
                f"is {render.PATTERN_ADJECTIVES[tgt]} instead of {render.PATTERN_ADJECTIVES[ref]}"]
    else:
        out.append(f"is not plain but has {new}")
    return out


def _logo_phrases(ref: str, tgt: str, mood: int) -> list[str]:
    """Ways to say the chest print changes from ``ref`` to ``tgt``; each names ``tgt`` or the removal."""
    if tgt == "none":
        if mood == _IMPERATIVE:
            return [f"remove the {ref} print", "remove the logo", f"take off the {ref} graphic",
                    f"get rid of the {ref} on the chest"]
        return ["has no print", "has no logo", f"is without the {ref} print", "has nothing printed on the front",
                f"has no {ref} on the chest anymore"]
    if mood == _IMPERATIVE:
        out = [f"give it a {tgt} print", f"put a {tgt} on the chest"]
        if ref == "none":
            out += [f"add a {tgt} logo", f"add a small {tgt} graphic"]
        else:
            out += [f"replace the {ref} with a {tgt}", f"swap the {ref} for a {tgt}", f"change the print to a {tgt}"]
        return out
    out = [f"has a {tgt} print", f"has a {tgt} on the chest", f"has a small {tgt} graphic",
           f"has a {tgt} printed on the front", f"features a {tgt} logo", f"shows a {tgt} on the front"]
    if ref != "none":
        out += [f"has a {tgt} instead of a {ref}", f"has a {tgt} print rather than a {ref}"]
    return out


def _kept_phrases(attr: str, value: str, mood: int) -> list[str]:
    """Ways to say ``attr`` keeps ``value`` (the other caption of a one-change query)."""
    if attr == "colour":
        if mood == _IMPERATIVE:
            return [f"keep it {value}", f"keep the {value} color", f"leave the color {value}"]
        return [f"is still {value}", f"stays {value}", f"keeps the {value} color", f"is {value} as before"]
    if attr == "pattern":
        if value == "plain":
            return ["keep it plain", "leave it plain"] if mood == _IMPERATIVE else ["is still plain",
                                                                                  "still has no pattern"]
        noun = _PATTERN_NOUNS[value]
        if mood == _IMPERATIVE:
            return [f"keep the {noun}", f"keep it {render.PATTERN_ADJECTIVES[value]}"]
        return [f"still has {_indefinite(noun)}", f"keeps the {noun}", f"is still {render.PATTERN_ADJECTIVES[value]}"]
    if value == "none":
        return (["keep the front blank", "leave the chest blank"] if mood == _IMPERATIVE
                else ["still has no print", "still has no logo", "still has a blank front"])
    if mood == _IMPERATIVE:
        return [f"keep the {value} print", f"leave the {value} on the chest"]
    return [f"still has the {value} print", f"keeps the {value} on the chest", f"still has a {value} graphic"]


_PHRASERS = {"colour": _colour_phrases, "pattern": _pattern_phrases, "logo": _logo_phrases}


def relative_captions(
    ref: dict[str, str], tgt: dict[str, str], rng: np.random.Generator, unsaid: str | None = None
) -> list[str]:
    """Two FashionIQ-style captions stating a change of one or two of colour/pattern/logo.

    Two changes: one caption each, so both are needed. One change: one caption says it, the
    other says an attribute that stays (never the same attribute twice). Both captions share a
    mood, and their order is random. ``unsaid`` is the attribute neither caption may mention, which
    may differ between ``ref`` and ``tgt`` (a difference the annotator left out); None: any attribute
    that stays.
    """
    if unsaid is not None and unsaid not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {unsaid!r}; choose one of {ATTRIBUTES}")
    changed = [a for a in ATTRIBUTES if ref[a] != tgt[a] and a != unsaid]
    if not 1 <= len(changed) <= 2:
        raise ValueError(f"the captions state one or two changes, got {changed}"
                         + (f" besides the unsaid {unsaid}" if unsaid else ""))
    mood = _IMPERATIVE if rng.random() < P_IMPERATIVE else _DESCRIPTIVE
    options = [_PHRASERS[a](ref[a], tgt[a], mood) for a in changed]
    if len(changed) == 1:
        kept = [a for a in ATTRIBUTES if a not in changed and a != unsaid]
        attr = kept[int(rng.integers(len(kept)))]
        options.append(_kept_phrases(attr, tgt[attr], mood))
    captions = [str(phrases[int(rng.integers(len(phrases)))]) for phrases in options]
    return [captions[i] for i in rng.permutation(2)]


def stated_attributes(caption: str, ref: dict[str, str], tgt: dict[str, str]) -> set[str]:
    """The attributes one relative caption from ``ref`` to ``tgt`` states, in either mood: a change
    where the two differ, the value that stays where they agree.

    Read from this generator's own phrasings (exact matches), so analyses can tell which
    difference a triplet leaves unsaid without the benchmark's files recording it, as FashionIQ's
    do not; a caption written any other way states nothing here.
    """
    return {a for a in ATTRIBUTES for mood in (_DESCRIPTIVE, _IMPERATIVE)
            if caption in (_PHRASERS[a](ref[a], tgt[a], mood) if ref[a] != tgt[a]
                           else _kept_phrases(a, tgt[a], mood))}


def unsaid_attribute(captions: list[str] | tuple[str, ...], ref: dict[str, str], tgt: dict[str, str]) -> str:
    """The attribute neither of a triplet's captions states (:func:`relative_captions`' ``unsaid``);
    it differs between ``ref`` and ``tgt`` in the triplets whose annotator left a difference out.

    Raises ValueError unless the captions state exactly two attributes between them, which every
    triplet this generator writes does.
    """
    stated = set().union(*(stated_attributes(c, ref, tgt) for c in captions))
    unsaid = [a for a in ATTRIBUTES if a not in stated]
    if len(unsaid) != 1:
        raise ValueError(f"captions {list(captions)} state {sorted(stated) or 'no attribute'} of "
                         f"{ATTRIBUTES} for {ref} -> {tgt}; this generator's triplets state exactly two")
    return unsaid[0]


def absolute_caption(attrs: dict) -> str:
    """Plain description of one rendering, e.g. ``"a red striped dress with a star print"``."""
    noun = CATEGORY_NOUNS[attrs["category"]]
    if attrs["pattern"] == "plain":
        text = f"a plain {attrs['colour']} {noun}"
    else:
        text = f"a {attrs['colour']} {render.PATTERN_ADJECTIVES[attrs['pattern']]} {noun}"
    if attrs["logo"] != "none":
        text += f" with a {attrs['logo']} print"
    return text


def partial_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A description of one or two of a rendering's attributes, as people write them: "a red dress",
    "is striped and has a star print". Pretraining pairs some images with one, as web alt-text
    mentions only some of what a photo shows; it is how the model learns to read captions that
    state attributes rather than describe a whole product."""
    chosen = [ATTRIBUTES[i] for i in sorted(rng.choice(3, int(rng.integers(1, 3)), replace=False))]
    if rng.random() < 0.5:  # a noun phrase: "a red dress", "a striped top with a star print"
        noun = CATEGORY_NOUNS[attrs["category"]]
        words = [attrs["colour"]] if "colour" in chosen else []
        if "pattern" in chosen:
            words.append(render.PATTERN_ADJECTIVES[attrs["pattern"]])
        text = _a(" ".join([*words, noun]))
        if "logo" in chosen:
            text += f" with a {attrs['logo']} print" if attrs["logo"] != "none" else " with no print"
        return text
    options = [_statements(a, attrs[a]) for a in chosen]  # "is red", "has stripes", "has a star print"
    return " and ".join(str(o[int(rng.integers(len(o)))]) for o in options)


def _statements(attr: str, value: str) -> list[str]:
    """Descriptive statements of one attribute value, with no reference to compare with."""
    if attr == "colour":
        return [f"is {value}", f"comes in {value}", f"is {value} in color"]
    if attr == "pattern":
        return ["is plain", "has no pattern"] if value == "plain" else list(_PATTERN_PHRASES[value])
    if value == "none":
        return ["has no print", "has no logo"]
    return [f"has a {value} print", f"has a {value} on the chest", f"features a {value} logo"]


LEGIBILITY_ATTRIBUTES: tuple[str, ...] = ATTRIBUTES
"""What the relative captions talk about, as :func:`counterfactual` can change it."""


def counterfactual(attrs: dict, attribute: str, rng: np.random.Generator) -> dict:
    """``attrs`` with ``attribute`` (colour, pattern or logo) set to another value, for legibility probes."""
    if attribute not in VOCAB:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {ATTRIBUTES}")
    options = [v for v in VOCAB[attribute] if v != attrs[attribute]]
    return {**attrs, attribute: options[int(rng.integers(len(options)))]}


# -------------------------------------------------------------------------------------- planning
@dataclass
class _ItemRenderings:
    """The attribute combinations rendered for one item, in first-seen order (names follow it)."""

    index: int
    combos: dict[Combo, None] = field(default_factory=dict)

    def add(self, combo: Combo) -> bool:
        """Add ``combo``; whether it is new for this item."""
        if combo in self.combos:
            return False
        self.combos[combo] = None
        return True


def _random_combo(rng: np.random.Generator) -> Combo:
    return tuple(str(VOCAB[a][rng.integers(len(VOCAB[a]))]) for a in ATTRIBUTES)  # type: ignore[return-value]


def _change(combo: Combo, attr: str, rng: np.random.Generator) -> Combo:
    """``combo`` with ``attr`` set to a random different value."""
    i = ATTRIBUTES.index(attr)
    choices = [v for v in VOCAB[attr] if v != combo[i]]
    out = list(combo)
    out[i] = choices[rng.integers(len(choices))]
    return tuple(out)  # type: ignore[return-value]


def _plan_category(
    split: str, category: str, item_indices: np.ndarray, sizes: SplitSizes, config: FashionBenchConfig
) -> tuple[list[dict], dict[str, dict], dict[str, int]]:
    """Triplets (with combos), per-image attributes and per-image texture seeds of one split/category."""
    rng = np.random.default_rng([config.seed, SPLITS.index(split), CATEGORIES.index(category)])
    items = [_ItemRenderings(int(i)) for i in item_indices]
    rendered: list[tuple[int, Combo]] = []  # every (item position, combo), in first-seen order

    def add(pos: int, combo: Combo) -> None:
        if items[pos].add(combo):
            rendered.append((pos, combo))

    plans: list[tuple[int, Combo, int, Combo, str]] = []  # (..., the attribute no caption mentions)
    used_pairs: set[tuple[int, Combo, int, Combo]] = set()
    while len(plans) < sizes.queries:
        if rendered and rng.random() < 0.5:  # FashionIQ references recur across triplets
            ref_pos, ref = rendered[rng.integers(len(rendered))]
        else:
            ref_pos, ref = int(rng.integers(len(items))), _random_combo(rng)
        n_changes = 2 if rng.random() < config.two_change_prob else 1
        said = sorted(rng.choice(len(ATTRIBUTES), n_changes, replace=False))
        tgt = ref
        for i in said:
            tgt = _change(tgt, ATTRIBUTES[i], rng)
        rest = [a for i, a in enumerate(ATTRIBUTES) if i not in said]
        unsaid = rest[int(rng.integers(len(rest)))]  # for one change, the other caption says what stays
        if rng.random() < config.incidental_prob:
            tgt = _change(tgt, unsaid, rng)
        tgt_pos = int(rng.integers(len(items) - 1))
        tgt_pos += tgt_pos >= ref_pos  # another item of the same category
        if (ref_pos, ref, tgt_pos, tgt) in used_pairs:
            continue
        used_pairs.add((ref_pos, ref, tgt_pos, tgt))
        add(ref_pos, ref)
        add(tgt_pos, tgt)
        plans.append((ref_pos, ref, tgt_pos, tgt, unsaid))
    for pos, item in enumerate(items):
        while len(item.combos) < sizes.renderings_per_item:
            add(pos, _random_combo(rng))

    lo, hi = ASPECT_RANGES[category]
    attributes: dict[str, dict] = {}
    seeds: dict[str, int] = {}
    names: dict[tuple[int, Combo], str] = {}
    for pos, item in enumerate(items):
        for k, combo in enumerate(item.combos):
            name = f"{category}-{split}-{item.index:05d}-{k:02d}"
            names[(pos, combo)] = name
            ratio = float(rng.uniform(lo, hi))  # width / height, per image
            long = config.long_side
            w, h = (round(long * ratio), long) if ratio <= 1 else (long, round(long / ratio))
            attributes[name] = {
                "item": item.index,
                "category": category,
                "colour": combo[0],
                "pattern": combo[1],
                "logo": combo[2],
                "split": split,
                "width": w,
                "height": h,
            }
            seeds[name] = int(rng.integers(2**31))

    triplets = []
    for ref_pos, ref, tgt_pos, tgt, unsaid in plans:
        ref_name, tgt_name = names[(ref_pos, ref)], names[(tgt_pos, tgt)]
        captions = relative_captions(attributes[ref_name], attributes[tgt_name], rng, unsaid)
        entry = {"target": tgt_name, "candidate": ref_name, "captions": captions}
        if split == "test":
            del entry["target"]
        triplets.append(entry)
    return triplets, attributes, seeds


def _select_items(config: FashionBenchConfig, labels: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Item indices per (split, category): train from the FMNIST train set, val/test disjoint from its test set."""
    out = {}
    for category in CATEGORIES:
        rng = np.random.default_rng([config.seed, 99, CATEGORIES.index(category)])
        train_pool = rng.permutation(np.nonzero(labels["train"] == CLASS_OF[category])[0])
        test_pool = rng.permutation(np.nonzero(labels["test"] == CLASS_OF[category])[0])
        n_val, n_test = config.val.items, config.test.items
        if config.train.items > len(train_pool) or n_val + n_test > len(test_pool):
            raise ValueError(
                f"{category}: asked for {config.train.items} train and {n_val}+{n_test} val+test items; "
                f"Fashion-MNIST has {len(train_pool)} and {len(test_pool)}"
            )
        out[("train", category)] = np.sort(train_pool[: config.train.items])
        out[("val", category)] = np.sort(test_pool[:n_val])
        out[("test", category)] = np.sort(test_pool[n_val : n_val + n_test])
    return out


# ------------------------------------------------------------------------------------- rendering
def _render_chunk(images_dir: str, jobs: list[tuple]) -> int:
    """Worker entry point: render and save ``jobs`` = [(name, item28, w, h, colour, pattern, logo, seed)]."""
    for name, item28, w, h, colour, pattern, logo, seed in jobs:
        img = render.render_item(item28, (w, h), colour, pattern, logo, seed=seed)
        img.save(os.path.join(images_dir, f"{name}.png"), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(jobs)


def _render_all(images_dir: Path, jobs: list[tuple], workers: int) -> None:
    """Render every image; with several workers, chunks go to spawned processes (the result is identical).

    Spawn rather than fork: a notebook calling this may hold torch threads, which fork can deadlock.
    """
    chunks = [jobs[i : i + CHUNK_SIZE] for i in range(0, len(jobs), CHUNK_SIZE)]
    with tqdm(total=len(jobs), desc="fashion images", unit="img") as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                bar.update(_render_chunk(str(images_dir), chunk))
            return
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_render_chunk, str(images_dir), chunk) for chunk in chunks]
            for fut in futures:
                bar.update(fut.result())


# ------------------------------------------------------------------------------------ generation
def _file_lists(root: Path) -> list[Path]:
    """The caption and image-split files of a complete root."""
    files = [root / "captions" / f"cap.{c}.{s}.json" for c in CATEGORIES for s in SPLITS]
    files += [root / "image_splits" / f"split.{c}.{s}.json" for c in CATEGORIES for s in SPLITS]
    return files


def _is_complete(root: Path, fp: str) -> bool:
    meta = peek_meta(root)
    if meta is None or meta.get("fingerprint") != fp or meta.get("generator") != GENERATOR:
        return False
    if not all(p.is_file() for p in _file_lists(root)):
        return False
    on_disk = set(os.listdir(root / "images")) if (root / "images").is_dir() else set()
    return all(f"{name}.png" in on_disk for name in meta["attributes"])


def generate_fashion(
    root: str | os.PathLike, config: FashionBenchConfig | None = None, workers: int | None = None
) -> Path:
    """Write the benchmark under ``root`` and return it; returns at once if it is already there.

    Deterministic in ``config``; ``workers`` (default: all cores for large benchmarks, else 1)
    only changes speed. Regeneration (a new seed or size) first removes the images of the
    previous generation, so the folder holds one benchmark.
    """
    root = Path(root)
    config = config or FashionBenchConfig()
    images = {s: fashion_mnist.load_split(s)[0] for s in ("train", "test")}
    labels = {s: fashion_mnist.load_split(s)[1] for s in ("train", "test")}
    selected = _select_items(config, labels)
    pixels = hashlib.sha256()
    for (split, _), idx in sorted(selected.items()):
        pixels.update(images["train" if split == "train" else "test"][idx].tobytes())
    fp = fingerprint(
        {"generator": GENERATOR, "version": VERSION, "config": asdict(config), "items": pixels.hexdigest()}
    )
    if _is_complete(root, fp):
        return root

    captions: dict[tuple[str, str], list[dict]] = {}
    attributes: dict[str, dict] = {}
    seeds: dict[str, int] = {}
    for split in SPLITS:
        for category in CATEGORIES:
            trip, attrs, sd = _plan_category(
                split, category, selected[(split, category)], config.sizes(split), config
            )
            captions[(split, category)] = trip
            attributes.update(attrs)
            seeds.update(sd)

    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if meta_path(root).is_file():  # a previous generation: drop its images
        meta_path(root).unlink()
        for stale in images_dir.glob("*.png"):
            stale.unlink()
    jobs = [
        (name, images["train" if a["split"] == "train" else "test"][a["item"]], a["width"], a["height"])
        + (a["colour"], a["pattern"], a["logo"], seeds[name])
        for name, a in attributes.items()
    ]
    if workers is None:  # starting processes costs seconds: worth it for the full benchmark only
        workers = min(len(os.sched_getaffinity(0)), 8) if len(jobs) >= PARALLEL_FROM else 1
    _render_all(images_dir, jobs, workers)

    for (split, category), trip in captions.items():
        write_json(root / "captions" / f"cap.{category}.{split}.json", trip)
        gallery = [n for n, a in attributes.items() if a["split"] == split and a["category"] == category]
        write_json(root / "image_splits" / f"split.{category}.{split}.json", gallery)
    meta = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": config.seed,
        "sizes": asdict(config),
        "fingerprint": fp,
        "attributes": attributes,
    }
    write_meta(root, meta)  # last: its presence marks a complete benchmark
    return root


def load_meta(root: str | os.PathLike) -> dict:
    """``cirlib_meta.json`` of a root written by :func:`generate_fashion` (attributes of every image)."""
    return read_meta(root, {GENERATOR})


def _read_json(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


DIFFERENCE_COLUMNS: tuple[str, ...] = ("one_difference", "two_differences", "three_differences")


def summary(root: str | os.PathLike) -> pd.DataFrame:
    """Per split/category counts: queries, triplets by how many attributes differ between reference
    and target (the captions state one or two changes; an attribute they leave out may differ too),
    gallery images, items, mean w/h."""
    root = Path(root)
    attributes = load_meta(root)["attributes"]
    rows = []
    for split in SPLITS:
        for category in CATEGORIES:
            trip = _read_json(root / "captions" / f"cap.{category}.{split}.json")
            gallery = _read_json(root / "image_splits" / f"split.{category}.{split}.json")
            n_differ = [
                sum(attributes[t["candidate"]][a] != attributes[t["target"]][a] for a in ATTRIBUTES)
                for t in trip
                if "target" in t
            ]
            aspects = [attributes[n]["width"] / attributes[n]["height"] for n in gallery]
            rows.append(
                {
                    "split": split,
                    "category": category,
                    "queries": len(trip),
                    **{col: n_differ.count(k) if n_differ else None for k, col in enumerate(DIFFERENCE_COLUMNS, 1)},
                    "gallery": len(gallery),
                    "items": len({attributes[n]["item"] for n in gallery}),
                    "mean_aspect": float(np.mean(aspects)),
                }
            )
    return pd.DataFrame(rows).astype(dict.fromkeys(DIFFERENCE_COLUMNS, "Int64"))  # <NA> on test


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the embedded FashionIQ-format benchmark.")
    parser.add_argument("--root", type=Path, default=None, help="default: data/fashion (data/quick/fashion)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    config = FashionBenchConfig.quick() if args.quick else FashionBenchConfig()
    config = replace(config, seed=args.seed)
    root = args.root or paths.data_dir(args.quick) / "fashion"
    start = time.perf_counter()
    generate_fashion(root, config, workers=args.workers)
    print(f"{root} ready in {time.perf_counter() - start:.1f} s")
    print(summary(root).to_string(index=False))


if __name__ == "__main__":
    main()
