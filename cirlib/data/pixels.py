"""Pre-decoded images: each file decoded and preprocessed once, then kept as a uint8 array.

Training loops (tiny-CLIP pretraining, stage-1 fine-tuning) visit the same images every epoch; PNG
decoding and resizing would otherwise cost as much as the tiny encoder itself on a CPU. The
preprocessing pipeline runs with mean 0 / std 1, whose output is exactly ``k / 255``; storing ``k``
and normalising per batch gives bit-identical inputs to :func:`cirlib.data.preprocess.build_transform`
at a quarter of the memory of float tensors. With a ``cache_dir`` the array is written once as an
``.npy`` entry of :mod:`cirlib.core.cache` (keyed by the file list and the pipeline) and
memory-mapped, so regenerated images are never served stale and a corrupt entry is rebuilt rather
than trusted.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cirlib.core.cache import cache_entry
from cirlib.data.datasets import ImageLoadError, open_image
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, build_transform, kind_ratio


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> the float input the backbone expects (on the pixels' device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array)


class PixelCache:
    """Images after a preprocessing pipeline, as uint8 ``[N, 3, S, S]`` (optionally on disk)."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        image_size: int,
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
        progress: bool = True,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_size = int(image_size)
        self.transform = build_transform(transform_kind, image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), target_ratio)
        entry = None
        if cache_dir is not None:
            ratio = kind_ratio(transform_kind, target_ratio)
            inputs = {"kind": transform_kind, "ratio": ratio, "size": self.image_size}
            entry = cache_entry(cache_dir, "pixel", "pixels", ".npy", inputs, self.paths)
        array = entry.load(self._read) if entry is not None else None
        if array is None:
            array = self._decode(progress)
            if entry is not None:
                entry.save(lambda tmp: _save_npy(tmp, array))
                array = np.load(entry.file, mmap_mode="r")
        self.array: np.ndarray = array

    def _read(self, file: Path) -> np.ndarray:
        array = np.load(file, mmap_mode="r")
        if array.shape != (len(self.paths), 3, self.image_size, self.image_size) or array.dtype != np.uint8:
            raise ValueError(f"holds {array.shape} {array.dtype}")
        return array

    def _decode_one(self, path: Path) -> np.ndarray:
        image = open_image(path)
        try:
            pixels = self.transform(image)
        except ImageLoadError as err:  # the pipeline's size limits, on an image that no longer knows its file
            if str(path) in str(err):
                raise
            raise ImageLoadError(f"{path}: {err}") from err
        return pixels.mul_(255).round_().to(torch.uint8).numpy()

    def _decode(self, progress: bool) -> np.ndarray:
        """Decode each distinct file once (a corpus pairs one image with several captions); threads
        overlap well because PIL releases the GIL while decoding."""
        out = np.empty((len(self.paths), 3, self.image_size, self.image_size), dtype=np.uint8)
        rows: dict[Path, list[int]] = {}
        for i, path in enumerate(self.paths):
            rows.setdefault(path, []).append(i)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            decoded = pool.map(self._decode_one, rows)
            for (_, where), img in zip(rows.items(), tqdm(decoded, total=len(rows), desc="decode images",
                                                          leave=False, disable=not progress)):
                out[where] = img
        return out

    def __len__(self) -> int:
        return len(self.paths)

    def tensor(self, rows: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """uint8 pixels of ``rows`` (all when None) as an in-memory CPU tensor."""
        array = self.array if rows is None else self.array[np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(np.array(array, copy=True))

    def batch(
        self, rows: torch.Tensor | Sequence[int], mean: Sequence[float], std: Sequence[float], device: torch.device
    ) -> torch.Tensor:
        """Normalised float pixels ``[B, 3, S, S]`` of the given rows, on ``device``."""
        return normalise(self.tensor(rows).to(device), mean, std)


__all__ = ["PixelCache", "normalise"]
