"""Backbones: real open_clip architectures at random init, the tiny CLIP, local checkpoints, no network."""

from __future__ import annotations

import json
import socket

import open_clip
import pytest
import torch

from cirlib.core.io import file_sha256
from cirlib.models.backbone import TINY_MODEL, load_backbone, save_backbone, sidecar_path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)



@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_MODEL, device="cpu")


def test_tiny_model_is_registered_with_open_clip():
    assert TINY_MODEL in open_clip.list_models()
    cfg = open_clip.get_model_config(TINY_MODEL)
    assert cfg["vision_cfg"]["image_size"] == 64 and cfg["text_cfg"]["vocab_size"] == 49408
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)  # the BPE vocabulary ships with open_clip
    tokens = tokenizer(["a red striped dress"])
    assert tokens.shape == (1, cfg["text_cfg"]["context_length"])
    assert tokens[0, 0] == 49406 and 49407 in tokens[0].tolist()  # start and end of text


def test_tiny_backbone_shapes_and_attributes(tiny):
    assert (tiny.image_size, tiny.embed_dim, tiny.context_length) == (64, 128, 32)
    assert tiny.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN) and len(tiny.std) == 3
    assert tiny.device == torch.device("cpu") and not tiny.model.training
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 5e6 < n_params < 15e6  # most of it the 49408-word embedding
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        img = tiny.encode_image(x)
        txt = tiny.encode_text(["a red dress", "a plain navy blue top with a star print", "two bags"])
        pooled, tokens = tiny.encode_image_tokens(x)
    assert img.shape == (2, 128) and txt.shape == (3, 128)
    assert torch.equal(pooled, img)
    assert tokens.shape == (2, 64, 128)  # 8x8 patches of 8 px, width 128
    assert torch.equal(tiny.encode_text(tiny.tokenize(["a red dress"])), tiny.encode_text("a red dress"))
    assert tiny.token_embedding.weight.shape == (49408, 128)


def test_patch_tokens_lie_on_the_path_to_the_pooled_feature(tiny):
    """GradCAM needs d(score)/d(tokens): the tokens must feed the pooled feature."""
    pooled, tokens = tiny.encode_image_tokens(torch.randn(1, 3, 64, 64))
    (grad,) = torch.autograd.grad(pooled.sum(), tokens)
    assert grad.shape == tokens.shape and grad.abs().sum(-1).gt(0).all()


@pytest.mark.parametrize(
    ("name", "embed", "tokens_shape"),
    [("RN50", 1024, (1, 49, 2048)), ("ViT-B-32", 512, (1, 49, 768))],
)
def test_real_architectures_at_random_init(name, embed, tokens_shape):
    bb = load_backbone(name, pretrained=None, device="cpu")
    assert bb.image_size == 224 and bb.embed_dim == embed and bb.context_length == 77
    x = torch.randn(1, 3, 224, 224)
    pooled, tokens = bb.encode_image_tokens(x)
    assert pooled.shape == (1, embed) and tokens.shape == tokens_shape
    (grad,) = torch.autograd.grad(pooled.sum(), tokens)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(pooled, bb.encode_image(x), atol=1e-5)  # no_grad takes the fused attention path
        assert bb.encode_text(["a photo of a dog"]).shape == (1, embed)


def test_random_init_is_seeded_and_fingerprinted(tiny):
    again = load_backbone(TINY_MODEL, device="cpu")
    other = load_backbone(TINY_MODEL, device="cpu", seed=1)
    assert again.fingerprint == tiny.fingerprint != other.fingerprint
    assert torch.equal(again.model.visual.conv1.weight, tiny.model.visual.conv1.weight)
    assert tiny.fingerprint.startswith(f"{TINY_MODEL}:state-sha256:")


def test_fingerprint_follows_the_weights():
    bb = load_backbone(TINY_MODEL, device="cpu")
    before = bb.fingerprint
    with torch.no_grad():
        bb.model.logit_scale.add_(0.5)
    assert bb.refresh_fingerprint() != before
    with torch.no_grad():
        bb.model.logit_scale.sub_(0.5)
    assert bb.refresh_fingerprint() == before


def test_image_fingerprint_names_the_image_tower_alone():
    """Text-encoder training (TFT) keeps the image-feature caches; image-tower training does not."""
    bb = load_backbone(TINY_MODEL, device="cpu")
    image_fp = bb.image_fingerprint
    assert image_fp.startswith(f"{TINY_MODEL}:visual-sha256:") and image_fp != bb.fingerprint
    with torch.no_grad():
        bb.model.token_embedding.weight.mul_(2)
    bb.refresh_fingerprint()
    assert bb.image_fingerprint == image_fp
    with torch.no_grad():
        bb.model.visual.proj.mul_(2)
    assert bb.image_fingerprint != image_fp  # an in-place edit is noticed without refresh_fingerprint
    edited = bb.image_fingerprint
    bb.refresh_fingerprint()
    assert bb.image_fingerprint == edited


def test_text_fingerprint_names_what_text_features_depend_on(tmp_path):
    """Image-encoder training (IFT) and the logit scale keep the caption caches; text-tower edits do not,
    and a saved and reloaded model with the same text weights has the same text fingerprint."""
    bb = load_backbone(TINY_MODEL, device="cpu")
    text_fp = bb.text_fingerprint
    assert text_fp.startswith(f"{TINY_MODEL}:text-sha256:") and text_fp not in (bb.fingerprint, bb.image_fingerprint)
    with torch.no_grad():
        bb.model.visual.proj.mul_(2)
        bb.model.logit_scale.add_(1.0)
    assert bb.text_fingerprint == text_fp
    reloaded = load_backbone(TINY_MODEL, save_backbone(bb, tmp_path / "ift.safetensors", {"source": "test"}), "cpu")
    assert reloaded.fingerprint != bb.fingerprint and reloaded.text_fingerprint == text_fp
    with torch.no_grad():
        bb.model.token_embedding.weight[5].add_(1.0)
    assert bb.text_fingerprint != text_fp  # noticed without refresh_fingerprint
    edited = bb.text_fingerprint
    assert bb.refresh_fingerprint() and bb.text_fingerprint == edited


def test_fingerprints_follow_in_place_edits_without_refresh():
    """A cache key taken after editing weights in place must not name the weights as loaded."""
    bb = load_backbone(TINY_MODEL, device="cpu")
    loaded, image_fp = bb.fingerprint, bb.image_fingerprint
    with torch.no_grad():
        bb.model.visual.conv1.weight.add_(1.0)
    assert bb.fingerprint != loaded and bb.fingerprint.startswith(f"{TINY_MODEL}:state-sha256:")
    assert bb.image_fingerprint != image_fp
    bb.model.load_state_dict(load_backbone(TINY_MODEL, device="cpu").model.state_dict())
    assert (bb.fingerprint, bb.image_fingerprint) == (loaded, image_fp)  # same weights, same digests


def test_save_and_reload_reproduce_features_exactly(tiny, tmp_path):
    path = save_backbone(tiny, tmp_path / "ckpt" / "tiny.safetensors", {"source": "test", "step": 3})
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["model"] == TINY_MODEL and meta["provenance"] == {"source": "test", "step": 3}
    assert meta["model_cfg"] == open_clip.get_model_config(TINY_MODEL) and meta["sha256"] == file_sha256(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.safetensors", "tiny.safetensors.json"]

    reloaded = load_backbone(TINY_MODEL, pretrained=path, device="cpu")
    assert reloaded.fingerprint == f"{TINY_MODEL}:file-sha256:{file_sha256(path)}"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x), tiny.encode_image(x))
        assert torch.equal(reloaded.encode_text(["a red dress"]), tiny.encode_text(["a red dress"]))


def test_open_clip_state_dict_files_load(tiny, tmp_path):
    path = tmp_path / "open_clip_model.pt"
    torch.save(tiny.model.state_dict(), path)
    reloaded = load_backbone(TINY_MODEL, pretrained=str(path), device="cpu")
    assert reloaded.fingerprint.endswith(file_sha256(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x), tiny.encode_image(x))


def test_pretrained_tags_are_passed_to_open_clip(monkeypatch):
    """A tag goes to open_clip unchanged (with the tag's QuickGELU); mocked here: no download."""
    calls = []
    real_create = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs.get("force_quick_gelu")))
        return real_create(TINY_MODEL, pretrained=None, device="cpu")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    bb = load_backbone("RN50", pretrained="openai", device="cpu")
    assert calls == [("RN50", "openai", True)]
    assert bb.fingerprint == "RN50:openai"


def test_bad_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        load_backbone("ViT-B-33")


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(ValueError, match=r"not-a-tag.*openai"):
        load_backbone("RN50", pretrained="not-a-tag")


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "tiny.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/tiny.safetensors"):
        load_backbone(TINY_MODEL, pretrained=missing)


def test_checkpoint_of_another_model_or_altered_file_is_refused(tiny, tmp_path):
    path = save_backbone(tiny, tmp_path / "tiny.safetensors", {})
    with pytest.raises(ValueError, match=rf"weights of model '{TINY_MODEL}'.*field 'model'"):
        load_backbone("RN50", pretrained=path)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_backbone(TINY_MODEL, pretrained=path)


def test_save_requires_safetensors_suffix(tiny, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_backbone(tiny, tmp_path / "tiny.pt", {})
