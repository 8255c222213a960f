"""Stage 1 of CLIP4Cir (§3.1): task-oriented fine-tuning of the CLIP encoders.

The query is combined by the element-wise sum ``psi_I(I_q) + psi_T(T_q)`` and trained with the
batch contrastive loss (Eq. 1) against the target image features, so that captions become
*displacement vectors* in the image space ("additivity"). The image encoder, the text encoder or
both are updated (Tables 1-2: IFT, TFT, both; the CVPRW poster fine-tunes the text encoder only);
the other encoder is frozen and its features are computed once and reused. With a
:class:`~cirlib.models.combiner.Combiner` as combining function the same loop trains encoders and
Combiner end to end (Tables 5-6).

As in the reference implementation the whole CLIP model stays in eval mode: ResNet batch-norm
layers keep their running statistics (and their affine parameters are frozen too), and CLIP has
no dropout to switch on. Images are decoded and preprocessed once into a uint8 tensor cache
(:class:`~cirlib.data.pixels.PixelCache`), so training time goes into the encoders rather than into PNG decoding; on a
CPU the encoders' cost then decides the budget (see ``Stage1Config.epoch_size``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cirlib.core import distributed
from cirlib.core.device import autocast, grad_scaler, precision
from cirlib.core.io import fingerprint, write_json
from cirlib.core.training import TrainingLoop, batch_slices, epoch_seed, optimizer_step, step_batches
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.pixels import PixelCache
from cirlib.data.preprocess import DEFAULT_TARGET_RATIO, TransformKind
from cirlib.evaluation.protocols import LiveEvaluator, main_metric_for
from cirlib.methods.combiner_training import training_triplets
from cirlib.methods.losses import batch_contrastive_loss
from cirlib.models.backbone import save_backbone, sidecar_path
from cirlib.models.combiner import CombineFn, Combiner, combine_sum
from cirlib.models.features import image_features, text_features

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

Encoders = Literal["image", "text", "both"]


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 hyper-parameters. Defaults are CLIP4Cir's (§4.1) for pretrained CLIP RN50.

    Real CLIP needs a tiny learning rate (2e-6) not to forget its pretraining; the course's tiny
    backbone, pretrained from scratch on a few thousand images, moves much less per step at that
    rate, so :meth:`for_tiny` raises it and shrinks batch size and schedule to fit a CPU budget.
    ``main_metric=None`` selects by the dataset: FashionIQ ``average`` ((R@10 + R@50) / 2, averaged
    over categories), CIRR ``recall_mean`` (the mean of its seven recalls), CIRCO ``mAP@10``.
    """

    encoders: Encoders = "both"
    lr: float = 2e-6
    image_lr: float | None = None  # the image tower's learning rate when it differs from ``lr``
    weight_decay: float = 1e-2
    batch_size: int = 512  # 192 for RN50x4 on a 24 GB GPU
    accumulation: int = 1  # micro-batches per step: a batch that does not fit the memory at once
    epochs: int = 150
    patience: int = 10
    min_delta: float = 0.0  # a rise of the main metric below this does not reset ``patience``
    epoch_size: int | None = None  # triplets drawn per epoch (None: all); a CPU-budget knob
    scale: float = 100.0  # tau of Eq. (1)
    transform_kind: TransformKind = "targetpad"
    target_ratio: float = DEFAULT_TARGET_RATIO
    caption_augment: bool = True  # FashionIQ: random caption order or a single caption
    amp: bool = True  # mixed precision where the device has it (cirlib.core.device.amp_dtype)
    grad_checkpointing: bool = True  # transformer towers, CUDA only
    main_metric: str | None = None
    combiner_lr: float = 2e-5  # end-to-end training only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoders not in ("image", "text", "both"):
            raise ValueError(f"Stage1Config.encoders must be 'image', 'text' or 'both', got {self.encoders!r}")
        if self.image_lr is not None and not self.image_lr > 0:
            raise ValueError(f"Stage1Config.image_lr must be None or > 0, got {self.image_lr}")
        if self.epoch_size is not None and self.epoch_size < 2:
            raise ValueError(f"Stage1Config.epoch_size must be None or >= 2, got {self.epoch_size}")
        if self.accumulation < 1:
            raise ValueError(f"Stage1Config.accumulation must be >= 1, got {self.accumulation}")

    @classmethod
    def for_tiny(cls, **overrides) -> "Stage1Config":
        """The tiny backbone's setting. On a 2-core CPU, tuning the image tower (forward and
        backward of two images per triplet) runs at tens of triplets per second at best and the
        text tower alone a few times faster, so budgeted runs also set ``epoch_size``.

        One learning rate for both towers, as in the paper, but 3e-4: measured on the embedded
        benchmarks (epochs of 1,500 triplets, best of 4), both towers reached a validation score of
        34.9 on ``fashion`` (average of R@10 and R@50) and 77.2 on CIRR (mean recall) at 3e-4,
        33.7 and 74.2 with the image tower at 1e-4, 31.2 and 67.3 at 1e-5 (where ten epochs were
        needed for 36.7 and 72.8); the image tower alone 26.8 / 73.3 at 3e-4 against 28.7 / 71.0 at
        1e-4 and 27.2 / 62.1 at 1e-5; with the image tower at 3e-5, a text tower at 1e-3 trailed
        3e-4 (31.6 against 32.0 on ``fashion``, 69.0 against 71.8 on CIRR). So four epochs at 3e-4
        buy nearly what ten at the old rates did on ``fashion`` and more on CIRR, within the
        course's CPU budget.
        Early stopping counts epochs without a rise of more than a quarter point (``min_delta``):
        a curve that creeps up by hundredths has converged for this budget.
        """
        tiny = {"lr": 3e-4, "weight_decay": 1e-2, "batch_size": 64, "epochs": 4, "patience": 2, "min_delta": 0.25}
        return cls(**{**tiny, **overrides})


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module, encoders: Encoders) -> dict[str, nn.Parameter]:
    """The parameters stage 1 updates: the chosen tower(s), minus batch-norm affine parameters.

    The image tower is ``model.visual``; the text tower is everything else except the CLIP logit
    scale/bias, which Eq. (1) does not use (its temperature is the fixed ``scale``).
    """
    frozen_bn = {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p_name, _ in module.named_parameters(recurse=False)
    }
    chosen = {}
    for name, param in model.named_parameters():
        is_image = name.startswith("visual.")
        is_text = not is_image and name not in ("logit_scale", "logit_bias")
        wanted = (is_image and encoders in ("image", "both")) or (is_text and encoders in ("text", "both"))
        if wanted and name not in frozen_bn:
            chosen[name] = param
    return chosen


def _run_inputs(
    backbone: "Backbone", splits: Sequence[CIRSplit], config: Stage1Config, combiner: Combiner | None,
    validated: bool = True,
) -> dict[str, Any]:
    data = [
        (s.dataset, s.split, s.images_digest(), [(q.reference, q.target, list(q.captions)) for q in s.queries])
        for s in splits
    ]
    config_key = asdict(config)
    for key, default in (("accumulation", 1), ("min_delta", 0.0)):
        if config_key[key] == default:  # absent at its default: runs from before the option keep their checkpoints
            del config_key[key]
    selection = {} if validated else {"selection": "last epoch"}  # validated runs keep their older keys
    return {
        **selection,
        "stage": "end-to-end" if combiner is not None else "stage1",
        "config": config_key,
        "backbone": backbone.fingerprint,
        "combiner": combiner.hparams if combiner is not None else None,
        "precision": precision(backbone.device, config.amp),
        "data": fingerprint(data),
    }


@contextlib.contextmanager
def _training_setup(
    model: nn.Module, trainable: Mapping[str, nn.Parameter], grad_checkpointing: bool
) -> Iterator[None]:
    """Grads only for ``trainable`` (and checkpointing if asked) while training; the caller's flags after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        if grad_checkpointing:
            model.set_grad_checkpointing(False)
        model.eval()


class _Triplets(nn.Module):
    """The training triplets as one module: ``forward(rows, texts)`` gives queries and target features.

    The whole forward pass is one module because data-parallel training averages the gradients of
    what runs through ``forward`` (:func:`cirlib.core.distributed.wrap`). The tuned tower runs with
    grads: a tuned image tower reads its images from a :class:`PixelCache`, a frozen one encodes
    every image a single time up front through the feature cache (shared with the Combiner's
    training data, which needs the same features). With the text tower frozen each caption
    rendering is encoded when first seen and then reused.
    """

    def __init__(
        self,
        backbone: "Backbone",
        triplets: Sequence[tuple[CIRSplit, Query]],
        config: Stage1Config,
        cache_dir: Path | str | None,
        combiner: Combiner | None,
    ) -> None:
        super().__init__()
        self.backbone, self.model, self.combiner, self.amp = backbone, backbone.model, combiner, config.amp
        self.tune_image, self.tune_text = config.encoders in ("image", "both"), config.encoders in ("text", "both")
        paths = {n: s.image_paths[n] for s, q in triplets for n in (q.reference, q.target)}
        row = {n: i for i, n in enumerate(paths)}
        self.reference = torch.tensor([row[q.reference] for _, q in triplets])
        self.target = torch.tensor([row[q.target] for _, q in triplets])
        kind, ratio = config.transform_kind, config.target_ratio
        self.pixels, self.image_bank = None, None
        if self.tune_image:
            self.pixels = PixelCache(list(paths.values()), backbone.image_size, kind, ratio, cache_dir)
        else:
            self.image_bank = image_features(
                backbone, list(paths.values()), kind, ratio, batch_size=256, cache_dir=cache_dir, decoded=True,
                amp=self.amp,
            ).to(backbone.device)
        self.text_bank: dict[str, Tensor] = {}

    def images(self, rows: Tensor) -> Tensor:
        if self.image_bank is not None:
            return self.image_bank[rows.to(self.image_bank.device)]
        bb = self.backbone
        return bb.model.encode_image(self.pixels.batch(rows, bb.mean, bb.std, bb.device))

    def texts(self, texts: list[str]) -> Tensor:
        bb = self.backbone
        if self.tune_text:
            return bb.model.encode_text(bb.tokenize(texts).to(bb.device))
        new = [t for t in dict.fromkeys(texts) if t not in self.text_bank]
        if new:
            self.text_bank.update(zip(new, text_features(bb, new, progress=False, amp=self.amp).to(bb.device)))
        return torch.stack([self.text_bank[t] for t in texts])

    def forward(self, rows: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Combined queries and target features of triplets ``rows`` with captions ``texts``."""
        images = self.images(torch.cat((self.reference[rows], self.target[rows])))
        combine: CombineFn = self.combiner if self.combiner is not None else combine_sum
        return combine(images[: len(rows)], self.texts(texts)), images[len(rows) :]


class _Epochs:
    """``train_epoch`` of stage 1 for :class:`TrainingLoop`: one pass over (a draw of) the triplets.

    The triplet features are built at the first epoch, so a finished run decodes nothing; rank 0
    builds them first and writes the caches the other processes then read.
    """

    def __init__(
        self,
        backbone: "Backbone",
        triplets: Sequence[tuple[CIRSplit, Query]],
        config: Stage1Config,
        cache_dir: Path | str | None,
        combiner: Combiner | None,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.backbone, self.triplets, self.config, self.cache_dir = backbone, triplets, config, cache_dir
        self.combiner, self.optimizer, self.scaler = combiner, optimizer, scaler
        self.net: nn.Module | None = None  # _Triplets, data-parallel when several processes train

    def _batch_loss(self, rows: Tensor, texts: list[str]) -> Tensor:
        """Loss of this process's ``rows``, against the targets of the whole batch."""
        with autocast(self.backbone.device, self.config.amp):
            query, target = self.net(rows, texts)
        offset = distributed.local_rows(len(rows)).start
        return batch_contrastive_loss(query, distributed.gather(target), self.config.scale, offset)

    def __call__(self, epoch: int) -> float:
        config = self.config
        if self.net is None:
            with distributed.main_first():
                triplets = _Triplets(self.backbone, self.triplets, config, self.cache_dir, self.combiner)
            self.net = distributed.wrap(triplets)
        self.backbone.model.eval()  # frozen batch-norm statistics; CLIP has no dropout (CLIP4Cir does the same)
        if self.combiner is not None:
            self.combiner.train()
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        rng = np.random.default_rng(epoch_seed(config.seed, epoch))
        order = torch.randperm(len(self.triplets), generator=gen)[: config.epoch_size]
        batches = list(batch_slices(order, config.batch_size))
        losses = []
        for batch in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not distributed.is_main()):
            # every process draws the captions of the whole batch, so that the draws stay in step
            rows = batch.tolist()
            texts = dict(zip(rows, [query_text(self.triplets[i][1], rng if config.caption_augment else None)
                                    for i in rows]))
            micro = [partial(self._batch_loss, part, [texts[i] for i in part.tolist()])
                     for part in step_batches(batch, config.accumulation)]
            losses.append(optimizer_step(self.optimizer, self.scaler, micro, models=[self.net]))
        return float(np.mean(losses))


def _optimizer(
    params: Mapping[str, nn.Parameter], config: Stage1Config, combiner: Combiner | None
) -> torch.optim.AdamW:
    """AdamW with one parameter group per tower (their learning rates differ) and one for a Combiner."""
    image_lr = config.lr if config.image_lr is None else config.image_lr
    image = [p for n, p in params.items() if n.startswith("visual.")]
    text = [p for n, p in params.items() if not n.startswith("visual.")]
    groups = [
        {"params": tower, "lr": lr, "weight_decay": config.weight_decay}
        for tower, lr in ((image, image_lr), (text, config.lr))
        if tower
    ]
    if combiner is not None:
        groups.append({"params": list(combiner.parameters()), "lr": config.combiner_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-7)


def finetune(
    backbone: "Backbone",
    train_splits: CIRSplit | Sequence[CIRSplit],
    val_fn: Callable[["Backbone", CombineFn], dict[str, float]] | None,
    config: Stage1Config = Stage1Config(),
    out_dir: Path | str = "stage1",
    combiner: Combiner | None = None,
    cache_dir: Path | str | None = None,
) -> tuple["Backbone", list[dict]]:
    """Fine-tune ``backbone`` in place on the training triplets; return it (best epoch) and the history.

    ``val_fn(backbone, combine)`` (see :class:`cirlib.evaluation.protocols.LiveEvaluator`) runs
    after every epoch; the epoch with the best ``config.main_metric`` is kept. A ``LiveEvaluator``
    then stores its validation images' features in the feature cache when they belong to the kept
    weights. Without ``val_fn`` every one of ``config.epochs`` epochs is trained and the last is
    kept: a fixed budget that spares a validation pass per epoch (encoding every validation image
    again when the image tower trains). ``out_dir`` receives
    ``checkpoint.pt`` (resumable; a finished run with the same config, weights and data is loaded
    instead of retrained), ``history.json`` and ``backbone.safetensors`` (+ JSON, for
    :func:`cirlib.models.backbone.load_backbone`). With ``combiner`` the Combiner replaces the
    element-wise sum and is trained jointly (end-to-end, learning rate ``config.combiner_lr``); it
    is updated in place as well. ``cache_dir`` keeps the decoded training images
    (:class:`PixelCache`) for later runs.
    """
    splits = [train_splits] if isinstance(train_splits, CIRSplit) else list(train_splits)
    triplets = training_triplets(splits)
    out_dir = Path(out_dir)
    params = trainable_parameters(backbone.model, config.encoders)
    modules: dict[str, nn.Module] = {"model": backbone.model}
    if combiner is not None:
        modules["combiner"] = combiner.to(backbone.device)
    stage = "end-to-end" if combiner is not None else "stage1"
    validated = val_fn is not None
    run_inputs = _run_inputs(backbone, splits, config, combiner, validated)
    provenance = {
        "stage": stage, "run": fingerprint(run_inputs), "base_backbone": backbone.fingerprint, "config": asdict(config)
    }
    optimizer = _optimizer(params, config, combiner)
    loop = TrainingLoop(
        modules=modules,
        optimizer=optimizer,
        scaler=grad_scaler(backbone.device, config.amp),
        ckpt_path=out_dir / "checkpoint.pt",
        fingerprint=run_inputs,
        epochs=config.epochs,
        patience=config.patience if validated else None,
        min_delta=config.min_delta,
        main_metric=(config.main_metric or main_metric_for(splits[0].dataset)) if validated else None,
        seed=config.seed,
        desc=f"{stage} ({config.encoders})",
        meta={**provenance, "hparams": combiner.hparams if combiner is not None else None},
    )
    train_epoch = _Epochs(backbone, triplets, config, cache_dir, combiner, optimizer, loop.scaler)
    combine: CombineFn = combiner if combiner is not None else combine_sum
    with _training_setup(backbone.model, params, config.grad_checkpointing and backbone.device.type == "cuda"):
        history = loop.run(train_epoch, (lambda: val_fn(backbone, combine)) if validated else None)
    backbone.refresh_fingerprint()  # new weights: feature caches must not mistake them for the old
    if distributed.is_main():
        if isinstance(val_fn, LiveEvaluator):  # the kept epoch's validation images need no second encoding
            val_fn.store(backbone)
        write_json(out_dir / "history.json", history)
        _export(backbone, out_dir / "backbone.safetensors", {**provenance, "best_epoch": loop.best_epoch})
    return backbone, history


def _export(backbone: "Backbone", path: Path, provenance: dict) -> None:
    """Save the fine-tuned weights for later notebooks, unless this run's export is already there."""
    sidecar = sidecar_path(path)
    if path.exists() and sidecar.exists():
        try:
            if json.loads(sidecar.read_text(encoding="utf-8"))["provenance"]["run"] == provenance["run"]:
                return
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or foreign sidecar: overwrite it
    save_backbone(backbone, path, provenance)
