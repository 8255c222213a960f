"""The on-disk cache of values computed from a list of files (decoded pixels, image features).

An entry is one file named by its key: the fingerprint of :data:`CACHE_VERSION`, of what the
computation depends on (model, pipeline, precision) and of the file list, which gives each input's
size and content digest in order. Not its path: the same bytes give the same values wherever they
lie, so a moved project or dataset keeps its entries. Digests, not mtimes: a same-size rewrite that
keeps the mtime (``cp -p``, ``rsync -t``, an extracted archive) must not serve stale values. Digests
are remembered across processes by each file's stat identity (:mod:`cirlib.core.digests`), so a
cached gallery is not read again at every start.

Entries are written atomically; one that cannot be read or fails its check is recomputed with a
warning, never trusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cirlib.core.digests import sized_digests
from cirlib.core.io import atomic_path, fingerprint

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 3  # 2: files keyed by content digest instead of mtime; 3: and no longer by their path
"""Version of every on-disk cache entry. Bump it when decoding or extraction changes what a given
file list yields, to orphan the entries written before."""

T = TypeVar("T")


def cache_key(inputs: dict[str, Any], paths: Sequence[Path | str]) -> str:
    """Key of a value computed from the files ``paths`` (in this order) with the settings ``inputs``."""
    return fingerprint({"version": CACHE_VERSION, **inputs, "files": sized_digests(paths)})


@dataclass(frozen=True)
class CacheEntry:
    """One cached value: the file that holds it, the key it was written for, and its kind for messages."""

    file: Path
    key: str
    kind: str  # "feature", "pixel", ...

    def load(self, read: Callable[[Path], T]) -> T | None:
        """``read(file)``, or None when the entry is absent or ``read`` fails (then with a warning).

        ``read`` raises on anything it does not trust (wrong key, shape or dtype); the caller then
        recomputes and :meth:`save` overwrites the bad file.
        """
        if not self.file.exists():
            return None
        try:
            return read(self.file)
        except Exception as err:  # any failure to read means: recompute, never crash on a cache
            warnings.warn(f"{self.kind} cache {self.file} is unusable ({err}); recomputing it", stacklevel=3)
            return None

    def save(self, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmp)`` on a temporary file and move it onto the entry only if it succeeds."""
        with atomic_path(self.file) as tmp:
            write(tmp)
        return self.file

    def load_tensor(self, name: str, shape: Sequence[int | None], dtype: torch.dtype) -> torch.Tensor | None:
        """Tensor ``name`` of a safetensors entry, checked by :func:`read_keyed_tensor`; None as :meth:`load`."""
        return self.load(lambda file: read_keyed_tensor(file, self.key, name, shape, dtype))

    def save_tensor(self, name: str, tensor: torch.Tensor) -> Path:
        """Write ``tensor`` as a safetensors entry with this key in its metadata (what loading checks)."""
        from safetensors.torch import save_file

        metadata = {"key": self.key, "n": str(len(tensor))}
        return self.save(lambda tmp: save_file({name: tensor.contiguous()}, str(tmp), metadata=metadata))


def cache_entry(
    cache_dir: Path | str, kind: str, prefix: str, suffix: str, inputs: dict[str, Any], paths: Sequence[Path | str]
) -> CacheEntry:
    """The entry ``<cache_dir>/<prefix>-<key><suffix>`` of a value computed from ``paths`` with ``inputs``."""
    key = cache_key(inputs, paths)
    return CacheEntry(Path(cache_dir) / f"{prefix}-{key}{suffix}", key, kind)


__all__ = ["CACHE_VERSION", "CacheEntry", "cache_entry", "cache_key"]


def read_keyed_tensor(
    file: Path, key: str, name: str, shape: Sequence[int | None], dtype: torch.dtype
) -> torch.Tensor:
    """Tensor ``name`` of a safetensors cache file written under ``key`` (its metadata), checked
    against ``shape`` (``None``: any size along that axis) and ``dtype``.

    A mismatch raises ``ValueError``, which :meth:`CacheEntry.load` reports and answers by
    recomputing: a file from other inputs or a half-written one is never used.
    """
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            raise ValueError("its key does not match its inputs")
        tensor = f.get_tensor(name)
    fits = tensor.ndim == len(shape) and all(s is None or s == n for s, n in zip(shape, tensor.shape))
    if not fits or tensor.dtype != dtype:
        wanted = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"holds {tuple(tensor.shape)} {tensor.dtype}, expected {wanted} {dtype}")
    return tensor
