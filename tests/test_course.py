"""The notebooks' shared set-up, on the real-format fixtures (no benchmark is generated)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from real_layout import real_layout_roots

from cirlib.core import paths
from cirlib.course import HEADLINE, MAIN, setup_course


@pytest.fixture
def course(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    return setup_course(quick=True, **real_layout_roots(tmp_path))


def test_given_roots_are_used_and_nothing_is_generated(course, tmp_path: Path) -> None:
    assert course.roots.fashioniq == tmp_path / "fashionIQ" and course.roots.circo == tmp_path / "CIRCO"
    assert not (tmp_path / "data" / "quick" / "fashion").exists() and not course.generated
    assert course.figdir == tmp_path / "data" / "quick" / "figures" and course.figdir.is_dir()
    assert course.cache == tmp_path / "data" / "quick" / "features" and course.cache.is_dir()


def test_splits_are_loaded_once_and_grouped_by_benchmark(course) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixtures' deliberately missing images
        val = course.val_splits
        train = course.train_splits
    assert course.splits("val") is val, "a second call must not reload the annotations"
    assert set(val) == {"fashioniq/dress", "fashioniq/shirt", "fashioniq/toptee", "cirr", "circo"}
    assert "circo" not in train, "CIRCO has no train split"
    assert course.trainable == {"fashioniq": ["fashioniq/dress", "fashioniq/shirt", "fashioniq/toptee"],
                                "cirr": ["cirr"]}
    assert set(HEADLINE) == set(MAIN) == set(course.trainable)
    assert all(MAIN[b] == HEADLINE[b][0] for b in MAIN)


def test_backbones_say_which_notebook_to_run_first(course) -> None:
    with pytest.raises(FileNotFoundError, match="02_backbone"):
        course.backbone()
    with pytest.raises(FileNotFoundError, match="02_backbone"):
        course.stage1_backbone("cirr", "zero-shot")  # zero-shot is the course backbone
    with pytest.raises(FileNotFoundError, match="04_stage1"):
        course.stage1_backbone("cirr", "both")


def test_notebooks_share_one_stage1_and_one_combiner_schedule(course) -> None:
    """Notebook 06's end-to-end runs get notebook 04's encoder budget, and its Combiners 05's schedule,
    because both come from the course, whatever the notebook overrides."""
    full = replace(course, quick=False)
    assert (course.stage1_config().epochs, course.stage1_config().epoch_size) == (2, 64)
    assert (full.stage1_config().epoch_size, full.stage1_config().patience) == (1500, 2)
    assert full.stage1_config(encoders="text").encoders == "text"
    assert full.stage1_config().min_delta > 0 and full.stage1_config().epochs == 4  # the budget of the whole course
    assert course.combiner_config().epochs == 3 and full.combiner_config().epochs == 30
    assert full.combiner_config(variant="convex").variant == "convex"
    assert full.combiner_config().seed == course.seed


def test_reranking_schedules_are_the_tiny_ones_and_quick_is_smaller(course) -> None:
    from cirlib.methods.reranking import FilterConfig, RerankerConfig

    full = replace(course, quick=False)
    assert full.filter_config() == FilterConfig.for_tiny(seed=course.seed, progress=False)
    assert full.reranker_config() == RerankerConfig.for_tiny(seed=course.seed, progress=False)
    assert course.filter_config().epochs < full.filter_config().epochs
    quick = course.reranker_config()
    assert quick.epochs * quick.epoch_size < full.reranker_config().epochs * full.reranker_config().epoch_size
    assert quick.keep == full.reranker_config().keep == "last"  # the full run's path, shorter
    assert course.reranker_config(merge="linear").merge == "linear"
    # fashion's re-ranker trains longer (TINY_SCHEDULES); CIRR and the ablations keep the budget schedule
    budget, fiq, cirr = full.reranker_config(), full.reranker_config("fashioniq"), full.reranker_config("cirr")
    assert (fiq.epochs, fiq.epoch_size) == (6, 1500) and (budget.epochs, budget.epoch_size) == (3, 480)
    assert cirr == budget
    assert replace(fiq, epochs=3, epoch_size=480) == budget  # nothing else differs
    assert course.reranker_config("fashioniq") == course.reranker_config()  # quick: one short schedule for all
    assert full.reranker_config("fashioniq", epochs=2).epochs == 2
    # after matching pretraining CIRR trains longer, with the filter's negatives (MATCHED_SCHEDULES)
    matched = full.reranker_config("cirr", matched=True)
    assert (matched.epochs, matched.epoch_size, matched.hard_negatives) == (6, 1500, 8)
    assert full.reranker_config("fashioniq", matched=True) == fiq
    assert course.reranker_config("cirr", matched=True).epoch_size == 64  # quick: still the short schedule


def test_matching_pretraining_config(course) -> None:
    from cirlib.methods.reranking import MatchingConfig, RerankerConfig

    full = replace(course, quick=False)
    assert full.matching_config() == MatchingConfig(layers=RerankerConfig.for_tiny().layers, seed=course.seed,
                                                    progress=False)
    assert full.matching_config().layers == full.reranker_config().layers == 2  # the depth the re-ranker starts from
    quick = course.matching_config()
    assert quick.epochs * quick.epoch_size < full.matching_config().epochs * full.matching_config().epoch_size
    assert course.matching_config(lr=1e-3).lr == 1e-3


def test_matching_runs_where_it_is_asked_for_or_on_an_accelerator(course, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cirlib import course as course_module

    assert course.matched_benchmarks(True) == ["cirr"]  # the one benchmark with a matched schedule
    assert course.matched_benchmarks(False) == []
    monkeypatch.setattr(course_module, "get_device", lambda preference: torch.device("cpu"))
    assert course.matched_benchmarks("auto") == course.matched_benchmarks() == []  # 9 more minutes on a CPU
    monkeypatch.setattr(course_module, "get_device", lambda preference: torch.device("cuda"))
    assert course.matched_benchmarks("auto") == ["cirr"]
    assert course.matched_benchmarks(False) == []
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        course.matched_benchmarks("yes")
