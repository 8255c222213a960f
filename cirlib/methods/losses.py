"""The contrastive losses of every training stage, in one place.

Stage-1 fine-tuning, Combiner training and end-to-end training all optimise CLIP4Cir's batch
contrastive loss (Eq. 1): each combined query must be closer (in cosine similarity) to its own
target than to every other target in the batch. Pretraining the tiny CLIP optimises CLIP's
symmetric loss between images and captions. Keeping one implementation of each guarantees the
stages are comparable.

Both losses can score a share of the batch against all of it: in data-parallel training each
process computes the terms of its own rows against the batch gathered from every process
(:func:`cirlib.core.distributed.gather`), and the mean over processes is the one-process loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_logits(query: Tensor, target: Tensor, scale: float = 100.0) -> Tensor:
    """``scale * cos(query_i, target_j)`` as a ``[Q, T]`` matrix (fp32, whatever the input dtype).

    The cosine is computed in fp32 because under fp16 autocast ``scale * cos`` loses most of its
    resolution near the top of the range, exactly where the softmax is decided.
    """
    if query.ndim != 2 or target.ndim != 2 or query.shape[1] != target.shape[1]:
        raise ValueError(
            f"query and target must both be [*, D] with the same D; got {tuple(query.shape)} "
            f"and {tuple(target.shape)}"
        )
    q = F.normalize(query.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    return scale * q @ t.T


def batch_contrastive_loss(query: Tensor, target: Tensor, scale: float = 100.0, offset: int = 0) -> Tensor:
    """CLIP4Cir Eq. (1): mean cross-entropy of each query against all targets of the batch.

    Row ``i`` of ``scale * cos(query, target)`` is a classification over the batch's targets whose
    correct class is ``offset + i`` (the diagonal when ``query`` is the whole batch and ``offset``
    is 0). ``scale`` is the paper's tau (100, as in CLIP), which gives the logits enough dynamic
    range; features need not be normalised beforehand.
    """
    if offset < 0 or offset + len(query) > len(target):
        raise ValueError(
            f"queries {tuple(query.shape)} at offset {offset} do not fit the targets {tuple(target.shape)}"
        )
    logits = contrastive_logits(query, target, scale)
    labels = torch.arange(offset, offset + logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    groups: Tensor | None = None,
    rows: slice | None = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE over a batch of L2-normalised image and text features.

    ``groups[i]`` identifies pair ``i``'s caption; pairs in the same group are all positives of
    each other, each with equal target weight (a small attribute space repeats captions within a
    batch, and those pairs are not negatives). With all groups distinct (or ``None``) this is
    exactly CLIP's ``(CE(logits, arange) + CE(logits.T, arange)) / 2``. ``rows`` restricts the
    terms to those pairs' images and texts, still scored against the whole batch.
    """
    rows = rows if rows is not None else slice(0, len(image_features))
    if groups is None:
        groups = torch.arange(len(image_features), device=image_features.device)
    logits = logit_scale * image_features @ text_features.T
    targets = (groups[rows].unsqueeze(1) == groups.unsqueeze(0)).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i2t = -(targets * F.log_softmax(logits[rows], dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits[:, rows].T, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
