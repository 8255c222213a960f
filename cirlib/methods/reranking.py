"""Candidate re-ranking (Liu et al., TMLR 2024): training and inference of the filter and the re-ranker.

Both stages train on the frozen image tower's cached outputs (:class:`ImageBank`: pooled features
and patch tokens, each cached on disk), through the shared
:class:`~cirlib.core.training.TrainingLoop` (resumable fingerprinted checkpoints, the epoch with the
best validation score kept, early stopping), with AdamW and a cosine schedule to 0 as in §4.1.3:

* :func:`train_filter` trains the :class:`~cirlib.models.multimodal.CandidateFilter` with Eq. 1
  (:func:`~cirlib.methods.losses.batch_contrastive_loss` at the filter's learnable temperature);
* :func:`train_reranker` trains the :class:`~cirlib.models.multimodal.DualEncoderReranker` with
  Eq. 2 (:func:`~cirlib.methods.losses.reranking_loss`) on every query of a batch paired with every
  target of the batch, ``z_t`` computed by the frozen filter on the fly (a filter pass costs a
  ``2B``-th of the re-ranker's passes, so nothing is stored);
* :func:`pretrain_matching` optionally trains a one-stream re-ranker on image-text matching first (the
  training images and their absolute captions), as BLIP's cross-attention is pretrained before the paper
  fine-tunes it; :func:`train_reranker` then starts both encoders from it.

At inference a :class:`FirstStage` (the filter, the Sum, a Combiner, any query features) gives each
query its top-K candidates through :mod:`cirlib.search.index`; :func:`rerank` scores only those, and
:func:`ranking_features` turns the result into a full ranking (the top K re-ordered, every other
image in the first stage's order) that the official protocols of
:mod:`cirlib.evaluation.protocols` score as they score any method.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cirlib.core.device import autocast, grad_scaler, precision
from cirlib.core.io import fingerprint, tensor_digest
from cirlib.core.tensors import eval_mode
from cirlib.core.training import TrainingLoop, batch_slices, epoch_seed, optimizer_step
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.labels import load_attributed_images
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.bootstrap import PerQuery
from cirlib.evaluation.metrics import name_index
from cirlib.evaluation.protocols import PROTOCOLS, evaluate_split, main_metric_for, merge_metrics, per_query_metrics
from cirlib.methods.combiner_training import training_triplets
from cirlib.methods.losses import batch_contrastive_loss, matching_loss, reranking_loss
from cirlib.models.backbone import state_digest
from cirlib.models.combiner import CombineFn, apply_combine
from cirlib.models.features import image_features, patch_tokens
from cirlib.models.multimodal import CandidateFilter, DualEncoderReranker, Encoders, Merge, Reference
from cirlib.search.index import IndexConfig, build_index

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

PAPER_K: dict[str, int] = {"fashioniq": 100, "cirr": 50}
"""The K the paper re-ranks (Tables 1-2: R_100 on FashionIQ, R_50 on CIRR; its ground-truth
coverage is 97.18 % on CIRR at 50)."""


# --------------------------------------------------------------------------------------------
# What both stages read: the frozen image tower's outputs, per image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBank:
    """Frozen image-tower outputs of a set of images: pooled ``features`` ``[N, D]`` (fp32), the
    filter's comparison targets, and patch ``tokens`` ``[N, L, C]`` (fp16), what both stages
    cross-attend."""

    features: Tensor
    tokens: Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.tokens.ndim != 3 or len(self.features) != len(self.tokens):
            raise ValueError(f"need features [N, D] and tokens [N, L, C] for one N, got "
                             f"{tuple(self.features.shape)} and {tuple(self.tokens.shape)}")

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def encode(
        cls,
        backbone: "Backbone",
        paths: Sequence[Path],
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
        progress: bool = True,
        decoded: bool = False,
    ) -> "ImageBank":
        """Both outputs of ``paths``, each from its on-disk cache when ``cache_dir`` holds it.

        ``decoded`` reads the images through a decoded-pixel cache, as
        :func:`~cirlib.models.features.image_features` does (training images, which stage 1 holds decoded).
        """
        kw = dict(transform_kind=transform_kind, target_ratio=target_ratio, cache_dir=cache_dir, progress=progress,
                  decoded=decoded)
        return cls(image_features(backbone, paths, **kw), patch_tokens(backbone, paths, **kw))

    def __add__(self, other: "ImageBank") -> "ImageBank":
        return ImageBank(torch.cat([self.features, other.features]), torch.cat([self.tokens, other.tokens]))


@dataclass(frozen=True)
class QuerySet:
    """One evaluation split as the two stages read it.

    ``images`` holds the gallery in ``split.gallery`` order (rows ``0 .. G-1``), then the references
    that are not in the gallery; ``reference_rows[i]`` is query ``i``'s reference in it and
    ``tokens[i]`` its caption (the deterministic :func:`~cirlib.data.datasets.query_text`), tokenised.
    The two image sets are encoded as :func:`~cirlib.models.features.encode_split` encodes them,
    so the gallery's features come from the cache the course's other evaluations fill.
    """

    split: CIRSplit
    images: ImageBank
    reference_rows: Tensor  # [Q] long
    tokens: Tensor  # [Q, context] long

    @classmethod
    def build(
        cls,
        backbone: "Backbone",
        split: CIRSplit,
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
        progress: bool = True,
    ) -> "QuerySet":
        index = name_index(split.gallery)
        outside = sorted({q.reference for q in split.queries if q.reference not in index})
        rows = {**index, **{name: len(index) + i for i, name in enumerate(outside)}}
        images = ImageBank.encode(backbone, [split.image_paths[n] for n in split.gallery], transform_kind,
                                  target_ratio, cache_dir, progress)
        if outside:
            images = images + ImageBank.encode(backbone, [split.image_paths[n] for n in outside], transform_kind,
                                               target_ratio, cache_dir, progress)
        reference_rows = torch.tensor([rows[q.reference] for q in split.queries], dtype=torch.long)
        return cls(split, images, reference_rows, backbone.tokenize([query_text(q) for q in split.queries]))

    def __len__(self) -> int:
        return len(self.reference_rows)

    @property
    def gallery_size(self) -> int:
        return len(self.split.gallery)

    @property
    def exclude(self) -> Tensor | None:
        """Each query's reference as a gallery index (``-1`` when outside it) where the protocol
        drops the reference from the ranking (CIRR), else None: the filter's top K then skip it too."""
        if not PROTOCOLS[self.split.dataset].exclude_reference:
            return None
        return torch.where(self.reference_rows < self.gallery_size, self.reference_rows, -1)

    @property
    def max_candidates(self) -> int:
        """The largest K a first stage can hand over: the gallery, less the reference where excluded."""
        exclude = self.exclude
        return self.gallery_size - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)

    def subset(self, n: int | None, seed: int = 0) -> "QuerySet":
        """``n`` queries drawn without replacement (in their split order), for cheap validation; all if None."""
        if n is None or n >= len(self):
            return self
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))
        split = dataclasses.replace(self.split, queries=[self.split.queries[i] for i in rows])
        return QuerySet(split, self.images, self.reference_rows[rows], self.tokens[rows])


@dataclass(frozen=True)
class TrainingData:
    """Training triplets over an :class:`ImageBank` of their distinct reference and target images.

    The images are listed and read as the Combiner's training data and stage 1 list and read
    them (each triplet's reference, then its target; decoded pixels), so their caches serve here.
    """

    images: ImageBank
    reference_rows: Tensor  # [N] long
    target_rows: Tensor  # [N] long
    queries: list[Query]  # for the captions (drawn each epoch)
    dataset: str
    image_paths: tuple[Path, ...] = ()  # row i of ``images`` (for captions of the images themselves)

    @classmethod
    def build(
        cls,
        backbone: "Backbone",
        splits: CIRSplit | Sequence[CIRSplit],
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
        progress: bool = True,
    ) -> "TrainingData":
        splits = [splits] if isinstance(splits, CIRSplit) else list(splits)
        datasets = {s.dataset for s in splits}
        if len(datasets) != 1:
            raise ValueError(f"training splits must come from one benchmark, got {sorted(datasets)}")
        triplets = training_triplets(splits)
        rows: dict[Path, int] = {}
        ref, tgt = [], []
        for s, q in triplets:
            ref.append(rows.setdefault(s.image_paths[q.reference], len(rows)))
            tgt.append(rows.setdefault(s.image_paths[q.target], len(rows)))
        images = ImageBank.encode(backbone, list(rows), transform_kind, target_ratio, cache_dir, progress,
                                  decoded=True)
        return cls(images, torch.tensor(ref), torch.tensor(tgt), [q for _, q in triplets], datasets.pop(), tuple(rows))

    def __len__(self) -> int:
        return len(self.queries)

    def fingerprint(self) -> str:
        """Keys checkpoints to the images' features, the triplets and their captions."""
        captions = [(q.reference, q.target, list(q.captions)) for q in self.queries]
        return fingerprint([self.dataset, tensor_digest(self.images.features, self.reference_rows, self.target_rows),
                            fingerprint(captions)])

    def captions(self, rows: Tensor, rng: np.random.Generator | None) -> list[str]:
        """The captions of triplets ``rows``; with ``rng`` FashionIQ's augmentation (order or one caption)."""
        return [query_text(self.queries[int(i)], rng) for i in rows]


def query_sets(
    backbone: "Backbone",
    splits: Mapping[str, CIRSplit],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> dict[str, QuerySet]:
    """:meth:`QuerySet.build` of every split (e.g. FashionIQ's three validation categories)."""
    return {name: QuerySet.build(backbone, s, transform_kind, target_ratio, cache_dir, progress)
            for name, s in splits.items()}


# --------------------------------------------------------------------------------------------
# The first stage, whatever it is, and re-ranking its top K
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstStage:
    """A first stage as the re-ranker sees it: query and gallery features, ranked by cosine similarity.

    Every first stage of the course fits: the candidate filter (:func:`filter_stage`), the Sum or a
    Combiner on cached features (:func:`combine_stage`), or features from any other method (build
    it directly). The re-ranker reads only its candidate lists; its ``z_t`` always comes from a
    candidate filter.
    """

    query_features: Tensor  # [Q, D]
    gallery_features: Tensor  # [G, D]

    def candidates(self, k: int, exclude: Tensor | None = None, index: IndexConfig | None = None) -> Tensor:
        """Each query's ``k`` best gallery indices ``[Q, k]``, best first, by :func:`cirlib.search.index.build_index`.

        ``exclude`` (``[Q]``, ``-1`` = none, e.g. :attr:`QuerySet.exclude`) is left out of a query's
        list, as the protocol leaves it out of the ranking.
        """
        g = len(self.gallery_features)
        available = g - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)
        if not 1 <= k <= available:
            raise ValueError(f"K={k} candidates asked for, but the gallery holds {g} images"
                             f"{' (one of them the excluded reference)' if available < g else ''}")
        search = build_index(self.gallery_features, index)
        if exclude is None:
            return search.search(self.query_features, k)[1].cpu()
        found = search.search(self.query_features, min(k + 1, g))[1].cpu()
        excluded = found == exclude.view(-1, 1).to(found.device)
        keep = excluded.int().argsort(dim=1, stable=True)  # the excluded item last, the others in order
        return found.gather(1, keep)[:, :k]

    def scores(self) -> Tensor:
        """``[Q, G]`` cosine similarities: the first stage's full ranking."""
        return F.normalize(self.query_features.float(), dim=-1) @ F.normalize(self.gallery_features.float(), dim=-1).T


def combine_stage(combine: CombineFn, reference: Tensor, text: Tensor, gallery: Tensor) -> FirstStage:
    """A first stage from a combining function on cached features: ``combine_sum``, a Combiner, any callable."""
    return FirstStage(apply_combine(combine, reference, text), gallery)


@torch.no_grad()
def filter_stage(filt: CandidateFilter, queries: QuerySet, batch_size: int = 256, amp: bool = True) -> FirstStage:
    """The candidate filter as a first stage: its query embeddings against the gallery's image features."""
    device = next(filt.parameters()).device
    out = []
    with eval_mode(filt), autocast(device, amp):
        for start in range(0, len(queries), batch_size):
            rows = slice(start, start + batch_size)
            refs = queries.images.tokens[queries.reference_rows[rows]].to(device)
            out.append(filt(queries.tokens[rows].to(device), refs)[0].float().cpu())
    embeddings = torch.cat(out) if out else torch.empty(0, queries.images.features.shape[1])
    return FirstStage(embeddings, queries.images.features[: queries.gallery_size])


def encoder_z_input(reranker: DualEncoderReranker, filt: CandidateFilter, tokens: Tensor,
                    reference_tokens: Tensor) -> Tensor:
    """What the re-ranker's Encoder-z_t reads for these captions and references: the frozen filter's
    ``z_t`` (no gradient reaches the filter), or for the Ref_CLS ablation the references' class tokens."""
    if reranker.reference == "cls":
        return reference_tokens[:, :1]
    with torch.no_grad():
        return filt(tokens, reference_tokens)[1]


@torch.no_grad()
def rerank(
    reranker: DualEncoderReranker,
    filt: CandidateFilter,
    queries: QuerySet,
    candidates: Tensor,
    pair_batch_size: int = 256,
    amp: bool = True,
    progress: bool = True,
) -> Tensor:
    """The re-ranker's scores ``[Q, K]`` of each query's candidates (gallery indices ``[Q, K]``).

    Queries go in chunks of about ``pair_batch_size / K``: the filter computes their ``z_t`` once,
    then every (query, candidate) pair of the chunk is scored in one pass. On a CPU small chunks
    are fastest (tiny backbone, K = 50, one thread: 0.064 s a query with 50 pairs a pass, 0.091 with
    1,024); a GPU wants thousands.
    """
    n, k = candidates.shape
    if n != len(queries):
        raise ValueError(f"candidates has {n} rows for {len(queries)} queries")
    if n and not (0 <= int(candidates.min()) and int(candidates.max()) < queries.gallery_size):
        raise ValueError(f"candidate indices must lie in the gallery [0, {queries.gallery_size})")
    device = next(reranker.parameters()).device
    chunk = max(1, pair_batch_size // max(k, 1))
    out = []
    with eval_mode(reranker, filt), autocast(device, amp):
        for start in tqdm(range(0, n, chunk), desc=f"re-ranking top {k}", leave=False, disable=not progress):
            rows = slice(start, start + chunk)
            tokens = queries.tokens[rows].to(device)
            references = queries.images.tokens[queries.reference_rows[rows]].to(device)
            z_t = encoder_z_input(reranker, filt, tokens, references)
            images = queries.images.tokens[candidates[rows].reshape(-1)].to(device)
            scores = reranker(tokens.repeat_interleave(k, dim=0), z_t.repeat_interleave(k, dim=0), images)
            out.append(scores.float().view(-1, k).cpu())
    return torch.cat(out) if out else torch.empty(0, k)


def reorder(candidates: Tensor, scores: Tensor) -> Tensor:
    """Each query's candidates ``[Q, K]`` re-ordered by the re-ranker's ``scores`` ``[Q, K]``, best first;
    ties keep the first stage's order."""
    if candidates.shape != scores.shape or candidates.ndim != 2:
        raise ValueError(f"candidates and scores must both be [Q, K], got {tuple(candidates.shape)} "
                         f"and {tuple(scores.shape)}")
    order = scores.float().argsort(dim=1, descending=True, stable=True)
    return candidates.long().gather(1, order.to(candidates.device))


def ranking_features(first: FirstStage, candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Query and gallery features whose cosine ranking is the two-stage ranking, for the protocols.

    The two-stage ranking puts each query's ``K`` candidates first, in the order of the re-ranker's
    ``scores`` (ties in the first stage's order), then every other gallery image in the first
    stage's order. It is returned as a ``[Q, G]`` score matrix (candidates at ``2 + K - rank``,
    above every cosine, the rest at their cosine) with the ``[G, G]`` identity as gallery features,
    so :func:`~cirlib.evaluation.protocols.per_query_metrics` and
    :func:`~cirlib.evaluation.protocols.evaluate_split` (every metric of FashionIQ, CIRR and its
    Recall_subset, with their exclusions) and :func:`~cirlib.evaluation.protocols.topk` (display
    order, on ``query @ gallery.T``) apply unchanged. Memory is ``Q x G + G x G`` floats: fine for
    validation galleries of thousands of images.
    """
    ranked = reorder(candidates.cpu(), scores.cpu())
    full = first.scores().cpu()
    k = candidates.shape[1]
    top = (2.0 + torch.arange(k, 0, -1, dtype=full.dtype)).expand(len(ranked), k)
    return full.scatter(1, ranked, top), torch.eye(full.shape[1])


def two_stage_metrics(
    queries: Mapping[str, QuerySet],
    firsts: Mapping[str, FirstStage],
    candidates: Mapping[str, Tensor],
    rerank_fn: Callable[[str], Tensor] | None,
) -> dict[str, float]:
    """Protocol metrics of one benchmark's splits, merged as the course's validations merge them
    (:func:`~cirlib.evaluation.protocols.merge_metrics`): the first stage alone when ``rerank_fn``
    is None, else the ranking with each split's candidates re-ordered by ``rerank_fn(name)``."""
    per_split = {}
    for name, qs in queries.items():
        first = firsts[name]
        features = ((first.query_features, first.gallery_features) if rerank_fn is None
                    else ranking_features(first, candidates[name], rerank_fn(name)))
        per_split[name] = evaluate_split(qs.split, *features)
    return merge_metrics(per_split, _one_dataset(queries))


def two_stage_per_query(
    queries: Mapping[str, QuerySet],
    firsts: Mapping[str, FirstStage],
    candidates: Mapping[str, Tensor] | None = None,
    scores: Mapping[str, Tensor] | None = None,
) -> PerQuery:
    """The per-query values behind :func:`two_stage_metrics` (first stage alone when ``scores`` is
    None, else each split's ``candidates`` re-ordered by its re-ranker ``scores``), for bootstrap
    intervals and paired comparisons."""
    _one_dataset(queries)
    per_split = {}
    for name, qs in queries.items():
        first = firsts[name]
        features = ((first.query_features, first.gallery_features) if scores is None or candidates is None
                    else ranking_features(first, candidates[name], scores[name]))
        per_split[name] = {k: v.numpy() for k, v in per_query_metrics(qs.split, *features).items()}
    return PerQuery.from_splits(per_split)


# --------------------------------------------------------------------------------------------
# What re-ranking changes (Table 7, Figs. 4-8)
# --------------------------------------------------------------------------------------------


def target_positions(queries: QuerySet, candidates: Tensor, scores: Tensor | None = None) -> Tensor:
    """``[Q]`` 1-based position of each query's target in its candidate list, re-ordered by ``scores``
    when given (ties keep the first stage's order); 0 where the target is not among the candidates.

    The position in the first stage's top K is the target's rank in the full ranking (the list is
    that ranking's head), so one call gives the ground-truth coverage at every K' <= K (Fig. 6)."""
    if scores is not None:
        candidates = reorder(candidates, scores)
    index = name_index(queries.split.gallery)
    targets = torch.tensor([index.get(q.target, -1) for q in queries.split.queries], dtype=torch.long)
    hit = candidates.long().cpu() == targets.view(-1, 1)
    return torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, 0)


def coverage(positions: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Ground-truth coverage (Fig. 6): the percentage of queries whose target is in the top ``k``,
    from the first stage's :func:`target_positions` (exact for ``k`` up to that list's length)."""
    return {int(k): 100.0 * float(((positions > 0) & (positions <= k)).float().mean()) for k in ks}


def rank_changes(before: Tensor, after: Tensor) -> dict[str, float]:
    """Table 7 for one split: mean target position among the queries whose target the first stage
    put in the candidates (positions > 0), before and after re-ranking, the difference (positive =
    brought forward) and the percentage decrease."""
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} differ")
    if bool(((before > 0) != (after > 0)).any()):
        raise ValueError("re-ranking only re-orders the candidates: a target found before must be found after")
    found = before > 0
    if not bool(found.any()):
        nan = float("nan")
        return {"queries": 0, "initial": nan, "re-ranked": nan, "difference": nan, "decrease %": nan}
    initial, reranked = float(before[found].float().mean()), float(after[found].float().mean())
    return {"queries": int(found.sum()), "initial": initial, "re-ranked": reranked,
            "difference": initial - reranked, "decrease %": 100.0 * (initial - reranked) / initial}


def gains_by_initial_rank(before: Tensor, after: Tensor, edges: Sequence[int]) -> pd.DataFrame:
    """Fig. 8: the mean forward move of the target (initial minus re-ranked position) by bucket of
    its initial position; ``edges`` ``[1, 2, 6, 11, ...]`` make buckets ``[1, 2)``, ``[2, 6)`` ...
    Also the share of the bucket's queries moved forward and moved back."""
    rows = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (before >= lo) & (before < hi)
        n = int(inside.sum())
        moved = (before[inside] - after[inside]).float()
        label = f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
        rows[label] = {"queries": n, "mean gain": float(moved.mean()) if n else float("nan"),
                       "forward %": 100.0 * float((moved > 0).float().mean()) if n else float("nan"),
                       "back %": 100.0 * float((moved < 0).float().mean()) if n else float("nan")}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("initial position")


def ranked_names(queries: QuerySet, candidates: Tensor, scores: Tensor | None = None, k: int = 6) -> list[list[str]]:
    """Each query's top ``k`` gallery names, in the first stage's order or re-ordered by ``scores``
    (rows F and R of Figs. 4-5)."""
    if scores is not None:
        candidates = reorder(candidates, scores)
    gallery = queries.split.gallery
    return [[gallery[int(i)] for i in row[:k]] for row in candidates]


def inference_times(
    reranker: DualEncoderReranker,
    filt: CandidateFilter,
    queries: QuerySet,
    ks: Sequence[int],
    pair_batch_size: int = 256,
    amp: bool = True,
    filter_repeats: int = 20,
) -> pd.DataFrame:
    """Fig. 7 and §4.4: wall-clock seconds per query of the filter (query embeddings and the top-K
    search) and of re-ranking the top K, for each ``k`` in ``ks``, and their ratio.

    Measures what a user waits for on this machine; the numbers move with its load, so nothing
    downstream should compare them exactly. Filtering a hundred queries takes tens of milliseconds,
    so one timing of it is mostly noise, and the ratio's denominator with it: the filter is timed
    ``filter_repeats`` times and the median kept. Re-ranking, hundreds of times slower, is timed once.
    """
    n = len(queries)
    if n == 0:
        raise ValueError("no queries to time")
    if filter_repeats < 1:
        raise ValueError(f"filter_repeats must be >= 1, got {filter_repeats}")
    laps = []
    for _ in range(filter_repeats):
        start = time.perf_counter()
        first = filter_stage(filt, queries, amp=amp)
        first.candidates(max(ks), queries.exclude)
        laps.append(time.perf_counter() - start)
    filter_s = float(np.median(laps)) / n
    rows = {}
    for k in ks:
        candidates = first.candidates(k, queries.exclude)
        start = time.perf_counter()
        rerank(reranker, filt, queries, candidates, pair_batch_size, amp, progress=False)
        rerank_s = (time.perf_counter() - start) / n
        rows[int(k)] = {"filter s/query": filter_s, "re-rank s/query": rerank_s,
                        "re-rank / filter": rerank_s / filter_s}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("K")


def _one_dataset(queries: Mapping[str, QuerySet]) -> str:
    datasets = {qs.split.dataset for qs in queries.values()}
    if len(datasets) != 1:
        raise ValueError(f"validation splits must come from one benchmark, got {sorted(datasets)}")
    return datasets.pop()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterConfig:
    """Candidate-filter training (§3.3.1, §4.1.3). Defaults are the paper's for BLIP ViT-B on an A100:
    AdamW at 2e-5 with weight decay 0.05, a cosine schedule to 0, batches of 512, 10 epochs.

    ``layers=None`` copies every block of the text tower; ``epoch_size`` (triplets per epoch,
    None = all) and ``patience`` are CPU-budget knobs; ``main_metric=None`` selects by the
    benchmark's metric (:data:`~cirlib.evaluation.protocols.MAIN_METRICS`).
    """

    layers: int | None = None
    init_temperature: float = 0.07  # Eq. 1's lambda starts at 1 / 0.07, as CLIP's and BLIP's
    lr: float = 2e-5
    weight_decay: float = 0.05
    batch_size: int = 512
    epochs: int = 10
    patience: int | None = None
    epoch_size: int | None = None
    caption_augment: bool = True  # FashionIQ: random caption order or a single caption
    main_metric: str | None = None
    seed: int = 0
    amp: bool = True
    progress: bool = True

    @classmethod
    def for_tiny(cls, **overrides: Any) -> "FilterConfig":
        """The tiny backbone on a 2-core CPU: its whole 4-block text tower, batches of 64 at a larger
        learning rate (new cross-attention layers, minutes instead of hours), 4 epochs of 3,000
        triplets, patience 2. On this project's 2-core CPU (idle) a step takes 0.22 to 0.25 s and
        training with its validations 47 s (``fashion``) to 61 s (CIRR); it lifted the embedded
        FashionIQ average from the zero-shot Sum's 23.2 to 31.8 and CIRR R@1 from 9.7 to 28.8."""
        tiny = {"lr": 1e-4, "batch_size": 64, "epochs": 4, "epoch_size": 3000, "patience": 2}
        return cls(**{**tiny, **overrides})


@dataclass(frozen=True)
class RerankerConfig:
    """Re-ranker training (§3.3.2, §4.1.3). Defaults are the paper's: AdamW at 2e-5, weight decay
    0.05, a cosine schedule to 0, batches of 16 (each query against the batch's 16 targets), 50
    epochs (FashionIQ; CIRR 80), every block of the text tower in both encoders.

    ``merge``, ``shared_feedforward``, ``encoders`` and ``reference`` select the architecture's
    ablations (Tables 3-4). ``keep="best"`` validates every epoch, re-ranking each query's top ``k``
    filter candidates (default the benchmark's :data:`PAPER_K`) of ``val_queries`` queries per split
    (None = all), and keeps the best epoch; ``keep="last"`` trains the whole schedule without
    validating and keeps its last epoch, for when a validation affordable every epoch is too small
    to tell epochs apart.
    """

    layers: int | None = None
    merge: Merge = "half"
    shared_feedforward: bool = True
    encoders: Encoders = "both"
    reference: Reference = "z_t"
    lr: float = 2e-5
    weight_decay: float = 0.05
    batch_size: int = 16
    epochs: int = 50
    patience: int | None = None
    epoch_size: int | None = None
    caption_augment: bool = True
    hard_negatives: int = 0  # per query, the filter's top-ranked training images other than its target (paper: 0)
    main_metric: str | None = None
    k: int | None = None
    val_queries: int | None = None
    keep: Literal["best", "last"] = "best"
    pair_batch_size: int = 256  # (query, candidate) pairs scored at once (CPU caches favour few; raise it on a GPU)
    seed: int = 0
    amp: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"Eq. 2 needs other targets in the batch: batch_size must be >= 2, got {self.batch_size}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.keep == "last" and (self.patience is not None or self.main_metric is not None):
            raise ValueError("keep='last' validates no epoch, so it takes neither patience nor main_metric")

    @classmethod
    def for_tiny(cls, dataset: str | None = None, matched: bool = False, **overrides: Any) -> "RerankerConfig":
        """The tiny backbone on a 2-core CPU: two blocks per encoder (one averaging, one linear merge), the
        paper's batch of 16 (256 scored pairs a step), and ``dataset``'s own schedule where
        :data:`TINY_SCHEDULES` has one, else the budget schedule: 3 epochs of 480 triplets, and the last epoch kept,
        where the cosine schedule ends. A validation after every epoch on the 60 queries per split that the
        budget allowed could not tell epochs apart: the embedded CIRR re-ranker's R@1 read 5.0, 0.0 and 3.3
        after its three epochs (3, 0 and 2 queries) while its training loss fell from 2.31 to 0.88, and
        validating on every query would cost more than the training. On this project's 2-core CPU (idle) a
        step takes 0.44 s (``fashion``) to 0.70 s (CIRR's longer captions) and re-ranking a query's top 50
        about 0.04 to 0.06 s. The learning rate: at 1e-4 the loss barely moved in those steps (2.09 after 3
        epochs on embedded CIRR, chance being ln 16 = 2.77), at 3e-4 it fell to 0.92. Even so the re-ranker
        stays below the filter at this budget (fp32, full validation sets: ``fashion`` R@10 6.3 against the
        filter's 10.9 at K = 100, CIRR R@1 5.8 against 28.6 at K = 50): the paper trains it 5 to 8 times longer
        than the filter. :data:`TINY_SCHEDULES` says what a longer schedule buys on each benchmark; the
        filter's 8 top-ranked training images as each query's extra negatives (``hard_negatives=8``) bring
        CIRR level with its filter over 12 epochs, but lower ``fashion``'s R@10 instead (7.4). ``matched=True``
        takes ``dataset``'s :data:`MATCHED_SCHEDULES` entry instead, for a re-ranker started from
        :func:`pretrain_matching`."""
        schedules = MATCHED_SCHEDULES if matched else TINY_SCHEDULES
        tiny = {"layers": 2, "lr": 3e-4, "epochs": 3, "epoch_size": 480, "keep": "last",
                **TINY_SCHEDULES.get(dataset or "", {}), **schedules.get(dataset or "", {})}
        return cls(**{**tiny, **overrides})


TINY_SCHEDULES: dict[str, dict[str, int]] = {"fashioniq": {"epochs": 6, "epoch_size": 1500}}
"""Benchmarks whose tiny re-ranker trains longer than :meth:`RerankerConfig.for_tiny`'s budget schedule.
On ``fashion`` 6 epochs of 1,500 in-batch triplets (about 2 minutes on a 2-core CPU in fp32) take it from
well below its filter (R@10 6.3 against 10.9 at the budget) to level with it (10.4), for the price of one
extra minute or two; twelve epochs move it no further beyond noise (11.6). CIRR's re-ranker gains as much
from that schedule (R@1 5.8 to 21.4) but stays well below its filter (28.6) and costs twice as long (its
captions are longer); it reaches its filter only with the filter's negatives over 12 epochs, about 17
minutes, or beats it after matching pretraining (:data:`MATCHED_SCHEDULES`, about 9 minutes more), so
CIRR keeps the budget schedule."""


MATCHED_SCHEDULES: dict[str, dict[str, int]] = {"cirr": {"epochs": 6, "epoch_size": 1500, "hard_negatives": 8}}
"""Benchmarks whose tiny re-ranker, started from :func:`pretrain_matching`, trains on a schedule of its own.
On embedded CIRR (fp32, 2-core CPU, every validation query re-ranked at K = 50; a probe before this
function existed, with its own draw of the matching batches) matching pretraining for 400 steps (about 3
minutes), then 6 epochs of 1,500 triplets with the filter's 8 top-ranked training images as each query's
extra negatives (about 6 minutes) gave R@1 34.4 against the filter's 28.6 (+5.8 [2.3, 9.6]), the first
re-ranker here to beat its filter beyond noise (notebook 08 with ``matching = True``: 35.2, +6.6 [2.9,
10.3]); 3 such epochs gave 23.8, and the budget schedule 10.6 with matching pretraining (5.8 without). It
costs about 9 minutes more than the budget schedule, so notebook 08 runs it only when asked (its
``matching`` parameter). On ``fashion`` matching pretraining did not help (R@10 5.7 against 6.3 at the
budget schedule, 8.2 against 10.4 before 6 epochs of 1,500 in-batch triplets), so it has no entry."""


@dataclass(frozen=True)
class MatchingConfig:
    """Image-text matching pretraining (:func:`pretrain_matching`): a one-stream re-ranker of ``layers``
    blocks (None = the whole text tower) learns, in batches of ``batch_size`` training images, which
    image each absolute caption describes, over ``epochs`` draws of ``epoch_size`` images (None = all),
    with AdamW and a cosine schedule to 0. The defaults, 400 steps of 24, took the embedded CIRR matching
    loss from ln 24 = 3.18 to about 0.2 in about 3 minutes on a 2-core CPU (``fashion``'s shorter
    captions: 80 s)."""

    layers: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 24
    epochs: int = 4
    epoch_size: int | None = 2400
    seed: int = 0
    amp: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"matching needs other images in a batch: batch_size must be >= 2, not {self.batch_size}")


def image_captions(train: TrainingData, roots: Sequence[Path | str]) -> list[str]:
    """The absolute caption of each of ``train``'s images (row order), from the generated ``roots``' attributes.

    Real CIR datasets label no image with a caption: their training images raise a ValueError naming the
    first one, and such a re-ranker trains without matching pretraining.
    """
    if not train.image_paths:
        raise ValueError("this TrainingData lists no image paths (build it with TrainingData.build)")
    captions = {Path(item.path).resolve(): item.caption for item in load_attributed_images(roots, "train")}
    missing = [p for p in train.image_paths if Path(p).resolve() not in captions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(train.image_paths)} training images have no generated attributes "
                         f"in {[str(r) for r in roots]}, e.g. {missing[0]}: matching pretraining needs the "
                         "generated benchmarks' captions")
    return [captions[Path(p).resolve()] for p in train.image_paths]


def _optimizer_and_schedule(
    module: nn.Module, lr: float, weight_decay: float, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps), eta_min=0.0)


def _training_loop(
    name: str,
    module: nn.Module,
    config: FilterConfig | RerankerConfig | MatchingConfig,
    n: int,
    device: torch.device,
    ckpt_path: Path | str | None,
    inputs: Mapping[str, Any],
    desc: str,
    main_metric: str | None = None,
    patience: int | None = None,
) -> TrainingLoop:
    """What every training here shares: AdamW with a cosine schedule to 0 over ``config``'s steps (epochs of
    ``epoch_size`` of ``n`` items) and one resumable :class:`TrainingLoop` of ``module``, fingerprinted by
    ``inputs`` plus the config and the precision."""
    steps = config.epochs * _steps_per_epoch(n, config.epoch_size, config.batch_size)
    optimizer, scheduler = _optimizer_and_schedule(module, config.lr, config.weight_decay, steps)
    return TrainingLoop(
        modules={name: module},
        optimizer=optimizer,
        scaler=grad_scaler(device, config.amp),
        ckpt_path=Path(ckpt_path) if ckpt_path is not None else None,
        fingerprint={**inputs, "config": _config_key(config), "precision": precision(device, config.amp)},
        epochs=config.epochs,
        seed=config.seed,
        main_metric=main_metric,
        patience=patience,
        scheduler=scheduler,
        desc=desc,
        progress=config.progress,
        meta={"hparams": module.hparams, "config": _config_key(config)},
    )


def _steps_per_epoch(n: int, epoch_size: int | None, batch_size: int) -> int:
    drawn = min(n, epoch_size or n)
    return max(1, drawn // batch_size) if drawn >= 2 else 0


def _val_key(val: Mapping[str, QuerySet]) -> list:
    """What of the validation data decides the kept epoch: split identity, images (by their features, so not
    by where they lie) and queries."""
    return [(name, qs.split.dataset, qs.split.split, len(qs),
             tensor_digest(qs.tokens, qs.reference_rows, qs.images.features))
            for name, qs in sorted(val.items())]


def _config_key(config: FilterConfig | RerankerConfig | MatchingConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "progress"}


def _epochs(
    n: int,
    batch_size: int,
    epoch_size: int | None,
    seed: int,
    loop: TrainingLoop,
    batch_loss: Callable[..., Tensor],
    modules: Sequence[nn.Module],
    progress: bool,
    captions: Callable[[Tensor, np.random.Generator], list[str]] | None = None,
) -> Callable[[int], float]:
    """``train_epoch`` of every training here: a reseeded draw of ``epoch_size`` of ``n`` items in batches, one
    step each; ``batch_loss(rows)``, or ``batch_loss(rows, captions(rows, rng))`` where the captions are drawn
    (the triplets' own, FashionIQ's augmentation seeded per epoch)."""

    def train_epoch(epoch: int) -> float:
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        rng = np.random.default_rng(epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=gen)[:epoch_size]
        for module in modules:
            module.train()
        losses = []
        for batch in tqdm(list(batch_slices(order, batch_size)), desc=f"epoch {epoch}", leave=False,
                          disable=not progress):
            loss = partial(batch_loss, batch) if captions is None else partial(batch_loss, batch, captions(batch, rng))
            losses.append(optimizer_step(loop.optimizer, loop.scaler, [loss], loop.scheduler))
        return float(np.mean(losses))

    return train_epoch


def train_filter(
    backbone: "Backbone",
    train: TrainingData,
    val: Mapping[str, QuerySet],
    config: FilterConfig = FilterConfig(),
    ckpt_path: Path | str | None = None,
) -> tuple[CandidateFilter, list[dict]]:
    """Train a candidate filter initialised from ``backbone``'s text tower; return it (best epoch) and the history.

    The backbone is not modified (the filter copies its text tower; the image tower is only read
    through ``train``'s and ``val``'s cached outputs). Each epoch is validated on ``val`` (one
    benchmark's splits) by the protocol metrics of the filter's own ranking. Runs on the
    backbone's device.
    """
    device = backbone.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        filt = CandidateFilter.from_backbone(backbone, config.layers, config.init_temperature)
    dataset = _one_dataset(val)
    loop = _training_loop(
        "filter", filt, config, len(train), device, ckpt_path,
        {"stage": "candidate-filter", "backbone": backbone.fingerprint, "data": train.fingerprint(),
         "val": _val_key(val)},
        "candidate filter", config.main_metric or main_metric_for(dataset), config.patience,
    )

    def batch_loss(rows: Tensor, texts: list[str]) -> Tensor:
        tokens = backbone.tokenize(texts).to(device)
        references = train.images.tokens[train.reference_rows[rows]].to(device)
        targets = train.images.features[train.target_rows[rows]].to(device)
        with autocast(device, config.amp):
            query, _ = filt(tokens, references)
        return batch_contrastive_loss(query, targets, filt.scale)

    def validate() -> dict[str, float]:
        firsts = {name: filter_stage(filt, qs, amp=config.amp) for name, qs in val.items()}
        return two_stage_metrics(val, firsts, {}, None)

    train_epoch = _epochs(len(train), config.batch_size, config.epoch_size, config.seed, loop, batch_loss, [filt],
                          config.progress,
                          lambda rows, rng: train.captions(rows, rng if config.caption_augment else None))
    history = loop.run(train_epoch, validate)
    filt.eval()
    return filt, history


@torch.no_grad()
def filter_negatives(
    filt: CandidateFilter, backbone: "Backbone", train: TrainingData, n: int, batch_size: int = 256, amp: bool = True
) -> Tensor:
    """``[N, n]`` rows of ``train.images``: for each training triplet, the images the filter ranks
    highest for its query among the training images, its reference and target left out.

    They are the negatives re-ranking meets at inference (the first stage's top K), where random
    in-batch targets are mostly easy: on benchmarks whose captions name the target's content, a
    caption alone tells its target from random images, so Eq. 2 with in-batch negatives only never
    asks the re-ranker to read the reference (z_t).
    """
    if not 1 <= n <= len(train.images) - 2:
        raise ValueError(f"n must be in [1, {len(train.images) - 2}] (training images other than the pair), got {n}")
    device = next(filt.parameters()).device
    out = []
    with eval_mode(filt), autocast(device, amp):
        for start in range(0, len(train), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(train)))
            tokens = backbone.tokenize(train.captions(rows, None)).to(device)
            out.append(filt(tokens, train.images.tokens[train.reference_rows[rows]].to(device))[0].float().cpu())
    found = FirstStage(torch.cat(out), train.images.features).candidates(n + 2)
    pair = (found == train.target_rows.view(-1, 1)) | (found == train.reference_rows.view(-1, 1))
    return found.gather(1, pair.int().argsort(dim=1, stable=True))[:, :n]


def pretrain_matching(
    backbone: "Backbone",
    images: ImageBank,
    captions: Sequence[str],
    config: MatchingConfig = MatchingConfig(),
    ckpt_path: Path | str | None = None,
) -> tuple[DualEncoderReranker, list[dict]]:
    """Train a one-stream re-ranker (Encoder-t) to match ``images`` with their ``captions``; return it and the history.

    Each step draws a batch of images and scores every caption of the batch against every image through
    cross-attention on the patch tokens (:meth:`DualEncoderReranker.pairwise`), trained with
    :func:`~cirlib.methods.losses.matching_loss` (equal captions count as positives of each other). No
    validation: the last epoch is kept, where the cosine schedule ends. Pass the result to
    :func:`train_reranker` as ``matcher``.
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    device = backbone.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        matcher = DualEncoderReranker.from_backbone(backbone, config.layers, encoders="t")
    tokens = backbone.tokenize(list(captions))
    groups = torch.from_numpy(np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1].astype(np.int64))
    loop = _training_loop(
        "matcher", matcher, config, len(images), device, ckpt_path,
        {"stage": "image-text matching", "backbone": backbone.fingerprint,
         "data": fingerprint([tensor_digest(images.features), list(captions)])},
        "image-text matching",
    )
    no_z_t = torch.zeros(len(images), 1, 1)  # Encoder-t alone reads no z_t

    def batch_loss(rows: Tensor) -> Tensor:
        with autocast(device, config.amp):
            logits = matcher.pairwise(tokens[rows].to(device), no_z_t[rows].to(device),
                                      images.tokens[rows].to(device))
        return matching_loss(logits, groups[rows].to(device))

    train_epoch = _epochs(len(images), config.batch_size, config.epoch_size, config.seed, loop, batch_loss, [matcher],
                          config.progress)
    history = loop.run(train_epoch, None)
    matcher.eval()
    return matcher, history


def train_reranker(
    backbone: "Backbone",
    filt: CandidateFilter,
    train: TrainingData,
    val: Mapping[str, QuerySet],
    config: RerankerConfig = RerankerConfig(),
    ckpt_path: Path | str | None = None,
    matcher: DualEncoderReranker | None = None,
) -> tuple[DualEncoderReranker, list[dict]]:
    """Train a dual-encoder re-ranker on top of a trained, frozen ``filt``; return it (the kept epoch)
    and the history.

    With ``config.keep="best"`` each epoch is validated by the protocol metrics of the two-stage
    ranking on ``val``: the filter's top ``config.k`` of ``config.val_queries`` queries per split,
    re-ranked; with ``"last"`` nothing is validated and ``val`` only names the benchmark. With a
    ``matcher`` from :func:`pretrain_matching` both encoders start from it
    (:meth:`DualEncoderReranker.initialise_from`), else from the backbone's text tower. The
    backbone, the filter and the matcher are not modified.
    """
    device = backbone.device
    dataset = _one_dataset(val)
    validating = config.keep == "best"
    k = config.k or PAPER_K.get(dataset, 50)
    smallest = min(qs.max_candidates for qs in val.values())
    if validating and k > smallest:
        warnings.warn(f"validation re-ranks the top {smallest}, not {k}: a validation gallery holds only "
                      f"{smallest} candidates", stacklevel=2)
        k = smallest
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        reranker = DualEncoderReranker.from_backbone(backbone, config.layers, config.merge,
                                                     config.shared_feedforward, config.encoders, config.reference)
    if matcher is not None:
        reranker.initialise_from(matcher)
    loop = _training_loop(
        "reranker", reranker, config, len(train), device, ckpt_path,
        {"stage": "reranker", "backbone": backbone.fingerprint, "filter": state_digest(filt),
         "data": train.fingerprint(), "val": _val_key(val) if validating else None,
         **({"matcher": state_digest(matcher)} if matcher is not None else {})},  # older checkpoints stay valid
        "re-ranker", (config.main_metric or main_metric_for(dataset)) if validating else None, config.patience,
    )

    hard = (filter_negatives(filt, backbone, train, config.hard_negatives, amp=config.amp)
            if config.hard_negatives and not loop.finished else None)

    def batch_loss(rows: Tensor, texts: list[str]) -> Tensor:
        tokens = backbone.tokenize(texts).to(device)
        references = train.images.tokens[train.reference_rows[rows]].to(device)
        targets = train.images.tokens[train.target_rows[rows]].to(device)
        with autocast(device, config.amp):
            z_t = encoder_z_input(reranker, filt, tokens, references)
            scores = reranker.pairwise(tokens, z_t, targets)
            extra = None
            if hard is not None:
                h = hard.shape[1]
                negatives = train.images.tokens[hard[rows].reshape(-1)].to(device)
                extra = reranker(tokens.repeat_interleave(h, dim=0), z_t.repeat_interleave(h, dim=0),
                                 negatives).view(len(rows), h)
        return reranking_loss(scores, extra)

    subsets = {name: qs.subset(config.val_queries, config.seed) for name, qs in val.items()}
    state: dict[str, dict] = {}

    def validate() -> dict[str, float]:
        if not state:  # the filter is frozen: its candidates are computed once
            state["firsts"] = {name: filter_stage(filt, qs, amp=config.amp) for name, qs in subsets.items()}
            state["candidates"] = {name: state["firsts"][name].candidates(k, qs.exclude)
                                   for name, qs in subsets.items()}
        return two_stage_metrics(
            subsets, state["firsts"], state["candidates"],
            lambda name: rerank(reranker, filt, subsets[name], state["candidates"][name], config.pair_batch_size,
                                config.amp, progress=False),
        )

    train_epoch = _epochs(len(train), config.batch_size, config.epoch_size, config.seed, loop, batch_loss, [reranker],
                          config.progress,
                          lambda rows, rng: train.captions(rows, rng if config.caption_augment else None))
    history = loop.run(train_epoch, validate if validating else None)
    reranker.eval()
    return reranker, history


__all__ = [
    "MATCHED_SCHEDULES", "PAPER_K", "TINY_SCHEDULES", "FilterConfig", "FirstStage", "ImageBank", "MatchingConfig",
    "QuerySet", "RerankerConfig", "TrainingData", "combine_stage", "coverage", "encoder_z_input", "filter_negatives",
    "filter_stage", "gains_by_initial_rank", "image_captions", "inference_times", "pretrain_matching",
    "query_sets", "rank_changes", "ranked_names", "ranking_features", "reorder", "rerank", "target_positions",
    "train_filter", "train_reranker", "two_stage_metrics", "two_stage_per_query",
]
