"""Record the quick-mode result tables of the notebooks and the tolerances their tests allow.

The notebook tests (``tests/test_notebook_results.py``) compare the tables a quick run writes to
``data/quick/figures/`` with the copies recorded here, number by number, within tolerances sized
from a measurement: the same quick run repeated under other arithmetic set-ups (fp32 instead of
mixed precision, other torch thread counts), which move the numbers as another CPU, GPU or
library build would. ``make refs`` runs both steps::

    python tests/notebooks/record_results.py reference   # copy the tables of the run just made
    python tests/notebooks/record_results.py spread      # re-run under SETUPS, write tolerances.json

Rule: a column's tolerance is ``SAFETY`` times the larger of its own measured spread and half the
largest spread of its table (a column that happened not to move on this machine may move on
another), at least ``FLOOR``. Tables and columns that only depend on the generated data and on
deterministic arithmetic (counts, visible-area ratios) get ``FLOOR``: they must match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK_FIGURES = ROOT / "data" / "quick" / "figures"
EXPECTED = ROOT / "tests" / "notebooks" / "expected"
TOLERANCES = ROOT / "tests" / "notebooks" / "tolerances.json"

# Arithmetic set-ups that each change the numbers of a quick run (the reference is the default).
SETUPS: dict[str, dict[str, str]] = {
    "fp32": {"CIRLIB_PRECISION": "fp32"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "fp32, 1 thread": {"CIRLIB_PRECISION": "fp32", "OMP_NUM_THREADS": "1"},
    "3 threads": {"OMP_NUM_THREADS": "3"},
}
SAFETY = 2.0
FLOOR = 1e-3  # tables are written with 4 decimals
EXACT_TABLES = {"01_split_statistics", "01_semantic_aspects", "03_visible_area"}
EXACT_COLUMNS = {"classes", "images", "chance %", "target %"}


def read_grid(path: Path) -> list[list[str]]:
    """A CSV as a grid of strings: headers, index labels and values alike."""
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.reader(f)]


def numbers_in(cell: str) -> list[float] | None:
    """The numbers a cell holds: one for a value, three for an interval "12.3 [10.1, 14.0]", None for text."""
    parts = cell.replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    return values if len(values) in (1, 3) and len(parts) == len(values) else None


def column_spreads(reference: list[list[str]], others: list[list[list[str]]]) -> list[float]:
    """Per column, the largest absolute difference of any number between the reference and a set-up."""
    spreads = [0.0] * len(reference[0])
    for grid in others:
        if len(grid) != len(reference) or any(len(a) != len(b) for a, b in zip(grid, reference)):
            raise SystemExit("a set-up produced a table of another shape: the layout must not depend on arithmetic")
        for row_ref, row in zip(reference, grid):
            for j, (a, b) in enumerate(zip(row_ref, row)):
                na, nb = numbers_in(a), numbers_in(b)
                if na is not None and nb is not None and len(na) == len(nb):
                    spreads[j] = max(spreads[j], *(abs(x - y) for x, y in zip(na, nb)))
    return spreads


def tolerances(name: str, header: list[str], spreads: list[float]) -> list[float]:
    if name in EXACT_TABLES:
        return [FLOOR] * len(spreads)
    table = max(spreads, default=0.0)
    return [FLOOR if h in EXACT_COLUMNS else max(FLOOR, SAFETY * max(s, table / 2)) for h, s in zip(header, spreads)]


def run_quick_notebooks(env: dict[str, str], out: Path) -> None:
    """Execute every notebook in quick mode from a clean data/quick under ``env``; keep its tables in ``out``."""
    shutil.rmtree(ROOT / "data" / "quick", ignore_errors=True)
    papermill = Path(sys.executable).parent / "papermill"
    with tempfile.TemporaryDirectory() as scratch:
        for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            print(f"== {nb.name} ({env})", flush=True)
            subprocess.run([str(papermill), str(nb), str(Path(scratch) / nb.name), "-k", "cirlib", "--cwd",
                            str(ROOT / "notebooks"), "-p", "quick", "True", "--log-level", "WARNING"],
                           env=os.environ | env, check=True)
    out.mkdir(parents=True, exist_ok=True)
    for csv in QUICK_FIGURES.glob("*.csv"):
        shutil.copy2(csv, out / csv.name)


def record_reference() -> None:
    shutil.rmtree(EXPECTED, ignore_errors=True)
    EXPECTED.mkdir(parents=True)
    for csv in sorted(QUICK_FIGURES.glob("*.csv")):
        shutil.copy2(csv, EXPECTED / csv.name)
    print(f"recorded {len(list(EXPECTED.glob('*.csv')))} tables in {EXPECTED.relative_to(ROOT)}")


def record_spread() -> None:
    with tempfile.TemporaryDirectory() as work:
        runs = {}
        for label, env in SETUPS.items():
            runs[label] = Path(work) / label.replace(" ", "_").replace(",", "")
            run_quick_notebooks(env, runs[label])
        tables = {}
        for ref in sorted(EXPECTED.glob("*.csv")):
            reference = read_grid(ref)
            spreads = column_spreads(reference, [read_grid(run / ref.name) for run in runs.values()])
            header = reference[0]
            tols = tolerances(ref.stem, header, spreads)
            tables[ref.stem] = {"columns": header, "spread": spreads, "tolerance": tols}
            if ref.stem in EXACT_TABLES and any(spreads):
                raise SystemExit(f"{ref.stem} is meant to be machine-independent but moved by {max(spreads)}")
    shutil.rmtree(ROOT / "data" / "quick", ignore_errors=True)  # the next test run starts from the default set-up
    TOLERANCES.write_text(json.dumps({
        "setups": SETUPS, "safety": SAFETY, "floor": FLOOR, "exact_tables": sorted(EXACT_TABLES),
        "exact_columns": sorted(EXACT_COLUMNS), "tables": tables}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {TOLERANCES.relative_to(ROOT)} from {len(SETUPS)} set-ups")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["reference", "spread"])
    args = parser.parse_args()
    record_reference() if args.step == "reference" else record_spread()
