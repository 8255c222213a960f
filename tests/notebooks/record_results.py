"""Record the quick-mode result tables of the notebooks and the tolerances their tests allow.

The notebook tests (``tests/test_notebook_results.py``) compare the tables a quick run writes to
``data/quick/figures/`` with the copies recorded here, number by number, within tolerances sized
from a measurement: the same quick run repeated under other arithmetic set-ups (fp32 instead of
mixed precision, other torch thread counts), which move the numbers as another CPU, GPU or
library build would. ``make refs`` runs both steps::

    python tests/notebooks/record_results.py reference   # copy the tables of the run just made
    python tests/notebooks/record_results.py spread      # re-run under SETUPS, write tolerances.json

Rule: a column's tolerance is the larger of ``SAFETY`` times its measured spread and a floor for
the kind of number it holds, measured across two real machines: the quick references of an
AVX512-BF16 machine (bf16 mixed precision) against those of an AVX2 machine (fp32). Quick models
train for seconds, so another arithmetic is almost another random seed: percentages moved by up to
four queries' worth (fashion R@10 / R@50 by 5.0 / 6.7 points, CIRCO R@25 by 4 of 12 queries,
zero-shot category accuracy by 6.1 points), similarities and gaps by up to 0.047. The floors allow
six queries of the smallest quick validation split (40 queries: ``PERCENT_FLOOR`` = 15 points) and
twice the similarity shift (``FRACTION_FLOOR``). On the AVX2 machine the kernel set-ups below
moved no number of a quick run (a short training does not amplify last-bit differences), so there
the floors decide; on a machine with native bf16, forcing fp32 moves them and the spread may
decide. Tables and columns that only depend on the generated data and on deterministic arithmetic
(counts, visible-area ratios) get ``FLOOR``: they must match. Teeth beyond the tolerances come
from the invariants in ``tests/test_notebook_results.py`` and from those exact tables.
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

# Arithmetic set-ups that each change the numbers of a quick run (the reference is the default):
# fp32 forced (a change on CPUs with native bf16), another torch thread count, and the kernels of
# another x86 CPU -- oneDNN limited to SSE4.1 and ATen's generic (unvectorised) kernels. On this
# project's AVX2 machine the thread count alone moved no number; the kernel caps move them all.
SETUPS: dict[str, dict[str, str]] = {
    "fp32, 1 thread, SSE4.1 oneDNN": {
        "CIRLIB_PRECISION": "fp32", "OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
    "generic ATen kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "generic ATen + SSE4.1 oneDNN, 1 thread": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                               "OMP_NUM_THREADS": "1"},
}
SAFETY = 2.0
FLOOR = 1e-3  # tables are written with 4 decimals
PERCENT_FLOOR = 15.0
FRACTION_FLOOR = 0.10
EXACT_TABLES = {"01_split_statistics", "01_semantic_aspects", "03_visible_area", "03_aspect_by_category"}
EXACT_COLUMNS = {"classes", "images", "chance %", "target %", "train images", "val images", "majority %"}
# Not recorded: text a model generates (phrases, top concepts) changes word by word with the arithmetic;
# Fig. 8's buckets by initial target position hold a handful of quick queries each, and one that empties
# under another arithmetic turns its numbers into blanks (its invariants are unit-tested).
UNRECORDED_TABLES = {"07_concepts_and_phrases", "08_gain_by_initial_position"}
# Not compared: wall-clock times measure the machine and its load, not the code.
UNCHECKED_COLUMNS = {"seconds", "encoder s", "Combiner s", "end-to-end s", "filter s/query", "re-rank s/query",
                     "re-rank / filter"}
UNCHECKED = 1e9


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


RESULT_WORDS = {"True", "False", "holds", "within noise", "reversed"}  # derived from numbers: may differ


def compare_grids(expected: list[list[str]], got: list[list[str]], tolerance: list[float]) -> list[str]:
    """What moved between two tables: numbers beyond their column's tolerance, changed text (headers,
    row labels), a changed shape. Words derived from numbers (``RESULT_WORDS``) may differ."""
    if [len(r) for r in got] != [len(r) for r in expected]:
        found = f"{len(got)} x {len(got[0]) if got else 0}"
        return [f"shape changed from {len(expected)} rows x {len(expected[0])} columns to {found}"]
    moved = []
    for row_e, row_g in zip(expected, got):
        for j, (e, g) in enumerate(zip(row_e, row_g)):
            ne, ng = numbers_in(e), numbers_in(g)
            label = f"row {row_e[0]!r}, column {expected[0][j]!r}"
            if ne is None or ng is None or len(ne) != len(ng):
                if e != g and not {e, g} <= RESULT_WORDS:
                    moved.append(f"{label}: {e!r} became {g!r}")
                continue
            for x, y in zip(ne, ng):
                if abs(x - y) > tolerance[j]:
                    moved.append(f"{label}: expected {x:g} ± {tolerance[j]:.3g}, got {y:g} (moved {y - x:+.4g})")
    return moved


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


def tolerances(name: str, header: list[str], spreads: list[float], grid: list[list[str]]) -> list[float]:
    """Per column: ``FLOOR`` for exact tables and columns, else the measured spread times ``SAFETY``
    or the floor of the table's kind of number (percentages, or fractions when no value exceeds 1)."""
    if name in EXACT_TABLES:
        return [FLOOR] * len(spreads)
    values = [abs(x) for row in grid[1:] for j, cell in enumerate(row) if header[j] not in EXACT_COLUMNS
              for x in (numbers_in(cell) or [])]
    floor = FRACTION_FLOOR if max(values, default=0.0) <= 1.0 else PERCENT_FLOOR
    return [FLOOR if h in EXACT_COLUMNS else UNCHECKED if h in UNCHECKED_COLUMNS else max(floor, SAFETY * s)
            for h, s in zip(header, spreads)]


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
        if csv.stem not in UNRECORDED_TABLES:
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
            tols = tolerances(ref.stem, header, spreads, reference)
            tables[ref.stem] = {"columns": header, "spread": spreads, "tolerance": tols}
            if ref.stem in EXACT_TABLES and any(spreads):
                raise SystemExit(f"{ref.stem} is meant to be machine-independent but moved by {max(spreads)}")
    shutil.rmtree(ROOT / "data" / "quick", ignore_errors=True)  # the next test run starts from the default set-up
    TOLERANCES.write_text(json.dumps({
        "setups": SETUPS, "safety": SAFETY, "floor": FLOOR, "percent_floor": PERCENT_FLOOR,
        "fraction_floor": FRACTION_FLOOR, "exact_tables": sorted(EXACT_TABLES),
        "exact_columns": sorted(EXACT_COLUMNS), "tables": tables}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {TOLERANCES.relative_to(ROOT)} from {len(SETUPS)} set-ups")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["reference", "spread"])
    args = parser.parse_args()
    record_reference() if args.step == "reference" else record_spread()
