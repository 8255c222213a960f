"""Shared fixtures (the hand-written real-format datasets under tests/fixtures/) and the order and
failure reports of the notebook tests."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixture_splits():
    """The val splits of the three fixture datasets (their dead links are expected; warnings silenced)."""
    from cirlib.data import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "fashioniq/dress": datasets.load_fashioniq(FIXTURES / "fashioniq", "dress", "val"),
            "cirr": datasets.load_cirr(FIXTURES / "cirr", "val"),
            "circo": datasets.load_circo(FIXTURES / "circo", "val"),
        }


@pytest.fixture(scope="session")
def quick_fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded ``fashion`` benchmark at its quick size, generated once for every test that reads it
    (read only: a test that changes files generates its own)."""
    from cirlib.data.synth import fashion

    return fashion.generate_fashion(tmp_path_factory.mktemp("fashion"), fashion.FashionBenchConfig.quick(), workers=1)


@pytest.fixture(scope="session")
def quick_scenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded ``scenes`` benchmark (CIRR and CIRCO formats) at its quick size, generated once (read only)."""
    from cirlib.data.synth import scenes

    return scenes.generate_scenes(tmp_path_factory.mktemp("scenes"), scenes.ScenesBenchConfig.quick())


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Unit tests use small tensors: a second thread gains little and, on a shared 2-core CPU,
    oversubscription makes them many times slower. (Notebooks run in their own kernels.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def throwaway_digest_index(tmp_path_factory: pytest.TempPathFactory):
    """Tests hash temporary files: their digests go to an index of their own, not to the checkout's
    ``data/digests.sqlite``, which would keep a row for every temporary path of every run."""
    from cirlib.core import digests

    saved = os.environ.get(digests.INDEX_ENV), digests._default
    os.environ[digests.INDEX_ENV] = str(tmp_path_factory.getbasetemp() / "digests.sqlite")
    digests._default = None
    yield
    env, digests._default = saved
    if env is None:
        os.environ.pop(digests.INDEX_ENV, None)
    else:
        os.environ[digests.INDEX_ENV] = env


_SESSION_START = time.time()
NOTEBOOK_RESULTS = "test_notebook_results.py"


@pytest.fixture(scope="module")
def vit():
    """A random-init tiny ViT CLIP (the course's architecture), shared by a test module."""
    from cirlib.models.backbone import load_backbone

    return load_backbone(pretrained=None)


@pytest.fixture
def close_figures():
    """Close every matplotlib figure a plotting test opened."""
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.fixture(scope="session")
def session_start() -> float:
    """When this pytest run started: the notebook result tests only read tables written after it."""
    return _SESSION_START


def pytest_collection_modifyitems(session, config, items) -> None:
    """The notebook result tests read the tables the nbval run of the notebooks writes: run them last."""
    items.sort(key=lambda item: item.nodeid.split("::")[0].endswith(NOTEBOOK_RESULTS))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing notebook cell says which notebook and cell it is, and how to accept an intended change."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and ".ipynb::" in item.nodeid:
        notebook, cell = item.nodeid.split("::", 1)
        report.sections.append(("notebook regression", (
            f"{Path(notebook).name}, {cell}: its output no longer matches the reference in tests/notebooks/ "
            "(numbers are masked there and checked with tolerances in tests/test_notebook_results.py, so this is "
            "a change of text, table layout, warnings or an error). If the change is intended, run `make refs` "
            "and commit the regenerated references.")))
