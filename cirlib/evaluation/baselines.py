"""Zero-shot CIR baselines and modality redundancy from cached CLIP features.

The baselines of iSEARLE Tables II–IV (image-only, text-only, image+text sum) and the
modality-redundancy curves of iSEARLE Fig. 7 all need the same three feature sets per split:
gallery images, reference images and query texts, which :func:`cirlib.models.features.encode_split`
computes once (reference rows are taken from the gallery features whenever the reference is a
gallery image). Every number comes from the benchmark protocols of
:mod:`cirlib.evaluation.protocols`; this module only groups splits by benchmark.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from torch import Tensor

from cirlib.data.datasets import CIRSplit
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.bootstrap import PerQuery
from cirlib.evaluation.protocols import benchmark_columns, evaluate_split, evaluate_splits, per_query_splits
from cirlib.models.backbone import Backbone
from cirlib.models.combiner import CombineFn, combine_sum
from cirlib.models.features import SplitFeatures, encode_split

# The zero-shot combining functions of iSEARLE's baseline rows.
BASELINES: dict[str, CombineFn] = {
    "image": lambda image, text: image,
    "text": lambda image, text: text,
    "sum": combine_sum,
}


def _by_benchmark(
    splits: Mapping[str, CIRSplit], features: Mapping[str, SplitFeatures]
) -> dict[str, tuple[dict[str, CIRSplit], dict[str, tuple[Tensor, Tensor, Tensor]]]]:
    """Splits grouped by benchmark, each with its ``(reference, text, gallery)`` features."""
    groups: dict[str, tuple[dict, dict]] = defaultdict(lambda: ({}, {}))
    for name, split in splits.items():
        f = features[name]
        groups[split.dataset][0][name] = split
        groups[split.dataset][1][name] = (f.reference, f.text, f.gallery)
    return dict(groups)


def evaluate_features(
    splits: Mapping[str, CIRSplit], features: Mapping[str, SplitFeatures], combine: CombineFn
) -> dict[str, float]:
    """``{"<benchmark> <metric>": value}`` for every benchmark among ``splits``, FashionIQ categories
    averaged (:func:`cirlib.evaluation.protocols.evaluate_splits`).

    Keys look like ``"fashioniq R@10"``, ``"cirr Rsubset@1"``, ``"circo mAP@10"``; per-category and
    per-aspect entries are left out (:func:`cirlib.evaluation.protocols.benchmark_columns`).
    """
    out: dict[str, float] = {}
    for dataset, (group, feats) in _by_benchmark(splits, features).items():
        out |= benchmark_columns(dataset, evaluate_splits(group, feats, combine))
    return out


def per_query_features(
    splits: Mapping[str, CIRSplit], features: Mapping[str, SplitFeatures], combine: CombineFn
) -> dict[str, PerQuery]:
    """Per benchmark, the per-query values behind :func:`evaluate_features` (for bootstrap intervals)."""
    return {dataset: per_query_splits(group, feats, combine)
            for dataset, (group, feats) in _by_benchmark(splits, features).items()}


def evaluate_baselines(
    backbone: Backbone,
    splits: Mapping[str, CIRSplit],
    methods: Sequence[str] = tuple(BASELINES),
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, str], PerQuery]]:
    """Rows = zero-shot methods, columns = ``"<benchmark> <metric>"`` (percent); and the per-query
    values behind them, keyed ``(benchmark, method)``, for bootstrap intervals."""
    unknown = set(methods) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; choose from {list(BASELINES)}")
    features = {n: encode_split(backbone, s, transform_kind, target_ratio, cache_dir) for n, s in splits.items()}
    rows = {m: evaluate_features(splits, features, BASELINES[m]) for m in methods}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method"
    per_query = {(b, m): r for m in methods for b, r in per_query_features(splits, features, BASELINES[m]).items()}
    return frame, per_query


def stack_results(results: Mapping[str, pd.DataFrame], level: str) -> pd.DataFrame:
    """Stack tables that share columns under a new outer index level (e.g. one per preprocessing)."""
    return pd.concat(results, names=[level])


def redundancy_curves(
    splits: Mapping[str, CIRSplit],
    features: Mapping[str, SplitFeatures],
    ks: Sequence[int] = (1, 5, 10, 25, 50),
) -> pd.DataFrame:
    """iSEARLE Fig. 7: Recall@K of text-to-image (T2I) and image-to-image (I2I) retrieval.

    High T2I means captions are really absolute descriptions; high I2I means references and targets
    look alike — either way one modality is redundant, so lower is better. As in iSEARLE, CIRCO uses
    its single annotated target (the protocol's R@K); the reference image itself is removed from
    every ranking (it would otherwise trivially win I2I). FashionIQ categories are averaged.
    """
    rows = []
    for name, split in splits.items():
        f = features[name]
        for modality, query in (("T2I", f.text), ("I2I", f.reference)):
            recalls = evaluate_split(split, query, f.gallery, ks=ks, exclude_reference=True)
            rows += [{"benchmark": split.dataset, "split": name, "modality": modality, "K": k,
                      "recall": recalls[f"R@{k}"]} for k in ks]
    frame = pd.DataFrame(rows)
    return frame.groupby(["benchmark", "modality", "K"], as_index=False)["recall"].mean()
