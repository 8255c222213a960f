"""Figures and tables the notebooks show, each saved under a stable name in ``figures/``.

Plotting lives here (not in notebook cells) so every figure is reproducible from a function
call and the notebooks stay thin.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.figure

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from cirlib.datasets import CIRSplit, open_image, query_text
from cirlib.io import atomic_path

GREEN = "#2ca02c"


def save_figure(fig: matplotlib.figure.Figure, name: str, figdir: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<figdir>/<name>.png`` atomically (stable name, regenerated each run)."""
    path = Path(figdir) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", metadata={"Software": None})
    return path


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A GitHub-flavoured markdown table (pandas' own needs the optional ``tabulate``)."""
    frame = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
    cols = [str(c) for c in frame.columns]

    def fmt(v: object) -> str:
        return floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)

    rows = [[fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, name: str, figdir: Path, floatfmt: str = "{:.2f}") -> Path:
    """Save a result table as ``<name>.csv`` (machine-readable) and ``<name>.md`` (for the README)."""
    figdir = Path(figdir)
    with atomic_path(figdir / f"{name}.csv") as tmp:
        df.to_csv(tmp, float_format="%.4f")
    with atomic_path(figdir / f"{name}.md") as tmp:
        tmp.write_text(to_markdown(df, floatfmt), encoding="utf-8")
    return figdir / f"{name}.csv"


def triplet_grid(
    split: CIRSplit,
    n: int = 4,
    seed: int = 0,
    title: str | None = None,
) -> matplotlib.figure.Figure:
    """Sample queries as rows: reference | caption(s) | target (green frame), like the papers' figures."""
    rng = np.random.default_rng(seed)
    with_target = [q for q in split.queries if q.target is not None]
    pool = with_target or split.queries
    picks = [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.2 * len(picks)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6, 1]})
    for row, q in zip(axes, picks):
        _show(row[0], split.image_paths[q.reference], "reference")
        row[1].axis("off")
        caption = "\n".join(textwrap.wrap(query_text(q), 34))
        row[1].text(0.5, 0.5, f"“{caption}”", ha="center", va="center", fontsize=9, wrap=True)
        if q.target is not None:
            _show(row[2], split.image_paths[q.target], "target", frame=GREEN)
        else:
            row[2].axis("off")
    fig.suptitle(title or f"{split.dataset} / {split.split}: sample queries", fontsize=11)
    fig.tight_layout()
    return fig


def _show(ax: plt.Axes, path: Path, label: str, frame: str | None = None) -> None:
    ax.imshow(np.asarray(open_image(path)))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=8)
    if frame:
        for spine in ax.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(4)


def aspect_ratios(split: CIRSplit) -> np.ndarray:
    """Width / height of every gallery image (read from the header only)."""
    out = []
    for name in split.gallery:
        with Image.open(split.image_paths[name]) as im:
            w, h = im.size
        out.append(w / h)
    return np.asarray(out)


def aspect_ratio_histograms(splits: Mapping[str, CIRSplit], bins: int = 30) -> matplotlib.figure.Figure:
    """CLIP4Cir Fig. 5: distribution of image aspect ratios per category/benchmark."""
    fig, axes = plt.subplots(1, len(splits), figsize=(3.2 * len(splits), 2.8), squeeze=False)
    for ax, (name, split) in zip(axes[0], splits.items()):
        ratios = aspect_ratios(split)
        ax.hist(ratios, bins=bins, color="#4c72b0")
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{name}\nmedian w/h = {np.median(ratios):.2f}", fontsize=9)
        ax.set_xlabel("width / height")
    axes[0][0].set_ylabel("images")
    fig.tight_layout()
    return fig


def curves(history: pd.DataFrame, x: str, ys: Sequence[str], title: str = "") -> matplotlib.figure.Figure:
    """Training curves: one panel per column in ``ys`` (NaNs, e.g. from sparse evaluation, skipped)."""
    fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys), 2.8), squeeze=False)
    for ax, y in zip(axes[0], ys):
        d = history[[x, y]].dropna()
        ax.plot(d[x], d[y], marker="." if len(d) < 40 else None)
        ax.set_xlabel(x)
        ax.set_title(y, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def histogram(values: np.ndarray, xlabel: str, bins=20, title: str = "") -> matplotlib.figure.Figure:
    """A single labelled histogram (counts per bin)."""
    fig, ax = plt.subplots(figsize=(4, 2.8))
    ax.hist(values, bins=bins, color="#4c72b0", align="left" if not isinstance(bins, int) else "mid")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
