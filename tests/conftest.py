"""Shared fixtures: the hand-written real-format datasets under tests/fixtures/."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import pytest

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
