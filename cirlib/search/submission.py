"""Test-server submission files for CIRR and CIRCO, from any method's ranking of a test split.

Neither benchmark releases its test ground truths: a method's test numbers come only from the
official evaluation servers, which accept one JSON file each. The formats, as their official
repositories describe them (CIRR ``Test-split_server.md`` and its demo files; CIRCO ``README.md``,
its ``submission_examples/`` and ``src/evaluation.py``):

CIRR (two files)
    ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 image names], ...}`` and the same
    with ``"metric": "recall_subset"`` and the top 3 among the query's image-set members. The
    reference image is left out of both rankings (the official protocol, as
    :data:`~cirlib.evaluation.protocols.PROTOCOLS` applies it); the server takes files up to 5 MB,
    so they are written without indentation.
CIRCO
    ``{"<query id>": [top-50 image ids as integers], ...}`` for every test query (the server
    asserts the ids are exactly ``0 .. N-1``); the whole index set is ranked, reference kept.

A ranking is a ``[Q, G]`` score matrix over the split's gallery, higher is better: cosine
similarities of query and gallery features (``F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T``),
or any method's order, such as re-ranking's (:func:`cirlib.methods.reranking.ranking_features`).
The lists come from :func:`~cirlib.evaluation.protocols.topk`, the course's one ranking order
(ties in gallery order), with the protocol's reference exclusion. Where a gallery holds fewer than
50 candidates (the quick benchmarks) a list holds them all: ``min(50, candidates)`` is the rule
the validators apply, 50 on the real datasets.

:func:`submit_method` is what a notebook calls for a method it trained: it ranks the test split
with the method's :class:`~cirlib.search.engine.Retriever`, the ranking every interactive tool
shows, and writes the files through :func:`write_submissions`. The ``validate_*`` functions check
any file (or dict) against the rules above and raise :class:`SubmissionError` naming the
offending field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cirlib.core import artifacts
from cirlib.core.io import write_text
from cirlib.data.datasets import CIRSplit
from cirlib.evaluation.metrics import index_lists, indices_of, name_index
from cirlib.evaluation.protocols import topk

if TYPE_CHECKING:
    from cirlib.course import Course

CIRR_VERSION = "rc2"
RECALL_K = 50  # list length of CIRR's recall file and of CIRCO's file
SUBSET_K = 3  # list length of CIRR's recall_subset file
CIRR_METRICS = {"recall": RECALL_K, "recall_subset": SUBSET_K}
CIRR_MAX_BYTES = 5_000_000  # the CIRR server's file-size limit ("Maximum 5MB")
SERVERS = {"cirr": "http://cirr.cecs.anu.edu.au/", "circo": "https://circo.micc.unifi.it/"}

Submission = dict[str, Any]


class SubmissionError(ValueError):
    """A submission file breaks its server's format; the message names the field."""


# ------------------------------------------------------------------------------------ building


def cirr_recall_submission(split: CIRSplit, scores: Tensor) -> Submission:
    """CIRR's ``recall`` file: each pairid's top 50 of the whole gallery, reference left out."""
    _check_scores(split, "cirr", scores)
    index = name_index(split.gallery)
    references = indices_of([query.reference for query in split.queries], index)
    return _cirr_file("recall", split, _ranked(split.gallery, scores, RECALL_K, references))


def cirr_subset_submission(split: CIRSplit, scores: Tensor) -> Submission:
    """CIRR's ``recall_subset`` file: each pairid's top 3 among its image-set members, reference left out.

    The members are ranked in gallery order of their columns, so ties fall as in the full ranking:
    each list is the ``recall`` ranking filtered to the query's members.
    """
    _check_scores(split, "cirr", scores)
    index = name_index(split.gallery)
    members = index_lists([query.group for query in split.queries], index).sort(dim=1).values  # -1 padding first
    references = indices_of([query.reference for query in split.queries], index)
    member_scores = scores.gather(1, members.clamp(min=0).to(scores.device))
    dropped = (members < 0) | (members == references[:, None])
    values, columns = topk(member_scores.masked_fill(dropped.to(scores.device), float("-inf")), SUBSET_K)
    names = [[split.gallery[row_members[c]] for c, ok in zip(cols, oks) if ok]
             for row_members, cols, oks in zip(members.tolist(), columns.tolist(), torch.isfinite(values).tolist())]
    return _cirr_file("recall_subset", split, names)


def circo_submission(split: CIRSplit, scores: Tensor) -> Submission:
    """CIRCO's file: each query id's top 50 image ids (integers) of the whole index set, reference kept."""
    _check_scores(split, "circo", scores)
    ranked = _ranked(split.gallery, scores, RECALL_K, None)
    return {str(query.pair_id): [int(name) for name in names] for query, names in zip(split.queries, ranked)}


def write_submissions(
    quick: bool, method: str, split: CIRSplit, scores: Tensor, out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Build, validate and atomically write ``method``'s submission files for a CIRR or CIRCO test split.

    ``scores`` ``[Q, G]`` rank ``split``'s gallery for each of its queries. Files go to
    ``<out_dir or results_dir(quick)/submissions>/<benchmark>/<method slug>.<metric>.json`` (CIRR:
    ``.recall`` and ``.recall_subset``; CIRCO: ``.json`` alone), ready to upload to
    :data:`SERVERS`. Returns their paths.
    """
    if split.dataset not in SERVERS:
        raise ValueError(f"{split.dataset} has no test server to submit to; submissions exist for {sorted(SERVERS)}")
    folder = Path(out_dir) if out_dir is not None else artifacts.results_dir(quick) / "submissions"
    folder /= split.dataset
    slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
    if not slug:
        raise ValueError(f"method name {method!r} has no letters or digits to name its files by")
    if split.dataset == "cirr":
        files = {folder / f"{slug}.recall.json": cirr_recall_submission(split, scores),
                 folder / f"{slug}.recall_subset.json": cirr_subset_submission(split, scores)}
    else:
        files = {folder / f"{slug}.json": circo_submission(split, scores)}
    validate = validate_cirr if split.dataset == "cirr" else validate_circo
    for path, submission in files.items():
        validate(submission, split)
        write_text(path, _dumps(submission))
        validate(path, split)  # the file as the server will read it (size included)
    return list(files)


def submit_method(
    course: "Course", method: str, benchmark: str, out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Write the test-server files of a trained method (a key of
    :func:`~cirlib.search.engine.available_methods`) on ``benchmark``'s test split ("cirr" or "circo").

    The split is ranked by the method's :class:`~cirlib.search.engine.Retriever`, so the files hold
    the ranking the protocols score on validation and the widgets show; see :func:`write_submissions`.
    """
    from cirlib.search.engine import Retriever

    if benchmark not in SERVERS:
        raise ValueError(f"{benchmark!r} has no test server to submit to; submissions exist for {sorted(SERVERS)}")
    retriever = Retriever.for_method(course, benchmark, benchmark, method, kind="test")
    return write_submissions(course.quick, method, retriever.split, retriever.query_scores(), out_dir)


# ---------------------------------------------------------------------------------- validation


def validate_cirr(submission: Submission | str | os.PathLike, split: CIRSplit) -> None:
    """Check a CIRR ``recall`` or ``recall_subset`` file (path or dict) against the server's rules.

    ``version`` is ``"rc2"``; ``metric`` is one of :data:`CIRR_METRICS` and decides the rest; every
    pairid of ``split`` is a key and nothing else is; each list holds exactly ``min(50, candidates)``
    (recall) or ``min(3, candidates)`` (recall_subset) distinct image names, never the reference,
    all from the gallery (recall) or from the query's set members (recall_subset); a file is at most
    5 MB. Raises :class:`SubmissionError` naming the field.
    """
    _check_split(split, "cirr")
    data, what = _load(submission, "CIRR submission")
    if isinstance(submission, (str, os.PathLike)):
        size = Path(submission).stat().st_size
        if size > CIRR_MAX_BYTES:
            raise SubmissionError(f"{what}: {size} bytes, over the CIRR server's limit of {CIRR_MAX_BYTES}")
    if data.get("version") != CIRR_VERSION:
        raise SubmissionError(f"{what}: field 'version' must be {CIRR_VERSION!r}, got {data.get('version')!r}")
    metric = data.get("metric")
    if metric not in CIRR_METRICS:
        raise SubmissionError(f"{what}: field 'metric' must be one of {sorted(CIRR_METRICS)}, got {metric!r}")
    entries = {key: value for key, value in data.items() if key not in ("version", "metric")}
    _check_keys(entries, split, what)
    gallery = set(split.gallery)
    for query in split.queries:
        where = f"{what}: field {str(query.pair_id)!r}"
        pool = gallery if metric == "recall" else gallery & set(query.group)
        pool = pool - {query.reference}
        names = _check_list(entries[str(query.pair_id)], str, "image names", min(CIRR_METRICS[metric], len(pool)),
                            where)
        if query.reference in names:
            raise SubmissionError(f"{where}: lists the reference image {query.reference!r}, which the protocol "
                                  "leaves out of the ranking")
        outside = [name for name in names if name not in pool]
        if outside:
            kind = "the test gallery" if metric == "recall" else f"the query's image set {sorted(query.group)}"
            raise SubmissionError(f"{where}: {outside[0]!r} is not in {kind}")


def validate_circo(submission: Submission | str | os.PathLike, split: CIRSplit) -> None:
    """Check a CIRCO file (path or dict) against the server's rules.

    Every query id of ``split`` is a key and nothing else is; each list holds exactly
    ``min(50, index size)`` distinct integer image ids of the index set. Raises
    :class:`SubmissionError` naming the field.
    """
    _check_split(split, "circo")
    data, what = _load(submission, "CIRCO submission")
    _check_keys(data, split, what)
    gallery = set(split.gallery)
    for query in split.queries:
        where = f"{what}: field {str(query.pair_id)!r}"
        ids = _check_list(data[str(query.pair_id)], int, "integer image ids", min(RECALL_K, len(gallery)), where)
        outside = [i for i in ids if str(i) not in gallery]
        if outside:
            raise SubmissionError(f"{where}: image id {outside[0]} is not in the index set")


# ------------------------------------------------------------------------------------ internals


def _check_split(split: CIRSplit, dataset: str) -> None:
    if split.dataset != dataset:
        raise ValueError(f"expected a {dataset} split, got {split.dataset}/{split.split}")
    if any(query.pair_id is None for query in split.queries):
        raise ValueError(f"{split.dataset}/{split.split} has queries without an id to key a submission by")


def _check_scores(split: CIRSplit, dataset: str, scores: Tensor) -> None:
    _check_split(split, dataset)
    shape = (len(split.queries), len(split.gallery))
    if scores.dim() != 2 or tuple(scores.shape) != shape:
        raise ValueError(f"scores must be [queries, gallery] = {list(shape)} for {split.dataset}/{split.split}, "
                         f"got {list(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the features that produced them")


def _ranked(gallery: list[str], scores: Tensor, k: int, exclude: Tensor | None) -> list[list[str]]:
    """The ``k`` best gallery names per row, best first; excluded items only fill rows of tiny galleries."""
    values, best = topk(scores, k, exclude)
    return [[gallery[j] for j, ok in zip(row, oks) if ok] for row, oks in zip(best.tolist(),
                                                                             torch.isfinite(values).tolist())]


def _cirr_file(metric: str, split: CIRSplit, names: list[list[str]]) -> Submission:
    entries = {str(query.pair_id): ranking for query, ranking in zip(split.queries, names)}
    return {"version": CIRR_VERSION, "metric": metric, **entries}


def _dumps(submission: Submission) -> str:
    return json.dumps(submission, separators=(",", ":"), ensure_ascii=False) + "\n"


def _load(submission: Submission | str | os.PathLike, what: str) -> tuple[dict, str]:
    """The submission as the server reads it (JSON keys are strings), and how errors name it."""
    if isinstance(submission, (str, os.PathLike)):
        path = Path(submission)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SubmissionError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
        what = str(path)
    else:
        data = json.loads(_dumps(submission))
    if not isinstance(data, dict):
        raise SubmissionError(f"{what}: must be a JSON object keyed by query id, got {type(data).__name__}")
    return data, what


def _check_keys(entries: Mapping[str, Any], split: CIRSplit, what: str) -> None:
    expected = [str(query.pair_id) for query in split.queries]
    missing = [key for key in expected if key not in entries]
    if missing:
        raise SubmissionError(f"{what}: field {missing[0]!r} is missing ({len(missing)} of {len(expected)} "
                              f"{split.dataset} {split.split} queries have no ranking)")
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise SubmissionError(f"{what}: field {extra[0]!r} is not a query id of {split.dataset} {split.split}")


def _check_list(value: Any, kind: type, desc: str, length: int, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise SubmissionError(f"{where}: must be a list of {desc}, got {json.dumps(value)[:60]}")
    if len(value) != length:
        raise SubmissionError(f"{where}: holds {len(value)} {desc}, expected exactly {length}")
    if len(set(value)) != len(value):
        duplicate = next(v for i, v in enumerate(value) if v in value[:i])
        raise SubmissionError(f"{where}: lists {duplicate!r} more than once")
    return value
