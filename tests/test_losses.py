"""CLIP4Cir Eq. (1): the batch contrastive loss shared by all training stages."""

from __future__ import annotations

import math

import pytest
import torch

from cirlib.methods.losses import batch_contrastive_loss, clip_loss, contrastive_logits


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
    with pytest.raises(ValueError, match="do not fit the targets"):
        batch_contrastive_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[\*, D\]"):
        batch_contrastive_loss(torch.zeros(3), torch.zeros(3))


def test_a_share_of_the_batch_scored_against_all_of_it_averages_to_the_whole_loss() -> None:
    """Data-parallel training: each process scores its rows against the gathered batch."""
    g = torch.Generator().manual_seed(0)
    query, target = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    halves = [batch_contrastive_loss(query[i : i + 3], target, 10.0, offset=i) for i in (0, 3)]
    assert (sum(halves) / 2).item() == pytest.approx(batch_contrastive_loss(query, target, 10.0).item(), rel=1e-6)
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1) for _ in range(2))
    groups = torch.tensor([0, 1, 1, 2, 3, 3])
    whole = clip_loss(img, txt, torch.tensor(5.0), groups)
    parts = [clip_loss(img, txt, torch.tensor(5.0), groups, rows=slice(i, i + 3)) for i in (0, 3)]
    assert (sum(parts) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        batch_contrastive_loss(query[:3], target, offset=4)


def test_clip_loss_matches_hand_computed_values() -> None:
    feats = torch.eye(2)
    scale = torch.tensor(1.0)
    assert clip_loss(feats, feats, scale).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # the same caption twice: each text is an equal positive of both images
    same = clip_loss(feats, feats, scale, groups=torch.tensor([0, 0]))
    assert same.item() == pytest.approx(math.log(1 + math.e) - 0.5)
    # distinct groups reduce to CLIP's cross-entropy form
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    logits = 10 * img @ txt.T
    ce = torch.nn.functional.cross_entropy
    reference = (ce(logits, torch.arange(5)) + ce(logits.T, torch.arange(5))) / 2
    assert torch.allclose(clip_loss(img, txt, torch.tensor(10.0), torch.arange(5)), reference)


def test_matching_loss_by_hand() -> None:
    from cirlib.methods.losses import matching_loss

    # caption 0 scores image 0 at 1 and image 1 at 0; caption 1 scores both at 0 (a scorer, not a dot product:
    # the matrix need not be symmetric). t2i: (log(1 + e^-1) + log 2) / 2; i2t, the columns:
    # image 0 sees (1, 0) -> log(1 + e^-1), image 1 sees (0, 0) -> log 2; the mean of both directions.
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert matching_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # the same caption twice: caption 0's target is half image 0, half image 1 (and likewise each image's)
    # -> t2i row 0: -(log p00 + log p01) / 2 with p = softmax(1, 0); row 1: log 2
    p0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    row0 = -(p0.log().sum() / 2).item()
    assert matching_loss(logits, torch.tensor([3, 3])).item() == pytest.approx((row0 + math.log(2)) / 2, rel=1e-6)
    # distinct groups are CLIP's cross-entropy form, here on a non-symmetric score matrix
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 5, generator=g)
    ce = torch.nn.functional.cross_entropy
    reference = (ce(scores, torch.arange(5)) + ce(scores.T, torch.arange(5))) / 2
    assert torch.allclose(matching_loss(scores.to(torch.bfloat16)), reference, atol=0.05)
    assert torch.allclose(matching_loss(scores), reference)
    with pytest.raises(ValueError, match=r"square \[B, B\]"):
        matching_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="groups must be"):
        matching_loss(scores, torch.arange(4))


# Textual inversion losses (iSEARLE), each against numbers worked out by hand.


def test_content_loss_by_hand() -> None:
    from cirlib.methods.losses import content_loss

    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    # cos((1,0),(3,4)) = 0.6; cos((0,2),(0,-1)) = -1  ->  mean(0.4, 2.0)
    assert content_loss(x, y).item() == pytest.approx(1.2, rel=1e-6)
    # noise (0,-4) and (1,1): y + n = (3,0), (1,0)  ->  cos 1 and 0  ->  mean(0, 1)
    noise = torch.tensor([[0.0, -4.0], [1.0, 1.0]])
    assert content_loss(x, y, noise=noise).item() == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(content_loss(x, y, noise=noise, reduction="none"), torch.tensor([0.0, 1.0]))
    # L2: ((3,0)-(1,0))^2 -> (4 + 0)/2 = 2; ((1,0)-(0,2))^2 -> (1 + 4)/2 = 2.5
    assert content_loss(x, y, noise=noise, kind="l2").item() == pytest.approx(2.25, rel=1e-6)


def test_content_loss_noise_from_a_generator() -> None:
    from cirlib.methods.losses import content_loss

    x = torch.tensor([[1.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    assert content_loss(x, y).item() == pytest.approx(0.0, abs=1e-7)
    noisy = [content_loss(x, y, 0.5, torch.Generator().manual_seed(s)).item() for s in range(3)]
    assert all(v > 0 for v in noisy) and len(set(noisy)) == 3
    assert content_loss(x, y, 0.5, torch.Generator().manual_seed(0)).item() == noisy[0]  # reproducible
    n = 0.5 * torch.randn((1, 3), generator=torch.Generator().manual_seed(0))
    assert noisy[0] == pytest.approx(content_loss(x, y, noise=n).item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        content_loss(x, y, kind="l1")


def test_cosine_loss_by_hand() -> None:
    from cirlib.methods.losses import cosine_loss

    a = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-5.0, 0.0]])
    c = 1 / math.sqrt(2)
    assert cosine_loss(a, b).item() == pytest.approx(((1 - c) + 2.0) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        cosine_loss(a, b[:1])


def test_distillation_loss_by_hand() -> None:
    from cirlib.methods.losses import distillation_loss

    # predicted p0 = (1,0), p1 = (0,1); OTI targets t0 = (1,0), t1 = (1,1)/sqrt2 (unnormalised (2,2))
    p = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    c, tau = 1 / math.sqrt(2), 0.5
    # cosines of each anchor to the others (p0, p1, t0, t1), positive first
    rows = {
        "p0": (1.0, [0.0, 1.0, c]),  # positive t0; others p1, t0, t1
        "p1": (c, [0.0, 0.0, c]),  # positive t1; others p0, t0, t1
        "t0": (1.0, [1.0, 0.0, c]),  # positive p0; others p0, p1, t1
        "t1": (c, [c, c, c]),  # positive p1; others p0, p1, t0
    }
    expected = 0.0
    for positive, others in rows.values():
        expected += -(positive / tau - math.log(sum(math.exp(v / tau) for v in others)))
    assert distillation_loss(p, t, tau).item() == pytest.approx(expected / 4, rel=1e-6)
    # symmetric in its two arguments; low when each prediction is its own target, high when swapped
    assert distillation_loss(t, p, tau).item() == pytest.approx(expected / 4, rel=1e-6)
    eye = torch.eye(3)
    assert distillation_loss(eye, eye, 0.1).item() < 0.01 < 10 < distillation_loss(eye, eye.roll(1, 0), 0.1).item()


def test_norm_penalty_by_hand() -> None:
    from cirlib.methods.losses import norm_penalty

    tokens = torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.0, 0.0]])
    assert norm_penalty(tokens).item() == pytest.approx((25 + 2 + 0) / 3, rel=1e-6)


def test_reranking_loss_by_hand() -> None:
    from cirlib.methods.losses import reranking_loss

    # query 0: own target scores 2, the other 0; query 1: own target 3, the other 1
    scores = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    expected = (-(2 - math.log(math.exp(2) + math.exp(0))) - (3 - math.log(math.exp(1) + math.exp(3)))) / 2
    assert reranking_loss(scores).item() == pytest.approx(expected, rel=1e-6)
    # logits are used as they are: no cosine, so scaling a row changes the loss
    assert reranking_loss(2 * scores).item() < reranking_loss(scores).item()
    three = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    by_row = [-(0 - math.log(1 + math.e + math.e**2)), math.log(3), math.log(3)]
    assert reranking_loss(three).item() == pytest.approx(sum(by_row) / 3, rel=1e-6)
    assert reranking_loss(scores.half()).dtype == torch.float32
    for bad in (torch.zeros(2, 3), torch.zeros(1, 1), torch.zeros(4)):
        with pytest.raises(ValueError, match="square"):
            reranking_loss(bad)
    # extra negatives join each query's row: query 0 also against logit 1, query 1 against 4 and 0
    extra = torch.tensor([[1.0, -math.inf], [4.0, 0.0]])
    row0, row1 = 2 - math.log(math.exp(2) + 1 + math.e), 3 - math.log(math.e + math.exp(3) + math.exp(4) + 1)
    with_extra = -(row0 + row1) / 2
    assert reranking_loss(scores, extra).item() == pytest.approx(with_extra, rel=1e-6)
    with pytest.raises(ValueError, match="extra negatives"):
        reranking_loss(scores, torch.zeros(3, 2))


def test_clip_loss_foils_are_one_more_negative_of_their_own_image() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt, foil = (torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(3))
    scale = torch.tensor(7.0)
    plain = clip_loss(img, txt, scale)
    none = torch.zeros(3, dtype=torch.bool)
    assert clip_loss(img, txt, scale, foils=foil, foil_mask=none).item() == pytest.approx(plain.item(), rel=1e-6)
    # hand-computed: image 1's softmax gains its foil's logit; the text-to-image term is unchanged
    mask = torch.tensor([False, True, False])
    logits = scale * img @ txt.T
    i2t = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(3)]
    i2t[1] = torch.logsumexp(torch.cat([logits[1], (scale * img[1] @ foil[1]).view(1)]), 0) - logits[1, 1]
    t2i = [torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(3)]
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    with_foil = clip_loss(img, txt, scale, foils=foil, foil_mask=mask)
    assert with_foil.item() == pytest.approx(expected.item(), rel=1e-6) and with_foil > plain
    # a foil equal to the image (a perfect confusion) costs more than one orthogonal to it
    close = clip_loss(img, txt, scale, foils=img.clone(), foil_mask=mask)
    assert close > with_foil
    # per-row foils split across processes average to the whole loss
    parts = [clip_loss(img, txt, scale, rows=slice(i, i + 1), foils=foil[i : i + 1], foil_mask=mask[i : i + 1])
             for i in range(3)]
    assert (sum(parts) / 3).item() == pytest.approx(with_foil.item(), rel=1e-6)
    # gradients stay finite with masked foils
    feats = img.clone().requires_grad_()
    clip_loss(feats, txt, scale, foils=foil, foil_mask=mask).backward()
    assert torch.isfinite(feats.grad).all()
    with pytest.raises(ValueError, match="foil_mask"):
        clip_loss(img, txt, scale, foils=foil)
    with pytest.raises(ValueError, match="one row per image"):
        clip_loss(img, txt, scale, foils=foil[:2], foil_mask=mask[:2])
