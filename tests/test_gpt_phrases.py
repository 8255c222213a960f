"""GPT phrases: corpus, local BPE tokenizer, a tiny GPT-2 that learns a pattern, generation, caches, local models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_pretrain import make_fashion_root

from cirlib.data.concepts import image_concepts
from cirlib.data.labels import load_attributed_images
from cirlib.methods import gpt_phrases as G
from cirlib.models.phrase_lm import END_OF_TEXT, load_causal_lm, train_tokenizer

KINDS = ("bag", "star", "coat", "dress", "sandal", "heart")
PATTERN = [f"a photo of {k} that is red" for k in KINDS]  # what the tiny model must learn to continue
QUICK = G.PhraseLMConfig.quick()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phrase-cache")


@pytest.fixture(scope="module")
def tiny_lm(cache):
    return G.train_phrase_lm(PATTERN * 4, QUICK, cache_dir=cache, progress=False)


def test_as_clause_and_clean_phrase():
    assert G.as_clause("Has two bags.") == "has two bags"
    assert G.as_clause("a red  dress") == "shows a red dress"
    assert G.as_clause("make it red") is None
    assert G.clean_phrase("a photo of cat that", " is eating. And then") == "a photo of cat that is eating"
    assert G.clean_phrase("a photo of cat that", "  is\n sleeping") == "a photo of cat that is"
    assert G.clean_phrase("a photo of cat that", " . more") is None


def test_tokenizer_round_trip_even_for_unseen_words():
    tok = train_tokenizer(PATTERN * 3, vocab_size=300)
    assert tok.eos_token == tok.pad_token == END_OF_TEXT
    assert len(tok) <= 300
    for text in (PATTERN[0], "a photo of Tortoise that zigzags, über-fast!"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(PATTERN[0])["input_ids"]) < len(PATTERN[0]) / 2  # merges were learnt


def test_tiny_lm_learns_to_continue_the_pattern(tiny_lm):
    phrases = G.generate_phrases(tiny_lm, ["bag", "star"], replace(G.PhraseConfig.quick(), phrases_per_concept=8),
                                 progress=False)
    assert list(phrases) == ["bag", "star"]
    for concept, found in phrases.items():
        assert found and len(found) == len(set(found)) < 8  # repeats removed
        assert all(p.startswith(f"a photo of {concept} that ") for p in found)
        assert f"a photo of {concept} that is red" in found
        assert all(" is " in p for p in found)


def test_phrases_respect_the_length_limit(tiny_lm):
    config = replace(G.PhraseConfig.quick(), max_new_tokens=1)
    phrases = G.generate_phrases(tiny_lm, ["coat", "a concept never seen"], config, progress=False)
    tok = tiny_lm.tokenizer
    for concept, found in phrases.items():
        prompt = f"a photo of {concept} that"
        for p in found:
            assert p.startswith(prompt + " ")
            assert len(tok(p)["input_ids"]) - len(tok(prompt)["input_ids"]) <= 1
    assert phrases["coat"] == ["a photo of coat that is"]


def test_phrases_stop_at_the_models_context(tiny_lm):
    context = tiny_lm.model.config.n_positions
    long_concept = " ".join(["coat"] * (context - 8))  # the prompt leaves a few positions only
    prompt_len = len(tiny_lm.tokenizer(f"a photo of {long_concept} that")["input_ids"])
    assert 0 < context - prompt_len < G.PhraseConfig.quick().max_new_tokens
    phrases = G.generate_phrases(tiny_lm, [long_concept], G.PhraseConfig.quick(), progress=False)
    assert all(len(tiny_lm.tokenizer(p)["input_ids"]) <= context for p in phrases[long_concept])
    with pytest.raises(ValueError, match="fills the phrase model's context"):
        G.generate_phrases(tiny_lm, [" ".join(["coat"] * context)], G.PhraseConfig.quick(), progress=False)


def test_model_cache_hit_and_invalidation(cache, tiny_lm, monkeypatch):
    fits = []
    real_fit = G._fit
    monkeypatch.setattr(G, "_fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    again = G.train_phrase_lm(PATTERN * 4, QUICK, cache_dir=cache, progress=False)
    assert fits == [] and again.fingerprint == tiny_lm.fingerprint
    config = G.PhraseConfig.quick()
    assert G.generate_phrases(again, KINDS, config) == G.generate_phrases(tiny_lm, KINDS, config)
    changed = G.train_phrase_lm([*PATTERN * 4, "a photo of hat that is blue"], QUICK, cache_dir=cache, progress=False)
    assert fits == [1] and changed.fingerprint != tiny_lm.fingerprint
    assert len(list(cache.glob("phrase-lm-*.safetensors"))) == 2


def test_training_repeats_exactly(tiny_lm):
    again = G.train_phrase_lm(PATTERN * 4, QUICK, progress=False)  # no cache: trained anew
    pairs = zip(again.model.state_dict().values(), tiny_lm.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_phrase_cache_hit_and_invalidation(tmp_path, tiny_lm, monkeypatch):
    config = G.PhraseConfig.quick()
    first = G.generate_phrases(tiny_lm, ["bag", "star"], config, cache_dir=tmp_path, progress=False)
    [entry] = tmp_path.glob("phrases-*.json")
    stamp = entry.stat().st_mtime_ns
    monkeypatch.setattr(G, "_sample", lambda *a: pytest.fail("a cached phrase list was sampled again"))
    assert G.generate_phrases(tiny_lm, ["bag", "star"], config, cache_dir=tmp_path, progress=False) == first
    assert entry.stat().st_mtime_ns == stamp
    for concepts, cfg in ((["bag"], config), (["bag", "star"], replace(config, temperature=1.0))):
        with pytest.raises(pytest.fail.Exception):
            G.generate_phrases(tiny_lm, concepts, cfg, cache_dir=tmp_path, progress=False)


def test_a_concept_with_no_continuation_falls_back_to_the_bare_prompt(tiny_lm, monkeypatch):
    monkeypatch.setattr(G, "_sample", lambda lm, concept, config: [] if concept == "star" else ["x"])
    with pytest.warns(UserWarning, match="1 concept"):
        assert G.generate_phrases(tiny_lm, ["bag", "star"], progress=False) == {"bag": ["x"],
                                                                                 "star": ["a photo of star"]}


def test_local_save_pretrained_folder_loads_through_auto_classes(tmp_path, tiny_lm):
    folder = tiny_lm.save(tmp_path / "tiny-gpt")
    local = load_causal_lm(folder, device="cpu")
    assert local.fingerprint.startswith("local:") and local.fingerprint == load_causal_lm(str(folder)).fingerprint
    config = G.PhraseConfig.quick()
    assert G.generate_phrases(local, KINDS[:3], config) == G.generate_phrases(tiny_lm, KINDS[:3], config)
    assert G.concept_phrases(["bag"], lm=str(folder), config=config)["bag"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="generated roots"):
        G.concept_phrases(["bag"])


def test_embedded_corpus_sentences_are_about_their_images(tmp_path):
    root = make_fashion_root(tmp_path / "fashion")
    corpus = G.embedded_corpus([root], cache_dir=tmp_path / "cache")
    items = load_attributed_images([root], "train")
    assert len(items) <= len(corpus) <= 2 * len(items)  # an absolute and maybe a partial description each
    known = {c for it in items for c in image_concepts(it.benchmark, it.attributes)}
    for sentence in corpus:
        concept, clause = sentence.removeprefix("a photo of ").split(" that ", 1)
        assert concept in known and clause.split()[0] in {"shows", "is", "has", "comes", "features"}
    assert any(s.endswith("that shows a red striped dress") for s in corpus)
    assert G.embedded_corpus([root], cache_dir=tmp_path / "cache") == corpus
    assert len(list((tmp_path / "cache").glob("phrase-corpus-*.json"))) == 1
