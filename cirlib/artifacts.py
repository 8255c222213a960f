"""Where notebooks leave artifacts for later notebooks (SPEC §5), and how they pick them up.

Each notebook can be re-run alone once its predecessors have run: the backbone pretrained by 02,
the stage-1 checkpoints of 04 and the Combiners of 05 live at fixed places under ``data/``.
"""

from __future__ import annotations

from pathlib import Path

from cirlib import paths
from cirlib.backbone import TINY_MODEL, Backbone, load_backbone


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
