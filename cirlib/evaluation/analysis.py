"""The numbers behind CLIP4Cir's analysis figures (§4.8-4.9, Figs. 7-12).

- :func:`pairwise_similarities` (Fig. 7): cosine similarities of random feature pairs. A narrow
  distribution far from 0 is the "cone effect" of Liang et al.: the features fill a small cone
  of the embedding space, so every item looks alike to a cosine-similarity search.
- :func:`similarity_gap` and :func:`split_similarity_gap` (Fig. 8): how far the combined query
  features are from their targets compared with non-target gallery images; the gap of the means
  and the overlap of the two histograms track retrieval quality better than the target
  similarity alone.
- :func:`gradcam` and :func:`gradcam_examples` (Figs. 9-10): which regions of the reference image
  make the combined query point where it points.
- :func:`top_k_names` (Figs. 11-12): ranked gallery names for qualitative result grids.

Plots live in :mod:`cirlib.viz.plots` (``similarity_histograms``, ``gap_histograms``,
``gradcam_grid``, ``retrieval_grid``). Everything here is seeded and device-agnostic.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor, nn

from cirlib.core.tensors import eval_mode
from cirlib.data.datasets import CIRSplit, open_image, query_text
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, transform_for
from cirlib.evaluation.metrics import IndexLike, index_lists, indices_of, name_index
from cirlib.evaluation.protocols import PROTOCOLS, similarity_chunks, topk
from cirlib.models.combiner import CombineFn, apply_combine

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone
    from cirlib.models.features import SplitFeatures

__all__ = [
    "GapStats",
    "gap_stats",
    "gradcam",
    "gradcam_examples",
    "gradcam_layer",
    "pairwise_similarities",
    "reference_input",
    "similarity_gap",
    "split_similarity_gap",
    "top_k_names",
]

ArrayLike = Tensor | np.ndarray


def _unit_rows(features: ArrayLike, what: str) -> Tensor:
    """``features`` as a float32 tensor of L2-normalised rows (its device kept)."""
    t = torch.as_tensor(features)
    if t.dim() != 2:
        raise ValueError(f"{what} must be a [N, D] matrix, got shape {tuple(t.shape)}")
    return F.normalize(t.float(), dim=-1)


# --------------------------------------------------------------------------- Fig. 7: cone effect


def _pair_from_linear(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Invert the row-major enumeration of the pairs ``i < j`` of ``n`` items (``k`` -> ``(i, j)``)."""
    total = n * (n - 1) // 2
    i = n - 2 - np.floor(np.sqrt(4 * n * (n - 1) - 8 * k.astype(np.float64) - 7) / 2 - 0.5).astype(np.int64)

    def row_start(r: np.ndarray) -> np.ndarray:  # linear index of the pair (r, r + 1)
        return total - (n - r) * (n - r - 1) // 2

    i = np.where(k < row_start(i), i - 1, i)  # one-step guards against float rounding
    i = np.where(k >= row_start(i + 1), i + 1, i)
    return i, k - row_start(i) + i + 1


def pairwise_similarities(features: ArrayLike, n_pairs: int = 50_000, seed: int = 0) -> np.ndarray:
    """Cosine similarities of ``n_pairs`` random pairs of distinct rows of ``features [N, D]``.

    Pairs are unordered and drawn without replacement (CLIP4Cir samples 50K pairs because all
    ``N(N-1)/2`` grow quadratically); when ``n_pairs`` covers every pair, all are returned in
    row-major order. Returns float64 ``[min(n_pairs, N(N-1)/2)]``.
    """
    x = _unit_rows(features, "features")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"pairwise similarities need at least 2 feature rows, got {n}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    total = n * (n - 1) // 2
    if n_pairs >= total:
        i, j = np.triu_indices(n, k=1)
    else:
        k = np.sort(np.random.default_rng(seed).choice(total, size=n_pairs, replace=False))
        i, j = _pair_from_linear(k, n)
    ii = torch.as_tensor(i, device=x.device)
    jj = torch.as_tensor(j, device=x.device)
    return (x[ii] * x[jj]).sum(-1).double().cpu().numpy()


# ---------------------------------------------------------------- Fig. 8: target vs non-target


@dataclass(frozen=True)
class GapStats:
    """Query-target vs query-non-target cosine similarities and how well they separate.

    ``bin_edges`` are shared by both histograms; ``mean_gap`` = mean(target) - mean(non-target);
    ``overlap`` = intersection over union of the two histograms normalised to unit mass (1 for
    identical distributions, 0 for disjoint ones). CLIP4Cir finds retrieval quality follows a
    large gap and a small overlap, not a high target similarity.
    """

    target_sims: np.ndarray
    non_target_sims: np.ndarray
    bin_edges: np.ndarray
    mean_gap: float
    overlap: float

    @property
    def target_mean(self) -> float:
        return float(self.target_sims.mean())

    @property
    def non_target_mean(self) -> float:
        return float(self.non_target_sims.mean())

    def densities(self) -> tuple[np.ndarray, np.ndarray]:
        """Both histograms on ``bin_edges`` as densities (area 1), as in the paper's figure."""
        widths = np.diff(self.bin_edges)
        return tuple(np.histogram(s, self.bin_edges)[0] / (len(s) * widths)
                     for s in (self.target_sims, self.non_target_sims))


def gap_stats(target_sims: ArrayLike, non_target_sims: ArrayLike, n_bins: int = 100) -> GapStats:
    """:class:`GapStats` of two samples of similarities (``n_bins`` equal bins over both ranges)."""
    t = np.asarray(torch.as_tensor(target_sims).double().cpu()).ravel()
    o = np.asarray(torch.as_tensor(non_target_sims).double().cpu()).ravel()
    if len(t) == 0 or len(o) == 0:
        raise ValueError(f"need target and non-target similarities, got {len(t)} and {len(o)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    edges = np.histogram_bin_edges(np.concatenate([t, o]), bins=n_bins)
    p = np.histogram(t, edges)[0] / len(t)
    q = np.histogram(o, edges)[0] / len(o)
    overlap = float(np.minimum(p, q).sum() / np.maximum(p, q).sum())
    return GapStats(t, o, edges, float(t.mean() - o.mean()), overlap)


def similarity_gap(
    query: ArrayLike,
    gallery: ArrayLike,
    target_idx: Sequence[int] | ArrayLike,
    exclude_idx: IndexLike | None = None,
    n_bins: int = 100,
    n_non_target: int | None = 10,
    seed: int = 0,
) -> GapStats:
    """CLIP4Cir Fig. 8 statistics of combined query features ``[Q, D]`` against a gallery ``[G, D]``.

    Each query is compared with its target (gallery row ``target_idx[q]``) and with
    ``n_non_target`` distinct gallery rows drawn at random among the others (CLIP4Cir uses ten, to
    reduce variance; ``None`` = every other row). ``exclude_idx`` (``[Q]`` or ``[Q, E]``, ``-1`` =
    none) removes rows from the non-targets: the reference image, or other valid targets (CIRCO's
    ground truths), which are not negatives. Queries whose target is ``-1`` (not in the gallery)
    are left out with one warning.
    """
    q = _unit_rows(query, "query features")
    g = _unit_rows(gallery, "gallery features").to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query features have dimension {q.shape[1]} but gallery features {g.shape[1]}")
    n_gallery = g.shape[0]
    targets = np.asarray(torch.as_tensor(target_idx).cpu(), dtype=np.int64).ravel()
    if targets.shape != (q.shape[0],):
        raise ValueError(f"target_idx has {targets.size} entries for {q.shape[0]} queries")
    if (targets >= n_gallery).any() or (targets < -1).any():
        raise ValueError(f"target_idx must lie in [0, {n_gallery}) or be -1 (absent)")
    excluded = np.full((q.shape[0], 0), -1, dtype=np.int64)
    if exclude_idx is not None:
        excluded = np.asarray(torch.as_tensor(exclude_idx).cpu(), dtype=np.int64).reshape(q.shape[0], -1)
    absent = np.flatnonzero(targets < 0)
    if len(absent):
        warnings.warn(f"{len(absent)} of {len(targets)} queries have no target in the gallery "
                      f"(e.g. query {absent[0]}); left out of the similarity gap", stacklevel=2)
    rng = np.random.default_rng(seed)
    target_sims: list[np.ndarray] = []
    other_sims: list[np.ndarray] = []
    for rows, chunk in similarity_chunks(q, g):
        for row, scores_row in enumerate(chunk.double().cpu().numpy(), rows.start):
            if targets[row] < 0:
                continue
            others = np.setdiff1d(np.arange(n_gallery), np.append(excluded[row], targets[row]))
            if n_non_target is not None and n_non_target < len(others):
                others = rng.choice(others, size=n_non_target, replace=False)
            target_sims.append(scores_row[targets[row] : targets[row] + 1])
            other_sims.append(scores_row[others])
    if not target_sims:
        raise ValueError("no query has a target in the gallery")
    return gap_stats(np.concatenate(target_sims), np.concatenate(other_sims), n_bins)


# ----------------------------------------------------------------------- Figs. 9-10: Grad-CAM


def gradcam_layer(backbone: "Backbone") -> str:
    """Where :func:`gradcam` reads activations, in words (for figure titles)."""
    visual = backbone.model.visual
    if isinstance(visual, VisionTransformer):
        return "Grad-CAM on the last ViT block's input tokens"
    if isinstance(visual, ModifiedResNet):
        return "Grad-CAM on the last conv feature map (ResNet layer4)"
    raise TypeError(f"no Grad-CAM layer for {type(visual).__name__} image towers ({backbone.model_name})")


def reference_input(
    backbone: "Backbone",
    image: Image.Image | str | os.PathLike,
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> tuple[Tensor, Image.Image]:
    """An image as the encoder sees it: ``(pixels [1, 3, S, S], the same pixels de-normalised as RGB)``.

    Grad-CAM maps live on the preprocessed square, so they are overlaid on the second item.
    """
    pil = image if isinstance(image, Image.Image) else open_image(image)
    pixels = transform_for(backbone, transform_kind, target_ratio)(pil).unsqueeze(0)
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)
    rgb = (pixels[0] * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return pixels, Image.fromarray(rgb)


def gradcam(
    backbone: "Backbone",
    combine_fn: CombineFn,
    reference_pixels: Tensor,
    text: str,
    target_features: ArrayLike | None = None,
) -> np.ndarray:
    """Grad-CAM of the combined query features over the reference image, ``[S, S]`` in ``[0, 1]``.

    CLIP4Cir §4.9 back-propagates from the combined features instead of a class score, so the map
    depends on both the reference and its caption. The score is the cosine similarity between
    ``combine_fn(image features, text features)`` and ``target_features`` (e.g. the ground-truth
    target's image features: "what in the reference makes the query find its target"). With
    ``target_features=None`` the caption's own text features are the target ("where the query
    agrees with what the caption asks for"): the combined features are L2-normalised, so any
    score of them against themselves (norm, self-similarity) is flat and has zero gradient.

    Activations are :meth:`Backbone.encode_image_tokens`'s tokens: for a ViT the patch tokens
    entering the last transformer block (their gradients arrive through that block's attention to
    the class token; see :func:`gradcam_layer`), for a ResNet the last conv feature map (classic
    Grad-CAM). Channel weights are the gradients averaged over tokens; the map is
    ``ReLU(sum_c w_c * token_c)`` on the token grid, bilinearly upsampled to the input and min-max
    normalised (all zeros when nothing has positive evidence).

    Runs in eval mode and restores every module's train/eval flag afterwards; gradients are taken
    with :func:`torch.autograd.grad` from a copy of the pixels, so no ``requires_grad`` flag is
    changed and no parameter's ``.grad`` is touched, frozen or not.
    """
    if reference_pixels.dim() != 4 or reference_pixels.shape[:2] != (1, 3):
        raise ValueError(f"reference_pixels must be one image [1, 3, S, S], got {tuple(reference_pixels.shape)}")
    modules = [backbone.model] + ([combine_fn] if isinstance(combine_fn, nn.Module) else [])
    combine_param = next(combine_fn.parameters(), None) if isinstance(combine_fn, nn.Module) else None
    combine_device = combine_param.device if combine_param is not None else backbone.device
    # Every submodule is listed (parents first), so mixed flags such as one block in train mode
    # inside an eval-mode model come back as they were.
    with eval_mode(*(m for module in modules for m in module.modules())):
        with torch.no_grad():
            text_features = backbone.encode_text([text]).float().to(combine_device)
        target = text_features if target_features is None else torch.as_tensor(target_features)
        target = target.reshape(1, -1).float().to(combine_device)
        pixels = reference_pixels.detach().to(backbone.device).float().clone().requires_grad_(True)
        with torch.enable_grad():
            pooled, tokens = backbone.encode_image_tokens(pixels)
            combined = combine_fn(pooled.float().to(combine_device), text_features)
            score = F.cosine_similarity(combined, target, dim=-1).sum()
            (grads,) = torch.autograd.grad(score, tokens)
    side = round(tokens.shape[1] ** 0.5)
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} image tokens do not form a square grid")
    weights = grads.float().mean(dim=1, keepdim=True)  # [1, 1, C]
    cam = F.relu((weights * tokens.detach().float()).sum(-1)).reshape(1, 1, side, side)
    cam = F.interpolate(cam, size=tuple(reference_pixels.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    return cam.cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------- Figs. 11-12: ranked results


def top_k_names(
    split: CIRSplit,
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    k: int = 5,
    query_indices: Sequence[int] | None = None,
    exclude_reference: bool | None = None,
) -> list[list[str]]:
    """The ``k`` best gallery names per query (cosine similarity, best first, ties in gallery order).

    ``query_features`` has one row per query of ``split`` (or per entry of ``query_indices``);
    ``gallery_features`` align with ``split.gallery``. The reference image is left out where the
    benchmark's protocol leaves it out (CIRR) unless ``exclude_reference`` says otherwise.
    """
    indices = list(range(len(split.queries))) if query_indices is None else list(query_indices)
    q = _unit_rows(query_features, "query_features")
    g = _unit_rows(gallery_features, "gallery_features").to(q.device)
    if q.shape[0] != len(indices) or g.shape[0] != len(split.gallery):
        raise ValueError(
            f"need one query row per selected query ({len(indices)}) and one gallery row per "
            f"{split.dataset}/{split.split} gallery image ({len(split.gallery)}); got "
            f"{tuple(q.shape)} and {tuple(g.shape)}"
        )
    if exclude_reference is None:
        exclude_reference = PROTOCOLS[split.dataset].exclude_reference
    index = name_index(split.gallery)
    exclude = indices_of([split.queries[i].reference for i in indices], index) if exclude_reference else None
    scores, best = topk(q @ g.T, k, exclude)
    keep = torch.isfinite(scores).tolist()  # excluded items only fill up rows of tiny galleries
    return [[split.gallery[j] for j, ok in zip(row, oks) if ok] for row, oks in zip(best.tolist(), keep)]


def split_similarity_gap(
    splits: Mapping[str, CIRSplit],
    features: Mapping[str, "SplitFeatures"],
    combine: CombineFn,
    n_bins: int = 100,
    seed: int = 0,
) -> GapStats:
    """Fig. 8 statistics of ``combine`` pooled over splits (e.g. the three FashionIQ categories).

    Each query is compared with its own split's gallery; the reference and every ground truth are
    kept out of the non-targets (they are not negatives).
    """
    target_sims, non_target_sims = [], []
    for name, split in splits.items():
        f = features[name]
        index = name_index(split.gallery)
        stats = similarity_gap(
            apply_combine(combine, f.reference, f.text),
            f.gallery,
            indices_of([q.target for q in split.queries], index),
            exclude_idx=index_lists([(q.reference, *q.ground_truths) for q in split.queries], index),
            n_bins=n_bins,
            seed=seed,
        )
        target_sims.append(stats.target_sims)
        non_target_sims.append(stats.non_target_sims)
    return gap_stats(np.concatenate(target_sims), np.concatenate(non_target_sims), n_bins)


def gradcam_examples(
    backbone: "Backbone",
    combine: CombineFn,
    split: CIRSplit,
    n: int = 3,
    seed: int = 0,
    transform_kind: TransformKind = "targetpad",
) -> list[tuple[Image.Image, str, np.ndarray]]:
    """Rows for :func:`cirlib.viz.plots.gradcam_grid`: ``n`` random queries with a target, each with the
    Grad-CAM of cos(combined query, target image features) over its reference image."""
    candidates = [q for q in split.queries if q.target is not None]
    rng = np.random.default_rng(seed)
    picks = [candidates[i] for i in sorted(rng.choice(len(candidates), size=min(n, len(candidates)), replace=False))]
    rows = []
    for q in picks:
        pixels, shown = reference_input(backbone, split.image_paths[q.reference], transform_kind)
        target_pixels, _ = reference_input(backbone, split.image_paths[q.target], transform_kind)
        with torch.no_grad():
            target = backbone.encode_image(target_pixels.to(backbone.device))[0]
        caption = query_text(q)
        rows.append((shown, caption, gradcam(backbone, combine, pixels, caption, target)))
    return rows
