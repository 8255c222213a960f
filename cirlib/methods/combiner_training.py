"""Training the CLIP4Cir Combiner (§3.2) on cached features of frozen encoders.

The Combiner is tiny, so an epoch over cached features costs milliseconds while re-encoding the
images would cost minutes (tests/perf/perf_combiner.py measures the ratio). End-to-end training of
the encoders together with the Combiner (CLIP4Cir Tables 5-6) is stage-1 fine-tuning with a
Combiner as combining function: :func:`cirlib.methods.stage1.finetune` with ``combiner=...``.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cirlib.core import distributed
from cirlib.core.device import autocast, get_device, grad_scaler, precision
from cirlib.core.training import TrainingLoop, batch_slices, epoch_seed, optimizer_step, step_batches
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.protocols import main_metric_for
from cirlib.methods.losses import batch_contrastive_loss
from cirlib.models.combiner import CombineFn, Combiner, Variant
from cirlib.models.features import image_features, text_features

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone


@dataclass
class CombinerData:
    """Frozen-encoder features of training triplets, stored once per distinct image and text.

    ``text_index[i]`` lists ``V`` caption renderings of triplet ``i`` (for FashionIQ: random
    caption order or a single caption, drawn with :func:`cirlib.data.datasets.query_text`), so the
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
    if len(usable) < 2:  # a contrastive batch needs another target as negative
        raise ValueError(
            f"{len(usable)} usable training triplet(s) in " + ", ".join(f"{s.dataset}/{s.split}" for s in splits)
            + "; contrastive training needs at least 2"
        )
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
    """Encode the triplets of ``splits`` once with ``backbone`` (image and caption features cached on disk).

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
    with distributed.main_first():  # rank 0 writes the feature caches, the other processes read them
        images = image_features(
            backbone, list(image_rows), transform_kind, target_ratio, batch_size=batch_size, cache_dir=cache_dir,
            decoded=True,
        )
        texts = text_features(backbone, list(text_rows), cache_dir=cache_dir)
    return CombinerData(
        images=images,
        reference_index=torch.tensor(ref_idx, dtype=torch.long),
        target_index=torch.tensor(tgt_idx, dtype=torch.long),
        texts=texts,
        text_index=torch.tensor(txt_idx, dtype=torch.long),
        dataset=datasets.pop(),
    )


@dataclass(frozen=True)
class CombinerConfig:
    """Combiner training hyper-parameters. Defaults are CLIP4Cir's (§4.1) for real CLIP features.

    Widths are multiples of the feature dimension ``d``: projections ``d -> 4d`` and hidden layers
    ``8d`` in the paper. :meth:`for_tiny` is the setting for the course's tiny backbone: its few
    thousand triplets per benchmark want smaller batches (more steps per epoch) and a larger
    learning rate than 18k-36k triplets at batch size 4096, and half-width layers (2d / 4d), which
    validated as well as the paper's widths on the embedded FashionIQ while making an epoch ~3.5x
    cheaper (the paper's widths cost ~1/25 of re-encoding the images with the tiny backbone, these
    ~1/90; tests/perf/perf_combiner.py).
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
    amp: bool = True  # mixed precision where the device has it (cirlib.core.device.amp_dtype)
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


def _combiner_loop(
    combiner: Combiner, train: CombinerData, config: CombinerConfig, device: torch.device, ckpt_path: Path | str | None
) -> TrainingLoop:
    """The shared loop with AdamW, keyed by the config (less the device), the data and the arithmetic."""
    config_dict = {k: v for k, v in asdict(config).items() if k != "device"}
    return TrainingLoop(
        modules={"combiner": combiner},
        optimizer=torch.optim.AdamW(combiner.parameters(), lr=config.lr, weight_decay=config.weight_decay),
        scaler=grad_scaler(device, config.amp),
        ckpt_path=Path(ckpt_path) if ckpt_path is not None else None,
        fingerprint={"stage": "combiner", "config": config_dict, "data": train.fingerprint(),
                     "precision": precision(device, config.amp)},
        epochs=config.epochs,
        patience=config.patience,
        main_metric=config.main_metric or main_metric_for(train.dataset),
        seed=config.seed,
        desc=f"Combiner ({config.variant})",
        meta={"hparams": combiner.hparams, "config": config_dict},
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
    loop = _combiner_loop(combiner, train, config, device, ckpt_path)
    optimizer, scaler = loop.optimizer, loop.scaler
    data = train.to(device) if not loop.finished else train
    model = distributed.wrap(combiner)

    def batch_loss(rows: Tensor, choice: Tensor) -> Tensor:
        """Loss of this process's ``rows`` of a batch, against the targets of the whole batch."""
        rows_d = rows.to(device)
        ref = data.images[data.reference_index[rows_d]]
        tgt = data.images[data.target_index[rows_d]]
        txt = data.texts[data.text_index[rows_d, choice[rows].to(device)]]
        with autocast(device, config.amp):
            query = model(ref, txt)
        offset = distributed.local_rows(len(rows)).start
        return batch_contrastive_loss(query, distributed.gather(tgt), config.scale, offset)

    def train_epoch(epoch: int) -> float:
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        order = torch.randperm(len(data), generator=gen)
        choice = torch.randint(data.text_index.shape[1], (len(data),), generator=gen)
        combiner.train()
        losses = [
            optimizer_step(optimizer, scaler, [partial(batch_loss, rows, choice) for rows in step_batches(batch)],
                           models=[model])
            for batch in batch_slices(order, config.batch_size)
        ]
        return float(np.mean(losses))

    history = loop.run(train_epoch, lambda: val_fn(combiner))
    combiner.eval()
    return combiner, history
