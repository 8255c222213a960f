"""The CLIP4Cir Combiner (§3.2, Fig. 4), its §4.4 ablation variants, and how it is trained.

The Combiner fuses a reference-image feature and a relative-caption feature into one query
feature that is compared with gallery image features by cosine similarity:

    phi_q = (1 - lambda) * img + lambda * txt + v

where ``lambda`` (branch 1, a sigmoid) sets a query-dependent convex combination of the two inputs
and ``v`` (branch 2) is a learned image-text mixture, i.e. the residual the network adds to that
convex combination. Because the convex combination generalises the element-wise sum used in
stage-1 fine-tuning, the Combiner starts from what stage 1 made work and only learns a correction.

Training happens on *cached* features of the frozen (possibly fine-tuned) encoders: the Combiner
is tiny, so an epoch over cached features costs milliseconds while re-encoding the images would
cost minutes (tests/benchmarks/bench_combiner.py measures the ratio). End-to-end training of the
encoders together with the Combiner (CLIP4Cir Tables 5-6) is stage-1 fine-tuning with a Combiner
as combining function: :func:`cirlib.finetune.finetune` with ``combiner=Combiner(...)``.

This module also holds the epoch loop that every stage shares (:class:`TrainingLoop`): per-epoch
seeding, validation with the benchmark protocol, best-checkpoint selection on a named metric,
early stopping and atomic, resumable checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cirlib.bootstrap import PerQuery
from cirlib.datasets import CIRSplit, Query, query_text
from cirlib.device import autocast, get_device, grad_scaler, precision
from cirlib.evaluate import evaluate_split, per_query_metrics
from cirlib.features import encode_split, image_features, text_features
from cirlib.io import atomic_path, fingerprint
from cirlib.losses import batch_contrastive_loss
from cirlib.metrics import fashioniq_average
from cirlib.preprocess import DEFAULT_TARGET_RATIO, TransformKind

if TYPE_CHECKING:
    from cirlib.backbone import Backbone

CombineFn = Callable[[Tensor, Tensor], Tensor]
"""``(reference image features [B, D], text features [B, D]) -> query features [B, D]``."""

Variant = Literal["combiner", "sum", "convex", "no_convex", "static_skip"]

# CLIP4Cir §4.4 variants as (skip term, learned mixture v). The skip term is the convex
# combination of the inputs: "learned" = (1 - lambda) img + lambda txt, "half" = 0.5 img + 0.5 txt
# (after the final L2 normalisation, "half" without mixture *is* the element-wise sum).
_VARIANTS: dict[str, tuple[Literal["learned", "half"] | None, bool]] = {
    "combiner": ("learned", True),  # proposed:        (1 - l) img + l txt + v
    "sum": ("half", False),  # element-wise sum:       img + txt
    "convex": ("learned", False),  # convex combination: (1 - l) img + l txt
    "no_convex": (None, True),  # w/o convex combination: v
    "static_skip": ("half", True),  # static skip:     0.5 img + 0.5 txt + v
}
VARIANTS: tuple[str, ...] = tuple(_VARIANTS)


def combine_sum(image: Tensor, text: Tensor) -> Tensor:
    """Element-wise sum of L2-normalised features, renormalised (zero-shot and stage-1 "Sum" rows).

    Normalising the inputs first gives both modalities equal weight whatever their raw norms.
    """
    return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class Combiner(nn.Module):
    """CLIP4Cir Fig. 4 (``variant="combiner"``) and the §4.4 ablations, one parameterised module.

    Text and image features are L2-normalised, projected ``d -> projection_dim`` (+ReLU, dropout)
    and concatenated. Branch 1 maps the concatenation through ``hidden_dim`` to a sigmoid
    ``lambda``; branch 2 maps it through ``hidden_dim`` back to ``d`` (the mixture ``v``). Dropout
    follows every hidden layer, as in the paper. The output is L2-normalised.

    Normalising the inputs (the reference code feeds raw CLIP features) makes the convex
    combination an exact generalisation of :func:`combine_sum`, the combination stage 1 trains
    for, and makes the Combiner insensitive to the overall scale of a backbone's features.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
        variant: Variant = "combiner",
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"unknown Combiner variant {variant!r}; expected one of {VARIANTS}")
        projection_dim = projection_dim or 4 * feature_dim
        hidden_dim = hidden_dim or 8 * feature_dim
        self.hparams = {
            "feature_dim": feature_dim,
            "projection_dim": projection_dim,
            "hidden_dim": hidden_dim,
            "dropout": dropout,
            "variant": variant,
        }
        self.skip, use_mixture = _VARIANTS[variant]
        needs_projection = self.skip == "learned" or use_mixture
        self.image_projection = self._projection(feature_dim, projection_dim, dropout) if needs_projection else None
        self.text_projection = self._projection(feature_dim, projection_dim, dropout) if needs_projection else None
        self.gate = (
            self._branch(2 * projection_dim, hidden_dim, 1, dropout, nn.Sigmoid())
            if self.skip == "learned"
            else None
        )
        self.mixture = self._branch(2 * projection_dim, hidden_dim, feature_dim, dropout) if use_mixture else None

    @staticmethod
    def _projection(dim_in: int, dim_out: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Dropout(dropout))

    @staticmethod
    def _branch(dim_in: int, hidden: int, dim_out: int, dropout: float, *head: nn.Module) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(dim_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim_out), *head
        )

    @property
    def variant(self) -> str:
        return self.hparams["variant"]

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Combined, L2-normalised query features ``[B, D]``."""
        img = F.normalize(image, dim=-1)
        txt = F.normalize(text, dim=-1)
        hidden = None
        if self.image_projection is not None:
            hidden = torch.cat((self.image_projection(img), self.text_projection(txt)), dim=-1)
        out = torch.zeros_like(img)
        if self.skip == "learned":
            lam = self.gate(hidden)
            out = out + (1 - lam) * img + lam * txt
        elif self.skip == "half":
            out = out + 0.5 * (img + txt)
        if self.mixture is not None:
            out = out + self.mixture(hidden)
        return F.normalize(out, dim=-1)


# --------------------------------------------------------------------------------------------
# The epoch loop shared by Combiner training, stage-1 and end-to-end fine-tuning
# --------------------------------------------------------------------------------------------


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor) -> float:
    """One (possibly loss-scaled) optimisation step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in one epoch: resuming at an epoch boundary replays it exactly."""
    return int(seed) * 1_000_003 + int(epoch)


def batch_slices(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of ``order``; a last partial batch is dropped unless it is the only one.

    Dropping it (as CLIP4Cir does) keeps the number of in-batch negatives, and hence the loss
    scale, the same for every step.
    """
    n = len(order)
    n_full = n // batch_size
    if n_full == 0:
        if n > 1:
            yield order
        return
    for i in range(n_full):
        yield order[i * batch_size : (i + 1) * batch_size]


# The metric each benchmark's model selection uses (CLIP4Cir's validation scripts; CIRCO: iSEARLE).
MAIN_METRICS = {"fashioniq": "average", "cirr": "avg", "circo": "mAP@10"}


def main_metric_for(dataset: str) -> str:
    """Default model-selection metric of a benchmark (see ``MAIN_METRICS``)."""
    if dataset not in MAIN_METRICS:
        raise ValueError(f"no default main metric for dataset {dataset!r}; pass main_metric explicitly")
    return MAIN_METRICS[dataset]


def best_epoch(history: Sequence[Mapping[str, float]], metric: str) -> int:
    """The epoch :class:`TrainingLoop` keeps: the first with the highest ``metric`` (0 if none ran)."""
    best, best_score = 0, -math.inf
    for row in history:
        if row[metric] > best_score:
            best, best_score = int(row["epoch"]), row[metric]
    return best


def merge_metrics(per_split: Mapping[str, Mapping[str, float]], dataset: str) -> dict[str, float]:
    """One metric dict for the validation splits of one benchmark.

    FashionIQ (one split per category) gets the category means plus ``average`` = (R@10 + R@50) / 2
    (:func:`cirlib.metrics.fashioniq_average`), other benchmarks their single split's dict. With
    several splits every metric also appears prefixed by its split name (``"dress/R@10"``), so the
    main metric keeps its name whether one category or three are validated.
    """
    if dataset == "fashioniq":
        merged = fashioniq_average(per_split)
    elif len(per_split) == 1:
        merged = dict(next(iter(per_split.values())))
    else:
        raise ValueError(f"only FashionIQ categories are averaged; validate {dataset} one split at a time")
    if len(per_split) > 1:
        merged |= {f"{name}/{k}": float(v) for name, m in per_split.items() for k, v in m.items()}
    return merged


def _one_benchmark(splits: Mapping[str, CIRSplit]) -> str:
    datasets = {split.dataset for split in splits.values()}
    if len(datasets) != 1:
        raise ValueError(f"validation splits must come from one benchmark, got {sorted(datasets)}")
    return datasets.pop()


def evaluate_splits(
    splits: Mapping[str, CIRSplit], features: Mapping[str, tuple[Tensor, Tensor, Tensor]], combine: CombineFn
) -> dict[str, float]:
    """Benchmark metrics of ``combine`` given ``(reference, text, gallery)`` features per split."""
    dataset = _one_benchmark(splits)
    per_split = {
        name: evaluate_split(split, apply_combine(combine, *features[name][:2]), features[name][2])
        for name, split in splits.items()
    }
    return merge_metrics(per_split, dataset)


def per_query_splits(
    splits: Mapping[str, CIRSplit], features: Mapping[str, tuple[Tensor, Tensor, Tensor]], combine: CombineFn
) -> PerQuery:
    """The per-query values behind :func:`evaluate_splits`'s numbers, for bootstrap intervals."""
    _one_benchmark(splits)
    return PerQuery.from_splits({
        name: {k: v.numpy() for k, v in per_query_metrics(
            split, apply_combine(combine, *features[name][:2]), features[name][2]).items()}
        for name, split in splits.items()
    })


@dataclass
class TrainingLoop:
    """Epochs of ``train_epoch`` + ``validate``, keeping the best epoch by ``main_metric``.

    After every epoch the loop writes one checkpoint (atomically) holding the current and the best
    weights of ``modules``, the optimizer and grad-scaler states, the history and the early-stopping
    counters, under a ``fingerprint`` of everything the run depends on. A later call with the same
    fingerprint resumes after the last finished epoch, or, if the run had finished, only loads the
    best weights. Each epoch reseeds torch from ``(seed, epoch)``, so an interrupted and resumed run
    gives the same result as an uninterrupted one.
    """

    modules: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpt_path: Path | None
    fingerprint: str
    epochs: int
    patience: int
    main_metric: str
    seed: int
    desc: str = "training"
    meta: dict = field(default_factory=dict)
    _state: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {self.epochs} and {self.patience}")
        self._state = self._load()

    def _load(self) -> dict | None:
        """The saved state for this fingerprint, or None (fresh start) with a warning if unusable."""
        if self.ckpt_path is None or not Path(self.ckpt_path).exists():
            return None
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged checkpoint must not block training
            warnings.warn(f"checkpoint {self.ckpt_path} is unreadable ({err}); training from scratch", stacklevel=3)
            return None
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(
                f"checkpoint {self.ckpt_path} belongs to another configuration or data "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint}); training from scratch",
                stacklevel=3,
            )
            return None
        return state

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights ``run`` leaves in ``modules`` (0 before any epoch)."""
        return int(self._state["best_epoch"]) if self._state else 0

    @property
    def finished(self) -> bool:
        """True when a checkpoint of this exact run says training already ended."""
        return bool(self._state and self._state["finished"])

    def _restore_best(self) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(self._state["best_modules"][name])

    def run(self, train_epoch: Callable[[int], float], validate: Callable[[], dict[str, float]]) -> list[dict]:
        """Train (or resume, or just load) and leave the best epoch's weights in ``modules``.

        ``train_epoch(epoch)`` trains one epoch (1-based) and returns its mean loss; ``validate()``
        returns the benchmark's metric dict and runs with all modules in eval mode without grads.
        Returns one dict per epoch: ``epoch``, ``loss``, the metrics and ``seconds``.
        """
        state = self._state
        if state is not None and state["finished"]:
            self._restore_best()
            return list(state["history"])
        if state is None:
            state = {
                "fingerprint": self.fingerprint,
                "meta": self.meta,
                "epoch": 0,
                "history": [],
                "best_epoch": 0,
                "best_score": -math.inf,
                "bad_epochs": 0,
                "finished": False,
                "best_modules": None,
            }
        else:
            for name, module in self.modules.items():
                module.load_state_dict(state["modules"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        epochs = range(state["epoch"] + 1, self.epochs + 1)
        bar = tqdm(epochs, desc=self.desc, initial=state["epoch"], total=self.epochs)
        for epoch in bar:
            start = time.perf_counter()
            torch.manual_seed(epoch_seed(self.seed, epoch))
            loss = float(train_epoch(epoch))
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.desc}: loss became {loss} in epoch {epoch}; lower the learning rate")
            for module in self.modules.values():
                module.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in validate().items()}
            if self.main_metric not in metrics:
                raise KeyError(
                    f"{self.desc}: main metric {self.main_metric!r} is not among the validation metrics "
                    f"{sorted(metrics)}"
                )
            score = metrics[self.main_metric]
            if not math.isfinite(score):
                raise ValueError(f"{self.desc}: main metric {self.main_metric!r} is {score} in epoch {epoch}")
            state["history"].append({"epoch": epoch, "loss": loss, **metrics, "seconds": time.perf_counter() - start})
            if score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                state["best_modules"] = {
                    name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                    for name, m in self.modules.items()
                }
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["finished"] = epoch == self.epochs or state["bad_epochs"] >= self.patience
            self._save(state)
            bar.set_postfix(loss=f"{loss:.4f}", **{self.main_metric: f"{score:.2f}"}, best=state["best_epoch"])
            if state["finished"]:
                break
        bar.close()
        self._state = state
        self._restore_best()
        return list(state["history"])

    def _save(self, state: dict) -> None:
        state["modules"] = {name: m.state_dict() for name, m in self.modules.items()}
        state["optimizer"] = self.optimizer.state_dict()
        state["scaler"] = self.scaler.state_dict()
        if self.ckpt_path is not None:
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)


# --------------------------------------------------------------------------------------------
# Cached features and Combiner training
# --------------------------------------------------------------------------------------------


@dataclass
class CombinerData:
    """Frozen-encoder features of training triplets, stored once per distinct image and text.

    ``text_index[i]`` lists ``V`` caption renderings of triplet ``i`` (for FashionIQ: random
    caption order or a single caption, drawn with :func:`cirlib.datasets.query_text`), so the
    training-time caption augmentation still works on cached text features: each epoch picks one
    of the ``V`` per triplet.
    """

    images: Tensor  # [M, D] features of every distinct reference/target image
    reference_index: Tensor  # [N] long, row of images
    target_index: Tensor  # [N] long, row of images
    texts: Tensor  # [U, D] features of every distinct caption rendering
    text_index: Tensor  # [N, V] long, rows of texts
    dataset: str  # benchmark of the triplets: picks the default main metric

    def __post_init__(self) -> None:
        n = len(self.reference_index)
        if self.images.ndim != 2 or self.texts.ndim != 2 or self.images.shape[1] != self.texts.shape[1]:
            raise ValueError(
                f"images and texts must be [*, D] with one D; got {tuple(self.images.shape)} "
                f"and {tuple(self.texts.shape)}"
            )
        if self.target_index.shape != (n,) or self.text_index.ndim != 2 or self.text_index.shape[0] != n:
            raise ValueError(
                f"index shapes disagree: reference {tuple(self.reference_index.shape)}, target "
                f"{tuple(self.target_index.shape)}, text {tuple(self.text_index.shape)}"
            )

    def __len__(self) -> int:
        return len(self.reference_index)

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[1])

    def fingerprint(self) -> str:
        """Content hash of the features and indices (keys Combiner checkpoints to their data)."""
        h = hashlib.sha256(self.dataset.encode())
        for t in (self.images, self.reference_index, self.target_index, self.texts, self.text_index):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> "CombinerData":
        tensors = (self.images, self.reference_index, self.target_index, self.texts, self.text_index)
        return CombinerData(*(t.to(device) for t in tensors), dataset=self.dataset)


def training_triplets(splits: Sequence[CIRSplit]) -> list[tuple[CIRSplit, Query]]:
    """Queries usable for training: a target and both images on disk (one warning for the rest)."""
    usable, skipped, example = [], 0, None
    for split in splits:
        for q in split.queries:
            if q.target is not None and q.reference in split.image_paths and q.target in split.image_paths:
                usable.append((split, q))
            else:
                skipped += 1
                example = example or f"{split.dataset}/{split.split}: {q.reference} -> {q.target}"
    if skipped:
        warnings.warn(
            f"{skipped} training queries skipped (no target or a missing image), e.g. {example}", stacklevel=2
        )
    if not usable:
        raise ValueError("no usable training triplets in " + ", ".join(f"{s.dataset}/{s.split}" for s in splits))
    return usable


def build_combiner_data(
    splits: CIRSplit | Sequence[CIRSplit],
    backbone: "Backbone",
    transform_kind: TransformKind = "targetpad",
    target_ratio: float = DEFAULT_TARGET_RATIO,
    caption_samples: int = 8,
    seed: int = 0,
    cache_dir: Path | str | None = None,
    batch_size: int = 256,
) -> CombinerData:
    """Encode the triplets of ``splits`` once with ``backbone`` (image features cached on disk).

    The images are read through the decoded-pixel cache that stage-1 fine-tuning of the same
    triplets keeps under ``cache_dir`` (``image_features(decoded=True)``), so encoding the training
    set with each stage-1 model costs the encoder only.

    Each triplet gets ``caption_samples`` renderings from ``query_text(query, rng)``; datasets with
    one caption per query (CIRR) render identically, so only distinct strings are encoded.
    """
    splits = [splits] if isinstance(splits, CIRSplit) else list(splits)
    datasets = {s.dataset for s in splits}
    if len(datasets) != 1:
        raise ValueError(f"training splits must come from one benchmark, got {sorted(datasets)}")
    triplets = training_triplets(splits)
    rng = np.random.default_rng(seed)
    image_rows: dict[Path, int] = {}
    text_rows: dict[str, int] = {}
    ref_idx, tgt_idx, txt_idx = [], [], []
    for split, q in triplets:
        ref_idx.append(image_rows.setdefault(split.image_paths[q.reference], len(image_rows)))
        tgt_idx.append(image_rows.setdefault(split.image_paths[q.target], len(image_rows)))
        renderings = [query_text(q, rng) for _ in range(caption_samples)]
        txt_idx.append([text_rows.setdefault(t, len(text_rows)) for t in renderings])
    return CombinerData(
        images=image_features(
            backbone, list(image_rows), transform_kind, target_ratio, batch_size=batch_size, cache_dir=cache_dir,
            decoded=True,
        ),
        reference_index=torch.tensor(ref_idx, dtype=torch.long),
        target_index=torch.tensor(tgt_idx, dtype=torch.long),
        texts=text_features(backbone, list(text_rows)),
        text_index=torch.tensor(txt_idx, dtype=torch.long),
        dataset=datasets.pop(),
    )


class CachedEvaluator:
    """Validation for frozen encoders: ``val_fn(combine) -> metrics``, ``val_fn.per_query(combine)``.

    The splits' query and gallery features are extracted once (:func:`cirlib.features.encode_split`,
    so they share the cache of the notebooks' other evaluations); every call only applies
    ``combine`` and the benchmark protocol (:func:`cirlib.evaluate.evaluate_split`), so it serves the
    zero-shot/stage-1 Sum rows and every epoch of Combiner training alike.
    """

    def __init__(
        self,
        splits: CIRSplit | Mapping[str, CIRSplit],
        backbone: "Backbone",
        transform_kind: TransformKind = "targetpad",
        target_ratio: float = DEFAULT_TARGET_RATIO,
        cache_dir: Path | str | None = None,
    ) -> None:
        self.splits = {"val": splits} if isinstance(splits, CIRSplit) else dict(splits)
        self.features = {}
        for name, split in self.splits.items():
            f = encode_split(backbone, split, transform_kind, target_ratio, cache_dir)
            self.features[name] = (f.reference, f.text, f.gallery)

    def __call__(self, combine: CombineFn) -> dict[str, float]:
        return evaluate_splits(self.splits, self.features, combine)

    def per_query(self, combine: CombineFn) -> PerQuery:
        return per_query_splits(self.splits, self.features, combine)


def apply_combine(combine: CombineFn, image: Tensor, text: Tensor, batch_size: int = 4096) -> Tensor:
    """``combine`` over all rows in batches, on the device of its parameters, result on the CPU."""
    module = combine if isinstance(combine, nn.Module) else None
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else image.device
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            out = [
                combine(image[i : i + batch_size].to(device), text[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(image), batch_size)
            ]
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(out) if out else image.new_zeros(0, image.shape[1])


@dataclass(frozen=True)
class CombinerConfig:
    """Combiner training hyper-parameters. Defaults are CLIP4Cir's (§4.1) for real CLIP features.

    Widths are multiples of the feature dimension ``d``: projections ``d -> 4d`` and hidden layers
    ``8d`` in the paper. :meth:`for_tiny` is the setting for the course's tiny backbone: its few
    thousand triplets per benchmark want smaller batches (more steps per epoch) and a larger
    learning rate than 18k-36k triplets at batch size 4096, and half-width layers (2d / 4d), which
    validated as well as the paper's widths on the embedded FashionIQ while making an epoch ~3.5x
    cheaper (the paper's widths cost ~1/25 of re-encoding the images with the tiny backbone, these
    ~1/90; tests/benchmarks/bench_combiner.py).
    """

    variant: Variant = "combiner"
    projection_factor: float = 4.0  # projection width = factor * d
    hidden_factor: float = 8.0  # hidden width = factor * d
    dropout: float = 0.5
    lr: float = 2e-5
    weight_decay: float = 0.0  # CLIP4Cir trains the Combiner with plain Adam
    batch_size: int = 4096
    epochs: int = 300
    patience: int = 20
    scale: float = 100.0  # tau of Eq. (1)
    main_metric: str | None = None  # None: the benchmark's (MAIN_METRICS)
    seed: int = 0
    amp: bool = True  # mixed precision where the device has it (cirlib.device.amp_dtype)
    device: str = "auto"

    @classmethod
    def for_tiny(cls, **overrides) -> "CombinerConfig":
        tiny = {
            "projection_factor": 2.0,
            "hidden_factor": 4.0,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "batch_size": 256,
            "epochs": 60,
            "patience": 10,
        }
        return cls(**{**tiny, **overrides})

    def build(self, feature_dim: int) -> Combiner:
        """A freshly initialised Combiner of this configuration for ``feature_dim``-d features.

        Initialisation is seeded from ``seed`` (in a forked RNG), so the same config gives the same
        weights whatever ran before in the process (notebooks re-executed by nbval included).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return Combiner(
                feature_dim,
                round(self.projection_factor * feature_dim),
                round(self.hidden_factor * feature_dim),
                self.dropout,
                self.variant,
            )


def train_combiner(
    train: CombinerData,
    val_fn: Callable[[CombineFn], dict[str, float]],
    config: CombinerConfig = CombinerConfig(),
    ckpt_path: Path | str | None = None,
) -> tuple[Combiner, list[dict]]:
    """Train a Combiner from scratch on cached features; return the best epoch's model and the history.

    ``val_fn(combiner)`` is called after every epoch (see :class:`CachedEvaluator`) and must return
    ``config.main_metric``. With ``ckpt_path`` the run is checkpointed, resumable and, once
    finished, returned without retraining for the same config and data.
    """
    device = get_device(config.device)
    combiner = config.build(train.feature_dim)
    if not any(True for _ in combiner.parameters()):
        raise ValueError(f"Combiner variant {config.variant!r} has no parameters to train; evaluate it directly")
    combiner.to(device)
    optimizer = torch.optim.AdamW(combiner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, config.amp)
    config_dict = {k: v for k, v in asdict(config).items() if k != "device"}
    loop = TrainingLoop(
        modules={"combiner": combiner},
        optimizer=optimizer,
        scaler=scaler,
        ckpt_path=Path(ckpt_path) if ckpt_path is not None else None,
        fingerprint=fingerprint({"stage": "combiner", "config": config_dict, "data": train.fingerprint(),
                                 "precision": precision(device, config.amp)}),
        epochs=config.epochs,
        patience=config.patience,
        main_metric=config.main_metric or main_metric_for(train.dataset),
        seed=config.seed,
        desc=f"Combiner ({config.variant})",
        meta={"hparams": combiner.hparams, "config": config_dict},
    )
    data = train.to(device) if not loop.finished else train

    def train_epoch(epoch: int) -> float:
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        order = torch.randperm(len(data), generator=gen)
        choice = torch.randint(data.text_index.shape[1], (len(data),), generator=gen)
        combiner.train()
        losses = []
        for rows in batch_slices(order, config.batch_size):
            rows_d = rows.to(device)
            ref = data.images[data.reference_index[rows_d]]
            tgt = data.images[data.target_index[rows_d]]
            txt = data.texts[data.text_index[rows_d, choice[rows].to(device)]]
            with autocast(device, config.amp):
                query = combiner(ref, txt)
            losses.append(optimizer_step(optimizer, scaler, batch_contrastive_loss(query, tgt, config.scale)))
        return float(np.mean(losses))

    history = loop.run(train_epoch, lambda: val_fn(combiner))
    combiner.eval()
    return combiner, history


def load_combiner(ckpt_path: Path | str, device: str | torch.device = "auto") -> Combiner:
    """The best Combiner of a :func:`train_combiner` (or end-to-end :func:`cirlib.finetune.finetune`)
    checkpoint, in eval mode."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not state.get("best_modules") or "combiner" not in state["best_modules"]:
        raise ValueError(f"{ckpt_path} holds no trained Combiner (field 'best_modules.combiner')")
    combiner = Combiner(**state["meta"]["hparams"])
    combiner.load_state_dict(state["best_modules"]["combiner"])
    return combiner.to(get_device(device)).eval()
