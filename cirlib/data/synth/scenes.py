"""Embedded ``scenes`` benchmark written in the exact CIRR and CIRCO layouts (SPEC §2.2).

A scene is a small graph: a pale background (colour + texture) on a canvas of varied aspect
ratio, holding 1-4 objects -- real Fashion-MNIST product photos (bag, sneaker, ankle boot, ...)
and simple shapes -- each with a colour, a size and a grid cell, seen in a view (mirrored and/or
close-up). A query edits a reference scene (1-2 edits); its relative caption is generated from the
*difference* of the two graphs and tagged with the CIRCO semantic aspects it exercises.

Every caption is also compiled into a predicate over scene graphs (the query's constraints: what
both images share -- their common objects, and the background unless the caption changes it --
plus what the caption asks for). The generator checks that the target
satisfies it and the reference does not, that no other member of a CIRR image set satisfies it
(so Recall_subset is well posed) and, for CIRCO, lists *every* gallery image that satisfies it as
ground truth -- no false negatives, which is what CIRCO's multiple ground truths approximate.

Graphs of all images (``attributes``) and queries (captions, aspects, constraints) are kept in
each root's ``cirlib_meta.json`` for absolute captions, zero-shot labels and analyses.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cirlib.data import fashion_mnist
from cirlib.data.synth import render
from cirlib.core.io import file_sha256, fingerprint, write_json
from cirlib.evaluation.metrics import CIRCO_ASPECTS

GENERATOR = "cirlib.data.synth.scenes"
VERSION = 2  # 2: official CIRCO aspect spelling

ITEM_KINDS: dict[int, str] = {
    8: "bag",
    7: "sneaker",
    9: "ankle boot",
    5: "sandal",
    1: "trousers",
    2: "pullover",
    4: "coat",
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "triangle", "star", "heart")  # the masks render.LOGOS draws
KINDS: tuple[str, ...] = (*ITEM_KINDS.values(), *SHAPE_KINDS)
OBJECT_COLOURS: tuple[str, ...] = tuple(render.COLOURS)
# Backgrounds are pale tints of a named colour so every object colour stays readable on them.
BACKGROUNDS: dict[str, str] = {
    "light grey": "grey",
    "light blue": "sky blue",
    "light green": "green",
    "light yellow": "yellow",
    "light pink": "pink",
    "light orange": "orange",
    "lavender": "purple",
}
BACKGROUND_PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
SIZES: tuple[str, ...] = ("small", "large")
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))

# CIRCO's official spelling and order (iSEARLE Table I); the annotations use these strings.
ASPECTS: tuple[str, ...] = CIRCO_ASPECTS
CARD, ADD, NEG, DIRECT, CC, COMP, CONJ, SPATIAL, VIEW = ASPECTS

# Geometry, in image coordinates normalised to [0, 1] (x to the right, y down).
ZOOM = 1.35  # a close-up magnifies the scene about the canvas centre
JITTER = 0.12  # object centres move by up to this fraction of a grid cell
REGION_MARGIN = 0.4  # "on the left" means x < 0.4, "on the right" x > 0.6, likewise top/bottom
RELATION_GAP = 0.15  # "A is left of B" means x_A < x_B - 0.15 (same-column objects are neither)
LAYOUT_TOL = 0.12  # "mirrored" compares object centres with this tolerance
_SIDE = {"small": 0.55, "large": 0.92}  # object side as a fraction of the grid cell

REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_REGION_AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_REGION_TO = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_NUMBERS = ("no", "one", "two", "three", "four", "five")
_NOUNS = {"trousers": ("pair of trousers", "pairs of trousers")}

CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "dev", "test1": "test1"}  # split -> name prefix / folder
CIRCO_SPLITS: tuple[str, ...] = ("val", "test")
CIRCO_MAX_ID = 581_929  # COCO 2017 unlabeled ids are at most this large
PARTIAL_MARKER = ".cirlib_partial"  # present while a root is being (re)generated


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ScenesBenchConfig:
    """Sizes and knobs of the generated benchmark (the default is CIRR-lite, ~1 min on 2 cores)."""

    seed: int = 0
    long_side: int = 128
    min_objects: int = 1
    max_objects: int = 4
    # CIRR: image sets of 6 per split and queries spread over them
    cirr_sets: dict[str, int] = field(default_factory=lambda: {"train": 1100, "val": 420, "test1": 250})
    cirr_queries: dict[str, int] = field(default_factory=lambda: {"train": 4400, "val": 500, "test1": 300})
    # CIRCO: queries per split; the shared gallery is filled with distractor scenes up to this size
    circo_queries: dict[str, int] = field(default_factory=lambda: {"val": 200, "test": 100})
    circo_gallery: int = 3000
    circo_extra_positives: tuple[int, int] = (0, 6)  # nuisance variants of the target, inclusive range
    circo_near_misses: tuple[int, int] = (2, 4)
    p_conjunction_cirr: float = 0.4  # CIRR: 43.7% of captions are conjunctions, CIRCO: 76.2%
    p_conjunction_circo: float = 0.7

    @classmethod
    def quick(cls, seed: int = 0) -> ScenesBenchConfig:
        """A tiny benchmark for tests and smoke runs (a few seconds)."""
        return cls(
            seed=seed,
            long_side=64,
            # 40 validation queries each: a quick run's CIRR and CIRCO numbers move in steps of 2.5
            # points, not 8-10, and a broken protocol shows (tests/test_notebook_results.py)
            cirr_sets={"train": 12, "val": 20, "test1": 6},
            cirr_queries={"train": 36, "val": 40, "test1": 8},
            circo_queries={"val": 40, "test": 6},
            circo_gallery=250,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}")
        if self.long_side < 32:
            raise ValueError(f"long_side must be at least 32 px, got {self.long_side}")
        if set(self.cirr_sets) != set(CIRR_SPLITS) or set(self.cirr_queries) != set(CIRR_SPLITS):
            raise ValueError(f"cirr_sets and cirr_queries need exactly the splits {list(CIRR_SPLITS)}")
        if set(self.circo_queries) != set(CIRCO_SPLITS):
            raise ValueError(f"circo_queries needs exactly the splits {list(CIRCO_SPLITS)}")


# -------------------------------------------------------------------------------- scene graph
@dataclass(frozen=True)
class SceneObject:
    id: int
    kind: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, column) of the grid
    jitter: tuple[float, float]  # offset of the centre in cell fractions
    item: int | None = None  # Fashion-MNIST index (items only)


@dataclass(frozen=True)
class Scene:
    """Mutable-by-copy scene; ``attrs`` is the JSON form every predicate and renderer reads."""

    split: str
    fmnist: str  # which Fashion-MNIST split the item indices refer to
    width: int
    height: int
    grid: tuple[int, int]  # (rows, columns)
    background: str
    pattern: str
    objects: tuple[SceneObject, ...]
    mirrored: bool = False
    close_up: bool = False

    def object(self, oid: int) -> SceneObject:
        return next(o for o in self.objects if o.id == oid)

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.grid[0]) for c in range(self.grid[1]) if (r, c) not in used]

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        rows, cols = self.grid
        objects = []
        for o in sorted(self.objects, key=lambda o: o.id):
            x = (o.cell[1] + 0.5 + o.jitter[0]) / cols
            y = (o.cell[0] + 0.5 + o.jitter[1]) / rows
            if self.close_up:
                x, y = 0.5 + (x - 0.5) * ZOOM, 0.5 + (y - 0.5) * ZOOM
            if self.mirrored:
                x = 1.0 - x
            obj = {"id": o.id, "kind": o.kind, "colour": o.colour, "size": o.size, "cell": list(o.cell),
                   "x": round(x, 4), "y": round(y, 4)}
            if o.item is not None:
                obj["item"] = o.item
            objects.append(obj)
        return {
            "split": self.split,
            "fmnist": self.fmnist,
            "width": self.width,
            "height": self.height,
            "grid": list(self.grid),
            "background": {"colour": self.background, "pattern": self.pattern},
            "view": {"mirrored": self.mirrored, "close_up": self.close_up},
            "objects": objects,
        }

    @functools.cached_property
    def key(self) -> str:
        """Identity of the picture (split aside), to keep visually identical scenes out of one set."""
        return json.dumps({k: v for k, v in self.attrs.items() if k != "split"}, sort_keys=True)


def _valid(scene: Scene) -> bool:
    """Objects never share the background's hue, and the scene is never empty."""
    hidden = BACKGROUNDS[scene.background]
    return bool(scene.objects) and all(o.colour != hidden for o in scene.objects)


# ------------------------------------------------------------------------------- predicates
def _in_region(obj: dict, region: str) -> bool:
    x, y = obj["x"], obj["y"]
    return {"left": x < REGION_MARGIN, "right": x > 1 - REGION_MARGIN,
            "top": y < REGION_MARGIN, "bottom": y > 1 - REGION_MARGIN}[region]


def _related(a: dict, b: dict, relation: str) -> bool:
    return {"left of": a["x"] < b["x"] - RELATION_GAP, "right of": a["x"] > b["x"] + RELATION_GAP,
            "above": a["y"] < b["y"] - RELATION_GAP, "below": a["y"] > b["y"] + RELATION_GAP}[relation]


def _matches(obj: dict, spec: dict) -> bool:
    return (
        obj["kind"] == spec["kind"]
        and spec.get("colour", obj["colour"]) == obj["colour"]
        and spec.get("size", obj["size"]) == obj["size"]
        and ("region" not in spec or _in_region(obj, spec["region"]))
    )


def _count(attrs: dict, spec: dict) -> int:
    return sum(_matches(o, spec) for o in attrs["objects"])


def satisfies(attrs: dict, constraints: Sequence[dict]) -> bool:
    """Whether a scene graph (a ``cirlib_meta.json`` attribute dict) meets every constraint of a query.

    Constraint vocabulary (JSON): ``has`` {kind, colour?, size?, region?, min, max?} counts matching
    objects; ``background`` {colour?, pattern?}; ``relation`` {a, b, rel} needs two distinct
    objects matching a and b in that relation; ``view`` {close_up}; ``layout`` {mirrored, objects:
    [{kind, colour, x, y}]} needs that mirroring and an object of that kind/colour at each place.
    """
    for c in constraints:
        op = c["op"]
        if op == "has":
            n = _count(attrs, c)
            if n < c["min"] or ("max" in c and n > c["max"]):
                return False
        elif op == "background":
            bg = attrs["background"]
            if any(bg[k] != c[k] for k in ("colour", "pattern") if k in c):
                return False
        elif op == "relation":
            objs = attrs["objects"]
            if not any(
                a is not b and _matches(a, c["a"]) and _matches(b, c["b"]) and _related(a, b, c["rel"])
                for a in objs
                for b in objs
            ):
                return False
        elif op == "view":
            if attrs["view"]["close_up"] != c["close_up"]:
                return False
        elif op == "layout":
            if attrs["view"]["mirrored"] != c["mirrored"]:
                return False
            for want in c["objects"]:
                if not any(
                    o["kind"] == want["kind"] and o["colour"] == want["colour"]
                    and abs(o["x"] - want["x"]) < LAYOUT_TOL and abs(o["y"] - want["y"]) < LAYOUT_TOL
                    for o in attrs["objects"]
                ):
                    return False
        else:
            raise ValueError(f"unknown constraint op {op!r} in {c}")
    return True


# --------------------------------------------------------------------------------- language
def _noun(kind: str, n: int = 1) -> str:
    singular, plural = _NOUNS.get(kind, (kind, kind + "s"))
    return singular if n == 1 else plural


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count_phrase(n: int, kind: str) -> str:
    return f"{_NUMBERS[n]} {_noun(kind, n)}"


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


def _pick(rng: np.random.Generator, options: Sequence[tuple[str, Iterable[str], Sequence[dict]]]) -> _Statement:
    text, aspects, constraints = options[int(rng.integers(len(options)))]
    return _Statement(text, frozenset(aspects), tuple(constraints))


def _has(kind: str, lo: int = 1, hi: int | None = None, **attrs: str) -> dict:
    c = {"op": "has", "kind": kind, **attrs, "min": lo}
    if hi is not None:
        c["max"] = hi
    return c


def _reference(attrs: dict, obj: dict) -> tuple[str, dict] | None:
    """How to point at ``obj`` unambiguously ("the bag" / "the red bag") and the matching spec."""
    if _count(attrs, {"kind": obj["kind"]}) == 1:
        return _noun(obj["kind"]), {"kind": obj["kind"]}
    spec = {"kind": obj["kind"], "colour": obj["colour"]}
    if _count(attrs, spec) == 1:
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
        pointer = _reference(tgt, b)
        if pointer is None or _reference(ref, r_objs[b["id"]]) != pointer:
            continue
        a_ref = r_objs.get(a["id"])
        for rel in RELATIONS:
            if _related(a, b, rel) and (a_ref is None or not _related(a_ref, r_objs[b["id"]], rel)):
                out.append((rel, pointer))
    return out


def _recolour(ref: dict, tgt: dict, a: dict, b: dict, rng: np.random.Generator) -> _Statement | None:
    pointer = _reference(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    c0, c = a["colour"], b["colour"]
    noun = _noun(a["kind"])
    con = [_has(a["kind"], _count(ref, {"kind": a["kind"], "colour": c}) + 1, colour=c)]
    if "colour" in spec:  # "the red bag" already names the old colour
        options = [(f"the {name} is {c} instead", (CC, DIRECT), con), (f"change the {name} to {c}", (CC, DIRECT), con)]
    else:
        options = [
            (f"the {noun} is {c}", (DIRECT,), con),
            (f"make the {noun} {c}", (DIRECT,), con),
            (f"the {noun} is {c} instead of {c0}", (CC, DIRECT), con),
            (f"same {noun} but {c}", (CC,), con),
        ]
    return _pick(rng, options)


def _replace(ref: dict, tgt: dict, a: dict, b: dict, rng: np.random.Generator) -> _Statement | None:
    pointer = _reference(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    new = f"{b['colour']} {_noun(b['kind'])}"
    con = [
        {"op": "has", **spec, "min": 0, "max": _count(ref, spec) - 1},
        _has(b["kind"], _count(ref, {"kind": b["kind"], "colour": b["colour"]}) + 1, colour=b["colour"]),
    ]
    return _pick(rng, [
        (f"replace the {name} with {_a(new)}", (CC, DIRECT), con),
        (f"has {_a(new)} instead of the {name}", (CC,), con),
        (f"the {name} is now {_a(_noun(b['kind']))}", (CC,), con),
    ])


def _resize(ref: dict, tgt: dict, a: dict, b: dict, rng: np.random.Generator) -> _Statement | None:
    pointer = _reference(ref, a)
    if pointer is None:
        return None
    name, spec = pointer
    size = b["size"]
    con = [{"op": "has", **spec, "size": size, "min": _count(ref, {**spec, "size": size}) + 1}]
    bigger = "bigger" if size == "large" else "smaller"
    options = [
        (f"the {name} is {bigger}", (COMP,), con),
        (f"the {name} is {'larger' if size == 'large' else 'smaller'} now", (COMP,), con),
        (f"make the {name} {size}", (DIRECT,), con),
    ]
    other = "small" if size == "large" else "large"
    for o in tgt["objects"]:  # "the bag is bigger than the coat": a comparison between two objects
        if o["kind"] != a["kind"] and o["size"] == other and (p := _reference(tgt, o)) is not None:
            than = {"op": "has", **p[1], "size": other, "min": 1}
            options.append((f"the {name} is {bigger} than the {p[0]}", (COMP,), [*con, than]))
    return _pick(rng, options)


def _move(ref: dict, tgt: dict, a: dict, b: dict, rng: np.random.Generator) -> _Statement | None:
    pointer = _reference(ref, a)
    if pointer is None or _reference(tgt, b) != pointer:
        return None
    name, spec = pointer
    options = []
    for region in REGIONS:
        if _in_region(b, region) and not _in_region(a, region):
            con = [{"op": "has", **spec, "region": region, "min": 1}]
            options += [(f"move the {name} {_REGION_TO[region]}", (SPATIAL, DIRECT), con),
                        (f"the {name} is {_REGION_AT[region]}", (SPATIAL,), con)]
    for rel, (other, other_spec) in _related_pairs(ref, tgt, b):
        con = [{"op": "relation", "a": spec, "b": other_spec, "rel": rel}]
        options += [(f"the {name} is {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con),
                    (f"the {name} is now {_RELATION_TEXT[rel]} the {other}", (SPATIAL,), con)]
    return _pick(rng, options) if options else None


def _count_change(ref: dict, tgt: dict, kind: str, added: list[dict], removed: list[dict],
                  rng: np.random.Generator) -> _Statement | None:
    n0, n1 = _count(ref, {"kind": kind}), _count(tgt, {"kind": kind})
    if added and removed:
        return None
    exact = [_has(kind, n1, n1)]
    if removed and n1 == 0:  # the kind disappears
        noun = _noun(kind) if n0 == 1 else _noun(kind, n0)
        the = "the" if n0 == 1 else "the " + _NUMBERS[n0]
        return _pick(rng, [
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
            if _in_region(o, region):
                options.append((f"add {_a(desc)} {_REGION_AT[region]}", (ADD, SPATIAL),
                                [_has(kind, colour=o["colour"], region=region)]))
        for rel, (other, other_spec) in _related_pairs(ref, tgt, o, exclude_kind=kind):
            relation = {"op": "relation", "a": {"kind": kind, "colour": o["colour"]}, "b": other_spec, "rel": rel}
            options.append((f"add {_a(desc)} {_RELATION_TEXT[rel]} the {other}", (ADD, SPATIAL), [*con, relation]))
        return _pick(rng, options)
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
    return _pick(rng, options)


def _background_change(ref: dict, tgt: dict, rng: np.random.Generator) -> _Statement:
    (c0, p0), (c1, p1) = ((s["background"]["colour"], s["background"]["pattern"]) for s in (ref, tgt))
    con: dict[str, Any] = {"op": "background"}
    if c0 != c1:
        con["colour"] = c1
    if p0 != p1:
        con["pattern"] = p1
    cons = [con]
    if p0 == p1:
        return _pick(rng, [
            (f"on {_a(c1)} background", (SPATIAL,), cons),
            (f"the background is {c1}", (SPATIAL, DIRECT), cons),
            (f"the background is {c1} instead of {c0}", (SPATIAL, CC), cons),
        ])
    adj0, adj1 = _pattern_adj(p0), _pattern_adj(p1)
    if c0 == c1:
        return _pick(rng, [
            (f"on {_a(adj1)} background", (SPATIAL,), cons),
            (f"has {_a(adj1)} background", (SPATIAL,), cons),
            (f"the background is {adj1} instead of {adj0}", (SPATIAL, CC), cons),
        ])
    return _pick(rng, [(f"on {_a(adj1 + ' ' + c1)} background", (SPATIAL,), cons),
                       (f"the background is {adj1} and {c1}", (SPATIAL, DIRECT, CONJ), cons)])


def _view_change(tgt: dict, flag: str, rng: np.random.Generator) -> _Statement:
    if flag == "close_up":
        con = [{"op": "view", "close_up": tgt["view"]["close_up"]}]
        texts = (["seen closer", "a close-up of the same scene", "zoomed in"] if tgt["view"]["close_up"]
                 else ["seen from further away", "zoomed out"])
    else:
        con = [{"op": "layout", "mirrored": tgt["view"]["mirrored"],
                "objects": [{k: o[k] for k in ("kind", "colour", "x", "y")} for o in tgt["objects"]]}]
        texts = ["mirrored", "seen from the opposite side", "flipped left to right"]
    return _pick(rng, [(t, (VIEW,), con) for t in texts])


def _shared_concept(ref: dict, tgt: dict) -> str:
    t_objs = {o["id"]: o for o in tgt["objects"]}
    same = [o for o in ref["objects"]
            if o["id"] in t_objs and all(o[k] == t_objs[o["id"]][k] for k in ("kind", "colour", "size"))]
    if same:
        return _a(f"{same[0]['colour']} {_noun(same[0]['kind'])}")
    kept = [o for o in ref["objects"] if o["id"] in t_objs and o["kind"] == t_objs[o["id"]]["kind"]]
    if kept:
        return _a(_noun(kept[0]["kind"]))
    if ref["background"] == tgt["background"]:
        return _a(f"{ref['background']['colour']} background")
    colour = next((o["colour"] for o in ref["objects"] if o["id"] in t_objs), ref["objects"][0]["colour"])
    return _a(f"{colour} object")


_ATTRIBUTE_CHANGES = {"kind": _replace, "colour": _recolour, "size": _resize, "cell": _move}


def describe_change(ref: dict, tgt: dict, rng: np.random.Generator) -> Change | None:
    """Relative caption from the difference of two scene graphs (attribute dicts), or None.

    None when the difference is not sayable without ambiguity (two attributes of one object,
    an object that cannot be pointed at, a move with no relation that changed, ...) or when the
    compiled constraints would not separate target from reference.
    """
    r_objs = {o["id"]: o for o in ref["objects"]}
    t_objs = {o["id"]: o for o in tgt["objects"]}
    statements: list[_Statement] = []
    view_changed = ref["view"] != tgt["view"]
    replaced: set[str] = set()
    for oid in sorted(r_objs.keys() & t_objs.keys()):
        a, b = r_objs[oid], t_objs[oid]
        changed = [f for f in _ATTRIBUTE_CHANGES if a[f] != b[f]]
        if len(changed) > 1 or (changed == ["cell"] and view_changed):
            return None
        if changed:
            st = _ATTRIBUTE_CHANGES[changed[0]](ref, tgt, a, b, rng)
            if st is None:
                return None
            statements.append(st)
            if changed == ["kind"]:
                replaced |= {a["kind"], b["kind"]}
    added = [t_objs[i] for i in sorted(t_objs.keys() - r_objs.keys())]
    removed = [r_objs[i] for i in sorted(r_objs.keys() - t_objs.keys())]
    for kind in sorted({o["kind"] for o in added + removed}):
        if kind in replaced:
            return None
        st = _count_change(ref, tgt, kind, [o for o in added if o["kind"] == kind],
                           [o for o in removed if o["kind"] == kind], rng)
        if st is None:
            return None
        statements.append(st)
    if ref["background"] != tgt["background"]:
        statements.append(_background_change(ref, tgt, rng))
    for flag in ("close_up", "mirrored"):
        if ref["view"][flag] != tgt["view"][flag]:
            statements.append(_view_change(tgt, flag, rng))
    if not statements:
        return None

    statements = [statements[i] for i in rng.permutation(len(statements))]
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
    return Change(caption, tuple(a for a in ASPECTS if a in aspects), tuple(constraints), _shared_concept(ref, tgt))


# ------------------------------------------------------------------------------------ edits
@dataclass(frozen=True)
class Edit:
    """One graph edit: add / remove / recolour / replace / resize / move / item / background / view."""

    op: str
    obj: int = -1
    value: Any = None


def _apply(scene: Scene, e: Edit) -> Scene | None:
    """The edited scene, or None when the edit no longer fits (missing object, occupied cell)."""
    objs = {o.id: o for o in scene.objects}
    if e.op == "background":
        return replace(scene, background=e.value[0], pattern=e.value[1])
    if e.op == "view":
        return replace(scene, **{e.value: not getattr(scene, e.value)})
    if e.op == "add":
        if e.value.id in objs or e.value.cell not in scene.free_cells():
            return None
        return replace(scene, objects=(*scene.objects, e.value))
    if e.obj not in objs:
        return None
    if e.op == "remove":
        return replace(scene, objects=tuple(o for o in scene.objects if o.id != e.obj)) if len(objs) > 1 else None
    o = objs[e.obj]
    if e.op == "move":
        cell, jitter = e.value
        if cell != o.cell and cell not in scene.free_cells():
            return None
        new = replace(o, cell=cell, jitter=jitter)
    elif e.op == "replace":
        new = replace(o, kind=e.value[0], item=e.value[1])
    else:
        new = replace(o, **{{"recolour": "colour", "resize": "size", "item": "item"}[e.op]: e.value})
    return replace(scene, objects=tuple(new if x.id == e.obj else x for x in scene.objects))


class _Sampler:
    """Draws scenes and edits from one Fashion-MNIST pool with one random stream."""

    EDIT_WEIGHTS = {"add": 0.2, "remove": 0.12, "recolour": 0.17, "replace": 0.1, "resize": 0.11,
                    "move": 0.12, "background": 0.1, "view": 0.08}

    def __init__(self, rng: np.random.Generator, pools: dict[str, np.ndarray], fmnist: str, config: ScenesBenchConfig):
        self.rng, self.pools, self.fmnist, self.cfg = rng, pools, fmnist, config

    def choice(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def jitter(self) -> tuple[float, float]:
        return tuple(round(float(v), 3) for v in self.rng.uniform(-JITTER, JITTER, 2))

    def item(self, kind: str) -> int | None:
        return int(self.choice(self.pools[kind])) if kind in self.pools else None

    def new_object(self, scene_bg: str, oid: int, cell: tuple[int, int], kind: str | None = None) -> SceneObject:
        kind = kind or self.choice(KINDS)
        colour = self.choice([c for c in OBJECT_COLOURS if c != BACKGROUNDS[scene_bg]])
        return SceneObject(oid, kind, colour, self.choice(SIZES), cell, self.jitter(), self.item(kind))

    def scene(self, split: str) -> Scene:
        ratio = ASPECT_RATIOS[int(self.rng.integers(len(ASPECT_RATIOS)))]
        long = self.cfg.long_side
        if ratio[0] >= ratio[1]:
            w, h = long, round(long * ratio[1] / ratio[0])
        else:
            w, h = round(long * ratio[0] / ratio[1]), long
        grid = (2, 3) if w >= 1.25 * h else (3, 2) if h >= 1.25 * w else (2, 2)
        bg = self.choice(list(BACKGROUNDS))
        n = int(self.rng.integers(self.cfg.min_objects, self.cfg.max_objects + 1))
        cells = [(int(i) // grid[1], int(i) % grid[1]) for i in self.rng.choice(grid[0] * grid[1], n, replace=False)]
        objects: list[SceneObject] = []
        for i, cell in enumerate(cells):  # a quarter of later objects repeat a kind: material for counting
            kind = self.choice([o.kind for o in objects]) if objects and self.rng.random() < 0.25 else None
            objects.append(self.new_object(bg, i, cell, kind))
        pattern = self.choice(BACKGROUND_PATTERNS)
        return Scene(split, self.fmnist, w, h, grid, bg, pattern, tuple(objects))

    def edit(self, scene: Scene, busy: set[str]) -> Edit | None:
        """A random edit touching nothing in ``busy`` (kinds, "background", "layout"), or None."""
        ops = list(self.EDIT_WEIGHTS)
        p = np.array([self.EDIT_WEIGHTS[o] for o in ops])
        for op in self.rng.choice(ops, len(ops), replace=False, p=p / p.sum()):
            e = getattr(self, "_" + str(op))(scene, busy)
            if e is not None:
                return e
        return None

    def _pointable(self, scene: Scene, busy: set[str]) -> list[SceneObject]:
        """Objects a caption can name unambiguously, of kinds no earlier edit touched."""
        by_id = {o["id"]: o for o in scene.attrs["objects"]}
        return [o for o in scene.objects if o.kind not in busy and _reference(scene.attrs, by_id[o.id]) is not None]

    def _add(self, scene: Scene, busy: set[str]) -> Edit | None:
        free = scene.free_cells()
        if len(scene.objects) >= self.cfg.max_objects or not free:
            return None
        present = {o.kind for o in scene.objects}
        counted = sorted(k for k in present - busy)
        if counted and self.rng.random() < 0.35:  # another object of a kind already there: cardinality
            kind = self.choice(counted)
        else:
            fresh = [k for k in KINDS if k not in present and k not in busy]
            if not fresh:
                return None
            kind = self.choice(fresh)
        oid = max(o.id for o in scene.objects) + 1
        return Edit("add", value=self.new_object(scene.background, oid, self.choice(free), kind))

    def _remove(self, scene: Scene, busy: set[str]) -> Edit | None:
        options = [o for o in scene.objects if o.kind not in busy]
        if len(scene.objects) <= self.cfg.min_objects or not options:
            return None
        return Edit("remove", self.choice(options).id)

    def _recolour(self, scene: Scene, busy: set[str]) -> Edit | None:
        options = self._pointable(scene, busy)
        if not options:
            return None
        o = self.choice(options)
        taken = {x.colour for x in scene.objects if x.kind == o.kind} | {BACKGROUNDS[scene.background]}
        return Edit("recolour", o.id, self.choice([c for c in OBJECT_COLOURS if c not in taken]))

    def _replace(self, scene: Scene, busy: set[str]) -> Edit | None:
        options = self._pointable(scene, busy)
        present = {o.kind for o in scene.objects}
        fresh = [k for k in KINDS if k not in present and k not in busy]
        if not options or not fresh:
            return None
        kind = self.choice(fresh)
        return Edit("replace", self.choice(options).id, (kind, self.item(kind)))

    def _resize(self, scene: Scene, busy: set[str]) -> Edit | None:
        options = self._pointable(scene, busy)
        if not options:
            return None
        o = self.choice(options)
        return Edit("resize", o.id, "small" if o.size == "large" else "large")

    def _move(self, scene: Scene, busy: set[str]) -> Edit | None:
        options = self._pointable(scene, busy)
        free = scene.free_cells()
        if "layout" in busy or not options or not free:
            return None
        return Edit("move", self.choice(options).id, (self.choice(free), self.jitter()))

    def _background(self, scene: Scene, busy: set[str]) -> Edit | None:
        if "background" in busy:
            return None
        colour, pattern = scene.background, scene.pattern
        what = self.rng.random()
        if what < 0.8:
            colour = self.choice([c for c in BACKGROUNDS if c != scene.background
                                  and all(o.colour != BACKGROUNDS[c] for o in scene.objects)])
        if what > 0.5:
            pattern = self.choice([p for p in BACKGROUND_PATTERNS if p != scene.pattern])
        return Edit("background", value=(colour, pattern))

    def _view(self, scene: Scene, busy: set[str]) -> Edit | None:
        if "layout" in busy:
            return None
        # mirroring a left-right symmetric layout would change nothing visible
        asymmetric = any(abs(o["x"] - 0.5) > 0.1 for o in scene.attrs["objects"])
        flag = "mirrored" if asymmetric and self.rng.random() < 0.4 else "close_up"
        return Edit("view", value=flag)

    @staticmethod
    def touched(scene: Scene, e: Edit) -> set[str]:
        if e.op == "background":
            return {"background"}
        if e.op in ("view", "move"):
            return {"layout"} | ({scene.object(e.obj).kind} if e.op == "move" else set())
        if e.op == "add":
            return {e.value.kind}
        kinds = {scene.object(e.obj).kind}
        return kinds | {e.value[0]} if e.op == "replace" else kinds

    def mutate(self, scene: Scene, p_two: float, attempts: int = 60) -> tuple[Scene, list[Edit], Change] | None:
        """1-2 edits of ``scene`` whose difference is sayable; None if ``attempts`` draws all fail."""
        for _ in range(attempts):
            n = 2 if self.rng.random() < p_two else 1
            cur, edits, busy = scene, [], set()
            for _ in range(n):
                e = self.edit(cur, busy)
                if e is None:
                    break
                busy |= self.touched(cur, e)
                nxt = _apply(cur, e)
                if nxt is None:
                    break
                cur = nxt
                edits.append(e)
            if not edits or not _valid(cur):
                continue
            change = describe_change(scene.attrs, cur.attrs, self.rng)
            if change is not None:
                return cur, edits, change
        return None

    def nuisance(self, scene: Scene) -> Scene:
        """The same content with 1-3 incidental changes (item instance, place, size, background, extras)."""
        cur = scene
        for _ in range(int(self.rng.integers(1, 4))):
            o = self.choice(cur.objects)
            what = self.choice(("item", "move", "resize", "background", "add", "remove"))
            if what == "item":
                e = Edit("item", o.id, self.item(o.kind)) if o.item is not None else None
            elif what == "move":
                e = Edit("move", o.id, (self.choice([o.cell, *cur.free_cells()]), self.jitter()))
            elif what == "resize":
                e = Edit("resize", o.id, "small" if o.size == "large" else "large")
            elif what == "background":
                e = self._background(cur, set())
            elif what == "add":
                e = self._add(cur, set())
            else:
                e = self._remove(cur, set())
            nxt = _apply(cur, e) if e is not None else None
            if nxt is not None and _valid(nxt):
                cur = nxt
        return cur


# -------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=512)
def _background_image(colour: str, pattern: str, width: int, height: int) -> np.ndarray:
    """Read-only pale texture; the few (colour, pattern, canvas) combinations recur constantly."""
    size = (width, height)
    tex = render.texture(pattern, BACKGROUNDS[colour], size, period=max(6.0, 0.09 * max(size)))
    out = (255.0 - 0.4 * (255.0 - tex)).astype(np.float32)  # a pale tint keeps the objects readable
    out.setflags(write=False)
    return out


class SceneRenderer:
    """Draws scene graphs (attribute dicts) from the Fashion-MNIST arrays they index.

    Coloured item layers are cached: the six images of a set share most of their objects.
    """

    def __init__(self, images: dict[str, np.ndarray] | None = None, cache_size: int = 4096):
        self.images = images or {}
        self._item = functools.lru_cache(maxsize=cache_size)(self._item_layer)

    def _item_layer(self, fmnist: str, index: int, side: int, colour: str) -> tuple[np.ndarray, np.ndarray]:
        if fmnist not in self.images:
            self.images[fmnist] = fashion_mnist.load_split(fmnist)[0]
        return render.item_layer(self.images[fmnist][index], (side, side), colour, margin=0.03)

    def __call__(self, attrs: dict) -> Image.Image:
        w, h = attrs["width"], attrs["height"]
        rows, cols = attrs["grid"]
        zoom = ZOOM if attrs["view"]["close_up"] else 1.0
        mirrored = attrs["view"]["mirrored"]
        canvas = _background_image(attrs["background"]["colour"], attrs["background"]["pattern"], w, h)
        canvas = np.array(canvas)  # the scene is drawn unmirrored; a mirrored view flips the whole picture
        cell = min(w / cols, h / rows)
        for o in attrs["objects"]:
            side = max(6, round(cell * _SIDE[o["size"]] * zoom))
            x = (1.0 - o["x"]) if mirrored else o["x"]
            if o["kind"] in SHAPE_KINDS:
                alpha = render.logo_mask(o["kind"], side)[0]
                rgb = np.broadcast_to(np.asarray(render.COLOURS[o["colour"]], np.float32), (side, side, 3))
            else:
                rgb, alpha = self._item(attrs["fmnist"], o["item"], side, o["colour"])
            render.paste_layer(canvas, rgb, alpha, (round(x * w - side / 2), round(o["y"] * h - side / 2)))
        if mirrored:
            canvas = canvas[:, ::-1]
        return Image.fromarray(np.rint(np.clip(canvas, 0, 255)).astype(np.uint8), "RGB")


@functools.cache
def _default_renderer() -> SceneRenderer:
    return SceneRenderer()


def render_scene(attrs: dict) -> Image.Image:
    """Draw one scene graph from a ``cirlib_meta.json`` (e.g. to show a query in a notebook)."""
    return _default_renderer()(attrs)


# ------------------------------------------------------------------------------ generation
class _ImageWriter:
    """Renders in this thread and encodes/saves in a few others (Pillow and file I/O release the GIL)."""

    def __init__(self, renderer: SceneRenderer, workers: int = 4):
        self.renderer = renderer
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: list[Future] = []

    def write(self, attrs: dict, path: Path, **save_options: Any) -> None:
        image = self.renderer(attrs)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pending.append(self.pool.submit(image.save, path, **save_options))
        if len(self.pending) > 256:
            self.drain()

    def drain(self) -> None:
        for f in self.pending:
            f.result()  # re-raises a failed save here
        self.pending.clear()

    def __enter__(self) -> _ImageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


# (slice, slices) of the Fashion-MNIST split each part draws items from: CIRR train uses the train
# set; CIRR val, CIRR test1 and CIRCO use disjoint thirds of the test set (no item in two of them).
_POOL_SLICE: dict[str, tuple[int, int]] = {"train": (0, 1), "val": (0, 3), "test1": (1, 3), "circo": (2, 3)}


def _item_pools(labels: np.ndarray, part: int, parts: int) -> dict[str, np.ndarray]:
    """Indices per item kind, restricted to one of ``parts`` disjoint slices of the split."""
    idx = np.arange(len(labels))
    keep = idx % parts == part
    return {kind: idx[keep & (labels == label)] for label, kind in ITEM_KINDS.items()}


def _fmnist_fingerprint() -> dict[str, str]:
    folder = fashion_mnist.ensure_fashion_mnist()
    return {name: file_sha256(folder / name) for name in fashion_mnist.FILES}


def _config_fingerprint(config: ScenesBenchConfig) -> str:
    return fingerprint({"generator": GENERATOR, "version": VERSION, "config": asdict(config),
                        "fashion_mnist": _fmnist_fingerprint()})


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "cirlib_meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _reset(root: Path, generated: Iterable[str]) -> None:
    """Clear what an earlier run (other config, or interrupted) left, so no stale file survives.

    Only folders this generator wrote are touched: a root that holds other files (say, a real
    CIRR download passed by mistake) is refused rather than emptied.
    """
    marker = root / PARTIAL_MARKER
    meta = _read_meta(root)
    ours = marker.exists() or (meta is not None and meta.get("generator") == GENERATOR)
    if root.is_dir() and any(root.iterdir()) and not ours:
        raise RuntimeError(f"refusing to overwrite {root}: it holds files not written by {GENERATOR}")
    for name in (*generated, "cirlib_meta.json"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _finish(root: Path, meta: dict, writer: _ImageWriter) -> None:
    """Write the meta file last (after every image is on disk): it marks the root complete."""
    writer.drain()
    write_json(root / "cirlib_meta.json", meta, indent=None)
    (root / PARTIAL_MARKER).unlink()


def _split_evenly(total: int, parts: int) -> list[int]:
    return [(total * (i + 1)) // parts - (total * i) // parts for i in range(parts)]


def _cirr_set(sampler: _Sampler, split: str, wanted: int, p_two: float
              ) -> tuple[list[Scene], list[tuple[int, int, Change]]] | None:
    """Six variations of one base scene and up to ``wanted`` queries inside the set.

    Queries go from the base scene to a variant or back; each must single out its target among
    the six (no other member satisfies its constraints).
    """
    base = sampler.scene(split)
    members = [base]
    for _ in range(40):
        if len(members) == 6:
            break
        out = sampler.mutate(base, p_two)
        if out is not None and all(out[0].key != m.key for m in members):
            members.append(out[0])
    if len(members) < 6:
        return None
    attrs = [m.attrs for m in members]
    candidates = [(0, i) for i in range(1, 6)] + [(i, 0) for i in range(1, 6)]
    queries = []
    for k in sampler.rng.permutation(len(candidates)):
        if len(queries) == wanted:
            break
        r, t = candidates[int(k)]
        change = describe_change(attrs[r], attrs[t], sampler.rng)
        if change is None or any(satisfies(attrs[j], change.constraints) for j in range(6) if j != t):
            continue
        queries.append((r, t, change))
    return members, queries


def _cirr_image_name(prefix: str, set_id: int, member: int) -> str:
    return f"{prefix}-{set_id}-{member // 2}-img{member % 2}"  # NLVR2-style, like "dev-147-1-img1"


def _generate_cirr(root: Path, config: ScenesBenchConfig, fp: str, labels: dict[str, np.ndarray],
                   writer: _ImageWriter) -> dict[str, Any]:
    _reset(root, ("cirr", *CIRR_SPLITS.values()))
    attributes: dict[str, dict] = {}
    meta_queries: dict[str, list[dict]] = {}
    sizes: dict[str, dict[str, int]] = {}
    pairid = 0
    for s_index, (split, prefix) in enumerate(CIRR_SPLITS.items()):
        fm = "train" if split == "train" else "test"
        pools = _item_pools(labels[fm], *_POOL_SLICE[split])
        sampler = _Sampler(np.random.default_rng([config.seed, 1, s_index]), pools, fm, config)
        p_two = config.p_conjunction_cirr
        quotas = _split_evenly(config.cirr_queries[split], config.cirr_sets[split])
        name_to_rel: dict[str, str] = {}
        captions: list[dict] = []
        records: list[dict] = []
        debt = 0
        for set_id in tqdm(range(config.cirr_sets[split]), desc=f"CIRR {split}", leave=False):
            out = None
            while out is None:
                out = _cirr_set(sampler, split, quotas[set_id] + debt, p_two)
            members, queries = out
            debt = quotas[set_id] + debt - len(queries)
            names = [_cirr_image_name(prefix, set_id, m) for m in range(6)]
            folder = f"./train/{set_id % 100}" if split == "train" else f"./{prefix}"
            for name, scene in zip(names, members):
                rel = f"{folder}/{name}.png"
                writer.write(scene.attrs, root / rel, compress_level=1)
                name_to_rel[name] = rel
                attributes[name] = scene.attrs
            order = [int(i) for i in sampler.rng.permutation(6)]
            listed = [names[i] for i in order]
            for r, t, change in queries:
                img_set = {"id": set_id, "members": listed, "reference_rank": order.index(r)}
                entry: dict[str, Any] = {"pairid": pairid, "reference": names[r]}
                if split != "test1":
                    entry |= {"target_hard": names[t], "target_soft": {names[t]: 1.0}}
                    img_set["target_rank"] = order.index(t)
                entry |= {"caption": change.caption, "img_set": img_set}
                captions.append(entry)
                records.append({"pairid": pairid, "reference": names[r], "target": names[t], "caption": change.caption,
                                "aspects": list(change.aspects), "constraints": list(change.constraints),
                                "shared_concept": change.shared_concept})
                pairid += 1
        write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", captions)
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", name_to_rel)
        meta_queries[split] = records
        sizes[split] = {"sets": config.cirr_sets[split], "queries": len(captions), "images": len(name_to_rel)}
    meta = {"generator": GENERATOR, "version": VERSION, "seed": config.seed, "sizes": sizes, "fingerprint": fp,
            "config": asdict(config), "attributes": attributes, "queries": meta_queries}
    _finish(root, meta, writer)
    return meta


def _ground_truths(gallery: list[dict], constraints: Sequence[dict], by_kind: dict[str, set[int]]) -> list[int]:
    """Indices of every gallery scene satisfying the constraints (pre-filtered by required kinds)."""
    need = [by_kind.get(c["kind"], set()) for c in constraints if c["op"] == "has" and c["min"] >= 1]
    candidates = set.intersection(*need) if need else set(range(len(gallery)))
    return sorted(i for i in candidates if satisfies(gallery[i], constraints))


def _generate_circo(root: Path, config: ScenesBenchConfig, fp: str, labels: dict[str, np.ndarray],
                    writer: _ImageWriter) -> dict[str, Any]:
    _reset(root, ("annotations", "COCO2017_unlabeled"))
    sampler = _Sampler(np.random.default_rng([config.seed, 2]), _item_pools(labels["test"], *_POOL_SLICE["circo"]),
                       "test", config)
    scenes: list[Scene] = []
    keys: set[str] = set()

    def keep(scene: Scene) -> int | None:
        if scene.key in keys:
            return None
        keys.add(scene.key)
        scenes.append(scene)
        return len(scenes) - 1

    groups: list[tuple[str, int, int, Change]] = []
    for split in CIRCO_SPLITS:
        for _ in tqdm(range(config.circo_queries[split]), desc=f"CIRCO {split} queries", leave=False):
            while True:  # reference and target must be pictures not already in the gallery
                ref = sampler.scene(split)
                out = sampler.mutate(ref, config.p_conjunction_circo)
                if out is not None and ref.key not in keys and out[0].key not in keys:
                    break
            tgt, edits, change = out
            r_idx, t_idx = keep(ref), keep(tgt)
            groups.append((split, r_idx, t_idx, change))
            lo, hi = config.circo_extra_positives
            for _ in range(int(sampler.rng.integers(lo, hi + 1))):  # more true positives
                for _ in range(10):
                    cand = sampler.nuisance(tgt)
                    if satisfies(cand.attrs, change.constraints) and keep(cand) is not None:
                        break
            near = [_apply(ref, e) for e in edits] if len(edits) > 1 else []  # half of a conjunction
            lo, hi = config.circo_near_misses
            for _ in range(int(sampler.rng.integers(lo, hi + 1))):  # same base scene, other edits
                other = sampler.mutate(ref, config.p_conjunction_circo)
                near.append(other[0] if other is not None else sampler.nuisance(ref))
            for cand in near:
                if cand is not None and _valid(cand):
                    keep(cand)
    while len(scenes) < config.circo_gallery:  # unrelated scenes: easy negatives
        keep(sampler.scene("distractor"))

    ids = sorted(int(i) + 1 for i in sampler.rng.choice(CIRCO_MAX_ID, len(scenes), replace=False))
    ids = [ids[int(i)] for i in sampler.rng.permutation(len(ids))]  # no link between id order and groups
    gallery = [s.attrs for s in scenes]
    by_kind: dict[str, set[int]] = {}
    for i, a in enumerate(gallery):
        for o in a["objects"]:
            by_kind.setdefault(o["kind"], set()).add(i)

    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    info = []
    for img_id, attrs in tqdm(sorted(zip(ids, gallery), key=lambda p: p[0]), desc="CIRCO images", leave=False):
        file_name = f"{img_id:012d}.jpg"
        writer.write(attrs, image_dir / file_name, quality=92)
        info.append({"id": img_id, "file_name": file_name, "width": attrs["width"], "height": attrs["height"]})
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
               {"info": {"description": "cirlib scenes benchmark in the COCO 2017 unlabeled layout"}, "images": info},
               indent=None)

    meta_queries: dict[str, list[dict]] = {s: [] for s in CIRCO_SPLITS}
    annotations: dict[str, list[dict]] = {s: [] for s in CIRCO_SPLITS}
    for split, r_idx, t_idx, change in groups:
        qid = len(annotations[split])
        gts = _ground_truths(gallery, change.constraints, by_kind)
        gt_ids = [ids[t_idx]] + sorted(ids[i] for i in gts if i != t_idx)
        entry: dict[str, Any] = {"id": qid, "reference_img_id": ids[r_idx]}
        if split == "val":
            entry["target_img_id"] = ids[t_idx]
        entry |= {"relative_caption": change.caption, "shared_concept": change.shared_concept}
        if split == "val":
            entry |= {"gt_img_ids": gt_ids, "semantic_aspects": list(change.aspects)}
        annotations[split].append(entry)
        meta_queries[split].append({"id": qid, "reference_img_id": ids[r_idx], "target_img_id": ids[t_idx],
                                    "caption": change.caption, "aspects": list(change.aspects),
                                    "constraints": list(change.constraints), "shared_concept": change.shared_concept,
                                    "gt_img_ids": gt_ids})
    for split in CIRCO_SPLITS:
        write_json(root / "annotations" / f"{split}.json", annotations[split])
    sizes = {s: {"queries": len(annotations[s]),
                 "mean_ground_truths": round(float(np.mean([len(q["gt_img_ids"]) for q in meta_queries[s]] or [0])), 2)}
             for s in CIRCO_SPLITS}
    sizes["gallery"] = {"images": len(scenes)}
    meta = {"generator": GENERATOR, "version": VERSION, "seed": config.seed, "sizes": sizes, "fingerprint": fp,
            "config": asdict(config), "attributes": {str(i): a for i, a in zip(ids, gallery)}, "queries": meta_queries}
    _finish(root, meta, writer)
    return meta


def generate_scenes(root: str | Path, config: ScenesBenchConfig | None = None) -> Path:
    """Write ``root/CIRR`` and ``root/CIRCO`` (skipped when their fingerprints already match); return root.

    Each root's ``cirlib_meta.json`` holds the scene graph of every image under ``attributes``
    (keyed by CIRR name / CIRCO id as str; ``split`` is the CIRR split, or for CIRCO the query
    split an image was made for, or ``distractor``) and every query's caption, aspects and
    constraints under ``queries`` (CIRCO test ground truths included, for offline analyses).
    """
    config = config or ScenesBenchConfig()
    root = Path(root)
    fp = _config_fingerprint(config)
    todo = [name for name in ("CIRR", "CIRCO") if (_read_meta(root / name) or {}).get("fingerprint") != fp]
    if not todo:
        return root
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = fashion_mnist.load_split(split)
    with _ImageWriter(SceneRenderer(images)) as writer:
        if "CIRR" in todo:
            _generate_cirr(root / "CIRR", config, fp, labels, writer)
        if "CIRCO" in todo:
            _generate_circo(root / "CIRCO", config, fp, labels, writer)
    return root


# --------------------------------------------------------------------------------- analysis
def load_meta(root: str | Path) -> dict[str, Any]:
    """The ``cirlib_meta.json`` of a generated CIRR or CIRCO root."""
    path = Path(root) / "cirlib_meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a root written by generate_scenes")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("generator") != GENERATOR:
        raise ValueError(f"{path}: field 'generator' is {meta.get('generator')!r}, expected {GENERATOR!r}")
    return meta
