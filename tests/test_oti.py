"""OTI: per-image pseudo-word tokens that encode back to their own image, batched like one at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cirlib.methods.oti import OTIConfig, oti, pseudo_phrase
from cirlib.models.backbone import TINY_MODEL, load_backbone
from cirlib.models.pseudo_word import encode_with_pseudo_words

N = 8
CONCEPTS = [["cat", "dog"], "dress", ["bag"], "cat", "dog", "dress", "bag", ["cat", "bag"]]
PHRASES = {
    "cat": ["a photo of cat that is sleeping", "a photo of cat that sits on a red mat"],
    "dog": ["a photo of dog that runs on the beach"],
    "dress": ["a photo of dress that has blue dots", "a photo of dress that is long"],
    "bag": ["a photo of bag that is made of leather"],
}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_MODEL, None, "cpu")


@pytest.fixture(scope="module")
def features():
    return torch.randn(N, 128, generator=torch.Generator().manual_seed(0))


def _config(**overrides) -> OTIConfig:
    return OTIConfig.quick(**{"amp": False, "progress": False, "batch_size": N, **overrides})


def test_tokens_encode_back_to_their_own_image(tiny, features) -> None:
    # 100 steps, not the quick notebooks' 40: from a random tower, 40 left one of the eight tokens nearer
    # another image for some random draws of the weights (80 separated all eight by a margin of 0.3)
    result = oti(tiny, features, CONCEPTS, PHRASES, _config(steps=100))
    assert result.tokens.shape == (N, 128) and result.tokens.dtype == torch.float32
    with torch.no_grad():
        y = encode_with_pseudo_words(tiny, "a photo of $", result.tokens)
    cos = F.normalize(y, dim=-1) @ F.normalize(features, dim=-1).T
    # every token retrieves its own image among 8 (chance: 8^-8), by a clear margin
    assert cos.argmax(dim=1).tolist() == list(range(N))
    off = cos[~torch.eye(N, dtype=torch.bool)].view(N, N - 1)
    assert (cos.diag() - off.max(dim=1).values).min() > 0.1
    # the total and the content loss fell (L_gpt, small from the start, is what content trades against)
    first, last = result.history[0], result.history[-1]
    assert last["content"] < first["content"] - 0.2
    assert last["loss"] < first["loss"] - 0.2 and last["gpt"] < 0.1
    assert last["loss"] == pytest.approx(last["content"] + 0.5 * last["gpt"], rel=1e-5)


def test_batched_matches_one_image_at_a_time(tiny, features) -> None:
    batched = oti(tiny, features[:4], CONCEPTS[:4], PHRASES, _config(noise_std=0.0, steps=15)).tokens
    single = oti(tiny, features[:4], CONCEPTS[:4], PHRASES, _config(noise_std=0.0, steps=15, batch_size=1)).tokens
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    moved = oti(tiny, features[:4], CONCEPTS[:4], PHRASES, _config(noise_std=0.0, steps=16)).tokens
    assert not torch.allclose(moved, batched, atol=1e-4)  # the check above can tell tokens apart


def test_noise_is_per_image_too(tiny, features) -> None:
    config = _config(steps=10)
    batched = oti(tiny, features[:3], None, None, config).tokens
    single = oti(tiny, features[:3], None, None, _config(steps=10, batch_size=1)).tokens
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_ablation_switches(tiny, features) -> None:
    x = features[:4]
    base = oti(tiny, x, CONCEPTS[:4], PHRASES, _config(steps=3)).history
    assert set(base[0]) == {"step", "loss", "content", "gpt"}
    no_reg = oti(tiny, x, None, None, _config(steps=3)).history  # w/o reg: L_gpt off
    assert set(no_reg[0]) == {"step", "loss", "content"} and no_reg[0]["loss"] == no_reg[0]["content"]
    # w/o noise: the first step's content loss is 1 - cos of the untouched text features
    quiet = oti(tiny, x, None, None, _config(steps=1, noise_std=0.0, ema_decay=0.0))
    init = oti(tiny, x, None, None, _config(steps=1, noise_std=0.0, lr=1e-12, ema_decay=0.0)).tokens
    with torch.no_grad():
        y0 = encode_with_pseudo_words(tiny, "a photo of $", init)
    assert quiet.history[0]["content"] > 0  # noise-free loss of the random start
    assert (1 - F.cosine_similarity(y0, x)).mean().item() == pytest.approx(quiet.history[0]["content"], abs=0.2)
    # L2 loss: the mean squared difference of the raw features, not 1 - cos
    l2 = oti(tiny, x, None, None, _config(steps=1, noise_std=0.0, content="l2")).history[0]["content"]
    assert ((y0 - x) ** 2).mean().item() == pytest.approx(l2, abs=0.05)
    assert abs(l2 - quiet.history[0]["content"]) > 0.5
    # concept-only and random regularisation draw other phrases, so L_gpt differs from "gpt"'s
    concept = oti(tiny, x, CONCEPTS[:4], None, _config(steps=3, regularisation="concept")).history
    random_reg = oti(tiny, x, CONCEPTS[:4], PHRASES, _config(steps=3, regularisation="random")).history
    assert concept[0]["gpt"] != base[0]["gpt"] and random_reg[0]["gpt"] != base[0]["gpt"]
    # lambda_gpt = 0 also turns L_gpt off
    assert "gpt" not in oti(tiny, x, CONCEPTS[:4], PHRASES, _config(steps=1, lambda_gpt=0.0)).history[0]


def test_pseudo_phrase_replaces_the_concept_word() -> None:
    assert pseudo_phrase("a photo of cat that chases a catfish", "cat") == "a photo of $ that chases a catfish"
    assert pseudo_phrase("a photo of Red Dress that is long", "red dress") == "a photo of $ that is long"
    with pytest.raises(ValueError, match="does not contain"):
        pseudo_phrase("a photo of a dog", "cat")


def test_bad_inputs(tiny, features) -> None:
    with pytest.raises(ValueError, match="\\[N, 128\\]"):
        oti(tiny, features[:, :64], None, None, _config())
    with pytest.raises(ValueError, match="no phrases"):
        oti(tiny, features[:1], ["shoe"], PHRASES, _config())
    with pytest.raises(ValueError, match="needs phrases"):
        oti(tiny, features[:1], ["cat"], None, _config())
    with pytest.raises(ValueError, match="for each of the 2 images"):
        oti(tiny, features[:2], ["cat"], PHRASES, _config())
    with pytest.raises(ValueError, match="placeholder"):
        OTIConfig(templates=("a photo of a cat",))
