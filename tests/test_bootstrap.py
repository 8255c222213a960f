"""Bootstrap intervals: exact values on degenerate inputs, coverage, pairing and stratification."""

from __future__ import annotations

import numpy as np
import pytest

from cirlib.evaluation.bootstrap import Claim, Interval, PerQuery, check_asserted, claims_table, interval_table


def _single(values) -> PerQuery:
    return PerQuery.from_splits({"val": {"R@1": values}})


def test_constant_values_have_a_zero_width_interval() -> None:
    interval = _single([100.0] * 7).interval("R@1")
    assert (interval.estimate, interval.low, interval.high) == (100.0, 100.0, 100.0)
    assert str(interval) == "100.0 [100.0, 100.0]"


def test_interval_of_a_recall_matches_the_binomial_width() -> None:
    """400 queries, 100 hits: mean 25 %, normal-approximation half width 1.96 * sqrt(.25 * .75 / 400) = 4.24 points."""
    values = np.array([100.0] * 100 + [0.0] * 300)
    interval = _single(values).interval("R@1")
    assert interval.estimate == pytest.approx(25.0)
    assert interval.low < 25.0 < interval.high
    assert interval.half_width == pytest.approx(4.24, abs=0.5)


def test_interval_is_seeded() -> None:
    values = np.random.default_rng(1).integers(0, 2, 50) * 100.0
    assert _single(values).interval("R@1", seed=3) == _single(values).interval("R@1", seed=3)


def test_paired_difference_sees_only_disagreements() -> None:
    """B = A except on 10 of 300 queries where only A hits: the difference is +3.3 and clearly positive,
    although each method's own interval (about ±5 points) overlaps the other's."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300) * 100.0
    a[:10] = 100.0
    b = a.copy()
    b[:10] = 0.0
    ra, rb = _single(a), _single(b)
    diff = ra.difference(rb, "R@1")
    assert diff.estimate == pytest.approx(10 / 3)
    assert diff.low > 0 and diff.verdict() == "holds"
    assert rb.difference(ra, "R@1").verdict() == "reversed"
    assert ra.difference(ra, "R@1").verdict() == "within noise"
    assert ra.interval("R@1").low < rb.interval("R@1").high  # unpaired intervals overlap


def test_strata_are_averaged_like_fashioniq_categories() -> None:
    """Two categories of different sizes: the benchmark number is the mean of category means."""
    result = PerQuery.from_splits({
        "dress": {"R@10": [100.0, 0.0], "R@50": [100.0, 100.0]},
        "shirt": {"R@10": [0.0] * 6, "R@50": [100.0] * 6},
    })
    assert result.strata.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert result.mean("R@10") == pytest.approx(25.0)  # (50 + 0) / 2, not 1 / 8
    assert result.mean("average") == pytest.approx((25.0 + 100.0) / 2)  # derived per query
    interval = result.interval("R@10")
    assert interval.estimate == pytest.approx(25.0) and 0.0 <= interval.low <= 25.0 <= interval.high <= 50.0


def test_one_split_of_a_result() -> None:
    result = PerQuery.from_splits({"dress": {"R@10": [100.0, 0.0]}, "shirt": {"R@10": [0.0, 0.0, 100.0]}})
    dress, shirt = result.split("dress"), result.split("shirt")
    assert dress.mean("R@10") == pytest.approx(50.0) and shirt.mean("R@10") == pytest.approx(100 / 3)
    assert shirt.names == ("shirt",) and shirt.strata.tolist() == [0, 0, 0]
    assert dress.difference(result.split("dress"), "R@10").estimate == 0.0
    with pytest.raises(KeyError, match="toptee"):
        result.split("toptee")


def test_cirr_avg_is_derived_per_query() -> None:
    result = PerQuery.from_splits({"cirr": {"R@5": [100.0, 0.0], "Rsubset@1": [0.0, 0.0], "R@1": [0.0, 0.0]}})
    assert result.values["avg"].tolist() == [50.0, 0.0]


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="different metrics"):
        PerQuery.from_splits({"a": {"R@1": [1.0]}, "b": {"R@5": [1.0]}})
    with pytest.raises(KeyError, match="R@5"):
        _single([1.0]).interval("R@5")
    with pytest.raises(ValueError, match="different queries"):
        _single([1.0, 0.0]).difference(_single([1.0]), "R@1")


def test_claims_and_interval_tables() -> None:
    a = _single([100.0] * 30 + [0.0] * 70)
    b = _single([0.0] * 100)
    results = {("cirr", "a"): a, ("cirr", "b"): b}
    claims = claims_table(
        [Claim("cirr", ("a",), ("b",), "R@1", asserted=True), Claim("cirr", ("b",), ("a",), "R@1")], results
    )
    assert claims.loc[("cirr", "a > b"), "verdict"] == "holds"
    assert claims.loc[("cirr", "b > a"), "verdict"] == "reversed"
    assert claims.loc[("cirr", "a > b"), "difference"] == pytest.approx(30.0)
    assert claims.loc[("cirr", "a > b"), "better"].startswith("30.0 [")
    check_asserted(claims)  # the reversed claim is printed, not asserted
    claims.loc[("cirr", "b > a"), "asserted"] = True
    with pytest.raises(AssertionError, match=r"cirr: b > a on R@1: difference -30.00"):
        check_asserted(claims)
    table = interval_table(results, {"cirr": ["R@1"], "fashioniq": ["R@10"]})
    assert list(table.columns) == ["cirr R@1"] and table.loc["b", "cirr R@1"] == "0.0 [0.0, 0.0]"
    assert Interval(1.0, -1.0, 2.0).verdict() == "within noise"
