"""Batched CLIP feature extraction for images, texts and whole CIR splits, with an on-disk cache for
image galleries and caption sets.

Every evaluation and analysis notebook encodes the same galleries again and again with the same
frozen backbone, at seconds (tiny model, CPU) to hours (RN50x4 on real galleries) a time.
``image_features`` therefore stores its result as one safetensors entry of :mod:`cirlib.core.cache`
per (weights, transform, ordered file list) and reuses it until any of those changes: other
image-tower weights (``backbone.image_fingerprint``; text-encoder training leaves it alone), another
pipeline or target ratio, or an image file whose bytes differ. An unreadable entry is recomputed
with a warning rather than trusted.

Features are returned unnormalised, float32, on the CPU, one row per input in input order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cirlib.core.cache import CacheEntry, cache_entry, cache_key
from cirlib.core.device import autocast, precision
from cirlib.core.tensors import eval_mode
from cirlib.data.datasets import CIRSplit, ImageLoadError, open_image, query_text
from cirlib.data.pixels import PixelCache, normalise
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, kind_ratio, transform_for
from cirlib.evaluation.metrics import name_index

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone


class ImageFileDataset(Dataset):
    """Open + preprocess one image per item; the unit of work DataLoader workers parallelise."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        image = open_image(path)  # its errors name the file
        try:
            return self.transform(image)
        except ImageLoadError as err:  # the pipeline's size limits, on an image that no longer knows its file
            if str(path) in str(err):
                raise
            raise ImageLoadError(f"{path}: {err}") from err


def prefetched_batches(dataset: Dataset, batch_size: int, depth: int = 2) -> Iterator[torch.Tensor]:
    """Stacked batches of ``dataset`` in order, decoded by one background thread ``depth`` batches ahead.

    PIL releases the GIL while decoding and resizing, and torch while encoding, so the two overlap
    without worker processes (no start-up cost, no pickling); the look-ahead bounds the memory.
    ``depth=0`` loads each batch when it is asked for, in the calling thread.
    """
    starts = list(range(0, len(dataset), batch_size))

    def load(start: int) -> torch.Tensor:
        return torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    if depth == 0:
        yield from map(load, starts)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(load, s) for s in starts[:depth])
        for start in starts[depth:]:
            batch = pending.popleft().result()
            pending.append(pool.submit(load, start))
            yield batch
        while pending:
            yield pending.popleft().result()


def encode_in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    *,
    module: torch.nn.Module | None = None,
    total: int | None = None,
    desc: str | None = None,
    progress: bool = True,
    amp: bool = True,
) -> torch.Tensor:
    """Apply an encoder to ready-made input batches; concatenate float32 CPU outputs.

    Runs under ``torch.no_grad`` and (with ``amp``) :func:`cirlib.core.device.autocast`, with ``module``
    in eval mode. Not ``inference_mode``: autocast then re-casts every weight for every batch instead
    of once per call, which made bf16 encoding on this CPU ~15 % slower. An empty iterable gives a
    ``[0, 0]`` tensor.
    """
    outputs: list[torch.Tensor] = []
    non_blocking = device.type == "cuda"
    with eval_mode(module), torch.no_grad(), autocast(device, amp):
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            outputs.append(fn(batch.to(device, non_blocking=non_blocking)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


def _image_cache_inputs(
    backbone: "Backbone", transform_kind: TransformKind, target_ratio: float, amp: bool
) -> dict[str, Any]:
    """Everything besides the files that an image feature matrix depends on."""
    return {
        "image_tower": backbone.image_fingerprint,
        "precision": precision(backbone.device, amp),  # mixed precision gives other numbers
        "transform": {
            "kind": transform_kind,
            "target_ratio": kind_ratio(transform_kind, target_ratio),
            "image_size": int(backbone.image_size),
            "mean": [float(m) for m in backbone.mean],
            "std": [float(s) for s in backbone.std],
        },
    }


def image_cache_key(
    backbone: "Backbone",
    paths: Sequence[Path],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    amp: bool = True,
) -> str:
    """Fingerprint of everything an image feature matrix depends on (the key of its cache entry)."""
    return cache_key(_image_cache_inputs(backbone, transform_kind, target_ratio, amp), paths)


def _image_entry(
    backbone: "Backbone",
    paths: Sequence[Path],
    transform_kind: TransformKind,
    target_ratio: float,
    cache_dir: Path | str,
    amp: bool,
) -> CacheEntry:
    """The feature-cache entry of these images under this image tower, pipeline and precision."""
    inputs = _image_cache_inputs(backbone, transform_kind, target_ratio, amp)
    return cache_entry(cache_dir, "feature", "images", ".safetensors", inputs, paths)


def store_image_features(
    backbone: "Backbone",
    paths: Sequence[Path | str],
    features: torch.Tensor,
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
    amp: bool = True,
) -> None:
    """Put features computed elsewhere (a training loop's validation) where :func:`image_features`
    finds them, so that the same weights are not run over the same images twice.

    ``features`` must be what :func:`image_features` would return for ``paths``: the same image
    tower's current weights, pipeline and precision, row for row.
    """
    paths = [Path(p) for p in paths]
    if features.shape[0] != len(paths):
        raise ValueError(f"{features.shape[0]} feature rows for {len(paths)} images")
    if cache_dir is not None and paths:
        _image_entry(backbone, paths, transform_kind, target_ratio, cache_dir, amp).save_tensor(
            "features", features.float().cpu())


def image_features(
    backbone: "Backbone",
    paths: Sequence[Path | str],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    batch_size: int = 64,
    cache_dir: Path | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    decoded: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """Image embeddings ``[len(paths), D]`` (float32, CPU, unnormalised), cached under ``cache_dir``.

    ``decoded=True`` reads the images through a :class:`~cirlib.data.pixels.PixelCache` (kept under
    ``cache_dir``) instead of decoding them for this call alone. That is the route for image sets
    several models encode, such as training triplets, which stage-1 fine-tuning already holds
    decoded: every later model skips decoding, ~40 % of an extraction with the tiny backbone on a
    CPU. Both routes feed the encoder the same inputs and share one feature cache. ``amp=False``
    encodes in fp32 (:func:`cirlib.core.device.autocast`), under its own cache key.

    With ``num_workers=0`` a background thread decodes the next batch while the model encodes this
    one (:func:`prefetched_batches`) when the encoder leaves a core free (a GPU, or more CPU cores
    than torch threads); on a CPU whose cores torch already uses, the thread only competes with it
    and decoding stays inline. ``num_workers > 0`` uses that many DataLoader processes instead
    (tests/perf/perf_features.py measures both).
    """
    paths = [Path(p) for p in paths]
    entry = None
    if cache_dir is not None:
        entry = _image_entry(backbone, paths, transform_kind, target_ratio, cache_dir, amp)
        cached = entry.load_tensor("features", (len(paths), None), torch.float32)
        if cached is not None:
            return cached
    if not paths:
        return torch.empty(0, backbone.embed_dim)

    feats = _encode_image_files(backbone.encode_image, backbone, paths, transform_kind, target_ratio, batch_size,
                                cache_dir, num_workers, progress, decoded, amp, f"image features ({transform_kind})")
    if entry is not None:
        entry.save_tensor("features", feats)
    return feats


def _encode_image_files(
    encode: Callable[[torch.Tensor], torch.Tensor],
    backbone: "Backbone",
    paths: Sequence[Path],
    transform_kind: TransformKind,
    target_ratio: float,
    batch_size: int,
    cache_dir: Path | str | None,
    num_workers: int,
    progress: bool,
    decoded: bool,
    amp: bool,
    desc: str,
) -> torch.Tensor:
    """``encode`` over the preprocessed images of ``paths`` by the routes of :func:`image_features`."""
    if decoded:
        pixels = PixelCache(paths, backbone.image_size, transform_kind, target_ratio, cache_dir, progress)
        return encode_pixels(backbone, pixels, batch_size=batch_size, amp=amp, progress=progress, encode=encode)
    dataset = ImageFileDataset(paths, transform_for(backbone, transform_kind, target_ratio))
    if num_workers > 0:
        batches: Iterable[torch.Tensor] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=backbone.device.type == "cuda",
        )
    else:  # a decoding thread only pays off with a core the encoder leaves free (GPU, or spare CPUs)
        spare = backbone.device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
        batches = prefetched_batches(dataset, batch_size, depth=2 if spare else 0)
    return encode_in_batches(
        encode,
        batches,
        backbone.device,
        module=backbone.model,
        total=-(-len(paths) // batch_size),
        desc=desc,
        progress=progress,
        amp=amp,
    )


def encode_pixels(
    backbone: "Backbone",
    pixels: PixelCache | torch.Tensor,
    rows: Sequence[int] | None = None,
    batch_size: int = 256,
    amp: bool = True,
    progress: bool = False,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Image embeddings ``[len(rows), D]`` (float32, CPU, unnormalised) of pre-decoded images.

    ``pixels`` is a :class:`~cirlib.data.pixels.PixelCache` or a uint8 ``[N, 3, S, S]`` tensor already
    at the backbone's input size; ``rows`` (default: all) picks and orders the images. This is the
    path of training loops, which hold their images decoded; galleries use :func:`image_features`.
    ``encode`` replaces ``backbone.encode_image`` (e.g. :func:`encode_patch_tokens`).
    """
    encode = encode or backbone.encode_image
    rows = list(range(len(pixels))) if rows is None else [int(r) for r in rows]
    if not rows:
        return torch.empty(0, backbone.embed_dim)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if isinstance(pixels, PixelCache):
                raw = pixels.tensor(chunk)
            else:
                raw = pixels[torch.tensor(chunk, device=pixels.device)]
            yield normalise(raw.to(backbone.device), backbone.mean, backbone.std)

    return encode_in_batches(encode, batches(), backbone.device, module=backbone.model,
                             total=-(-len(rows) // batch_size), desc="image features", progress=progress, amp=amp)


def text_features(
    backbone: "Backbone",
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
    amp: bool = True,
    cache_dir: Path | str | None = None,
) -> torch.Tensor:
    """Text embeddings ``[len(texts), D]`` (float32, CPU, unnormalised), cached under ``cache_dir``.

    A training set's captions (tens of thousands of renderings) cost seconds per encoding, and the
    course encodes them again for every Combiner it trains on one backbone; the entry is keyed by
    the text tower's weights (``backbone.text_fingerprint``, which image-encoder training leaves
    alone), the precision and the strings in order.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        return torch.empty(0, backbone.embed_dim)
    entry = None
    if cache_dir is not None:
        inputs = {"text_tower": backbone.text_fingerprint, "precision": precision(backbone.device, amp), "texts": texts}
        entry = cache_entry(cache_dir, "feature", "texts", ".safetensors", inputs, [])
        cached = entry.load_tensor("features", (len(texts), None), torch.float32)
        if cached is not None:
            return cached
    batches = (backbone.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size))
    feats = encode_in_batches(
        backbone.encode_text,
        batches,
        backbone.device,
        module=backbone.model,
        total=-(-len(texts) // batch_size),
        desc="text features",
        progress=progress,
        amp=amp,
    )
    if entry is not None:
        entry.save_tensor("features", feats)
    return feats


@dataclass(frozen=True)
class SplitFeatures:
    """Unnormalised features of one split: gallery ``[G,D]`` (in ``split.gallery`` order),
    reference images ``[Q,D]`` and query texts ``[Q,D]`` (deterministic captions)."""

    gallery: torch.Tensor
    reference: torch.Tensor
    text: torch.Tensor


def split_outside_references(split: CIRSplit) -> list[str]:
    """The reference images that are not in the split's gallery, in the order :func:`encode_split`
    encodes them (sorted by name) after the gallery."""
    index = name_index(split.gallery)
    return sorted({q.reference for q in split.queries if q.reference not in index})


def split_reference_features(split: CIRSplit, gallery: torch.Tensor, outside: torch.Tensor | None) -> torch.Tensor:
    """``[Q, D]`` reference features of the split's queries, picked from the gallery's rows and
    those of :func:`split_outside_references` (``outside``, None when every reference is in the gallery)."""
    index = name_index(split.gallery)
    extra_index = {n: i for i, n in enumerate(split_outside_references(split))}
    if not split.queries:
        return gallery.new_zeros(0, gallery.shape[1])
    return torch.stack([gallery[index[q.reference]] if q.reference in index else outside[extra_index[q.reference]]
                        for q in split.queries])


def encode_split(
    backbone: Backbone,
    split: CIRSplit,
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> SplitFeatures:
    """Encode a split's gallery once; references outside the gallery are encoded separately."""
    kw = dict(transform_kind=transform_kind, target_ratio=target_ratio, cache_dir=cache_dir, progress=progress)
    outside = split_outside_references(split)
    gallery = image_features(backbone, [split.image_paths[n] for n in split.gallery], **kw)
    extra = image_features(backbone, [split.image_paths[n] for n in outside], **kw) if outside else None
    reference = split_reference_features(split, gallery, extra)
    text = text_features(backbone, [query_text(q) for q in split.queries], progress=progress, cache_dir=cache_dir)
    return SplitFeatures(gallery, reference, text)


# --------------------------------------------------------------------------------------------
# Patch tokens: the spatial output of a ViT image tower, for cross-attention (re-ranking)
# --------------------------------------------------------------------------------------------

PATCH_TOKEN_DTYPE = torch.float16
"""Storage type of patch tokens. They outweigh pooled features by the token count (65 for the tiny
backbone, 197 for ViT-B/16), so fp16 halves caches and memory (a ViT-B/16 gallery of 4,000 images:
1.2 GB instead of 2.4 GB). The tokens are LayerNorm outputs of moderate range (checked finite on
the way in), and fp16's 11-bit significand (relative error <= 2^-11) is finer than the bf16 that
the cross-attention reading them runs in under mixed precision (2^-8)."""


def patch_token_shape(backbone: "Backbone") -> tuple[int, int]:
    """``(L, C)`` of one image's patch tokens: the class token plus the grid cells, at the ViT's width.

    Raises NotImplementedError, naming the model, for towers without such a sequence: ResNets
    (their spatial map has no class token and no per-token layer norm) and ViTs with attentional
    pooling (CoCa), whose ``ln_post`` acts on the pooled queries.
    """
    from open_clip.transformer import VisionTransformer

    visual = backbone.model.visual
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"patch tokens need a ViT image tower; {backbone.model_name} has a {type(visual).__name__} "
            "(re-ranking cross-attends ViT tokens; pick a ViT backbone)"
        )
    if visual.attn_pool is not None:
        raise NotImplementedError(f"patch tokens of {backbone.model_name}: ViTs with attentional pooling are not "
                                  "supported (their final layer norm acts on the pooled queries)")
    grid = visual.grid_size
    return 1 + grid[0] * grid[1], int(visual.transformer.width)


def encode_patch_tokens(backbone: "Backbone", pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed images ``[N, 3, S, S]`` -> their tokens after the last block and ``ln_post``, ``[N, L, C]``.

    Row 0 of each image is the class token (what the pooled feature projects), rows 1.. the grid
    cells in row-major order: the sequence BLIP's cross-attention reads from its ViT. Computed by
    open_clip's ``forward_intermediates`` (last block, final norm applied), so no hook is needed.
    """
    patch_token_shape(backbone)
    out = backbone.model.visual.forward_intermediates(
        pixels.to(backbone.device), indices=1, normalize_intermediates=True, intermediates_only=True,
        output_fmt="NLC", output_extra_tokens=True,
    )
    return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)


def patch_tokens(
    backbone: "Backbone",
    paths: Sequence[Path | str],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    batch_size: int = 64,
    cache_dir: Path | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    decoded: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """Patch tokens ``[len(paths), L, C]`` (:func:`encode_patch_tokens`; fp16, CPU), cached under ``cache_dir``.

    The cache works as :func:`image_features`' does, with the same key inputs (image-tower
    weights, preprocessing, precision, file list) plus what is stored, so both caches go stale
    together; the reading routes (``decoded``, ``num_workers``) are the same too.
    """
    paths = [Path(p) for p in paths]
    shape = patch_token_shape(backbone)
    entry = None
    if cache_dir is not None:
        inputs = {**_image_cache_inputs(backbone, transform_kind, target_ratio, amp),
                  "output": "patch_tokens", "dtype": str(PATCH_TOKEN_DTYPE)}
        entry = cache_entry(cache_dir, "patch-token", "patch-tokens", ".safetensors", inputs, paths)
        cached = entry.load_tensor("tokens", (len(paths), *shape), PATCH_TOKEN_DTYPE)
        if cached is not None:
            return cached
    if not paths:
        return torch.empty(0, *shape, dtype=PATCH_TOKEN_DTYPE)
    tokens = _encode_image_files(partial(encode_patch_tokens, backbone), backbone, paths, transform_kind,
                                 target_ratio, batch_size, cache_dir, num_workers, progress, decoded, amp,
                                 f"patch tokens ({transform_kind})")
    if not torch.isfinite(tokens).all() or tokens.abs().max() > torch.finfo(PATCH_TOKEN_DTYPE).max:
        raise ValueError(f"patch tokens of {backbone.model_name} are not finite or exceed the fp16 range")
    tokens = tokens.to(PATCH_TOKEN_DTYPE)
    if entry is not None:
        entry.save_tensor("tokens", tokens)
    return tokens
