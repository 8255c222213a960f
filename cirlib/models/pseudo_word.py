"""Pseudo-word text encoding: a prompt whose placeholder token stands for a learned vector.

Textual inversion represents an image as one vector ``v`` in the text tower's word-embedding
space. To read it, a prompt such as "a photo of $ that is red" is tokenized as usual and, after
the word-embedding lookup, the placeholder's embedding is replaced by ``v``; everything after that
(positional embedding, transformer, final norm, pooling, projection) is the model's own
``encode_text``. The replacement is a forward hook on the word embedding, so the path through the
text tower is open_clip's code itself, whatever its pooling or projection, and a placeholder
holding its own embedding row gives exactly ``encode_text``'s output.

Gradients reach the vectors only: the model's parameters are frozen while the graph is recorded,
so optimising a pseudo-word never accumulates gradients (or memory) in the frozen CLIP.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

PLACEHOLDER = "$"
"""The pseudo-word's surface form: a single token in CLIP's BPE vocabulary, rare in captions."""


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require grad inside; each gets its own flag back after."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def word_embedding(backbone: "Backbone") -> nn.Embedding:
    """The text tower's word embedding, or a TypeError for towers without one (Hugging Face text)."""
    try:
        embedding = backbone.token_embedding
    except AttributeError:
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"pseudo-word encoding needs an open_clip text tower with a token_embedding "
            f"(CLIP or CustomTextCLIP with TextTransformer); {backbone.model_name} "
            f"({type(backbone.model).__name__}) has none"
        )
    return embedding


def placeholder_id(backbone: "Backbone", placeholder: str = PLACEHOLDER) -> int:
    """The one token id the backbone's tokenizer gives ``placeholder``.

    Found as the ids that tokenizing ``placeholder`` adds to tokenizing the empty string (which
    holds only start/end/padding), so it works for any open_clip tokenizer.
    """
    empty = set(backbone.tokenize("")[0].tolist())
    ids = [t for t in backbone.tokenize(placeholder)[0].tolist() if t not in empty]
    if len(ids) != 1:
        raise ValueError(
            f"placeholder {placeholder!r} must be exactly one token of {backbone.model_name}'s tokenizer, "
            f"got ids {ids}; pick a single-token placeholder such as {PLACEHOLDER!r}"
        )
    return ids[0]


def pseudo_tokens(
    backbone: "Backbone", prompts: str | Sequence[str], n: int, placeholder: str = PLACEHOLDER
) -> tuple[Tensor, int]:
    """Token ids ``[n, context_length]`` of the prompts (one prompt is repeated ``n`` times) and the
    placeholder's id; every prompt must still hold the placeholder after truncation."""
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} pseudo-word vectors; give one prompt or one per vector")
    token_id = placeholder_id(backbone, placeholder)
    tokens = backbone.tokenize(prompts)
    missing = [p for p, row in zip(prompts, tokens) if not bool((row == token_id).any())]
    if missing:
        raise ValueError(
            f"{len(missing)} prompt(s) hold no placeholder {placeholder!r} within {backbone.context_length} "
            f"tokens, e.g. {missing[0]!r}"
        )
    return tokens, token_id


def encode_with_pseudo_words(
    backbone: "Backbone", prompts: str | Sequence[str], vectors: Tensor, placeholder: str = PLACEHOLDER
) -> Tensor:
    """Text features ``[N, embed_dim]`` of prompts whose placeholder is replaced by ``vectors[i]``.

    ``vectors`` is ``[N, width]`` in the word-embedding space; ``prompts`` is one prompt for all rows
    or one per row. Every occurrence of the placeholder in row ``i`` takes ``vectors[i]``. Runs in
    the caller's grad mode and autocast; gradients flow to ``vectors`` and never to the model.
    """
    embedding = word_embedding(backbone)
    if vectors.ndim != 2 or vectors.shape[1] != embedding.embedding_dim:
        raise ValueError(
            f"vectors must be [N, {embedding.embedding_dim}] (the word-embedding width of "
            f"{backbone.model_name}), got {tuple(vectors.shape)}"
        )
    tokens, token_id = pseudo_tokens(backbone, prompts, len(vectors), placeholder)
    tokens = tokens.to(backbone.device)
    mask = (tokens == token_id).unsqueeze(-1)

    def substitute(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return torch.where(mask, vectors.to(out.device, out.dtype).unsqueeze(1), out)

    handle = embedding.register_forward_hook(substitute)
    try:
        with frozen(backbone.model):
            return backbone.model.encode_text(tokens)
    finally:
        handle.remove()
