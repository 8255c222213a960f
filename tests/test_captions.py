"""Caption quality of the embedded benchmarks: nothing said twice, nothing contradictory, grammatical, varied.

Every caption of the quick ``fashion`` (FashionIQ format) and ``scenes`` (CIRR and CIRCO formats)
benchmarks is checked, plus thousands of captions drawn straight from the caption functions. A
FashionIQ query is read as the model reads it: both captions joined by "and", in either order.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cirlib.data import datasets
from cirlib.data.synth import fashion as bf
from cirlib.data.synth import render
from cirlib.data.synth import scenes as bs
from cirlib.data.synth.scenes.captions import CLAUSE_STARTS
from cirlib.data.synth.scenes.graph import BACKGROUNDS, ITEM_KINDS
from cirlib.data.synth.scenes.sampler import Sampler

needs_fmnist = pytest.mark.skipif(
    not bf.fashion_mnist.DEBIAN_DIR.is_dir(), reason="needs Fashion-MNIST (Debian dataset-fashion-mnist)"
)


def read(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# ------------------------------------------------------------------------------------ grammar
_VOWEL_SOUND = re.compile(r"\ba ([aeio]\w*|u(?!ni|s[eu])\w*)\b")  # "a orange", "a ankle boot"
_CONSONANT_SOUND = re.compile(r"\ban ([^aeiou\s]\w*|uni\w*)\b")  # "an red", "an unicorn"
_DOUBLED = re.compile(r"\b(\w+) \1\b")


def grammar_errors(text: str) -> list[str]:
    """What is wrong with the surface of ``text``: articles, doubled words, bad joins, empty clauses."""
    errors = []
    low = text.lower()
    if m := _VOWEL_SOUND.search(low):
        errors.append(f"'a' before a vowel sound: {m.group(0)!r}")
    if m := _CONSONANT_SOUND.search(low):
        errors.append(f"'an' before a consonant sound: {m.group(0)!r}")
    if m := _DOUBLED.search(low):
        errors.append(f"doubled word: {m.group(0)!r}")
    if re.search(r"\band (with|and|,)\b|, and\b|,\s*,|\s,|\s\s", low):
        errors.append("ungrammatical join")
    if re.search(r"(\band|,|\bthe|\ba|\ban)\W*$", low) or re.match(r"\W*(and|,)\b", low):
        errors.append("dangling join")
    if any(not c.strip() for c in re.split(r",|\band\b", low.rstrip("."))):
        errors.append("empty clause")
    return errors


def test_grammar_check_catches_the_reported_captions() -> None:
    assert grammar_errors("Add a circle logo and with a small circle graphic")
    assert grammar_errors("add a orange star") and grammar_errors("add an red star")
    assert grammar_errors("is red and") and grammar_errors("the the bag is red")
    assert not grammar_errors("add an orange star and a unique heart, zoomed in")


# ------------------------------------------------------------------------------------ fashion
_FASHION_FAMILIES = {
    "colour": [*render.COLOURS, "blue", "color", "colour", "darker", "lighter"],
    "pattern": ["stripe", "dot", "check", "gingham", "zigzag", "diamond", "plain", "pattern", "solid"],
    "logo": [*(x for x in render.LOGOS if x != "none"), "print", "logo", "graphic", "chest", "front"],
}
_FASHION_RE = {f: re.compile(rf"\b(?:{_alternation(w)})") for f, w in _FASHION_FAMILIES.items()}
_IMPERATIVES = {"make", "change", "add", "remove", "replace", "keep", "turn", "swap", "give", "leave", "put",
                "recolor", "switch", "take", "get", "dye", "drop"}


def fashion_errors(c1: str, c2: str) -> list[str]:
    """Problems of one FashionIQ query, read in both orders as "C1 and c2"."""
    errors = []
    for c in (c1, c2):
        if not c or c != c.strip() or c[0] != c[0].lower() or c[-1] in ".,;!?":
            errors.append(f"not a lower-case fragment: {c!r}")
        if " and " in c:
            errors.append(f"a caption holds a join of its own: {c!r}")
    for a, b in ((c1, c2), (c2, c1)):
        text = datasets.query_text(datasets.Query(reference="r", captions=(a, b), category="dress"))
        errors += grammar_errors(text)
    for family, pattern in _FASHION_RE.items():
        if pattern.search(c1) and pattern.search(c2):
            errors.append(f"{family} stated twice")
    moods = {c.split()[0] in _IMPERATIVES for c in (c1, c2)}
    if len(moods) > 1:
        errors.append("one caption imperative, the other descriptive")
    return errors


def fashion_form(caption: str) -> str:
    """``caption`` with its attribute values replaced by placeholders."""
    out = re.sub(rf"\b(?:{_alternation(list(render.COLOURS))})\b", "{colour}", caption)
    out = re.sub(r"\b(?:stripes|striped|polka dots|polka-dot(?:ted)?|dots|checks|checked|checkered|gingham|"
                 r"zigzags?|diamonds?)\b", "{pattern}", out)
    return re.sub(rf"\b(?:{_alternation([x for x in render.LOGOS if x != 'none'])})\b", "{logo}", out)


def test_fashion_check_catches_the_reported_captions() -> None:
    assert "pattern stated twice" in fashion_errors("has stripes", "has horizontal stripes")
    assert "colour stated twice" in fashion_errors("make it sky blue", "is sky blue instead of black")
    assert fashion_errors("add a circle logo", "with a small circle graphic")
    assert fashion_errors("is red", "is blue")
    assert not fashion_errors("is red", "has a star print")


def _fashion_pairs(root: Path) -> list[tuple[str, str]]:
    return [tuple(t["captions"]) for c in bf.CATEGORIES for s in bf.SPLITS
            for t in read(root / "captions" / f"cap.{c}.{s}.json")]


def _sampled_fashion_pairs(n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ref = {a: str(rng.choice(bf.VOCAB[a])) for a in bf.ATTRIBUTES}
        changed = rng.choice(bf.ATTRIBUTES, int(rng.integers(1, 3)), replace=False)
        tgt = {a: (str(rng.choice([v for v in bf.VOCAB[a] if v != ref[a]])) if a in changed else ref[a])
               for a in bf.ATTRIBUTES}
        out.append(tuple(bf.relative_captions(ref, tgt, rng)))
    return out


@needs_fmnist
def test_every_fashion_caption_is_clean(quick_fashion_root: Path) -> None:
    pairs = _fashion_pairs(quick_fashion_root) + _sampled_fashion_pairs(3000)
    bad = {pair: e for pair in pairs if (e := fashion_errors(*pair))}
    assert not bad, f"{len(bad)} of {len(pairs)} queries, e.g. {list(bad.items())[:5]}"


@needs_fmnist
def test_fashion_captions_are_varied(quick_fashion_root: Path) -> None:
    pairs = _fashion_pairs(quick_fashion_root)
    queries = {" and ".join(p) for p in pairs}
    forms = {" and ".join(fashion_form(c) for c in p) for p in pairs}
    assert len(queries) >= 0.9 * len(pairs) and len(forms) >= 0.75 * len(pairs), (len(pairs), len(queries), len(forms))
    sampled = {" and ".join(fashion_form(c) for c in p) for p in _sampled_fashion_pairs(3000)}
    assert len(sampled) >= 1500 and len({fashion_form(c) for p in _sampled_fashion_pairs(3000) for c in p}) >= 120


# ------------------------------------------------------------------------------------- scenes
_KINDS = sorted(bs.KINDS, key=len, reverse=True)
_SINGULAR = {k: ("pair of trousers" if k == "trousers" else k) for k in _KINDS}
_PLURAL = {k: ("pairs of trousers" if k == "trousers" else k + "s") for k in _KINDS}
_NOUN = re.compile(rf"\b(?:{_alternation([*_SINGULAR.values(), *_PLURAL.values()])})\b")
_NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_ZOOM = re.compile(r"\b(?:zoom\w*|close-up|closer|further)\b")
_MIRROR = re.compile(r"\b(?:mirror\w*|flip\w*|opposite side)\b")
_FRAGMENT = re.compile(r"(?:with|without|on|seen|a close-up|zoomed|mirrored|flipped|same)\b")
_SCENE_COLOURS = [*render.COLOURS, *BACKGROUNDS]
_NOUN_MODIFIERS = {"more", "less", "fewer", "small", "large", "ankle", *(w for c in _SCENE_COLOURS for w in c.split())}


def _kind_of(noun: str) -> str:
    return next(k for k in _KINDS if noun in (_SINGULAR[k], _PLURAL[k]))


def count_errors(text: str) -> list[str]:
    """Number words agree with the noun they count ("one bag", "two bags", "there are no bags")."""
    errors = []
    low = text.lower()
    for m in re.finditer(r"\b(one|two|three|four|five|is no|are no)((?: [a-z-]+){1,4})", low):
        noun = _NOUN.search(m.group(2))
        if noun is None or not set(m.group(2)[: noun.start()].split()) <= _NOUN_MODIFIERS:
            continue  # the number word does not count this noun ("instead of three and move the bag")
        plural = noun.group(0) in _PLURAL.values() and noun.group(0) != "trousers"
        wants_plural = m.group(1) == "are no" or _NUMBER.get(m.group(1), 1) > 1
        if plural != wants_plural:
            errors.append(f"count agreement: {m.group(0)!r}")
    return errors


def scene_errors(caption: str) -> list[str]:
    """Problems of one relative caption of the scenes benchmark (CIRR or CIRCO)."""
    errors = grammar_errors(caption) + count_errors(caption)
    clauses = [c.strip() for c in re.split(r",|\band\b", caption.rstrip(".")) if c.strip()]
    topics = [_kind_of(n.group(0)) for c in clauses if (n := _NOUN.search(c))]
    if len(set(topics)) < len(topics):
        errors.append(f"one kind of object is the topic of two clauses: {topics}")
    if sum("background" in c for c in clauses) > 1:
        errors.append("background stated twice")
    for family, pattern in (("zoom", _ZOOM), ("mirroring", _MIRROR)):
        if sum(bool(pattern.search(c)) for c in clauses) > 1:
            errors.append(f"{family} stated twice")
    if len(clauses) > 1 and (fragments := [c for c in clauses if _FRAGMENT.match(c)]):
        errors.append(f"a fragment joined to other statements: {fragments}")
    return errors


def scene_form(caption: str) -> str:
    """``caption`` with colours, kinds, numbers, sizes, textures and places replaced by placeholders."""
    out = caption.lower()
    out = re.sub(rf"\b(?:{_alternation(_SCENE_COLOURS)})\b", "{colour}", out)
    out = _NOUN.sub("{kind}", out)
    out = re.sub(r"\b(?:one|two|three|four|five)\b", "{n}", out)
    out = re.sub(r"\b(?:small|large|bigger|smaller|larger)\b", "{size}", out)
    out = re.sub(rf"\b(?:{_alternation(list(render.PATTERN_ADJECTIVES.values()))})\b", "{texture}", out)
    return re.sub(r"\b(?:left|right|top|bottom|above|below)\b", "{where}", out)


def test_scene_check_catches_bad_captions() -> None:
    assert count_errors("shows two bag") and count_errors("has one bags") and count_errors("there are no bag anymore")
    assert not count_errors("has two bags instead of one, and one pair of trousers")
    assert scene_errors("add a red bag and remove the bag")
    assert scene_errors("the bag is red and the bag is blue")
    assert scene_errors("the bag is red, add a star below the bag and zoomed in")
    assert not scene_errors("the bag is red, add a star below the bag and zoom in")


def _cirr_captions(root: Path, absolute: bool = False) -> list[str]:
    """CIRR captions of the change (or, with ``absolute``, those naming the target's content)."""
    meta = bs.load_meta(root / "CIRR")
    return [q["caption"] for s in ("train", "val", "test1") for q in meta["queries"][s] if q["absolute"] == absolute]


def _change_part(caption: str) -> str:
    """A CIRR caption without the objects it names after the change (", with a small red bag ...")."""
    return caption.split(", with ")[0].rstrip(".") + "."


def _circo_queries(root: Path) -> list[dict]:
    return [q for s in ("val", "test") for q in read(root / "CIRCO" / "annotations" / f"{s}.json")]


def sampled_changes(n: int, seed: int = 0, style: str = "cirr") -> list[bs.Change]:
    """``n`` captions straight from the sampler and :func:`describe_change` (no images drawn)."""
    config = bs.ScenesBenchConfig.quick()
    sampler = Sampler(np.random.default_rng(seed), {k: np.arange(3) for k in ITEM_KINDS.values()}, "test", config)
    out = []
    while len(out) < n:
        got = sampler.mutate(sampler.scene("val"), 0.6, style=style)
        if got is not None:
            out.append(got[2])
    return out


def test_every_scene_caption_is_clean(quick_scenes_root: Path) -> None:
    cirr = _cirr_captions(quick_scenes_root)
    circo = [q["relative_caption"] for q in _circo_queries(quick_scenes_root)]
    sampled = [c.caption for c in sampled_changes(3000) + sampled_changes(2000, style="circo")]
    bad = Counter(c for c in [*map(_change_part, cirr), *circo, *sampled] if scene_errors(c))
    assert not bad, f"{len(bad)} distinct bad captions, e.g. {[(c, scene_errors(c)) for c in list(bad)[:5]]}"
    # descriptions list objects: only the surface is checked
    absolute = _cirr_captions(quick_scenes_root, absolute=True)
    bad = Counter(c for c in absolute + cirr if grammar_errors(c) + count_errors(c))
    assert absolute and not bad, f"{len(bad)} bad descriptions, e.g. {list(bad)[:5]}"
    for c in cirr + absolute:  # CIRR: short sentences
        assert c[0].isupper() and c.endswith(".") and c[2:-1] == c[2:-1].lower(), c
    for c in circo:  # CIRCO: what follows "I want a photo of {shared concept} that"
        assert c == c.lower() and not c.endswith(".") and c.startswith(CLAUSE_STARTS), c


def test_circo_captions_do_not_name_the_shared_concept(quick_scenes_root: Path) -> None:
    queries = _circo_queries(quick_scenes_root) + [{"shared_concept": c.shared_concept, "relative_caption": c.caption}
                                             for c in sampled_changes(1000, style="circo")]
    for q in queries:
        noun = _NOUN.search(q["shared_concept"])
        assert noun and q["shared_concept"].startswith(("a ", "an ")), q
        assert _kind_of(noun.group(0)) not in {_kind_of(n.group(0)) for n in _NOUN.finditer(q["relative_caption"])}, q


def test_scene_captions_are_varied(quick_scenes_root: Path) -> None:
    cirr = _cirr_captions(quick_scenes_root)
    assert len({scene_form(c) for c in cirr}) >= 0.6 * len(cirr)
    sampled = [c.caption for c in sampled_changes(3000)]
    assert len({scene_form(c) for c in sampled}) >= 1200
