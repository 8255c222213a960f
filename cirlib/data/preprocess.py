"""Image preprocessing pipelines compared in CLIP4Cir §3.3: ``clip``, ``squarepad`` and ``targetpad``.

CLIP's own pipeline (resize the shorter side, centre-crop a square) throws away the ends of tall or
wide images. ``squarepad`` zero-pads every image to a square first, losing nothing but shrinking
the content. ``targetpad`` (CLIP4Cir Algorithm 1) sits in between: it pads only images whose aspect
ratio ``max(w, h) / min(w, h)`` reaches ``target_ratio``, and only up to that ratio, so the crop
keeps about ``1 / target_ratio`` of the long side of very skewed images and everything of
near-square ones.

Padding follows Algorithm 1 to the pixel: the shorter side gets ``int((max(w, h) / target_ratio -
short) / 2)`` black pixels on each side, so the padded ratio equals ``target_ratio`` up to the one
pixel lost by rounding down. ``squarepad`` is the same rule with ``target_ratio = 1``.

``pipeline_geometry`` reproduces the integer arithmetic of the transforms (padding, torchvision's
resize and centre-crop rounding) so figures can draw the surviving region on the original image and
analyses can report how much of each image a pipeline keeps.

Padding holds the padded image in memory, whose area grows with the square of the long side. The
pipelines therefore refuse, before any padding, images beyond :data:`cirlib.data.datasets.MAX_ASPECT_RATIO`
or ``PIL.Image.MAX_IMAGE_PIXELS`` (the checks of :func:`cirlib.data.datasets.open_image`), and padding
that would make an image larger than ``PIL.Image.MAX_IMAGE_PIXELS``. Resizing before padding would
bound the memory too, but bicubic resampling next to the black border gives other pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import _compute_resized_output_size

from cirlib.data.datasets import ImageLoadError, check_image_size, to_rgb

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

TransformKind = Literal["clip", "squarepad", "targetpad"]
KINDS: tuple[TransformKind, ...] = ("clip", "squarepad", "targetpad")
DEFAULT_TARGET_RATIO = 1.25  # CLIP4Cir §4.1

def _check_kind(kind: str, target_ratio: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    if not target_ratio >= 1.0:
        raise ValueError(f"target_ratio must be >= 1 (max side / min side), got {target_ratio}")


def pad_amounts(size: tuple[int, int], target_ratio: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) zero padding of CLIP4Cir Algorithm 1 for an image of ``size = (w, h)``.

    Images whose aspect ratio is below ``target_ratio`` are left alone; others get their shorter
    side padded symmetrically towards ``max(w, h) / target_ratio``. ``target_ratio = 1`` is square
    padding.
    """
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {size}")
    if max(w, h) / min(w, h) < target_ratio:
        return (0, 0, 0, 0)
    scaled_max = max(w, h) / target_ratio
    hp = max(int((scaled_max - w) / 2), 0)
    vp = max(int((scaled_max - h) / 2), 0)
    return (hp, vp, hp, vp)


def kind_ratio(kind: TransformKind, target_ratio: float = DEFAULT_TARGET_RATIO) -> float | None:
    """The padding ratio a kind uses: None for ``clip`` (no padding), 1 for ``squarepad``."""
    _check_kind(kind, target_ratio)
    return {"clip": None, "squarepad": 1.0, "targetpad": float(target_ratio)}[kind]


class TargetPad:
    """Zero-pad a PIL image per CLIP4Cir Algorithm 1 (``target_ratio=1`` gives SquarePad)."""

    def __init__(self, target_ratio: float) -> None:
        self.target_ratio = float(target_ratio)

    def __call__(self, image: Image.Image) -> Image.Image:
        padding = pad_amounts(image.size, self.target_ratio)
        if not any(padding):
            return image
        w, h = image.size
        pw, ph = w + padding[0] + padding[2], h + padding[1] + padding[3]
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and pw * ph > limit:
            raise ImageLoadError(
                f"{_describe(image)}: refusing to pad a {w}x{h} image to {pw}x{ph} ({pw * ph} pixels, more "
                f"than PIL.Image.MAX_IMAGE_PIXELS = {limit})"
            )
        return TF.pad(image, list(padding), fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_ratio={self.target_ratio})"


def _describe(image: Image.Image) -> str:
    """The image's file when PIL knows it, else its mode and size (for error messages)."""
    return getattr(image, "filename", "") or f"a {image.mode} image of {image.size[0]}x{image.size[1]}"


class ToRGB:
    """RGB conversion with :func:`cirlib.data.datasets.open_image`'s rules, for images not loaded by it.

    It also applies open_image's size limits, so a pipeline fed images from elsewhere cannot be
    made to pad a 20000x1 image. Transparent pixels become white, 16-bit greyscale is rescaled.
    Converting *before* padding matters: padding a palette image with 0 would paint palette entry
    0 (any colour), and RGBA padding would be transparent, i.e. white after compositing, instead
    of CLIP4Cir's black.
    (A class rather than a function so DataLoader workers can pickle it.)
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        check_image_size(image.size, _describe(image))
        if image.mode == "RGB" and "transparency" not in image.info:
            return image  # already converted by open_image: skip a copy
        return to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_transform(
    kind: TransformKind,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode, any size) -> normalised float tensor ``[3, image_size, image_size]``.

    ``clip`` matches open_clip's evaluation preprocessing (bicubic shorter-side resize, centre crop);
    the pad kinds insert the padding step in front of it, exactly where CLIP4Cir puts it.
    """
    ratio = kind_ratio(kind, target_ratio)
    steps: list[Callable] = [ToRGB()]
    if ratio is not None:
        steps.append(TargetPad(ratio))
    steps += [
        Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(image_size),
        ToTensor(),
        Normalize(mean=tuple(mean), std=tuple(std)),
    ]
    return Compose(steps)


def transform_for(
    backbone: "Backbone", kind: TransformKind = "targetpad", target_ratio: float = DEFAULT_TARGET_RATIO
) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`build_transform` with the backbone's input size and normalisation statistics."""
    return build_transform(kind, backbone.image_size, backbone.mean, backbone.std, target_ratio)


@dataclass(frozen=True)
class PipelineGeometry:
    """Where an image of a given size goes through a pipeline (all in pixels, ``(x, y)`` order).

    ``visible_box`` is the region of the *original* image that survives into the final crop, as
    float ``(left, top, right, bottom)``; ``crop_box`` is the same crop in padded-image coordinates
    (it can extend over the padding).
    """

    size: tuple[int, int]
    padding: tuple[int, int, int, int]
    padded_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    visible_box: tuple[float, float, float, float]

    @property
    def visible_fraction(self) -> float:
        """Share of the original image's area present in the encoder input."""
        left, top, right, bottom = self.visible_box
        return (right - left) * (bottom - top) / (self.size[0] * self.size[1])

    @property
    def content_fraction(self) -> float:
        """Share of the encoder input covered by image content rather than padding."""
        left, top, right, bottom = self.crop_box
        vl, vt, vr, vb = self.visible_box
        return (vr - vl) * (vb - vt) / ((right - left) * (bottom - top))


def pipeline_geometry(
    size: tuple[int, int],
    kind: TransformKind,
    image_size: int = 224,
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> PipelineGeometry:
    """Geometry of :func:`build_transform` for an image of ``size = (w, h)``, with its exact rounding."""
    ratio = kind_ratio(kind, target_ratio)
    w, h = size
    padding = pad_amounts(size, ratio) if ratio is not None else (0, 0, 0, 0)
    pw, ph = w + padding[0] + padding[2], h + padding[1] + padding[3]
    # Resize's own size rule (shorter side -> image_size, longer side truncated), then CenterCrop's.
    rh, rw = _compute_resized_output_size((ph, pw), [image_size])
    crop_top, crop_left = round((rh - image_size) / 2.0), round((rw - image_size) / 2.0)
    sx, sy = pw / rw, ph / rh
    crop = (crop_left * sx, crop_top * sy, (crop_left + image_size) * sx, (crop_top + image_size) * sy)
    visible = (
        min(max(crop[0] - padding[0], 0.0), float(w)),
        min(max(crop[1] - padding[1], 0.0), float(h)),
        min(max(crop[2] - padding[0], 0.0), float(w)),
        min(max(crop[3] - padding[1], 0.0), float(h)),
    )
    return PipelineGeometry(size, padding, (pw, ph), (rw, rh), crop, visible)


def visible_fraction(
    size: tuple[int, int],
    kind: TransformKind,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    image_size: int = 224,
) -> float:
    """Fraction of an image's area that survives into the encoder input (1.0 = nothing cropped)."""
    return pipeline_geometry(size, kind, image_size, target_ratio).visible_fraction


def aspect_summary(
    aspect_ratios_wh: Sequence[float],
    kinds: Sequence[TransformKind] = KINDS,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    image_size: int = 224,
) -> dict[str, float]:
    """How a set of images, given by their aspect ratios (w/h), fares under each pipeline.

    Returns the number of images, their median w/h, the percentage that targetpad pads (long side /
    short side at least ``target_ratio``; the others it only crops, exactly like ``clip``) and, per kind,
    the mean percentage of an image's area that reaches the encoder (``"<kind> keeps %"``). Each ratio
    stands for an image whose long side is 1,000 pixels, as in :func:`cirlib.data.stats.visible_area_table`.
    """
    ratios = np.asarray(aspect_ratios_wh, dtype=np.float64)
    if ratios.ndim != 1 or len(ratios) == 0 or not (ratios > 0).all():
        raise ValueError(f"expected a non-empty list of positive aspect ratios, got {aspect_ratios_wh!r}")
    base = 1000
    sizes = [(base, round(base / r)) if r >= 1 else (round(base * r), base) for r in ratios]
    distinct = sorted(set(sizes))  # geometry once per distinct size
    padded = {s: any(pad_amounts(s, target_ratio)) for s in distinct}
    out = {"images": float(len(ratios)), "median w/h": float(np.median(ratios)),
           "targetpad pads %": 100.0 * float(np.mean([padded[s] for s in sizes]))}
    for kind in kinds:
        kept = {s: visible_fraction(s, kind, target_ratio, image_size) for s in distinct}
        out[f"{kind} keeps %"] = 100.0 * float(np.mean([kept[s] for s in sizes]))
    return out
