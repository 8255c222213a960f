"""Composed image retrieval from the command line, for users who want results without Jupyter.

    python -m cirlib.search --reference shoe.png --caption "is red and has stripes" \\
        [--benchmark fashioniq|cirr|circo] [--category dress] [--split val] [--method combiner] \\
        [--k 10] [--contact-sheet out.png] [--quick]

(or ``cirlib-search ...`` once the package is installed). The reference is an image file or the
name of an image of the searched gallery. The search is the engine's
(:class:`~cirlib.search.engine.Retriever`): the same method, features and ranking the notebooks
evaluate and the widgets show, on the course's benchmark roots and trained artifacts (``--quick``:
those of the quick runs; ``--cirr-root`` etc. and ``--backbone``/``--pretrained``: real datasets
and weights, as in the notebooks' parameters). It prints the top ``k`` with their scores and can
save a contact sheet (reference, caption and results with scores) as a PNG.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import matplotlib.figure
import matplotlib.pyplot as plt

from cirlib.data.datasets import FASHIONIQ_CATEGORIES, open_image
from cirlib.evaluation.protocols import PROTOCOLS
from cirlib.models.backbone import TINY_MODEL
from cirlib.search.engine import METHODS, Hit, Reference, Retriever
from cirlib.viz.plots import caption_axis, image_axis, save_figure

PROG = "cirlib-search"
SHEET_COLUMNS = 5  # results per row of a contact sheet


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (also what ``--help`` prints)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Composed image retrieval: a reference image and what to change -> the best matches.")
    parser.add_argument("--reference", required=True,
                        help="reference image: a file, or the name of an image of the searched gallery")
    parser.add_argument("--caption", required=True, help='what to change, e.g. "is red and has stripes"')
    parser.add_argument("--benchmark", choices=["fashioniq", "cirr", "circo"], default="fashioniq",
                        help="whose gallery to search (default: fashioniq)")
    parser.add_argument("--category", choices=FASHIONIQ_CATEGORIES, default="dress",
                        help="FashionIQ category whose gallery is searched (default: dress)")
    parser.add_argument("--split", choices=["train", "val", "test"], default="val", help="default: val")
    parser.add_argument("--method", choices=list(METHODS), default="zero-shot-sum",
                        help="retrieval method; trained ones need their notebook's artifacts (default: zero-shot-sum)")
    parser.add_argument("--k", type=int, default=10, help="how many results (default: 10)")
    parser.add_argument("--contact-sheet", type=Path, metavar="PNG", help="also save the results as a contact sheet")
    parser.add_argument("--quick", action="store_true", help="use the quick runs' benchmarks and artifacts")
    parser.add_argument("--backbone", default=TINY_MODEL, help="open_clip model name (default: the course's tiny CLIP)")
    parser.add_argument("--pretrained", help="open_clip tag or checkpoint file of --backbone")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    for name in ("fashioniq", "cirr", "circo"):
        parser.add_argument(f"--{name}-root", type=Path, help=f"a real {name} root instead of the embedded benchmark")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one search and print its results; a bad input exits with a message saying what to fix."""
    args = build_parser().parse_args(argv)
    caption = args.caption.strip()
    if not caption:
        _fail("--caption is empty: say what should change in the reference (e.g. 'is red and has stripes')")
    if args.k < 1:
        _fail(f"--k must be at least 1, got {args.k}")
    if args.contact_sheet is not None and args.contact_sheet.suffix.lower() != ".png":
        _fail(f"--contact-sheet {args.contact_sheet}: contact sheets are PNG files; give a name ending in .png")
    try:
        retriever = _retriever(args)
        reference = retriever.reference(args.reference)  # a file, or the name of a gallery image
        hits = retriever.search(reference, caption, args.k)
    except (ValueError, OSError) as err:  # the library's messages name the file, field or option at fault
        _fail(str(err))
    print(format_results(retriever, reference, caption, hits))
    if args.contact_sheet is not None:
        fig = contact_sheet(reference, caption, hits, title=_title(retriever))
        path = save_figure(fig, args.contact_sheet.stem, args.contact_sheet.parent)
        plt.close(fig)
        print(f"\ncontact sheet: {path}")


def _fail(message: str) -> NoReturn:
    raise SystemExit(f"{PROG}: error: {message}")


def _retriever(args: argparse.Namespace) -> Retriever:
    """The course the options describe, and its retriever for the method and gallery asked for."""
    from cirlib.course import setup_course

    course = setup_course(quick=args.quick, backbone=args.backbone, pretrained=args.pretrained, device=args.device,
                          fashioniq_root=args.fashioniq_root, cirr_root=args.cirr_root, circo_root=args.circo_root)
    split = f"fashioniq/{args.category}" if args.benchmark == "fashioniq" else args.benchmark
    return Retriever.for_method(course, args.benchmark, split, args.method, kind=args.split)


def _title(retriever: Retriever) -> str:
    split = retriever.split
    return f"{retriever.method} on {split.dataset}/{split.split} ({len(retriever.gallery_names):,} images)"


def format_results(retriever: Retriever, reference: Reference, caption: str, hits: Sequence[Hit]) -> str:
    """The printed report: what was searched, then one row per result (rank, score, name, file)."""
    dataset = retriever.split.dataset
    note = ""
    if reference.index is not None:
        kept = not PROTOCOLS[dataset].exclude_reference
        note = f" (an image of the gallery, {'kept in' if kept else 'left out of'} the results as {dataset} ranks)"
    width = max([len("image"), *(len(h.name) for h in hits)])
    lines = [
        _title(retriever),
        f"reference: {reference.path if reference.path is not None else reference.name}{note}",
        f'caption:   "{caption}"',
        "",
        f"{'rank':>4}  {'score':>7}  {'image':<{width}}  file",
        *(f"{rank:>4}  {hit.score:>7.4f}  {hit.name:<{width}}  {hit.path}" for rank, hit in enumerate(hits, 1)),
    ]
    return "\n".join(lines)


def contact_sheet(reference: Reference, caption: str, hits: Sequence[Hit], title: str = "") -> matplotlib.figure.Figure:
    """Reference | caption | results (rank and score under each), :data:`SHEET_COLUMNS` results per row."""
    columns = max(1, min(len(hits), SHEET_COLUMNS))
    rows = max(1, math.ceil(len(hits) / columns))
    fig, axes = plt.subplots(rows, 2 + columns, figsize=(1.7 * (2 + columns) + 0.8, 2.0 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.5] + [1] * columns})
    image_axis(axes[0][0], reference.open(), f"reference\n{reference.name}")
    caption_axis(axes[0][1], caption, width=22)
    for ax in axes[1:, :2].flat:
        ax.axis("off")
    for slot, ax in enumerate(axes[:, 2:].flat):
        if slot >= len(hits):
            ax.axis("off")
            continue
        hit = hits[slot]
        image_axis(ax, open_image(hit.path), f"{slot + 1}. {hit.score:.3f}\n{hit.name}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
