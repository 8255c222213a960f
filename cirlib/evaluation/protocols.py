"""Protocol-aware evaluation of CIR splits from precomputed features.

:func:`per_query_metrics` is the one place a benchmark protocol is applied: (split, query
features, gallery features) -> every metric the benchmark reports, per query: FashionIQ R@10/R@50
(one split per category), CIRR R@1/5/10/50 + Rsubset@1/2/3, CIRCO mAP@5/10/25/50 + R@K
(:func:`per_query_score_metrics` takes the scores directly, through the same code). Everything
else builds on it:

* :func:`evaluate_split`: their means, plus CIRR's ``avg`` and CIRCO's per-aspect mAP@10;
* :func:`evaluate_splits` / :func:`per_query_splits`: a combining function scored on the cached
  ``(reference, text, gallery)`` features of one benchmark's splits (FashionIQ categories
  averaged by :func:`merge_metrics`), as means or as per-query values for bootstrap intervals;
* :class:`CachedEvaluator`: the same for frozen encoders, features extracted once;
* :func:`benchmark_columns`: the benchmark-level entries as result-table columns.

Scores are cosine similarities computed in row chunks (:func:`similarity_chunks`) on the
features' device, so large galleries fit in memory.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cirlib.core import distributed
from cirlib.core.tensors import row_chunks
from cirlib.data.datasets import CIRSplit
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.bootstrap import PerQuery
from cirlib.evaluation.metrics import (
    IndexLike,
    average_precision,
    fashioniq_average,
    index_lists,
    indices_of,
    mask_excluded,
    name_index,
    per_aspect,
    per_query_hits,
    rank_of,
    subset_rank,
    summarise,
    with_cirr_average,
)
from cirlib.models.combiner import CombineFn, apply_combine
from cirlib.models.features import encode_split, split_outside_references, split_reference_features

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is scored."""

    ks: tuple[int, ...]
    subset_ks: tuple[int, ...] = ()  # CIRR Recall_subset inside the query's image set
    average_precision: bool = False  # CIRCO mAP@K over every ground truth, at the same ks
    exclude_reference: bool = False  # drop the reference image from the ranking


PROTOCOLS: dict[str, Protocol] = {
    # CLIP4Cir / SEARLE: plain recall over the category gallery, reference kept.
    "fashioniq": Protocol(ks=(10, 50)),
    # CIRR's official protocol removes the reference from both rankings.
    "cirr": Protocol(ks=(1, 5, 10, 50), subset_ks=(1, 2, 3), exclude_reference=True),
    # CIRCO's official protocol ranks the whole index set with the reference kept: it is never a
    # ground truth, so a method that returns the reference image itself pays for it.
    "circo": Protocol(ks=(5, 10, 25, 50), average_precision=True),
}
ASPECT_METRIC = "mAP@10"  # what iSEARLE Table V and CIRCO's server report per semantic aspect


def _protocol(split: CIRSplit, ks: Sequence[int] | None, exclude_reference: bool | None) -> Protocol:
    if split.dataset not in PROTOCOLS:
        raise ValueError(f"unknown dataset {split.dataset!r} in split.dataset; expected one of {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[split.dataset]
    if ks is not None:
        protocol = dataclasses.replace(protocol, ks=tuple(ks))
    if exclude_reference is not None:
        protocol = dataclasses.replace(protocol, exclude_reference=exclude_reference)
    return protocol


def _check_evaluable(split: CIRSplit) -> None:
    """Only splits with queries and ground-truth targets can be scored here."""
    name = f"{split.dataset}/{split.split}"
    if not split.queries:
        raise ValueError(f"{name} has no queries to evaluate")
    if any(query.target is None for query in split.queries):
        raise ValueError(
            f"{name} has no ground-truth targets (a test split): its results can only be computed by "
            "submitting the rankings to the dataset's official evaluation server"
        )


def _normalised_features(split: CIRSplit, query_features: Tensor, gallery_features: Tensor) -> tuple[Tensor, Tensor]:
    """Check the split is evaluable and the features align with it; return unit-norm float32 features."""
    _check_evaluable(split)
    name = f"{split.dataset}/{split.split}"
    for what, features, rows, of in (
        ("query_features", query_features, len(split.queries), "queries"),
        ("gallery_features", gallery_features, len(split.gallery), "gallery images"),
    ):
        if features.dim() != 2 or features.shape[0] != rows:
            raise ValueError(f"{what} has shape {tuple(features.shape)}; expected [{rows}, D], one row per {name} {of}")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"query_features have dimension {query_features.shape[1]} but gallery_features {gallery_features.shape[1]}"
        )
    queries = F.normalize(query_features.float(), dim=-1)
    gallery = F.normalize(gallery_features.to(queries.device).float(), dim=-1)
    return queries, gallery


def similarity_chunks(queries: Tensor, gallery: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, queries[rows] @ gallery.T)`` over row chunks of about
    :data:`cirlib.core.tensors.CHUNK_ELEMENTS` scores each.

    With L2-normalised rows the scores are cosine similarities; a query x gallery matrix of any
    size is thus scored within a fixed memory budget, on the features' device.
    """
    for rows in row_chunks(len(queries), len(gallery)):
        yield rows, queries[rows] @ gallery.T


def per_query_metrics(
    split: CIRSplit,
    query_features: Tensor,
    gallery_features: Tensor,
    ks: Sequence[int] | None = None,
    exclude_reference: bool | None = None,
) -> dict[str, Tensor]:
    """Every metric of the split's protocol per query (CPU ``[Q]`` tensors in percent).

    ``query_features`` and ``gallery_features`` have one row per query and per gallery image of
    ``split`` and are L2-normalised here. Queries whose target is absent from the gallery count
    as misses (one warning with the count). Test splits (no targets) raise ``ValueError``: only
    the official servers can score them. ``ks`` and ``exclude_reference`` override the protocol
    defaults. The means are :func:`evaluate_split`'s numbers; the per-query values serve
    per-aspect tables and bootstrap intervals.
    """
    protocol = _protocol(split, ks, exclude_reference)
    queries, gallery = _normalised_features(split, query_features, gallery_features)
    return _score_metrics(split, protocol, similarity_chunks(queries, gallery))


def per_query_score_metrics(
    split: CIRSplit, scores: Tensor, ks: Sequence[int] | None = None, exclude_reference: bool | None = None
) -> dict[str, Tensor]:
    """:func:`per_query_metrics` of a ranking given as scores ``[Q, G]`` (higher ranks first, one column
    per gallery image of ``split``) instead of features: for rankings that no pair of feature vectors
    expresses, such as an oracle that knows which images each caption describes. The caller holds the
    whole matrix, so it suits validation splits, not the chunked scoring of large galleries."""
    protocol = _protocol(split, ks, exclude_reference)
    _check_evaluable(split)
    expected = (len(split.queries), len(split.gallery))
    if tuple(scores.shape) != expected:
        raise ValueError(f"scores have shape {tuple(scores.shape)}; expected {list(expected)}, one row per "
                         f"{split.dataset}/{split.split} query and one column per gallery image")
    return _score_metrics(split, protocol, [(slice(0, expected[0]), scores.float())])


def _score_metrics(split: CIRSplit, protocol: Protocol, chunks: Iterable[tuple[slice, Tensor]]) -> dict[str, Tensor]:
    """The protocol's metrics per query from ``(rows, scores)`` chunks covering the queries in order."""
    index = name_index(split.gallery)
    targets = indices_of([query.target for query in split.queries], index)
    missing = (targets < 0).nonzero().flatten().tolist()
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(targets)} queries of {split.dataset}/{split.split} have a target "
            f"that is not in the gallery (e.g. {split.queries[missing[0]].target!r}); they count as misses",
            stacklevel=3,
        )
    references = indices_of([query.reference for query in split.queries], index) if protocol.exclude_reference else None
    groups = index_lists([query.group for query in split.queries], index) if protocol.subset_ks else None
    gts = n_gt = None
    if protocol.average_precision:  # the annotated target stands in where no GT list was given
        # Empty names are batching padding (SEARLE pads GT lists with ""), never ground truths.
        truths = [tuple(g for g in query.ground_truths or (query.target,) if g) for query in split.queries]
        n_gt = torch.tensor([
            len(set(t)) if query.n_ground_truths is None else query.n_ground_truths
            for query, t in zip(split.queries, truths)
        ])
        gts = index_lists(truths, index)

    parts: dict[str, list[Tensor]] = {}
    for rows, scores in chunks:
        exclude = None if references is None else references[rows]
        chunk: dict[str, Tensor] = {}
        if gts is not None and n_gt is not None:
            ap = average_precision(scores, gts[rows], protocol.ks, n_gt[rows], exclude)
            chunk |= {f"mAP@{k}": ap[:, col] * 100.0 for col, k in enumerate(protocol.ks)}
        chunk |= per_query_hits(rank_of(scores, targets[rows], exclude), protocol.ks)
        if groups is not None:
            ranks = subset_rank(scores, targets[rows], groups[rows], exclude)
            chunk |= per_query_hits(ranks, protocol.subset_ks, prefix="Rsubset")
        for name, values in chunk.items():
            parts.setdefault(name, []).append(values.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def chance_levels(split: CIRSplit) -> dict[str, float]:
    """What a random ranking scores on average, per recall metric of the split's protocol (percent).

    A reader needs the floor to read a number: Recall@K of a random order is K over the candidates
    (the gallery, minus the reference where the protocol removes it), and CIRR's Recall_subset@K is
    K over the query's set members other than the reference (20 % at K = 1 for sets of six). mAP has
    no such closed form and is left out.
    """
    protocol = _protocol(split, None, None)
    gallery = set(split.gallery)
    levels: dict[str, list[float]] = {}
    for query in split.queries:
        dropped = protocol.exclude_reference and query.reference in gallery
        n = len(gallery) - dropped
        for k in protocol.ks:
            levels.setdefault(f"R@{k}", []).append(min(k, n) / n)
        if protocol.subset_ks:
            members = {g for g in query.group if g in gallery} - ({query.reference} if dropped else set())
            for k in protocol.subset_ks:
                levels.setdefault(f"Rsubset@{k}", []).append(min(k, len(members)) / max(len(members), 1))
    return {name: 100.0 * sum(v) / len(v) for name, v in levels.items()}


def _means(split: CIRSplit, per_query: Mapping[str, Tensor]) -> dict[str, float]:
    """:func:`evaluate_split`'s numbers from :func:`per_query_metrics`' values."""
    results = with_cirr_average(summarise(per_query))
    aspects = [query.semantic_aspects for query in split.queries]
    if ASPECT_METRIC in per_query and any(aspects):
        table = per_aspect(per_query[ASPECT_METRIC], aspects)
        results |= {f"{ASPECT_METRIC}/{aspect}": value for aspect, value in table["value"].items()}
    return results


def evaluate_split(
    split: CIRSplit,
    query_features: Tensor,
    gallery_features: Tensor,
    ks: Sequence[int] | None = None,
    exclude_reference: bool | None = None,
) -> dict[str, float]:
    """The split's protocol metrics in percent (see ``PROTOCOLS``): the means of
    :func:`per_query_metrics` (same arguments), CIRR's ``avg`` = (R@5 + Rsubset@1) / 2, and for
    splits with semantic aspects (CIRCO) one ``"mAP@10/<aspect>"`` entry per aspect."""
    return _means(split, per_query_metrics(split, query_features, gallery_features, ks, exclude_reference))


def topk(scores: Tensor, k: int, exclude_idx: IndexLike | None = None) -> tuple[Tensor, Tensor]:
    """Best ``k`` gallery items per query as ``(scores [Q, k], indices [Q, k])``, best first.

    A display / candidate order (qualitative figures, re-ranking): ties keep gallery order, so it
    is deterministic on any device. ``exclude_idx`` (``[Q]`` or ``[Q, E]``, ``-1`` = none) sends
    items to the end with score ``-inf``; ``k`` is clipped to the gallery size.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [queries, gallery] matrix, got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n_queries, n_gallery = scores.shape
    k = min(k, n_gallery)
    exclude = None
    if exclude_idx is not None:
        exclude = torch.as_tensor(exclude_idx, dtype=torch.long, device=scores.device).reshape(n_queries, -1)
    values = torch.empty((n_queries, k), dtype=scores.dtype, device=scores.device)
    indices = torch.empty((n_queries, k), dtype=torch.long, device=scores.device)
    for rows in row_chunks(n_queries, n_gallery):
        chunk = mask_excluded(scores[rows], None if exclude is None else exclude[rows])
        # torch.topk picks the k best fast but orders ties arbitrarily: re-sort them by
        # gallery index, and fully sort the rare rows where a tie straddles the k-th place.
        best, best_idx = torch.topk(chunk, k, dim=1)
        best_idx, by_index = best_idx.sort(dim=1)
        best, by_score = torch.sort(best.gather(1, by_index), dim=1, descending=True, stable=True)
        best_idx = best_idx.gather(1, by_score)
        straddle = ((chunk >= best[:, -1:]).sum(1) > k).nonzero().flatten()
        if len(straddle):
            full, full_idx = torch.sort(chunk[straddle], dim=1, descending=True, stable=True)
            best[straddle], best_idx[straddle] = full[:, :k], full_idx[:, :k]
        values[rows], indices[rows] = best, best_idx
    return values, indices


# The metric each benchmark's model selection uses (CLIP4Cir's validation scripts: FashionIQ the mean
# of R@10 and R@50, CIRR the mean of its seven recalls; CIRCO: iSEARLE's mAP@10).
MAIN_METRICS = {"fashioniq": "average", "cirr": "recall_mean", "circo": "mAP@10"}


def main_metric_for(dataset: str) -> str:
    """Default model-selection metric of a benchmark (see ``MAIN_METRICS``)."""
    if dataset not in MAIN_METRICS:
        raise ValueError(f"no default main metric for dataset {dataset!r}; pass main_metric explicitly")
    return MAIN_METRICS[dataset]


def merge_metrics(per_split: Mapping[str, Mapping[str, float]], dataset: str) -> dict[str, float]:
    """One metric dict for the validation splits of one benchmark.

    FashionIQ (one split per category) gets the category means plus ``average`` = (R@10 + R@50) / 2
    (:func:`cirlib.evaluation.metrics.fashioniq_average`), other benchmarks their single split's dict. With
    several splits every metric also appears prefixed by its split name (``"dress/R@10"``), so the
    main metric keeps its name whether one category or three are validated.
    """
    if dataset == "fashioniq":
        merged = fashioniq_average(per_split)
    elif len(per_split) == 1:
        merged = dict(next(iter(per_split.values())))
    else:
        raise ValueError(f"only FashionIQ categories are averaged; validate {dataset} one split at a time")
    if len(per_split) > 1:
        merged |= {f"{name}/{k}": float(v) for name, m in per_split.items() for k, v in m.items()}
    return merged


def _one_benchmark(splits: Mapping[str, CIRSplit]) -> str:
    datasets = {split.dataset for split in splits.values()}
    if len(datasets) != 1:
        raise ValueError(f"validation splits must come from one benchmark, got {sorted(datasets)}")
    return datasets.pop()


def benchmark_columns(benchmark: str, results: Mapping[str, float]) -> dict[str, float]:
    """``{"<benchmark> <metric>": value}``: the benchmark-level entries of ``results`` named as the
    columns of the course's result tables (``"cirr R@1"``, ``"fashioniq average"``).

    Per-split (``"dress/R@10"``) and per-aspect (``"mAP@10/addition"``) entries, the names with a
    ``/``, are left out.
    """
    return {f"{benchmark} {name}": value for name, value in results.items() if "/" not in name}


def _per_split(
    splits: Mapping[str, CIRSplit], features: Mapping[str, tuple[Tensor, Tensor, Tensor]], combine: CombineFn
) -> dict[str, dict[str, Tensor]]:
    """:func:`per_query_metrics` of ``combine(reference, text)`` against the gallery, per split."""
    _one_benchmark(splits)
    per_split = {}
    for name, split in splits.items():
        reference, text, gallery = features[name]
        per_split[name] = per_query_metrics(split, apply_combine(combine, reference, text), gallery)
    return per_split


def evaluate_splits(
    splits: Mapping[str, CIRSplit], features: Mapping[str, tuple[Tensor, Tensor, Tensor]], combine: CombineFn
) -> dict[str, float]:
    """Metrics of ``combine`` on one benchmark's splits, given ``(reference, text, gallery)``
    features per split: :func:`evaluate_split` of each split, merged by :func:`merge_metrics`."""
    per_split = _per_split(splits, features, combine)
    return merge_metrics({name: _means(splits[name], values) for name, values in per_split.items()},
                         _one_benchmark(splits))


def per_query_splits(
    splits: Mapping[str, CIRSplit], features: Mapping[str, tuple[Tensor, Tensor, Tensor]], combine: CombineFn
) -> PerQuery:
    """The per-query values behind :func:`evaluate_splits`'s numbers, for bootstrap intervals."""
    per_split = _per_split(splits, features, combine)
    return PerQuery.from_splits({name: {k: v.numpy() for k, v in values.items()} for name, values in per_split.items()})


class CachedEvaluator:
    """Validation for frozen encoders: ``val_fn(combine) -> metrics``, ``val_fn.per_query(combine)``.

    The splits' reference, text and gallery features are extracted once
    (:func:`cirlib.models.features.encode_split`, so they share the cache of the notebooks' other
    evaluations); every call only applies ``combine`` and the protocol (:func:`evaluate_splits`,
    :func:`per_query_splits`), so it serves the zero-shot/stage-1 Sum rows and every epoch of
    Combiner training alike.
    """

    def __init__(
        self,
        splits: CIRSplit | Mapping[str, CIRSplit],
        backbone: "Backbone",
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
    ) -> None:
        self.splits = {"val": splits} if isinstance(splits, CIRSplit) else dict(splits)
        self.features: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for name, split in self.splits.items():
            with distributed.main_first():  # under torchrun rank 0 fills the cache, the others read it
                f = encode_split(backbone, split, transform_kind, target_ratio, cache_dir)
            self.features[name] = (f.reference, f.text, f.gallery)

    def __call__(self, combine: CombineFn) -> dict[str, float]:
        """:func:`evaluate_splits` of ``combine`` on the cached features."""
        return evaluate_splits(self.splits, self.features, combine)

    def per_query(self, combine: CombineFn) -> PerQuery:
        """:func:`per_query_splits` of ``combine`` on the cached features."""
        return per_query_splits(self.splits, self.features, combine)


class LiveEvaluator:
    """Validation for encoders being trained: ``val_fn(backbone, combine) -> metrics``.

    Each call encodes the splits with the backbone's *current* weights (gallery, references and
    deterministic captions) and scores ``combine`` with :func:`evaluate_splits`, as
    :class:`CachedEvaluator` does for frozen encoders. The images are decoded once into a
    :class:`~cirlib.data.pixels.PixelCache` (kept under ``cache_dir``) and their features are reused
    while the image tower is unchanged (``backbone.image_fingerprint``, e.g. while only the text
    encoder is fine-tuned), which is most of the cost.

    :meth:`store` hands the latest call's image features to the feature cache, so that evaluating
    the trained model afterwards (:func:`~cirlib.models.features.encode_split`, a
    :class:`CachedEvaluator`) does not encode the validation images again: stage-1 training calls
    it when it ends (the kept epoch is usually the last one validated).
    """

    def __init__(
        self,
        splits: CIRSplit | Mapping[str, CIRSplit],
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
        amp: bool = True,
    ) -> None:
        self.splits = {"val": splits} if isinstance(splits, CIRSplit) else dict(splits)
        self.transform_kind, self.target_ratio, self.cache_dir, self.amp = transform_kind, target_ratio, cache_dir, amp
        self._pixels: dict[tuple[str, int], object] = {}  # (split, input size) -> PixelCache
        self._images: dict[str, tuple[str, Tensor]] = {}  # split -> (image-tower fingerprint, features)

    def _paths(self, name: str) -> list[Path]:
        """The split's gallery, then its references outside the gallery: :func:`encode_split`'s rows."""
        split = self.splits[name]
        return [split.image_paths[n] for n in (*split.gallery, *split_outside_references(split))]

    def _image_features(self, backbone: "Backbone", name: str) -> Tensor:
        from cirlib.data.pixels import PixelCache
        from cirlib.models.features import encode_pixels

        key = (name, backbone.image_size)
        if key not in self._pixels:
            self._pixels[key] = PixelCache(self._paths(name), backbone.image_size, self.transform_kind,
                                           self.target_ratio, self.cache_dir)
        tower = backbone.image_fingerprint
        if name not in self._images or self._images[name][0] != tower:
            self._images[name] = (tower, encode_pixels(backbone, self._pixels[key], amp=self.amp))
        return self._images[name][1]

    def __call__(self, backbone: "Backbone", combine: CombineFn) -> dict[str, float]:
        from cirlib.data.datasets import query_text
        from cirlib.models.features import text_features

        features = {}
        for name, split in self.splits.items():
            images = self._image_features(backbone, name)
            gallery, outside = images[: len(split.gallery)], images[len(split.gallery):]
            texts = text_features(backbone, [query_text(q) for q in split.queries], progress=False, amp=self.amp)
            features[name] = (split_reference_features(split, gallery, outside), texts, gallery)
        return evaluate_splits(self.splits, features, combine)

    def store(self, backbone: "Backbone") -> int:
        """Write the latest image features of ``backbone``'s current image tower to the feature cache
        (``cache_dir``), as :func:`~cirlib.models.features.encode_split` would have computed them;
        splits last encoded with other weights are left alone. Returns how many splits were stored."""
        from cirlib.models.features import store_image_features

        if self.cache_dir is None:
            return 0
        stored = 0
        for name, split in self.splits.items():
            if name not in self._images or self._images[name][0] != backbone.image_fingerprint:
                continue
            images, paths, n = self._images[name][1], self._paths(name), len(split.gallery)
            for rows in (slice(0, n), slice(n, None)):  # encode_split's two cache entries
                store_image_features(backbone, paths[rows], images[rows], self.transform_kind, self.target_ratio,
                                     self.cache_dir, self.amp)
            stored += 1
        return stored
