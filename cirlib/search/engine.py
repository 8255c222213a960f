"""The one retrieval path of every interactive tool: (reference image, caption) -> ranked gallery.

The explorer and multi-turn widgets (:mod:`cirlib.viz.widgets`), notebook 09's scripted session,
the command line and the submission files all search through a :class:`Retriever`, so a result a
user clicks in a widget is the result the evaluation protocols score for the same method. Nothing
is re-implemented here: gallery features come from the shared feature cache
(:func:`~cirlib.models.features.image_features`, computed once by the notebooks), query features
from each method's own function (:func:`~cirlib.models.combiner.combine_sum`, a trained
:class:`~cirlib.models.combiner.Combiner`, iSEARLE's :func:`~cirlib.methods.isearle.compose_features`,
the re-ranking pipeline of :mod:`cirlib.methods.reranking`), and the order from
:func:`~cirlib.evaluation.protocols.topk` and :func:`~cirlib.evaluation.metrics.rank_of`.

A method is offered only when the notebooks have left its artifacts on disk
(:func:`available_methods`): Sum on the course backbone always, the rest once notebooks 04, 05, 07
or 08 have trained them.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cirlib.core import artifacts
from cirlib.core.training import load_kept
from cirlib.data.datasets import CIRSplit, Query, open_image, query_text
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind, transform_for
from cirlib.evaluation.metrics import indices_of, name_index, rank_of
from cirlib.evaluation.protocols import PROTOCOLS, similarity_chunks, topk
from cirlib.methods.isearle import PROMPT_TEMPLATE, compose_features, phi_tokens
from cirlib.methods.reranking import PAPER_K, ImageBank, QuerySet, filter_stage, ranking_features, rerank
from cirlib.models.combiner import CombineFn, apply_combine, combine_sum, load_combiner
from cirlib.models.features import (
    PATCH_TOKEN_DTYPE,
    SplitFeatures,
    encode_in_batches,
    encode_patch_tokens,
    encode_split,
    image_features,
    patch_tokens,
    text_features,
)
from cirlib.models.multimodal import CandidateFilter, DualEncoderReranker, text_tower
from cirlib.models.phi import Phi

if TYPE_CHECKING:
    from cirlib.course import Course
    from cirlib.models.backbone import Backbone

METHODS: dict[str, str] = {
    "zero-shot-sum": "Zero-shot Sum (pretrained CLIP, image + text)",
    "finetuned-sum": "Fine-tuned Sum (stage 1, both encoders)",
    "combiner": "Combiner (on stage-1 features)",
    "isearle": "iSEARLE (zero-shot, textual inversion)",
    "reranking": "Re-ranking (candidate filter + re-ranker)",
}
"""Every method the course trains, by key, with the label a menu shows."""

TRAINED_ON = ("fashioniq", "cirr")
"""Benchmarks with training triplets; CIRCO is zero-shot only."""

PHI_PRETRAINING = "fashioniq+cirr"
"""The image set notebook 07 pre-trains phi on (its :func:`~cirlib.core.artifacts.phi_checkpoint` name)."""

FINETUNED = "both"
"""The stage-1 variant the fine-tuned methods use: notebook 04's best, both encoders tuned."""


@dataclass(frozen=True)
class Hit:
    """One retrieved gallery image: its index in the gallery, name, file and score (higher = better)."""

    index: int
    name: str
    path: Path
    score: float


@dataclass(frozen=True)
class Reference:
    """A reference as the retriever resolved it: a gallery image (``index``) or an outside image."""

    name: str
    image: Image.Image | None = None  # an outside image; gallery images are read from ``path``
    path: Path | None = None
    index: int | None = None  # row in the gallery, None for an outside image

    def open(self) -> Image.Image:
        """The image itself, for display."""
        return self.image if self.image is not None else open_image(self.path)


ReferenceLike = int | str | os.PathLike | Image.Image | Reference
"""A reference image: a gallery index, an image file, a decoded image (an upload), or one already resolved."""


@dataclass(frozen=True)
class _Batch:
    """Queries ready to rank: reference features ``[N, D]`` (and patch tokens for re-ranking), the
    queries' captions, each reference's gallery row (``-1`` outside) and, for benchmark queries,
    the protocol's text features."""

    queries: list[Query]
    reference: Tensor
    reference_rows: Tensor
    reference_tokens: Tensor | None = None
    texts: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Scorers: how each method turns a batch of queries into scores over the gallery
# --------------------------------------------------------------------------------------------


class Scorer(ABC):
    """A method's scoring of a query batch against the gallery: ``(order [N, G], shown [N, G])``.

    ``order`` ranks (exactly as the method's protocol evaluation does), ``shown`` is the score a
    user sees (they differ only for re-ranking, whose order puts the re-ranked candidates first).
    """

    needs_tokens: bool = False

    @abstractmethod
    def scores(self, retriever: "Retriever", batch: _Batch) -> tuple[Tensor, Tensor]: ...


def _cosines(query: Tensor, gallery: Tensor) -> Tensor:
    """``[N, G]`` cosine similarities, as the protocols compute them (:func:`similarity_chunks`)."""
    q, g = F.normalize(query.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    parts = [scores for _, scores in similarity_chunks(q, g.to(q.device))]
    return torch.cat(parts).cpu() if parts else q.new_zeros(0, len(g))


@dataclass(frozen=True)
class CombineScorer(Scorer):
    """Reference and caption features combined by ``combine`` (the Sum or a Combiner)."""

    combine: CombineFn

    def scores(self, retriever: "Retriever", batch: _Batch) -> tuple[Tensor, Tensor]:
        texts = batch.texts
        if texts is None:
            texts = text_features(retriever.backbone, [query_text(q) for q in batch.queries], progress=False)
        cos = _cosines(apply_combine(self.combine, batch.reference, texts), retriever.gallery_features)
        return cos, cos


@dataclass(frozen=True)
class PhiScorer(Scorer):
    """iSEARLE: phi's pseudo-word of the reference in "a photo of $ that {caption}"."""

    phi: Phi
    template: str = PROMPT_TEMPLATE

    def scores(self, retriever: "Retriever", batch: _Batch) -> tuple[Tensor, Tensor]:
        tokens = phi_tokens(self.phi, batch.reference)
        query = compose_features(retriever.backbone, batch.queries, tokens, self.template)
        cos = _cosines(query, retriever.gallery_features)
        return cos, cos


@dataclass(frozen=True)
class RerankScorer(Scorer):
    """The candidate filter's top ``k``, re-ordered by the dual-encoder re-ranker (notebook 08)."""

    filt: CandidateFilter
    reranker: DualEncoderReranker
    k: int

    needs_tokens = True

    def scores(self, retriever: "Retriever", batch: _Batch) -> tuple[Tensor, Tensor]:
        gallery = retriever.gallery_bank
        rows = batch.reference_rows.clone()
        outside = (rows < 0).nonzero().flatten()
        images = gallery
        if len(outside):
            images = gallery + ImageBank(batch.reference[outside], batch.reference_tokens[outside])
            rows[outside] = len(gallery) + torch.arange(len(outside))
        split = dataclasses.replace(retriever.split, queries=list(batch.queries))
        tokens = retriever.backbone.tokenize([query_text(q) for q in batch.queries])
        queries = QuerySet(split, images, rows, tokens)
        first = filter_stage(self.filt, queries)
        candidates = first.candidates(min(self.k, queries.max_candidates), queries.exclude)
        logits = rerank(self.reranker, self.filt, queries, candidates, progress=False)
        order, _ = ranking_features(first, candidates, logits)
        return order, first.scores().cpu().scatter(1, candidates, logits)


# --------------------------------------------------------------------------------------------
# The retriever
# --------------------------------------------------------------------------------------------


@contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """One CPU thread for one query's scoring: its operations are far too small to split, and
    on a busy CPU extra threads only wait for each other (measured on this project's 2-core CPU
    under load: a Combiner turn took a median 585 ms on two threads, 7 ms on one;
    ``tests/perf/perf_explore.py``)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Retriever:
    """Search one split's gallery with one method; benchmark queries rank as their protocol ranks them.

    Build it with :meth:`for_method` (the course's trained artifacts) or directly from a backbone
    and a :class:`Scorer`. Gallery features are read from the feature cache under ``cache_dir``.
    """

    def __init__(
        self,
        split: CIRSplit,
        backbone: "Backbone",
        scorer: Scorer,
        method: str = "zero-shot-sum",
        cache_dir: Path | str | None = None,
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
    ) -> None:
        if not split.gallery:
            raise ValueError(f"{split!r} has an empty gallery: nothing to search")
        self.split, self.backbone, self.scorer, self.method = split, backbone, scorer, method
        self.cache_dir, self.transform_kind, self.target_ratio = cache_dir, transform_kind, target_ratio
        self.gallery_names: list[str] = list(split.gallery)
        self.gallery_paths: list[Path] = [split.image_paths[n] for n in split.gallery]
        self._index = name_index(self.gallery_names)
        self._path_index = {p.resolve(): i for i, p in enumerate(self.gallery_paths)}
        self.gallery_features = image_features(backbone, self.gallery_paths, transform_kind, target_ratio,
                                               cache_dir=cache_dir, progress=False)

    def __repr__(self) -> str:
        return f"Retriever({self.method} on {self.split.dataset}/{self.split.split}, {len(self.gallery_names)} images)"

    @classmethod
    def for_method(
        cls, course: "Course", benchmark: str, split: str | CIRSplit, method: str, kind: str = "val"
    ) -> "Retriever":
        """The retriever of ``method`` (a key of :func:`available_methods`) trained on ``benchmark``.

        ``split`` is a key of ``course.splits(kind)`` (``"fashioniq/dress"``, ``"cirr"``,
        ``"circo"``) or a loaded split of that benchmark; its gallery is what is searched.
        """
        if isinstance(split, str):
            splits = course.splits(kind)
            if split not in splits:
                raise ValueError(f"unknown split {split!r}; {kind} splits are {sorted(splits)}")
            split = splits[split]
        if split.dataset != benchmark:
            raise ValueError(f"split {split.dataset}/{split.split} is not a {benchmark} split")
        offered = available_methods(course, benchmark)
        if method not in offered:
            missing = "unknown method" if method not in METHODS else "its trained artifacts are not on disk"
            raise ValueError(f"method {method!r} is not available for {benchmark} ({missing}); "
                             f"available: {sorted(offered)}")
        quick = course.quick
        if method in ("finetuned-sum", "combiner"):
            backbone = course.stage1_backbone(benchmark, FINETUNED)
        else:
            backbone = course.backbone()
        device = backbone.device
        if method == "combiner":
            scorer: Scorer = CombineScorer(load_combiner(artifacts.combiner_checkpoint(quick, benchmark, FINETUNED),
                                                         device))
        elif method == "isearle":
            scorer = PhiScorer(load_kept(artifacts.phi_checkpoint(quick, PHI_PRETRAINING), "phi", Phi, device))
        elif method == "reranking":
            filt = load_kept(artifacts.filter_checkpoint(quick, benchmark), "filter",
                             partial(CandidateFilter, text_tower(backbone)), device)
            reranker = load_kept(artifacts.reranker_checkpoint(quick, benchmark), "reranker",
                                 partial(DualEncoderReranker, text_tower(backbone)), device)
            scorer = RerankScorer(filt, reranker, PAPER_K[benchmark])
        else:
            scorer = CombineScorer(combine_sum)
        return cls(split, backbone, scorer, method, course.cache)

    # ------------------------------------------------------------------------ references
    def reference(self, reference: ReferenceLike) -> Reference:
        """Resolve a gallery index or image name, a file or a decoded image; a gallery file becomes its index."""
        if isinstance(reference, Reference):
            return reference
        if isinstance(reference, bool) or not isinstance(reference, int | str | os.PathLike | Image.Image):
            raise TypeError(f"a reference is a gallery index, an image path or a PIL image, "
                            f"not {type(reference).__name__}")
        if isinstance(reference, int):
            if not 0 <= reference < len(self.gallery_names):
                raise IndexError(f"gallery index {reference} out of range [0, {len(self.gallery_names)})")
            return Reference(self.gallery_names[reference], path=self.gallery_paths[reference], index=reference)
        if isinstance(reference, Image.Image):
            return Reference("uploaded image", image=reference.convert("RGB"))
        if isinstance(reference, str) and reference in self._index:  # a gallery image's name
            return self.reference(self._index[reference])
        path = self.split.image_paths.get(reference, Path(reference)) if isinstance(reference, str) else Path(reference)
        index = self._path_index.get(path.resolve()) if path.exists() else None
        if index is not None:
            return self.reference(index)
        return Reference(path.stem, image=open_image(path), path=path)  # open_image names a missing file

    def encode_image(self, image: ReferenceLike) -> Tensor:
        """The image's features ``[D]`` (unnormalised): the cached gallery row for a gallery image."""
        return self._encode([self.reference(image)])[0][0]

    def _encode(self, references: Sequence[Reference]) -> tuple[Tensor, Tensor | None]:
        """Features ``[N, D]`` (and, for re-ranking, patch tokens) of resolved references."""
        rows = [r.index for r in references]
        feats = torch.zeros(len(references), self.gallery_features.shape[1])
        tokens = None
        inside = [i for i, row in enumerate(rows) if row is not None]
        if inside:
            feats[inside] = self.gallery_features[[rows[i] for i in inside]]
        if self.scorer.needs_tokens:
            tokens = torch.zeros(len(references), *self.gallery_bank.tokens.shape[1:], dtype=PATCH_TOKEN_DTYPE)
            if inside:
                tokens[inside] = self.gallery_bank.tokens[[rows[i] for i in inside]]
        outside = [i for i, row in enumerate(rows) if row is None]
        if outside:
            transform = transform_for(self.backbone, self.transform_kind, self.target_ratio)
            pixels = torch.stack([transform(references[i].open()) for i in outside])
            encode = partial(encode_in_batches, batches=[pixels], device=self.backbone.device,
                             module=self.backbone.model, progress=False)
            feats[outside] = encode(self.backbone.encode_image)
            if tokens is not None:
                tokens[outside] = encode(partial(encode_patch_tokens, self.backbone)).to(PATCH_TOKEN_DTYPE)
        return feats, tokens

    @cached_property
    def gallery_bank(self) -> ImageBank:
        """Gallery features and patch tokens (re-ranking), from the caches notebook 08 fills."""
        tokens = patch_tokens(self.backbone, self.gallery_paths, self.transform_kind, self.target_ratio,
                              cache_dir=self.cache_dir, progress=False)
        return ImageBank(self.gallery_features, tokens)

    # ------------------------------------------------------------------------ search
    def search(
        self, reference: ReferenceLike, caption: str, k: int = 10, exclude: Collection[int] | None = None
    ) -> list[Hit]:
        """The ``k`` best gallery images for "``reference``, changed as ``caption`` says", best first.

        ``exclude`` lists gallery indices never returned (e.g. the images a session has already
        shown); by default the benchmark's protocol decides whether the reference itself may come
        back (CIRR's leaves it out, FashionIQ's and CIRCO's keep it).
        """
        return self.ranking(reference, caption, exclude).hits(k)

    def ranking(self, reference: ReferenceLike, caption: str, exclude: Collection[int] | None = None) -> "Ranking":
        """The whole gallery ranked for one query (:meth:`search` is its top ``k``)."""
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("the caption is empty: type what should change (e.g. 'is red and has stripes')")
        ref = self.reference(reference)
        feats, tokens = self._encode([ref])
        rows = torch.tensor([-1 if ref.index is None else ref.index])
        batch = _Batch([Query(reference=ref.name, captions=(caption.strip(),))], feats, rows, tokens)
        if exclude is None:
            exclude = [ref.index] if ref.index is not None and self._drops_reference else []
        with _single_thread(self.backbone.device):
            order, shown = self.scorer.scores(self, batch)
        return Ranking(self, order[0], shown[0], tuple(int(i) for i in exclude))

    @property
    def _drops_reference(self) -> bool:
        return PROTOCOLS[self.split.dataset].exclude_reference

    def _hits(self, order: Tensor, shown: Tensor, k: int, exclude: Sequence[Sequence[int]]) -> list[list[Hit]]:
        """Top ``k`` per row of ``order`` (:func:`topk`), excluded indices left out."""
        width = max((len(e) for e in exclude), default=0)
        excluded = torch.tensor([[*e, *[-1] * (width - len(e))] for e in exclude], dtype=torch.long) if width else None
        best, idx = topk(order, k, excluded)
        return [[Hit(j, self.gallery_names[j], self.gallery_paths[j], float(shown[row, j]))
                 for j, ok in zip(idx[row].tolist(), torch.isfinite(best[row]).tolist()) if ok]
                for row in range(len(idx))]

    # ------------------------------------------------------------------------ benchmark queries
    @cached_property
    def split_features(self) -> SplitFeatures:
        """The split's reference, caption and gallery features, as the protocols compute them."""
        return encode_split(self.backbone, self.split, self.transform_kind, self.target_ratio, self.cache_dir,
                            progress=False)

    def _query_batch(self, indices: Sequence[int]) -> _Batch:
        queries = [self.split.queries[i] for i in indices]
        rows = indices_of([q.reference for q in queries], self._index)
        feats = self.split_features
        tokens = None
        if self.scorer.needs_tokens:
            refs = [Reference(q.reference, path=self.split.image_paths[q.reference],
                              index=None if int(r) < 0 else int(r)) for q, r in zip(queries, rows)]
            tokens = self._encode(refs)[1]
        return _Batch(queries, feats.reference[list(indices)], rows, tokens, feats.text[list(indices)])

    def _protocol_exclude(self, batch: _Batch) -> list[list[int]]:
        return [[int(r)] if self._drops_reference and r >= 0 else [] for r in batch.reference_rows]

    def search_query(self, index: int, k: int = 10) -> list[Hit]:
        """Top ``k`` of the split's query ``index``: the protocol's own ranking of that query."""
        return self.search_queries([index], k)[0]

    def search_queries(self, indices: Sequence[int], k: int = 10) -> list[list[Hit]]:
        """:meth:`search_query` of several queries at once."""
        batch = self._query_batch(indices)
        return self._hits(*self.scorer.scores(self, batch), k, self._protocol_exclude(batch))

    def query_scores(self, indices: Sequence[int] | None = None) -> Tensor:
        """``[N, G]`` scores whose order is the protocol's ranking of the split's queries ``indices``
        (all by default), e.g. for test-server submissions; the reference is not masked here."""
        indices = list(range(len(self.split.queries))) if indices is None else list(indices)
        return self.scorer.scores(self, self._query_batch(indices))[0]

    def target_ranks(self, indices: Sequence[int] | None = None) -> Tensor:
        """1-based rank of each query's target under the protocol (``0`` where it cannot be ranked:
        no target, or the target missing from the gallery)."""
        indices = list(range(len(self.split.queries))) if indices is None else list(indices)
        batch = self._query_batch(indices)
        targets = indices_of([q.target for q in batch.queries], self._index)
        exclude = batch.reference_rows.clone() if self._drops_reference else None
        order, _ = self.scorer.scores(self, batch)
        ranks = rank_of(order, targets, exclude) + 1
        return torch.where((targets >= 0) & (ranks <= len(self.gallery_names)), ranks, 0)


@dataclass(frozen=True)
class Ranking:
    """One query's ranking of the whole gallery: its top ``k`` and the rank of any image."""

    retriever: Retriever
    order: Tensor  # [G] what ranks
    shown: Tensor  # [G] the scores a user sees
    exclude: tuple[int, ...] = ()

    def hits(self, k: int = 10) -> list[Hit]:
        """The ``k`` best gallery images, best first, the excluded ones left out."""
        return self.retriever._hits(self.order[None], self.shown[None], k, [self.exclude])[0]

    def rank(self, index: int) -> int:
        """1-based rank of gallery image ``index`` (``0`` if excluded), ties counted pessimistically."""
        exclude = torch.tensor([list(self.exclude) or [-1]])
        return int(rank_of(self.order[None], torch.tensor([index]), exclude)[0]) + 1 if index not in self.exclude else 0


# --------------------------------------------------------------------------------------------
# What is on disk
# --------------------------------------------------------------------------------------------


def _artifacts(course: "Course", benchmark: str, method: str) -> list[Path]:
    """The files ``method`` needs on ``benchmark``, beside the course backbone."""
    quick = course.quick
    stage1 = artifacts.stage1_dir(quick, benchmark, FINETUNED) / "backbone.safetensors"
    return {
        "zero-shot-sum": [],
        "finetuned-sum": [stage1],
        "combiner": [stage1, artifacts.combiner_checkpoint(quick, benchmark, FINETUNED)],
        "isearle": [artifacts.phi_checkpoint(quick, PHI_PRETRAINING)],
        "reranking": [artifacts.filter_checkpoint(quick, benchmark), artifacts.reranker_checkpoint(quick, benchmark)],
    }[method]


def available_methods(course: "Course", benchmark: str) -> dict[str, str]:
    """Method key -> label of the methods whose trained artifacts exist for ``benchmark``.

    The Sum of the course backbone is always offered; the fine-tuned Sum, the Combiner and
    re-ranking need notebook 04, 05 and 08's checkpoints of ``benchmark`` (FashionIQ or CIRR),
    iSEARLE notebook 07's phi, which serves all three benchmarks (CIRCO included).
    """
    if benchmark not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(PROTOCOLS)}")
    zero_shot = ("zero-shot-sum", "isearle")
    return {key: label for key, label in METHODS.items()
            if (key in zero_shot or benchmark in TRAINED_ON)
            and all(p.exists() for p in _artifacts(course, benchmark, key))}
