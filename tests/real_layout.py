"""A complete set of dataset roots in the public FashionIQ, CIRR and CIRCO layouts, built from the
hand-written fixtures: nothing a generator writes (no ``cirlib_meta.json``, no attribute labels)."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CATEGORIES = ("dress", "shirt", "toptee")


def real_layout_roots(dest: Path) -> dict[str, Path]:
    """Copy the fixtures under ``dest`` and give every FashionIQ category its train, val and test
    splits (the fixtures hold a few of them), as a downloaded FashionIQ has."""
    roots = {"fashioniq_root": dest / "fashionIQ", "cirr_root": dest / "CIRR", "circo_root": dest / "CIRCO"}
    for key, name in (("fashioniq_root", "fashioniq"), ("cirr_root", "cirr"), ("circo_root", "circo")):
        shutil.copytree(FIXTURES / name, roots[key])
    fashion = roots["fashioniq_root"]
    for category in CATEGORIES:
        for split, source in (("val", "dress.val"), ("train", "shirt.train"), ("test", "dress.test")):
            for folder, kind in (("captions", "cap"), ("image_splits", "split")):
                target = fashion / folder / f"{kind}.{category}.{split}.json"
                if not target.exists():
                    shutil.copy(fashion / folder / f"{kind}.{source}.json", target)
    return roots
