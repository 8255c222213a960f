"""What every course notebook does first: its benchmark roots, splits, folders and backbones.

One call turns a notebook's ``parameters`` cell into a :class:`Course`, so notebooks hold narrative
and calls only and a real dataset root or another backbone changes one parameter, not six copies of
set-up code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cirlib.core import artifacts, paths
from cirlib.core.device import get_device
from cirlib.data import benchmarks
from cirlib.data.datasets import CIRSplit
from cirlib.data.preprocess import TransformKind
from cirlib.evaluation.protocols import CachedEvaluator
from cirlib.methods.combiner_training import CombinerConfig, build_combiner_data, train_combiner
from cirlib.methods.reranking import MATCHED_SCHEDULES, FilterConfig, MatchingConfig, RerankerConfig
from cirlib.methods.stage1 import Stage1Config
from cirlib.models.backbone import TINY_MODEL, Backbone
from cirlib.models.combiner import Combiner

HEADLINE: dict[str, list[str]] = {"fashioniq": ["R@10", "R@50"], "cirr": ["R@1", "R@5"]}
"""The two numbers per benchmark that CLIP4Cir's tables lead with."""

MAIN: dict[str, str] = {"fashioniq": "R@10", "cirr": "R@1"}
"""The one number per benchmark a bar chart or a bootstrap claim uses."""


@dataclass
class Course:
    """A notebook's view of the course: parameters, benchmark roots and what earlier notebooks left."""

    quick: bool
    seed: int
    roots: benchmarks.BenchmarkRoots
    backbone_name: str = TINY_MODEL
    pretrained: str | None = None
    device: str = "auto"
    generated: bool = True  # every root is an embedded benchmark generated here (no real dataset given)
    _splits: dict[str, dict[str, CIRSplit]] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def figdir(self) -> Path:
        """Where figures and tables go: ``figures/`` (``data/quick/figures/`` in quick mode)."""
        return paths.figures_dir(self.quick)

    @cached_property
    def cache(self) -> Path:
        """The feature cache every notebook shares."""
        return artifacts.feature_cache_dir(self.quick)

    def splits(self, split: str) -> dict[str, CIRSplit]:
        """``fashioniq/<category>``, ``cirr`` (and ``circo`` unless ``split="train"``), loaded once."""
        if split not in self._splits:
            self._splits[split] = benchmarks.load_splits(self.roots, split)
        return self._splits[split]

    @property
    def train_splits(self) -> dict[str, CIRSplit]:
        return self.splits("train")

    @property
    def val_splits(self) -> dict[str, CIRSplit]:
        return self.splits("val")

    @property
    def trainable(self) -> dict[str, list[str]]:
        """Benchmarks with training triplets and their validation splits (CIRCO is zero-shot only)."""
        return {"fashioniq": [k for k in self.val_splits if k.startswith("fashioniq/")], "cirr": ["cirr"]}

    def backbone(self) -> Backbone:
        """The course backbone: given weights, else the tiny CLIP notebook 02 pretrained."""
        return artifacts.course_backbone(self.quick, self.backbone_name, self.pretrained, self.device)

    def stage1_backbone(self, benchmark: str, encoders: str) -> Backbone:
        """The backbone notebook 04 fine-tuned on ``benchmark``; ``"zero-shot"`` is :meth:`backbone`."""
        if encoders == "zero-shot":
            return self.backbone()
        return artifacts.stage1_backbone(self.quick, benchmark, encoders, self.backbone_name, self.device)

    def stage1_config(self, **overrides) -> Stage1Config:
        """The stage-1 schedule of notebook 04, shared with 06 so that its end-to-end runs get the
        same encoder budget: epochs of ``epoch_size`` random triplets, early stopping on validation
        (``patience``), at most ``epochs`` (see :meth:`Stage1Config.for_tiny`)."""
        schedule = {"epochs": 2, "epoch_size": 64} if self.quick else {"epoch_size": 1500}
        return Stage1Config.for_tiny(**{"seed": self.seed, **schedule, **overrides})

    def combiner_config(self, **overrides) -> CombinerConfig:
        """The Combiner schedule of notebook 05, shared with 06's variants and end-to-end runs."""
        schedule = {"epochs": 3 if self.quick else 30}
        return CombinerConfig.for_tiny(**{"seed": self.seed, "device": self.device, **schedule, **overrides})

    def pipeline_combiner(self, benchmark: str, kind: TransformKind) -> tuple[Combiner, CachedEvaluator]:
        """A Combiner trained on the zero-shot backbone's features of one preprocessing pipeline, with
        the evaluator of its validation features (CLIP4Cir Tables 7–8: one model per pipeline).

        Notebook 05 trains them, its targetpad one being its zero-shot Combiner; notebook 06 compares
        them, loading the checkpoints (trained here when they are missing or stale).
        """
        names, zero_shot = self.trainable[benchmark], self.backbone()
        data = build_combiner_data([self.train_splits[n] for n in names], zero_shot, transform_kind=kind,
                                   cache_dir=self.cache, seed=self.seed)
        evaluate = CachedEvaluator({n: self.val_splits[n] for n in names}, zero_shot, transform_kind=kind,
                                   cache_dir=self.cache)
        variant = "zero-shot" if kind == "targetpad" else f"zero-shot-{kind}"
        net, _ = train_combiner(data, evaluate, self.combiner_config(),
                                ckpt_path=artifacts.combiner_checkpoint(self.quick, benchmark, variant))
        return net, evaluate

    def filter_config(self, **overrides) -> FilterConfig:
        """The candidate filter's schedule in notebook 08 (see :meth:`FilterConfig.for_tiny`); quick:
        two short epochs on the quick training sets (a few hundred triplets)."""
        schedule = {"epochs": 2, "batch_size": 16, "epoch_size": None} if self.quick else {}
        return FilterConfig.for_tiny(**{"seed": self.seed, "progress": False, **schedule, **overrides})

    def reranker_config(self, benchmark: str | None = None, matched: bool = False, **overrides) -> RerankerConfig:
        """The re-ranker's schedule in notebook 08 for ``benchmark`` (see :meth:`RerankerConfig.for_tiny`;
        ``matched``: after matching pretraining), or without one the budget schedule, which its ablations
        share; quick: one epoch of 64 triplets in batches of 8 for every benchmark."""
        schedule = {"epochs": 1, "batch_size": 8, "epoch_size": 64} if self.quick else {}
        return RerankerConfig.for_tiny(benchmark, matched,
                                       **{"seed": self.seed, "progress": False, **schedule, **overrides})

    def matched_benchmarks(self, matching: bool | str = "auto") -> list[str]:
        """The benchmarks whose re-ranker notebook 08 starts from image-text matching pretraining: those with a
        :data:`~cirlib.methods.reranking.MATCHED_SCHEDULES` entry, when ``matching`` is True, or ``"auto"`` and
        the course runs on an accelerator. On a GPU the longer path costs seconds; on a 2-core CPU about 9
        minutes, more than notebook 08's budget, so ``"auto"`` leaves it off there."""
        if matching not in (True, False, "auto"):
            raise ValueError(f"matching must be True, False or 'auto', got {matching!r}")
        if matching == "auto":
            matching = get_device(self.device).type != "cpu"
        return [b for b in self.trainable if matching and b in MATCHED_SCHEDULES]

    def matching_config(self, **overrides) -> MatchingConfig:
        """Image-text matching pretraining in notebook 08 (its ``matching`` parameter): the re-ranker's
        two blocks per encoder, :class:`MatchingConfig`'s 400 steps of 24 images; quick: one epoch of 48
        images in batches of 8."""
        schedule = {"epochs": 1, "batch_size": 8, "epoch_size": 48} if self.quick else {}
        return MatchingConfig(**{"layers": RerankerConfig.for_tiny().layers, "seed": self.seed, "progress": False,
                                 **schedule, **overrides})


def setup_course(
    quick: bool = False,
    seed: int = 0,
    backbone: str = TINY_MODEL,
    pretrained: str | None = None,
    device: str = "auto",
    fashioniq_root: str | Path | None = None,
    cirr_root: str | Path | None = None,
    circo_root: str | Path | None = None,
) -> Course:
    """Prepare the benchmark roots (generating the embedded ones not given) and return the course."""
    roots = benchmarks.prepare_benchmarks(
        quick=quick, seed=seed, fashioniq_root=fashioniq_root, cirr_root=cirr_root, circo_root=circo_root
    )
    generated = fashioniq_root is None and cirr_root is None and circo_root is None
    return Course(quick, seed, roots, backbone, pretrained, device, generated)
