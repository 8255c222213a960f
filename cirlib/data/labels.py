"""Images with labels: what zero-shot classification is scored against and pretraining learns from.

A generated root records the attributes each image was rendered from (colour, pattern, category,
object kinds, ...) in its metadata file; a real FashionIQ root says only which category each image
belongs to (``image_splits/split.<category>.<split>.json``). :func:`labelled_images` reads
whichever a root has; :func:`load_attributed_images` insists on generated attributes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cirlib.data import datasets
from cirlib.data.synth import fashion, scenes
from cirlib.data.synth.meta import META_FILE, meta_path, read_meta

# Wrappers of an absolute caption, for training pairs and zero-shot prompts alike.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a photograph of {}",
    "a close-up photo of {}",
)


def _category_caption(attributes: dict[str, Any]) -> str:
    """A real FashionIQ image described by its category only ("a dress")."""
    return f"a {fashion.CATEGORY_NOUNS[attributes['category']]}"


@dataclass(frozen=True)
class AttributedImage:
    """One image with labels: the attributes a generator rendered it from, or what a real layout says."""

    path: Path
    name: str
    attributes: dict[str, Any]
    benchmark: str  # "fashion" | "scenes" (generators) | "fashioniq" (a real root): whose caption rule applies

    @property
    def caption(self) -> str:
        return caption_function(self.benchmark)(self.attributes)


def caption_function(benchmark: str) -> Callable[[dict[str, Any]], str]:
    """The absolute-caption rule of a generated benchmark, or of a real FashionIQ root's categories."""
    if benchmark == "fashioniq":
        return _category_caption
    if benchmark == "fashion":
        from cirlib.data.synth.fashion import absolute_caption
    elif benchmark == "scenes":
        from cirlib.data.synth.scenes import absolute_caption
    else:
        raise ValueError(f"no caption rule for benchmark {benchmark!r}; expected 'fashion', 'scenes' or 'fashioniq'")
    return absolute_caption


def partial_caption_function(benchmark: str) -> Callable[[dict[str, Any], Any], str]:
    """A generated benchmark's rule for describing part of an image ("a red dress", "has two bags")."""
    if benchmark == "fashion":
        return fashion.partial_caption
    if benchmark == "scenes":
        return scenes.captions.partial_caption
    raise ValueError(f"no partial-caption rule for benchmark {benchmark!r}; expected 'fashion' or 'scenes'")


def counterfactual_function(benchmark: str) -> Callable[[dict[str, Any], str, Any], dict[str, Any] | None]:
    """A generated benchmark's rule for changing one captioned attribute of an image (legibility probes)."""
    if benchmark == "fashion":
        return fashion.counterfactual
    if benchmark == "scenes":
        return scenes.captions.counterfactual
    raise ValueError(f"no counterfactual rule for benchmark {benchmark!r}; expected 'fashion' or 'scenes'")


def changed_caption(image: AttributedImage, attribute: str, rng: Any) -> str | None:
    """``image``'s caption with ``attribute`` changed by its generator's counterfactual rule, or None
    where it cannot change or the change does not show in the caption (legibility probes, foils)."""
    changed = counterfactual_function(image.benchmark)(image.attributes, attribute, rng)
    if changed is None:
        return None
    caption = caption_function(image.benchmark)(changed)
    return None if caption == image.caption else caption


def legibility_attributes(benchmark: str) -> tuple[str, ...]:
    """The attributes :func:`counterfactual_function` of ``benchmark`` can change."""
    return {"fashion": fashion.LEGIBILITY_ATTRIBUTES, "scenes": scenes.captions.LEGIBILITY_ATTRIBUTES}[benchmark]


def probe_labels(item: AttributedImage) -> dict[str, str]:
    """The image-level labels a linear probe of image features can be trained on.

    A garment's colour, pattern, chest print and category; a scene's background colour and number
    of objects, and for scenes of a single object that object's kind, colour and size (in a scene
    of several, "the kind" names no one thing).
    """
    attrs = item.attributes
    if item.benchmark == "fashion":
        return {a: str(attrs[a]) for a in (*fashion.ATTRIBUTES, "category")}
    if item.benchmark != "scenes":
        raise ValueError(f"no probe labels for benchmark {item.benchmark!r}; expected 'fashion' or 'scenes'")
    objects = attrs["objects"]
    labels = {"background": str(attrs["background"]["colour"]), "objects": str(len(objects))}
    if len(objects) == 1:
        labels |= {a: str(objects[0][a]) for a in ("kind", "colour", "size")}
    return labels


def _split_images(root: Path, split: str) -> dict[str, Path]:
    """name -> file of every image a split of a FashionIQ/CIRR/CIRCO-layout root references."""
    if (root / "image_splits").is_dir() and (root / "captions").is_dir():
        found: dict[str, Path] = {}
        for category in datasets.FASHIONIQ_CATEGORIES:
            found.update(datasets.load_fashioniq(root, category, split).image_paths)
        return found
    if (root / "cirr").is_dir():
        return dict(datasets.load_cirr(root, "test1" if split == "test" else split).image_paths)
    if (root / "annotations").is_dir():
        if split == "train":
            raise ValueError(f"{root} is a CIRCO root, which has no train split (only val and test)")
        return dict(datasets.load_circo(root, split).image_paths)
    raise ValueError(f"{root} is not a FashionIQ, CIRR or CIRCO root (no image_splits/, cirr/ or annotations/)")


def load_attributed_images(roots: Sequence[str | os.PathLike], split: str = "train") -> list[AttributedImage]:
    """The images of ``split`` in each generated root, with their attributes from ``cirlib_meta.json``."""
    benchmark_of = {fashion.GENERATOR: "fashion", scenes.GENERATOR: "scenes"}
    items: list[AttributedImage] = []
    for root in map(Path, roots):
        meta = read_meta(root, benchmark_of)
        attributes, benchmark = meta["attributes"], benchmark_of[meta["generator"]]
        for name, path in sorted(_split_images(root, split).items()):
            if name not in attributes:
                raise ValueError(f"{meta_path(root)}: field 'attributes' has no entry for image {name!r} ({path})")
            items.append(AttributedImage(path, name, attributes[name], benchmark))
    return items


def labelled_images(root: str | os.PathLike, split: str = "val") -> list[AttributedImage]:
    """The labelled images of one root: generated attributes when the root has them, else the
    FashionIQ categories of a real root (``{"category": ...}``), else none (real CIRR and CIRCO
    carry no image labels)."""
    root = Path(root)
    if (root / META_FILE).is_file():
        return load_attributed_images([root], split)
    if not (root / "image_splits").is_dir():
        return []
    items: dict[str, AttributedImage] = {}
    for category in datasets.FASHIONIQ_CATEGORIES:
        for name, path in datasets.load_fashioniq(root, category, split).image_paths.items():
            items.setdefault(name, AttributedImage(path, name, {"category": category}, "fashioniq"))
    return [items[name] for name in sorted(items)]
