"""Shared fixtures: the hand-written real-format datasets under tests/fixtures/."""

from __future__ import annotations

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
    from cirlib import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "fashioniq/dress": datasets.load_fashioniq(FIXTURES / "fashioniq", "dress", "val"),
            "cirr": datasets.load_cirr(FIXTURES / "cirr", "val"),
            "circo": datasets.load_circo(FIXTURES / "circo", "val"),
        }


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Unit tests use small tensors: a second thread gains little and, on a shared 2-core CPU,
    oversubscription makes them many times slower. (Notebooks run in their own kernels.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
