"""iSEARLE's GPT phrases (the data of L_gpt): a language model continues "a photo of {concept} that"
for every concept of the vocabulary, once, and the phrases are cached.

The paper samples 256 phrases per Open Images class name from GPT-Neo 2.7B (temperature 0.5, at
most 35 tokens). Offline, :func:`train_phrase_lm` trains a small GPT-2 on the embedded benchmarks'
own text instead (:func:`embedded_corpus`): each training sentence is "a photo of {concept} that
{clause}", where the concept is one the image really shows and the clause one of its generated
descriptions, so the model learns to say true, CIR-like things about a concept ("a photo of red
dress that has a star print"). A hub id or a local ``save_pretrained`` folder can replace it
(:func:`~cirlib.models.phrase_lm.load_causal_lm`); :func:`generate_phrases` treats both alike.

Both steps are cached in :mod:`cirlib.core.cache`: the small model per (training config, corpus
text, arithmetic), the phrases per (concept list, model fingerprint, generation settings).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cirlib.core.cache import CacheEntry, cache_entry, cache_key
from cirlib.core.device import get_device, precision
from cirlib.core.io import fingerprint
from cirlib.data import datasets
from cirlib.data.concepts import CONCEPT_TEMPLATE, image_concepts
from cirlib.data.labels import AttributedImage, load_attributed_images, partial_caption_function
from cirlib.data.synth.meta import meta_path
from cirlib.methods.pretrain import lr_factor
from cirlib.models.phrase_lm import PhraseLM, load_causal_lm, read_lm_file, save_lm_file, small_gpt, train_tokenizer

PROMPT = "a photo of {} that"
"""What the language model continues. The paper feeds "a photo of {concept}" and its phrases go on
with "that ..." ("a photo of cat that is eating ..."); ending the prompt with "that" makes any model
write a clause, the form relative captions take."""

TRAINER_VERSION = 1  # bump when a change here changes what a given config and corpus train
GENERATOR_VERSION = 1  # bump when phrase sampling or cleaning changes

# How the generated descriptions start when they already are clauses ("has two bags", "is striped");
# anything else that is a noun phrase ("a red dress") is said to be shown, and orders ("make it red")
# are left out: they do not continue "a photo of X that".
_CLAUSE_STARTS = ("is ", "has ", "also has ", "shows ", "does not ", "comes in ", "features ", "keeps ",
                  "stays ", "still has ", "should be ")
_SENTENCE_END = re.compile(r"[.!?\n]")


# ---------------------------------------------------------------------------------------- corpus
def as_clause(text: str) -> str | None:
    """``text`` as what follows "that": a clause as it is, a noun phrase after "shows", else None."""
    text = " ".join(text.strip().rstrip(".").split())
    text = text[:1].lower() + text[1:]
    if text.startswith(_CLAUSE_STARTS):
        return text
    if text.startswith(("a ", "an ")):
        return f"shows {text}"
    return None


def _relative_clauses(
    root: Path, split: str, by_path: dict[Path, AttributedImage]
) -> list[tuple[AttributedImage, str]]:
    """(target image, its query's captions as one clause) for the triplets of a FashionIQ or CIRR root."""
    if (root / "image_splits").is_dir():
        loaded = [datasets.load_fashioniq(root, c, split) for c in datasets.FASHIONIQ_CATEGORIES]
    elif (root / "cirr").is_dir():
        loaded = [datasets.load_cirr(root, "test1" if split == "test" else split)]
    else:
        return []
    out = []
    for s in loaded:
        for q in s.queries:
            target = by_path.get(s.image_paths.get(q.target)) if q.target is not None else None
            clauses = [as_clause(c) for c in q.captions]
            if target is not None and clauses and all(c is not None and not c.startswith("shows ") for c in clauses):
                out.append((target, " and ".join(clauses)))
    return out


def _text_files(root: Path) -> list[Path]:
    """The files a generated root's text comes from: its metadata and its caption and split lists."""
    lists = sorted(p for sub in ("captions", "image_splits", "cirr") for p in (root / sub).rglob("*.json"))
    return [meta_path(root), *lists]


def embedded_corpus(
    roots: Sequence[str | os.PathLike],
    split: str = "train",
    seed: int = 0,
    prompt: str = PROMPT,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Training sentences "a photo of {concept} that {clause}" from generated roots (FashionIQ / CIRR layout).

    Per image of ``split``: its absolute description ("... that shows a red striped dress") and a
    partial one ("... that has two stars and is on a lavender background"); per triplet, its
    relative captions when they are clauses, about the target ("... that is red and has a star
    print"). Each sentence's concept is drawn (with ``seed``) from the concepts its image shows.
    Reading the roots takes seconds (every listed image is checked on disk), so with ``cache_dir``
    the sentences are cached per (settings, root text files).
    """
    entry = None
    if cache_dir is not None:
        files = [f for root in map(Path, roots) for f in _text_files(root)]
        inputs = {"split": split, "seed": seed, "prompt": prompt, "trainer": TRAINER_VERSION}
        entry = cache_entry(cache_dir, "corpus", "phrase-corpus", ".json", inputs, files)
        cached = entry.load(lambda file: _read_keyed(file, entry.key)["sentences"])
        if cached is not None:
            return cached
    sentences = _build_corpus(roots, split, seed, prompt)
    if entry is not None:
        _write_keyed(entry, {"sentences": sentences})
    return sentences


def _build_corpus(roots: Sequence[str | os.PathLike], split: str, seed: int, prompt: str) -> list[str]:
    items = load_attributed_images(roots, split)
    rng = np.random.default_rng([seed, 13])
    pairs: list[tuple[AttributedImage, str]] = []
    for it in items:
        pairs.append((it, f"shows {it.caption}"))
        partial = as_clause(partial_caption_function(it.benchmark)(it.attributes, rng))
        if partial is not None:
            pairs.append((it, partial))
    by_path = {it.path: it for it in items}
    for root in map(Path, roots):
        pairs.extend(_relative_clauses(root, split, by_path))
    sentences = []
    for it, clause in pairs:
        concepts = image_concepts(it.benchmark, it.attributes)
        sentences.append(f"{prompt.format(concepts[int(rng.integers(len(concepts)))])} {clause}")
    return sentences


def _read_keyed(file: Path, key: str) -> dict[str, Any]:
    """A JSON cache entry's content; raises unless it was written for ``key``."""
    blob = json.loads(file.read_text(encoding="utf-8"))
    if blob.get("key") != key:
        raise ValueError("its key does not match its inputs")
    return blob


def _write_keyed(entry: CacheEntry, content: dict[str, Any]) -> None:
    text = json.dumps({"key": entry.key, **content}, ensure_ascii=False)
    entry.save(lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class PhraseLMConfig:
    """Size and schedule of the small GPT-2 (its fingerprint, with the corpus, keys the cached model)."""

    # The embedded corpus has a few hundred words, so BPE stops near 650 tokens (bytes and
    # <|endoftext|> included); the limit matters for larger corpora.
    vocab_size: int = 1024
    # Sized for the budget: a 2-layer model of 0.5M parameters takes ~0.1 CPU-s per step of 32 sentences
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 64  # context; longer training sentences are cut (the embedded ones reach ~45 tokens)
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"

    @classmethod
    def quick(cls) -> "PhraseLMConfig":
        """A model and schedule small enough for tests: seconds, and still learns a fixed pattern."""
        return cls(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=32, steps=150, batch_size=16,
                   lr=5e-3, warmup_steps=10)


def _training_inputs(config: PhraseLMConfig, corpus: Sequence[str]) -> dict[str, Any]:
    """Everything a trained model depends on; the device only through its arithmetic."""
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"config": settings, "corpus": fingerprint(list(corpus)), "trainer": TRAINER_VERSION,
            "precision": precision(get_device(config.device), enabled=False)}


def _encode_corpus(lm: PhraseLM, corpus: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[S, max_len]`` (each sentence ends with end-of-text, cut at ``max_len``) and lengths ``[S]``."""
    eos = lm.tokenizer.eos_token_id
    rows = [(ids + [eos])[:max_len] for ids in lm.tokenizer(list(corpus))["input_ids"]]
    ids = torch.full((len(rows), max_len), eos, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def _fit(lm: PhraseLM, ids: torch.Tensor, lengths: torch.Tensor, config: PhraseLMConfig, progress: bool) -> None:
    """Train ``lm.model`` in place on random batches of sentences (the loss shows on the progress bar)."""
    model, device = lm.model, lm.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    bar = tqdm(range(config.steps), desc="phrase LM", disable=not progress, leave=False)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else None, device_type=device.type):
        torch.manual_seed(config.seed)  # dropout draws from the global RNG: seeded, the run repeats exactly
        for step in bar:
            rows = torch.randint(len(ids), (config.batch_size,), generator=generator)
            width = int(lengths[rows].max())
            x = ids[rows, :width].to(device)
            mask = (torch.arange(width) < lengths[rows, None]).to(device)
            loss = model(input_ids=x, attention_mask=mask.long(), labels=x.masked_fill(~mask, -100)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def train_phrase_lm(
    corpus: Sequence[str],
    config: PhraseLMConfig = PhraseLMConfig(),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> PhraseLM:
    """The small GPT-2 (and its BPE tokenizer) trained on ``corpus``, cached under ``cache_dir``.

    The cache entry is keyed by the config, the corpus text and the arithmetic, so a changed
    corpus retrains and an unchanged one loads in well under a second.
    """
    if not corpus:
        raise ValueError("the phrase LM needs a non-empty training corpus")
    inputs = _training_inputs(config, corpus)
    entry = None
    if cache_dir is not None:
        entry = cache_entry(cache_dir, "language model", "phrase-lm", ".safetensors", inputs, [])
        cached = entry.load(lambda file: read_lm_file(file, entry.key, config.device))
        if cached is not None:
            return cached
    tokenizer = train_tokenizer(list(corpus), config.vocab_size)
    model = small_gpt(tokenizer, config.n_layer, config.n_head, config.n_embd, config.n_positions, config.seed)
    lm = PhraseLM(model.to(get_device(config.device)), tokenizer, "cirlib-small-gpt2", cache_key(inputs, []))
    _fit(lm, *_encode_corpus(lm, corpus, config.n_positions), config, progress)
    if entry is not None:
        entry.save(lambda tmp: save_lm_file(lm, tmp, entry.key))
    return lm


# ------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class PhraseConfig:
    """How phrases are sampled (part of their cache key). Defaults follow the paper except the count
    (256 there, for 20K class names and a 2.7B model on a GPU)."""

    prompt: str = PROMPT
    phrases_per_concept: int = 32  # samples drawn; fewer remain after removing repeats
    temperature: float = 0.5
    max_new_tokens: int = 35
    seed: int = 0

    @classmethod
    def quick(cls) -> "PhraseConfig":
        return cls(phrases_per_concept=4, max_new_tokens=16)


def clean_phrase(prompt: str, continuation: str) -> str | None:
    """``prompt`` + ``continuation`` up to its first sentence end, whitespace collapsed; None when
    nothing follows the prompt."""
    head = _SENTENCE_END.split(continuation, maxsplit=1)[0]
    if not head.strip():
        return None
    return " ".join(f"{prompt}{head}".split())


def _concept_seed(seed: int, concept: str) -> int:
    """A seed per concept, so a concept's phrases do not depend on which others are generated with it."""
    return int(fingerprint([seed, concept]), 16) % (2**63)


@torch.no_grad()
def _sample(lm: PhraseLM, concept: str, config: PhraseConfig) -> list[str]:
    prompt = config.prompt.format(concept)
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    # a model with learned positions cannot continue past its context: cap the phrase at what is left
    context = getattr(lm.model.config, "n_positions", None) or getattr(lm.model.config, "max_position_embeddings", None)
    room = config.max_new_tokens if context is None else min(config.max_new_tokens, context - enc["input_ids"].shape[1])
    if room < 1:
        raise ValueError(f"the prompt {prompt!r} fills the phrase model's context of {context} tokens; "
                         "use a model with a longer context (PhraseLMConfig.n_positions)")
    with torch.random.fork_rng(devices=[] if lm.device.type == "cpu" else None, device_type=lm.device.type):
        torch.manual_seed(_concept_seed(config.seed, concept))
        out = lm.model.generate(
            **enc,
            do_sample=True,
            temperature=config.temperature,
            max_new_tokens=room,
            num_return_sequences=config.phrases_per_concept,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    texts = lm.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return list(dict.fromkeys(p for p in (clean_phrase(prompt, t) for t in texts) if p is not None))


def _read_phrases(file: Path, key: str, concepts: list[str]) -> dict[str, list[str]]:
    phrases = _read_keyed(file, key)["phrases"]
    if list(phrases) != concepts:
        raise ValueError("its concepts do not match its inputs")
    return phrases


def generate_phrases(
    lm: PhraseLM,
    concepts: Sequence[str],
    config: PhraseConfig = PhraseConfig(),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Concept -> distinct phrases "a photo of {concept} that ...", sampled once and cached.

    A concept whose samples all end at once gets the bare "a photo of {concept}" (with a warning),
    so every concept has a phrase to regularise with.
    """
    concepts = list(dict.fromkeys(concepts))
    inputs = {"concepts": concepts, "lm": lm.fingerprint, "generation": asdict(config),
              "generator": GENERATOR_VERSION, "precision": precision(lm.device, enabled=False)}
    entry = None
    if cache_dir is not None:
        entry = cache_entry(cache_dir, "phrase", "phrases", ".json", inputs, [])
        cached = entry.load(lambda file: _read_phrases(file, entry.key, concepts))
        if cached is not None:
            return cached
    lm.model.eval()
    phrases: dict[str, list[str]] = {}
    empty = []
    for concept in tqdm(concepts, desc="GPT phrases", disable=not progress, leave=False):
        phrases[concept] = _sample(lm, concept, config)
        if not phrases[concept]:
            empty.append(concept)
            phrases[concept] = [CONCEPT_TEMPLATE.format(concept)]
    if empty:
        warnings.warn(f"{len(empty)} concept(s) got no continuation and use the bare prompt: {empty[:5]}",
                      stacklevel=2)
    if entry is not None:
        _write_keyed(entry, {"phrases": phrases})
    return phrases


def concept_phrases(
    concepts: Sequence[str],
    lm: PhraseLM | str | os.PathLike | None = None,
    roots: Sequence[str | os.PathLike] = (),
    lm_config: PhraseLMConfig = PhraseLMConfig(),
    config: PhraseConfig = PhraseConfig(),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Phrases for ``concepts`` from ``lm`` (a model, a hub id or a local folder), or by default from
    the small GPT-2 trained on the generated ``roots`` (both cached under ``cache_dir``)."""
    if lm is None:
        if not roots:
            raise ValueError("pass a language model, or the generated roots to train the small one on")
        corpus = embedded_corpus(roots, prompt=config.prompt, cache_dir=cache_dir)
        lm = train_phrase_lm(corpus, lm_config, cache_dir, progress)
    elif not isinstance(lm, PhraseLM):
        lm = load_causal_lm(lm, lm_config.device)
    return generate_phrases(lm, concepts, config, cache_dir, progress)


__all__ = [
    "PROMPT",
    "PhraseConfig",
    "PhraseLMConfig",
    "as_clause",
    "clean_phrase",
    "concept_phrases",
    "embedded_corpus",
    "generate_phrases",
    "train_phrase_lm",
]
