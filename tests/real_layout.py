"""A complete set of dataset roots in the public FashionIQ, CIRR and CIRCO layouts, built from the
hand-written fixtures: nothing a generator writes (no ``cirlib_meta.json``, no attribute labels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CATEGORIES = ("dress", "shirt", "toptee")
SOURCES = {"val": "dress.val", "train": "shirt.train", "test": "dress.test"}


def _renamed(value, suffix: str):
    """The annotation ``value`` with every image name (a JSON string naming a product) suffixed."""
    if isinstance(value, list):
        return [_renamed(v, suffix) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "captions" else _renamed(v, suffix)) for k, v in value.items()}
    return f"{value}{suffix}" if isinstance(value, str) else value


def real_layout_roots(dest: Path) -> dict[str, Path]:
    """Copy the fixtures under ``dest`` and give every FashionIQ category its train, val and test
    splits, as a downloaded FashionIQ has. The fixtures hold only a few of them; each missing one is
    the fixture's split of another category with its products renamed (their images copied, dead
    links left dead), so categories keep distinct images as in the real dataset."""
    roots = {"fashioniq_root": dest / "fashionIQ", "cirr_root": dest / "CIRR", "circo_root": dest / "CIRCO"}
    for key, name in (("fashioniq_root", "fashioniq"), ("cirr_root", "cirr"), ("circo_root", "circo")):
        shutil.copytree(FIXTURES / name, roots[key])
    fashion = roots["fashioniq_root"]
    images = fashion / "images"
    for category in CATEGORIES:
        for split, source in SOURCES.items():
            suffix = f"_{category}"
            for folder, kind in (("captions", "cap"), ("image_splits", "split")):
                target = fashion / folder / f"{kind}.{category}.{split}.json"
                if target.exists():
                    continue
                entries = json.loads((fashion / folder / f"{kind}.{source}.json").read_text())
                target.write_text(json.dumps(_renamed(entries, suffix), indent=1))
                if kind == "split":
                    for name in entries:
                        for image in images.glob(f"{name}.*"):
                            shutil.copy(image, images / f"{name}{suffix}{image.suffix}")
    _more_cirr_training(roots["cirr_root"])
    return roots


def _more_cirr_training(root: Path) -> None:
    """A second CIRR training triplet among the fixture's train images: contrastive training needs
    at least two triplets in a batch."""
    path = root / "cirr" / "captions" / "cap.rc2.train.json"
    entries = json.loads(path.read_text())
    first = entries[0]
    entries.append({**first, "pairid": first["pairid"] + 1, "reference": "train-101-0-img0",
                    "target_hard": "train-102-3-img1", "target_soft": {"train-102-3-img1": 1.0},
                    "caption": "a larger one on a white background"})
    path.write_text(json.dumps(entries))
