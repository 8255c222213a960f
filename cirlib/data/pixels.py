"""Pre-decoded images: each file decoded and preprocessed once, then kept as a uint8 array.

Training loops (tiny-CLIP pretraining, stage-1 fine-tuning) visit the same images every epoch; PNG
decoding and resizing would otherwise cost as much as the tiny encoder itself on a CPU. The
preprocessing pipeline runs with mean 0 / std 1, whose output is exactly ``k / 255``; storing ``k``
and normalising per batch gives bit-identical inputs to :func:`cirlib.data.preprocess.build_transform`
at a quarter of the memory of float tensors. With a ``cache_dir`` the array is written once as an
``.npy`` file keyed by the file list (paths, sizes, content digests) and the pipeline, and
memory-mapped, so regenerated images are never served stale and a corrupt cache is rebuilt rather
than trusted.

Cache keys hash the bytes of every image rather than trust size and mtime: a same-size rewrite that
keeps the mtime (``cp -p``, ``rsync -t``, an extracted archive) must not return old pixels or
features. Within a process each digest is remembered per (path, size, mtime, ctime, inode), which
any rewrite changes, so repeated keys of one gallery hash it once.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cirlib.data.datasets import ImageLoadError, open_image
from cirlib.core.io import atomic_path, fingerprint
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, build_transform, kind_ratio

# The version of every on-disk image cache (these pixel arrays and cirlib.models.features' feature files).
# Bump when decoding or extraction changes what a given file list yields, to orphan old caches.
CACHE_VERSION = 2  # 2: files keyed by content digest instead of mtime

_digests: dict[tuple[str, int, int, int, int, int], str] = {}
_digests_lock = threading.Lock()


def content_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """blake2b-128 of a regular file's bytes, remembered while its stat identity stays the same."""
    return _sized_digest(os.path.abspath(path), path, chunk)[1]


def _sized_digest(abspath: str, shown: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    st = _regular_stat(abspath, shown)
    memo = (abspath, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    with _digests_lock:
        known = _digests.get(memo)
    if known is not None:
        return st.st_size, known
    h = hashlib.blake2b(digest_size=16)
    with open(abspath, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    with _digests_lock:
        _digests[memo] = digest
    return st.st_size, digest


def _regular_stat(abspath: str, shown: str | os.PathLike) -> os.stat_result:
    try:
        st = os.stat(abspath)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {shown}") from None
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block forever
        raise ImageLoadError(f"{shown}: not a regular file, cannot be an image")
    return st


def file_list(paths: Sequence[Path | str]) -> list[tuple[str, int, str]]:
    """(absolute path, size, content digest) per image: what makes any cache of these images stale."""
    entries = []
    for p in paths:
        abspath = os.path.abspath(p)
        entries.append((abspath, *_sized_digest(abspath, p)))
    return entries


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> the float input the backbone expects (on the pixels' device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


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
        key = fingerprint(
            {
                "version": CACHE_VERSION,
                "kind": transform_kind,
                "ratio": kind_ratio(transform_kind, target_ratio),
                "size": self.image_size,
                "files": file_list(self.paths),
            }
        )
        file = Path(cache_dir) / f"pixels-{key}.npy" if cache_dir is not None else None
        self.array = self._load(file) if file is not None and file.exists() else None
        if self.array is None:
            self.array = self._decode(progress)
            if file is not None:
                with atomic_path(file) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, self.array)
                self.array = np.load(file, mmap_mode="r")

    def _load(self, file: Path) -> np.ndarray | None:
        try:
            array = np.load(file, mmap_mode="r")
            if array.shape != (len(self.paths), 3, self.image_size, self.image_size) or array.dtype != np.uint8:
                raise ValueError(f"holds {array.shape} {array.dtype}")
            return array
        except Exception as err:  # a bad cache is rebuilt, never trusted
            warnings.warn(f"pixel cache {file} is unusable ({err}); rebuilding it", stacklevel=3)
            return None

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
        """Decode every file; threads overlap well because PIL releases the GIL while decoding."""
        out = np.empty((len(self.paths), 3, self.image_size, self.image_size), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            decoded = pool.map(self._decode_one, self.paths)
            for i, img in enumerate(tqdm(decoded, total=len(self.paths), desc="decode images", leave=False,
                                         disable=not progress)):
                out[i] = img
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


__all__ = ["CACHE_VERSION", "PixelCache", "content_digest", "file_list", "normalise"]
