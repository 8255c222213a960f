"""iSEARLE inference and baselines: query features per protocol, FashionIQ caption orders, the OTI
token cache, the stand-in captioner and the end-to-end tables (tiny random backbone, fixtures)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pretrain import make_fashion_root

from cirlib.core import artifacts
from cirlib.evaluation import baselines
from cirlib.methods import isearle as I
from cirlib.methods.oti import OTIConfig
from cirlib.methods.phi_training import PhiConfig
from cirlib.models.backbone import TINY_MODEL, load_backbone
from cirlib.models.features import encode_split, text_features
from cirlib.models.phi import Phi
from cirlib.models.pseudo_word import encode_with_pseudo_words

PHRASES = {
    "dress": ["a photo of dress that is long", "a photo of dress that has blue dots"],
    "bag": ["a photo of bag that is made of leather"],
    "star": ["a photo of star that is small and red"],
}
CONFIG = I.ISearleConfig.quick(oti=OTIConfig.quick(steps=4, amp=False, progress=False),
                               phi=PhiConfig.quick(epochs=2, amp=False, progress=False, clusters=2),
                               k_oti=2, k_phi=3, amp=False)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_MODEL, None, "cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def features(tiny, fixture_splits, cache):
    return {n: encode_split(tiny, s, cache_dir=cache, progress=False) for n, s in fixture_splits.items()}


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("bench") / "fashion")


def _phi(tiny) -> Phi:
    torch.manual_seed(0)
    return Phi.for_dims(tiny.embed_dim, tiny.token_embedding.embedding_dim, dropout=0.0).eval()


def test_config_checks_template_and_quick_is_small() -> None:
    quick = I.ISearleConfig.quick()
    assert quick.oti.steps < I.ISearleConfig().oti.steps and quick.phi.epochs < I.ISearleConfig().phi.epochs
    assert I.ISearleConfig.for_tiny().oti.noise_std == OTIConfig.for_tiny().noise_std
    with pytest.raises(ValueError, match="subject"):
        I.ISearleConfig(template="a photo of $ that {caption}")
    with pytest.raises(ValueError, match="k_oti"):
        I.ISearleConfig(k_oti=0)


def test_query_features_per_protocol(tiny, fixture_splits, features, cache) -> None:
    corpus = I.CaptionCorpus(features["cirr"].gallery, [f"caption {i}" for i in range(len(features["cirr"].gallery))])
    phi = _phi(tiny)
    for name, split in fixture_splits.items():
        f = features[name]
        for queries in (I.oti_query_features(tiny, split, f, PHRASES, CONFIG, cache),
                        I.phi_query_features(tiny, phi, split, f, CONFIG),
                        I.captioning_query_features(tiny, split, f, corpus, CONFIG)):
            assert queries.shape == (len(split.queries), tiny.embed_dim), name
            torch.testing.assert_close(queries.norm(dim=-1), torch.ones(len(split.queries)))
    with torch.no_grad():  # iSEARLE reads phi's token of each query's reference image
        tokens = phi(features["circo"].reference)
    torch.testing.assert_close(I.phi_query_features(tiny, phi, fixture_splits["circo"], features["circo"], CONFIG),
                               I.compose_features(tiny, fixture_splits["circo"].queries, tokens, amp=False))


def test_fashioniq_averages_both_caption_orders(tiny, fixture_splits) -> None:
    split = fixture_splits["fashioniq/dress"]
    query = split.queries[1]  # captions "Is more floral?" and "is blue, "
    assert I.caption_orders(query) == ["Is more floral and is blue", "Is blue and Is more floral"]
    token = torch.randn(1, tiny.token_embedding.embedding_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forward = encode_with_pseudo_words(tiny, "a photo of $ that Is more floral and is blue", token)
        backward = encode_with_pseudo_words(tiny, "a photo of $ that Is blue and Is more floral", token)
    expected = F.normalize(F.normalize(forward, dim=-1) + F.normalize(backward, dim=-1), dim=-1)
    got = I.compose_features(tiny, [query], token, amp=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, F.normalize(forward, dim=-1), atol=1e-3)  # both orders count
    # the same averaging for texts (Captioning), and one caption (CIRR) is encoded as written
    caption = I.compose_features(tiny, [query], ["a red dress"], amp=False)
    texts = text_features(tiny, ["a photo of a red dress that Is more floral and is blue",
                                 "a photo of a red dress that Is blue and Is more floral"], progress=False, amp=False)
    torch.testing.assert_close(caption, F.normalize(F.normalize(texts, dim=-1).sum(0, keepdim=True), dim=-1),
                               rtol=1e-4, atol=1e-5)
    cirr = fixture_splits["cirr"].queries[0]
    assert I.caption_orders(cirr) == [cirr.captions[0]]
    with torch.no_grad():
        single = encode_with_pseudo_words(tiny, f"a photo of $ that {cirr.captions[0]}", token)
    torch.testing.assert_close(I.compose_features(tiny, [cirr], token, amp=False), F.normalize(single, dim=-1),
                               rtol=1e-4, atol=1e-5)


def test_oti_tokens_cached_and_invalidated_by_config(tiny, fixture_splits, features, tmp_path, monkeypatch) -> None:
    calls = []
    real_oti = I.oti

    def counting_oti(backbone, feats, *args, **kwargs):
        calls.append(len(feats))
        return real_oti(backbone, feats, *args, **kwargs)

    monkeypatch.setattr(I, "oti", counting_oti)
    split, f = fixture_splits["cirr"], features["cirr"]
    first = I.oti_query_features(tiny, split, f, PHRASES, CONFIG, tmp_path)
    n_refs = len({q.reference for q in split.queries})
    assert calls == [n_refs]  # one token per distinct reference image
    assert len(list(tmp_path.glob("oti-tokens-*.safetensors"))) == 1
    again = I.oti_query_features(tiny, split, f, PHRASES, CONFIG, tmp_path)
    assert calls == [n_refs]  # read from the cache, not optimised again
    torch.testing.assert_close(again, first)
    changed = replace(CONFIG, oti=replace(CONFIG.oti, steps=5))
    I.oti_query_features(tiny, split, f, PHRASES, changed, tmp_path)
    assert calls == [n_refs, n_refs]  # another OTI config is another entry
    I.oti_query_features(tiny, split, f, {**PHRASES, "bag": ["a photo of bag that is blue"]}, CONFIG, tmp_path)
    assert len(calls) == 3  # so are other phrases
    assert len(list(tmp_path.glob("oti-tokens-*.safetensors"))) == 3
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")]  # atomic: no leftovers


def test_stand_in_captioner_picks_the_nearest_corpus_caption() -> None:
    corpus = I.CaptionCorpus(torch.eye(3, 4) * torch.tensor([[1.0], [5.0], [0.2]]),
                             ["a red dress", "a blue shirt", "a green top"])
    references = torch.tensor([[0.1, 2.0, 0.0, 0.0],    # along the blue shirt's axis
                               [0.0, 0.1, 0.3, 0.0],    # green top (its feature is short: cosine, not dot)
                               [1.0, 0.0, 0.0, 0.9]])   # nearest in angle to the red dress
    assert I.nearest_captions(references, corpus) == ["a blue shirt", "a green top", "a red dress"]
    with pytest.raises(ValueError, match="one caption per"):
        I.CaptionCorpus(torch.zeros(2, 4), ["one"])


def test_caption_corpus_holds_the_pretraining_pairs(tiny, fashion_root, tmp_path) -> None:
    corpus = I.caption_corpus(tiny, [fashion_root], cache_dir=tmp_path)
    assert len(corpus.captions) == len(corpus.features) == 3 * 8  # train images of three categories
    assert any("dress" in c for c in corpus.captions)
    # the fixture's images are all distinct, so each corpus image, as a reference, gets its own caption
    assert I.nearest_captions(corpus.features, corpus) == corpus.captions


def test_method_phrases_use_the_configs_settings(monkeypatch) -> None:
    seen = {}

    def fake_concept_phrases(concepts, lm, roots, lm_config, config, cache_dir, progress):
        seen.update(concepts=concepts, lm_config=lm_config, config=config, cache_dir=cache_dir)
        return {c: [f"a photo of {c} that is red"] for c in concepts}

    monkeypatch.setattr(I, "concept_phrases", fake_concept_phrases)
    phrases = I.method_phrases(["dress", "bag"], CONFIG, roots=["root"], cache_dir="cache", progress=False)
    assert list(phrases) == ["dress", "bag"]
    assert seen == {"concepts": ["dress", "bag"], "lm_config": CONFIG.phrase_lm, "config": CONFIG.phrases,
                    "cache_dir": "cache"}


def test_pretrain_phi_checkpoints_and_feeds_isearle(tiny, features, cache, tmp_path) -> None:
    images = torch.cat([f.gallery for f in features.values()])
    ckpt = tmp_path / "phi.pt"
    phi, history = I.pretrain_phi(tiny, images, PHRASES, CONFIG, cache, ckpt)
    assert ckpt.exists() and len(history) == CONFIG.phi.epochs and "gpt" in history[0]
    again, _ = I.pretrain_phi(tiny, images, PHRASES, CONFIG, cache, ckpt)  # loaded, same weights
    for a, b in zip(phi.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)
    assert I.phi_tokens(phi, images[:3]).shape == (3, tiny.token_embedding.embedding_dim)
    assert artifacts.phi_checkpoint(True, "fashion").parts[-3:] == ("isearle", "fashion", "isearle.pt")


def test_evaluate_isearle_tables_through_the_protocols(tiny, fixture_splits, features, fashion_root, cache) -> None:
    corpus = I.caption_corpus(tiny, [fashion_root], cache_dir=cache)
    table, per_query = I.evaluate_isearle(tiny, fixture_splits, config=CONFIG, phrases=PHRASES, phi=_phi(tiny),
                                          corpus=corpus, cache_dir=cache)
    assert list(table.index) == list(I.METHODS)
    for col in ("fashioniq R@10", "fashioniq R@50", "fashioniq average", "cirr R@1", "cirr Rsubset@1", "cirr avg",
                "circo mAP@5", "circo mAP@10", "circo mAP@50"):
        assert col in table.columns, col
    assert ((table >= 0) & (table <= 100)).all().all()
    # the baseline rows are evaluate_baselines' own numbers (one evaluation path)
    reference, _ = baselines.evaluate_baselines(tiny, fixture_splits, cache_dir=cache)
    for method in reference.index:
        for col in reference.columns:
            assert table.loc[method, col] == pytest.approx(reference.loc[method, col]), (method, col)
    for (bench, method), values in per_query.items():
        metric = {"fashioniq": "average", "cirr": "avg", "circo": "mAP@10"}[bench]
        assert values.mean(metric) == pytest.approx(table.loc[method, f"{bench} {metric}"]), (bench, method)
    # precomputed query features enter the same path: the text features give the text-only row
    text_row = I.evaluate_queries(fixture_splits, features, {n: f.text for n, f in features.items()})
    assert text_row == pytest.approx(table.loc["text"].to_dict())
    # the splits scored are those given, even where more splits' features are at hand (a subset of benchmarks)
    cirr = {n: s for n, s in fixture_splits.items() if s.dataset == "cirr"}
    cirr_row = I.evaluate_queries(cirr, features, {n: features[n].text for n in cirr})
    assert set(cirr_row) == {c for c in text_row if c.startswith("cirr ")}
    assert cirr_row == pytest.approx({c: v for c, v in text_row.items() if c.startswith("cirr ")})
    with pytest.raises(ValueError, match="unknown method"):
        I.evaluate_isearle(tiny, fixture_splits, methods=("oracle",))
    with pytest.raises(ValueError, match="needs a trained phi"):
        I.evaluate_isearle(tiny, fixture_splits, methods=("isearle",), cache_dir=cache)
