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


def _group_targets(rows: Tensor, groups: Tensor) -> Tensor:
    """``[R, B]`` target distributions: row ``i`` spreads equally over the pairs sharing its group."""
    targets = (rows.unsqueeze(1) == groups.unsqueeze(0)).float()
    return targets / targets.sum(dim=1, keepdim=True)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    groups: Tensor | None = None,
    rows: slice | None = None,
    foils: Tensor | None = None,
    foil_mask: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE over a batch of L2-normalised image and text features.

    ``groups[i]`` identifies pair ``i``'s caption; pairs in the same group are all positives of
    each other, each with equal target weight (a small attribute space repeats captions within a
    batch, and those pairs are not negatives). With all groups distinct (or ``None``) this is
    exactly CLIP's ``(CE(logits, arange) + CE(logits.T, arange)) / 2``. ``rows`` restricts the
    terms to those pairs' images and texts, still scored against the whole batch.

    ``foils`` (``[R, D]``, one per image of ``rows``, used where ``foil_mask`` is true) are
    normalised features of a caption that must *not* match its image, one extra negative class
    in that image's image-to-text term only (hard negatives, as in NegCLIP). Each foil is scored
    against its own image alone, so splitting the rows across processes leaves the loss unchanged.
    """
    rows = rows if rows is not None else slice(0, len(image_features))
    if groups is None:
        groups = torch.arange(len(image_features), device=image_features.device)
    logits = logit_scale * image_features @ text_features.T
    targets = _group_targets(groups[rows], groups)
    classes = logits[rows]  # what each image's softmax runs over: the batch's texts, then its foil
    if foils is not None:
        rows_n, width = len(classes), image_features.shape[1]
        if foil_mask is None or foils.shape != (rows_n, width) or foil_mask.shape != (rows_n,):
            raise ValueError(f"foils {tuple(foils.shape)} need a foil_mask and one row per image of the "
                             f"{rows_n} rows, of width {width}")
        foil_logits = logit_scale * (image_features[rows] * foils).sum(dim=1)
        classes = torch.cat([classes, foil_logits.masked_fill(~foil_mask, -torch.inf).unsqueeze(1)], dim=1)
    # the foil column is a class of the softmax but never a target: it is dropped after the
    # normalisation (a masked foil's -inf gets probability 0 and no gradient)
    log_probs = F.log_softmax(classes, dim=1)[:, : targets.shape[1]]
    loss_i2t = -(targets * log_probs).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits[:, rows].T, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def matching_loss(logits: Tensor, groups: Tensor | None = None) -> Tensor:
    """Image-text matching as a batch contrast: ``logits[i, j]`` scores caption ``i`` with image ``j``.

    :func:`clip_loss`'s symmetric cross-entropy, for a scorer that reads a caption and an image together
    (cross-attention) instead of comparing two features: each caption must pick its image among the
    batch's, and each image its caption. ``groups[i]`` identifies pair ``i``'s caption; pairs with
    equal captions are positives of each other with equal weight (generated captions repeat). In fp32.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1] or len(logits) < 2:
        raise ValueError(f"matching needs a square [B, B] score matrix with B >= 2, got {tuple(logits.shape)}")
    if groups is None:
        groups = torch.arange(len(logits), device=logits.device)
    if groups.shape != (len(logits),):
        raise ValueError(f"groups must be [B] for B = {len(logits)}, got {tuple(groups.shape)}")
    targets = _group_targets(groups, groups)
    logits = logits.float()
    loss_t2i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_i2t = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_t2i + loss_i2t) / 2


# Textual inversion (iSEARLE): a pseudo-word token per image, by optimisation (OTI) and by phi.


def cosine_loss(a: Tensor, b: Tensor, reduction: str = "mean") -> Tensor:
    """``1 - cos(a_i, b_i)`` in fp32, averaged over rows (``reduction="none"``: one per row).

    It is L_gpt (the text feature of a phrase with the pseudo-word against the same phrase with
    the image's concept word, which keeps the token where real words live and talking to them) and
    the cosine distillation that the contrastive one replaces.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [N, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _reduce(1 - F.cosine_similarity(a.float(), b.float(), dim=-1), reduction)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_row.mean() if reduction == "mean" else per_row


def content_loss(
    image_features: Tensor,
    text_features: Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    kind: str = "cosine",
    reduction: str = "mean",
) -> Tensor:
    """OTI's L_content: how far each pseudo-word prompt's text feature is from its image feature.

    Gaussian noise ``n ~ N(0, noise_std^2)`` (or the given ``noise``) is added to the raw text
    features first: image and text features of CLIP lie in separate regions (the modality gap),
    and the noise spreads each text feature over a ball that reaches the image's region, so the
    token is asked to be near the image up to the gap rather than to cross it. ``kind="cosine"``
    is ``mean(1 - cos(x, y + n))``; ``kind="l2"`` (an ablation) is the mean squared difference of
    the raw features, which also asks the text feature to take the image feature's norm.
    ``reduction="none"`` gives one loss per row.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features differ in shape: {tuple(image_features.shape)} vs {tuple(text_features.shape)}"
        )
    y = text_features.float()
    if noise is None and noise_std > 0:
        device = generator.device if generator is not None else y.device
        noise = noise_std * torch.randn(y.shape, generator=generator, device=device)
    if noise is not None:
        y = y + noise.to(y.device, torch.float32)
    if kind == "cosine":
        return cosine_loss(image_features, y, reduction)
    if kind == "l2":
        return _reduce((y - image_features.float()).pow(2).mean(dim=-1), reduction)
    raise ValueError(f"content loss kind must be 'cosine' or 'l2', got {kind!r}")


def distillation_loss(predicted: Tensor, target: Tensor, temperature: float = 0.25) -> Tensor:
    """phi's symmetric contrastive distillation (SimCLR's NT-Xent between predicted and OTI tokens).

    Each predicted token must be closer in cosine to its own OTI token than to any other token of
    the batch, predicted or OTI, and each OTI token likewise to its prediction: a term
    ``-log e^{c(a, a+)/tau} / sum_{k != a} e^{c(a, k)/tau}`` for every one of the 2B tokens ``a``
    as anchor, averaged (i.e. the mean of the two directions). Matching tokens only up to what
    tells images apart leaves phi free in the directions OTI's tokens vary in at random.
    """
    if predicted.shape != target.shape or predicted.ndim != 2 or len(predicted) < 2:
        raise ValueError(
            f"expected two [B, D] tensors of one shape with B >= 2, got {tuple(predicted.shape)} and "
            f"{tuple(target.shape)}"
        )
    joint = F.normalize(torch.cat([predicted.float(), target.float()]), dim=-1)
    logits = joint @ joint.T / temperature
    logits = logits.masked_fill(torch.eye(len(joint), dtype=torch.bool, device=joint.device), float("-inf"))
    b = len(predicted)
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(joint.device)
    return F.cross_entropy(logits, positives)


def norm_penalty(tokens: Tensor) -> Tensor:
    """L_pen: mean squared L2 norm of the predicted tokens.

    Weight decay on phi's output rather than its weights: it keeps predicted tokens as short as
    real word embeddings, as weight decay does for OTI's tokens.
    """
    return tokens.float().pow(2).sum(dim=-1).mean()


# Candidate re-ranking (Liu et al., TMLR 2024). Its filter's Eq. 1 is batch_contrastive_loss with
# a learnable temperature (pass the filter's scale as ``scale``); the re-ranker scores pairs itself.


def reranking_loss(scores: Tensor, extra: Tensor | None = None) -> Tensor:
    """Eq. 2: ``scores[i, j]`` is the re-ranker's logit for query ``i`` with the batch's target ``j``.

    Each query's own target (the diagonal) must out-score the other targets of the batch, its
    ``B - 1`` negatives: the mean over queries of the cross-entropy of row ``i`` with class ``i``.
    ``extra`` ``[B, H]`` adds each query's own further negatives (e.g. images a first stage ranks
    high for it) to its row. The logits are used as they are (no cosine, no temperature: the scorer
    MLP sets their scale) and in fp32.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or len(scores) < 2:
        raise ValueError(f"Eq. 2 needs a square [B, B] score matrix with B >= 2, got {tuple(scores.shape)}")
    if extra is not None:
        if extra.ndim != 2 or len(extra) != len(scores):
            raise ValueError(f"extra negatives must be [B, H] for B = {len(scores)}, got {tuple(extra.shape)}")
        scores = torch.cat([scores, extra.to(scores.dtype)], dim=1)
    return F.cross_entropy(scores.float(), torch.arange(len(scores), device=scores.device))
