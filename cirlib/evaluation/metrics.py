"""Retrieval metrics of the CIR benchmarks, computed from query x gallery score matrices.

Conventions shared by every function here:

* ``scores[q, g]`` is how well gallery item ``g`` answers query ``q`` (higher is better).
* Ranks are 0-based (rank 0 = first result) and Recall@K counts ``rank < K``.
* **Ties are pessimistic**: every other item scoring exactly the target's score is ranked before
  it. Real features almost never tie, but a collapsed model (random init, diverged training) maps
  all images to one vector; any stable order would then report the gallery order as retrieval
  quality, whereas the pessimistic rule scores it zero. ``topk`` (a display order) is stable.
* A target that cannot be ranked -- index ``-1`` (not in the gallery, e.g. a missing image file)
  or an excluded item -- is a miss at every K, never an error: its rank is ``MISS_RANK``.
* Excluded items (the reference image in CIRR) leave the ranking, as if their score
  were ``-inf``.
* Work is done in row chunks of about :data:`cirlib.core.tensors.CHUNK_ELEMENTS` comparisons, so a
  10k x 10k score matrix costs tens of MB of extra memory, on CPU or GPU alike (results stay on the
  scores' device).

Benchmark protocols (which metrics, which exclusions) are applied by
:func:`cirlib.evaluation.protocols.per_query_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from cirlib.core.tensors import row_chunks
from cirlib.data.datasets import CIRCO_ASPECTS

MISS_RANK = torch.iinfo(torch.long).max
IndexLike = Tensor | Sequence[int] | Sequence[Sequence[int]]


# ----------------------------------------------------------------------------- names -> indices
def name_index(gallery_names: Sequence[str]) -> dict[str, int]:
    """Map gallery names to positions; a duplicated name would make every lookup ambiguous."""
    index: dict[str, int] = {}
    for i, name in enumerate(gallery_names):
        if name in index:
            raise ValueError(f"gallery name {name!r} appears twice (positions {index[name]} and {i})")
        index[name] = i
    return index


def indices_of(names: Sequence[str | None], index: Mapping[str, int]) -> Tensor:
    """Gallery index of each name, ``-1`` where the name is ``None`` or not in the gallery."""
    return torch.tensor([index.get(name, -1) for name in names], dtype=torch.long)


def index_lists(lists: Sequence[Sequence[str]], index: Mapping[str, int]) -> Tensor:
    """``[Q, M]`` distinct gallery indices per row (first occurrence kept), padded with ``-1``.

    Names outside the gallery are dropped; callers that need the annotated count (the mAP
    denominator) take it from the names themselves.
    """
    rows = [list(dict.fromkeys(index[name] for name in names if name in index)) for names in lists]
    out = torch.full((len(rows), max([1, *map(len, rows)])), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- checks, masking
def _check_scores(scores: Tensor) -> tuple[int, int]:
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a float [queries, gallery] matrix, got shape {tuple(scores.shape)} "
            f"and dtype {scores.dtype}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the features that produced them")
    return scores.shape[0], scores.shape[1]


def _as_index(idx: IndexLike, n_queries: int, n_gallery: int, what: str, device: torch.device) -> Tensor:
    """Validate gallery indices (one value or one row per query) and return them as ``[Q, M]``."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx[:, None]
    if idx.dim() != 2 or idx.shape[0] != n_queries:
        raise ValueError(f"{what} must have one entry per query ({n_queries}), got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= n_gallery):
        raise ValueError(f"{what} must hold gallery indices in [0, {n_gallery}) or -1 for 'absent'")
    return idx


def _as_exclude(exclude_idx: IndexLike | None, n_queries: int, n_gallery: int, device: torch.device) -> Tensor | None:
    return None if exclude_idx is None else _as_index(exclude_idx, n_queries, n_gallery, "exclude_idx", device)


def mask_excluded(scores: Tensor, exclude_idx: Tensor | None) -> Tensor:
    """``scores`` with ``-inf`` at the excluded ``[Q]`` or ``[Q, E]`` indices (``-1`` = none), as a copy."""
    if exclude_idx is None:
        return scores
    excluded = exclude_idx.to(scores.device).reshape(len(scores), -1)
    keep = excluded >= 0
    rows = torch.arange(len(scores), device=scores.device)[:, None].expand_as(excluded)
    out = scores.clone()
    out[rows[keep], excluded[keep]] = float("-inf")
    return out


def _gather(scores: Tensor, idx: Tensor, exclude_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """Scores at ``idx [Q, M]`` and whether each entry is rankable (present and not excluded)."""
    alive = idx >= 0
    if exclude_idx is not None:
        alive &= ~(idx[:, :, None] == exclude_idx[:, None, :]).any(-1)
    values = scores.gather(1, idx.clamp(min=0)).masked_fill(~alive, float("-inf"))
    return values, alive


def _earlier(width: int, device: torch.device) -> Tensor:
    """``[j, i]`` is True where column ``i`` comes before column ``j``."""
    return torch.ones(width, width, dtype=torch.bool, device=device).tril(-1)


def _count_at_least(scores: Tensor, values: Tensor, exclude_idx: Tensor | None) -> Tensor:
    """Per row, how many non-excluded gallery scores are ``>= values[q, m]`` (``[Q, M]``).

    Excluded items are subtracted afterwards rather than masked, which saves copying the
    score matrix (the comparison itself is the whole cost).
    """
    n_queries, n_gallery = scores.shape
    width = values.shape[1]
    counts = torch.empty((n_queries, width), dtype=torch.long, device=scores.device)
    for rows in row_chunks(n_queries, width * n_gallery):
        counts[rows] = (scores[rows, None, :] >= values[rows, :, None]).sum(-1, dtype=torch.int32)
    if exclude_idx is not None:
        duplicate = (exclude_idx[:, :, None] == exclude_idx[:, None, :]) & _earlier(exclude_idx.shape[1], scores.device)
        counted = (exclude_idx >= 0) & ~duplicate.any(-1)
        excluded = scores.gather(1, exclude_idx.clamp(min=0))
        counts -= ((excluded[:, None, :] >= values[:, :, None]) & counted[:, None, :]).sum(-1)
    return counts


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    return ks


# ----------------------------------------------------------------------------- ranks
def rank_of(scores: Tensor, target_idx: IndexLike, exclude_idx: IndexLike | None = None) -> Tensor:
    """0-based rank of each query's target among the non-excluded gallery (pessimistic ties).

    ``target_idx`` is ``[Q]`` (``-1`` = absent); ``exclude_idx`` is ``[Q]`` or ``[Q, E]``.
    Absent or excluded targets get ``MISS_RANK``.
    """
    n_queries, n_gallery = _check_scores(scores)
    target = _as_index(target_idx, n_queries, n_gallery, "target_idx", scores.device)
    if target.shape[1] != 1:
        raise ValueError(f"target_idx must be one index per query, got shape {tuple(target.shape)}")
    exclude = _as_exclude(exclude_idx, n_queries, n_gallery, scores.device)
    target_scores, alive = _gather(scores, target, exclude)
    ranks = _count_at_least(scores, target_scores, exclude) - 1  # the count includes the target
    return torch.where(alive, ranks, MISS_RANK)[:, 0]


def subset_rank(
    scores: Tensor, target_idx: IndexLike, group_idx: IndexLike, exclude_idx: IndexLike | None = None
) -> Tensor:
    """Rank of the target among its group only (CIRR Recall_subset), excluded members left out.

    ``group_idx [Q, M]`` lists each query's group members (``-1`` padding). A target outside its
    group, absent or excluded is a miss (``MISS_RANK``).
    """
    n_queries, n_gallery = _check_scores(scores)
    group = _as_index(group_idx, n_queries, n_gallery, "group_idx", scores.device)
    target = _as_index(target_idx, n_queries, n_gallery, "target_idx", scores.device)
    exclude = _as_exclude(exclude_idx, n_queries, n_gallery, scores.device)
    group_scores, alive = _gather(scores, group, exclude)
    is_target = (group == target) & alive
    position = torch.where(is_target.any(1), is_target.long().argmax(1), -1)
    return rank_of(group_scores, position)


def average_precision(
    scores: Tensor,
    gt_idx: IndexLike,
    ks: Sequence[int],
    n_gt: IndexLike | None = None,
    exclude_idx: IndexLike | None = None,
) -> Tensor:
    """Per-query AP@K in [0, 1], shape ``[Q, len(ks)]`` (iSEARLE Eq. 7 before the mean).

    AP@K = sum over ranks r <= K of P@r * rel(r), divided by min(K, #GT). ``gt_idx [Q, M]`` holds
    distinct ground-truth indices (``-1`` padding); ``n_gt`` is the annotated #GT per query, which
    may exceed the ones present in the gallery (default: the listed ones). Ties are pessimistic:
    non-GT items tied with a GT rank before it (order among tied GTs does not change AP).
    """
    ks = _check_ks(ks)
    n_queries, n_gallery = _check_scores(scores)
    gts = _as_index(gt_idx, n_queries, n_gallery, "gt_idx", scores.device)
    exclude = _as_exclude(exclude_idx, n_queries, n_gallery, scores.device)
    counts = (gts >= 0).sum(1) if n_gt is None else torch.as_tensor(n_gt, dtype=torch.long, device=scores.device)
    if counts.shape != (n_queries,):
        raise ValueError(f"n_gt must have one count per query ({n_queries}), got shape {tuple(counts.shape)}")

    gt_scores, alive = _gather(scores, gts, exclude)
    at_least = _count_at_least(scores, gt_scores, exclude)
    # Relations among a query's own ground truths: [Q, j, i] compares GT i with GT j.
    other, this = gt_scores[:, None, :], gt_scores[:, :, None]
    both = alive[:, None, :] & alive[:, :, None]
    gt_above = ((other > this) & both).sum(-1)
    gt_tied = ((other == this) & both).sum(-1)
    gt_tied_before = ((other == this) & both & _earlier(gts.shape[1], scores.device)).sum(-1)

    # Everything scoring >= this GT goes first, except the GTs tied with it and ranked after it.
    ranks = at_least - gt_tied + gt_tied_before
    precision = (gt_above + gt_tied_before + 1).double() / (ranks + 1).double()
    out = torch.zeros((n_queries, len(ks)), dtype=torch.float64, device=scores.device)
    for col, k in enumerate(ks):
        hits = precision.masked_fill(~alive | (ranks >= k), 0.0).sum(1)
        denominator = counts.clamp(max=k).double()
        out[:, col] = torch.where(denominator > 0, hits / denominator.clamp(min=1), 0.0)
    return out


# ----------------------------------------------------------------------------- aggregation
def per_query_hits(ranks: Tensor, ks: Sequence[int], prefix: str = "R") -> dict[str, Tensor]:
    """``{f"{prefix}@{k}": 100 where rank < k else 0}`` per query, so means are percentages."""
    return {f"{prefix}@{k}": (ranks < k).double() * 100.0 for k in _check_ks(ks)}


def summarise(per_query: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean of each per-query metric (as Python floats)."""
    out = {}
    for name, values in per_query.items():
        if values.numel() == 0:
            raise ValueError(f"cannot average {name} over zero queries")
        out[name] = float(values.double().mean())
    return out


CIRR_RECALLS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3")
"""The seven recalls CIRR's tables report; CLIP4Cir's scripts select CIRR models by their mean."""


def with_cirr_average(results: dict[str, float]) -> dict[str, float]:
    """Add CIRR's headline ``avg`` = (R@5 + Rsubset@1) / 2 when both are present, and
    ``recall_mean``, the mean of the seven recalls (the model-selection score), when all are."""
    if "R@5" in results and "Rsubset@1" in results:
        results["avg"] = (results["R@5"] + results["Rsubset@1"]) / 2
    if all(k in results for k in CIRR_RECALLS):
        results["recall_mean"] = sum(results[k] for k in CIRR_RECALLS) / len(CIRR_RECALLS)
    return results


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over FashionIQ categories (as the papers report), plus ``average`` =
    mean of R@10 and R@50 (CLIP4Cir's single headline number)."""
    if not per_category:
        raise ValueError("fashioniq_average needs at least one category")
    names = [list(metrics) for metrics in per_category.values()]
    if any(set(n) != set(names[0]) for n in names):
        raise ValueError(f"categories report different metrics: { {c: sorted(m) for c, m in per_category.items()} }")
    out = {name: sum(m[name] for m in per_category.values()) / len(per_category) for name in names[0]}
    if "R@10" in out and "R@50" in out:
        out["average"] = (out["R@10"] + out["R@50"]) / 2
    return out


def group_members(labels: Sequence[str | Sequence[str]], order: Sequence[str] = CIRCO_ASPECTS) -> dict[str, Tensor]:
    """Group name -> boolean mask over the queries, from one label (or a sequence of labels) per query.

    A query with several labels belongs to each of their groups, so groups may overlap; one with none
    belongs to no group. Groups named in ``order`` come first, in that order, then the others sorted:
    tables by CIRCO aspect then read in the official order whatever the queries hold.
    """
    sets = [(g,) if isinstance(g, str) else tuple(g) for g in labels]
    found = {name for names in sets for name in names}
    names = [g for g in order if g in found] + sorted(found - set(order))
    return {name: torch.tensor([name in s for s in sets], dtype=torch.bool) for name in names}


def per_aspect(values: Tensor | Mapping[str, Tensor], aspects: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Mean per-query metric for each semantic aspect; a query counts in each of its aspects.

    ``values`` is one ``[Q]`` tensor (column ``value``) or ``{metric: [Q] tensor}``. Rows follow
    CIRCO's official aspect order, then any other aspect alphabetically (:func:`group_members`);
    ``queries`` = row size.
    """
    columns = {"value": values} if isinstance(values, Tensor) else dict(values)
    columns = {name: v.detach().double().cpu().reshape(-1) for name, v in columns.items()}
    for name, v in columns.items():
        if len(v) != len(aspects):
            raise ValueError(f"{name} has {len(v)} values for {len(aspects)} queries' aspects")
    rows = {aspect: {name: float(v[mask].mean()) for name, v in columns.items()} | {"queries": int(mask.sum())}
            for aspect, mask in group_members(aspects).items()}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*columns, "queries"])
    frame.index.name = "aspect"
    return frame
