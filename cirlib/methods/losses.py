"""The batch-based contrastive loss of CLIP4Cir (Eq. 1), shared by every training stage.

Stage-1 fine-tuning, Combiner training and end-to-end training all optimise the same objective:
each combined query must be closer (in cosine similarity) to its own target than to every other
target in the batch. Keeping one implementation guarantees the three stages are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_logits(query: Tensor, target: Tensor, scale: float = 100.0) -> Tensor:
    """``scale * cos(query_i, target_j)`` as a ``[B, B]`` matrix (fp32, whatever the input dtype).

    The cosine is computed in fp32 because under fp16 autocast ``scale * cos`` loses most of its
    resolution near the top of the range, exactly where the softmax is decided.
    """
    if query.ndim != 2 or target.ndim != 2 or query.shape != target.shape:
        raise ValueError(
            f"query and target must both be [B, D] with the same shape; got {tuple(query.shape)} "
            f"and {tuple(target.shape)}"
        )
    q = F.normalize(query.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    return scale * q @ t.T


def batch_contrastive_loss(query: Tensor, target: Tensor, scale: float = 100.0) -> Tensor:
    """CLIP4Cir Eq. (1): mean cross-entropy of each query against all targets of the batch.

    Row ``i`` of ``scale * cos(query, target)`` is a classification over the ``B`` targets whose
    correct class is ``i`` (the diagonal). ``scale`` is the paper's tau (100, as in CLIP), which
    gives the logits enough dynamic range; features need not be normalised beforehand.
    """
    logits = contrastive_logits(query, target, scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)
