"""The numbers of the quick-mode notebook runs, checked with tolerances instead of digit for digit.

nbval (``make test``) executes every notebook in quick mode and compares its outputs with the
references in ``tests/notebooks/`` after masking numbers (``sanitize.cfg``): their arithmetic
depends on the machine. The tables those runs write to ``data/quick/figures/`` are checked here:

* against the values recorded by ``make refs`` (``tests/notebooks/expected/``), each within the
  tolerance of its column (``tests/notebooks/tolerances.json``, sized by
  ``tests/notebooks/record_results.py`` from the spread of quick runs under other arithmetic);
* by invariants that hold on any machine and that a bug breaks (ranges, a combination that must
  differ from its parts, the reference image never retrieved in CIRR).

These tests run after the notebooks (``conftest.py`` orders them) and only read what the notebooks
wrote during this session; without ``--nbval`` they are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "notebooks"))
from record_results import EXPECTED, FLOOR, QUICK_FIGURES, TOLERANCES, compare_grids, numbers_in, read_grid, tolerances  # noqa: E402

TABLES = sorted(p.stem for p in EXPECTED.glob("*.csv"))
NOTEBOOKS = {p.name[:2]: p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
REGENERATE = "If the change is intended, regenerate the references with `make refs` and commit them."


def _fresh_table(name: str, request: pytest.FixtureRequest, session_start: float) -> Path:
    """The table the quick run of this session wrote (not one left from an earlier run)."""
    path = QUICK_FIGURES / f"{name}.csv"
    if path.exists() and path.stat().st_mtime >= session_start:
        return path
    if request.config.getoption("nbval", default=False):
        notebook = NOTEBOOKS.get(name[:2], name)
        pytest.fail(f"{notebook} did not write {path.name} in this run: see its nbval failure above")
    pytest.skip("the quick-mode notebooks did not run in this session (they run under `make test` / `make nbtest`)")


def test_every_recorded_table_has_tolerances() -> None:
    tables = json.loads(TOLERANCES.read_text(encoding="utf-8"))["tables"]
    assert TABLES and sorted(tables) == TABLES, "run `make refs`: expected tables and tolerances are out of step"
    for name in TABLES:
        assert tables[name]["columns"] == read_grid(EXPECTED / f"{name}.csv")[0], name


@pytest.mark.parametrize("name", TABLES)
def test_quick_results_match_the_recorded_ones(name: str, request: pytest.FixtureRequest, session_start: float) -> None:
    got = read_grid(_fresh_table(name, request, session_start))
    expected = read_grid(EXPECTED / f"{name}.csv")
    tolerance = json.loads(TOLERANCES.read_text(encoding="utf-8"))["tables"][name]["tolerance"]
    moved = compare_grids(expected, got, tolerance)
    assert not moved, (f"{NOTEBOOKS.get(name[:2], name)}, table {name}: {len(moved)} value(s) moved\n  "
                       + "\n  ".join(moved) + f"\n{REGENERATE}")


def test_compare_grids_reports_what_moved_and_by_how_much() -> None:
    expected = [["method", "R@1", "interval", "verdict"], ["sum", "20.0000", "20.0 [10.0, 30.0]", "holds"]]
    assert compare_grids(expected, [r[:] for r in expected], [0.0] * 4) == []
    within = [expected[0], ["sum", "24.0000", "21.0 [11.0, 31.0]", "within noise"]]
    assert compare_grids(expected, within, [0.0, 5.0, 1.5, 0.0]) == []  # verdicts may differ
    found = [expected[0], ["sum", "26.0000", "20.0 [10.0, 33.0]", "holds"]]
    moved = compare_grids(expected, found, [0.0, 5.0, 1.5, 0.0])
    assert moved == ["row 'sum', column 'R@1': expected 20 ± 5, got 26 (moved +6)",
                     "row 'sum', column 'interval': expected 30 ± 1.5, got 33 (moved +3)"]
    renamed = compare_grids(expected, [expected[0], ["text", *expected[1][1:]]], [1.0] * 4)
    assert renamed == ["row 'sum', column 'method': 'sum' became 'text'"]
    assert compare_grids(expected, expected[:1], [1.0] * 4)[0].startswith("shape changed")


def test_tolerance_rule() -> None:
    """Exact tables and columns at the floor; others at their kind's floor unless the measured spread is larger."""
    header = ["method", "R@1", "R@50", "images"]
    grid = [header, ["sum", "20.0", "80.0", "343"]]
    assert tolerances("05_main_table", header, [0.0, 10.0, 0.0, 0.0], grid) == [15.0, 20.0, 15.0, FLOOR]
    fractions = [header, ["sum", "0.2", "0.4", "343"]]
    assert tolerances("05_similarity_gaps", header, [0.0] * 4, fractions) == [0.1, 0.1, 0.1, FLOOR]
    assert tolerances("03_visible_area", header, [0.0, 1.0, 0.0, 0.0], grid) == [FLOOR] * 4
    assert numbers_in("12.3 [10.1, 14.0]") == [12.3, 10.1, 14.0]
    assert numbers_in("within noise") is None and numbers_in("R@10") is None and numbers_in("-2.5") == [-2.5]


def _table(
    name: str, request: pytest.FixtureRequest, session_start: float, index_cols: int | list[int] = 0
) -> pd.DataFrame:
    return pd.read_csv(_fresh_table(name, request, session_start), index_col=index_cols)


def test_metrics_are_percentages(request: pytest.FixtureRequest, session_start: float) -> None:
    for name in ("02_zero_shot_baselines", "03_retrieval_by_preprocessing", "04_sum_rows", "05_main_table",
                 "06_combiner_variants", "06_two_stage_vs_end_to_end", "06_preprocessing_trained"):
        table = pd.read_csv(_fresh_table(name, request, session_start))
        values = table.select_dtypes("number")
        assert ((values >= 0) & (values <= 100)).all().all(), f"{name}: a metric outside [0, 100]"


def test_the_sum_differs_from_each_modality(request: pytest.FixtureRequest, session_start: float) -> None:
    """The image+text sum must use both inputs: identical to image-only or text-only on every metric
    means one was dropped."""
    baselines = _table("02_zero_shot_baselines", request, session_start)
    for single in ("image", "text"):
        assert (baselines.loc["sum"] - baselines.loc[single]).abs().max() > 0, (
            f"02_backbone: the sum baseline scores exactly like {single}-only on every metric")


def test_cirr_never_retrieves_the_reference(request: pytest.FixtureRequest, session_start: float) -> None:
    """CIRR's protocol removes the reference image from the ranking. If it stayed, image-only retrieval
    would always rank the reference itself first: R@1 and Rsubset@1 both exactly 0 on every query."""
    baselines = _table("02_zero_shot_baselines", request, session_start)
    image = baselines.loc["image"]
    assert image["cirr R@1"] + image["cirr Rsubset@1"] > 0, (
        "02_backbone: image-only CIRR R@1 and Rsubset@1 are both 0: is the reference still in the ranking?")



def test_reranking_only_reorders_the_top_k(request: pytest.FixtureRequest, session_start: float) -> None:
    """Quick runs re-rank the filter's top 20 of galleries of 120: whether a target is in the top 50
    cannot change, so re-ranked R@50 must equal the filter's, and the filter's coverage can only rise with K."""
    results = _table("08_results", request, session_start)
    for column in ("fashioniq R@50", "cirr R@50"):
        assert results.loc["re-ranked", column] == pytest.approx(results.loc["filter", column]), column
    coverage = pd.read_csv(_fresh_table("08_coverage", request, session_start), header=[0, 1], index_col=0).dropna()
    assert len(coverage) >= 3 and (coverage.diff().dropna() >= 0).all().all(), "08_reranking: coverage fell as K grew"
