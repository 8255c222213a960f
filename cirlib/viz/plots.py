"""Figures the notebooks show, each saved under a stable name in ``figures/``.

Plotting lives here (not in notebook cells) so every figure is reproducible from a function
call and the notebooks stay thin. Tables are written by :mod:`cirlib.viz.tables`; the numbers
behind the figures come from :mod:`cirlib.data.stats` and :mod:`cirlib.evaluation`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from PIL import Image

from cirlib.core.io import atomic_path
from cirlib.data.datasets import CIRSplit, open_image, query_text
from cirlib.data.preprocess import build_transform, visible_fraction
from cirlib.data.stats import aspect_ratios

if TYPE_CHECKING:
    from cirlib.evaluation.analysis import GapStats, PointingMark

GREEN = "#2ca02c"
TARGET_VIOLET = "#8e44ad"
GAP_RED = "#d62728"
OVERLAP_GREEN = "#0b5d1e"


def save_figure(fig: matplotlib.figure.Figure, name: str, figdir: Path, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<figdir>/<name>.png`` atomically (stable name, regenerated each run)."""
    path = Path(figdir) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", metadata={"Software": None})
    return path


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


def bars_by_group(frame: pd.DataFrame, column: str, title: str = "", ylabel: str = "") -> matplotlib.figure.Figure:
    """One bar panel per first-level index key of ``frame`` (e.g. a benchmark), the bars of
    ``column`` in the order of the second level (e.g. buckets of initial rank), a line at zero."""
    groups = list(dict.fromkeys(frame.index.get_level_values(0)))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 3.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        part = frame.loc[group, column]
        ax.bar([str(i) for i in part.index], part.to_numpy(dtype=float), color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(str(group), fontsize=9)
        ax.set_xlabel(str(frame.index.names[1] or ""))
        ax.tick_params(axis="x", labelrotation=45)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def breakdown_bars(table: pd.DataFrame, metric: str, title: str = "") -> matplotlib.figure.Figure:
    """A :func:`cirlib.evaluation.breakdowns.breakdown` table as grouped bars: one group per row (query
    group), one bar per model, each with its 95 % interval as an error bar and its query count under
    the group's name."""
    models = [c[: -len(metric)].strip() for c in table.columns if c == metric or c.endswith(f" {metric}")]
    if not models:
        raise ValueError(f"the table has no {metric!r} column; it has {list(table.columns)}")
    fig, ax = plt.subplots(figsize=(1.5 + max(1.1, 0.35 * len(models)) * len(table), 3.6))
    width = 0.8 / len(models)
    x = np.arange(len(table))
    for i, model in enumerate(models):
        column = f"{model} {metric}".strip()
        value = table[column].to_numpy(dtype=float)
        errors = np.stack([value - table[f"{column} 95% low"].to_numpy(dtype=float),
                           table[f"{column} 95% high"].to_numpy(dtype=float) - value])
        ax.bar(x + (i - (len(models) - 1) / 2) * width, value, width, yerr=errors, capsize=3, label=model or metric)
    # CIRCO's aspects are snake_case; a long word (fashioniq/dress) stays whole
    names = [textwrap.fill(str(g).replace("_", " "), 14, break_long_words=False) for g in table.index]
    ax.set_xticks(x, [f"{g}\n(n = {n})" for g, n in zip(names, table["n"])], fontsize=8)
    ax.set_ylabel(metric)
    if len(models) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def histogram(
    values: np.ndarray, xlabel: str, bins: int | Sequence[float] = 20, title: str = ""
) -> matplotlib.figure.Figure:
    """A single labelled histogram (counts per bin)."""
    fig, ax = plt.subplots(figsize=(4, 2.8))
    ax.hist(values, bins=bins, color="#4c72b0", align="left" if not isinstance(bins, int) else "mid")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def confusion_matrices(frames: Mapping[str, pd.DataFrame]) -> matplotlib.figure.Figure:
    """Row-normalised confusion matrices (rows = true class), one panel per attribute."""
    import seaborn as sns

    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.8), squeeze=False)
    for ax, (name, frame) in zip(axes[0], frames.items()):
        norm = frame.div(frame.sum(axis=1).clip(lower=1), axis=0)
        sns.heatmap(norm, ax=ax, vmin=0, vmax=1, cmap="Blues", cbar=False, square=True,
                    annot=len(frame) <= 6, fmt=".2f", annot_kws={"fontsize": 7})
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def redundancy_plot(curves_frame: pd.DataFrame) -> matplotlib.figure.Figure:
    """iSEARLE Fig. 7: Recall@K of unimodal queries per benchmark (lower = less redundant)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    for ax, modality in zip(axes, ("T2I", "I2I")):
        part = curves_frame[curves_frame["modality"] == modality]
        for benchmark, d in part.groupby("benchmark"):
            ax.plot(d["K"], d["recall"], marker="o", label=benchmark)
        ax.set_title(f"{modality} ({'caption only' if modality == 'T2I' else 'reference only'})", fontsize=10)
        ax.set_xlabel("K")
        ax.set_xscale("log")
    axes[0].set_ylabel("Recall@K (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def preprocessing_comparison(
    images: Sequence[Path], kinds: Sequence[str], image_size: int, target_ratio: float
) -> matplotlib.figure.Figure:
    """CLIP4Cir Fig. 6: each image as stored and as each pipeline hands it to the encoder."""
    transforms = {k: build_transform(k, image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), target_ratio) for k in kinds}
    fig, axes = plt.subplots(len(images), len(kinds) + 1, figsize=(2.2 * (len(kinds) + 1), 2.3 * len(images)),
                             squeeze=False)
    for row, path in zip(axes, images):
        img = open_image(path)
        _show(row[0], path, f"original {img.width}×{img.height}")
        for ax, kind in zip(row[1:], kinds):
            ax.imshow(transforms[kind](img).permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{kind}: {100 * visible_fraction(img.size, kind, target_ratio, image_size):.0f}% kept",
                          fontsize=8)
    fig.tight_layout()
    return fig


def image_axis(ax: plt.Axes, image: Image.Image | np.ndarray, label: str) -> None:
    """One image in a grid cell, without ticks, labelled underneath (every qualitative grid's cell)."""
    ax.imshow(np.asarray(image))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=8)


def caption_axis(ax: plt.Axes, caption: str, width: int = 28) -> None:
    """A caption in quotes, wrapped to ``width`` characters, in an axis-free grid cell."""
    ax.axis("off")
    ax.text(0.5, 0.5, "“" + "\n".join(textwrap.wrap(caption, width)) + "”", ha="center", va="center", fontsize=9)


def similarity_histograms(
    groups: Mapping[str, Mapping[str, np.ndarray]], bins: int = 60, title: str = ""
) -> matplotlib.figure.Figure:
    """CLIP4Cir Fig. 7: density histograms of pairwise cosine similarities, mean marked.

    ``groups`` maps a row label (e.g. "out-of-the-box", "fine-tuned") to ``{kind: similarities}``
    (e.g. "image", "text" from :func:`cirlib.evaluation.analysis.pairwise_similarities`); columns are kinds and
    share their bins, so a column compares the models directly. Lower means = less cone effect.
    """
    kinds = list(dict.fromkeys(kind for per_kind in groups.values() for kind in per_kind))
    fig, axes = plt.subplots(len(groups), len(kinds), figsize=(3.6 * len(kinds), 2.5 * len(groups)),
                             squeeze=False, sharex="col")
    for col, kind in enumerate(kinds):
        values = [np.asarray(per_kind[kind]) for per_kind in groups.values() if kind in per_kind]
        edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
        for row, (label, per_kind) in enumerate(groups.items()):
            ax = axes[row][col]
            if kind not in per_kind:
                ax.axis("off")
                continue
            sims = np.asarray(per_kind[kind])
            ax.hist(sims, bins=edges, density=True, color="#4c72b0", alpha=0.8)
            ax.axvline(sims.mean(), color=GAP_RED, ls="--", lw=1.2)
            ax.text(0.02, 0.92, f"mean {sims.mean():.3f}", transform=ax.transAxes, fontsize=8, color=GAP_RED,
                    va="top")
            ax.set_title(f"{label}: {kind} features", fontsize=9)
            if col == 0:
                ax.set_ylabel("density")
            if row == len(groups) - 1:
                ax.set_xlabel("cosine similarity of random pairs")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def gap_histograms(stats: Mapping[str, "GapStats"], ncols: int = 2, title: str = "") -> matplotlib.figure.Figure:
    """CLIP4Cir Fig. 8: query-target (violet) vs query-non-target (green) similarity densities.

    The red arrow spans the gap between the two means; the dark-green area is the histograms'
    intersection, its intersection-over-union printed in the corner (smaller = fewer errors). All
    panels share one x-range, so gaps and spreads of different combiners compare by eye.
    """
    ncols = max(1, min(ncols, len(stats)))
    nrows = -(-len(stats) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (label, s) in zip(axes.flat, stats.items()):
        target, other = s.densities()
        ax.stairs(other, s.bin_edges, fill=True, color=GREEN, alpha=0.45, label="non-target")
        ax.stairs(target, s.bin_edges, fill=True, color=TARGET_VIOLET, alpha=0.45, label="target")
        ax.stairs(np.minimum(target, other), s.bin_edges, fill=True, color=OVERLAP_GREEN, alpha=0.85,
                  label="intersection")
        top = 1.05 * max(target.max(), other.max())
        ax.set_ylim(0, 1.25 * top)
        for mean, colour in ((s.non_target_mean, GREEN), (s.target_mean, TARGET_VIOLET)):
            ax.axvline(mean, color=colour, ls="--", lw=1)
        ax.annotate("", xy=(s.target_mean, top), xytext=(s.non_target_mean, top),
                    arrowprops={"arrowstyle": "<->", "color": GAP_RED, "lw": 1.8})
        ax.text((s.target_mean + s.non_target_mean) / 2, 1.03 * top, f"gap {s.mean_gap:.3f}", color=GAP_RED,
                ha="center", va="bottom", fontsize=8)
        ax.text(0.02, 0.97, f"IoU {s.overlap:.3f}", transform=ax.transAxes, color=OVERLAP_GREEN, fontsize=8,
                va="top")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("cosine similarity to the combined query")
        ax.set_ylabel("density")
    lo = min(float(s.bin_edges[0]) for s in stats.values())
    hi = max(float(s.bin_edges[-1]) for s in stats.values())
    for ax in list(axes.flat)[: len(stats)]:
        ax.set_xlim(lo, hi)
    for ax in list(axes.flat)[len(stats):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def gradcam_grid(
    rows: Sequence[tuple[Image.Image, str, np.ndarray]],
    layer: str,
    alpha: float = 0.5,
    marks: Sequence["PointingMark"] | None = None,
) -> matplotlib.figure.Figure:
    """CLIP4Cir Figs. 9-10: reference | caption | Grad-CAM over the reference, one query per row.

    Each row is ``(preprocessed reference, caption, cam)`` as from
    :func:`cirlib.evaluation.analysis.reference_input` and :func:`cirlib.evaluation.analysis.gradcam`; ``layer`` names
    where the map was read (:func:`cirlib.evaluation.analysis.gradcam_layer`) and goes into the title.
    With ``marks`` (one per row, from :func:`cirlib.evaluation.analysis.pointing_examples`, whose rows
    hold the stored reference and the map carried onto it) the pointing game is drawn too: the edited
    objects' boxes and the map's peak, green on a hit and red on a miss.
    """
    if marks is not None and len(marks) != len(rows):
        raise ValueError(f"{len(marks)} marks for {len(rows)} rows")
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.3 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.4, 1]})
    for i, (row_axes, (image, caption, cam)) in enumerate(zip(axes, rows)):
        image_axis(row_axes[0], image, "reference (as encoded)" if marks is None else "reference")
        caption_axis(row_axes[1], caption)
        image_axis(row_axes[2], image, "Grad-CAM")
        width, height = image.size
        row_axes[2].imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1,
                           extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        if marks is not None:
            _pointing_mark(row_axes[2], marks[i])
    title = f"{layer}\n(gradients of the combined query features)"
    if marks is not None:
        title += "\nboxes: edited objects; cross: peak (green = hit, red = miss)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _pointing_mark(ax: plt.Axes, mark: "PointingMark") -> None:
    """Boxes and peak in image pixel coordinates (pixel i spans [i, i + 1)) over an imshow axis."""
    colour = GREEN if mark.hit else GAP_RED
    for x0, y0, x1, y1 in mark.boxes:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.5))
    if np.isfinite(mark.peak).all():
        ax.plot(mark.peak[0] - 0.5, mark.peak[1] - 0.5, marker="x", color=colour, markersize=9, mew=2.5)
    ax.set_xlabel(f"Grad-CAM: {'hit' if mark.hit else 'miss'}", fontsize=8, color=colour)


def lambda_histogram(
    lambdas: Mapping[str, np.ndarray], bins: int = 20, ncols: int = 3, title: str = ""
) -> matplotlib.figure.Figure:
    """The Combiner's lambda per query (0 = reference image only, 1 = caption only), one panel per
    benchmark / model, all on the same x-range [0, 1] and bins, mean marked, so panels compare by eye."""
    if not lambdas:
        raise ValueError("no lambdas to plot")
    ncols = max(1, min(ncols, len(lambdas)))
    nrows = -(-len(lambdas) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, (label, values) in zip(axes.flat, lambdas.items()):
        values = np.asarray(values, dtype=np.float64)
        ax.hist(values, bins=edges, color="#4c72b0")
        ax.axvline(values.mean(), color=GAP_RED, ls="--", lw=1.2)
        ax.text(0.02, 0.95, f"mean {values.mean():.2f}", transform=ax.transAxes, color=GAP_RED, fontsize=8,
                va="top")
        ax.set_xlim(0.0, 1.0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("λ (weight of the caption)")
        ax.set_ylabel("queries")
    for ax in list(axes.flat)[len(lambdas):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def retrieval_grid(
    split: CIRSplit,
    query_indices: Sequence[int],
    ranked_names: Sequence[Sequence[str]],
    k: int = 5,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> matplotlib.figure.Figure:
    """CLIP4Cir Figs. 11-12: reference | caption | top-``k`` results, ground truths framed green.

    ``ranked_names[i]`` ranks the gallery for query ``query_indices[i]`` (e.g. from
    :func:`cirlib.evaluation.analysis.top_k_names`). A result is a ground truth if it is in the query's
    ``ground_truths`` (CIRCO: every annotated target) or is its ``target``. ``row_labels`` name each
    row under its reference (e.g. ``"F"`` and ``"R"`` for one query ranked before and after re-ranking).
    """
    if row_labels is not None and len(row_labels) != len(query_indices):
        raise ValueError(f"{len(row_labels)} row labels for {len(query_indices)} rows")
    if len(ranked_names) != len(query_indices):
        raise ValueError(f"{len(ranked_names)} rankings for {len(query_indices)} queries")
    fig, axes = plt.subplots(len(query_indices), k + 2, figsize=(1.7 * (k + 2) + 0.8, 2.0 * len(query_indices)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.5] + [1] * k})
    labels = row_labels if row_labels is not None else ["reference"] * len(query_indices)
    for row_axes, qi, names, label in zip(axes, query_indices, ranked_names, labels):
        q = split.queries[qi]
        truths = set(q.ground_truths) | ({q.target} if q.target is not None else set())
        _show(row_axes[0], split.image_paths[q.reference], label)
        caption_axis(row_axes[1], query_text(q), width=22)
        for rank, ax in enumerate(row_axes[2:], 1):
            if rank > len(names):
                ax.axis("off")
                continue
            name = names[rank - 1]
            _show(ax, split.image_paths[name], f"{rank}", frame=GREEN if name in truths else None)
    fig.suptitle(title or f"{split.dataset} / {split.split}: top-{k} results (green = ground truth)", fontsize=11)
    fig.tight_layout()
    return fig


def run_curves(
    histories: Mapping[tuple[str, str], Sequence[Mapping[str, float]]],
    main_metrics: Mapping[str, str],
    title: str = "",
) -> matplotlib.figure.Figure:
    """Per-epoch training loss and validation main metric of several runs keyed (benchmark, variant).

    A benchmark none of whose runs was validated (a run that keeps its last epoch) gets no
    validation panel: the loss is all there is to show.
    """
    frames = {key: pd.DataFrame(list(history)) for key, history in histories.items()}
    benches = list(dict.fromkeys(b for (b, _), f in frames.items() if main_metrics[b] in f))
    fig, axes = plt.subplots(1, 1 + len(benches), figsize=(3.8 * (1 + len(benches)), 3), squeeze=False)
    for (bench, variant), frame in frames.items():
        axes[0][0].plot(frame["epoch"], frame["loss"], marker=".", label=f"{bench} / {variant}")
        if main_metrics[bench] in frame:  # then its benchmark has a panel
            ax = axes[0][1 + benches.index(bench)]
            ax.plot(frame["epoch"], frame[main_metrics[bench]], marker=".", label=variant)
    axes[0][0].set_title("training loss", fontsize=9)
    axes[0][0].legend(fontsize=7)
    for bench, ax in zip(benches, axes[0][1:]):
        ax.set_title(f"{bench}: validation {main_metrics[bench]}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
