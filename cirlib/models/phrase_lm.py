"""The causal language model that writes iSEARLE's phrases: a small GPT-2 built here, or any hub model.

The paper continues "a photo of {concept}" with GPT-Neo 2.7B. Offline, the course trains a small
GPT-2 (``transformers.GPT2Config``) on its own benchmarks' text instead, with a byte-level BPE
tokenizer trained on the same text (nothing can be downloaded, and byte-level BPE still encodes
any class name a user brings). Both kinds are a :class:`PhraseLM`: a ``transformers`` causal LM
and its tokenizer, plus a fingerprint naming the weights for cache keys.

A trained small model is cached as one safetensors file (:func:`save_lm_file`) whose metadata
holds the GPT-2 config and the tokenizer, so one atomic write stores all of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from cirlib.core.device import get_device
from cirlib.core.digests import content_digest
from cirlib.core.io import fingerprint

END_OF_TEXT = "<|endoftext|>"  # GPT-2's separator: ends every training sentence, stops generation


@dataclass
class PhraseLM:
    """A causal LM with its tokenizer; ``fingerprint`` changes whenever the weights do."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.model.device

    def save(self, directory: str | os.PathLike) -> Path:
        """Write model and tokenizer in the ``save_pretrained`` layout that :func:`load_causal_lm` reads."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's scheme, nothing downloaded).

    Its alphabet is all 256 bytes, so words the texts never contain still encode.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def small_gpt(
    tokenizer: PreTrainedTokenizerBase, n_layer: int, n_head: int, n_embd: int, n_positions: int, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised GPT-2 (seeded without touching the global RNG) for ``tokenizer``'s vocabulary."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.loss_type = "ForCausalLM"  # transformers cannot tell it from the class name and warns that it guessed
    return model


def save_lm_file(lm: PhraseLM, path: str | os.PathLike, key: str) -> None:
    """Weights, GPT-2 config and tokenizer in one safetensors file, tagged with its cache ``key``."""
    metadata = {
        "key": key,
        "name": lm.name,
        "config": lm.model.config.to_json_string(),
        "tokenizer": lm.tokenizer.backend_tokenizer.to_str(),
    }
    save_model(lm.model, str(path), metadata=metadata)  # handles GPT-2's tied input/output embeddings


def read_lm_file(path: str | os.PathLike, key: str, device: str | torch.device = "auto") -> PhraseLM:
    """The :class:`PhraseLM` of a :func:`save_lm_file` file; raises unless it was written for ``key``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        raise ValueError("its key does not match its inputs")
    config = GPT2Config.from_dict(json.loads(meta["config"]))
    model = AutoModelForCausalLM.from_config(config)
    load_model(model, str(path))  # strict: a missing or extra tensor raises
    tokenizer = _wrap(Tokenizer.from_str(meta["tokenizer"]))
    return PhraseLM(model.to(get_device(device)).eval(), tokenizer, meta["name"], key)


def _local_path(name_or_path: str | os.PathLike) -> Path | None:
    """The directory ``name_or_path`` names, or None for a hub model id ("EleutherAI/gpt-neo-2.7B")."""
    if isinstance(name_or_path, os.PathLike) or os.path.isdir(name_or_path):
        return Path(name_or_path)
    if str(name_or_path).startswith((".", "/", "~")) or (os.sep != "/" and os.sep in str(name_or_path)):
        return Path(name_or_path).expanduser()
    return None


def load_causal_lm(name_or_path: str | os.PathLike, device: str | torch.device = "auto") -> PhraseLM:
    """A causal LM from a local ``save_pretrained`` directory or a hub id (the paper: GPT-Neo 2.7B).

    A local directory is fingerprinted by its files' names and contents (it may move without
    invalidating the phrases cached for it), a hub model by its id and the revision
    ``transformers`` resolved. Only a hub id can reach the network.
    """
    local = _local_path(name_or_path)
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"language model directory {local} not found (expected a save_pretrained folder)")
    source = str(local if local is not None else name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    if tokenizer.pad_token is None:  # GPT-style tokenizers have none; sampling one prompt needs no padding
        tokenizer.pad_token = tokenizer.eos_token
    if local is not None:
        files = sorted(p for p in local.rglob("*") if p.is_file())
        weights = "local:" + fingerprint({str(p.relative_to(local)): content_digest(p) for p in files})
    else:
        weights = f"hub:{name_or_path}@{getattr(model.config, '_commit_hash', None)}"
    return PhraseLM(model.to(get_device(device)).eval(), tokenizer, str(name_or_path), weights)


__all__ = ["END_OF_TEXT", "PhraseLM", "load_causal_lm", "read_lm_file", "save_lm_file", "small_gpt",
           "train_tokenizer"]
