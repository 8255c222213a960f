"""iSEARLE inference: the reference image becomes a pseudo-word of a sentence, and CIR becomes
text-to-image retrieval.

A query (reference image, relative caption) is read as the text "a photo of $ that {caption}",
whose placeholder ``$`` holds the reference image's pseudo-word token: optimised for that image
(iSEARLE-OTI, :func:`oti_query_features`) or predicted by the trained network phi
(iSEARLE, :func:`phi_query_features`). The sentence's text feature is the query feature; the
gallery is ranked by cosine similarity to it.

The Captioning baseline (:func:`captioning_query_features`) puts a caption of the reference image
where the pseudo-word was. No captioning model exists offline, so a stand-in captions each reference
with the absolute caption of its nearest image (by image feature) in the pre-training corpus.

Every method is scored by the project's one evaluation path
(:func:`cirlib.evaluation.baselines.evaluate_features`): a method's query features are text
features, so they take the text slot of the split's :class:`~cirlib.models.features.SplitFeatures`
and are scored with the text-only combining function; the gallery and the protocols are the
baselines' own, so every row of :func:`evaluate_isearle` is comparable with them.

OTI tokens are cached (:func:`oti_tokens`, one entry of :mod:`cirlib.core.cache` per backbone,
image features, OTI config, concepts and phrases); phi is checkpointed by
:func:`~cirlib.methods.phi_training.train_phi` (:func:`pretrain_phi`;
:func:`cirlib.core.artifacts.phi_checkpoint` says where the course keeps it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from cirlib.core.cache import cache_entry
from cirlib.core.device import precision
from cirlib.core.io import tensor_digest
from cirlib.data.concepts import assign_concepts
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.baselines import BASELINES, evaluate_features, per_query_features
from cirlib.evaluation.bootstrap import PerQuery
from cirlib.evaluation.protocols import similarity_chunks
from cirlib.methods.gpt_phrases import PhraseConfig, PhraseLMConfig, concept_phrases
from cirlib.methods.oti import OTIConfig, oti
from cirlib.methods.phi_training import PhiConfig, train_phi
from cirlib.methods.pretrain import build_corpus
from cirlib.models.backbone import Backbone
from cirlib.models.features import SplitFeatures, encode_in_batches, encode_split, image_features, text_features
from cirlib.models.phi import Phi
from cirlib.models.phrase_lm import PhraseLM
from cirlib.models.pseudo_word import PLACEHOLDER, encode_with_pseudo_words

PROMPT_TEMPLATE = "a photo of {subject} that {caption}"
"""The inference prompt: ``{subject}`` is the pseudo-word (or, for Captioning, the reference's
caption), ``{caption}`` the relative caption."""

METHODS: tuple[str, ...] = ("image", "text", "sum", "captioning", "isearle-oti", "isearle")
"""The rows of the method's result tables: the zero-shot baselines, then the two iSEARLE variants."""

OTI_TOKENS_VERSION = 1  # bump when a change here changes which tokens a cache key stands for


@dataclass(frozen=True)
class ISearleConfig:
    """Everything the method's tokens and query features depend on.

    ``k_oti`` / ``k_phi`` are the concepts assigned to each image for L_gpt while optimising
    tokens and while training phi (the paper's 15 and 150; capped at the vocabulary size).
    ``amp`` is the arithmetic of query encoding (OTI and phi have their own switches).
    """

    oti: OTIConfig = field(default_factory=OTIConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    phrase_lm: PhraseLMConfig = field(default_factory=PhraseLMConfig)
    template: str = PROMPT_TEMPLATE
    k_oti: int = 15
    k_phi: int = 150
    amp: bool = True

    def __post_init__(self) -> None:
        if "{subject}" not in self.template or "{caption}" not in self.template:
            raise ValueError(f"template must hold {{subject}} and {{caption}}, got {self.template!r}")
        if min(self.k_oti, self.k_phi) < 1:
            raise ValueError(f"k_oti and k_phi must be at least 1, got {self.k_oti} and {self.k_phi}")

    @classmethod
    def for_tiny(cls, **overrides) -> "ISearleConfig":
        """The course's tiny backbone: OTI noise scaled to its features (:meth:`OTIConfig.for_tiny`)."""
        return cls(**{"oti": OTIConfig.for_tiny(), **overrides})

    @classmethod
    def quick(cls, **overrides) -> "ISearleConfig":
        """Short OTI and phi runs, few phrases and concepts: tests and quick notebook runs."""
        return cls(**{"oti": OTIConfig.quick(), "phi": PhiConfig.quick(), "phrases": PhraseConfig.quick(),
                      "phrase_lm": PhraseLMConfig.quick(), "k_oti": 5, "k_phi": 15, **overrides})


# ------------------------------------------------------------------------------ query features
def caption_orders(query: Query) -> list[str]:
    """The relative caption(s) a prompt is written with.

    FashionIQ's two captions are joined by "and" (:func:`~cirlib.data.datasets.query_text`) in
    both orders, so that a query's feature does not depend on the order the annotators wrote them
    in; other benchmarks have one caption.
    """
    if len(query.captions) < 2:
        return [query_text(query)]
    return [query_text(query), query_text(dataclasses.replace(query, captions=query.captions[::-1]))]


def compose_features(
    backbone: Backbone,
    queries: Sequence[Query],
    subjects: Tensor | Sequence[str],
    template: str = PROMPT_TEMPLATE,
    amp: bool = True,
    batch_size: int = 256,
) -> Tensor:
    """Query features ``[Q, D]`` (unit rows, float32, CPU) of ``template`` per query.

    ``subjects`` is one pseudo-word token per query (``[Q, width]``, read through the placeholder)
    or one text per query (Captioning). A query with several caption orders (FashionIQ) gets the
    mean of its orders' unit text features, renormalised, as SEARLE's evaluation code does; against
    unit gallery features this ranks exactly as the mean of the orders' cosine scores would.
    """
    if len(subjects) != len(queries):
        raise ValueError(f"{len(subjects)} subjects for {len(queries)} queries; give one per query")
    tokens = subjects if isinstance(subjects, Tensor) else None
    rows: list[int] = []
    texts: list[str] = []
    for i, query in enumerate(queries):
        subject = PLACEHOLDER if tokens is not None else subjects[i]
        for caption in caption_orders(query):
            rows.append(i)
            texts.append(template.format(subject=subject, caption=caption))
    if not texts:
        return torch.empty(0, backbone.embed_dim)
    query_of = torch.tensor(rows)
    if tokens is not None:
        def encode(index: Tensor) -> Tensor:
            index = index.cpu()
            return encode_with_pseudo_words(backbone, [texts[j] for j in index.tolist()], tokens[query_of[index]])

        feats = encode_in_batches(encode, torch.arange(len(texts)).split(batch_size), backbone.device,
                                  module=backbone.model, progress=False, amp=amp)
    else:
        feats = text_features(backbone, texts, batch_size, progress=False, amp=amp)
    summed = torch.zeros(len(queries), feats.shape[1]).index_add_(0, query_of, F.normalize(feats, dim=-1))
    return F.normalize(summed, dim=-1)


def distinct_references(split: CIRSplit) -> tuple[list[int], Tensor]:
    """Per distinct reference image (in order of first use) the first query showing it, and each
    query's row among them: several queries share a reference, whose token is computed once."""
    first: dict[str, int] = {}
    for i, query in enumerate(split.queries):
        first.setdefault(query.reference, i)
    row = {name: r for r, name in enumerate(first)}
    return list(first.values()), torch.tensor([row[q.reference] for q in split.queries], dtype=torch.long)


def image_concepts_of(
    backbone: Backbone, features: Tensor, phrases: Mapping[str, Sequence[str]], k: int
) -> list[list[str]]:
    """Each image's zero-shot top-``k`` concepts among those ``phrases`` were generated for."""
    vocabulary = list(phrases)
    return assign_concepts(backbone, features, vocabulary, min(k, len(vocabulary))).names


def oti_tokens(
    backbone: Backbone,
    features: Tensor,
    concepts: Sequence[Sequence[str]] | None,
    phrases: Mapping[str, Sequence[str]] | None,
    config: OTIConfig,
    cache_dir: Path | str | None = None,
) -> Tensor:
    """:func:`~cirlib.methods.oti.oti`'s tokens ``[N, width]`` of image ``features``, cached.

    The entry is keyed by the backbone's weights, the features' bytes (which stand for the image
    set, its preprocessing and the image tower, and serve feature matrices that come from no file
    list), the OTI config, each image's concepts, the phrases and the arithmetic; any change
    optimises afresh. OTI takes minutes where reading the entry takes milliseconds.
    """
    entry = None
    if cache_dir is not None:
        settings = {k: v for k, v in asdict(config).items() if k != "progress"}
        inputs = {"version": OTI_TOKENS_VERSION, "backbone": backbone.fingerprint, "features": tensor_digest(features),
                  "config": settings, "concepts": None if concepts is None else [list(c) for c in concepts],
                  "phrases": None if phrases is None else {c: list(p) for c, p in phrases.items()},
                  "precision": precision(backbone.device, config.amp)}
        entry = cache_entry(cache_dir, "OTI token", "oti-tokens", ".safetensors", inputs, [])
        cached = entry.load_tensor("tokens", (len(features), None), torch.float32)
        if cached is not None:
            return cached
    tokens = oti(backbone, features, concepts, phrases, config).tokens
    if entry is not None:
        entry.save_tensor("tokens", tokens)
    return tokens


def oti_query_features(
    backbone: Backbone,
    split: CIRSplit,
    features: SplitFeatures,
    phrases: Mapping[str, Sequence[str]] | None,
    config: ISearleConfig = ISearleConfig(),
    cache_dir: Path | str | None = None,
) -> Tensor:
    """iSEARLE-OTI query features ``[Q, D]``: each distinct reference image's OTI token (L_gpt
    over its ``k_oti`` concepts among ``phrases``; ``phrases=None`` turns L_gpt off) in the prompt."""
    first, rows = distinct_references(split)
    references = features.reference[first]
    concepts = image_concepts_of(backbone, references, phrases, config.k_oti) if phrases is not None else None
    tokens = oti_tokens(backbone, references, concepts, phrases, config.oti, cache_dir)
    return compose_features(backbone, split.queries, tokens[rows], config.template, config.amp)


@torch.no_grad()
def phi_tokens(phi: Phi, features: Tensor, batch_size: int = 4096) -> Tensor:
    """phi's pseudo-word tokens ``[N, width]`` (float32, CPU) of image features, in eval mode."""
    device = next(phi.parameters()).device
    was_training = phi.training
    phi.eval()
    try:
        return torch.cat([phi(x.to(device).float()).float().cpu() for x in features.split(batch_size)]) \
            if len(features) else torch.empty(0, phi.hparams["token_dim"])
    finally:
        phi.train(was_training)


def phi_query_features(
    backbone: Backbone, phi: Phi, split: CIRSplit, features: SplitFeatures, config: ISearleConfig = ISearleConfig()
) -> Tensor:
    """iSEARLE query features ``[Q, D]``: phi's token of each reference image in the prompt."""
    return compose_features(backbone, split.queries, phi_tokens(phi, features.reference), config.template, config.amp)


# ---------------------------------------------------------------------------- pre-training phi
def method_phrases(
    concepts: Sequence[str],
    config: ISearleConfig = ISearleConfig(),
    lm: PhraseLM | str | os.PathLike | None = None,
    roots: Sequence[str | os.PathLike] = (),
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """GPT phrases of the concept vocabulary with the config's language-model and sampling settings
    (:func:`~cirlib.methods.gpt_phrases.concept_phrases`); their keys are the vocabulary the other
    functions assign concepts from."""
    return concept_phrases(concepts, lm, roots, config.phrase_lm, config.phrases, cache_dir, progress)


def pretrain_phi(
    backbone: Backbone,
    features: Tensor,
    phrases: Mapping[str, Sequence[str]] | None,
    config: ISearleConfig = ISearleConfig(),
    cache_dir: Path | str | None = None,
    ckpt_path: Path | str | None = None,
) -> tuple[Phi, list[dict]]:
    """phi trained on unlabelled images' ``features``: their OTI tokens (cached, :func:`oti_tokens`,
    L_gpt over ``k_oti`` concepts) distilled with L_gpt over ``k_phi`` concepts. A finished
    checkpoint at ``ckpt_path`` for the same config and data is loaded, not retrained."""
    concepts = image_concepts_of(backbone, features, phrases, config.k_oti) if phrases is not None else None
    tokens = oti_tokens(backbone, features, concepts, phrases, config.oti, cache_dir)
    phi_concepts = image_concepts_of(backbone, features, phrases, config.k_phi) if phrases is not None else None
    return train_phi(features, tokens, backbone, phi_concepts, phrases, config.phi, ckpt_path)


# -------------------------------------------------------------------------------- Captioning
@dataclass(frozen=True)
class CaptionCorpus:
    """Images of the pre-training corpus (features ``[N, D]``) and their absolute captions: what the
    stand-in captioner can say."""

    features: Tensor
    captions: list[str]

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or len(self.features) != len(self.captions) or not self.captions:
            raise ValueError(f"need one caption per corpus feature row, got {tuple(self.features.shape)} features "
                             f"and {len(self.captions)} captions")


def caption_corpus(
    backbone: Backbone,
    roots: Sequence[str | os.PathLike],
    split: str = "train",
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
) -> CaptionCorpus:
    """The (image, absolute caption) pairs of the generated roots' ``split``
    (:func:`~cirlib.methods.pretrain.build_corpus`), images encoded through the feature cache."""
    pairs = build_corpus(roots, split)
    feats = image_features(backbone, [p.path for p in pairs], transform_kind, target_ratio,
                           cache_dir=cache_dir, progress=False)
    return CaptionCorpus(feats, [p.caption for p in pairs])


def nearest_captions(reference_features: Tensor, corpus: CaptionCorpus) -> list[str]:
    """The stand-in captioner: per image, the caption of the corpus image of highest cosine
    similarity (first such image on ties). It stands in for a real captioning model, which the
    paper uses and which cannot be loaded offline; it can only say what the corpus says."""
    queries = F.normalize(reference_features.float(), dim=-1)
    gallery = F.normalize(corpus.features.float(), dim=-1)
    best = [scores.argmax(dim=1) for _, scores in similarity_chunks(queries, gallery)]
    return [corpus.captions[i] for i in torch.cat(best).tolist()] if best else []


def captioning_query_features(
    backbone: Backbone,
    split: CIRSplit,
    features: SplitFeatures,
    corpus: CaptionCorpus,
    config: ISearleConfig = ISearleConfig(),
) -> Tensor:
    """Captioning baseline query features ``[Q, D]``: the prompt with the reference image's
    (stand-in) caption where the pseudo-word would be: "a photo of {caption} that {relative caption}"."""
    captions = nearest_captions(features.reference, corpus)
    return compose_features(backbone, split.queries, captions, config.template, config.amp)


# -------------------------------------------------------------------------------- evaluation
def _with_queries(features: Mapping[str, SplitFeatures], queries: Mapping[str, Tensor]) -> dict[str, SplitFeatures]:
    """The splits' features with the method's query features in the text slot (scored by the
    text-only combining function, the seam through which a method enters the evaluation path)."""
    return {name: dataclasses.replace(features[name], text=q) for name, q in queries.items()}


def evaluate_queries(
    splits: Mapping[str, CIRSplit], features: Mapping[str, SplitFeatures], queries: Mapping[str, Tensor]
) -> dict[str, float]:
    """:func:`~cirlib.evaluation.baselines.evaluate_features` of precomputed query features
    (one ``[Q, D]`` tensor per split): ``{"<benchmark> <metric>": value}``."""
    return evaluate_features(splits, _with_queries(features, queries), BASELINES["text"])


def per_query_queries(
    splits: Mapping[str, CIRSplit], features: Mapping[str, SplitFeatures], queries: Mapping[str, Tensor]
) -> dict[str, PerQuery]:
    """Per benchmark, the per-query values behind :func:`evaluate_queries` (bootstrap intervals)."""
    return per_query_features(splits, _with_queries(features, queries), BASELINES["text"])


def method_query_features(
    method: str,
    backbone: Backbone,
    splits: Mapping[str, CIRSplit],
    features: Mapping[str, SplitFeatures],
    config: ISearleConfig = ISearleConfig(),
    phrases: Mapping[str, Sequence[str]] | None = None,
    phi: Phi | None = None,
    corpus: CaptionCorpus | None = None,
    cache_dir: Path | str | None = None,
) -> dict[str, Tensor]:
    """Query features per split of one of :data:`METHODS` other than the combining baselines."""
    if method == "captioning":
        if corpus is None:
            raise ValueError("the captioning baseline needs a caption corpus (caption_corpus)")
        return {n: captioning_query_features(backbone, s, features[n], corpus, config) for n, s in splits.items()}
    if method == "isearle":
        if phi is None:
            raise ValueError("iSEARLE needs a trained phi (pretrain_phi)")
        return {n: phi_query_features(backbone, phi, s, features[n], config) for n, s in splits.items()}
    if method == "isearle-oti":
        return {n: oti_query_features(backbone, s, features[n], phrases, config, cache_dir) for n, s in splits.items()}
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def evaluate_isearle(
    backbone: Backbone,
    splits: Mapping[str, CIRSplit],
    methods: Sequence[str] = METHODS,
    config: ISearleConfig = ISearleConfig(),
    phrases: Mapping[str, Sequence[str]] | None = None,
    phi: Phi | None = None,
    corpus: CaptionCorpus | None = None,
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    cache_dir: Path | str | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, str], PerQuery]]:
    """Rows = ``methods`` (baselines and iSEARLE variants), columns = ``"<benchmark> <metric>"``
    (percent), as :func:`~cirlib.evaluation.baselines.evaluate_baselines`; and the per-query values
    keyed ``(benchmark, method)``. ``phrases`` feed iSEARLE-OTI's L_gpt, ``phi`` iSEARLE and
    ``corpus`` Captioning; ``cache_dir`` holds image features and OTI tokens."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    features = {n: encode_split(backbone, s, transform_kind, target_ratio, cache_dir, progress=False)
                for n, s in splits.items()}
    rows: dict[str, dict[str, float]] = {}
    per_query: dict[tuple[str, str], PerQuery] = {}
    for method in methods:
        if method in BASELINES:
            rows[method] = evaluate_features(splits, features, BASELINES[method])
            values = per_query_features(splits, features, BASELINES[method])
        else:
            queries = method_query_features(method, backbone, splits, features, config, phrases, phi, corpus,
                                            cache_dir)
            rows[method] = evaluate_queries(splits, features, queries)
            values = per_query_queries(splits, features, queries)
        per_query |= {(bench, method): v for bench, v in values.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "method"
    return frame, per_query


__all__ = [
    "METHODS",
    "PROMPT_TEMPLATE",
    "CaptionCorpus",
    "ISearleConfig",
    "caption_corpus",
    "caption_orders",
    "captioning_query_features",
    "compose_features",
    "distinct_references",
    "evaluate_isearle",
    "evaluate_queries",
    "image_concepts_of",
    "method_phrases",
    "method_query_features",
    "nearest_captions",
    "oti_query_features",
    "oti_tokens",
    "per_query_queries",
    "phi_query_features",
    "phi_tokens",
    "pretrain_phi",
]
