"""The two networks of candidate re-ranking (Liu et al., TMLR 2024), built on any open_clip text tower.

* :class:`CandidateFilter` (§3.1, Fig. 2 left) is the text tower in *multimodal mode*: every layer
  runs self-attention over the caption, then cross-attention from the caption positions to the
  reference image's patch tokens, then the feed-forward. Its output at the EOT position (open_clip's
  pooling for its text towers) is projected into the joint space and compared by cosine with the
  candidates' image embeddings; the whole fused sequence is ``z_t``, the second stage's surrogate
  of the reference image.
* :class:`DualEncoderReranker` (§3.2, Fig. 3) runs Encoder-t (over the caption tokens) and
  Encoder-z_t (over ``z_t``) side by side, both cross-attending the *candidate's* patch tokens. After
  cross-attention the two streams' outputs are merged (averaged in the first half of the layers, a
  linear layer over their concatenation in the second half, as the authors' BLIP-NLVR code does) and
  the merged feature is added to each stream's residual; the feed-forward weights are one module
  shared by both streams. A two-layer MLP scores the concatenated EOT outputs. Its "w. Ref_CLS"
  ablation feeds Encoder-z_t the reference image's class token instead of ``z_t``.

BLIP's text encoder comes with pretrained cross-attention; open_clip's text towers have none. Both
networks therefore copy the backbone's token and positional embeddings, self-attention,
feed-forward and layer norms (as BLIP initialises its encoders from BERT) and add new
cross-attention layers. Cross-attention keys and values project the image tokens (the ViT's width)
to the text width, as BLIP's ``encoder_width`` key/value layers do. The causal self-attention
mask of CLIP's text tower is kept, so positions after the EOT token never influence it: sequences
are cut after the batch's last EOT, which gives the same numbers at a fraction of the cost.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from cirlib.models.features import patch_token_shape

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

Merge = Literal["half", "linear"]
"""``"half"``: average in the first half of the layers, linear over the concatenation after (the
paper's design); ``"linear"``: the linear merge in every layer (the paper's "Full-MLP merge" ablation)."""
Encoders = Literal["both", "t", "z"]
"""Which re-ranker streams run: both, Encoder-t only ("w/o Encoder-z_t") or Encoder-z_t only ("w/o Encoder-t")."""
Reference = Literal["z_t", "cls"]
"""What Encoder-z_t reads: ``"z_t"``, the filter's fused sequence (the paper's design), or ``"cls"``,
the reference image's pooled class token in its place (the paper's "w. Ref_CLS" ablation)."""


@dataclass
class TextTower:
    """The pieces of an open_clip text tower that the multimodal encoders copy."""

    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter  # [context, width]
    blocks: list[ResidualAttentionBlock]
    ln_final: nn.Module
    projection: nn.Parameter | nn.Linear | None  # width -> joint space
    pool_type: str  # "argmax" (EOT has the largest id) or "eos"
    eos_id: int | None

    @property
    def width(self) -> int:
        return int(self.positional_embedding.shape[1])

    @property
    def heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)


def text_tower(backbone: "Backbone") -> TextTower:
    """The backbone's text tower, or NotImplementedError naming what it lacks.

    Supported: open_clip's own causal text transformers pooled at the EOT token (``CLIP`` and
    ``CustomTextCLIP`` with a ``TextTransformer``), which is every CLIP-style model it ships. Towers
    without a causal mask, with an appended class token (CoCa) or from Hugging Face are not.
    """
    model = backbone.model
    text = getattr(model, "text", model)
    name = backbone.model_name
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(text, attr) for attr in needed):
        raise NotImplementedError(f"{name}: its text tower ({type(text).__name__}) is not an open_clip "
                                  "text transformer")
    pool_type = getattr(text, "pool_type", getattr(model, "text_pool_type", "argmax"))
    eos_id = getattr(text, "eos_id", getattr(model, "text_eos_id", None))
    blocks = list(text.transformer.resblocks)
    problems = []
    if text.attn_mask is None:
        problems.append("no causal mask (a bidirectional tower reads padding)")
    if getattr(text, "cls_emb", None) is not None:
        problems.append("an appended class token")
    if pool_type not in ("argmax", "eos"):
        problems.append(f"pooling {pool_type!r} instead of the EOT token")
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        problems.append(f"{type(blocks[0]).__name__} blocks")
    if problems:
        raise NotImplementedError(f"{name}: the multimodal encoders need a causal text tower pooled at EOT, "
                                  f"this one has {', '.join(problems)}")
    return TextTower(text.token_embedding, text.positional_embedding, blocks, text.ln_final,
                     getattr(text, "text_projection", None), pool_type, eos_id)


def causal_mask(length: int) -> Tensor:
    """Additive ``[length, length]`` mask: position i attends to positions <= i (open_clip's)."""
    return torch.full((length, length), float("-inf")).triu_(1)


class SelfAttention(nn.Module):
    """The pre-norm self-attention half of an open_clip block: ``ls(attn(ln(x)))`` (residual added by the caller)."""

    def __init__(self, block: ResidualAttentionBlock) -> None:
        super().__init__()
        self.ln = copy.deepcopy(block.ln_1)
        self.attn = copy.deepcopy(block.attn)
        self.ls = copy.deepcopy(block.ls_1)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.ln(x)
        return self.ls(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask.to(h.dtype))[0])


class FeedForward(nn.Module):
    """The pre-norm feed-forward half of an open_clip block: ``ls(mlp(ln(x)))``."""

    def __init__(self, block: ResidualAttentionBlock) -> None:
        super().__init__()
        self.ln = copy.deepcopy(block.ln_2)
        self.mlp = copy.deepcopy(block.mlp)
        self.ls = copy.deepcopy(block.ls_2)

    def forward(self, x: Tensor) -> Tensor:
        return self.ls(self.mlp(self.ln(x)))


class CrossAttention(nn.Module):
    """Pre-norm attention from text positions to image tokens; keys and values map the image width to the text's.

    New weights, initialised like open_clip's text attention (in-projections with std
    ``width^-1/2``, the output projection scaled down by ``(2 layers)^-1/2``), so a fresh layer
    perturbs the copied tower no more than one of its own attention layers does.
    """

    def __init__(self, width: int, heads: int, image_width: int, layers: int) -> None:
        super().__init__()
        self.image_width = image_width
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=image_width, vdim=image_width, batch_first=True)
        for name, param in self.attn.named_parameters():
            if name.endswith("proj_weight"):
                nn.init.normal_(param, std=width**-0.5)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
        nn.init.normal_(self.attn.out_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        """``x`` ``[M * R, L, width]``: ``R`` consecutive sequences read each of the ``M`` images ``[M, P, C]``.

        Cross-attention has no mask and treats every query position alike, so the ``R`` sequences
        of one image are attended as one sequence of ``R * L`` positions: keys and values are
        projected once per image, not once per (sequence, image) pair.
        """
        m, (n, length, width) = len(image), x.shape
        h = self.ln(x).reshape(m, (n // m) * length, width)
        image = image.to(h.dtype)
        return self.attn(h, image, image, need_weights=False)[0].reshape(n, length, width)


def _check_inputs(tokens: Tensor, images: Tensor, image_width: int, what: str, shared: bool = False) -> None:
    """Shapes, and widths that match the cross-attention; ``shared``: consecutive captions may share an image."""
    if tokens.ndim != 2 or tokens.dtype != torch.long:
        raise ValueError(f"{what}: tokens must be a long [N, L] tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    n = tokens.shape[0]
    fits = images.ndim == 3 and (images.shape[0] == n or (shared and images.shape[0] and n % images.shape[0] == 0))
    if not fits:
        rows = f"a divisor of {n}" if shared else f"{n}"
        raise ValueError(f"{what}: image tokens must be [M, P, C] with M = {rows} (one image per caption"
                         f"{' or per group of consecutive captions' if shared else ''}), got {tuple(images.shape)}")
    if images.shape[2] != image_width:
        raise ValueError(f"{what}: image tokens have width {images.shape[2]} but the cross-attention was built for "
                         f"{image_width} (patch tokens of another image tower?)")


class _EOTPooling(nn.Module):
    """Where open_clip pools a caption (its EOT token) and how far a causal tower must read."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.pool_type, self.eos_id = tower.pool_type, tower.eos_id
        self.context_length = int(tower.positional_embedding.shape[0])

    def index(self, tokens: Tensor) -> Tensor:
        """``[N]`` position of each caption's EOT token."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"captions have {tokens.shape[1]} tokens, the text tower reads {self.context_length}")
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)


class CandidateFilter(nn.Module):
    """§3.1: the text tower with cross-attention to the reference's patch tokens after every self-attention.

    ``forward(tokens, reference_tokens)`` returns the query embedding ``[N, E]`` (EOT output after
    the final layer norm, through the text projection: the joint space of the image embeddings)
    and ``z_t`` ``[N, L', width]``, the layer-normed fused sequence up to the batch's last EOT.
    ``logit_scale`` is Eq. 1's learnable temperature (as CLIP's: ``log(1/T)``, used as
    ``exp().clamp(max=100)``).
    """

    def __init__(self, tower: TextTower, image_width: int, layers: int | None = None,
                 init_temperature: float = 0.07) -> None:
        super().__init__()
        n = len(tower.blocks) if layers is None else layers
        if not 1 <= n <= len(tower.blocks):
            raise ValueError(f"layers must be in [1, {len(tower.blocks)}] (the text tower's depth), got {layers}")
        if tower.projection is None:
            raise NotImplementedError("the text tower has no projection into the joint space")
        self.image_width = image_width
        self.pooling = _EOTPooling(tower)
        self.token_embedding = copy.deepcopy(tower.token_embedding)
        self.positional_embedding = copy.deepcopy(tower.positional_embedding)
        self.self_attn = nn.ModuleList(SelfAttention(b) for b in tower.blocks[:n])
        self.cross_attn = nn.ModuleList(CrossAttention(tower.width, tower.heads, image_width, n) for _ in range(n))
        self.feed_forward = nn.ModuleList(FeedForward(b) for b in tower.blocks[:n])
        self.ln_final = copy.deepcopy(tower.ln_final)
        self.projection = copy.deepcopy(tower.projection)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.register_buffer("attn_mask", causal_mask(self.pooling.context_length), persistent=False)
        self.hparams = {"layers": n, "image_width": image_width, "init_temperature": init_temperature}

    @classmethod
    def from_backbone(cls, backbone: "Backbone", layers: int | None = None,
                      init_temperature: float = 0.07) -> "CandidateFilter":
        """A filter initialised from ``backbone``'s text tower (the first ``layers`` blocks; all by default)."""
        return cls(text_tower(backbone), patch_token_shape(backbone)[1], layers, init_temperature).to(backbone.device)

    @property
    def width(self) -> int:
        return int(self.positional_embedding.shape[1])

    @property
    def scale(self) -> Tensor:
        """lambda of Eq. 1."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, tokens: Tensor, reference_tokens: Tensor) -> tuple[Tensor, Tensor]:
        _check_inputs(tokens, reference_tokens, self.image_width, "CandidateFilter")
        eot = self.pooling.index(tokens)
        length = int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        mask = self.attn_mask[:length, :length]
        for sa, ca, ff in zip(self.self_attn, self.cross_attn, self.feed_forward):
            x = x + sa(x, mask)
            x = x + ca(x, reference_tokens)
            x = x + ff(x)
        z_t = self.ln_final(x)
        pooled = z_t[torch.arange(len(z_t), device=z_t.device), eot]
        proj = self.projection
        embedding = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return embedding, z_t


class DualLayer(nn.Module):
    """One layer of Fig. 3: per stream self- and cross-attention, the merge, the (shared) feed-forward."""

    def __init__(self, block: ResidualAttentionBlock, image_width: int, layers: int, streams: tuple[str, ...],
                 merge: Literal["average", "linear"], shared_feedforward: bool) -> None:
        super().__init__()
        width, heads = int(block.attn.embed_dim), int(block.attn.num_heads)
        self.streams = streams
        self.self_attn = nn.ModuleDict({s: SelfAttention(block) for s in streams})
        self.cross_attn = nn.ModuleDict({s: CrossAttention(width, heads, image_width, layers) for s in streams})
        self.merge = nn.Linear(2 * width, width) if merge == "linear" and len(streams) == 2 else None
        self.merge_kind = merge if len(streams) == 2 else None
        self.feed_forward = FeedForward(block)  # stream 0's, and stream 1's when shared
        self.feed_forward_other = None if shared_feedforward or len(streams) == 1 else FeedForward(block)

    def forward(self, xs: list[Tensor], image: Tensor, attn_mask: Tensor) -> list[Tensor]:
        xs = [x + self.self_attn[s](x, attn_mask) for s, x in zip(self.streams, xs)]
        crossed = [self.cross_attn[s](x, image) for s, x in zip(self.streams, xs)]
        if self.merge_kind == "average":
            crossed = [(crossed[0] + crossed[1]) / 2] * 2
        elif self.merge_kind == "linear":
            crossed = [self.merge(torch.cat(crossed, dim=-1))] * 2
        xs = [x + c for x, c in zip(xs, crossed)]
        ffs = [self.feed_forward, self.feed_forward_other or self.feed_forward]
        return [x + ff(x) for x, ff in zip(xs, ffs)]


class DualEncoderReranker(nn.Module):
    """§3.2: Encoder-t and Encoder-z_t cross-attending a candidate's patch tokens; one score per triplet.

    ``forward(tokens, z_t, candidate_tokens)`` scores ``N`` (caption, ``z_t``, candidate) triplets:
    ``[N]`` logits, higher = better match. ``candidate_tokens`` ``[M, P, C]`` holds one image per
    ``N / M`` consecutive triplets (one per triplet when ``M = N``). ``z_t`` enters Encoder-z_t as it is (no positional
    embedding: it is already a sequence of the filter's outputs, as in the authors' code); it may be
    longer than the captions' last EOT and is cut like them. :meth:`pairwise` scores every query
    of a batch against every candidate (Eq. 2's ``B x B`` logits).

    With ``reference="cls"`` the second argument is instead the reference's patch tokens
    ``[N, >= 1, C]`` (only the class token, the first, is read): a new linear layer maps it to the
    text width and it fills every position of Encoder-z_t's input. Under the causal mask a sequence
    of one repeated token computes what that token alone would, so the stream is the pooled
    reference, and the position-wise merge with Encoder-t and the EOT pooling apply unchanged.
    """

    def __init__(self, tower: TextTower, image_width: int, layers: int | None = None, merge: Merge = "half",
                 shared_feedforward: bool = True, encoders: Encoders = "both", reference: Reference = "z_t") -> None:
        super().__init__()
        n = len(tower.blocks) if layers is None else layers
        if not 1 <= n <= len(tower.blocks):
            raise ValueError(f"layers must be in [1, {len(tower.blocks)}] (the text tower's depth), got {layers}")
        if merge not in ("half", "linear"):
            raise ValueError(f"merge must be 'half' or 'linear', got {merge!r}")
        if encoders not in ("both", "t", "z"):
            raise ValueError(f"encoders must be 'both', 't' or 'z', got {encoders!r}")
        if reference not in ("z_t", "cls"):
            raise ValueError(f"reference must be 'z_t' or 'cls', got {reference!r}")
        if reference == "cls" and encoders == "t":
            raise ValueError("reference='cls' replaces Encoder-z_t's input, but encoders='t' runs no Encoder-z_t")
        self.reference = reference
        self.streams: tuple[str, ...] = ("t", "z") if encoders == "both" else (encoders,)
        self.image_width = image_width
        self.pooling = _EOTPooling(tower)
        width = tower.width
        if "t" in self.streams:
            self.token_embedding = copy.deepcopy(tower.token_embedding)
            self.positional_embedding = copy.deepcopy(tower.positional_embedding)
        if reference == "cls":
            self.reference_projection = nn.Linear(image_width, width)
        self.layers = nn.ModuleList(
            DualLayer(block, image_width, n, self.streams,
                      "average" if merge == "half" and i < n // 2 else "linear", shared_feedforward)
            for i, block in enumerate(tower.blocks[:n])
        )
        self.ln_final = nn.ModuleDict({s: copy.deepcopy(tower.ln_final) for s in self.streams})
        joint = width * len(self.streams)
        self.head = nn.Sequential(nn.Linear(joint, width), nn.ReLU(), nn.Linear(width, 1))
        self.register_buffer("attn_mask", causal_mask(self.pooling.context_length), persistent=False)
        self.hparams = {"layers": n, "image_width": image_width, "merge": merge,
                        "shared_feedforward": shared_feedforward, "encoders": encoders, "reference": reference}

    @classmethod
    def from_backbone(cls, backbone: "Backbone", layers: int | None = None, merge: Merge = "half",
                      shared_feedforward: bool = True, encoders: Encoders = "both",
                      reference: Reference = "z_t") -> "DualEncoderReranker":
        """A re-ranker initialised from ``backbone``'s text tower (both streams copy the same blocks)."""
        return cls(text_tower(backbone), patch_token_shape(backbone)[1], layers, merge, shared_feedforward,
                   encoders, reference).to(backbone.device)

    @property
    def width(self) -> int:
        return int(self.head[0].in_features // len(self.streams))

    def forward(self, tokens: Tensor, z_t: Tensor, candidate_tokens: Tensor) -> Tensor:
        _check_inputs(tokens, candidate_tokens, self.image_width, "DualEncoderReranker", shared=True)
        eot = self.pooling.index(tokens)
        length = int(eot.max()) + 1
        xs = []
        for stream in self.streams:
            if stream == "t":
                xs.append(self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length])
                continue
            if self.reference == "cls":
                if z_t.ndim != 3 or len(z_t) != len(tokens) or z_t.shape[2] != self.image_width:
                    raise ValueError(f"reference='cls' reads the reference's patch tokens "
                                     f"[N, >= 1, {self.image_width}] for {len(tokens)} captions, "
                                     f"got {tuple(z_t.shape)}")
                cls_token = self.reference_projection(z_t[:, :1].to(self.head[0].weight.dtype))
                xs.append(cls_token.expand(-1, length, -1))
                continue
            if z_t.ndim != 3 or len(z_t) != len(tokens) or z_t.shape[1] < length or z_t.shape[2] != self.width:
                raise ValueError(f"z_t must be [N, >= {length}, {self.width}] for {len(tokens)} captions, "
                                 f"got {tuple(z_t.shape)}")
            xs.append(z_t[:, :length].to(self.head[0].weight.dtype))
        mask = self.attn_mask[:length, :length]
        for layer in self.layers:
            xs = layer(xs, candidate_tokens, mask)
        rows = torch.arange(len(tokens), device=tokens.device)
        pooled = [self.ln_final[s](x)[rows, eot] for s, x in zip(self.streams, xs)]
        return self.head(torch.cat(pooled, dim=-1)).squeeze(-1)

    @torch.no_grad()
    def initialise_from(self, matcher: "DualEncoderReranker") -> None:
        """Start every stream from ``matcher``, a one-stream (Encoder-t) re-ranker of the same depth and widths
        pretrained on image-text matching, as BLIP's encoders start from its pretrained text encoder.

        Copied: the token and positional embeddings, each layer's self- and cross-attention (into every
        stream), its feed-forward (into both when they are separate) and the final norm. The merges and the
        scorer head stay new: matching has nothing to merge, and its head scores one stream.
        """
        if matcher.streams != ("t",):
            raise ValueError(f"initialise_from takes a one-stream Encoder-t re-ranker, got streams {matcher.streams}")
        theirs, mine = ((len(m.layers), m.width, m.image_width) for m in (matcher, self))
        if theirs != mine:
            raise ValueError(f"matcher has {theirs[0]} layers of width {theirs[1]} over images of width {theirs[2]}; "
                             f"this re-ranker {mine[0]}, {mine[1]} and {mine[2]}")
        if "t" in self.streams:
            self.token_embedding.load_state_dict(matcher.token_embedding.state_dict())
            self.positional_embedding.copy_(matcher.positional_embedding)
        for mine, theirs in zip(self.layers, matcher.layers):
            for stream in mine.streams:
                mine.self_attn[stream].load_state_dict(theirs.self_attn["t"].state_dict())
                mine.cross_attn[stream].load_state_dict(theirs.cross_attn["t"].state_dict())
            for feed_forward in (mine.feed_forward, mine.feed_forward_other):
                if feed_forward is not None:
                    feed_forward.load_state_dict(theirs.feed_forward.state_dict())
        for stream in self.streams:
            self.ln_final[stream].load_state_dict(matcher.ln_final["t"].state_dict())

    def pairwise(self, tokens: Tensor, z_t: Tensor, candidate_tokens: Tensor) -> Tensor:
        """``[B, C]`` scores of each of ``B`` queries against each of ``C`` candidates.

        The ``B * C`` triplets are grouped by candidate, so each candidate's keys and values are
        computed once per layer (:class:`CrossAttention`).
        """
        b, c = len(tokens), len(candidate_tokens)
        return self(tokens.repeat(c, 1), z_t.repeat(c, 1, 1), candidate_tokens).view(c, b).T


__all__ = ["CandidateFilter", "CrossAttention", "DualEncoderReranker", "DualLayer", "Encoders", "FeedForward",
           "Merge", "Reference", "SelfAttention", "TextTower", "causal_mask", "text_tower"]
