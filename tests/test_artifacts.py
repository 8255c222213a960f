"""Artifact locations notebooks hand to each other, and their failure modes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cirlib.core import artifacts, paths
from cirlib.models.backbone import load_backbone, save_backbone


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    return tmp_path


def test_quick_and_full_artifacts_never_share_a_folder(root: Path) -> None:
    assert artifacts.pretrained_checkpoint(True) != artifacts.pretrained_checkpoint(False)
    assert artifacts.stage1_dir(True, "cirr", "both").is_relative_to(root / "data" / "quick")
    assert not artifacts.stage1_dir(False, "cirr", "both").is_relative_to(root / "data" / "quick")
    assert artifacts.combiner_checkpoint(False, "fashioniq", "text").name == "text.pt"


def test_course_backbone_explains_missing_predecessor(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="02_backbone"):
        artifacts.course_backbone(quick=True)
    with pytest.raises(FileNotFoundError, match="04_stage1"):
        artifacts.stage1_backbone(True, "cirr", "both")
    with pytest.raises(ValueError, match="needs weights"):
        artifacts.course_backbone(True, model="RN50")


def test_course_backbone_loads_what_02_saved(root: Path) -> None:
    model = load_backbone(pretrained=None, device="cpu", seed=1)
    save_backbone(model, artifacts.pretrained_checkpoint(True), {"by": "test"})
    loaded = artifacts.course_backbone(True, device="cpu")
    first = next(iter(model.model.state_dict().values()))
    assert loaded.fingerprint.startswith("cirlib-tiny-ViT:file-sha256:")
    assert next(iter(loaded.model.state_dict().values())).equal(first)


def test_results_round_trip_keeps_index_levels(root: Path) -> None:
    table = pd.DataFrame({"cirr R@1": [1.5, 2.5]},
                         index=pd.MultiIndex.from_tuples([("both", "Sum"), ("both", "Combiner")], names=["s", "cf"]))
    artifacts.save_result(True, "t", table)
    pd.testing.assert_frame_equal(artifacts.load_result(True, "t"), table)
    with pytest.raises(FileNotFoundError, match="'missing'"):
        artifacts.load_result(True, "missing")
