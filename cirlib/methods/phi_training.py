"""Training phi by distilling OTI's tokens, with hard negatives from k-means clusters.

phi maps an image feature to the token OTI found for it. The loss is the symmetric contrastive
distillation (each prediction must be nearer its own OTI token than every other token of the
batch), plus L_gpt on phi's tokens (the same sentence regulariser as OTI) and a penalty on their
squared norm. Random batches of varied images make the contrast easy; hard-negative sampling puts
a share ``alpha`` of every batch in one k-means cluster of image features, so phi must separate
look-alikes. Training runs in the shared :class:`~cirlib.core.training.TrainingLoop` (resumable
checkpoints keyed by config and data), on cached features only: an epoch costs the MLP plus, with
L_gpt, one text-encoder pass per batch.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cirlib.core.device import autocast, get_device, grad_scaler, precision
from cirlib.core.io import tensor_digest
from cirlib.core.training import TrainingLoop, epoch_seed, optimizer_step
from cirlib.methods.losses import clip_loss, cosine_loss, distillation_loss, norm_penalty
from cirlib.methods.oti import ConceptSpec, PhraseSampler, Regularisation
from cirlib.models.phi import Phi
from cirlib.models.pseudo_word import encode_with_pseudo_words

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone


@dataclass(frozen=True)
class PhiConfig:
    """phi training hyper-parameters; defaults are the method's for CLIP ViT-B/32.

    ``distillation="cosine"`` is the ablation with ``1 - cos`` instead of the contrastive loss;
    ``distillation="cycle"`` the one without distillation: no OTI tokens, phi's prompt "a photo of
    $" is contrasted with the image features directly (:func:`cycle_loss`, needs the backbone);
    ``lambda_gpt=0`` (or no concepts) the one without L_gpt, ``lambda_pen=0`` the one without the
    penalty, ``alpha=0`` the one with random batches. ``clusters`` is k-means' K (at most half
    the images, so that clusters hold several images each).
    """

    epochs: int = 115
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    dropout: float = 0.5
    temperature: float = 0.25
    lambda_distil: float = 1.0
    lambda_gpt: float = 0.75
    lambda_pen: float = 3e-3
    distillation: Literal["contrastive", "cosine", "cycle"] = "contrastive"
    regularisation: Regularisation = "gpt"
    alpha: float = 0.5  # share of each batch drawn from one k-means cluster
    clusters: int = 64
    seed: int = 0
    amp: bool = True
    device: str = "auto"  # where phi trains when no backbone is given (else the backbone's device)
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1) (some rows of each batch stay random), got {self.alpha}")
        if self.distillation not in ("contrastive", "cosine", "cycle"):
            raise ValueError(f"distillation must be 'contrastive', 'cosine' or 'cycle', got {self.distillation!r}")

    @classmethod
    def quick(cls, **overrides) -> "PhiConfig":
        """A few epochs of small batches at a larger learning rate, for tests and quick notebook runs."""
        return cls(**{"epochs": 20, "lr": 1e-3, "batch_size": 32, "clusters": 8, **overrides})


def cluster_images(features: Tensor, n_clusters: int, seed: int = 0) -> Tensor:
    """k-means cluster (faiss) of each L2-normalised image feature: labels ``[N]`` (long).

    Normalising first clusters by cosine, the similarity retrieval and the losses use.
    """
    n = len(features)
    k = max(1, min(n_clusters, n // 2))
    x = np.ascontiguousarray(F.normalize(features.detach().float().cpu(), dim=-1).numpy())
    kmeans = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return torch.from_numpy(labels[:, 0].astype(np.int64))


def hard_negative_batches(labels: Tensor, batch_size: int, alpha: float, generator: torch.Generator) -> list[Tensor]:
    """One epoch of batches, each with at least ``ceil(alpha * batch)`` rows from one cluster.

    Every row appears in the epoch at least once: each batch's cluster share takes that cluster's
    unseen rows first (then seen ones, if it has too few left) and the rest of the batch is filled
    with unseen rows of any cluster, in random order; the last batch is topped up with seen rows.
    The cluster of a batch is drawn in proportion to its unseen rows, among clusters large enough
    to supply the share. ``batch_size`` is capped at the number of rows.
    """
    n = len(labels)
    if n < 2:
        raise ValueError(f"a contrastive batch needs at least 2 rows, got {n}")
    b = min(batch_size, n)
    share = math.ceil(alpha * b)
    if share >= b:
        raise ValueError(f"alpha {alpha} leaves no random rows in batches of {b}")
    order = torch.randperm(n, generator=generator).tolist()
    members: dict[int, list[int]] = {}
    for i in order:
        members.setdefault(int(labels[i]), []).append(i)
    eligible = [c for c, rows in members.items() if len(rows) >= share]
    if share and not eligible:
        raise ValueError(
            f"no cluster holds {share} rows (alpha {alpha} of batch {b}; largest has "
            f"{max(len(r) for r in members.values())}); use fewer clusters or a smaller alpha"
        )
    unseen_of = {c: deque(rows) for c, rows in members.items()}
    unseen_count = {c: len(rows) for c, rows in members.items()}
    fill = deque(order)
    seen = [False] * n
    batches: list[Tensor] = []

    def take(i: int, batch: list[int], in_batch: set[int]) -> None:
        batch.append(i)
        in_batch.add(i)
        if not seen[i]:
            seen[i] = True
            unseen_count[int(labels[i])] -= 1

    while fill:
        batch: list[int] = []
        in_batch: set[int] = set()
        if share:
            weights = torch.tensor([float(unseen_count[c]) for c in eligible])
            weights = weights if weights.sum() > 0 else torch.ones(len(eligible))
            cluster = eligible[int(torch.multinomial(weights, 1, generator=generator))]
            queue = unseen_of[cluster]
            while queue and len(batch) < share:
                i = queue.popleft()
                if not seen[i]:
                    take(i, batch, in_batch)
            for j in torch.randperm(len(members[cluster]), generator=generator).tolist():
                if len(batch) >= share:
                    break
                if members[cluster][j] not in in_batch:
                    take(members[cluster][j], batch, in_batch)
        while fill and len(batch) < b:
            i = fill.popleft()
            if not seen[i]:
                take(i, batch, in_batch)
        for i in torch.randperm(n, generator=generator).tolist():
            if len(batch) >= b:
                break
            if i not in in_batch:
                take(i, batch, in_batch)
        batches.append(torch.tensor(batch))
        while fill and seen[fill[0]]:
            fill.popleft()
    return batches


CYCLE_PROMPT = "a photo of $"
"""The prompt through which the ``cycle`` ablation reads phi's token against its image."""


def cycle_loss(backbone: "Backbone", image_features: Tensor, tokens: Tensor) -> Tensor:
    """The ablation without distillation: CLIP's symmetric InfoNCE between the image features and
    the text features of :data:`CYCLE_PROMPT` holding each image's predicted token, at the
    backbone's own learned temperature. phi then learns from images and the frozen text tower
    alone, as textual inversion did before OTI tokens were pre-computed."""
    text = encode_with_pseudo_words(backbone, CYCLE_PROMPT, tokens)
    scale = backbone.model.logit_scale.detach().float().exp()
    return clip_loss(F.normalize(image_features.float(), dim=-1), F.normalize(text.float(), dim=-1), scale)


def train_phi(
    image_features: Tensor,
    oti_tokens: Tensor,
    backbone: "Backbone | None" = None,
    concepts: ConceptSpec | None = None,
    phrases: Mapping[str, Sequence[str]] | None = None,
    config: PhiConfig = PhiConfig(),
    ckpt_path: Path | str | None = None,
) -> tuple[Phi, list[dict]]:
    """Train phi from scratch on ``image_features`` ``[N, D]`` and their OTI tokens ``[N, W]``.

    L_gpt needs the ``backbone`` whose text tower reads the tokens and ``concepts`` / ``phrases``
    as for :func:`cirlib.methods.oti.oti`; without them (or with ``lambda_gpt=0``) it is off. Runs
    on the backbone's device (else ``get_device(config.device)``). Returns phi in eval mode and one
    history row per epoch (mean ``loss``, ``distil``, ``pen`` and, when on, ``gpt``).
    """
    n = len(image_features)
    if oti_tokens.ndim != 2 or image_features.ndim != 2 or len(oti_tokens) != n:
        raise ValueError(
            f"need image features [N, D] and OTI tokens [N, W] for the same N, got "
            f"{tuple(image_features.shape)} and {tuple(oti_tokens.shape)}"
        )
    if config.distillation == "cycle" and backbone is None:
        raise ValueError("distillation='cycle' reads phi's tokens through the text tower: pass the backbone")
    device = backbone.device if backbone is not None else get_device(config.device)
    use_gpt = backbone is not None and concepts is not None and config.lambda_gpt > 0
    sampler = PhraseSampler(backbone, concepts, phrases, n, config.regularisation) if use_gpt else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        phi = Phi.for_dims(image_features.shape[1], oti_tokens.shape[1], config.dropout).to(device)
    config_dict = {k: v for k, v in asdict(config).items() if k not in ("device", "progress")}
    loop = TrainingLoop(
        modules={"phi": phi},
        optimizer=torch.optim.AdamW(phi.parameters(), lr=config.lr, weight_decay=config.weight_decay),
        scaler=grad_scaler(device, config.amp),
        ckpt_path=Path(ckpt_path) if ckpt_path is not None else None,
        fingerprint={
            "stage": "phi", "config": config_dict, "data": tensor_digest(image_features, oti_tokens),
            "gpt": [backbone.fingerprint, concepts, phrases] if use_gpt else None,
            "precision": precision(device, config.amp),
        },
        epochs=config.epochs,
        seed=config.seed,
        desc="phi",
        progress=config.progress,
        meta={"hparams": phi.hparams, "config": config_dict},
    )
    labels = cluster_images(image_features, config.clusters, config.seed) if config.alpha > 0 and not loop.finished \
        else torch.zeros(n, dtype=torch.long)
    x_all, t_all = image_features.float().to(device), oti_tokens.float().to(device)
    log: dict[str, list[float]] = {}

    def batch_loss(rows: Tensor, generator: torch.Generator) -> Tensor:
        x, target = x_all[rows.to(device)], t_all[rows.to(device)]
        with autocast(device, config.amp):
            predicted = phi(x).float()
        if config.distillation == "contrastive":
            distil = distillation_loss(predicted, target, config.temperature)
        elif config.distillation == "cosine":
            distil = cosine_loss(predicted, target)
        else:
            with autocast(device, config.amp):
                distil = cycle_loss(backbone, x, predicted)
        terms = {"distil": distil, "pen": norm_penalty(predicted)}
        total = config.lambda_distil * distil + config.lambda_pen * terms["pen"]
        if sampler is not None:
            drawn = [sampler.draw(int(i), generator) for i in rows]
            with autocast(device, config.amp):
                y_star = encode_with_pseudo_words(backbone, [p for _, p in drawn], predicted)
            terms["gpt"] = cosine_loss(y_star, sampler.features([p for p, _ in drawn]).to(device))
            total = total + config.lambda_gpt * terms["gpt"]
        for name, value in terms.items():
            log.setdefault(name, []).append(float(value.detach()))
        return total

    def train_epoch(epoch: int) -> dict[str, float]:
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        batches = hard_negative_batches(labels, config.batch_size, config.alpha, generator)
        phi.train()
        log.clear()
        losses = [optimizer_step(loop.optimizer, loop.scaler, [partial(batch_loss, rows, generator)])
                  for rows in batches]
        return {"loss": float(np.mean(losses)), **{k: float(np.mean(v)) for k, v in log.items()}}

    history = loop.run(train_epoch)
    phi.eval()
    return phi, history
