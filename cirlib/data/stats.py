"""Dataset statistics the notebooks show: query and gallery counts, semantic aspects, image
aspect ratios and what each preprocessing pipeline keeps of an image.

They work on loaded :class:`~cirlib.data.datasets.CIRSplit` objects, so the same tables describe the
embedded benchmarks and the real FashionIQ / CIRR / CIRCO.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from cirlib.data.datasets import CIRCO_ASPECTS, CIRSplit
from cirlib.data.preprocess import visible_fraction


def split_statistics(splits: Iterable[tuple[str, CIRSplit]]) -> pd.DataFrame:
    """One row per (benchmark, split): queries, gallery size, targets known, ground truths, missing files."""
    rows = []
    for name, s in splits:
        gts = [len(q.ground_truths) for q in s.queries]
        rows.append({
            "benchmark": name,
            "split": s.split,
            "queries": len(s.queries),
            "gallery": len(s.gallery),
            "with target": sum(q.target is not None for q in s.queries),
            "GT per query": float(np.mean(gts)) if gts and any(gts) else float("nan"),
            "captions per query": float(np.mean([len(q.captions) for q in s.queries])) if s.queries else 0.0,
            "missing files": s.n_missing,
        })
    return pd.DataFrame(rows).set_index(["benchmark", "split"])


def aspect_coverage(splits: Mapping[str, CIRSplit]) -> pd.DataFrame:
    """iSEARLE Table I: how many queries exercise each semantic aspect (a query may have several)."""
    table = {}
    for name, s in splits.items():
        counts = Counter(a for q in s.queries for a in q.semantic_aspects)
        unknown = set(counts) - set(CIRCO_ASPECTS)
        if unknown:
            raise ValueError(f"{name}: unknown semantic aspects {sorted(unknown)}")
        n = max(len(s.queries), 1)
        table[(name, "queries")] = [counts.get(a, 0) for a in CIRCO_ASPECTS]
        table[(name, "%")] = [100.0 * counts.get(a, 0) / n for a in CIRCO_ASPECTS]
    df = pd.DataFrame(table, index=list(CIRCO_ASPECTS))
    df.index.name = "semantic aspect"
    return df


def ground_truth_counts(split: CIRSplit) -> np.ndarray:
    """Number of ground truths per query (CIRCO lists them all; FashionIQ/CIRR have one)."""
    return np.asarray([len(q.ground_truths) for q in split.queries])


def aspect_ratios(split: CIRSplit) -> np.ndarray:
    """Width / height of every gallery image (read from the header only)."""
    out = []
    for name in split.gallery:
        with Image.open(split.image_paths[name]) as im:
            w, h = im.size
        out.append(w / h)
    return np.asarray(out)


def extreme_aspect_examples(splits: Mapping[str, CIRSplit], n: int = 3) -> list[Path]:
    """The tallest and widest gallery images across ``splits`` (what Fig. 6 of CLIP4Cir shows)."""
    ranked = sorted((r, split.image_paths[name]) for split in splits.values()
                    for name, r in zip(split.gallery, aspect_ratios(split)))
    n_tall = (n + 1) // 2
    return [p for _, p in ranked[:n_tall]] + [p for _, p in ranked[len(ranked) - (n - n_tall):]]


def visible_area_table(
    aspect_ratios_wh: Sequence[float], kinds: Sequence[str], target_ratio: float, image_size: int = 224
) -> pd.DataFrame:
    """Fraction of the image area each pipeline keeps, per aspect ratio (w/h), from exact geometry."""
    base = 1000
    rows = {}
    for r in aspect_ratios_wh:
        size = (base, round(base / r)) if r >= 1 else (round(base * r), base)
        rows[r] = {k: visible_fraction(size, k, target_ratio, image_size) for k in kinds}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "aspect ratio (w/h)"
    return frame
