"""Where the course keeps its data, artifacts and figures.

Notebooks run from ``notebooks/`` under papermill, from ``tests/notebooks/`` under nbval and
from anywhere in JupyterLab, so paths are resolved from the project root rather than the cwd.
Quick runs (tests) write under ``data/quick`` so they never overwrite the full course artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "CIRLIB_ROOT"


def project_root() -> Path:
    """The checkout root: ``$CIRLIB_ROOT``, else the nearest parent holding cirlib's pyproject."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for cand in (start, *start.parents):
            if (cand / "pyproject.toml").is_file() and (cand / "cirlib").is_dir():
                return cand
    raise RuntimeError(
        f"cannot find the cirlib project root from {Path.cwd()}; set ${ROOT_ENV} to the checkout"
    )


def data_dir(quick: bool = False) -> Path:
    """Generated benchmarks, checkpoints, caches and result tables (never committed)."""
    d = project_root() / "data" / ("quick" if quick else "")
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(quick: bool = False) -> Path:
    """``figures/`` for the course run; a scratch folder for quick (test) runs."""
    d = (data_dir(True) / "figures") if quick else (project_root() / "figures")
    d.mkdir(parents=True, exist_ok=True)
    return d
