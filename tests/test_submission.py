"""Test-server submission files on the hand-written CIRR and CIRCO test fixtures.

Rankings are hand-made score matrices, so every expected file below is computed by hand from them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from cirlib.data import datasets
from cirlib.search import submission as sub
from cirlib.search.submission import (
    SubmissionError,
    circo_submission,
    cirr_recall_submission,
    cirr_subset_submission,
    validate_circo,
    validate_cirr,
    write_submissions,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# tests/fixtures/cirr test1 gallery, in split-file order; both queries' image set is all six.
A, B, C, D, E, F = ("test1-5-0-img0", "test1-5-1-img1", "test1-6-0-img1",
                    "test1-7-2-img0", "test1-8-0-img0", "test1-8-1-img1")
CIRR_SCORES = torch.tensor([
    [0.9, 0.1, 0.5, 0.3, 0.7, 0.2],  # pairid 900, reference A: its best score, left out
    [0.4, 0.8, 0.4, 0.6, 0.1, 0.2],  # pairid 901, reference B; A and C tie (gallery order decides)
])
# tests/fixtures/circo: ids 101..107 on disk (108 is a dead link), queries 0 (reference 103) and 1 (105).
CIRCO_SCORES = torch.tensor([
    [0.1, 0.2, 0.9, 0.3, 0.4, 0.5, 0.6],  # reference 103 is kept: CIRCO ranks the whole index set
    [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
])


@pytest.fixture(scope="module")
def cirr_test() -> datasets.CIRSplit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's blank caption
        return datasets.load_cirr(FIXTURES / "cirr", "test1")


@pytest.fixture(scope="module")
def circo_test() -> datasets.CIRSplit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's dead link
        return datasets.load_circo(FIXTURES / "circo", "test")


@pytest.fixture
def small_sets(cirr_test: datasets.CIRSplit) -> datasets.CIRSplit:
    """The CIRR test fixture with smaller image sets, so the subset is not the whole gallery."""
    groups = [(A, C, D, F), (B, D, E)]
    queries = [dataclasses.replace(q, group=g) for q, g in zip(cirr_test.queries, groups)]
    return dataclasses.replace(cirr_test, queries=queries)


def test_fixture_layout(cirr_test, circo_test):
    assert cirr_test.gallery == [A, B, C, D, E, F]
    assert [q.pair_id for q in cirr_test.queries] == [900, 901]
    assert circo_test.gallery == [str(i) for i in range(101, 108)]
    assert [(q.pair_id, q.reference) for q in circo_test.queries] == [(0, "103"), (1, "105")]


def test_cirr_recall_file_by_hand(cirr_test):
    got = cirr_recall_submission(cirr_test, CIRR_SCORES)
    assert got == {"version": "rc2", "metric": "recall", "900": [E, C, D, F, B], "901": [D, A, C, F, E]}
    assert list(got) == ["version", "metric", "900", "901"]  # the official files' order
    validate_cirr(got, cirr_test)


def test_cirr_subset_file_holds_set_members_only(small_sets):
    got = cirr_subset_submission(small_sets, CIRR_SCORES)
    # 900: members C, D, F (A is the reference) by score 0.5, 0.3, 0.2; 901: D, E (B is the reference).
    assert got == {"version": "rc2", "metric": "recall_subset", "900": [C, D, F], "901": [D, E]}
    validate_cirr(got, small_sets)


def test_subset_is_the_full_ranking_filtered_to_members(small_sets):
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(2, 8, generator=gen), torch.randn(6, 8, generator=gen)
    gallery[5] = gallery[2]  # C and F tie for every query: both orders must break the tie alike
    scores = queries @ gallery.T
    full, subset = cirr_recall_submission(small_sets, scores), cirr_subset_submission(small_sets, scores)
    for q in small_sets.queries:
        key = str(q.pair_id)
        assert subset[key] == [n for n in full[key] if n in q.group][:3]


def test_circo_file_by_hand(circo_test):
    got = circo_submission(circo_test, CIRCO_SCORES)
    assert got == {"0": [103, 107, 106, 105, 104, 102, 101], "1": [101, 102, 103, 104, 105, 106, 107]}
    validate_circo(got, circo_test)


def test_write_submissions_files_are_exact_and_valid(tmp_path, cirr_test, circo_test):
    cirr_paths = write_submissions(True, "Combiner (both)", cirr_test, CIRR_SCORES, tmp_path)
    circo_paths = write_submissions(True, "Combiner (both)", circo_test, CIRCO_SCORES, tmp_path)
    assert cirr_paths == [tmp_path / "cirr" / "combiner-both.recall.json",
                          tmp_path / "cirr" / "combiner-both.recall_subset.json"]
    assert circo_paths == [tmp_path / "circo" / "combiner-both.json"]
    assert cirr_paths[0].read_text() == (
        f'{{"version":"rc2","metric":"recall","900":["{E}","{C}","{D}","{F}","{B}"],'
        f'"901":["{D}","{A}","{C}","{F}","{E}"]}}\n'
    )
    # The fixture's set is the whole gallery: its top 3 are the recall file's first three.
    assert json.loads(cirr_paths[1].read_text()) == {"version": "rc2", "metric": "recall_subset",
                                                      "900": [E, C, D], "901": [D, A, C]}
    assert json.loads(circo_paths[0].read_text()) == {"0": [103, 107, 106, 105, 104, 102, 101],
                                                      "1": [101, 102, 103, 104, 105, 106, 107]}
    for path in cirr_paths:
        validate_cirr(path, cirr_test)
    validate_circo(circo_paths[0], circo_test)


def test_write_submissions_refuses_fashioniq_and_nameless_methods(tmp_path, cirr_test, fixture_splits):
    with pytest.raises(ValueError, match="fashioniq has no test server"):
        write_submissions(True, "sum", fixture_splits["fashioniq/dress"], torch.ones(1, 2), tmp_path)
    with pytest.raises(ValueError, match="no letters or digits"):
        write_submissions(True, " / ", cirr_test, CIRR_SCORES, tmp_path)


def test_lists_are_50_long_on_large_galleries(cirr_test):
    """The real rule: exactly 50 names when the gallery has more than 50 candidates."""
    names = [f"test1-{i}-0-img0" for i in range(60)]
    big = dataclasses.replace(cirr_test, gallery=names, queries=[
        dataclasses.replace(q, reference=names[0], group=tuple(names[:6])) for q in cirr_test.queries])
    scores = torch.arange(60, dtype=torch.float).expand(2, 60)
    recall = cirr_recall_submission(big, scores)
    assert recall["900"] == names[59:9:-1] and len(recall["900"]) == 50
    subset = cirr_subset_submission(big, scores)
    assert subset["901"] == [names[5], names[4], names[3]]
    validate_cirr(recall, big)
    short = dict(recall, **{"900": recall["900"][:49]})
    with pytest.raises(SubmissionError, match="field '900': holds 49 image names, expected exactly 50"):
        validate_cirr(short, big)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("901"), "field '901' is missing"),
    (lambda s: s.update({"902": [A]}), "field '902' is not a query id"),
    (lambda s: s.update(version="rc1"), "field 'version' must be 'rc2'"),
    (lambda s: s.update(metric="recall@50"), "field 'metric' must be one of"),
    (lambda s: s.update({"900": [E, C, D, F]}), "field '900': holds 4 image names, expected exactly 5"),
    (lambda s: s.update({"900": [E, C, D, F, F]}), "field '900': lists 'test1-8-1-img1' more than once"),
    (lambda s: s.update({"900": [E, C, D, F, A]}), "field '900': lists the reference image 'test1-5-0-img0'"),
    (lambda s: s.update({"900": [E, C, D, F, "test1-9-9-img0"]}), "'test1-9-9-img0' is not in the test gallery"),
    (lambda s: s.update({"900": "test1-8-0-img0"}), "field '900': must be a list of image names"),
])
def test_validate_cirr_rejects_malformed_recall_files(cirr_test, change, message):
    bad = cirr_recall_submission(cirr_test, CIRR_SCORES)
    change(bad)
    with pytest.raises(SubmissionError, match=message):
        validate_cirr(bad, cirr_test)


def test_validate_cirr_subset_rejects_non_members(small_sets):
    bad = cirr_subset_submission(small_sets, CIRR_SCORES)
    bad["901"] = [D, A]  # A is in the gallery but not in 901's set
    with pytest.raises(SubmissionError, match=r"field '901': 'test1-5-0-img0' is not in the query's image set"):
        validate_cirr(bad, small_sets)
    bad["901"] = [D, E, C]
    with pytest.raises(SubmissionError, match="field '901': holds 3 image names, expected exactly 2"):
        validate_cirr(bad, small_sets)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("0"), "field '0' is missing"),
    (lambda s: s.update({"2": [101]}), "field '2' is not a query id"),
    (lambda s: s.update({"0": [str(i) for i in s["0"]]}), "field '0': must be a list of integer image ids"),
    (lambda s: s.update({"1": [101, 102, 103, 104, 105, 106, True]}), "field '1': must be a list of integer"),
    (lambda s: s.update({"1": [101, 102, 103, 104, 105, 106, 108]}), "field '1': image id 108 is not in the index"),
    (lambda s: s.update({"1": [101, 101, 103, 104, 105, 106, 107]}), "field '1': lists 101 more than once"),
    (lambda s: s.update({"1": [101]}), "field '1': holds 1 integer image ids, expected exactly 7"),
])
def test_validate_circo_rejects_malformed_files(circo_test, change, message):
    bad = circo_submission(circo_test, CIRCO_SCORES)
    change(bad)
    with pytest.raises(SubmissionError, match=message):
        validate_circo(bad, circo_test)


def test_validate_files_name_the_file(tmp_path, cirr_test, circo_test, monkeypatch):
    path = tmp_path / "sub.json"
    path.write_text('{"version": "rc2",')
    with pytest.raises(SubmissionError, match=f"{path}: invalid JSON at line 1"):
        validate_cirr(path, cirr_test)
    path.write_text("[]")
    with pytest.raises(SubmissionError, match=f"{path}: must be a JSON object keyed by query id"):
        validate_circo(path, circo_test)
    (path,) = write_submissions(True, "sum", circo_test, CIRCO_SCORES, tmp_path)
    with pytest.raises(ValueError, match="expected a cirr split, got circo/test"):
        validate_cirr(path, circo_test)
    monkeypatch.setattr(sub, "CIRR_MAX_BYTES", 100)
    with pytest.raises(SubmissionError, match="over the CIRR server's limit of 100"):
        write_submissions(True, "sum", cirr_test, CIRR_SCORES, tmp_path)


def test_scores_must_match_the_split(cirr_test):
    with pytest.raises(ValueError, match=r"= \[2, 6\] for cirr/test1, got \[2, 5\]"):
        cirr_recall_submission(cirr_test, CIRR_SCORES[:, :5])
    with pytest.raises(ValueError, match="scores contain NaN"):
        cirr_subset_submission(cirr_test, CIRR_SCORES.clone().fill_(float("nan")))
