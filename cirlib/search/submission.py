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

A ranking is given as in :func:`~cirlib.evaluation.protocols.per_query_metrics`: query and gallery
features whose cosine similarities rank the split's gallery (a method that yields a ``[Q, G]``
score matrix passes it with ``torch.eye(G)`` as gallery features, as
:func:`cirlib.methods.reranking.ranking_features` does). The top-k lists come from
:func:`~cirlib.evaluation.analysis.top_k_names`, the course's one display/candidate order (ties in
gallery order). Where a gallery holds fewer than 50 candidates (the quick benchmarks) a list holds
them all: ``min(50, candidates)`` is the rule the validators apply, 50 on the real datasets.

:func:`write_submissions` is what a notebook calls for a method it trained; the ``validate_*``
functions check any file (or dict) against the rules above and raise :class:`SubmissionError`
naming the offending field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from cirlib.core import artifacts
from cirlib.core.io import write_text
from cirlib.data.datasets import CIRSplit
from cirlib.evaluation.analysis import top_k_names

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


def cirr_recall_submission(split: CIRSplit, query_features: Tensor, gallery_features: Tensor) -> Submission:
    """CIRR's ``recall`` file: each pairid's top 50 of the whole gallery, reference left out."""
    _check_split(split, "cirr")
    names = top_k_names(split, query_features, gallery_features, RECALL_K)
    return _cirr_file("recall", split, names)


def cirr_subset_submission(split: CIRSplit, query_features: Tensor, gallery_features: Tensor) -> Submission:
    """CIRR's ``recall_subset`` file: each pairid's top 3 among its image-set members, reference left out.

    Recall_subset is recall on a gallery of the set's members, so each set is ranked as a gallery of
    its own (members in gallery order, so ties fall as in the full ranking): the lists are the full
    ranking filtered to the members.
    """
    _check_split(split, "cirr")
    position = {name: i for i, name in enumerate(split.gallery)}
    by_set: dict[tuple[int, ...], list[int]] = {}
    for i, query in enumerate(split.queries):
        members = tuple(sorted({position[m] for m in query.group if m in position}))
        by_set.setdefault(members, []).append(i)
    names: list[list[str]] = [[] for _ in split.queries]
    for members, rows in by_set.items():
        if not members:
            continue
        gallery = replace(split, gallery=[split.gallery[m] for m in members])
        ranked = top_k_names(gallery, query_features[rows], gallery_features[list(members)], SUBSET_K, rows)
        for row, ranking in zip(rows, ranked):
            names[row] = ranking
    return _cirr_file("recall_subset", split, names)


def circo_submission(split: CIRSplit, query_features: Tensor, gallery_features: Tensor) -> Submission:
    """CIRCO's file: each query id's top 50 image ids (integers) of the whole index set."""
    _check_split(split, "circo")
    names = top_k_names(split, query_features, gallery_features, RECALL_K)
    return {str(query.pair_id): [int(name) for name in ranking] for query, ranking in zip(split.queries, names)}


def write_submissions(
    quick: bool,
    method: str,
    split: CIRSplit,
    query_features: Tensor,
    gallery_features: Tensor,
    out_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Build, validate and atomically write ``method``'s submission files for a CIRR or CIRCO test split.

    Files go to ``<out_dir or results_dir(quick)/submissions>/<benchmark>/<method slug>.<metric>.json``
    (CIRR: ``.recall`` and ``.recall_subset``; CIRCO: ``.json`` alone), ready to upload to
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
        files = {
            folder / f"{slug}.recall.json": cirr_recall_submission(split, query_features, gallery_features),
            folder / f"{slug}.recall_subset.json": cirr_subset_submission(split, query_features, gallery_features),
        }
    else:
        files = {folder / f"{slug}.json": circo_submission(split, query_features, gallery_features)}
    validate = validate_cirr if split.dataset == "cirr" else validate_circo
    for path, submission in files.items():
        validate(submission, split)
        write_text(path, _dumps(submission))
        validate(path, split)  # the file as the server will read it (size included)
    return list(files)


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
