"""Scene graphs and the predicates captions compile to.

A scene is a pale background (colour + texture) on a canvas of varied aspect ratio, holding 1-4
objects -- real Fashion-MNIST product photos and simple shapes -- each with a colour, a size and a
grid cell, seen in a view (mirrored and/or close-up). :attr:`Scene.attrs` is its JSON form, the
one every predicate, caption rule and renderer reads and ``cirlib_meta.json`` stores.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cirlib.data.synth import render

ITEM_KINDS: dict[int, str] = {  # Fashion-MNIST label -> object kind
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

# Geometry, in image coordinates normalised to [0, 1] (x to the right, y down).
ZOOM = 1.35  # a close-up magnifies the scene about the canvas centre
JITTER = 0.12  # object centres move by up to this fraction of a grid cell
REGION_MARGIN = 0.4  # "on the left" means x < 0.4, "on the right" x > 0.6, likewise top/bottom
RELATION_GAP = 0.15  # "A is left of B" means x_A < x_B - 0.15 (same-column objects are neither)
LAYOUT_TOL = 0.12  # "mirrored" compares object centres with this tolerance

REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: a Fashion-MNIST item or a shape, in a grid cell."""

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
        """The object with id ``oid``."""
        return next(o for o in self.objects if o.id == oid)

    def free_cells(self) -> list[tuple[int, int]]:
        """Grid cells no object occupies, in reading order."""
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.grid[0]) for c in range(self.grid[1]) if (r, c) not in used]

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        """The scene graph as JSON: object centres in normalised image coordinates, as seen in the view."""
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


def is_valid(scene: Scene) -> bool:
    """Objects never share the background's hue, and the scene is never empty."""
    hidden = BACKGROUNDS[scene.background]
    return bool(scene.objects) and all(o.colour != hidden for o in scene.objects)


def in_region(obj: dict, region: str) -> bool:
    """Whether an object (of an attribute dict) lies in one of :data:`REGIONS` of the image."""
    x, y = obj["x"], obj["y"]
    return {"left": x < REGION_MARGIN, "right": x > 1 - REGION_MARGIN,
            "top": y < REGION_MARGIN, "bottom": y > 1 - REGION_MARGIN}[region]


def related(a: dict, b: dict, relation: str) -> bool:
    """Whether object ``a`` is in one of :data:`RELATIONS` to object ``b``."""
    return {"left of": a["x"] < b["x"] - RELATION_GAP, "right of": a["x"] > b["x"] + RELATION_GAP,
            "above": a["y"] < b["y"] - RELATION_GAP, "below": a["y"] > b["y"] + RELATION_GAP}[relation]


def _matches(obj: dict, spec: dict) -> bool:
    return (
        obj["kind"] == spec["kind"]
        and spec.get("colour", obj["colour"]) == obj["colour"]
        and spec.get("size", obj["size"]) == obj["size"]
        and ("region" not in spec or in_region(obj, spec["region"]))
    )


def count_matching(attrs: dict, spec: dict) -> int:
    """How many objects of a scene graph match ``spec`` {kind, colour?, size?, region?}."""
    return sum(_matches(o, spec) for o in attrs["objects"])


def satisfies(attrs: dict, constraints: Sequence[dict]) -> bool:
    """Whether a scene graph (a ``cirlib_meta.json`` attribute dict) meets every constraint of a query.

    Constraint vocabulary (JSON): ``has`` {kind, colour?, size?, region?, min, max?} counts matching
    objects; ``objects`` {min, max} counts all objects;
    ``background`` {colour?, pattern?}; ``relation`` {a, b, rel} needs two distinct
    objects matching a and b in that relation; ``view`` {close_up}; ``layout`` {mirrored, objects:
    [{kind, colour, x, y}]} needs that mirroring and an object of that kind/colour at each place.
    """
    for c in constraints:
        op = c["op"]
        if op == "has":
            n = count_matching(attrs, c)
            if n < c["min"] or ("max" in c and n > c["max"]):
                return False
        elif op == "background":
            bg = attrs["background"]
            if any(bg[k] != c[k] for k in ("colour", "pattern") if k in c):
                return False
        elif op == "relation":
            objs = attrs["objects"]
            if not any(
                a is not b and _matches(a, c["a"]) and _matches(b, c["b"]) and related(a, b, c["rel"])
                for a in objs
                for b in objs
            ):
                return False
        elif op == "objects":
            if not c["min"] <= len(attrs["objects"]) <= c["max"]:
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



def edited_objects(ref: dict, tgt: dict, constraints: Sequence[dict]) -> list[dict]:
    """The objects of the reference graph that a query edits (in the reference's order).

    An object counts when its change alone -- taking the target's version, or dropping it when the
    target has none -- makes true a constraint the reference fails: shown CIRR members also differ
    by incidental changes no caption speaks of, and this keeps only what the caption's predicate
    depends on. Objects are matched by id; an id whose kind *and* colour differ names two unrelated
    objects (no edit changes both), so the reference's one counts as dropped. An added object is not
    in the reference, so a pure addition (like a background or view change) gives no object.
    """
    t_objs = {o["id"]: o for o in tgt["objects"]}
    failing = [c for c in constraints if not satisfies(ref, [c])]
    edited = []
    for o in ref["objects"]:
        new = t_objs.get(o["id"])
        if new is not None and new["kind"] != o["kind"] and new["colour"] != o["colour"]:
            new = None
        if new is not None and all(new[k] == o[k] for k in ("kind", "colour", "size", "cell")):
            continue
        objects = [new if x is o else x for x in ref["objects"] if x is not o or new is not None]
        if any(satisfies({**ref, "objects": objects}, [c]) for c in failing):
            edited.append(o)
    return edited
