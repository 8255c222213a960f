"""Batched CLIP feature extraction for images, texts and whole CIR splits, with an on-disk cache for
image galleries.

Every evaluation and analysis notebook encodes the same galleries again and again with the same
frozen backbone, at seconds (tiny model, CPU) to hours (RN50x4 on real galleries) a time.
``image_features`` therefore stores its result as one safetensors file per (weights, transform,
ordered file list) and reuses it until any of those changes: other image-tower weights
(``backbone.image_fingerprint``; text-encoder training leaves it alone),
another pipeline or target ratio, or an image file whose bytes differ (:func:`cirlib.data.pixels.file_list`
hashes them). Cache files are written atomically; an unreadable one is recomputed with a warning
rather than trusted.

Features are returned unnormalised, float32, on the CPU, one row per input in input order.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cirlib.data.datasets import CIRSplit, ImageLoadError, open_image, query_text
from cirlib.core.device import autocast, precision
from cirlib.core.io import atomic_path, fingerprint
from cirlib.evaluation.metrics import name_index
from cirlib.data.pixels import CACHE_VERSION, PixelCache, file_list, normalise
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, kind_ratio, transform_for

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

# CACHE_VERSION (from cirlib.data.pixels, one for both image caches): bump it when the extraction
# itself changes in a way that alters numbers, to orphan old caches.


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


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module | None) -> Iterator[None]:
    """Encode in eval mode (dropout off, frozen BN) and give the caller its training flag back."""
    if module is None:
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


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


def image_cache_key(
    backbone: "Backbone",
    paths: Sequence[Path],
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    amp: bool = True,
) -> str:
    """Fingerprint of everything an image feature matrix depends on."""
    return fingerprint(
        {
            "version": CACHE_VERSION,
            "image_tower": backbone.image_fingerprint,
            "precision": precision(backbone.device, amp),  # mixed precision gives other numbers
            "transform": {
                "kind": transform_kind,
                "target_ratio": kind_ratio(transform_kind, target_ratio),
                "image_size": int(backbone.image_size),
                "mean": [float(m) for m in backbone.mean],
                "std": [float(s) for s in backbone.std],
            },
            "files": file_list(paths),
        }
    )


def _load_cache(file: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached matrix, or None (with a warning) when the file cannot be trusted."""
    try:
        with safe_open(file, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise ValueError("its key does not match its inputs")
            feats = f.get_tensor("features")
        if feats.shape[0] != n or feats.dtype != torch.float32:
            raise ValueError(f"holds {tuple(feats.shape)} {feats.dtype}, expected {n} float32 rows")
        return feats
    except Exception as err:  # any failure to read means: recompute, never crash on a cache
        warnings.warn(f"feature cache {file} is unreadable ({err}); recomputing", stacklevel=3)
        return None


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
    cache_file, key = None, ""
    if cache_dir is not None:
        key = image_cache_key(backbone, paths, transform_kind, target_ratio, amp)
        cache_file = Path(cache_dir) / f"images-{key}.safetensors"
        if cache_file.exists() and (cached := _load_cache(cache_file, key, len(paths))) is not None:
            return cached
    if not paths:
        return torch.empty(0, backbone.embed_dim)

    if decoded:
        pixels = PixelCache(paths, backbone.image_size, transform_kind, target_ratio, cache_dir, progress)
        feats = encode_pixels(backbone, pixels, batch_size=batch_size, amp=amp, progress=progress)
    else:
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
        feats = encode_in_batches(
            backbone.encode_image,
            batches,
            backbone.device,
            module=backbone.model,
            total=-(-len(paths) // batch_size),
            desc=f"image features ({transform_kind})",
            progress=progress,
            amp=amp,
        )
    _save_cache(cache_file, key, feats)
    return feats


def _save_cache(file: Path | None, key: str, feats: torch.Tensor) -> None:
    if file is not None:
        with atomic_path(file) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp), metadata={"key": key, "n": str(len(feats))})


def encode_pixels(
    backbone: "Backbone",
    pixels: PixelCache | torch.Tensor,
    rows: Sequence[int] | None = None,
    batch_size: int = 256,
    amp: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Image embeddings ``[len(rows), D]`` (float32, CPU, unnormalised) of pre-decoded images.

    ``pixels`` is a :class:`~cirlib.data.pixels.PixelCache` or a uint8 ``[N, 3, S, S]`` tensor already
    at the backbone's input size; ``rows`` (default: all) picks and orders the images. This is the
    path of training loops, which hold their images decoded; galleries use :func:`image_features`.
    """
    rows = list(range(len(pixels))) if rows is None else [int(r) for r in rows]
    if not rows:
        return torch.empty(0, backbone.embed_dim)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            raw = pixels.tensor(chunk) if isinstance(pixels, PixelCache) else pixels[torch.tensor(chunk, device=pixels.device)]
            yield normalise(raw.to(backbone.device), backbone.mean, backbone.std)

    return encode_in_batches(backbone.encode_image, batches(), backbone.device, module=backbone.model,
                             total=-(-len(rows) // batch_size), desc="image features", progress=progress, amp=amp)


def text_features(
    backbone: "Backbone", texts: Sequence[str], batch_size: int = 256, progress: bool = True, amp: bool = True
) -> torch.Tensor:
    """Text embeddings ``[len(texts), D]`` (float32, CPU, unnormalised); not cached (cheap)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        return torch.empty(0, backbone.embed_dim)
    batches = (backbone.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size))
    return encode_in_batches(
        backbone.encode_text,
        batches,
        backbone.device,
        module=backbone.model,
        total=-(-len(texts) // batch_size),
        desc="text features",
        progress=progress,
        amp=amp,
    )


@dataclass(frozen=True)
class SplitFeatures:
    """Unnormalised features of one split: gallery ``[G,D]`` (in ``split.gallery`` order),
    reference images ``[Q,D]`` and query texts ``[Q,D]`` (deterministic captions)."""

    gallery: torch.Tensor
    reference: torch.Tensor
    text: torch.Tensor


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
    gallery = image_features(backbone, [split.image_paths[n] for n in split.gallery], **kw)
    index = name_index(split.gallery)
    outside = sorted({q.reference for q in split.queries if q.reference not in index})
    extra = image_features(backbone, [split.image_paths[n] for n in outside], **kw) if outside else None
    extra_index = {n: i for i, n in enumerate(outside)}
    reference = torch.stack([
        gallery[index[q.reference]] if q.reference in index else extra[extra_index[q.reference]]
        for q in split.queries
    ]) if split.queries else gallery.new_zeros(0, gallery.shape[1])
    text = text_features(backbone, [query_text(q) for q in split.queries], progress=progress)
    return SplitFeatures(gallery, reference, text)
