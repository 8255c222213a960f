"""The published reference numbers: layout, spot values and the orderings the course reproduces."""

from __future__ import annotations

import pandas as pd
import pytest

from cirlib.evaluation import paper_results as P
from cirlib.evaluation.paper_results import SOURCE, clip4cir_main_table, side_by_side


def test_source_names_the_paper_and_backbone():
    assert "CLIP4Cir" in SOURCE and "RN50" in SOURCE


def test_layout_and_spot_values():
    t = clip4cir_main_table()
    assert t.shape == (8, 9)
    assert list(t.index.names) == ["stage-1", "combining function"]
    assert t.loc[("zero-shot", "Sum"), "fashioniq R@10"] == 19.70  # Table 1, first row, Average R@10
    assert t.loc[("both", "Combiner"), "cirr R@1"] == 42.05  # Table 2, last row
    assert t.loc[("text", "Sum"), "cirr Rsubset@1"] == 67.21


def test_the_papers_orderings_hold_in_the_numbers():
    """The orderings notebook 05 asserts on our data are the paper's own (a typo here would show)."""
    t = clip4cir_main_table()
    for col in ("fashioniq R@10", "cirr R@1"):
        assert t.loc[("both", "Combiner"), col] > t.loc[("both", "Sum"), col] > t.loc[("zero-shot", "Sum"), col]
        assert t.loc[("zero-shot", "Combiner"), col] > t.loc[("zero-shot", "Sum"), col]
    assert (t.loc[:, "cirr R@1"] <= t.loc[:, "cirr R@5"]).all() and (t["fashioniq R@10"] <= t["fashioniq R@50"]).all()


def test_side_by_side_labels_both_sources():
    index = pd.MultiIndex.from_tuples(
        [("zero-shot", "Sum"), ("both", "Combiner")], names=["stage-1", "combining function"]
    )
    ours = pd.DataFrame({"fashioniq R@10": [5.0, 60.0], "cirr R@1": [9.0, 30.0], "extra": [0, 0]}, index=index)
    table = side_by_side(ours, ["fashioniq R@10", "cirr R@1"], "ours", "CLIP4Cir")
    assert list(table.columns.get_level_values(0).unique()) == ["ours", "CLIP4Cir"]
    assert table.loc[("both", "Combiner"), ("CLIP4Cir", "cirr R@1")] == 42.05
    assert table.loc[("zero-shot", "Sum"), ("ours", "fashioniq R@10")] == 5.0
    with pytest.raises(KeyError, match="extra"):
        side_by_side(ours, ["extra"], "ours")


def test_isearle_baselines_have_each_datasets_ordering():
    t = P.isearle_baselines()
    assert list(t.index) == ["image", "text", "sum"]
    assert list(t.columns) == ["fashioniq R@10", "cirr R@1", "circo mAP@10"]
    assert "iSEARLE" in P.ISEARLE_SOURCE and "B/32" in P.ISEARLE_SOURCE
    assert t.loc["text", "fashioniq R@10"] == 18.70 and t.loc["sum", "circo mAP@10"] == 3.25
    # image-only is the weakest everywhere; text leads on FashionIQ and CIRR, the sum on CIRCO
    assert (t.loc["image"] < t.loc["text"]).all() and (t.loc["image"] < t.loc["sum"]).all()
    assert t.loc["text", "cirr R@1"] > t.loc["sum", "cirr R@1"]
    assert t.loc["sum", "circo mAP@10"] > t.loc["text", "circo mAP@10"]
