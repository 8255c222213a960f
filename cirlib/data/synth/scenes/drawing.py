"""Drawing scene graphs, and saving the drawings in background threads."""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cirlib.data import fashion_mnist
from cirlib.data.synth import render
from cirlib.data.synth.scenes.graph import BACKGROUNDS, SHAPE_KINDS, ZOOM

# Object side as a fraction of the grid cell: at the 64-px model input a small object spans ~15 px
# and a large one ~23 px on a 4:3 canvas, enough for its kind and colour to be read (notebook 02
# measures it).
OBJECT_SIDE = {"small": 0.62, "large": 0.98}


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
            side = max(6, round(cell * OBJECT_SIDE[o["size"]] * zoom))
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


Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in image pixels, half-open: pixel column ``i`` lies inside when ``x0 <= i < x1``."""


def object_box(attrs: dict, obj: dict) -> Box:
    """The square :class:`SceneRenderer` draws ``obj`` of scene graph ``attrs`` in, clipped to the image.

    Analyses need to know where an object is in the stored picture (the pointing game asks whether a
    heat map's peak falls on it). This repeats the renderer's arithmetic with its constants (cell
    size, :data:`OBJECT_SIDE`, the close-up :data:`ZOOM`, rounding, the mirrored view's flip);
    ``tests/test_pointing_game.py`` renders scenes to keep the two in step. The square holds the
    object's whole layer: a shape fills most of it, an item its longer side.
    """
    w, h = attrs["width"], attrs["height"]
    rows, cols = attrs["grid"]
    zoom = ZOOM if attrs["view"]["close_up"] else 1.0
    side = max(6, round(min(w / cols, h / rows) * OBJECT_SIDE[obj["size"]] * zoom))
    mirrored = attrs["view"]["mirrored"]
    x = (1.0 - obj["x"]) if mirrored else obj["x"]
    left, top = round(x * w - side / 2), round(obj["y"] * h - side / 2)
    if mirrored:  # drawn unmirrored at ``left``, then the whole canvas is flipped
        left = w - left - side
    return max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)



class ImageWriter:
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

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

