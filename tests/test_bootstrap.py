"""Bootstrap intervals: exact values on degenerate inputs, coverage, pairing and stratification."""

from __future__ import annotations

import numpy as np
import pytest

from cirlib.evaluation.bootstrap import (
    NOT_REVERSED,
    Claim,
    Interval,
    PerQuery,
    check_asserted,
    claims_table,
    interval_table,
    mean_over_seeds,
    seed_claims_table,
    seed_table,
    verdicts_line,
)


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


def test_a_subset_of_queries_keeps_its_splits_weights() -> None:
    result = PerQuery.from_splits({"dress": {"R@10": [100.0, 0.0, 0.0]}, "shirt": {"R@10": [0.0, 100.0]}})
    part = result.subset(np.array([True, True, False, False, True]))
    assert part.strata.tolist() == [0, 0, 1] and part.names == ("dress", "shirt")
    assert part.mean("R@10") == pytest.approx((50.0 + 100.0) / 2)  # split means averaged, not the 3 queries
    assert result.subset([False, False, False, True, True]).mean("R@10") == pytest.approx(50.0)  # one split left
    with pytest.raises(ValueError, match="boolean mask of the 5 queries"):
        result.subset(np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="boolean mask of the 5 queries"):
        result.subset(np.ones(4, dtype=bool))


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
    with pytest.raises(AssertionError, match=r"cirr: b > a on R@1: difference -30.00 .*\(reversed; asserted: holds\)"):
        check_asserted(claims)
    table = interval_table(results, {"cirr": ["R@1"], "fashioniq": ["R@10"]})
    assert list(table.columns) == ["cirr R@1"] and table.loc["b", "cirr R@1"] == "0.0 [0.0, 0.0]"
    assert Interval(1.0, -1.0, 2.0).verdict() == "within noise"


def test_one_ordering_on_two_metrics_keeps_both_rows() -> None:
    """Keyed by benchmark and name alone, the second metric's row used to replace the first silently."""
    a = PerQuery.from_splits({"val": {"R@1": [100.0] * 30 + [0.0] * 70, "R@5": [100.0] * 40 + [0.0] * 60}})
    b = PerQuery.from_splits({"val": {"R@1": [0.0] * 100, "R@5": [100.0] * 60 + [0.0] * 40}})
    results = {("cirr", "a"): a, ("cirr", "b"): b, ("fashioniq", "a"): a, ("fashioniq", "b"): b}
    claims = claims_table([Claim("cirr", ("a",), ("b",), "R@1"), Claim("cirr", ("a",), ("b",), "R@5"),
                           Claim("fashioniq", ("a",), ("b",), "R@1")], results)
    assert list(claims.index) == [("cirr", "a > b (R@1)"), ("cirr", "a > b (R@5)"), ("fashioniq", "a > b")]
    assert claims.loc[("cirr", "a > b (R@1)"), "verdict"] == "holds"
    assert claims.loc[("cirr", "a > b (R@5)"), "difference"] == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="'a > b' on cirr R@1 is listed twice"):
        claims_table([Claim("cirr", ("a",), ("b",), "R@1"), Claim("cirr", ("a",), ("b",), "R@1", asserted=True)],
                     results)
    seeded = seed_claims_table([Claim("cirr", ("a",), ("b",), "R@1"), Claim("cirr", ("a",), ("b",), "R@5")],
                               {k: {0: v} for k, v in results.items()})
    assert list(seeded.index) == [("cirr", "a > b (R@1)"), ("cirr", "a > b (R@5)")]
    assert verdicts_line(claims) == ("a > b (R@1) (cirr): holds; a > b (R@5) (cirr): reversed; "
                                    "a > b (fashioniq R@1): holds")


def test_not_reversed_claims_fail_only_when_reversed() -> None:
    """``a`` and ``b`` tie within noise (10 hits each, 5 of them the same queries); ``c`` has none."""
    a = _single([100.0] * 10 + [0.0] * 90)
    b = _single([100.0] * 5 + [0.0] * 10 + [100.0] * 5 + [0.0] * 80)
    c = _single([0.0] * 100)
    results = {("cirr", "a"): a, ("cirr", "b"): b, ("cirr", "c"): c}
    level = Claim("cirr", ("a",), ("b",), "R@1", asserted=NOT_REVERSED)
    claims = claims_table([level, Claim("cirr", ("a",), ("c",), "R@1", asserted=NOT_REVERSED)], results)
    assert claims.loc[("cirr", "a > b"), "verdict"] == "within noise"
    assert claims.loc[("cirr", "a > c"), "verdict"] == "holds"
    assert list(claims["asserted"]) == [NOT_REVERSED, NOT_REVERSED]  # the table says what is checked
    check_asserted(claims)  # within noise and holds both pass
    claims = claims_table([level, Claim("cirr", ("c",), ("a",), "R@1", asserted=NOT_REVERSED)], results)
    with pytest.raises(AssertionError, match=r"c > a on R@1: difference -10.00 .*\(reversed; asserted: not reversed\)"):
        check_asserted(claims)
    strict = claims_table([Claim("cirr", ("a",), ("b",), "R@1", asserted=True)], results)
    with pytest.raises(AssertionError, match=r"a > b .*\(within noise; asserted: holds\)"):
        check_asserted(strict)  # the same ordering asserted to hold fails within noise
    with pytest.raises(ValueError, match="asserted is True, False or 'not reversed', got 'yes'"):
        Claim("cirr", ("a",), ("b",), "R@1", asserted="yes")  # type: ignore[arg-type]


def test_mean_over_seeds_averages_each_query() -> None:
    """Three seeds' hits on four queries; the averaged query 0 is hit by two of three: 66.7."""
    runs = {s: PerQuery.from_splits({"dress": {"R@10": v[:2], "R@50": [100.0, 100.0]},
                                     "shirt": {"R@10": v[2:], "R@50": [0.0, 100.0]}})
            for s, v in {0: [100.0, 0.0, 0.0, 100.0], 1: [100.0, 0.0, 0.0, 0.0], 2: [0.0, 0.0, 0.0, 0.0]}.items()}
    mean = mean_over_seeds(runs)
    assert mean.values["R@10"].tolist() == pytest.approx([200 / 3, 0.0, 0.0, 100 / 3])
    assert mean.strata.tolist() == [0, 0, 1, 1] and mean.names == ("dress", "shirt")
    # the benchmark number of the averaged model is the mean of the seeds' numbers: (50, 25, 0) -> 25
    assert [runs[s].mean("R@10") for s in range(3)] == pytest.approx([50.0, 25.0, 0.0])
    assert mean.mean("R@10") == pytest.approx(25.0)
    assert mean.mean("average") == pytest.approx((25.0 + 75.0) / 2)
    with pytest.raises(ValueError, match="no seeds"):
        mean_over_seeds({})
    with pytest.raises(ValueError, match="different queries"):
        mean_over_seeds({0: _single([1.0, 0.0]), 1: _single([1.0])})


def test_seed_table_mean_and_sample_std() -> None:
    """R@1 of 30, 40, 50 over three seeds: mean 40, sample std 10; one seed: std 0."""
    seeds = {s: _single([100.0] * k + [0.0] * (100 - k)) for s, k in {0: 30, 1: 40, 2: 50}.items()}
    results = {("cirr", "combiner"): seeds, ("cirr", "sum"): {0: _single([100.0] * 20 + [0.0] * 80)}}
    table = seed_table(results, {"cirr": ["R@1"], "fashioniq": ["R@10"]}, label_names=["variant"])
    assert table.index.names == ["benchmark", "metric", "variant"]
    row = table.loc[("cirr", "R@1", "combiner")]
    assert [row["seed 0"], row["seed 1"], row["seed 2"]] == pytest.approx([30.0, 40.0, 50.0])
    assert row["mean"] == pytest.approx(40.0) and row["std"] == pytest.approx(10.0)
    one = table.loc[("cirr", "R@1", "sum")]
    assert one["seed 0"] == pytest.approx(20.0) and one["std"] == 0.0 and np.isnan(one["seed 1"])
    with pytest.raises(ValueError, match="level names"):
        seed_table(results, {"cirr": ["R@1"]}, label_names=["a", "b"])
    with pytest.raises(ValueError, match="no results"):
        seed_table(results, {"circo": ["mAP@10"]})


def test_seed_claims_need_the_bootstrap_and_every_seed() -> None:
    """``a`` beats ``b`` by 30 points in every seed: holds. ``c`` beats ``b`` by 30 points on average but
    only ties it in one seed: the seed-averaged interval alone would say holds; the seeds say noise."""
    zero = _single([0.0] * 100)
    hits = {k: _single([100.0] * k + [0.0] * (100 - k)) for k in (0, 25, 30, 35, 45)}
    results = {
        ("cirr", "a"): {0: hits[25], 1: hits[30], 2: hits[35]},
        ("cirr", "b"): {0: zero, 1: zero, 2: zero},
        ("cirr", "c"): {0: hits[45], 1: hits[45], 2: zero},
        ("cirr", "d"): {0: zero, 1: zero},
    }
    claims = seed_claims_table([Claim("cirr", ("a",), ("b",), "R@1", asserted=True),
                                Claim("cirr", ("c",), ("b",), "R@1", asserted=True),
                                Claim("cirr", ("b",), ("a",), "R@1")], results)
    a = claims.loc[("cirr", "a > b")]
    assert a["verdict"] == "holds" and a["seeds ahead"] == 3 and a["seeds holding"] == 3
    assert a["difference"] == pytest.approx(30.0) and a["seed std"] == pytest.approx(5.0)
    assert a["per seed"] == "+25.00, +30.00, +35.00"
    assert (a["better mean"], a["better std"], a["worse mean"], a["worse std"]) == pytest.approx((30.0, 5.0, 0.0, 0.0))
    assert a["95% low"] > 0
    c = claims.loc[("cirr", "c > b")]
    assert c["difference"] == pytest.approx(30.0) and c["95% low"] > 0  # the bootstrap alone: holds
    assert c["seeds ahead"] == 2 and c["seeds holding"] == 2 and c["verdict"] == "within noise"
    assert claims.loc[("cirr", "b > a"), "verdict"] == "reversed"
    with pytest.raises(AssertionError, match=r"c > b on R@1: difference 30.00 .*\(within noise; asserted: holds\)"):
        check_asserted(claims)
    with pytest.raises(ValueError, match="pair the same seeds"):
        seed_claims_table([Claim("cirr", ("a",), ("d",), "R@1")], results)
