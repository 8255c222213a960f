"""95 % bootstrap intervals over queries for benchmark metrics and for differences between methods.

A recall on 300 queries moves by a third of a point per query, so "method A beats method B" is a
finding only when the difference survives resampling the queries. Resampling here is

* **paired**: both methods are scored on the same resampled queries, so the interval of a
  difference reflects the queries on which they disagree, not each method's own spread;
* **stratified**: queries are resampled within their split and the split means are averaged, as
  the FashionIQ number is the mean of its three categories (other benchmarks have one split).

Intervals are percentile intervals of ``n_resamples`` resampled means (seeded, so a notebook prints
the same interval every time it sees the same per-query values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

N_RESAMPLES = 2000
LEVEL = 0.95
VERDICTS = ("holds", "within noise", "reversed")

# Headline numbers that are means of two per-query metrics (CLIP4Cir's FashionIQ "average",
# CIRR's "avg" = (R@5 + Rsubset@1) / 2), so their intervals can be resampled like any other.
DERIVED = {"average": ("R@10", "R@50"), "avg": ("R@5", "Rsubset@1")}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval, in the metric's units (percent)."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.1f} [{self.low:.1f}, {self.high:.1f}]"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def verdict(self) -> str:
        """For a difference "ours minus theirs" that a claim expects positive: where the interval lies."""
        return VERDICTS[0] if self.low > 0 else VERDICTS[2] if self.high < 0 else VERDICTS[1]


@dataclass(frozen=True)
class PerQuery:
    """Per-query values of every metric of one benchmark, with the split each query belongs to.

    ``values[metric]`` is a ``[Q]`` array in percent whose stratified mean is the benchmark number
    (e.g. ``"R@10"``, ``"average"``); ``strata[q]`` indexes the query's split. Two results can be
    compared only when they score the same queries in the same order.
    """

    values: Mapping[str, np.ndarray]
    strata: np.ndarray
    names: tuple[str, ...] = ()  # the split of each stratum, when known

    @classmethod
    def from_splits(cls, per_split: Mapping[str, Mapping[str, Sequence[float]]]) -> PerQuery:
        """Concatenate ``{split: {metric: per-query values}}`` and add the derived headline metrics."""
        if not per_split:
            raise ValueError("no splits to concatenate")
        metrics = [set(m) for m in per_split.values()]
        common = set.intersection(*metrics)
        if any(m != common for m in metrics):
            raise ValueError(f"splits report different metrics: { {s: sorted(m) for s, m in per_split.items()} }")
        values = {k: np.concatenate([np.asarray(m[k], dtype=np.float64) for m in per_split.values()])
                  for k in sorted(common)}
        for name, (a, b) in DERIVED.items():
            if a in values and b in values:
                values[name] = (values[a] + values[b]) / 2
        sizes = [len(next(iter(m.values()))) for m in per_split.values()]
        return cls(values, np.repeat(np.arange(len(sizes)), sizes), tuple(per_split))

    def split(self, name: str) -> PerQuery:
        """The queries of one split only (a FashionIQ category), for per-category intervals and claims."""
        if name not in self.names:
            raise KeyError(f"split {name!r} not among {list(self.names)}")
        keep = self.strata == self.names.index(name)
        return PerQuery({k: v[keep] for k, v in self.values.items()}, np.zeros(int(keep.sum()), dtype=int), (name,))

    def subset(self, keep: np.ndarray | Sequence[bool]) -> PerQuery:
        """The queries the boolean mask ``keep`` selects, each still in its split's stratum: a group of
        queries (an edit type, a kind of triplet) keeps its splits' weights in the mean."""
        keep = np.asarray(keep)
        if keep.dtype != bool or keep.shape != self.strata.shape:
            raise ValueError(f"keep must be a boolean mask of the {len(self.strata)} queries, "
                             f"got {keep.dtype} of shape {keep.shape}")
        return PerQuery({k: v[keep] for k, v in self.values.items()}, self.strata[keep], self.names)

    def _metric(self, metric: str) -> np.ndarray:
        if metric not in self.values:
            raise KeyError(f"metric {metric!r} not computed; available: {sorted(self.values)}")
        return self.values[metric]

    def mean(self, metric: str) -> float:
        """The benchmark number: the metric's mean per split, averaged over the splits."""
        return float(_stratified_means(self._metric(metric)[None], self.strata, None)[0, 0])

    def interval(self, metric: str, seed: int = 0) -> Interval:
        """The metric with its 95 % interval over resampled queries."""
        return _interval(self._metric(metric), self.strata, seed)

    def difference(self, other: PerQuery, metric: str, seed: int = 0) -> Interval:
        """``self - other`` on ``metric``, paired over the same resampled queries."""
        if not np.array_equal(self.strata, other.strata):
            raise ValueError("the two results score different queries; a paired difference needs the same ones")
        return _interval(self._metric(metric) - other._metric(metric), self.strata, seed)


def _stratified_means(values: np.ndarray, strata: np.ndarray, samples: list[np.ndarray] | None) -> np.ndarray:
    """``[M, R]`` means of ``values [M, Q]``: per stratum over the sampled queries, then averaged."""
    per_stratum = []
    for s, stratum in enumerate(np.unique(strata)):
        columns = values[:, strata == stratum]
        picked = columns[:, samples[s]] if samples is not None else columns[:, None, :]
        per_stratum.append(picked.mean(axis=-1))
    return np.mean(per_stratum, axis=0)


def _interval(values: np.ndarray, strata: np.ndarray, seed: int) -> Interval:
    if values.ndim != 1 or len(values) != len(strata) or len(values) == 0:
        raise ValueError(f"expected one value per query, got shape {values.shape} for {len(strata)} queries")
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, n, size=(N_RESAMPLES, n)) for n in np.unique(strata, return_counts=True)[1]]
    resampled = _stratified_means(values[None], strata, samples)[0]
    low, high = np.quantile(resampled, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    estimate = _stratified_means(values[None], strata, None)[0, 0]
    return Interval(float(estimate), float(low), float(high))


Label = tuple[str, ...]
"""A result's key: ``(benchmark, *what)``, e.g. ``("cirr", "both", "Combiner")``."""


NOT_REVERSED = "not reversed"
"""``Claim.asserted`` for an ordering a full run requires only not to reverse: it held, or was level,
by too little at its interval's lower end to survive another arithmetic path (mixed precision, another CPU)."""


@dataclass(frozen=True)
class Claim:
    """A paper's ordering, "``better`` beats ``worse`` on ``metric``", checked on one benchmark.

    ``better`` and ``worse`` label results within ``benchmark``. ``asserted`` says what a notebook's
    full run requires of it (:func:`check_asserted`): True, that it holds beyond its interval (those
    that did so with a margin when the course was run); :data:`NOT_REVERSED`, only that its interval
    is not wholly below zero; False, nothing (it is printed with its interval).
    """

    benchmark: str
    better: Label
    worse: Label
    metric: str
    asserted: bool | Literal["not reversed"] = False

    def __post_init__(self) -> None:
        if self.asserted not in (True, False, NOT_REVERSED):
            raise ValueError(f"asserted is True, False or {NOT_REVERSED!r}, got {self.asserted!r}")

    @property
    def name(self) -> str:
        return f"{' + '.join(self.better)} > {' + '.join(self.worse)}"


def _row_keys(claims: Sequence[Claim]) -> list[tuple[str, str]]:
    """``(benchmark, name)`` per claim, the name carrying the metric where one benchmark checks the same
    ordering on several metrics, so that no row of a claims table replaces another."""
    seen: set[tuple[str, str, str]] = set()
    for claim in claims:
        if (claim.benchmark, claim.name, claim.metric) in seen:
            raise ValueError(f"claim {claim.name!r} on {claim.benchmark} {claim.metric} is listed twice")
        seen.add((claim.benchmark, claim.name, claim.metric))
    plain = [(c.benchmark, c.name) for c in claims]
    return [(c.benchmark, f"{c.name} ({c.metric})" if plain.count(key) > 1 else c.name)
            for c, key in zip(claims, plain)]


def claims_table(claims: Sequence[Claim], results: Mapping[Label, PerQuery], seed: int = 0) -> pd.DataFrame:
    """One row per claim: both sides with intervals, the paired difference and the verdict.

    The verdict is *holds* when the whole interval of ``better - worse`` is above zero,
    *reversed* when it is below, *within noise* otherwise. Rows are keyed by benchmark and claim name;
    an ordering checked on several metrics of one benchmark is named with its metric on each row
    (``"text > image (R@1)"``), so no row replaces another. The same claim twice is an error.
    """
    rows = {}
    for claim, key in zip(claims, _row_keys(claims)):
        better, worse = results[(claim.benchmark, *claim.better)], results[(claim.benchmark, *claim.worse)]
        diff = better.difference(worse, claim.metric, seed)
        rows[key] = {
            "metric": claim.metric,
            "better": str(better.interval(claim.metric, seed)),
            "worse": str(worse.interval(claim.metric, seed)),
            "difference": diff.estimate,
            "95% low": diff.low,
            "95% high": diff.high,
            "verdict": diff.verdict(),
            "asserted": claim.asserted,
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["benchmark", "claim"])


def verdicts_line(claims: pd.DataFrame) -> str:
    """A claims table's verdicts in one sentence for a notebook's summary: ``"a > b (cirr R@1): holds; ..."``.

    A claim whose name already carries its metric (see :func:`claims_table`) is followed by its benchmark
    alone, so the metric is not said twice.
    """
    return "; ".join(
        f"{name} ({benchmark}{'' if name.endswith(f'({row.metric})') else ' ' + row.metric}): {row.verdict}"
        for (benchmark, name), row in claims.iterrows())


def check_asserted(claims: pd.DataFrame) -> None:
    """Fail, naming each one, when a claim of :func:`claims_table` (or :func:`seed_claims_table`) asserted
    to hold does not hold beyond its interval, or one asserted :data:`NOT_REVERSED` is reversed."""
    asserted = claims["asserted"]
    not_reversed = asserted.map(lambda a: a == NOT_REVERSED)
    must_hold = asserted.map(lambda a: not isinstance(a, str) and bool(a))
    verdict = claims["verdict"]
    failed = claims[(must_hold & (verdict != VERDICTS[0])) | (not_reversed & (verdict == VERDICTS[2]))]
    if len(failed):
        lines = [f"  {b}: {c} on {r['metric']}: difference {r['difference']:.2f} "
                 f"[{r['95% low']:.2f}, {r['95% high']:.2f}] ({r['verdict']}; asserted: "
                 f"{NOT_REVERSED if r['asserted'] == NOT_REVERSED else 'holds'})" for (b, c), r in failed.iterrows()]
        raise AssertionError("paper orderings that no longer meet what a full run asserts:\n" + "\n".join(lines))


def interval_table(
    results: Mapping[Label, PerQuery], metrics: Mapping[str, Sequence[str]], seed: int = 0
) -> pd.DataFrame:
    """``"estimate [low, high]"`` strings: rows = result labels without the benchmark, columns =
    ``"<benchmark> <metric>"`` for the ``metrics`` of each benchmark."""
    columns: dict[str, dict[str | Label, str]] = {}
    for (benchmark, *label), result in results.items():
        row = label[0] if len(label) == 1 else tuple(label)
        for metric in metrics.get(benchmark, ()):
            columns.setdefault(f"{benchmark} {metric}", {})[row] = str(result.interval(metric, seed))
    return pd.DataFrame(columns)


# ----------------------------------------------------------------------------- training seeds

SeedResults = Mapping[int, PerQuery]
"""One method's per-query values for each training seed (seed -> result), all on the same queries."""


def mean_over_seeds(results: SeedResults) -> PerQuery:
    """Per-query values averaged over the training seeds: a query hit by two of three seeds' models scores
    2/3 of a hit. Its stratified mean is the mean over seeds of the benchmark numbers, and its bootstrap
    interval resamples queries for the seed-averaged model."""
    runs = list(results.values())
    if not runs:
        raise ValueError("no seeds to average")
    first = runs[0]
    for run in runs[1:]:
        if not np.array_equal(run.strata, first.strata) or set(run.values) != set(first.values):
            raise ValueError("the seeds' results score different queries or metrics; they cannot be averaged")
    values = {k: np.mean([run.values[k] for run in runs], axis=0) for k in first.values}
    return PerQuery(values, first.strata, first.names)


def seed_table(
    results: Mapping[Label, SeedResults], metrics: Mapping[str, Sequence[str]], label_names: Sequence[str] = ("label",)
) -> pd.DataFrame:
    """Each result's benchmark number for every training seed, with their mean and sample standard deviation.

    Rows ``(benchmark, metric, *label)`` for the ``metrics`` of each benchmark, the label's levels named
    ``label_names``; columns ``seed <s>`` in seed order, ``mean`` and ``std`` (ddof = 1: the spread one
    more seed would show; 0 for a single seed).
    """
    rows = {}
    bad = [key for key in results if len(key) != 1 + len(label_names)]
    if bad:
        raise ValueError(f"labels {bad[:3]} do not match the level names {tuple(label_names)}")
    benchmarks = dict.fromkeys(key[0] for key in results)  # in order of appearance
    for benchmark, metric in ((b, m) for b in benchmarks for m in metrics.get(b, ())):
        for (_, *label), by_seed in ((k, v) for k, v in results.items() if k[0] == benchmark):
            values = {f"seed {s}": run.mean(metric) for s, run in sorted(by_seed.items())}
            spread = np.asarray(list(values.values()))
            rows[(benchmark, metric, *label)] = {**values, "mean": float(spread.mean()),
                                                 "std": _std(spread)}
    if not rows:
        raise ValueError("no results for the metrics asked")
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["benchmark", "metric", *label_names])


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1), 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def seed_claims_table(claims: Sequence[Claim], results: Mapping[Label, SeedResults], seed: int = 0) -> pd.DataFrame:
    """:func:`claims_table` for methods trained with several seeds: judged by the seed spread *and* the bootstrap.

    For each claim, ``better`` and ``worse`` must have been run with the same seeds (a method without
    training simply repeats its one result). Columns, all numbers so that tables compare within tolerances:
    each side's mean and standard deviation over seeds; ``per seed``, the paired difference of each seed
    (``better`` seed *s* minus ``worse`` seed *s*); ``seeds ahead``, in how many seeds ``better`` scored
    higher, and ``seeds holding``, in how many that seed's own paired bootstrap interval lies above zero;
    ``difference``, the mean of the per-seed differences (= the difference of the seed-averaged models),
    its ``seed std``, and the 95 % paired bootstrap interval of the seed-averaged models' difference
    (:func:`mean_over_seeds`). The ``verdict`` is *holds* only when both say so: the interval lies above
    zero **and** ``better`` is ahead in every seed; *reversed* when the interval lies below zero and
    ``better`` is behind in every seed; *within noise* otherwise. :func:`check_asserted` reads it like any
    claims table, and names its rows as :func:`claims_table` does.
    """
    rows = {}
    for claim, key in zip(claims, _row_keys(claims)):
        better, worse = results[(claim.benchmark, *claim.better)], results[(claim.benchmark, *claim.worse)]
        if sorted(better) != sorted(worse):
            raise ValueError(f"{claim.name}: seeds {sorted(better)} against {sorted(worse)}; pair the same seeds")
        seeds = sorted(better)
        per_seed = [better[s].mean(claim.metric) - worse[s].mean(claim.metric) for s in seeds]
        verdicts = [better[s].difference(worse[s], claim.metric, seed).verdict() for s in seeds]
        diff = mean_over_seeds(better).difference(mean_over_seeds(worse), claim.metric, seed)
        ahead = sum(d > 0 for d in per_seed)
        behind = sum(d < 0 for d in per_seed)
        verdict = (VERDICTS[0] if diff.low > 0 and ahead == len(seeds) else
                   VERDICTS[2] if diff.high < 0 and behind == len(seeds) else VERDICTS[1])
        better_values = [better[s].mean(claim.metric) for s in seeds]
        worse_values = [worse[s].mean(claim.metric) for s in seeds]
        rows[key] = {
            "metric": claim.metric,
            "better mean": float(np.mean(better_values)),
            "better std": _std(better_values),
            "worse mean": float(np.mean(worse_values)),
            "worse std": _std(worse_values),
            "per seed": ", ".join(f"{d:+.2f}" for d in per_seed),
            "seeds ahead": ahead,
            "seeds holding": sum(v == VERDICTS[0] for v in verdicts),
            "difference": float(np.mean(per_seed)),
            "seed std": _std(per_seed),
            "95% low": diff.low,
            "95% high": diff.high,
            "verdict": verdict,
            "asserted": claim.asserted,
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["benchmark", "claim"])
