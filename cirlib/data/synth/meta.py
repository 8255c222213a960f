"""``cirlib_meta.json``: what a generator knows about the root it wrote, beyond the public layout.

Both generators write one per root (a FashionIQ root, a CIRR root, a CIRCO root): the generator's
name, its fingerprint, the seed and sizes, and under ``attributes`` the attributes of every image
(keyed by image name, or CIRCO id as a string), which absolute captions, zero-shot labels and
analyses read. The file is written last, so its presence marks a complete root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from cirlib.core.io import write_json

META_FILE = "cirlib_meta.json"


def meta_path(root: str | os.PathLike) -> Path:
    """Where a root's metadata lives."""
    return Path(root) / META_FILE


def write_meta(root: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write a root's metadata atomically (compact JSON: it holds every image's attributes)."""
    return write_json(meta_path(root), meta, indent=None)


def read_meta(root: str | os.PathLike, generators: Collection[str] | None = None) -> dict[str, Any]:
    """The metadata of a generated root; errors name the file and what is wrong with it.

    With ``generators``, the file's ``generator`` field must be one of them. The ``attributes``
    field must be an object of image name -> attributes.
    """
    path = meta_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a root written by a cirlib generator")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if generators is not None and meta.get("generator") not in generators:
        expected = " or ".join(repr(g) for g in sorted(generators))
        raise ValueError(f"{path}: field 'generator' is {meta.get('generator')!r}, expected {expected}")
    if not isinstance(meta.get("attributes"), dict):
        raise ValueError(f"{path}: field 'attributes' must be an object of image name -> attributes")
    return meta


def peek_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a root, or None when it is absent or unreadable (an incomplete or foreign root)."""
    try:
        return read_meta(root)
    except (OSError, ValueError):
        return None


__all__ = ["META_FILE", "meta_path", "peek_meta", "read_meta", "write_meta"]
