"""Concepts: the class names an image is described by before a language model writes about it.

iSEARLE regularises a pseudo-word with phrases about the image's *concepts*: the k class names
CLIP finds closest to the image among a fixed vocabulary (Open Images' class names in the paper).
The embedded benchmarks have a vocabulary of their own, the nouns and attribute phrases their
generators render ("dress", "red dress", "striped dress", "star print", "small bag", "lavender
background"), built here from the generators' tables so that it follows them when they change. A
real dataset brings a class-name list instead (:func:`load_class_names`).

Assignment is zero-shot (:func:`assign_concepts`): each concept is encoded in a prompt, and an
image takes the k concepts whose text embeddings are most cosine-similar to its image embedding.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cirlib.core.tensors import row_chunks
from cirlib.data.synth import fashion, render
from cirlib.data.synth.scenes import graph
from cirlib.models.features import text_features

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

CONCEPT_TEMPLATE = "a photo of {}"
"""The prompt a concept is encoded in for zero-shot assignment."""

OPEN_IMAGES_HEADERS = (("labelname", "displayname"), ("mid", "displayname"))
"""Header rows of Open Images class-description files (lower-cased), skipped when present."""


def _unique(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in first-seen order (a vocabulary's order is its index order)."""
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------- embedded vocabularies
def _garment_concepts(category: str, colour: str, pattern: str, logo: str) -> list[str]:
    noun = fashion.CATEGORY_NOUNS[category]
    out = [noun, f"{colour} {noun}", f"{render.PATTERN_ADJECTIVES[pattern]} {noun}"]
    return out + ([f"{logo} print"] if logo != "none" else [])


def _object_concepts(kind: str, colour: str, size: str) -> list[str]:
    return [kind, f"{colour} {kind}", f"{size} {kind}"]


def _background_concepts(colour: str, pattern: str) -> list[str]:
    return [f"{colour} background", f"{render.PATTERN_ADJECTIVES[pattern]} background"]


def fashion_concepts() -> list[str]:
    """Every concept the ``fashion`` generator can render: garments alone, by colour, by pattern, and prints."""
    return _unique(
        c
        for category in fashion.CATEGORIES
        for colour in fashion.VOCAB["colour"]
        for pattern in fashion.VOCAB["pattern"]
        for logo in fashion.VOCAB["logo"]
        for c in _garment_concepts(category, colour, pattern, logo)
    )


def scene_concepts() -> list[str]:
    """Every concept the ``scenes`` generator can render: object kinds, by colour and size, and backgrounds."""
    objects = (
        c
        for kind in graph.KINDS
        for colour in graph.OBJECT_COLOURS
        for size in graph.SIZES
        for c in _object_concepts(kind, colour, size)
    )
    backgrounds = (
        c for colour in graph.BACKGROUNDS for pattern in graph.BACKGROUND_PATTERNS
        for c in _background_concepts(colour, pattern)
    )
    return _unique([*objects, *backgrounds])


def embedded_concepts() -> list[str]:
    """The vocabulary of both embedded benchmarks (a shape and a print may share a word: "star")."""
    return _unique([*fashion_concepts(), *scene_concepts()])


def image_concepts(benchmark: str, attributes: dict[str, Any]) -> list[str]:
    """The concepts a generated image shows, from the attributes it was rendered from.

    Ground truth for a zero-shot assignment, and the subjects of the language model's training
    sentences (each sentence is about a concept its image really shows).
    """
    if benchmark == "fashion":
        a = attributes
        return _garment_concepts(a["category"], a["colour"], a["pattern"], a["logo"])
    if benchmark == "scenes":
        objects = [c for o in attributes["objects"] for c in _object_concepts(o["kind"], o["colour"], o["size"])]
        bg = attributes["background"]
        return _unique([*objects, *_background_concepts(bg["colour"], bg["pattern"])])
    raise ValueError(f"no concepts for benchmark {benchmark!r}; expected 'fashion' or 'scenes'")


# ----------------------------------------------------------------------------- user class lists
def _clean_name(raw: str) -> str:
    return re.sub(r"\s+", " ", raw).strip()


def load_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file (one per line) or an Open Images class-description CSV
    (``MID,DisplayName`` rows, header optional), in file order.

    Any empty name or malformed row is an error naming the file and line: a silently skipped class
    would change which concepts images get. Repeated names are kept once, with one warning that
    counts them (Open Images repeats a few display names under different MIDs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name list {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    names: list[tuple[int, str]] = []  # (line number, name)
    if path.suffix.lower() == ".csv":
        rows = csv.reader(text.splitlines())
        for row in rows:
            line = rows.line_num
            if not row:
                raise ValueError(f"{path}, line {line}: empty row; expected 'MID,DisplayName'")
            if line == 1 and tuple(c.strip().lower() for c in row) in OPEN_IMAGES_HEADERS:
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"{path}, line {line}: expected 'MID,DisplayName', got {','.join(row)!r}")
            names.append((line, row[1]))
    else:
        names = list(enumerate(text.splitlines(), start=1))
    out: list[str] = []
    seen: set[str] = set()
    repeats = 0
    for line, raw in names:
        name = _clean_name(raw)
        if not name:
            raise ValueError(f"{path}, line {line}: empty class name")
        if name in seen:
            repeats += 1
            continue
        seen.add(name)
        out.append(name)
    if not out:
        raise ValueError(f"{path}: no class names")
    if repeats:
        warnings.warn(f"{path}: {repeats} repeated class name(s) kept once ({len(out)} distinct)", stacklevel=2)
    return out


# --------------------------------------------------------------------------- zero-shot assignment
@dataclass(frozen=True)
class ConceptAssignment:
    """The top-k concepts of each image: ``indices`` / ``scores`` ``[N, k]``, best first."""

    concepts: list[str]
    indices: torch.Tensor  # [N, k] int64 into `concepts`
    scores: torch.Tensor  # [N, k] cosine similarities

    @property
    def names(self) -> list[list[str]]:
        """The concepts of each image, best first."""
        return [[self.concepts[j] for j in row] for row in self.indices.tolist()]


def top_k_concepts(
    image_features: torch.Tensor, concept_features: torch.Tensor, concepts: Sequence[str], k: int
) -> ConceptAssignment:
    """The ``k`` concepts of highest cosine similarity per image (features need not be normalised).

    Similarities are computed a block of images at a time, so a large gallery against a large
    vocabulary (the paper's 20K class names) never holds the full ``[N, C]`` matrix.
    """
    concepts = list(concepts)
    if image_features.ndim != 2 or concept_features.ndim != 2 or image_features.shape[1] != concept_features.shape[1]:
        raise ValueError(f"need [N, D] image and [C, D] concept features, got {tuple(image_features.shape)} and "
                         f"{tuple(concept_features.shape)}")
    if len(concepts) != len(concept_features):
        raise ValueError(f"{len(concepts)} concept names for {len(concept_features)} concept features")
    if len(set(concepts)) != len(concepts):
        raise ValueError("concept names repeat: an image's k concepts must be distinct")
    if not 1 <= k <= len(concepts):
        raise ValueError(f"k={k} must be between 1 and the number of concepts ({len(concepts)})")
    text = F.normalize(concept_features.float(), dim=-1)
    indices, scores = [], []
    for rows in row_chunks(len(image_features), len(concepts)):
        sims = F.normalize(image_features[rows].float(), dim=-1) @ text.T
        top = sims.topk(k, dim=1)
        indices.append(top.indices)
        scores.append(top.values)
    if not indices:
        return ConceptAssignment(concepts, torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
    return ConceptAssignment(concepts, torch.cat(indices), torch.cat(scores))


def concept_features(
    backbone: "Backbone", concepts: Sequence[str], template: str = CONCEPT_TEMPLATE, progress: bool = False
) -> torch.Tensor:
    """Text embeddings ``[C, D]`` (unnormalised) of each concept in ``template``."""
    return text_features(backbone, [template.format(c) for c in concepts], progress=progress)


def assign_concepts(
    backbone: "Backbone",
    image_features: torch.Tensor,
    concepts: Sequence[str],
    k: int = 15,
    template: str = CONCEPT_TEMPLATE,
    progress: bool = False,
) -> ConceptAssignment:
    """Zero-shot top-``k`` concepts of each image (``image_features`` ``[N, D]`` from ``backbone``).

    ``k=15`` is the paper's value for OTI (150 for training phi).
    """
    return top_k_concepts(image_features, concept_features(backbone, concepts, template, progress), concepts, k)


__all__ = [
    "CONCEPT_TEMPLATE",
    "ConceptAssignment",
    "assign_concepts",
    "concept_features",
    "embedded_concepts",
    "fashion_concepts",
    "image_concepts",
    "load_class_names",
    "scene_concepts",
    "top_k_concepts",
]
