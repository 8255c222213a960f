"""Captions of scene graphs: absolute descriptions, and relative captions of a change.

:func:`describe_change` writes a relative caption from the *difference* of two scene graphs, tags
it with the CIRCO semantic aspects it exercises, and compiles it into constraints (for CIRR, what
both images share plus what the caption asks for; for CIRCO, the shared concept plus what the
caption asks for) that the target satisfies and the reference does not.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cirlib.data.datasets import CIRCO_ASPECTS
from cirlib.data.synth import render
from cirlib.data.synth.scenes.graph import KINDS, REGIONS, RELATIONS, count_matching, in_region, related, satisfies

# CIRCO's official spelling and order; the annotations use these strings.
ASPECTS: tuple[str, ...] = CIRCO_ASPECTS
CARD, ADD, NEG, DIRECT, CC, COMP, CONJ, SPATIAL, VIEW = ASPECTS

_REGION_AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_REGION_TO = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_BACKGROUND_PATTERNS = {"stripes": "stripes", "dots": "polka dots", "checks": "checks"}
_NUMBERS = ("no", "one", "two", "three", "four", "five")
_NOUNS = {"trousers": ("pair of trousers", "pairs of trousers")}


def _kind_of_noun(noun: str) -> str:
    return next(k for k in KINDS if noun in (_noun(k), _noun(k, 2)))


def _noun(kind: str, n: int = 1) -> str:
    singular, plural = _NOUNS.get(kind, (kind, kind + "s"))
    return singular if n == 1 else plural


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def concept_name(obj: Mapping[str, Any]) -> str:
    """How a CIRCO query names its shared concept, one object of a kind and colour ("a navy blue circle",
    "a pink pair of trousers"): the "a photo of ..." its caption completes and its ``shared_concept`` field."""
    return _a(f"{obj['colour']} {_noun(obj['kind'])}")


def _counted(n: int, words: list[str], kind: str) -> str:
    """``n`` objects of ``kind`` described by ``words``: "a small red bag", "two small red bags"."""
    phrase = " ".join([*words, _noun(kind, n)])
    return _a(phrase) if n == 1 else f"{_NUMBERS[n]} {phrase}"


def _count_phrase(n: int, kind: str) -> str:
    return f"{_NUMBERS[n]} {_noun(kind, n)}"


_NOUN_RE = re.compile(r"\b(?:" + "|".join(sorted((re.escape(_noun(k, n)) for k in KINDS for n in (1, 2)),
                                               key=len, reverse=True)) + r")\b")


def sentence(caption: str) -> str:
    """``caption`` as a CIRR-style sentence: first letter upper-cased, a full stop at the end."""
    return caption[:1].upper() + caption[1:] + "."


def _pattern_adj(pattern: str) -> str:
    return render.PATTERN_ADJECTIVES[pattern]


def absolute_caption(attrs: dict) -> str:
    """Plain description of one scene graph, e.g. "two small red bags and a large navy blue star
    on a striped light grey background" (what pretraining pairs with the image)."""
    groups: Counter[tuple[str, str, str]] = Counter()
    order: list[tuple[str, str, str]] = []
    for o in sorted(attrs["objects"], key=lambda o: (o["y"], o["x"])):  # reading order
        key = (o["size"], o["colour"], o["kind"])
        if key not in groups:
            order.append(key)
        groups[key] += 1
    parts = [_counted(groups[(size, colour, kind)], [size, colour], kind) for size, colour, kind in order]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = attrs["background"]
    texture = "" if bg["pattern"] == "plain" else _pattern_adj(bg["pattern"]) + " "
    text = f"{things} on {_a(texture + bg['colour'])} background"
    return ("a close-up of " + text) if attrs["view"]["close_up"] else text


Style = Literal["cirr", "circo"]
# CIRCO captions complete "Unlike the provided image, I want a photo of {shared concept} that ...":
# only statements that start like a clause of that sentence ("has two bags", "is on a striped
# background") are used for them.
CLAUSE_STARTS = ("has ", "also has ", "is ", "shows ", "does not ")


def partial_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A description of part of a scene, as people write them: "two stars", "a red bag on a striped
    background", "has a small coat and is on a lavender background". Pretraining pairs some images
    with one, as web alt-text mentions only some of what a photo shows; it is how the model learns
    to read captions that name a few objects rather than the whole scene."""
    groups: Counter[tuple[str, str, str]] = Counter((o["size"], o["colour"], o["kind"]) for o in attrs["objects"])
    keys = sorted(groups)
    picked = [keys[int(i)] for i in rng.choice(len(keys), min(len(keys), int(rng.integers(1, 3))), replace=False)]
    parts = []
    for size, colour, kind in picked:
        n = groups[(size, colour, kind)]
        words = [w for w, keep in ((size, rng.random() < 0.4), (colour, rng.random() < 0.8)) if keep]
        phrase = _counted(n, words, kind)
        if n == 1 and rng.random() < 0.3:  # where it is, when it is somewhere: "a red bag on the left"
            o = next(o for o in attrs["objects"] if (o["size"], o["colour"], o["kind"]) == (size, colour, kind))
            regions = [r for r in REGIONS if in_region(o, r)]
            if regions:
                phrase += " " + _REGION_AT[regions[int(rng.integers(len(regions)))]]
        parts.append(phrase)
    bg = attrs["background"]
    texture = "" if bg["pattern"] == "plain" else _pattern_adj(bg["pattern"]) + " "
    background = _a(texture + bg["colour"]) + " background" if rng.random() < 0.4 else None
    if rng.random() < 0.5:  # a noun phrase
        text = " and ".join(parts)
        return f"{text} on {background}" if background else text
    clauses = [f"has {p}" for p in parts] + ([f"is on {background}"] if background else [])
    return " and ".join(clauses)


@dataclass(frozen=True)
class Change:
    """A relative caption with its aspects and the predicate it stands for.

    ``absolute`` marks a caption that describes the target's content instead of the change, and
    ``context`` one that also names what the change leaves alone (as many CIRR captions do).
    """

    caption: str
    aspects: tuple[str, ...]
    constraints: tuple[dict, ...]
    shared_concept: str
    absolute: bool = False
    context: bool = False  # the caption also names what the change leaves alone (:func:`with_context`)


@dataclass(frozen=True)
class _Statement:
    text: str
    aspects: frozenset[str]
    constraints: tuple[dict, ...]


Options = list[_Statement]  # the phrasings of one statement, all true, one is picked
# Phrasings that are fragments, not clauses ("without the bag", "zoomed in"): a caption uses them
# only as its single statement, so that joined statements read as one sentence.
_CIRCO_ONLY_STARTS = ("is ", "does not ", "has the ", "has no ")
_FRAGMENT_STARTS = ("without ", "on ", "seen ", "a close-up", "zoomed ", "mirrored", "flipped ", "same ")


def _options(options: Sequence[tuple[str, Iterable[str], Sequence[dict]]]) -> Options:
    return [_Statement(text, frozenset(aspects), tuple(constraints)) for text, aspects, constraints in options]


def _pick(rng: np.random.Generator, options: Options, joined: bool, style: Style) -> _Statement | None:
    """One of ``options``; in a caption of several statements, one of its clauses when it has any.

    CIRCO style picks only clause-like statements (:data:`CLAUSE_STARTS`), None if there is none.
    """
    if style == "circo":
        options = [o for o in options if o.text.startswith(CLAUSE_STARTS)]
        if not options:
            return None
    else:  # CIRR: imperatives and statements mix; CIRCO's bare clauses would read badly after "add ... and"
        options = [o for o in options if not o.text.startswith(_CIRCO_ONLY_STARTS)] or options
        if joined:
            options = [o for o in options if not o.text.startswith(_FRAGMENT_STARTS)] or options
    return options[int(rng.integers(len(options)))]


def _has(kind: str, lo: int = 1, hi: int | None = None, **attrs: str) -> dict:
    c = {"op": "has", "kind": kind, **attrs, "min": lo}
    if hi is not None:
        c["max"] = hi
    return c


def name_object(attrs: dict, obj: dict) -> tuple[str, dict] | None:
    """How to point at ``obj`` unambiguously ("the bag" / "the red bag") and the matching spec."""
    if count_matching(attrs, {"kind": obj["kind"]}) == 1:
        return _noun(obj["kind"]), {"kind": obj["kind"]}
    spec = {"kind": obj["kind"], "colour": obj["colour"]}
    if count_matching(attrs, spec) == 1:
        return f"{obj['colour']} {_noun(obj['kind'])}", spec
    return None


def _related_pairs(
    ref: dict, tgt: dict, a: dict, exclude_kind: str | None = None
) -> list[tuple[str, tuple[str, dict]]]:
    """Other objects B (pointable in both scenes) with a relation of ``a`` to B true now, false before."""
    r_objs = {o["id"]: o for o in ref["objects"]}
    out = []
    for b in tgt["objects"]:
        if b["id"] == a["id"] or b["id"] not in r_objs or b["kind"] == exclude_kind:
            continue
        pointer = name_object(tgt, b)
        if pointer is None or name_object(ref, r_objs[b["id"]]) != pointer:
            continue
        a_ref = r_objs.get(a["id"])
        for rel in RELATIONS:
            if related(a, b, rel) and (a_ref is None or not related(a_ref, r_objs[b["id"]], rel)):
                out.append((rel, pointer))
    return out


def _recolour(ref: dict, tgt: dict, a: dict, b: dict) -> Options | None:
    pointer = name_object(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    c0, c = a["colour"], b["colour"]
    noun = _noun(a["kind"])
    con = [_has(a["kind"], count_matching(ref, {"kind": a["kind"], "colour": c}) + 1, colour=c)]
    if "colour" in spec:  # "the red bag" already names the old colour
        options = [(f"the {name} is {c} instead", (CC, DIRECT), con), (f"change the {name} to {c}", (CC, DIRECT), con),
                   (f"has {_a(c)} {noun} instead of the {name}", (CC,), con)]
    else:
        options = [
            (f"the {noun} is {c}", (DIRECT,), con),
            (f"make the {noun} {c}", (DIRECT,), con),
            (f"the {noun} is {c} instead of {c0}", (CC, DIRECT), con),
            (f"same {noun} but {c}", (CC,), con),
            (f"has {_a(c)} {noun} instead of {_a(c0)} one", (CC,), con),
            (f"has {_a(c)} {noun}", (DIRECT,), con),
            (f"has the {noun} in {c}", (DIRECT,), con),
        ]
    return _options(options)


def _replace(ref: dict, tgt: dict, a: dict, b: dict) -> Options | None:
    pointer = name_object(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    new = f"{b['colour']} {_noun(b['kind'])}"
    con = [
        {"op": "has", **spec, "min": 0, "max": count_matching(ref, spec) - 1},
        _has(b["kind"], count_matching(ref, {"kind": b["kind"], "colour": b["colour"]}) + 1, colour=b["colour"]),
    ]
    return _options([
        (f"replace the {name} with {_a(new)}", (CC, DIRECT), con),
        (f"has {_a(new)} instead of the {name}", (CC,), con),
        (f"the {name} is now {_a(_noun(b['kind']))}", (CC,), con),
        (f"shows {_a(new)} in place of the {name}", (CC,), con),
    ])


def _resize(ref: dict, tgt: dict, a: dict, b: dict) -> Options | None:
    pointer = name_object(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    size = b["size"]
    con = [{"op": "has", **spec, "size": size, "min": count_matching(ref, {**spec, "size": size}) + 1}]
    bigger = "bigger" if size == "large" else "smaller"
    options = [
        (f"the {name} is {bigger}", (COMP,), con),
        (f"the {name} is {'larger' if size == 'large' else 'smaller'} now", (COMP,), con),
        (f"make the {name} {size}", (DIRECT,), con),
        (f"has a {bigger} {name}", (COMP,), con),
    ]
    other = "small" if size == "large" else "large"
    for o in tgt["objects"]:  # "the bag is bigger than the coat": a comparison between two objects
        if o["kind"] != a["kind"] and o["size"] == other and (p := name_object(tgt, o)) is not None:
            than = {"op": "has", **p[1], "size": other, "min": 1}
            options += [(f"the {name} is {bigger} than the {p[0]}", (COMP,), [*con, than]),
                        (f"has the {name} {bigger} than the {p[0]}", (COMP,), [*con, than])]
    return _options(options)


def _move(ref: dict, tgt: dict, a: dict, b: dict) -> Options | None:
    pointer = name_object(ref, a)
    if pointer is None or name_object(tgt, b) != pointer:
        return None
    name, spec = pointer
    options = []
    for region in REGIONS:
        if in_region(b, region) and not in_region(a, region):
            con = [{"op": "has", **spec, "region": region, "min": 1}]
            options += [(f"move the {name} {_REGION_TO[region]}", (SPATIAL, DIRECT), con),
                        (f"the {name} is {_REGION_AT[region]}", (SPATIAL,), con),
                        (f"has the {name} {_REGION_AT[region]}", (SPATIAL,), con)]
    for rel, (other, other_spec) in _related_pairs(ref, tgt, b):
        con = [{"op": "relation", "a": spec, "b": other_spec, "rel": rel}]
        options += [(f"the {name} is {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con),
                    (f"the {name} is now {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con),
                    (f"has the {name} {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con)]
    return _options(options) if options else None


def _count_change(ref: dict, tgt: dict, kind: str, added: list[dict], removed: list[dict]) -> Options | None:
    n0, n1 = count_matching(ref, {"kind": kind}), count_matching(tgt, {"kind": kind})
    if added and removed:
        return None
    exact = [_has(kind, n1, n1)]
    if removed and n1 == 0:  # the kind disappears
        noun = _noun(kind) if n0 == 1 else _noun(kind, n0)
        the = "the" if n0 == 1 else "the " + _NUMBERS[n0]
        return _options([
            (f"remove {the} {noun}", (NEG,), exact),
            (f"without {the} {noun}", (NEG,), exact),
            (f"there is no {noun} anymore" if n0 == 1 else f"there are no {noun} anymore", (NEG,), exact),
            (f"has no {_noun(kind, 2)}", (NEG,), exact),
            (f"does not have {the} {noun}", (NEG,), exact),
        ])
    if added and n0 == 0:  # a new kind of object
        if len(added) != 1:
            return None
        o = added[0]
        desc = f"{o['colour']} {_noun(kind)}"
        con = [_has(kind, colour=o["colour"])]
        options = [(f"add {_a(desc)}", (ADD,), con), (f"also has {_a(desc)}", (ADD,), con),
                   (f"add {_a(o['size'] + ' ' + desc)}", (ADD,), [_has(kind, colour=o["colour"], size=o["size"])])]
        for region in REGIONS:
            if in_region(o, region):
                options += [(f"{verb} {_a(desc)} {_REGION_AT[region]}", (ADD, SPATIAL),
                              [_has(kind, colour=o["colour"], region=region)]) for verb in ("add", "has")]
        for rel, (other, other_spec) in _related_pairs(ref, tgt, o, exclude_kind=kind):
            relation = {"op": "relation", "a": {"kind": kind, "colour": o["colour"]}, "b": other_spec, "rel": rel}
            options += [(f"{verb} {_a(desc)} {_RELATION_TEXT[rel]} the {other}", (ADD, SPATIAL), [*con, relation])
                        for verb in ("add", "has")]
        return _options(options)
    if n1 == n0:
        return None
    more, fewer = ("more", "one more") if n1 > n0 else ("fewer", "one less")
    bound = [_has(kind, n0 + 1)] if n1 > n0 else [_has(kind, 0, n0 - 1)]
    options = [
        (f"has {_count_phrase(n1, kind)} instead of {_NUMBERS[n0]}", (CARD, CC), exact),
        (f"shows {_count_phrase(n1, kind)}", (CARD,), exact),
        (f"has {more} {_noun(kind, 2)}", (COMP,), bound),
    ]
    if abs(n1 - n0) == 1:
        options.append((f"has {fewer} {_noun(kind)}", (CARD, COMP), exact))
    if n1 < n0:
        options.append((f"shows only {_count_phrase(n1, kind)}", (CARD,), exact))
    return _options(options)


def _background_change(ref: dict, tgt: dict) -> Options:
    (c0, p0), (c1, p1) = ((s["background"]["colour"], s["background"]["pattern"]) for s in (ref, tgt))
    con: dict[str, Any] = {"op": "background"}
    if c0 != c1:
        con["colour"] = c1
    if p0 != p1:
        con["pattern"] = p1
    cons = [con]
    if p0 == p1:
        return _options([
            (f"on {_a(c1)} background", (SPATIAL,), cons),
            (f"the background is {c1}", (SPATIAL, DIRECT), cons),
            (f"the background is {c1} instead of {c0}", (SPATIAL, CC), cons),
            (f"is on {_a(c1)} background", (SPATIAL,), cons),
            (f"has {_a(c1)} background instead of {_a(c0)} one", (SPATIAL, CC), cons),
            (f"has {_a(c1)} background", (SPATIAL,), cons),
        ])
    adj0, adj1 = _pattern_adj(p0), _pattern_adj(p1)
    if c0 == c1:
        return _options([
            (f"on {_a(adj1)} background", (SPATIAL,), cons),
            (f"has {_a(adj1)} background", (SPATIAL,), cons),
            (f"the background is {adj1} instead of {adj0}", (SPATIAL, CC), cons),
            (f"is on {_a(adj1)} background", (SPATIAL,), cons),
        ])
    return _options([(f"on {_a(adj1 + ' ' + c1)} background", (SPATIAL,), cons),
                     (f"is on {_a(adj1 + ' ' + c1)} background", (SPATIAL,), cons),
                     (f"has {_a(adj1 + ' ' + c1)} background", (SPATIAL,), cons),
                       (f"the background is {c1} with {_BACKGROUND_PATTERNS[p1]}", (SPATIAL, DIRECT), cons)
                       if p1 != "plain" else (f"the background is plain {c1}", (SPATIAL, DIRECT), cons)])


def _view_change(tgt: dict, flag: str) -> Options:
    if flag == "close_up":
        con = [{"op": "view", "close_up": tgt["view"]["close_up"]}]
        texts = (["seen closer", "a close-up of the same scene", "zoomed in", "zoom in", "show it closer",
                  "is seen closer", "is a close-up"]
                 if tgt["view"]["close_up"] else ["seen from further away", "zoomed out", "zoom out",
                                                  "show it from further away", "is seen from further away"])
    else:
        con = [{"op": "layout", "mirrored": tgt["view"]["mirrored"],
                "objects": [{k: o[k] for k in ("kind", "colour", "x", "y")} for o in tgt["objects"]]}]
        texts = ["mirrored", "seen from the opposite side", "flipped left to right", "flip it left to right",
                 "mirror the scene", "is mirrored", "is seen from the opposite side"]
    return _options([(t, (VIEW,), con) for t in texts])


def _unnamed_shared_object(ref: dict, tgt: dict, caption: str) -> dict | None:
    """An object both images show unchanged whose kind ``caption`` never names, or None."""
    t_objs = {o["id"]: o for o in tgt["objects"]}
    for o in ref["objects"]:
        same = o["id"] in t_objs and all(o[k] == t_objs[o["id"]][k] for k in ("kind", "colour", "size"))
        if same and not re.search(rf"\b{_noun(o['kind'])}|\b{_noun(o['kind'], 2)}", caption):
            return o
    return None


def _shared_concept(ref: dict, tgt: dict, caption: str) -> str:
    """What both images show and ``caption`` does not name (CIRCO: "a photo of {concept} that ...")."""
    t_objs = {o["id"]: o for o in tgt["objects"]}
    kept = [o for o in ref["objects"] if o["id"] in t_objs]
    same = [o for o in kept if all(o[k] == t_objs[o["id"]][k] for k in ("kind", "colour", "size"))]
    candidates = [f"{o['colour']} {_noun(o['kind'])}" for o in same]
    candidates += [_noun(o["kind"]) for o in kept if o["kind"] == t_objs[o["id"]]["kind"]]
    if ref["background"] == tgt["background"]:
        candidates.append(f"{ref['background']['colour']} background")
    colour = (kept or ref["objects"])[0]["colour"]
    candidates += [f"{colour} object", "scene"]
    return _a(next((c for c in candidates if c not in caption), "similar picture"))


_ATTRIBUTE_CHANGES = {"kind": _replace, "colour": _recolour, "size": _resize, "cell": _move}


def describe_change(ref: dict, tgt: dict, rng: np.random.Generator, style: Style = "cirr") -> Change | None:
    """Relative caption from the difference of two scene graphs (attribute dicts), or None.

    None when the difference is not sayable without ambiguity (two attributes of one object,
    an object that cannot be pointed at, a move with no relation that changed, ...) or when the
    compiled constraints would not separate target from reference. ``style="circo"`` phrases
    every statement as a clause after "a photo of {shared concept} that", and needs an object
    both images share that the caption does not name: that object is the shared concept, so the
    subject of the query can only come from the reference image.
    """
    r_objs = {o["id"]: o for o in ref["objects"]}
    t_objs = {o["id"]: o for o in tgt["objects"]}
    said: list[Options] = []
    view_changed = ref["view"] != tgt["view"]
    replaced: set[str] = set()
    for oid in sorted(r_objs.keys() & t_objs.keys()):
        a, b = r_objs[oid], t_objs[oid]
        changed = [f for f in _ATTRIBUTE_CHANGES if a[f] != b[f]]
        if len(changed) > 1 or (changed == ["cell"] and view_changed):
            return None
        if changed:
            st = _ATTRIBUTE_CHANGES[changed[0]](ref, tgt, a, b)
            if st is None:
                return None
            said.append(st)
            if changed == ["kind"]:
                replaced |= {a["kind"], b["kind"]}
    added = [t_objs[i] for i in sorted(t_objs.keys() - r_objs.keys())]
    removed = [r_objs[i] for i in sorted(r_objs.keys() - t_objs.keys())]
    for kind in sorted({o["kind"] for o in added + removed}):
        if kind in replaced:
            return None
        st = _count_change(ref, tgt, kind, [o for o in added if o["kind"] == kind],
                           [o for o in removed if o["kind"] == kind])
        if st is None:
            return None
        said.append(st)
    if ref["background"] != tgt["background"]:
        said.append(_background_change(ref, tgt))
    for flag in ("close_up", "mirrored"):
        if ref["view"][flag] != tgt["view"][flag]:
            said.append(_view_change(tgt, flag))
    if not said:
        return None

    picked = [_pick(rng, said[i], len(said) > 1, style) for i in rng.permutation(len(said))]
    statements = [s for s in picked if s is not None]
    if len(statements) < len(picked):
        return None
    texts = [s.text for s in statements]
    caption = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
    aspects = set().union(*(s.aspects for s in statements)) | ({CONJ} if len(statements) > 1 else set())
    shared = Counter((a["kind"], a["colour"]) for i, a in r_objs.items()
                     if i in t_objs and (a["kind"], a["colour"]) == (t_objs[i]["kind"], t_objs[i]["colour"]))
    constraints = [_has(k, n, colour=c) for (k, c), n in sorted(shared.items())]
    if ref["background"] == tgt["background"]:  # the setting is part of what both images share
        constraints.append({"op": "background", **ref["background"]})
    constraints += [c for s in statements for c in s.constraints]
    if not satisfies(tgt, constraints) or satisfies(ref, constraints):
        return None
    aspects_in_order = tuple(a for a in ASPECTS if a in aspects)
    if style == "circo":
        # a photo of the shared concept that does what the caption says: the rest of the reference
        # (its other objects, its background unless the caption speaks of it) is not asked for
        concept = _unnamed_shared_object(ref, tgt, caption)
        if concept is None:
            return None
        constraints = [_has(concept["kind"], colour=concept["colour"])]
        constraints += [c for s in statements for c in s.constraints]
        if not satisfies(tgt, constraints) or satisfies(ref, constraints):
            return None
        name = concept_name(concept)
        return Change(caption, aspects_in_order, tuple(constraints), name)
    return Change(caption, aspects_in_order, tuple(constraints), _shared_concept(ref, tgt, caption))


def with_context(change: Change, tgt: dict, rng: np.random.Generator) -> Change | None:
    """``change`` with what else the target shows named after it ("make the bag red, with a large
    navy blue star on a striped lavender background"), as many CIRR captions name objects the change
    leaves alone; None when nothing is left to name. The named objects and background join the
    constraints."""
    named = {_kind_of_noun(m.group(0)) for m in _NOUN_RE.finditer(change.caption)}
    groups = Counter((o["size"], o["colour"], o["kind"]) for o in tgt["objects"] if o["kind"] not in named)
    if not groups:
        return None
    keys = sorted(groups)
    picked = [keys[int(i)] for i in rng.choice(len(keys), min(2, len(keys)), replace=False)]
    parts = [_counted(groups[(size, colour, kind)], [size, colour], kind) for size, colour, kind in picked]
    constraints = [_has(kind, groups[(size, colour, kind)], colour=colour, size=size) for size, colour, kind in picked]
    text = " and ".join(parts)
    if "background" not in change.caption:
        bg = tgt["background"]
        texture = "" if bg["pattern"] == "plain" else _pattern_adj(bg["pattern"]) + " "
        text += f" on {_a(texture + bg['colour'])} background"
        constraints.append({"op": "background", **bg})
    return Change(f"{change.caption}, with {text}", change.aspects, (*change.constraints, *constraints),
                  change.shared_concept, context=True)


_ABSOLUTE_FORMS = ("{}", "show {}", "it should be {}", "I want {}")


def describe_target(ref: dict, tgt: dict, rng: np.random.Generator) -> Change | None:
    """A caption that names the target's content rather than the change ("Two red bags and a star on
    a striped light blue background."), as many CIRR captions do; None if it also fits the reference.

    Its constraints are the whole description: every (size, colour, kind) group with its exact
    count, the number of objects, the background and the view's distance.
    """
    groups = Counter((o["size"], o["colour"], o["kind"]) for o in tgt["objects"])
    constraints = [_has(kind, n, n, colour=colour, size=size) for (size, colour, kind), n in sorted(groups.items())]
    constraints += [{"op": "objects", "min": len(tgt["objects"]), "max": len(tgt["objects"])},
                    {"op": "background", **tgt["background"]}, {"op": "view", "close_up": tgt["view"]["close_up"]}]
    if satisfies(ref, constraints):
        return None
    form = _ABSOLUTE_FORMS[int(rng.integers(len(_ABSOLUTE_FORMS)))]
    caption = form.format(absolute_caption(tgt))
    return Change(caption, (), tuple(constraints), _shared_concept(ref, tgt, caption), absolute=True)



LEGIBILITY_ATTRIBUTES: tuple[str, ...] = ("kind", "colour", "size", "count", "background")
"""What the relative captions talk about, as :func:`counterfactual` can change it."""


def counterfactual(attrs: dict, attribute: str, rng: np.random.Generator) -> dict | None:
    """The scene graph with one thing of ``attribute`` changed, or None where it cannot be.

    ``kind`` / ``colour`` / ``size``: one object's; ``count``: one more copy of an object (or one
    fewer of a group of copies when the scene is full); ``background``: the background colour.
    Legibility is measured by whether a model prefers the true caption to the changed one.
    """
    from cirlib.data.synth.scenes.graph import BACKGROUNDS, KINDS, OBJECT_COLOURS, SIZES

    objects = attrs["objects"]
    o = objects[int(rng.integers(len(objects)))]
    changed = None
    if attribute == "background":
        options = [b for b in BACKGROUNDS if b != attrs["background"]["colour"]]
        return {**attrs, "background": {**attrs["background"], "colour": options[int(rng.integers(len(options)))]}}
    if attribute == "count":
        copies = [x for x in objects if all(x[k] == o[k] for k in ("kind", "colour", "size"))]
        if len(objects) < 4:
            changed = [*objects, {**o, "id": max(x["id"] for x in objects) + 1}]
        elif len(copies) > 1:
            changed = [x for x in objects if x is not o]
        return None if changed is None else {**attrs, "objects": changed}
    vocab = {"kind": KINDS, "colour": OBJECT_COLOURS, "size": SIZES}.get(attribute)
    if vocab is None:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {LEGIBILITY_ATTRIBUTES}")
    options = [v for v in vocab if v != o[attribute]]
    new = {**o, attribute: options[int(rng.integers(len(options)))]}
    return {**attrs, "objects": [new if x is o else x for x in objects]}
