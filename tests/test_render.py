"""Garment rendering: geometry, colour fidelity, pattern distinctness, determinism, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from cirlib.data.synth import render


@pytest.fixture(scope="module")
def tee() -> np.ndarray:
    """A synthetic 28x28 T-shirt: body, sleeves, a dark hole-like panel inside, soft shading."""
    item = np.zeros((28, 28), np.uint8)
    item[6:26, 8:20] = 180  # body
    item[6:12, 3:25] = 180  # sleeves
    item[14:18, 12:16] = 10  # a dark patch inside the silhouette must not become a hole
    item[6:26, 8:14] += 40  # a lighter left half: shading to keep
    return item


def test_size_mode_and_background(tee: np.ndarray) -> None:
    img = render.render_item(tee, (90, 128), "red", "plain", background=(255, 255, 255))
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (90, 128)
    arr = np.asarray(img)
    # the item is centred inside the 6 % margin: border rows/cols are untouched background
    m = int(0.06 * 128) - 1
    for border in (arr[:m], arr[-m:], arr[:, : int(0.06 * 90) - 1], arr[:, -int(0.06 * 90) + 1 :]):
        assert (border == 255).all()
    assert (arr[:, :5] == 255).all()
    grey = np.asarray(render.render_item(tee, (40, 40), "red", background=(10, 20, 30)))
    assert tuple(grey[0, 0]) == (10, 20, 30)


def _alpha(item28: np.ndarray, size: tuple[int, int], margin: float = 0.0) -> np.ndarray:
    """The item's silhouette as the renderers use it: the alpha of :func:`render.item_layer`."""
    return render.item_layer(item28, size, "grey", margin=margin)[1]


def test_mask_fits_item_aspect(tee: np.ndarray) -> None:
    mask = _alpha(tee, (200, 100))
    assert mask.shape == (100, 200) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() == 1.0
    rows = np.nonzero(mask.max(axis=1) > 0.5)[0]
    cols = np.nonzero(mask.max(axis=0) > 0.5)[0]
    # the tee is 22 wide x 20 tall: on a wide canvas it fills the height (less the one-pixel
    # fade-out border kept around the 28-px box), keeps its aspect and is centred
    assert rows[-1] - rows[0] + 1 > 80
    width = cols[-1] - cols[0] + 1
    assert 0.9 < width / (rows[-1] - rows[0] + 1) < 1.3
    assert abs((cols[0] + cols[-1]) / 2 - 99.5) < 3
    # the dark patch inside the body is filled, not a hole
    y, x = int(rows[0] + (16 - 6 + 0.5) / 21 * len(rows)), int(cols[0] + (14 - 3 + 0.5) / 23 * width)
    assert mask[y, x] == 1.0


def test_plain_colour_matches_name(tee: np.ndarray) -> None:
    for name, rgb in render.COLOURS.items():
        arr = np.asarray(render.render_item(tee, (128, 128), name, "plain")).astype(float)
        inside = _alpha(tee, (128, 128), margin=0.06) > 0.99
        median = np.median(arr[inside], axis=0)
        assert np.abs(median - rgb).max() <= 12, name
        nearest = min(render.COLOURS, key=lambda c: np.sum((np.asarray(render.COLOURS[c]) - median) ** 2))
        assert nearest == name


def test_shading_is_kept(tee: np.ndarray) -> None:
    """The lighter half of the source item stays lighter once coloured."""
    arr = np.asarray(render.render_item(tee, (128, 128), "green", "plain", margin=0.0)).astype(float)
    mask = _alpha(tee, (128, 128))
    cols = np.nonzero(mask.max(axis=0) > 0.5)[0]
    row = int(0.75 * 128)
    left = arr[row, cols[0] + int(0.3 * len(cols)), 1]
    right = arr[row, cols[0] + int(0.6 * len(cols)), 1]
    assert left > right + 5  # compressed, so the named colour stays recognisable


def test_patterns_differ(tee: np.ndarray) -> None:
    imgs = {p: np.asarray(render.render_item(tee, (96, 128), "navy blue", p)).astype(float) for p in render.PATTERNS}
    for i, a in enumerate(render.PATTERNS):
        for b in render.PATTERNS[i + 1 :]:
            assert np.abs(imgs[a] - imgs[b]).mean() > 3, (a, b)
    inside = _alpha(tee, (96, 128), margin=0.06) > 0.99
    assert imgs["plain"][inside].std(axis=0).max() < 10 < imgs["stripes"][inside].std(axis=0).max()


def test_texture_values() -> None:
    plain = render.texture("plain", "red", (10, 6))
    assert plain.shape == (6, 10, 3) and np.allclose(plain, render.COLOURS["red"])
    stripes = render.texture("stripes", "navy blue", (20, 40), period=10.0)
    tint = render.motif_colour("navy blue")
    # horizontal bands: constant along x, period 10 along y, motif at band centres (y = 5, 15, ...)
    assert np.allclose(stripes[:, 0], stripes[:, 13])
    assert np.allclose(stripes[5, 0], tint) and np.allclose(stripes[0, 0], render.COLOURS["navy blue"])
    assert np.allclose(stripes[5], stripes[15]) and np.allclose(stripes[5], stripes[35])
    assert tint.min() > 180  # dark colours get pale motifs, light colours dark ones
    assert render.motif_colour("yellow").max() < 100
    with pytest.raises(ValueError, match="pattern 'tartan'"):
        render.texture("tartan", "red", (8, 8))


def test_logo_changes_chest_only(tee: np.ndarray) -> None:
    plain = np.asarray(render.render_item(tee, (128, 128), "red")).astype(float)
    starred = np.asarray(render.render_item(tee, (128, 128), "red", logo="star")).astype(float)
    assert np.array_equal(plain, np.asarray(render.render_item(tee, (128, 128), "red", logo="none")))
    diff = np.abs(starred - plain).sum(axis=2) > 30
    ys, xs = np.nonzero(diff)
    assert 20 < len(ys) < 0.1 * 128 * 128
    assert abs(xs.mean() - 64) < 6 and ys.mean() < 64  # centred, upper half
    assert (starred[diff] > 230).all(axis=1).mean() > 0.5  # white print on a dark-ish red
    shapes = [render.logo_mask(logo, 24)[0] for logo in render.LOGOS[1:]]
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            assert np.abs(shapes[i] - shapes[j]).mean() > 0.05
    with pytest.raises(ValueError, match="logo 'skull'"):
        render.render_item(tee, (64, 64), "red", logo="skull")


def test_deterministic_and_seeded(tee: np.ndarray) -> None:
    a = np.asarray(render.render_item(tee, (80, 128), "pink", "dots", "heart", seed=3))
    b = np.asarray(render.render_item(tee, (80, 128), "pink", "dots", "heart", seed=3))
    c = np.asarray(render.render_item(tee, (80, 128), "pink", "dots", "heart", seed=4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_paste_layer_clips_and_blends() -> None:
    canvas = np.zeros((4, 4, 3), np.float32)
    rgb = np.full((3, 3, 3), 100.0, np.float32)
    alpha = np.array([[1.0, 0.5, 0.0]] * 3, np.float32)
    render.paste_layer(canvas, rgb, alpha, (2, -1))  # hangs off the right and the top
    assert canvas[0, 2, 0] == 100.0 and canvas[0, 3, 0] == 50.0 and canvas[1, 2, 0] == 100.0
    assert canvas[2, 2, 0] == 0.0 and canvas[:, :2].sum() == 0.0
    render.paste_layer(canvas, rgb, alpha, (10, 10))  # fully outside: no-op
    assert canvas.sum() == 3 * (100 * 2 + 50 * 2)


def test_bad_item_shape_and_empty_item() -> None:
    with pytest.raises(ValueError, match="28x28"):
        _alpha(np.zeros((32, 32), np.uint8), (64, 64))
    with pytest.raises(ValueError, match="empty"):
        _alpha(np.zeros((28, 28), np.uint8), (64, 64))


def test_speed(tee: np.ndarray) -> None:
    """Generation renders tens of thousands of images: aim at about 2 ms each (loose bound for CI)."""
    items = [np.roll(tee, k, axis=1) for k in range(20)]
    start = time.perf_counter()
    for k in range(100):
        render.render_item(items[k % 20], (96, 128), "orange", render.PATTERNS[k % 6], render.LOGOS[k % 5], seed=k)
    assert (time.perf_counter() - start) / 100 < 0.01
