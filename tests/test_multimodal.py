"""The re-ranking networks (cirlib.models.multimodal) and the patch tokens they read (cirlib.models.features),
on the course's tiny open_clip architecture with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cirlib.models import features as features_module
from cirlib.models.backbone import TINY_MODEL, Backbone, load_backbone
from cirlib.models.features import PATCH_TOKEN_DTYPE, image_features, patch_token_shape, patch_tokens
from cirlib.models.multimodal import CandidateFilter, DualEncoderReranker, text_tower

CAPTIONS = ["is red", "has dots and a much longer caption than the others here", "is blue and striped"]


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(TINY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def micro_resnet(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """A micro open_clip ModifiedResNet (registered under a name of this module only)."""
    folder = tmp_path_factory.mktemp("model_configs")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / "test-multimodal-RN.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return load_backbone("test-multimodal-RN", device="cpu")


def _images(tiny: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    length, width = patch_token_shape(tiny)
    return torch.randn(n, length, width, generator=torch.Generator().manual_seed(seed))


def _zero_cross_attention(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "cross_attn" in name and "out_proj" in name:
                param.zero_()


# ------------------------------------------------------------------------------------ the filter


def test_filter_shapes_and_eot_length(tiny: Backbone) -> None:
    filt = CandidateFilter.from_backbone(tiny).eval()
    tokens = tiny.tokenize(CAPTIONS)
    with torch.no_grad():
        embedding, z_t = filt(tokens, _images(tiny, 3))
    eot = tokens.argmax(dim=-1)
    assert embedding.shape == (3, tiny.embed_dim)
    assert z_t.shape == (3, int(eot.max()) + 1, 128)  # cut after the batch's last EOT
    assert len(filt.self_attn) == len(filt.cross_attn) == len(filt.feed_forward) == 4  # the whole text tower


def test_zero_cross_attention_is_exactly_the_text_tower(tiny: Backbone) -> None:
    """The initialisation copies the text tower: without cross-attention the filter computes its
    EOT feature (to float rounding, the sequence being cut after the last EOT)."""
    filt = CandidateFilter.from_backbone(tiny).eval()
    _zero_cross_attention(filt)
    tokens = tiny.tokenize(CAPTIONS)
    with torch.no_grad():
        embedding, _ = filt(tokens, _images(tiny, 3))
        expected = tiny.model.encode_text(tokens)
    # fp32 rounding of two orders of summation through four layers: 1e-6 held on AVX2 kernels but not on
    # AVX-512 ones (1.2e-6 seen), so the bound is one a real difference (any cross-attention) far exceeds
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)


def test_cross_attention_reads_the_reference_image(tiny: Backbone) -> None:
    filt = CandidateFilter.from_backbone(tiny).eval()
    tokens = tiny.tokenize(CAPTIONS)
    images = _images(tiny, 3)
    with torch.no_grad():
        a, za = filt(tokens, images)
        b, zb = filt(tokens, images.roll(1, dims=0))  # other captions' references
        c, _ = filt(tokens, images)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(za, zb, atol=1e-4)
    torch.testing.assert_close(a, c)  # deterministic in eval mode


def test_filter_is_a_copy_the_backbone_keeps_its_weights(tiny: Backbone) -> None:
    filt = CandidateFilter.from_backbone(tiny)
    backbone_storage = {p.data_ptr() for p in tiny.model.parameters()}
    assert not backbone_storage & {p.data_ptr() for p in filt.parameters()}
    before = tiny.fingerprint
    with torch.no_grad():
        filt.token_embedding.weight.add_(1.0)
    assert tiny.fingerprint == before


def test_a_caption_does_not_depend_on_its_batch(tiny: Backbone) -> None:
    """Cutting after the batch's last EOT changes nothing but float rounding (other matrix shapes):
    the causal mask hides what follows a caption's EOT."""
    filt = CandidateFilter.from_backbone(tiny).eval()
    tokens, images = tiny.tokenize(CAPTIONS), _images(tiny, 3)
    with torch.no_grad():
        together, z_together = filt(tokens, images)
        alone, z_alone = filt(tokens[:1], images[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z_together[:1, : z_alone.shape[1]], z_alone, rtol=1e-4, atol=1e-5)


def test_filter_bad_inputs(tiny: Backbone) -> None:
    filt = CandidateFilter.from_backbone(tiny)
    tokens = tiny.tokenize(CAPTIONS)
    with pytest.raises(ValueError, match="width 64 but the cross-attention was built for 128"):
        filt(tokens, torch.randn(3, 65, 64))
    with pytest.raises(ValueError, match="one image per caption"):
        filt(tokens, _images(tiny, 2))
    with pytest.raises(ValueError, match="long"):
        filt(tokens.float(), _images(tiny, 3))
    with pytest.raises(ValueError, match=r"layers must be in \[1, 4\]"):
        CandidateFilter.from_backbone(tiny, layers=5)


# ----------------------------------------------------------------------------------- the re-ranker


def test_reranker_layers_merge_and_shared_feedforward(tiny: Backbone) -> None:
    paper = DualEncoderReranker.from_backbone(tiny)
    assert [layer.merge_kind for layer in paper.layers] == ["average", "average", "linear", "linear"]
    assert [layer.merge is None for layer in paper.layers] == [True, True, False, False]
    for layer in paper.layers:
        assert layer.feed_forward_other is None  # one module serves both streams
        assert layer.self_attn["t"].attn.in_proj_weight is not layer.self_attn["z"].attn.in_proj_weight
        assert layer.cross_attn["t"].attn.out_proj.weight is not layer.cross_attn["z"].attn.out_proj.weight
    full_mlp = DualEncoderReranker.from_backbone(tiny, layers=2, merge="linear")
    assert [layer.merge_kind for layer in full_mlp.layers] == ["linear", "linear"]
    dual = DualEncoderReranker.from_backbone(tiny, layers=2, shared_feedforward=False)
    for layer in dual.layers:
        assert layer.feed_forward_other.mlp.c_fc.weight is not layer.feed_forward.mlp.c_fc.weight
    n_shared = sum(p.numel() for p in DualEncoderReranker.from_backbone(tiny, layers=2).parameters())
    ff = sum(p.numel() for p in dual.layers[0].feed_forward.parameters())
    assert sum(p.numel() for p in dual.parameters()) == n_shared + 2 * ff


def test_reranker_initialised_from_a_matching_encoder(tiny: Backbone) -> None:
    """Every stream starts from the matcher's weights; the feed-forward stays one shared tensor; the head stays new."""
    matcher = DualEncoderReranker.from_backbone(tiny, layers=2, encoders="t")
    with torch.no_grad():
        for p in matcher.parameters():
            p.add_(torch.randn_like(p))  # as if trained: unlike the text tower both start from
    model = DualEncoderReranker.from_backbone(tiny, layers=2)
    head = [p.clone() for p in model.head.parameters()]
    model.initialise_from(matcher)
    torch.testing.assert_close(model.token_embedding.weight, matcher.token_embedding.weight)
    torch.testing.assert_close(model.positional_embedding, matcher.positional_embedding)
    for mine, theirs in zip(model.layers, matcher.layers):
        for stream in ("t", "z"):
            torch.testing.assert_close(mine.self_attn[stream].attn.in_proj_weight,
                                       theirs.self_attn["t"].attn.in_proj_weight)
            torch.testing.assert_close(mine.cross_attn[stream].attn.out_proj.weight,
                                       theirs.cross_attn["t"].attn.out_proj.weight)
        assert mine.self_attn["t"].attn.in_proj_weight is not mine.self_attn["z"].attn.in_proj_weight
        assert mine.feed_forward_other is None
        torch.testing.assert_close(mine.feed_forward.mlp.c_fc.weight, theirs.feed_forward.mlp.c_fc.weight)
    torch.testing.assert_close(model.ln_final["z"].weight, matcher.ln_final["t"].weight)
    for new, old in zip(model.head.parameters(), head):
        torch.testing.assert_close(new, old)
    dual = DualEncoderReranker.from_backbone(tiny, layers=2, shared_feedforward=False)
    dual.initialise_from(matcher)
    torch.testing.assert_close(dual.layers[1].feed_forward_other.mlp.c_proj.weight,
                               matcher.layers[1].feed_forward.mlp.c_proj.weight)
    with pytest.raises(ValueError, match="1 layers .* this re-ranker 2"):
        model.initialise_from(DualEncoderReranker.from_backbone(tiny, layers=1, encoders="t"))
    with pytest.raises(ValueError, match="one-stream Encoder-t"):
        model.initialise_from(dual)


def test_merge_layers_by_hand(tiny: Backbone) -> None:
    """A layer adds the merged cross-attention outputs to both streams: their mean, or a linear map of both."""
    model = DualEncoderReranker.from_backbone(tiny, layers=2).eval()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 128, generator=gen), torch.randn(2, 5, 128, generator=gen)]
    images, mask = _images(tiny, 2), torch.full((5, 5), float("-inf")).triu_(1)
    for layer, merge in zip(model.layers, ("average", "linear")):
        with torch.no_grad():
            after_sa = [x + layer.self_attn[s](x, mask) for s, x in zip(("t", "z"), xs)]
            crossed = [layer.cross_attn[s](x, images) for s, x in zip(("t", "z"), after_sa)]
            merged = (crossed[0] + crossed[1]) / 2 if merge == "average" else layer.merge(torch.cat(crossed, -1))
            expected = [x + merged + layer.feed_forward(x + merged) for x in after_sa]
            got = layer(xs, images, mask)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_reranker_pairwise_equals_one_triplet_at_a_time(tiny: Backbone) -> None:
    """Grouping the triplets of one candidate (keys and values projected once) changes no score."""
    filt = CandidateFilter.from_backbone(tiny).eval()
    model = DualEncoderReranker.from_backbone(tiny, layers=2).eval()
    tokens, refs, candidates = tiny.tokenize(CAPTIONS), _images(tiny, 3), _images(tiny, 4, seed=1)
    with torch.no_grad():
        _, z_t = filt(tokens, refs)
        matrix = model.pairwise(tokens, z_t, candidates)
        single = torch.stack([torch.cat([model(tokens[i : i + 1], z_t[i : i + 1], candidates[j : j + 1])
                                         for j in range(4)]) for i in range(3)])
    assert matrix.shape == (3, 4)
    torch.testing.assert_close(matrix, single, rtol=1e-4, atol=1e-5)


def test_reranker_reads_the_candidate_and_both_inputs(tiny: Backbone) -> None:
    model = DualEncoderReranker.from_backbone(tiny, layers=2).eval()
    tokens, candidates = tiny.tokenize(CAPTIONS), _images(tiny, 3)
    z_t = torch.randn(3, 32, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(tokens, z_t, candidates)
        assert base.shape == (3,)
        assert not torch.allclose(base, model(tokens, z_t, candidates.roll(1, 0)))
        assert not torch.allclose(base, model(tokens, z_t.roll(1, 0), candidates))
        assert not torch.allclose(base, model(tokens.roll(1, 0), z_t, candidates))


def test_single_encoder_ablations(tiny: Backbone) -> None:
    tokens, candidates = tiny.tokenize(CAPTIONS), _images(tiny, 3)
    z_t = torch.randn(3, 32, 128)
    only_t = DualEncoderReranker.from_backbone(tiny, layers=2, encoders="t").eval()
    only_z = DualEncoderReranker.from_backbone(tiny, layers=2, encoders="z").eval()
    assert only_t.head[0].in_features == only_z.head[0].in_features == 128
    assert not hasattr(only_z, "token_embedding")
    assert all(layer.merge is None and layer.merge_kind is None for layer in only_t.layers)
    with torch.no_grad():
        assert torch.equal(only_t(tokens, z_t, candidates), only_t(tokens, z_t.roll(1, 0), candidates))
        assert only_z(tokens, z_t, candidates).shape == (3,)


def test_ref_cls_ablation_reads_only_the_reference_class_token(tiny: Backbone) -> None:
    """"w. Ref_CLS": Encoder-z_t reads the reference's class token at every position, nothing else of it."""
    model = DualEncoderReranker.from_backbone(tiny, layers=2, reference="cls").eval()
    assert model.hparams["reference"] == "cls" and model.reference_projection.in_features == 128
    tokens, candidates, refs = tiny.tokenize(CAPTIONS), _images(tiny, 3), _images(tiny, 3, seed=3)
    with torch.no_grad():
        base = model(tokens, refs, candidates)
        assert base.shape == (3,)
        other_patches = refs.clone()
        other_patches[:, 1:] = torch.randn_like(refs[:, 1:])
        torch.testing.assert_close(model(tokens, other_patches, candidates), base)  # grid cells unread
        torch.testing.assert_close(model(tokens, refs[:, :1], candidates), base)  # the class token suffices
        assert not torch.allclose(base, model(tokens, refs.roll(1, 0), candidates))
        # the causal mask makes the repeated token one token: Encoder-z_t alone scores it the same at any length
        only_z = DualEncoderReranker.from_backbone(tiny, layers=2, encoders="z", reference="cls").eval()
        short = only_z(tiny.tokenize(["a"] * 3), refs, candidates)
        torch.testing.assert_close(only_z(tiny.tokenize(["a b c d e f"] * 3), refs, candidates), short,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="encoders='t' runs no Encoder-z_t"):
        DualEncoderReranker.from_backbone(tiny, encoders="t", reference="cls")
    with pytest.raises(ValueError, match=r"patch tokens \[N, >= 1, 128\]"):
        model(tokens, torch.randn(3, 65, 96), candidates)


def test_reranker_bad_inputs(tiny: Backbone) -> None:
    model = DualEncoderReranker.from_backbone(tiny, layers=2)
    tokens = tiny.tokenize(CAPTIONS)
    z_t = torch.randn(3, 32, 128)
    with pytest.raises(ValueError, match="width 96"):
        model(tokens, z_t, torch.randn(3, 65, 96))
    with pytest.raises(ValueError, match=r"z_t must be \[N, >= \d+, 128\]"):
        model(tokens, torch.randn(3, 32, 64), _images(tiny, 3))
    with pytest.raises(ValueError, match="a divisor of 3"):
        model(tokens, z_t, _images(tiny, 2))
    with pytest.raises(ValueError, match="merge"):
        DualEncoderReranker.from_backbone(tiny, merge="mean")
    with pytest.raises(ValueError, match="encoders"):
        DualEncoderReranker.from_backbone(tiny, encoders="tz")
    with pytest.raises(ValueError, match="reference"):
        DualEncoderReranker.from_backbone(tiny, reference="pooled")


def test_text_tower_needs_a_causal_eot_tower(tiny: Backbone) -> None:
    tower = text_tower(tiny)
    assert (tower.width, tower.heads, len(tower.blocks), tower.pool_type) == (128, 2, 4, "argmax")
    bidirectional = load_backbone(TINY_MODEL, device="cpu")
    bidirectional.model.attn_mask = None
    with pytest.raises(NotImplementedError, match="cirlib-tiny-ViT.*no causal mask"):
        CandidateFilter.from_backbone(bidirectional)


# ----------------------------------------------------------------------------------- patch tokens


def _write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_patch_tokens_shape_and_their_class_token_is_the_pooled_feature(tiny: Backbone, tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "images", 5)
    tokens = patch_tokens(tiny, paths, batch_size=2, progress=False, amp=False)
    assert tokens.shape == (5, 65, 128) and tokens.dtype == PATCH_TOKEN_DTYPE
    pooled = image_features(tiny, paths, progress=False, amp=False)
    # ln_post's class token through the projection is the pooled feature (up to fp16 storage)
    torch.testing.assert_close(tokens[:, 0].float() @ tiny.model.visual.proj.detach(), pooled, rtol=2e-2, atol=2e-2)
    in_order = patch_tokens(tiny, paths[::-1], batch_size=3, progress=False, amp=False)
    assert torch.equal(in_order, tokens.flip(0))


def test_patch_tokens_are_cached_and_follow_the_image_tower(tiny: Backbone, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_images(tmp_path / "images", 3)
    backbone = load_backbone(TINY_MODEL, device="cpu")
    first = patch_tokens(backbone, paths, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("patch-tokens-*.safetensors"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    with monkeypatch.context() as m:
        m.setattr(features_module, "encode_patch_tokens", fail)
        assert torch.equal(patch_tokens(backbone, paths, cache_dir=tmp_path / "cache", progress=False), first)
    with torch.no_grad():
        backbone.model.visual.ln_post.weight.mul_(2)
    changed = patch_tokens(backbone, paths, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("patch-tokens-*.safetensors"))) == 2
    assert not torch.allclose(changed.float(), first.float())


def test_patch_tokens_of_a_resnet_tower_are_refused(micro_resnet: Backbone, tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="test-multimodal-RN has a ModifiedResNet"):
        patch_tokens(micro_resnet, _write_images(tmp_path, 1), progress=False)
    with pytest.raises(NotImplementedError, match="test-multimodal-RN has a ModifiedResNet"):
        CandidateFilter.from_backbone(micro_resnet)
