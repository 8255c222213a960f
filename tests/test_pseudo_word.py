"""Pseudo-word text encoding: the placeholder's own embedding gives encode_text, batched and with
gradients to the vectors only."""

from __future__ import annotations

import pytest
import torch

from cirlib.models.backbone import TINY_MODEL, load_backbone
from cirlib.models.pseudo_word import (
    PLACEHOLDER,
    encode_with_pseudo_words,
    frozen,
    placeholder_id,
    word_embedding,
)

PROMPTS = ["a photo of $", "$ that is red and has dots", "a $ next to a $ on a table"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_MODEL, None, "cpu")


def _own_rows(backbone, n: int) -> torch.Tensor:
    emb = word_embedding(backbone).weight
    return emb[placeholder_id(backbone)].detach().clone().expand(n, -1).clone()


@pytest.mark.parametrize("model", [TINY_MODEL, "RN50"])
def test_own_embedding_equals_encode_text(model, tiny) -> None:
    backbone = tiny if model == TINY_MODEL else load_backbone(model, None, "cpu")
    with torch.no_grad():
        expected = backbone.encode_text(PROMPTS)
        with frozen(backbone.model):  # the same attention kernels (frozen weights take torch's fast path)
            expected_frozen = backbone.encode_text(PROMPTS)
        got = encode_with_pseudo_words(backbone, PROMPTS, _own_rows(backbone, len(PROMPTS)))
    torch.testing.assert_close(got, expected_frozen, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vector_changes_the_feature_only_where_the_placeholder_is(tiny) -> None:
    vectors = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        a = encode_with_pseudo_words(tiny, ["a photo of $", "a photo of $"], vectors)
        own = encode_with_pseudo_words(tiny, "a photo of $", _own_rows(tiny, 2))
    assert not torch.allclose(a[0], a[1], atol=1e-4)  # different vectors, different features
    assert not torch.allclose(a[0], own[0], atol=1e-4)


def test_gradients_reach_only_the_vectors(tiny) -> None:
    params = list(tiny.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        vectors = (torch.randn(3, 128, generator=torch.Generator().manual_seed(1)) * 0.02).requires_grad_(True)
        encode_with_pseudo_words(tiny, PROMPTS, vectors).pow(2).sum().backward()
        assert vectors.grad is not None and vectors.grad.abs().sum(dim=1).gt(0).all()
        assert all(p.grad is None for p in params)
        assert all(p.requires_grad for p in params)  # flags given back
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None


def test_batched_equals_one_by_one(tiny) -> None:
    vectors = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)) * 0.02
    with torch.no_grad():
        batched = encode_with_pseudo_words(tiny, PROMPTS, vectors)
        single = torch.cat([encode_with_pseudo_words(tiny, [p], v[None]) for p, v in zip(PROMPTS, vectors)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_one_prompt_is_shared_by_all_vectors(tiny) -> None:
    vectors = torch.randn(2, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    with torch.no_grad():
        shared = encode_with_pseudo_words(tiny, "a photo of $", vectors)
        listed = encode_with_pseudo_words(tiny, ["a photo of $"] * 2, vectors)
    torch.testing.assert_close(shared, listed)


def test_placeholder_is_one_token(tiny) -> None:
    assert PLACEHOLDER == "$"
    assert placeholder_id(tiny) == tiny.tokenize("$")[0, 1].item()
    with pytest.raises(ValueError, match="exactly one token"):
        placeholder_id(tiny, "<pseudo word>")


def test_error_cases(tiny) -> None:
    v = torch.zeros(1, 128)
    with pytest.raises(ValueError, match="no placeholder"):
        encode_with_pseudo_words(tiny, ["a photo of a cat"], v)
    with pytest.raises(ValueError, match="no placeholder"):  # truncated away at 32 tokens
        encode_with_pseudo_words(tiny, [" ".join(["word"] * 40) + " $"], v)
    with pytest.raises(ValueError, match=r"\[N, 128\]"):
        encode_with_pseudo_words(tiny, ["a photo of $"], torch.zeros(1, 64))
    with pytest.raises(ValueError, match="2 prompts for 1"):
        encode_with_pseudo_words(tiny, ["a photo of $", "$"], v)
    with pytest.raises(ValueError, match="exactly one token"):
        encode_with_pseudo_words(tiny, ["a photo of <pseudo word>"], v, placeholder="<pseudo word>")


def test_text_tower_without_word_embedding_is_a_type_error(tiny) -> None:
    class NoEmbedding:
        model_name = "hf-text"
        model = torch.nn.Linear(1, 1)

        @property
        def token_embedding(self):
            raise AttributeError("no token_embedding")

    with pytest.raises(TypeError, match="token_embedding"):
        encode_with_pseudo_words(NoEmbedding(), "a photo of $", torch.zeros(1, 128))
