"""Where notebooks leave artifacts for later notebooks, and how they pick them up.

Each notebook can be re-run alone once its predecessors have run: the backbone pretrained by 02,
the stage-1 checkpoints of 04 and the Combiners of 05 live at fixed places under ``data/``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cirlib.core import paths
from cirlib.core.io import atomic_path
from cirlib.models.backbone import TINY_MODEL, Backbone, load_backbone


def checkpoints_dir(quick: bool) -> Path:
    d = paths.data_dir(quick) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def feature_cache_dir(quick: bool) -> Path:
    d = paths.data_dir(quick) / "features"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pretrained_checkpoint(quick: bool) -> Path:
    """The tiny CLIP written by notebook 02."""
    return checkpoints_dir(quick) / "tiny_clip.safetensors"


def course_backbone(
    quick: bool, model: str = TINY_MODEL, pretrained: str | None = None, device: str = "auto"
) -> Backbone:
    """The backbone the course notebooks use: given weights, else the tiny CLIP from notebook 02."""
    if pretrained is not None:
        return load_backbone(model, pretrained, device)
    if model != TINY_MODEL:
        raise ValueError(f"{model} needs weights: pass pretrained=<open_clip tag or checkpoint path>")
    ckpt = pretrained_checkpoint(quick)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} does not exist: run notebooks/02_backbone.ipynb first (quick={quick})")
    return load_backbone(model, ckpt, device)


def stage1_dir(quick: bool, benchmark: str, encoders: str) -> Path:
    """Where notebook 04 fine-tunes ``encoders`` ("image" / "text" / "both") on ``benchmark``."""
    return checkpoints_dir(quick) / "stage1" / benchmark / encoders


def stage1_backbone(
    quick: bool, benchmark: str, encoders: str, model: str = TINY_MODEL, device: str = "auto"
) -> Backbone:
    """A stage-1 fine-tuned backbone exported by notebook 04."""
    ckpt = stage1_dir(quick, benchmark, encoders) / "backbone.safetensors"
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{ckpt} does not exist: run notebooks/04_stage1_finetuning.ipynb first (quick={quick})"
        )
    return load_backbone(model, ckpt, device)


def combiner_checkpoint(quick: bool, benchmark: str, stage1: str) -> Path:
    """The Combiner notebook 05 trains on the features of a stage-1 variant (or "zero-shot")."""
    return checkpoints_dir(quick) / "combiner" / benchmark / f"{stage1}.pt"


def phi_checkpoint(quick: bool, pretraining: str, variant: str = "isearle") -> Path:
    """The textual inversion network phi notebook 07 trains on the images of ``pretraining`` (a
    benchmark, or a user's image folder's name); ``variant`` names an ablation. The OTI tokens it
    distils are cache entries under :func:`feature_cache_dir`, keyed by their inputs."""
    return checkpoints_dir(quick) / "isearle" / pretraining / f"{variant}.pt"


def ablation_dir(quick: bool, benchmark: str, name: str) -> Path:
    return checkpoints_dir(quick) / "ablations" / benchmark / name


def ablation_checkpoint(quick: bool, benchmark: str, variant: str) -> Path:
    return ablation_dir(quick, benchmark, "combiner_variants") / f"{variant}.pt"


def results_dir(quick: bool) -> Path:
    d = paths.data_dir(quick) / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_result(quick: bool, name: str, table: pd.DataFrame) -> Path:
    """Hand a result table to later notebooks (pickle keeps the index levels and dtypes exact)."""
    path = results_dir(quick) / f"{name}.pkl"
    with atomic_path(path) as tmp:
        table.to_pickle(tmp)
    return path


def load_result(quick: bool, name: str) -> pd.DataFrame:
    path = results_dir(quick) / f"{name}.pkl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the notebook that writes {name!r} first (quick={quick})")
    return pd.read_pickle(path)


def reranking_dir(quick: bool, benchmark: str) -> Path:
    """Where notebook 08 trains the candidate filter and the re-ranker on ``benchmark``."""
    return checkpoints_dir(quick) / "reranking" / benchmark


def filter_checkpoint(quick: bool, benchmark: str, variant: str = "filter") -> Path:
    """A candidate filter (the first stage) of notebook 08; ``variant`` names an ablation."""
    return reranking_dir(quick, benchmark) / f"{variant}.pt"


def reranker_checkpoint(quick: bool, benchmark: str, variant: str = "reranker") -> Path:
    """A dual-encoder re-ranker of notebook 08; ``variant`` names an ablation (e.g. ``"encoder-t-only"``)."""
    return reranking_dir(quick, benchmark) / f"{variant}.pt"
