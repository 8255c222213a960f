"""Two tensor idioms every stage needs: eval mode that gives the caller its flags back, and row
chunks that keep a query x gallery matrix within a fixed memory budget."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

CHUNK_ELEMENTS = 1 << 24
"""Entries of a score matrix computed at once (64 MiB in fp32): a 10k x 10k gallery fits anywhere."""


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Run in eval mode (dropout off, frozen norms) and restore each module's training flag after.

    ``None`` entries are ignored, so callers holding an optional module need no branch.
    """
    present = [m for m in modules if m is not None]
    flags = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(present, flags):
            m.train(flag)


def row_chunks(n_rows: int, row_width: int, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Slices over ``n_rows`` rows such that each chunk holds about ``chunk_elements`` entries of width
    ``row_width`` (at least one row per chunk)."""
    if n_rows < 0 or row_width < 0:
        raise ValueError(f"row count and width must be >= 0, got {n_rows} and {row_width}")
    step = max(1, chunk_elements // max(1, row_width))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
