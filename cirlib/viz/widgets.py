"""Interactive widgets (ipywidgets): the retrieval explorer and multi-turn search of notebook 09.

Both are thin views over :mod:`cirlib.search`: every ranking they show comes from a
:class:`~cirlib.search.engine.Retriever` (the explorer's is the protocol's ranking of a benchmark
query), every turn of the multi-turn search from a :class:`~cirlib.search.session.Session`. Their
callbacks are plain methods (``explorer.show(12)``, ``search.ask("is red")``, ``search.choose(0)``),
so tests drive them by setting widget values and clicking buttons without a browser, and a notebook
cell only builds and displays one.

:func:`history_figure` draws a session's turns with matplotlib, for saving under ``figures/``.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ipywidgets as w
import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from cirlib.data.datasets import CIRSplit, ImageLoadError, open_image, query_text
from cirlib.search.engine import Hit, Reference, ReferenceLike, Retriever, available_methods
from cirlib.search.session import Session
from cirlib.viz.plots import GREEN, TARGET_VIOLET, caption_axis, image_axis, save_figure

if TYPE_CHECKING:
    from cirlib.course import Course

CHOSEN_BLUE = "#1f77b4"
"""Frame of a result the user chose as the next reference (green is kept for ground truths)."""

THUMB_HEIGHT = 112  # pixels; the embedded benchmarks' images are 64-256 px, CIRCO's COCO photos larger


@lru_cache(maxsize=4096)
def _thumbnail_file(path: str, height: int) -> bytes:
    return thumbnail_png(open_image(path), height)


def thumbnail_png(image: Image.Image | Path | str, height: int = THUMB_HEIGHT) -> bytes:
    """PNG bytes of ``image`` scaled to ``height`` pixels (aspect kept); files are cached by path."""
    if not isinstance(image, Image.Image):
        return _thumbnail_file(str(image), height)
    scaled = image.convert("RGB")
    scaled = scaled.resize((max(1, round(scaled.width * height / scaled.height)), height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    scaled.save(buffer, format="png")
    return buffer.getvalue()


def _img_tag(image: Image.Image | Path, label: str, frame: str | None = None, height: int = THUMB_HEIGHT) -> str:
    """An inline thumbnail with a caption under it, framed in ``frame`` (or a thin grey line)."""
    data = base64.b64encode(thumbnail_png(image, height)).decode()
    border = f"4px solid {frame}" if frame else "1px solid #ccc"
    return (f'<figure style="margin:2px;display:inline-block;text-align:center">'
            f'<img src="data:image/png;base64,{data}" style="height:{height}px;border:{border}"/>'
            f'<figcaption style="font-size:11px">{html.escape(label)}</figcaption></figure>')


def _reference_image(reference: Reference) -> Image.Image | Path:
    return reference.path if reference.image is None else reference.image


# --------------------------------------------------------------------------------------------
# Retrieval explorer
# --------------------------------------------------------------------------------------------


class RetrievalExplorer:
    """Browse a method's results on the benchmark queries: reference, caption, top ``k`` with scores,
    ground truths framed green, the target's rank; jump to a random query or a random failure
    (target outside the top ``k``), or list failures only. CIRCO queries also show every ground
    truth, the shared concept and the semantic aspects.

    Only the methods whose artifacts exist for the chosen split's benchmark are offered
    (:func:`~cirlib.search.engine.available_methods`). Display it with ``display(explorer.widget)``
    (or leave it last in a cell).
    """

    def __init__(self, course: "Course", kind: str = "val", k: int = 10, splits: Sequence[str] | None = None,
                 seed: int = 0) -> None:
        self.course, self.kind = course, kind
        self.rng = np.random.default_rng(seed)
        self._retrievers: dict[tuple[str, str], Retriever] = {}
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._quiet = False
        names = list(splits) if splits is not None else list(course.splits(kind))
        self.split = w.Dropdown(options=names, value=names[0], description="split")
        self.method = w.Dropdown(description="method", layout=w.Layout(width="420px"))
        self.query = w.Dropdown(description="query", layout=w.Layout(width="520px"))
        self.k = w.IntSlider(value=k, min=1, max=50, description="top k", continuous_update=False)
        self.failures_only = w.Checkbox(value=False, description="failures only (target not in the top k)",
                                        indent=False)
        self.random_button = w.Button(description="random query", icon="random", layout=w.Layout(width="auto"))
        self.failure_button = w.Button(description="random failure", icon="times", layout=w.Layout(width="auto"))
        self.status = w.HTML()
        self.view = w.HTML()
        self.widget = w.VBox([
            w.HBox([self.split, self.method]),
            w.HBox([self.query, self.k]),
            w.HBox([self.random_button, self.failure_button, self.failures_only]),
            self.status, self.view,
        ])
        self.widget.add_class("cirlib-explorer")
        self.random_button.on_click(self.on_random)
        self.failure_button.on_click(self.on_random_failure)
        self.split.observe(self._split_changed, names="value")
        self.method.observe(self._refresh_queries, names="value")
        self.failures_only.observe(self._refresh_queries, names="value")
        self.k.observe(self._refresh_queries, names="value")
        self.query.observe(self._query_changed, names="value")
        self._split_changed()

    def _repr_mimebundle_(self, **kwargs):  # a cell ending in the explorer shows its widget
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def data(self) -> CIRSplit:
        return self.course.splits(self.kind)[self.split.value]

    @property
    def retriever(self) -> Retriever:
        """The selected method's retriever on the selected split (built once)."""
        key = (self.split.value, self.method.value)
        if key not in self._retrievers:
            self._retrievers[key] = Retriever.for_method(self.course, self.data.dataset, self.data, self.method.value)
        return self._retrievers[key]

    def target_ranks(self) -> torch.Tensor:
        """Every query's target rank under the selected method (computed once per split and method)."""
        key = (self.split.value, self.method.value)
        if key not in self._ranks:
            self._ranks[key] = self.retriever.target_ranks()
        return self._ranks[key]

    def failures(self) -> list[int]:
        """Queries whose target is not in the top ``k`` (or cannot be ranked)."""
        ranks = self.target_ranks()
        return [i for i, r in enumerate(ranks.tolist()) if r == 0 or r > self.k.value]

    def _split_changed(self, _change=None) -> None:
        methods = available_methods(self.course, self.data.dataset)
        options = [(label, key) for key, label in methods.items()]
        if self.method.value in methods:  # keep the method, refresh the queries
            self.method.options = options
            self._refresh_queries()
        else:  # setting a new value refreshes the queries through the observer
            self.method.options = options
            self.method.value = options[0][1]

    def _refresh_queries(self, _change=None) -> None:
        if self.method.value is None:
            return
        queries = self.data.queries
        indices = self.failures() if self.failures_only.value else range(len(queries))
        options = [(f"{i}: {query_text(queries[i])[:70]}", i) for i in indices]
        previous = self.query.value
        self._quiet = True  # new options reset the value: show the query once, below
        try:
            self.query.options = options
            values = [v for _, v in options]
            self.query.value = previous if previous in values else (values[0] if values else None)
        finally:
            self._quiet = False
        self.show(self.query.value)

    def _query_changed(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self.show(change["new"])

    def on_random(self, _button=None) -> int:
        """Show a random query (among the failures when only failures are listed)."""
        pool = [v for _, v in self.query.options]
        return self._pick(pool)

    def on_random_failure(self, _button=None) -> int | None:
        """Show a random query whose target the method missed."""
        return self._pick(self.failures())

    def _pick(self, pool: Sequence[int]) -> int | None:
        if not pool:
            self.status.value = "<i>No such query: the method finds every target in its top k here.</i>"
            return None
        index = int(pool[int(self.rng.integers(len(pool)))])
        if index not in {v for _, v in self.query.options}:
            self.failures_only.value = False
        if self.query.value == index:
            self.show(index)
        else:
            self.query.value = index  # the observer shows it
        return index

    def show(self, index: int | None) -> None:
        """Render query ``index``: its protocol ranking under the selected method."""
        if index is None:
            self.view.value = "<i>No query to show.</i>"
            return
        split, retriever, k = self.data, self.retriever, self.k.value
        query = split.queries[index]
        hits = retriever.search_query(index, k)
        truths = set(query.ground_truths) | ({query.target} if query.target else set())
        rank = int(retriever.target_ranks([index])[0]) if query.target is not None else 0
        found = "—" if query.target is None else (f"{rank}" if rank else "not in the gallery")
        verdict = "" if not rank else (" ✓ in the top k" if rank <= k else " ✗ outside the top k")
        label = dict((key, text) for text, key in self.method.options).get(retriever.method, retriever.method)
        self.status.value = (f"<b>{html.escape(label)}</b> on {self.split.value} ({split.split}), query "
                             f"{index}: target rank <b class='cirlib-target-rank'>{found}</b>{verdict}")
        caption = html.escape(query_text(query))
        parts = [_img_tag(split.image_paths[query.reference], "reference"),
                 f'<div style="display:inline-block;max-width:220px;vertical-align:top;margin:8px">'
                 f'<b>“{caption}”</b></div>']
        parts += [_img_tag(h.path, f"#{r} · {h.score:.3f}", GREEN if h.name in truths else None)
                  for r, h in enumerate(hits, 1)]
        body = f'<div style="display:flex;flex-wrap:wrap;align-items:flex-start">{"".join(parts)}</div>'
        if split.dataset == "circo":
            body += self._circo_details(split, query)
        self.view.value = body

    @staticmethod
    def _circo_details(split: CIRSplit, query) -> str:
        aspects = ", ".join(a.replace("_", " ") for a in query.semantic_aspects) or "none annotated"
        shown = [g for g in query.ground_truths if g in split.image_paths]
        thumbs = "".join(_img_tag(split.image_paths[g], g, GREEN, height=72) for g in shown)
        return (f"<p>Shared concept: <b>{html.escape(query.shared_concept or '?')}</b> · semantic aspects: "
                f"<b>{html.escape(aspects)}</b> · all {len(query.ground_truths)} ground truths"
                f"{'' if len(shown) == len(query.ground_truths) else f' ({len(shown)} on disk)'}:</p>"
                f'<div style="display:flex;flex-wrap:wrap">{thumbs}</div>')


# --------------------------------------------------------------------------------------------
# Multi-turn search
# --------------------------------------------------------------------------------------------


class MultiTurnSearch:
    """The CBIR demo's loop in a notebook: start from a gallery image or an upload, say what to
    change, then either accept a result ("Is this what you were looking for?") or click one to make
    it the next reference. The turns are listed under the results and :meth:`save_history` saves
    them as a figure.

    Callbacks: :meth:`start`, :meth:`ask`, :meth:`choose`, :meth:`accept`, :meth:`save_history`;
    the buttons, the caption box (Enter) and the upload call them.
    """

    def __init__(self, retriever: Retriever, k: int = 6, start: ReferenceLike | None = 0,
                 figdir: Path | None = None, name: str = "09_multiturn_widget_history", seed: int = 0) -> None:
        self.retriever, self.k, self.figdir, self.name = retriever, k, figdir, name
        self.rng = np.random.default_rng(seed)
        self.session: Session | None = None
        self._uploads: tempfile.TemporaryDirectory | None = None  # made on the first upload: a kernel that is
        # killed runs no cleanup, and most sessions never upload
        n = len(retriever.gallery_names)
        self.start_index = w.BoundedIntText(value=0, min=0, max=n - 1, description="gallery #",
                                            layout=w.Layout(width="180px"))
        self.start_button = w.Button(description="start from it", icon="play")
        self.random_start = w.Button(description="random image", icon="random")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload",
                                   layout=w.Layout(width="auto"))
        self.reference_image = w.Image(format="png", layout=w.Layout(height=f"{THUMB_HEIGHT + 40}px"))
        self.reference_label = w.HTML()
        self.reference_label.add_class("cirlib-reference-name")
        self.reference_image.add_class("cirlib-reference-image")
        self.caption = w.Text(placeholder="e.g. is red and has stripes", continuous_update=False,
                              layout=w.Layout(width="420px"))
        self.caption.add_class("cirlib-caption")
        self.search_button = w.Button(description="search", icon="search", button_style="primary")
        self.search_button.add_class("cirlib-search")
        self.message = w.HTML()
        self.prompt = w.HTML()
        self.cards = [self._card(i) for i in range(k)]
        self.results = w.HBox([c for c, _, _ in self.cards], layout=w.Layout(flex_flow="row wrap"))
        self.history = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.save_button = w.Button(description="save history figure", icon="save", layout=w.Layout(width="210px"))
        self.widget = w.VBox([
            w.HBox([self.start_index, self.start_button, self.random_start, self.upload]),
            w.HBox([w.VBox([w.HTML("<b>Reference</b>"), self.reference_image, self.reference_label]),
                    w.VBox([w.HTML("<b>What do you want to change?</b>"), w.HBox([self.caption, self.search_button]),
                            self.message])]),
            self.prompt, self.results,
            w.HTML("<b>History</b>"), self.history, self.save_button,
        ])
        self.widget.add_class("cirlib-multiturn")
        self.start_button.on_click(lambda _b: self.start(self.start_index.value))
        self.random_start.on_click(self.on_random_start)
        self.upload.observe(self.on_upload, names="value")
        self.search_button.on_click(lambda _b: self.ask(self.caption.value))
        self.caption.observe(self._caption_submitted, names="value")
        self.save_button.on_click(lambda _b: self.save_history())
        if start is not None:
            self.start(start)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _card(self, position: int) -> tuple[w.VBox, w.Image, w.HTML]:
        image = w.Image(format="png", layout=w.Layout(height=f"{THUMB_HEIGHT}px"))
        label = w.HTML()
        label.add_class("cirlib-result-label")
        change = w.Button(description="change this", tooltip="make it the next reference and say what to change",
                          layout=w.Layout(width="126px"))
        accept = w.Button(description="this one", icon="check", button_style="success",
                          tooltip="yes, this is what I was looking for", layout=w.Layout(width="126px"))
        change.add_class("cirlib-choose")
        accept.add_class("cirlib-accept")
        change.on_click(lambda _b: self.choose(position))
        accept.on_click(lambda _b: self.accept(position))
        card = w.VBox([image, label, change, accept], layout=w.Layout(display="none", margin="4px",
                                                                        align_items="center"))
        card.add_class("cirlib-result")
        return card, image, label

    # ------------------------------------------------------------------------ callbacks
    def start(self, reference: ReferenceLike) -> Reference:
        """Begin a new session from a gallery index / name, an image file or a PIL image."""
        try:
            self.session = Session(self.retriever, reference, self.k)
        except (ImageLoadError, IndexError, TypeError) as err:
            self._error(str(err))
            raise
        self.message.value = ""
        self._render()
        return self.session.reference

    def on_random_start(self, _button=None) -> Reference:
        """Start from a random gallery image."""
        return self.start(int(self.rng.integers(len(self.retriever.gallery_names))))

    def on_upload(self, change) -> Reference | None:
        """Start from the uploaded image (``FileUpload`` value: name and content of each file)."""
        files = change["new"] if isinstance(change, dict) else change
        if not files:
            return None
        upload = files[-1]
        if self._uploads is None:
            self._uploads = tempfile.TemporaryDirectory(prefix="cirlib-uploads-")
        path = Path(self._uploads.name) / Path(upload["name"]).name
        path.write_bytes(bytes(upload["content"]))
        try:
            return self.start(path)
        except (ImageLoadError, IndexError, TypeError):
            return None

    def _caption_submitted(self, change) -> None:
        if change["new"].strip():  # Enter in the caption box; an emptied box waits for the button
            self.ask(change["new"])

    def ask(self, caption: str) -> None:
        """Run a turn from the current reference; an empty caption or a finished session says why not."""
        if self.session is None:
            self._error("Start from a gallery image or upload one first.")
            return
        try:
            self.session.ask(caption)
        except (ValueError, RuntimeError) as err:
            self._error(str(err))
            return
        self.message.value = ""
        self._render()

    def choose(self, position: int) -> Reference:
        """Make the result at ``position`` the next reference ("What do you want to change?")."""
        reference = self.session.choose(position)
        with self.caption.hold_trait_notifications():
            self.caption.unobserve(self._caption_submitted, names="value")
            self.caption.value = ""
            self.caption.observe(self._caption_submitted, names="value")
        self._render()
        return reference

    def accept(self, position: int) -> Hit:
        """Accept the result at ``position``: the search is over."""
        hit = self.session.accept(position)
        self._render()
        return hit

    def save_history(self, path: Path | None = None) -> Path:
        """Save the session's turns as a figure (``<figdir>/<name>.png`` by default)."""
        fig = history_figure(self.session)
        try:
            if path is None:
                if self.figdir is None:
                    raise ValueError("no figdir given: pass a path")
                path = save_figure(fig, self.name, self.figdir)
            else:
                fig.savefig(path, dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
        self.message.value = f"Saved the history to <code>{html.escape(str(path))}</code>."
        return Path(path)

    # ------------------------------------------------------------------------ rendering
    def _error(self, text: str) -> None:
        self.message.value = f'<span style="color:#d62728">{html.escape(text)}</span>'

    def _render(self) -> None:
        session = self.session
        ref = session.reference
        self.reference_image.value = thumbnail_png(_reference_image(ref), THUMB_HEIGHT + 40)
        self.reference_label.value = f"<span title='reference'>{html.escape(ref.name)}</span>"
        turn = session.turns[-1] if session.turns else None
        pending = turn is not None and turn.chosen is None
        for position, (card, image, label) in enumerate(self.cards):
            hit = turn.hits[position] if pending and position < len(turn.hits) else None
            if hit is not None:  # contents first, so a browser never shows a card with the last turn's
                image.value = thumbnail_png(hit.path)
                label.value = f"<small>#{position + 1} · {hit.score:.3f}<br>{html.escape(hit.name)}</small>"
            card.layout.display = "flex" if hit is not None else "none"
        if session.done:
            self.prompt.value = (f"<b style='color:{GREEN}'>Found: {html.escape(session.accepted.name)}</b> after "
                                 f"{len(session.turns)} turn(s). Start again from any image.")
        elif pending:
            self.prompt.value = ("<b>Is this what you were looking for?</b> Accept a result, or pick the closest "
                                 "one and say what to change.")
        else:
            self.prompt.value = ""
        self.history.children = [self._history_card(i, t) for i, t in enumerate(session.turns)]

    @staticmethod
    def _history_card(number: int, turn) -> w.HTML:
        outcome = ("accepted " if turn.accepted else "→ ") + html.escape(turn.chosen.name) if turn.chosen else "…"
        tag = _img_tag(_reference_image(turn.reference), f"turn {number + 1}", height=56)
        card = w.HTML(f'<div style="display:inline-block;margin:4px;max-width:180px;font-size:11px">{tag}<br>'
                      f'“{html.escape(turn.caption)}”<br>{outcome}</div>')
        card.add_class("cirlib-history-turn")
        return card


# --------------------------------------------------------------------------------------------
# A session as a figure
# --------------------------------------------------------------------------------------------


def history_figure(session: Session, target: int | None = None, k: int | None = None,
                   title: str | None = None) -> matplotlib.figure.Figure:
    """One row per turn: reference | caption | top ``k`` results. The result chosen as the next
    reference is framed blue, the accepted one green, and ``target`` (a gallery index), if given
    and shown, violet."""
    if session is None or not session.turns:
        raise ValueError("the session has no turns yet: ask what to change first")
    k = k or session.k
    fig, axes = plt.subplots(len(session.turns), k + 2, figsize=(1.6 * (k + 2) + 0.8, 2.0 * len(session.turns)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.5] + [1] * k})
    for number, (row, turn) in enumerate(zip(axes, session.turns), 1):
        image_axis(row[0], _open(_reference_image(turn.reference)), f"turn {number}: reference")
        caption_axis(row[1], turn.caption, width=22)
        for rank, ax in enumerate(row[2:], 1):
            if rank > len(turn.hits):
                ax.axis("off")
                continue
            hit = turn.hits[rank - 1]
            label, frame = f"#{rank} · {hit.score:.2f}", None
            if turn.chosen == hit:
                label, frame = (f"#{rank} accepted", GREEN) if turn.accepted else (f"#{rank} chosen", CHOSEN_BLUE)
            elif target is not None and hit.index == target:
                label, frame = f"#{rank} target", TARGET_VIOLET
            image_axis(ax, open_image(hit.path), label)
            if frame:
                for spine in ax.spines.values():
                    spine.set_edgecolor(frame)
                    spine.set_linewidth(4)
    fig.suptitle(title or f"Multi-turn search ({session.retriever.method}): blue = next reference, "
                          "green = accepted", fontsize=11)
    fig.tight_layout()
    return fig


def _open(image: Image.Image | Path) -> Image.Image:
    return image if isinstance(image, Image.Image) else open_image(image)


__all__ = ["MultiTurnSearch", "RetrievalExplorer", "history_figure", "thumbnail_png"]
