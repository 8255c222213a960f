"""Random scenes and random edits of them whose difference a caption can say."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cirlib.data.synth.scenes.captions import Change, Style, describe_change, name_object
from cirlib.data.synth.scenes.config import ScenesBenchConfig
from cirlib.data.synth.scenes.graph import (
    ASPECT_RATIOS,
    BACKGROUND_PATTERNS,
    BACKGROUNDS,
    JITTER,
    KINDS,
    OBJECT_COLOURS,
    SIZES,
    Scene,
    SceneObject,
    is_valid,
)


@dataclass(frozen=True)
class Edit:
    """One graph edit: add / remove / recolour / replace / resize / move / item / background / view."""

    op: str
    obj: int = -1
    value: Any = None


def apply_edit(scene: Scene, e: Edit) -> Scene | None:
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


class Sampler:
    """Draws scenes and edits from one Fashion-MNIST pool with one random stream."""

    EDIT_WEIGHTS = {"add": 0.2, "remove": 0.12, "recolour": 0.17, "replace": 0.1, "resize": 0.11,
                    "move": 0.12, "background": 0.1, "view": 0.08}

    def __init__(self, rng: np.random.Generator, pools: dict[str, np.ndarray], fmnist: str, config: ScenesBenchConfig,
                 edit_weights: dict[str, float] | None = None):
        self.rng, self.pools, self.fmnist, self.cfg = rng, pools, fmnist, config
        self.edit_weights = edit_weights or self.EDIT_WEIGHTS

    def choice(self, options: Sequence[Any]) -> Any:
        """One of ``options``, uniformly."""
        return options[int(self.rng.integers(len(options)))]

    def jitter(self) -> tuple[float, float]:
        """A random offset of an object centre within its cell."""
        return tuple(round(float(v), 3) for v in self.rng.uniform(-JITTER, JITTER, 2))

    def item(self, kind: str) -> int | None:
        """A Fashion-MNIST index of that kind (None for shapes)."""
        return int(self.choice(self.pools[kind])) if kind in self.pools else None

    def new_object(self, scene_bg: str, oid: int, cell: tuple[int, int], kind: str | None = None) -> SceneObject:
        """A random object (of ``kind`` when given) in ``cell``, in a colour that shows on the background."""
        kind = kind or self.choice(KINDS)
        colour = self.choice([c for c in OBJECT_COLOURS if c != BACKGROUNDS[scene_bg]])
        return SceneObject(oid, kind, colour, self.choice(SIZES), cell, self.jitter(), self.item(kind))

    def scene(self, split: str) -> Scene:
        """A random scene: canvas ratio, background, 1-4 objects in distinct grid cells."""
        ratio = ASPECT_RATIOS[int(self.rng.integers(len(ASPECT_RATIOS)))]
        long = self.cfg.long_side
        if ratio[0] >= ratio[1]:
            w, h = long, round(long * ratio[1] / ratio[0])
        else:
            w, h = round(long * ratio[0] / ratio[1]), long
        grid = (2, 3) if w >= 1.4 * h else (3, 2) if h >= 1.4 * w else (2, 2)  # cells as square as the canvas allows
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
        ops = list(self.edit_weights)
        p = np.array([self.edit_weights[o] for o in ops])
        for op in self.rng.choice(ops, len(ops), replace=False, p=p / p.sum()):
            e = getattr(self, "_" + str(op))(scene, busy)
            if e is not None:
                return e
        return None

    def _pointable(self, scene: Scene, busy: set[str]) -> list[SceneObject]:
        """Objects a caption can name unambiguously, of kinds no earlier edit touched."""
        by_id = {o["id"]: o for o in scene.attrs["objects"]}
        return [o for o in scene.objects if o.kind not in busy and name_object(scene.attrs, by_id[o.id]) is not None]

    def _add(self, scene: Scene, busy: set[str]) -> Edit | None:
        free = scene.free_cells()
        if len(scene.objects) >= self.cfg.max_objects or not free:
            return None
        present = {o.kind for o in scene.objects}
        counted = sorted(k for k in present - busy)
        if counted and self.rng.random() < 0.5:  # another object of a kind already there: cardinality
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
        """What an edit changes (kinds, "background", "layout"): a second edit must leave it alone."""
        if e.op == "background":
            return {"background"}
        if e.op in ("view", "move"):
            return {"layout"} | ({scene.object(e.obj).kind} if e.op == "move" else set())
        if e.op == "add":
            return {e.value.kind}
        kinds = {scene.object(e.obj).kind}
        return kinds | {e.value[0]} if e.op == "replace" else kinds

    def mutate(self, scene: Scene, p_two: float, attempts: int = 60, style: Style = "cirr"
               ) -> tuple[Scene, list[Edit], Change] | None:
        """1-2 edits of ``scene`` whose difference is sayable (in ``style``); None if ``attempts`` draws all fail."""
        for _ in range(attempts):
            n = 2 if self.rng.random() < p_two else 1
            cur, edits, busy = scene, [], set()
            for _ in range(n):
                e = self.edit(cur, busy)
                if e is None:
                    break
                busy |= self.touched(cur, e)
                nxt = apply_edit(cur, e)
                if nxt is None:
                    break
                cur = nxt
                edits.append(e)
            if not edits or not is_valid(cur):
                continue
            change = describe_change(scene.attrs, cur.attrs, self.rng, style)
            if change is not None:
                return cur, edits, change
        return None

    def nuisance(self, scene: Scene, changes: int | None = None) -> Scene:
        """The same content with ``changes`` (default 1-3) incidental changes (item instance, place,
        size, background, extras)."""
        cur = scene
        for _ in range(changes or int(self.rng.integers(1, 4))):
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
            nxt = apply_edit(cur, e) if e is not None else None
            if nxt is not None and is_valid(nxt):
                cur = nxt
        return cur

