"""Structure of the course notebooks and their nbval references.

The references in ``tests/notebooks/`` are the notebooks executed by papermill in quick mode
(``make refs``); pytest re-executes them with nbval and compares every result cell, so a change
in cirlib that shifts a number fails the suite. These tests make sure the references cannot
silently drift from the notebooks they stand for.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REFS = ROOT / "tests" / "notebooks"


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def test_notebooks_exist_in_sequence() -> None:
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers and numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_shape(path: Path) -> None:
    nb = _read(path)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "you will learn" in first.source.lower()
    assert re.search(r"(Table|Fig\.|§)", first.source), "say which paper tables/figures it mirrors"
    params = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(params) == 1 and re.search(r"^quick\s*=", params[0].source, re.M)
    injected = [c for c in nb.cells if "injected-parameters" in _tags(c)]
    assert not injected, f"{path.name}: remove the leftover papermill injected-parameters cell"
    assert last.cell_type == "code" and "What we saw" in last.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not re.search(r"^\s*(def|class)\s", cell.source, re.M), (
                f"{path.name}: logic belongs in cirlib, not in a cell:\n{cell.source[:200]}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_reference_matches_notebook(path: Path) -> None:
    ref_path = REFS / path.name
    assert ref_path.exists(), f"missing nbval reference {ref_path}: run `make refs`"
    nb, ref = _read(path), _read(ref_path)
    injected = [c for c in ref.cells if "injected-parameters" in _tags(c)]
    assert len(injected) == 1 and re.search(r"^quick = True$", injected[0].source, re.M)
    ref_cells = [c for c in ref.cells if "injected-parameters" not in _tags(c)]
    assert [(c.cell_type, c.source) for c in ref_cells] == [(c.cell_type, c.source) for c in nb.cells], (
        f"{ref_path.name} is stale: run `make refs` after editing {path.name}"
    )
    errors = [o for c in ref.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_figure_names_are_unique_across_notebooks() -> None:
    seen: dict[tuple[str, str], str] = {}
    for path in NOTEBOOKS:
        for cell in _read(path).cells:
            calls = re.findall(r"save_(figure|table)\(", cell.source)
            named = re.findall(r"save_(figure|table)\(.*?,\s*f?\"(\d\d_[^\"]*)\"", cell.source, re.S)
            assert len(named) == len(calls), f"{path.name}: every saved figure/table needs a stable NN_ name"
            for kind, name in named:
                assert name.startswith(path.name[:3]), f"{name}: figures are named after their notebook"
                assert (kind, name) not in seen, f"{kind} {name} saved by both {seen[kind, name]} and {path.name}"
                seen[kind, name] = path.name


def test_readme_main_table_is_the_regenerated_one() -> None:
    """The README's copy of the main table must be the one `make all` last wrote to figures/."""
    table = (ROOT / "figures" / "05_main_table_vs_paper.md").read_text(encoding="utf-8").strip()
    assert table.startswith("| stage-1 |")
    assert table in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README.md's main table differs from figures/05_main_table_vs_paper.md; paste the regenerated table"
    )


def _deviation_rows(markdown: str, header: str, where: str) -> dict[str, str]:
    """The rows of the markdown table under ``header`` (in ``where``), keyed by their first column."""
    lines = markdown.splitlines()
    assert header in lines, f"{where}: the deviations table's header must be a line of its own: {header}"
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2:]:  # skip the header and its |---| rule
        if not line.startswith("| "):
            break
        rows[line.split("|")[1].strip()] = line
    return rows


def test_deviation_rows_are_the_readmes() -> None:
    """Each notebook's "where we deviate" rows are copies of the README's table, word for word: a
    deviation, its reason and its measured effect are stated once, not in drifting versions."""
    readme = _deviation_rows((ROOT / "README.md").read_text(encoding="utf-8"),
                             "| what | the papers | here | why / measured effect |", "README.md")
    assert len(readme) >= 20, "README.md lost its deviations table"
    checked = 0
    for path in NOTEBOOKS:
        for cell in _read(path).cells:
            if cell.cell_type == "markdown" and "| what | the paper | here | why / measured effect |" in cell.source:
                rows = _deviation_rows(cell.source, "| what | the paper | here | why / measured effect |", path.name)
                for key, row in rows.items():
                    assert key in readme, f"{path.name}: deviation {key!r} is missing from README.md's table"
                    assert row == readme[key], f"{path.name}: deviation {key!r} differs from README.md's row"
                checked += len(rows)
    assert checked >= 20, f"only {checked} deviation rows found in the notebooks' tables"
