"""Every notebook, in quick mode, on dataset roots in the real public layouts and a real open_clip
architecture: the path a user with the downloaded FashionIQ, CIRR and CIRCO and CLIP weights takes.

The roots are the hand-written fixtures (no ``cirlib_meta.json``, no generated attributes); the
weights are a randomly initialised ViT-S-32 saved as a plain open_clip state dict (no cirlib
sidecar), as a user's own checkpoint would be. The numbers mean nothing; the point is that every
cell runs, adapts where only the embedded benchmarks have something, and writes its figures.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ARCHITECTURE = "ViT-S-32"  # the smallest real CLIP ViT in open_clip; ViT-B-32 takes twice as long here

pytestmark = [pytest.mark.slow, pytest.mark.real_layout]


@pytest.fixture(scope="module")
def real_setup(tmp_path_factory: pytest.TempPathFactory):
    """Real-layout roots, a plain open_clip checkpoint, and a project root of their own for artifacts."""
    import open_clip
    import torch
    from real_layout import real_layout_roots
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("real_layout")
    roots = real_layout_roots(base / "datasets")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(ARCHITECTURE)
    weights = base / f"{ARCHITECTURE}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    project = base / "project"
    project.mkdir()
    previous = os.environ.get("CIRLIB_ROOT")
    os.environ["CIRLIB_ROOT"] = str(project)  # the notebook kernels inherit it: artifacts go here
    yield {"roots": {k: str(v) for k, v in roots.items()}, "weights": str(weights), "project": project}
    if previous is None:
        os.environ.pop("CIRLIB_ROOT", None)
    else:
        os.environ["CIRLIB_ROOT"] = previous
    shutil.rmtree(base, ignore_errors=True)  # gigabytes of checkpoints; the executed notebooks stay


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_real_layout(path: Path, real_setup, tmp_path: Path) -> None:
    import nbformat
    import papermill

    params = {"quick": True, **real_setup["roots"]}
    declared = nbformat.read(path, as_version=4)
    parameter_cell = next(c for c in declared.cells if "parameters" in c.metadata.get("tags", []))
    if "backbone" in parameter_cell.source:
        params |= {"backbone": ARCHITECTURE, "pretrained": real_setup["weights"]}
    out = tmp_path / path.name
    papermill.execute_notebook(
        str(path), str(out), parameters=params, kernel_name="cirlib", cwd=str(ROOT / "notebooks"),
        progress_bar=False, log_output=False,
    )
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    figures = real_setup["project"] / "data" / "quick" / "figures"
    written = sorted(p.name for p in figures.glob(f"{path.name[:2]}_*"))
    assert written, f"{path.name} wrote no figure or table under {figures}"
    for csv in figures.glob(f"{path.name[:2]}_*.csv"):
        table = pd.read_csv(csv, index_col=0)
        assert len(table), f"{csv.name} is empty"
