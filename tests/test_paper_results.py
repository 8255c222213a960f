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


def test_isearle_results_are_tables_ii_to_iv_b32():
    t = P.isearle_results()
    assert list(t.index) == ["image", "text", "sum", "captioning", "isearle-oti", "isearle"]
    assert list(t.columns) == ["fashioniq R@10", "fashioniq R@50", "cirr R@1", "cirr R@5", "cirr R@10", "cirr R@50",
                               "circo mAP@5", "circo mAP@10", "circo mAP@25", "circo mAP@50"]
    assert t.loc["isearle-oti", "fashioniq R@10"] == 25.06 and t.loc["isearle", "fashioniq R@50"] == 44.80
    assert t.loc["isearle-oti", "cirr R@1"] == 26.19 and t.loc["isearle", "cirr R@50"] == 90.82
    assert t.loc["isearle-oti", "circo mAP@5"] == 10.31 and t.loc["isearle", "circo mAP@10"] == 11.24
    # the baseline rows agree with isearle_baselines, and recall/mAP grow with K
    base = P.isearle_baselines()
    assert (t.loc[base.index, base.columns] == base).all().all()
    for prefix, ks in (("fashioniq R@", (10, 50)), ("cirr R@", (1, 5, 10, 50)), ("circo mAP@", (5, 10, 25, 50))):
        cols = [f"{prefix}{k}" for k in ks]
        assert (t[cols].diff(axis=1).iloc[:, 1:] >= 0).all().all()
    # item 7's orderings are the paper's: both iSEARLE variants beat image + text and text-only everywhere
    for method in ("isearle", "isearle-oti"):
        assert (t.loc[method] > t.loc["sum"]).all() and (t.loc[method] > t.loc["text"]).all()
    assert (t.loc["isearle"] - t.loc["isearle-oti"]).abs().max() < 1.0


def test_isearle_aspects_are_table_v_b32():
    from cirlib.data.datasets import CIRCO_ASPECTS

    t = P.isearle_aspects()
    assert tuple(t.index) == CIRCO_ASPECTS and list(t.columns) == ["isearle-oti", "isearle"]
    assert t.loc["cardinality", "isearle"] == 9.50 and t.loc["viewpoint", "isearle-oti"] == 7.98
    # the paper's reading: viewpoint and negation are among the hardest aspects, direct addressing the easiest
    for method in t.columns:
        hardest = set(t[method].nsmallest(3).index)
        assert "viewpoint" in hardest and "direct_addressing" in set(t[method].nlargest(2).index)


def test_isearle_supervised_is_table_xi_and_keeps_its_reading():
    t = P.isearle_supervised()
    assert list(t.index) == ["Combiner-FIQ", "Combiner-CIRR", "iSEARLE-OTI", "iSEARLE"]
    assert t.loc["Combiner-FIQ", "fashioniq R@10"] == 32.96 and t.loc["iSEARLE", "cirr R@10"] == 70.32
    # each Combiner is best on its own dataset and below iSEARLE on the other one
    assert t["fashioniq R@10"].idxmax() == "Combiner-FIQ" and t["cirr R@1"].idxmax() == "Combiner-CIRR"
    assert t.loc["iSEARLE", "fashioniq R@10"] > t.loc["Combiner-CIRR", "fashioniq R@10"]
    assert t.loc["iSEARLE", "cirr R@1"] > t.loc["Combiner-FIQ", "cirr R@1"]


def test_reranking_tables_are_the_papers_and_keep_its_orderings():
    main = P.reranking_results()
    assert main.loc["filter", "fashioniq R@10"] == 46.15 and main.loc["re-ranked", "cirr R@1"] == 50.55  # Tables 1-2
    assert (main.loc["re-ranked"] >= main.loc["filter"]).all()  # R@50 equal on CIRR (top-50 re-ranked)
    ablations = P.reranking_ablations()
    assert (ablations.loc["full"] > ablations.drop(index="full")).all().all()  # Table 3: every ablation loses
    assert tuple(ablations.loc["w. Ref_CLS"]) == (49.59, 72.38)  # row 3: the pooled reference instead of z_t
    assert P.reranking_k("fashioniq").loc[100, "R@50"] == 73.13 and P.reranking_k("cirr").loc[0, "R@1"] == 46.83
    positions = P.reranking_positions()
    assert (positions["difference"] > 0).all() and positions.loc["cirr", "initial"] == 5.32
    assert "TMLR" in P.RERANKING_SOURCE
