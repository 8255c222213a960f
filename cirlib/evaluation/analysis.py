"""The numbers behind CLIP4Cir's analysis figures (§4.8-4.9, Figs. 7-12).

- :func:`pairwise_similarities` (Fig. 7): cosine similarities of random feature pairs. A narrow
  distribution far from 0 is the "cone effect" of Liang et al.: the features fill a small cone
  of the embedding space, so every item looks alike to a cosine-similarity search.
- :func:`similarity_gap` and :func:`split_similarity_gap` (Fig. 8): how far the combined query
  features are from their targets compared with non-target gallery images; the gap of the means
  and the overlap of the two histograms track retrieval quality better than the target
  similarity alone; :func:`gap_recall_correlation` checks that claim across models by rank.
- :func:`gradcam` and :func:`gradcam_examples` (Figs. 9-10): which regions of the reference image
  make the combined query point where it points. On the generated ``scenes`` benchmark the scene
  graphs say which object a query edits (:func:`edited_regions`), and :func:`pointing_game`
  scores how often the map's peak falls on it, against the image centre and chance.
- :func:`combiner_lambdas`: the Combiner's per-query weight of the caption in its convex combination.
- :func:`subset_term_spread`: within CIRR's sets of look-alikes, how much the Sum's reference-image term
  and its caption term each vary from member to member (the term that varies more decides Recall_subset).
- :func:`top_k_names` (Figs. 11-12): ranked gallery names for qualitative result grids.

Plots live in :mod:`cirlib.viz.plots` (``similarity_histograms``, ``gap_histograms``,
``gradcam_grid``, ``retrieval_grid``, ``lambda_histogram``). Everything here is seeded and
device-agnostic.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor, nn

from cirlib.core.tensors import eval_mode
from cirlib.data.datasets import CIRSplit, open_image, query_text
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, pipeline_geometry, transform_for
from cirlib.data.synth.scenes.drawing import Box, object_box
from cirlib.data.synth.scenes.graph import edited_objects
from cirlib.evaluation.bootstrap import Interval, PerQuery
from cirlib.evaluation.breakdowns import query_graphs
from cirlib.evaluation.metrics import IndexLike, index_lists, indices_of, name_index
from cirlib.evaluation.protocols import PROTOCOLS, similarity_chunks, topk
from cirlib.models.combiner import CombineFn, Combiner, apply_combine

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone
    from cirlib.models.features import SplitFeatures

__all__ = [
    "EditedRegion",
    "GapRecallCorrelation",
    "GapStats",
    "PointerScore",
    "PointingGame",
    "PointingMark",
    "cam_on_image",
    "combiner_lambdas",
    "edited_regions",
    "gap_recall_correlation",
    "gap_stats",
    "gradcam",
    "gradcam_batch",
    "gradcam_examples",
    "gradcam_layer",
    "pairwise_similarities",
    "pointing_examples",
    "pointing_game",
    "reference_input",
    "similarity_gap",
    "spearman_rho",
    "split_similarity_gap",
    "subset_term_spread",
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
    return pixels, _as_seen(backbone, pixels[0])


def _as_seen(backbone: "Backbone", pixels: Tensor) -> Image.Image:
    """Normalised encoder pixels ``[3, S, S]`` back to an RGB picture."""
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)
    rgb = (pixels.cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb)


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
    changed and no parameter's ``.grad`` is touched, frozen or not. :func:`gradcam_batch` computes
    many at once.
    """
    if reference_pixels.dim() != 4 or reference_pixels.shape[:2] != (1, 3):
        raise ValueError(f"reference_pixels must be one image [1, 3, S, S], got {tuple(reference_pixels.shape)}")
    target = None if target_features is None else torch.as_tensor(target_features).reshape(1, -1)
    return gradcam_batch(backbone, combine_fn, reference_pixels, [text], target)[0]


def gradcam_batch(
    backbone: "Backbone",
    combine_fn: CombineFn,
    reference_pixels: Tensor,
    texts: Sequence[str],
    target_features: ArrayLike | None = None,
) -> np.ndarray:
    """:func:`gradcam` of ``B`` queries in one pass: ``[B, S, S]``, each map normalised on its own.

    ``reference_pixels [B, 3, S, S]``, ``texts`` and ``target_features [B, D]`` (None: each caption's
    own text features) are aligned by row. In eval mode no layer mixes the rows of a batch, so
    the sum of the per-query scores has each query's gradient on its own tokens.
    """
    if reference_pixels.dim() != 4 or reference_pixels.shape[1] != 3:
        raise ValueError(f"reference_pixels must be images [B, 3, S, S], got {tuple(reference_pixels.shape)}")
    n = reference_pixels.shape[0]
    if len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} reference images")
    modules = [backbone.model] + ([combine_fn] if isinstance(combine_fn, nn.Module) else [])
    combine_param = next(combine_fn.parameters(), None) if isinstance(combine_fn, nn.Module) else None
    combine_device = combine_param.device if combine_param is not None else backbone.device
    # Every submodule is listed (parents first), so mixed flags such as one block in train mode
    # inside an eval-mode model come back as they were.
    with eval_mode(*(m for module in modules for m in module.modules())):
        with torch.no_grad():
            text_features = backbone.encode_text(list(texts)).float().to(combine_device)
        target = text_features if target_features is None else torch.as_tensor(target_features)
        if target.dim() != 2 or target.shape[0] != n:
            raise ValueError(f"target_features must be [{n}, D] (one row per image), got {tuple(target.shape)}")
        target = target.float().to(combine_device)
        pixels = reference_pixels.detach().to(backbone.device).float().clone().requires_grad_(True)
        with torch.enable_grad():
            pooled, tokens = backbone.encode_image_tokens(pixels)
            combined = combine_fn(pooled.float().to(combine_device), text_features)
            score = F.cosine_similarity(combined, target, dim=-1).sum()
            (grads,) = torch.autograd.grad(score, tokens)
    side = round(tokens.shape[1] ** 0.5)
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} image tokens do not form a square grid")
    weights = grads.float().mean(dim=1, keepdim=True)  # [B, 1, C]
    cam = F.relu((weights * tokens.detach().float()).sum(-1)).reshape(n, 1, side, side)
    cam = F.interpolate(cam, size=tuple(reference_pixels.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = cam / torch.where(peak > 0, peak, torch.ones_like(peak))
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
    candidates = [i for i, q in enumerate(split.queries) if q.target is not None]
    rng = np.random.default_rng(seed)
    picks = [candidates[i] for i in sorted(rng.choice(len(candidates), size=min(n, len(candidates)), replace=False))]
    batch = _query_batch(backbone, split, picks, transform_kind)
    cams = gradcam_batch(backbone, combine, batch.pixels, batch.texts, batch.targets)
    return [(_as_seen(backbone, pixels), text, cam) for pixels, text, cam in zip(batch.pixels, batch.texts, cams)]


@dataclass(frozen=True)
class _QueryBatch:
    pixels: Tensor  # [B, 3, S, S] references as the encoder sees them
    texts: list[str]
    targets: Tensor  # [B, D] target image features
    sizes: list[tuple[int, int]]  # (w, h) of each stored reference image


def _query_batch(
    backbone: "Backbone", split: CIRSplit, indices: Sequence[int], transform_kind: TransformKind
) -> _QueryBatch:
    """What :func:`gradcam_batch` needs for ``split.queries[indices]``: Grad-CAM asks what in the
    reference makes the combined query find its target, so every query needs a target."""
    transform = transform_for(backbone, transform_kind)
    queries = [split.queries[i] for i in indices]
    for i, q in zip(indices, queries):
        if q.target is None:
            raise ValueError(f"query {i} (pairid {q.pair_id}) of {split!r} has no target to explain")
    references = [open_image(split.image_paths[q.reference]) for q in queries]
    targets = torch.stack([transform(open_image(split.image_paths[q.target])) for q in queries])
    with eval_mode(backbone.model), torch.no_grad():
        target_features = backbone.encode_image(targets).float()
    return _QueryBatch(torch.stack([transform(im) for im in references]), [query_text(q) for q in queries],
                       target_features, [im.size for im in references])


# ------------------------------------------------------------------- the pointing game (scenes)


def cam_on_image(
    cam: ArrayLike,
    size: tuple[int, int],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> np.ndarray:
    """A map over the encoder input ``[S, S]`` carried back onto the stored image of ``size = (w, h)``.

    Returns float32 ``[h, w]``. The encoder sees the image padded, resized and centre-cropped
    (:func:`cirlib.data.preprocess.pipeline_geometry`); each image pixel's centre is followed through
    those steps and the map read there (bilinearly). Padding strips hold no image pixel, so they drop
    out; image pixels the crop cut away are NaN.
    """
    heat = torch.as_tensor(cam).float()
    if heat.dim() != 2 or heat.shape[0] != heat.shape[1]:
        raise ValueError(f"cam must be a square map [S, S], got shape {tuple(heat.shape)}")
    s = heat.shape[0]
    geometry = pipeline_geometry(size, transform_kind, s, target_ratio)
    left, top, right, bottom = geometry.crop_box  # the encoder input, in padded-image pixels
    w, h = size
    u = (torch.arange(w, dtype=torch.float64) + 0.5 + geometry.padding[0] - left) * s / (right - left)
    v = (torch.arange(h, dtype=torch.float64) + 0.5 + geometry.padding[1] - top) * s / (bottom - top)
    grid = torch.stack(torch.meshgrid(2 * u / s - 1, 2 * v / s - 1, indexing="xy"), dim=-1)  # [h, w, (x, y)]
    out = F.grid_sample(heat[None, None], grid[None].float(), mode="bilinear", padding_mode="border",
                        align_corners=False)[0, 0]
    seen = ((v >= 0) & (v < s))[:, None] & ((u >= 0) & (u < s))[None, :]
    return torch.where(seen, out, torch.full_like(out, float("nan"))).numpy()


def _peak(heat: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the centre of a map's highest pixel; NaN when the image part holds no positive evidence."""
    if not np.isfinite(heat).any() or np.nanmax(heat) <= 0:
        return float("nan"), float("nan")
    row, col = np.unravel_index(np.nanargmax(heat), heat.shape)
    return col + 0.5, row + 0.5


@dataclass(frozen=True)
class EditedRegion:
    """Where a query's edit is in its reference image: the edited objects and their pixel boxes.

    Points and boxes share image pixel coordinates: pixel ``i`` spans ``[i, i + 1)``.
    """

    size: tuple[int, int]  # (w, h) of the reference image
    object_ids: tuple[int, ...]
    boxes: tuple[Box, ...]

    def contains(self, x: float, y: float) -> bool:
        """Whether the point falls in one of the boxes (never for NaN)."""
        return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in self.boxes)

    @property
    def area_fraction(self) -> float:
        """Share of the image the boxes cover, overlaps once: a uniformly random point's chance to hit."""
        w, h = self.size
        covered = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in self.boxes:
            covered[y0:y1, x0:x1] = True
        return float(covered.mean())


def edited_regions(split: CIRSplit, meta: Mapping | None = None) -> dict[int, EditedRegion | None]:
    """Query index -> where its edit is in its reference, for a CIRR split of the ``scenes`` benchmark.

    The edited objects are :func:`~cirlib.data.synth.scenes.graph.edited_objects` of the query's
    reference and target scene graphs and constraints (:func:`~cirlib.evaluation.breakdowns.query_graphs`,
    from ``meta``, default: the root's ``cirlib_meta.json``). None marks a query whose edit has nothing
    in the reference to point at (an added object, the background, the view).
    """
    if split.dataset != "cirr":
        raise ValueError(f"edited regions need a CIRR split of the generated scenes benchmark, got {split!r}")
    regions: dict[int, EditedRegion | None] = {}
    for i, graphs in enumerate(query_graphs(split, meta)):
        ref = graphs.reference
        objects = edited_objects(ref, graphs.target, graphs.record["constraints"])
        regions[i] = EditedRegion((ref["width"], ref["height"]), tuple(o["id"] for o in objects),
                                  tuple(object_box(ref, o) for o in objects)) if objects else None
    return regions


@dataclass(frozen=True)
class PointerScore:
    """How often one way of pointing lands on the edited objects."""

    hits: int
    n: int
    rate: Interval  # percent, with its 95 % bootstrap interval over queries


@dataclass(frozen=True)
class PointingMark:
    """What :func:`cirlib.viz.plots.gradcam_grid` draws over a heat map: the edited objects' boxes and
    the map's peak (image pixels)."""

    boxes: tuple[Box, ...]
    peak: tuple[float, float]
    hit: bool


@dataclass(frozen=True)
class PointingGame:
    """Does the Grad-CAM peak on the reference fall on the object the query edits?

    A map that follows the caption should peak on what the caption changes. ``centre`` scores a
    pointer that ignores the query (the image centre) and ``chance`` (percent) is the mean share of
    the image the edited objects cover, the hit rate of a uniformly random point: Grad-CAM says
    something only where it beats both.
    """

    query_indices: tuple[int, ...]
    peaks: np.ndarray  # [n, 2] (x, y) in image pixels; NaN where the map has no positive evidence on the image
    hits: np.ndarray  # [n] bool
    gradcam: PointerScore
    centre: PointerScore
    chance: float

    def table(self) -> pd.DataFrame:
        """One row per pointer: hits, n and the hit rate (percent) with its interval; chance last."""
        rows = {name: {"hits": s.hits, "n": s.n, "hit rate": s.rate.estimate, "95% low": s.rate.low,
                       "95% high": s.rate.high}
                for name, s in (("Grad-CAM peak", self.gradcam), ("image centre", self.centre))}
        rows["uniform random point"] = {"n": self.gradcam.n, "hit rate": self.chance}
        return pd.DataFrame.from_dict(rows, orient="index")


def _pointable(regions: Mapping[int, EditedRegion | None], n: int | None, seed: int) -> list[int]:
    """Queries with an edited object in the reference: all, or ``n`` of them drawn with ``seed``."""
    pointable = sorted(i for i, r in regions.items() if r is not None)
    if not pointable:
        raise ValueError("no query has an edited object in its reference: nothing to point at")
    if n is not None and n < len(pointable):
        pointable = sorted(np.random.default_rng(seed).choice(pointable, size=n, replace=False).tolist())
    return pointable


def _heat_on_references(
    backbone: "Backbone", combine: CombineFn, split: CIRSplit, indices: Sequence[int],
    regions: Mapping[int, EditedRegion | None], transform_kind: TransformKind,
) -> list[np.ndarray]:
    """Grad-CAM of each query, carried back onto its stored reference image (:func:`cam_on_image`)."""
    batch = _query_batch(backbone, split, indices, transform_kind)
    cams = gradcam_batch(backbone, combine, batch.pixels, batch.texts, batch.targets)
    for i, size in zip(indices, batch.sizes):
        if regions[i].size != size:
            raise ValueError(f"query {i}: the scene graph of reference {split.queries[i].reference!r} is "
                             f"{regions[i].size[0]}x{regions[i].size[1]} but its image is {size[0]}x{size[1]}")
    return [cam_on_image(cam, size, transform_kind) for cam, size in zip(cams, batch.sizes)]


def pointing_game(
    backbone: "Backbone",
    combine: CombineFn,
    split: CIRSplit,
    regions: Mapping[int, EditedRegion | None],
    n: int | None = None,
    seed: int = 0,
    transform_kind: TransformKind = "targetpad",
    batch_size: int = 64,
) -> PointingGame:
    """The pointing game of ``combine``'s Grad-CAM (as :func:`gradcam_examples`) over the queries
    :func:`edited_regions` can point at; ``n`` draws that many of them with ``seed``.

    The peak is taken over the stored image (:func:`cam_on_image`: padding is not part of it).
    Intervals are bootstrap intervals over queries (:mod:`cirlib.evaluation.bootstrap`).
    """
    indices = _pointable(regions, n, seed)
    heats = [heat for start in range(0, len(indices), batch_size)
             for heat in _heat_on_references(backbone, combine, split, indices[start : start + batch_size], regions,
                                             transform_kind)]
    peaks = np.array([_peak(heat) for heat in heats], dtype=np.float64).reshape(-1, 2)
    chosen = [regions[i] for i in indices]
    hits = np.array([r.contains(x, y) for r, (x, y) in zip(chosen, peaks)], dtype=bool)
    centre_hits = np.array([r.contains(r.size[0] / 2, r.size[1] / 2) for r in chosen], dtype=bool)

    def score(h: np.ndarray) -> PointerScore:
        per_query = PerQuery({"hit": 100.0 * h}, np.zeros(len(h), dtype=np.int64))
        return PointerScore(int(h.sum()), len(h), per_query.interval("hit", seed))

    chance = 100.0 * float(np.mean([r.area_fraction for r in chosen]))
    return PointingGame(tuple(indices), peaks, hits, score(hits), score(centre_hits), chance)


def pointing_examples(
    backbone: "Backbone",
    combine: CombineFn,
    split: CIRSplit,
    regions: Mapping[int, EditedRegion | None],
    n: int = 4,
    seed: int = 0,
    transform_kind: TransformKind = "targetpad",
) -> tuple[list[tuple[Image.Image, str, np.ndarray]], list[PointingMark]]:
    """``(rows, marks)`` for :func:`cirlib.viz.plots.gradcam_grid`: ``n`` pointable queries (the ones
    :func:`pointing_game` with the same ``n`` and ``seed`` scores), each stored reference with its
    Grad-CAM carried onto it, the edited objects' boxes and the peak."""
    indices = _pointable(regions, n, seed)
    heats = _heat_on_references(backbone, combine, split, indices, regions, transform_kind)
    rows, marks = [], []
    for i, heat in zip(indices, heats):
        q, region = split.queries[i], regions[i]
        peak = _peak(heat)
        rows.append((open_image(split.image_paths[q.reference]), query_text(q), heat))
        marks.append(PointingMark(region.boxes, peak, region.contains(*peak)))
    return rows, marks


# ------------------------------------------------------- gaps and recall across models (Fig. 8)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman_rho(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of two paired samples (ties get average ranks); NaN when one is constant."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"need paired samples, got {len(x)} and {len(y)} values")
    if len(x) < 3:
        raise ValueError(f"a rank correlation needs at least 3 pairs, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("rank correlation of non-finite values (NaN or inf)")
    rx, ry = _average_ranks(x) - (len(x) + 1) / 2, _average_ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


@dataclass(frozen=True)
class GapRecallCorrelation:
    """Spearman's rho across ``n`` models of recall with the mean gap and with the overlap.

    CLIP4Cir reads better retrieval off a larger gap and a smaller overlap: ``gap_rho`` near +1 and
    ``overlap_rho`` near -1 agree with it.
    """

    gap_rho: float
    overlap_rho: float
    n: int


def gap_recall_correlation(stats: Mapping[str, GapStats], recall: Mapping[str, float]) -> GapRecallCorrelation:
    """How well :class:`GapStats` (e.g. from :func:`split_similarity_gap`) rank models by ``recall``,
    both keyed by model."""
    if set(stats) != set(recall):
        raise ValueError(f"gap statistics and recall must name the same models; only gaps: "
                         f"{sorted(set(stats) - set(recall))}, only recall: {sorted(set(recall) - set(stats))}")
    models = list(stats)
    values = [recall[m] for m in models]
    return GapRecallCorrelation(spearman_rho([stats[m].mean_gap for m in models], values),
                                spearman_rho([stats[m].overlap for m in models], values), len(models))


# ----------------------------------------------------------------------------- Combiner lambda


def combiner_lambdas(combiner: Combiner, image: Tensor, text: Tensor, batch_size: int = 4096) -> np.ndarray:
    """The Combiner's ``lambda`` per query (:meth:`Combiner.mixing_coefficient`), ``[Q]`` in ``[0, 1]``:
    0 keeps the reference image's features, 1 the caption's, before the learned mixture is added."""
    if not isinstance(combiner, Combiner):
        raise TypeError(f"only a Combiner has a lambda, got {type(combiner).__name__}")
    param = next(combiner.parameters(), None)
    device = param.device if param is not None else image.device
    with eval_mode(combiner):
        lam = apply_combine(combiner.mixing_coefficient, image.to(device), text.to(device), batch_size)
    return lam[:, 0].numpy()


def subset_term_spread(split: CIRSplit, features: "SplitFeatures") -> dict[str, float]:
    """The Sum's two terms within each CIRR query's set of look-alikes: ``image`` and ``text``, the
    mean over queries of the standard deviation of ``cos(reference, c)`` and of ``cos(caption, c)``
    across the set's members ``c`` other than the reference; ``queries``, how many sets had two or
    more such members.

    With normalised inputs the Sum ranks a set by the sum of the two terms, so the term that varies
    more from member to member decides Recall_subset. The reference image's term carries no
    information about the edit (every member resembles the reference), so a large image spread is
    noise the caption must outvote.
    """
    index = name_index(split.gallery)
    reference = F.normalize(features.reference.float(), dim=-1)
    text = F.normalize(features.text.float(), dim=-1)
    gallery = F.normalize(features.gallery.float(), dim=-1)
    image_spread, text_spread = [], []
    for q, query in enumerate(split.queries):
        members = [index[m] for m in query.group if m != query.reference and m in index]
        if len(members) < 2:
            continue
        candidates = gallery[members]
        image_spread.append(float((candidates @ reference[q]).std()))
        text_spread.append(float((candidates @ text[q]).std()))
    if not image_spread:
        raise ValueError(f"{split.dataset}/{split.split}: no query has two or more set members besides its reference")
    return {"image": float(np.mean(image_spread)), "text": float(np.mean(text_spread)), "queries": len(image_spread)}

