"""Captions of scene graphs: absolute descriptions, and relative captions of a change.

:func:`describe_change` writes a relative caption from the *difference* of two scene graphs, tags
it with the CIRCO semantic aspects it exercises, and compiles it into constraints (what both images
share plus what the caption asks for) that the target satisfies and the reference does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cirlib.data.datasets import CIRCO_ASPECTS
from cirlib.data.synth import render
from cirlib.data.synth.scenes.graph import REGIONS, RELATIONS, count_matching, in_region, related, satisfies

# CIRCO's official spelling and order; the annotations use these strings.
ASPECTS: tuple[str, ...] = CIRCO_ASPECTS
CARD, ADD, NEG, DIRECT, CC, COMP, CONJ, SPATIAL, VIEW = ASPECTS

_REGION_AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_REGION_TO = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_BACKGROUND_PATTERNS = {"stripes": "stripes", "dots": "polka dots", "checks": "checks"}
_NUMBERS = ("no", "one", "two", "three", "four", "five")
_NOUNS = {"trousers": ("pair of trousers", "pairs of trousers")}


def _noun(kind: str, n: int = 1) -> str:
    singular, plural = _NOUNS.get(kind, (kind, kind + "s"))
    return singular if n == 1 else plural


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count_phrase(n: int, kind: str) -> str:
    return f"{_NUMBERS[n]} {_noun(kind, n)}"


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
    parts = []
    for size, colour, kind in order:
        n = groups[(size, colour, kind)]
        det = "a" if n == 1 else _NUMBERS[n]
        phrase = f"{size} {colour} {_noun(kind, n)}"
        parts.append(_a(phrase) if det == "a" else f"{det} {phrase}")
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = attrs["background"]
    texture = "" if bg["pattern"] == "plain" else _pattern_adj(bg["pattern"]) + " "
    text = f"{things} on {_a(texture + bg['colour'])} background"
    return ("a close-up of " + text) if attrs["view"]["close_up"] else text


@dataclass(frozen=True)
class Change:
    """A relative caption with its aspects and the predicate it stands for."""

    caption: str
    aspects: tuple[str, ...]
    constraints: tuple[dict, ...]
    shared_concept: str


@dataclass(frozen=True)
class _Statement:
    text: str
    aspects: frozenset[str]
    constraints: tuple[dict, ...]


Options = list[_Statement]  # the phrasings of one statement, all true, one is picked
# Phrasings that are fragments, not clauses ("without the bag", "zoomed in"): a caption uses them
# only as its single statement, so that joined statements read as one sentence.
_FRAGMENT_STARTS = ("without ", "on ", "seen ", "a close-up", "zoomed ", "mirrored", "flipped ", "same ")


def _options(options: Sequence[tuple[str, Iterable[str], Sequence[dict]]]) -> Options:
    return [_Statement(text, frozenset(aspects), tuple(constraints)) for text, aspects, constraints in options]


def _pick(rng: np.random.Generator, options: Options, joined: bool) -> _Statement:
    """One of ``options``; in a caption of several statements, one of its clauses when it has any."""
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
        options = [(f"the {name} is {c} instead", (CC, DIRECT), con), (f"change the {name} to {c}", (CC, DIRECT), con)]
    else:
        options = [
            (f"the {noun} is {c}", (DIRECT,), con),
            (f"make the {noun} {c}", (DIRECT,), con),
            (f"the {noun} is {c} instead of {c0}", (CC, DIRECT), con),
            (f"same {noun} but {c}", (CC,), con),
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
    ]
    other = "small" if size == "large" else "large"
    for o in tgt["objects"]:  # "the bag is bigger than the coat": a comparison between two objects
        if o["kind"] != a["kind"] and o["size"] == other and (p := name_object(tgt, o)) is not None:
            than = {"op": "has", **p[1], "size": other, "min": 1}
            options.append((f"the {name} is {bigger} than the {p[0]}", (COMP,), [*con, than]))
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
                        (f"the {name} is {_REGION_AT[region]}", (SPATIAL,), con)]
    for rel, (other, other_spec) in _related_pairs(ref, tgt, b):
        con = [{"op": "relation", "a": spec, "b": other_spec, "rel": rel}]
        options += [(f"the {name} is {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con),
                    (f"the {name} is now {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con)]
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
                options.append((f"add {_a(desc)} {_REGION_AT[region]}", (ADD, SPATIAL),
                                [_has(kind, colour=o["colour"], region=region)]))
        for rel, (other, other_spec) in _related_pairs(ref, tgt, o, exclude_kind=kind):
            relation = {"op": "relation", "a": {"kind": kind, "colour": o["colour"]}, "b": other_spec, "rel": rel}
            options.append((f"add {_a(desc)} {_RELATION_TEXT[rel]} the {other}", (ADD, SPATIAL), [*con, relation]))
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
        ])
    adj0, adj1 = _pattern_adj(p0), _pattern_adj(p1)
    if c0 == c1:
        return _options([
            (f"on {_a(adj1)} background", (SPATIAL,), cons),
            (f"has {_a(adj1)} background", (SPATIAL,), cons),
            (f"the background is {adj1} instead of {adj0}", (SPATIAL, CC), cons),
        ])
    return _options([(f"on {_a(adj1 + ' ' + c1)} background", (SPATIAL,), cons),
                       (f"the background is {c1} with {_BACKGROUND_PATTERNS[p1]}", (SPATIAL, DIRECT), cons)
                       if p1 != "plain" else (f"the background is plain {c1}", (SPATIAL, DIRECT), cons)])


def _view_change(tgt: dict, flag: str) -> Options:
    if flag == "close_up":
        con = [{"op": "view", "close_up": tgt["view"]["close_up"]}]
        texts = (["seen closer", "a close-up of the same scene", "zoomed in", "zoom in", "show it closer"]
                 if tgt["view"]["close_up"] else ["seen from further away", "zoomed out", "zoom out",
                                                  "show it from further away"])
    else:
        con = [{"op": "layout", "mirrored": tgt["view"]["mirrored"],
                "objects": [{k: o[k] for k in ("kind", "colour", "x", "y")} for o in tgt["objects"]]}]
        texts = ["mirrored", "seen from the opposite side", "flipped left to right", "flip it left to right",
                 "mirror the scene"]
    return _options([(t, (VIEW,), con) for t in texts])


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


def describe_change(ref: dict, tgt: dict, rng: np.random.Generator) -> Change | None:
    """Relative caption from the difference of two scene graphs (attribute dicts), or None.

    None when the difference is not sayable without ambiguity (two attributes of one object,
    an object that cannot be pointed at, a move with no relation that changed, ...) or when the
    compiled constraints would not separate target from reference.
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

    statements = [_pick(rng, said[i], len(said) > 1) for i in rng.permutation(len(said))]
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
    return Change(caption, aspects_in_order, tuple(constraints), _shared_concept(ref, tgt, caption))

