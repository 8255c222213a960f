"""CLIP4Cir Eq. (1): the batch contrastive loss shared by all training stages."""

from __future__ import annotations

import math

import pytest
import torch

from cirlib.methods.losses import batch_contrastive_loss, contrastive_logits


def _ce(row: list[float], positive: int) -> float:
    """-log softmax(row)[positive], written out."""
    return -(row[positive] - math.log(sum(math.exp(v) for v in row)))


def test_two_by_two_by_hand() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)  # cos(q0, t1) = cos(q1, t1)
    # cos matrix [[1, c], [0, c]], scale 2
    expected = (_ce([2.0, 2 * c], 0) + _ce([0.0, 2 * c], 1)) / 2
    assert batch_contrastive_loss(query, target, scale=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_three_by_three_by_hand() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [4.0, 3.0]])
    # unit vectors: q = [(1,0), (0,1), (.6,.8)], t = [(0,1), (1,0), (.8,.6)]
    cos = [[0.0, 1.0, 0.8], [1.0, 0.0, 0.6], [0.8, 0.6, 0.96]]
    expected = sum(_ce([10 * v for v in cos[i]], i) for i in range(3)) / 3
    assert batch_contrastive_loss(query, target, scale=10.0).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(contrastive_logits(query, target, scale=10.0), 10 * torch.tensor(cos))


def test_perfect_alignment_gives_almost_zero() -> None:
    feats = torch.eye(8) * 3.0
    loss = batch_contrastive_loss(feats, feats)  # scale 100: off-diagonal logits are 100 lower
    assert 0.0 <= loss.item() < 1e-6


def test_anti_aligned_batch_is_penalised() -> None:
    feats = torch.eye(4)
    assert batch_contrastive_loss(feats, feats.roll(1, dims=0)).item() > 50


def test_invariant_to_feature_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    query, target = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    scales = torch.rand(6, 1, generator=gen) * 10 + 0.1
    base = batch_contrastive_loss(query, target)
    rescaled = batch_contrastive_loss(query * scales, target * scales.flip(0))
    assert rescaled.item() == pytest.approx(base.item(), rel=1e-5)


def test_uniform_logits_give_log_batch_size() -> None:
    query = torch.ones(5, 3)
    assert batch_contrastive_loss(query, torch.ones(5, 3)).item() == pytest.approx(math.log(5), rel=1e-6)


def test_gradient_flows_to_both_sides() -> None:
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, 3, generator=gen, requires_grad=True)
    target = torch.randn(4, 3, generator=gen, requires_grad=True)
    batch_contrastive_loss(query, target).backward()
    for t in (query, target):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(2)
    query, target = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    loss16 = batch_contrastive_loss(query.half(), target.half())
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(batch_contrastive_loss(query, target).item(), rel=1e-2)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        batch_contrastive_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        batch_contrastive_loss(torch.zeros(3), torch.zeros(3))
