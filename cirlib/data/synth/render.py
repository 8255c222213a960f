"""Attribute vocabulary and rendering shared by the embedded benchmarks.

A Fashion-MNIST item (28x28 greyscale product photo) becomes a coloured, patterned, optionally
printed garment: its silhouette is upscaled and smoothed, the texture is multiplied by the item's
own (normalised) luminance so folds and seams survive and it still reads as a product photo, and
a small print sits on the chest. Everything is plain numpy + PIL on small arrays (well under 2 ms
for a 128-px image) and deterministic: the only randomness is the texture phase, drawn from
``seed``.

``item_layer``/``paste_layer`` are the building blocks the ``scenes`` benchmark composes onto its
own backgrounds; ``render_item`` is the product-photo rendering of the ``fashion`` benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Size = tuple[int, int]  # (width, height), PIL order
RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "black": (28, 28, 30),
    "grey": (135, 135, 140),
    "red": (205, 32, 40),
    "orange": (245, 135, 25),
    "yellow": (245, 215, 45),
    "green": (40, 145, 65),
    "sky blue": (95, 180, 235),
    "navy blue": (25, 40, 115),
    "purple": (125, 50, 155),
    "pink": (245, 135, 185),
}
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks", "zigzag", "diamonds")
# Adjectives for captions: "a red striped dress", "make it polka-dot".
PATTERN_ADJECTIVES: dict[str, str] = {
    "plain": "plain",
    "stripes": "striped",
    "dots": "polka-dot",
    "checks": "checked",
    "zigzag": "zigzag",
    "diamonds": "diamond-patterned",
}
LOGOS: tuple[str, ...] = ("none", "star", "heart", "circle", "triangle")

_SOFT_EDGE_PX = 1.2  # width of the anti-aliased silhouette edge
_DARK_LUMINANCE = 140.0  # below this a colour gets light motifs and prints, above it dark ones


def _check(name: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(allowed)}")


def luminance(rgb: RGB) -> float:
    """Perceived brightness (ITU-R 601 weights), 0..255."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def motif_colour(colour: str) -> np.ndarray:
    """Second colour of a pattern: a pale tint on dark colours, a deep shade on light ones."""
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    return base + 0.8 * (255.0 - base) if luminance(COLOURS[colour]) < _DARK_LUMINANCE else 0.35 * base


def print_colour(colour: str) -> np.ndarray:
    """Colour of a chest print: white on dark garments, near-black on light ones."""
    light = luminance(COLOURS[colour]) < _DARK_LUMINANCE
    return np.asarray((250, 250, 250) if light else (25, 25, 25), dtype=np.float32)


# ----------------------------------------------------------------------------------------- masks
def _smooth(a: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (edge-replicated): rounds the 28-px staircase, removes fine print."""
    for _ in range(passes):
        p = np.pad(a, 1, mode="edge")
        a = 0.25 * p[:-2, 1:-1] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[2:, 1:-1]
        p = np.pad(a, 1, mode="edge")
        a = 0.25 * p[1:-1, :-2] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[1:-1, 2:]
    return a


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Set every pixel not connected to the border through background pixels (dark garment parts)."""
    border = np.zeros_like(mask)
    border[[0, -1], :] = border[:, [0, -1]] = True
    outside = border & ~mask
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


@functools.lru_cache(maxsize=4096)
def _fit(item_bytes: bytes, size: Size, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and shading of the item fitted (aspect kept) and centred in ``size``; cached per item."""
    item = np.frombuffer(item_bytes, dtype=np.uint8).reshape(28, 28).astype(np.float32)
    # a few product photos sit on a grey card rather than black: measured at the border, it is
    # background, not garment (else it renders as a visible box around the item)
    floor = float(np.median(np.concatenate([item[0], item[-1], item[:, 0], item[:, -1]])))
    cover = np.clip((item - floor) / 48.0, 0.0, 1.0)
    solid = _fill_holes(cover >= 0.5)
    cover = _smooth(np.where(solid, 1.0, cover))
    rows, cols = np.nonzero(cover > 0.1)
    if rows.size == 0:
        raise ValueError("item image is empty (all pixels are background)")
    # one pixel of background around the bounding box so the upscaled edge fades to zero
    y0, y1, x0, x1 = rows.min() - 1, rows.max() + 2, cols.min() - 1, cols.max() + 2
    pad = 1
    cover = np.pad(cover, pad)
    lum = np.pad(_smooth(item, passes=2), pad)
    box = (x0 + pad, y0 + pad, x1 + pad, y1 + pad)
    w, h = size
    scale = min(w * (1 - 2 * margin) / (x1 - x0), h * (1 - 2 * margin) / (y1 - y0))
    bw, bh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    up_cover = np.asarray(Image.fromarray(cover).resize((bw, bh), Image.BICUBIC, box=box))
    up_lum = np.asarray(Image.fromarray(lum).resize((bw, bh), Image.BICUBIC, box=box))
    # bicubic interpolation rounds the 28-px staircase; a steep ramp around 0.5 gives a crisp,
    # anti-aliased outline
    alpha = np.clip((up_cover - 0.5) * scale / _SOFT_EDGE_PX + 0.5, 0.0, 1.0)
    ox, oy = (w - bw) // 2, (h - bh) // 2
    # shading: luminance over its median inside the item, so dark and light products both keep
    # their new colour; the range is compressed so the named colour stays recognisable
    inside = alpha > 0.5
    median = float(np.median(up_lum[inside])) if inside.any() else 1.0
    shade = np.clip(1.0 + 0.35 * (up_lum / max(median, 1.0) - 1.0), 0.5, 1.15)
    full_alpha = np.zeros((h, w), np.float32)
    full_shade = np.ones((h, w), np.float32)
    full_alpha[oy : oy + bh, ox : ox + bw] = alpha
    full_shade[oy : oy + bh, ox : ox + bw] = shade
    full_alpha.setflags(write=False)
    full_shade.setflags(write=False)
    return full_alpha, full_shade


def _fit_item(item28: np.ndarray, size: Size, margin: float) -> tuple[np.ndarray, np.ndarray]:
    item28 = np.asarray(item28)
    if item28.shape != (28, 28):
        raise ValueError(f"expected a 28x28 Fashion-MNIST item, got shape {item28.shape}")
    w, h = int(size[0]), int(size[1])
    if w < 4 or h < 4:
        raise ValueError(f"canvas size must be at least 4x4 pixels, got {size}")
    return _fit(np.ascontiguousarray(item28, dtype=np.uint8).tobytes(), (w, h), float(margin))


# -------------------------------------------------------------------------------------- textures
def _band(coord: np.ndarray, period: float, duty: float) -> np.ndarray:
    """Anti-aliased coverage of bands of width ``duty * period`` repeating every ``period`` px."""
    dist = np.abs((coord / period) % 1.0 - 0.5) * period
    return np.clip(duty * period / 2 - dist + 0.5, 0.0, 1.0)


def _motif_coverage(pattern: str, w: int, h: int, period: float, phase: tuple[float, float]) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x += phase[0]
    y += phase[1]
    if pattern == "stripes":
        return _band(y, period, 0.42)
    if pattern == "checks":  # gingham: two crossing semi-transparent bands
        return 0.5 * (_band(x, period, 0.5) + _band(y, period, 0.5))
    if pattern == "zigzag":
        tri = np.abs((x / period) % 1.0 - 0.5) * 2.0  # triangle wave in [0, 1]
        return _band(y + 0.5 * period * tri, period, 0.35)
    if pattern == "dots":  # staggered polka dots
        row = np.floor(y / period)
        fx = (x / period + 0.5 * (row % 2)) % 1.0 - 0.5
        fy = (y / period) % 1.0 - 0.5
        dist = np.sqrt(fx * fx + fy * fy) * period
        return np.clip(0.28 * period - dist + 0.5, 0.0, 1.0)
    if pattern == "diamonds":
        fx = np.abs((x / period) % 1.0 - 0.5)
        fy = np.abs((y / period) % 1.0 - 0.5)
        return np.clip((0.3 - (fx + fy)) * period / np.sqrt(2.0) + 0.5, 0.0, 1.0)
    return np.zeros((h, w), np.float32)


def default_period(size: Size) -> float:
    """Pattern repeat in pixels: about a tenth of the long side, so it survives downscaling to 64 px."""
    return max(5.0, 0.1 * max(size))


def texture(
    pattern: str,
    colour: str,
    size: Size,
    period: float | None = None,
    phase: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Fabric ``float32 [H, W, 3]`` (0..255): ``colour`` with the pattern's motifs in ``motif_colour``."""
    _check("pattern", pattern, PATTERNS)
    _check("colour", colour, COLOURS)
    w, h = int(size[0]), int(size[1])
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    out = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if pattern == "plain":
        return out
    cov = _motif_coverage(pattern, w, h, period or default_period(size), phase)[..., None]
    return out * (1.0 - cov) + motif_colour(colour) * cov


# ----------------------------------------------------------------------------------------- prints
def _logo_polygon(logo: str) -> list[tuple[float, float]]:
    """Outline in the unit square (y down)."""
    if logo == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        return list(zip(0.5 + rad * np.cos(ang), 0.53 + rad * np.sin(ang)))
    if logo == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return list(zip(0.5 + hx / 34.0, 0.45 - hy / 34.0))
    if logo == "triangle":
        return [(0.5, 0.05), (0.97, 0.9), (0.03, 0.9)]
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # circle
    return list(zip(0.5 + 0.45 * np.cos(t), 0.5 + 0.45 * np.sin(t)))


@functools.lru_cache(maxsize=256)
def logo_mask(logo: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape, outline) coverage masks ``float32 [side, side]`` of a print, drawn 4x supersampled."""
    _check("logo", logo, LOGOS)
    if logo == "none":
        raise ValueError("the 'none' logo has no mask")
    big = 4 * side
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).polygon([(x * big, y * big) for x, y in _logo_polygon(logo)], fill=255)
    halo = img.filter(ImageFilter.MaxFilter(2 * (big // 16) + 1))
    shape = np.asarray(img.resize((side, side), Image.BOX), np.float32) / 255.0
    outline = np.asarray(halo.resize((side, side), Image.BOX), np.float32) / 255.0
    shape.setflags(write=False)
    outline.setflags(write=False)
    return shape, outline


def _chest_box(alpha: np.ndarray) -> tuple[int, int, int]:
    """(x, y, side) of the print: horizontally centred on the item, about a third of the way down."""
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    cols = np.nonzero(alpha.max(axis=0) > 0.5)[0]
    top, height = rows[0], rows[-1] - rows[0] + 1
    left, width = cols[0], cols[-1] - cols[0] + 1
    side = max(4, int(min(0.26 * width, 0.2 * height)))
    cx, cy = left + width / 2, top + 0.3 * height
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side


# ------------------------------------------------------------------------------------- rendering
def item_layer(
    item28: np.ndarray,
    size: Size,
    colour: str,
    pattern: str = "plain",
    logo: str | None = None,
    seed: int | None = None,
    margin: float = 0.0,
    period: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A shaded, textured garment as (rgb ``float32 [H, W, 3]``, alpha ``float32 [H, W]``) for ``size``.

    ``seed`` only moves the pattern phase (None: phase 0), so renderings of one attribute
    combination differ slightly across images yet are reproducible.
    """
    logo = "none" if logo is None else logo
    _check("logo", logo, LOGOS)
    alpha, shading = _fit_item(item28, size, margin)
    h, w = alpha.shape
    per = period or default_period(size)
    phase = (0.0, 0.0) if seed is None else tuple(np.random.default_rng(seed).uniform(0.0, per, 2))
    fabric = texture(pattern, colour, (w, h), per, phase)
    if logo != "none":
        x, y, side = _chest_box(alpha)
        shape, outline = logo_mask(logo, side)
        base = np.asarray(COLOURS[colour], np.float32)
        paste_layer(fabric, np.broadcast_to(base, (side, side, 3)), outline, (x, y))
        paste_layer(fabric, np.broadcast_to(print_colour(colour), (side, side, 3)), shape, (x, y))
    rgb = fabric * shading[..., None]
    return np.clip(rgb, 0.0, 255.0), alpha


def paste_layer(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, xy: tuple[int, int]) -> np.ndarray:
    """Alpha-blend ``rgb``/``alpha`` into the float ``canvas [H, W, 3]`` in place at top-left ``xy`` (clipped)."""
    x, y = xy
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if cx0 >= cx1 or cy0 >= cy1:
        return canvas
    a = alpha[cy0 - y : cy1 - y, cx0 - x : cx1 - x, None]
    src = rgb[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
    region = canvas[cy0:cy1, cx0:cx1]
    region *= 1.0 - a
    region += a * src
    return canvas


def render_item(
    item28: np.ndarray,
    size: Size,
    colour: str,
    pattern: str = "plain",
    logo: str | None = None,
    background: RGB = (255, 255, 255),
    seed: int | None = None,
    margin: float = 0.06,
) -> Image.Image:
    """Product photo of the item on a ``size`` = (w, h) canvas: centred, ``background`` around it."""
    rgb, alpha = item_layer(item28, size, colour, pattern, logo, seed, margin)
    canvas = np.empty_like(rgb)
    canvas[:] = np.asarray(background, np.float32)
    paste_layer(canvas, rgb, alpha, (0, 0))
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
