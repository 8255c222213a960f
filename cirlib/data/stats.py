"""Dataset statistics shown in the data-preparation notebook.

They work on loaded :class:`~cirlib.data.datasets.CIRSplit` objects, so the same tables describe the
embedded benchmarks and the real FashionIQ / CIRR / CIRCO.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from cirlib.data.datasets import CIRSplit
from cirlib.evaluation.metrics import CIRCO_ASPECTS



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
