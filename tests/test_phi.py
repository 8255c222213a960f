"""phi: the MLP, hard-negative batch composition, and distillation of OTI tokens end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cirlib.methods.phi_training import PhiConfig, cluster_images, cycle_loss, hard_negative_batches, train_phi
from cirlib.models.backbone import TINY_MODEL, load_backbone
from cirlib.models.phi import Phi
from cirlib.models.pseudo_word import encode_with_pseudo_words


def test_phi_shapes_and_widths() -> None:
    phi = Phi.for_dims(128, 128)
    assert phi.hparams["hidden_dim"] == 512
    assert [m.out_features for m in phi.layers if isinstance(m, torch.nn.Linear)] == [512, 512, 128]
    assert phi(torch.randn(5, 128)).shape == (5, 128)
    assert Phi.for_dims(512, 512).hparams["hidden_dim"] == 2048  # B/32's width
    with pytest.raises(ValueError, match="dropout"):
        Phi(8, 8, 8, dropout=1.0)


def _labels(sizes: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("alpha", [0.5, 0.75, 0.0])
def test_hard_negative_batches(alpha: float) -> None:
    labels = _labels([40, 25, 20, 9, 5, 4])  # 103 rows, clusters of unequal size
    batches = hard_negative_batches(labels, 16, alpha, torch.Generator().manual_seed(1))
    need = int(torch.tensor(alpha * 16).ceil())
    for batch in batches:
        assert len(batch) == 16 and len(set(batch.tolist())) == 16
        assert batch.min() >= 0 and batch.max() < len(labels)
        assert torch.bincount(labels[batch]).max() >= need
    covered = torch.cat(batches).unique()
    assert len(covered) == len(labels)  # every row once an epoch
    assert len(batches) <= len(labels) // 16 + 3  # and not many more batches than needed


def test_hard_negative_batches_differ_by_epoch_and_check_inputs() -> None:
    labels = _labels([30, 30])
    a = hard_negative_batches(labels, 10, 0.5, torch.Generator().manual_seed(1))
    b = hard_negative_batches(labels, 10, 0.5, torch.Generator().manual_seed(2))
    assert not torch.equal(torch.cat(a), torch.cat(b))
    with pytest.raises(ValueError, match="no cluster holds"):
        hard_negative_batches(_labels([3, 3, 3]), 10, 0.5, torch.Generator())
    with pytest.raises(ValueError, match="no random rows"):
        hard_negative_batches(labels, 10, 0.99, torch.Generator())
    with pytest.raises(ValueError, match="alpha"):
        PhiConfig(alpha=1.0)


def test_cluster_images_separates_blobs() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = 5 * torch.eye(16)[:3]  # three directions apart (clusters are by cosine)
    feats = torch.cat([c + 0.1 * torch.randn(20, 16, generator=gen) for c in centres])
    labels = cluster_images(feats, 3)
    assert labels.shape == (60,) and labels.dtype == torch.long
    for block in labels.view(3, 20):
        assert len(block.unique()) == 1  # each blob one cluster
    assert len(labels.unique()) == 3


def test_phi_learns_to_predict_oti_tokens(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 128, generator=gen)
    tokens = feats @ torch.randn(128, 128, generator=gen) * 0.02  # stand-in for OTI's tokens
    backbone = load_backbone(TINY_MODEL, None, "cpu")
    concepts = ["cat", "dress"] * 32
    phrases = {"cat": ["a photo of cat that sleeps"], "dress": ["a photo of dress that is long"]}
    config = PhiConfig.quick(amp=False, progress=False, batch_size=16, epochs=15)
    phi, history = train_phi(feats, tokens, backbone, concepts, phrases, config, tmp_path / "phi.pt")
    assert len(history) == 15 and {"loss", "distil", "pen", "gpt"} <= set(history[0])
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    with torch.no_grad():
        cos = F.normalize(phi(feats), dim=-1) @ F.normalize(tokens, dim=-1).T
    assert (cos.argmax(dim=1) == torch.arange(64)).float().mean() > 0.9  # chance: 1/64
    # a finished run is loaded from its checkpoint, not retrained
    again, history_again = train_phi(feats, tokens, backbone, concepts, phrases, config, tmp_path / "phi.pt")
    assert history_again == history
    for a, b in zip(phi.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)


def test_cycle_loss_is_clip_loss_of_the_prompt_at_the_backbone_temperature() -> None:
    backbone = load_backbone(TINY_MODEL, None, "cpu")
    gen = torch.Generator().manual_seed(3)
    images, tokens = torch.randn(4, 128, generator=gen), torch.randn(4, 128, generator=gen) * 0.02
    text = F.normalize(encode_with_pseudo_words(backbone, "a photo of $", tokens), dim=-1)
    logits = backbone.model.logit_scale.exp() * F.normalize(images, dim=-1) @ text.T
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(cycle_loss(backbone, images, tokens), expected)
    # a token that changes the prompt's text feature changes the loss; gradients reach the tokens only
    tokens.requires_grad_(True)
    cycle_loss(backbone, images, tokens).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_phi_without_distillation_learns_from_images_and_needs_the_backbone(tmp_path) -> None:
    backbone = load_backbone(TINY_MODEL, None, "cpu")
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(32, 128, generator=gen)
    unused = torch.zeros(32, 128)  # the cycle ablation reads no OTI token, only their width
    config = PhiConfig.quick(amp=False, progress=False, batch_size=16, epochs=12, distillation="cycle", alpha=0.0)
    phi, history = train_phi(feats, unused, backbone, config=config, ckpt_path=tmp_path / "cycle.pt")
    assert history[-1]["distil"] < history[0]["distil"]
    with torch.no_grad():
        text = F.normalize(encode_with_pseudo_words(backbone, "a photo of $", phi(feats)), dim=-1)
    hits = (text @ F.normalize(feats, dim=-1).T).argmax(dim=1) == torch.arange(32)
    assert hits.float().mean() > 4 / 32  # chance: 1/32
    with pytest.raises(ValueError, match="pass the backbone"):
        train_phi(feats, unused, None, config=config)
    with pytest.raises(ValueError, match="'cycle'"):
        PhiConfig(distillation="l1")
