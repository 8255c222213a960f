"""clip / squarepad / targetpad transforms and their geometry (CLIP4Cir §3.3, Algorithm 1)."""

from __future__ import annotations

import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cirlib.data.preprocess import (
    KINDS,
    aspect_summary,
    build_transform,
    pad_amounts,
    pipeline_geometry,
    visible_fraction,
)

S = 32
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalisation: output = pixel / 255


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "ratio", "expected"),
    [
        ((100, 400), 1.25, (110, 0, 110, 0)),  # 400 / 1.25 = 320 wide: (320 - 100) / 2 a side
        ((400, 100), 1.25, (0, 110, 0, 110)),
        ((128, 128), 1.25, (0, 0, 0, 0)),
        ((100, 120), 1.25, (0, 0, 0, 0)),  # ratio 1.2 < 1.25: untouched
        ((128, 160), 1.25, (0, 0, 0, 0)),  # ratio exactly 1.25: 160 / 1.25 - 128 = 0
        ((1, 50), 1.25, (19, 0, 19, 0)),  # int((40 - 1) / 2) = 19
        ((100, 400), 1.0, (150, 0, 150, 0)),  # squarepad
        ((101, 400), 1.0, (149, 0, 149, 0)),  # odd remainder is dropped, as in CLIP4Cir
        ((300, 100), 2.0, (0, 25, 0, 25)),
    ],
)
def test_pad_amounts_by_hand(size, ratio, expected):
    assert pad_amounts(size, ratio) == expected


def test_padded_ratio_reaches_target_up_to_rounding():
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 600, (300, 2)):
        long, short = max(w, h), min(w, h)
        left, top, right, bottom = pad_amounts((int(w), int(h)), 1.25)
        pw, ph = w + left + right, h + top + bottom
        assert max(pw, ph) == long  # the long side is never padded
        if long / short < 1.25:
            assert (pw, ph) == (w, h)
        else:
            assert long / 1.25 - 2 < min(pw, ph) <= long / 1.25 + 1e-9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(100, 400), (400, 100), (128, 128), (1, 50), (50, 1), (7, 9)])
def test_output_shape_and_dtype(kind, size):
    out = build_transform(kind, S, MEAN, STD)(_noise(*size))
    assert out.shape == (3, S, S)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_normalisation_and_black_padding(kind):
    colour = (200, 100, 50)
    out = build_transform(kind, S, MEAN, STD)(Image.new("RGB", (100, 400), colour))
    mean, std = torch.tensor(MEAN)[:, None], torch.tensor(STD)[:, None]
    content = (torch.tensor(colour)[:, None] / 255 - mean) / std
    padding = -mean / std
    centre_col, edge_col = out[:, :, S // 2], out[:, :, 0]
    torch.testing.assert_close(centre_col, content.expand(3, S), atol=1e-5, rtol=0)
    expected_edge = content if kind == "clip" else padding
    torch.testing.assert_close(edge_col, expected_edge.expand(3, S), atol=1e-5, rtol=0)


def test_clip_kind_matches_open_clip_preprocessing():
    reference = open_clip.image_transform(S, is_train=False, mean=MEAN, std=STD)
    ours = build_transform("clip", S, MEAN, STD)
    for size in [(100, 400), (400, 100), (64, 64), (37, 53)]:
        image = _noise(*size, seed=size[0])
        torch.testing.assert_close(ours(image), reference(image))


def test_images_below_target_ratio_are_processed_like_clip():
    clip, targetpad = (build_transform(k, S, MEAN, STD) for k in ("clip", "targetpad"))
    for size in [(100, 120), (120, 100), (64, 64), (128, 160)]:
        image = _noise(*size)
        assert torch.equal(clip(image), targetpad(image))


@pytest.mark.parametrize(
    ("kind", "white_columns"),
    [("clip", S), ("squarepad", S * 100 / 400), ("targetpad", S * 100 / 320)],
)
def test_real_transform_pads_as_computed(kind, white_columns):
    """A white 100x400 image: the columns still white after padding + resize are content."""
    out = build_transform(kind, S, *RAW)(Image.new("RGB", (100, 400), "white"))
    counted = int((out[0, S // 2] > 0.5).sum())
    assert abs(counted - white_columns) <= 1
    # content is centred horizontally and spans the full height (the crop is along the long side)
    assert bool((out[0, :, S // 2] > 0.99).all())
    geometry = pipeline_geometry((100, 400), kind, S)
    assert abs(geometry.content_fraction - white_columns / S) < 1e-9


def test_geometry_matches_transform_on_random_sizes():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(8, 300, (20, 2)):
        for kind in KINDS:
            geometry = pipeline_geometry((int(w), int(h)), kind, S)
            out = build_transform(kind, S, *RAW)(Image.new("RGB", (int(w), int(h)), "white"))
            measured = float((out[0] > 0.5).float().mean())
            assert abs(measured - geometry.content_fraction) <= 2.5 / S, (w, h, kind)


@pytest.mark.parametrize(
    ("size", "kind", "expected"),
    [
        ((100, 400), "clip", 0.25),  # 100x100 of 100x400 survives the centre crop
        ((100, 400), "squarepad", 1.0),
        ((100, 400), "targetpad", 0.8),  # 320x400 padded: crop keeps 320 of 400 rows
        ((400, 100), "clip", 0.25),
        ((400, 100), "targetpad", 0.8),
        ((128, 128), "clip", 1.0),
        ((128, 160), "clip", 0.8),
        ((128, 160), "targetpad", 0.8),  # at the target ratio: no padding, same loss as clip
        ((128, 160), "squarepad", 1.0),
        ((1, 50), "clip", 0.02),
        ((1, 50), "squarepad", 49 / 50),  # int(49 / 2) = 24 a side: 49x50
        ((1, 50), "targetpad", 39 / 50),  # 19 a side: 39x50
    ],
)
def test_visible_fraction_by_hand(size, kind, expected):
    assert visible_fraction(size, kind, 1.25, image_size=224) == pytest.approx(expected, abs=1 / 224)


def test_visible_region_is_centred():
    geometry = pipeline_geometry((100, 400), "targetpad", 224)
    assert geometry.padded_size == (320, 400)
    assert geometry.resized_size == (224, 280)
    assert geometry.visible_box == pytest.approx((0.0, 40.0, 100.0, 360.0))


def test_targetpad_never_loses_more_than_clip():
    rng = np.random.default_rng(2)
    for w, h in rng.integers(1, 800, (500, 2)):
        size = (int(w), int(h))
        clip, square, target = (visible_fraction(size, k) for k in ("clip", "squarepad", "targetpad"))
        assert clip <= target + 1e-9 and target <= square + 1e-9, size
        assert target >= 1 / 1.25 - 2 / min(size) - 1 / 224, size


def test_alpha_is_composited_on_white_and_padding_stays_black():
    rgba = Image.new("RGBA", (20, 80), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (5, 30, 15, 50))  # opaque blue square
    out = build_transform("squarepad", S, *RAW)(rgba)  # 80x80 padded: x in [30, 50) is content
    torch.testing.assert_close(out[:, S // 2, 0], torch.zeros(3))  # padding: black
    torch.testing.assert_close(out[:, 2, S // 2], torch.ones(3))  # transparent content: white
    torch.testing.assert_close(out[:, S // 2, S // 2], torch.tensor([0.0, 0.0, 1.0]))  # opaque: blue


def test_palette_and_greyscale_images():
    palette = Image.new("P", (20, 80), 0)
    palette.putpalette([255, 0, 0] + [0, 255, 0] * 255)  # entry 0 is red, as content
    out = build_transform("squarepad", S, *RAW)(palette)
    torch.testing.assert_close(out[:, S // 2, S // 2], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[:, S // 2, 0], torch.zeros(3))  # padding is black, not entry 0

    transparent = palette.copy()
    transparent.info["transparency"] = 0
    torch.testing.assert_close(build_transform("clip", S, *RAW)(transparent)[:, 5, 5], torch.ones(3))

    for mode in ("L", "LA", "1"):
        out = build_transform("targetpad", S, *RAW)(Image.new(mode, (30, 90), 255))
        assert out.shape == (3, S, S)
        torch.testing.assert_close(out[:, S // 2, S // 2], torch.ones(3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("letterbox", S, MEAN, STD)
    with pytest.raises(ValueError, match="target_ratio"):
        build_transform("targetpad", S, MEAN, STD, target_ratio=0.8)
    with pytest.raises(ValueError, match="positive"):
        pad_amounts((0, 10), 1.25)


def test_transforms_pickle_for_dataloader_workers():
    transform = build_transform("targetpad", S, MEAN, STD)
    image = _noise(60, 150)
    assert torch.equal(pickle.loads(pickle.dumps(transform))(image), transform(image))


def test_aspect_summary_by_hand():
    """w/h 0.5, 1.0, 2.0 at target 1.25: targetpad pads the two skewed images (2 of 3), keeps 80 % of each
    (1000 / 1.25 = 800 of the long side) and all of the square one; centre crop keeps half of each skewed one."""
    summary = aspect_summary([0.5, 1.0, 2.0], target_ratio=1.25, image_size=224)
    assert summary["images"] == 3 and summary["median w/h"] == pytest.approx(1.0)
    assert summary["targetpad pads %"] == pytest.approx(200 / 3)
    assert summary["clip keeps %"] == pytest.approx(100 * (0.5 + 1.0 + 0.5) / 3)
    assert summary["squarepad keeps %"] == pytest.approx(100.0)
    assert summary["targetpad keeps %"] == pytest.approx(100 * (0.8 + 1.0 + 0.8) / 3)
    near_square = aspect_summary([0.85, 1.1], kinds=("clip", "targetpad"))  # below 1.25: no padding
    assert near_square["targetpad pads %"] == 0.0 and near_square["targetpad keeps %"] == near_square["clip keeps %"]
    assert set(near_square) == {"images", "median w/h", "targetpad pads %", "clip keeps %", "targetpad keeps %"}
    with pytest.raises(ValueError, match="aspect ratios"):
        aspect_summary([])
    with pytest.raises(ValueError, match="unknown transform kind"):
        aspect_summary([1.0], kinds=("crop",))
