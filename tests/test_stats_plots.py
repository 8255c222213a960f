"""Dataset statistics and the figure and table writers of the notebooks."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from cirlib.data import stats
from cirlib.data.datasets import CIRSplit, Query
from cirlib.viz import plots, tables


def test_split_statistics_counts_fixture_splits(fixture_splits) -> None:
    table = stats.split_statistics(fixture_splits.items())
    dress = table.loc[("fashioniq/dress", "val")]
    assert dress["queries"] == 3 and dress["gallery"] == 5 and dress["missing files"] == 1
    assert dress["captions per query"] == 2.0
    circo = table.loc[("circo", "val")]
    gts = [len(q.ground_truths) for q in fixture_splits["circo"].queries]
    assert math.isclose(circo["GT per query"], np.mean(gts))


def test_aspect_coverage_counts_and_rejects_unknown(fixture_splits) -> None:
    cov = stats.aspect_coverage({"c": fixture_splits["circo"]})
    q0 = fixture_splits["circo"].queries[0]
    for aspect in q0.semantic_aspects:
        assert cov.loc[aspect, ("c", "queries")] >= 1
    n = len(fixture_splits["circo"].queries)
    assert np.allclose(cov[("c", "%")], 100 * cov[("c", "queries")] / n)
    bad = CIRSplit("circo", "val", Path("."), [Query("1", ("x",), "2", ("2",), semantic_aspects=("colour",))],
                   ["1", "2"], {}, 0)
    with pytest.raises(ValueError, match="colour"):
        stats.aspect_coverage({"bad": bad})


def test_markdown_table_is_exact() -> None:
    df = pd.DataFrame({"R@10": [1.234, 50.0]}, index=pd.Index(["sum", "image"], name="method"))
    assert tables.to_markdown(df) == "| method | R@10 |\n|---|---|\n| sum | 1.23 |\n| image | 50.00 |\n"
    multi = pd.DataFrame({("circo", "%"): [5.0]}, index=pd.Index(["addition"], name="aspect"))
    assert tables.to_markdown(multi).splitlines()[0] == "| aspect | circo % |"


def test_save_table_and_figure_write_stable_names(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1.0]})
    tables.save_table(df, "t", tmp_path)
    assert pd.read_csv(tmp_path / "t.csv", index_col=0)["a"].tolist() == [1.0]
    fig = plots.histogram(np.array([1, 2, 2, 3]), "x", bins=range(1, 5))
    path = plots.save_figure(fig, "h", tmp_path)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "t.csv", "t.md"]


def test_triplet_grid_frames_target_and_aspect_ratios(fixture_splits) -> None:
    split = fixture_splits["fashioniq/dress"]
    fig = plots.triplet_grid(split, n=2, seed=0)
    axes = fig.axes
    assert len(axes) == 6
    target_ax = axes[2]
    assert target_ax.spines["left"].get_edgecolor()[:3] == pytest.approx((0x2C / 255, 0xA0 / 255, 0x2C / 255))
    plt.close(fig)
    ratios = stats.aspect_ratios(split)
    assert len(ratios) == len(split.gallery) and (ratios > 0).all()


def test_extreme_aspect_examples_are_the_tallest_and_widest(fixture_splits) -> None:
    ranked = sorted((r, split.image_paths[name]) for split in fixture_splits.values()
                    for name, r in zip(split.gallery, stats.aspect_ratios(split)))
    assert stats.extreme_aspect_examples(fixture_splits, n=3) == [ranked[0][1], ranked[1][1], ranked[-1][1]]


def test_visible_area_table_from_geometry() -> None:
    table = stats.visible_area_table([1.0, 2.0, 0.5, 1.2], ["clip", "squarepad", "targetpad"], target_ratio=1.25)
    assert table.index.name == "aspect ratio (w/h)"
    assert table.loc[1.0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # a square loses nothing
    assert table["squarepad"].tolist() == pytest.approx([1.0] * 4)  # padding to a square keeps everything
    # 2:1 and 1:2: the centre crop keeps half; padded to 1.25:1 first, the crop keeps 1 / 1.25.
    assert table.loc[[2.0, 0.5], "clip"].tolist() == pytest.approx([0.5, 0.5])
    assert table.loc[[2.0, 0.5], "targetpad"].tolist() == pytest.approx([0.8, 0.8])
    assert table.loc[1.2, "targetpad"] == table.loc[1.2, "clip"] < 1.0  # below the target ratio: no padding


def test_importing_tables_stops_pandas_from_wrapping() -> None:
    assert pd.get_option("display.width") == 100_000


def test_bars_by_group_keeps_the_order_of_each_group() -> None:
    frame = pd.DataFrame({"gain": [1.0, -2.0, 3.0, float("nan"), 5.0]},
                         index=pd.MultiIndex.from_tuples([("a", "1"), ("a", "2-5"), ("a", "6-10"), ("b", "1"),
                                                          ("b", "11-20")], names=["benchmark", "initial position"]))
    fig = plots.bars_by_group(frame, "gain", ylabel="positions")
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2-5", "6-10"]
    assert [p.get_height() for p in fig.axes[0].patches] == [1.0, -2.0, 3.0]
    assert fig.axes[0].get_ylabel() == "positions" and fig.axes[1].get_xlabel() == "initial position"
    plt.close(fig)


def test_breakdown_bars_draw_each_model_with_its_interval() -> None:
    table = pd.DataFrame({"n": [3, 5], "text R@10": [8.0, 7.0], "text R@10 95% low": [6.0, 5.0],
                          "text R@10 95% high": [10.0, 9.0], "sum R@10": [3.0, 12.0], "sum R@10 95% low": [2.0, 9.0],
                          "sum R@10 95% high": [5.0, 15.0]}, index=["differs", "kept"])
    fig = plots.breakdown_bars(table, "R@10", title="by group")
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [8.0, 7.0, 3.0, 12.0]  # model by model, groups in row order
    assert [t.get_text() for t in ax.get_xticklabels()] == ["differs\n(n = 3)", "kept\n(n = 5)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text", "sum"]
    sum_errors = ax.collections[1].get_segments()  # the sum's error bars, group by group
    assert [tuple(segment[:, 1]) for segment in sum_errors] == [(2.0, 5.0), (9.0, 15.0)]
    plt.close(fig)
    with pytest.raises(ValueError, match="no 'R@1' column"):
        plots.breakdown_bars(table, "R@1")


def test_missing_values_shown_as_a_mark(tmp_path: Path) -> None:
    """A metric one benchmark lacks is blank in the CSV and "—" in the markdown and the display copy;
    by default markdown keeps printing "nan", as every saved table did before."""
    df = pd.DataFrame({"R@10": [0.55, 0.4], "R@1": [np.nan, 0.04]}, index=pd.Index(["fashioniq/dress", "cirr"]))
    assert tables.to_markdown(df).splitlines()[2] == "| fashioniq/dress | 0.55 | nan |"
    assert tables.to_markdown(df, na_rep="—").splitlines()[2:] == ["| fashioniq/dress | 0.55 | — |",
                                                                   "| cirr | 0.40 | 0.04 |"]
    tables.save_table(df, "chance", tmp_path, na_rep="—")
    assert (tmp_path / "chance.csv").read_text().splitlines()[1] == "fashioniq/dress,0.5500,"
    assert "| — |" in (tmp_path / "chance.md").read_text(encoding="utf-8")
    shown = tables.blank_missing(df)
    assert shown.loc["fashioniq/dress", "R@1"] == "—" and shown.loc["cirr", "R@1"] == 0.04
    assert df["R@1"].isna().sum() == 1  # the original is untouched


def test_run_curves_draws_a_validation_panel_only_where_runs_were_validated() -> None:
    validated = [{"epoch": 1, "loss": 2.0, "R@1": 10.0}, {"epoch": 2, "loss": 1.5, "R@1": 12.0}]
    last_only = [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 2.1}, {"epoch": 3, "loss": 1.9}]
    fig = plots.run_curves({("cirr", "full"): validated, ("fashioniq", "full"): last_only},
                           {"cirr": "R@1", "fashioniq": "R@10"})
    loss, cirr = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["cirr / full", "fashioniq / full"]
    assert list(loss.get_lines()[1].get_ydata()) == [2.5, 2.1, 1.9]
    assert cirr.get_title() == "cirr: validation R@1" and list(cirr.get_lines()[0].get_ydata()) == [10.0, 12.0]
    assert len(plots.run_curves({("fashioniq", "full"): last_only}, {"fashioniq": "R@10"}).axes) == 1
    plt.close("all")
