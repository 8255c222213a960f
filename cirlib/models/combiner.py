"""The CLIP4Cir Combiner (§3.2, Fig. 4) and its §4.4 ablation variants: the network only.

The Combiner fuses a reference-image feature and a relative-caption feature into one query
feature that is compared with gallery image features by cosine similarity:

    phi_q = (1 - lambda) * img + lambda * txt + v

where ``lambda`` (branch 1, a sigmoid) sets a query-dependent convex combination of the two inputs
and ``v`` (branch 2) is a learned image-text mixture, i.e. the residual the network adds to that
convex combination. Because the convex combination generalises the element-wise sum used in
stage-1 fine-tuning, the Combiner starts from what stage 1 made work and only learns a correction.

How it is trained lives in :mod:`cirlib.methods.combiner_training` (on cached features) and
:mod:`cirlib.methods.stage1` (end to end, with the encoders).
"""


from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlib.core.device import get_device
from cirlib.core.tensors import eval_mode

if TYPE_CHECKING:
    pass

CombineFn = Callable[[Tensor, Tensor], Tensor]
"""``(reference image features [B, D], text features [B, D]) -> query features [B, D]``."""

Variant = Literal["combiner", "sum", "convex", "no_convex", "static_skip"]

# CLIP4Cir §4.4 variants as (skip term, learned mixture v). The skip term is the convex
# combination of the inputs: "learned" = (1 - lambda) img + lambda txt, "half" = 0.5 img + 0.5 txt
# (after the final L2 normalisation, "half" without mixture *is* the element-wise sum).
_VARIANTS: dict[str, tuple[Literal["learned", "half"] | None, bool]] = {
    "combiner": ("learned", True),  # proposed:        (1 - l) img + l txt + v
    "sum": ("half", False),  # element-wise sum:       img + txt
    "convex": ("learned", False),  # convex combination: (1 - l) img + l txt
    "no_convex": (None, True),  # w/o convex combination: v
    "static_skip": ("half", True),  # static skip:     0.5 img + 0.5 txt + v
}
VARIANTS: tuple[str, ...] = tuple(_VARIANTS)


def combine_sum(image: Tensor, text: Tensor) -> Tensor:
    """Element-wise sum of L2-normalised features, renormalised (zero-shot and stage-1 "Sum" rows).

    Normalising the inputs first gives both modalities equal weight whatever their raw norms.
    """
    return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class Combiner(nn.Module):
    """CLIP4Cir Fig. 4 (``variant="combiner"``) and the §4.4 ablations, one parameterised module.

    Text and image features are L2-normalised, projected ``d -> projection_dim`` (+ReLU, dropout)
    and concatenated. Branch 1 maps the concatenation through ``hidden_dim`` to a sigmoid
    ``lambda``; branch 2 maps it through ``hidden_dim`` back to ``d`` (the mixture ``v``). Dropout
    follows every hidden layer, as in the paper. The output is L2-normalised.

    Normalising the inputs (the reference code feeds raw CLIP features) makes the convex
    combination an exact generalisation of :func:`combine_sum`, the combination stage 1 trains
    for, and makes the Combiner insensitive to the overall scale of a backbone's features.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
        variant: Variant = "combiner",
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"unknown Combiner variant {variant!r}; expected one of {VARIANTS}")
        projection_dim = projection_dim or 4 * feature_dim
        hidden_dim = hidden_dim or 8 * feature_dim
        self.hparams = {
            "feature_dim": feature_dim,
            "projection_dim": projection_dim,
            "hidden_dim": hidden_dim,
            "dropout": dropout,
            "variant": variant,
        }
        self.skip, use_mixture = _VARIANTS[variant]
        needs_projection = self.skip == "learned" or use_mixture
        self.image_projection = self._projection(feature_dim, projection_dim, dropout) if needs_projection else None
        self.text_projection = self._projection(feature_dim, projection_dim, dropout) if needs_projection else None
        self.gate = (
            self._branch(2 * projection_dim, hidden_dim, 1, dropout, nn.Sigmoid())
            if self.skip == "learned"
            else None
        )
        self.mixture = self._branch(2 * projection_dim, hidden_dim, feature_dim, dropout) if use_mixture else None

    @staticmethod
    def _projection(dim_in: int, dim_out: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Dropout(dropout))

    @staticmethod
    def _branch(dim_in: int, hidden: int, dim_out: int, dropout: float, *head: nn.Module) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(dim_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim_out), *head
        )

    @property
    def variant(self) -> str:
        return self.hparams["variant"]

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Combined, L2-normalised query features ``[B, D]``."""
        img = F.normalize(image, dim=-1)
        txt = F.normalize(text, dim=-1)
        hidden = None
        if self.image_projection is not None:
            hidden = torch.cat((self.image_projection(img), self.text_projection(txt)), dim=-1)
        out = torch.zeros_like(img)
        if self.skip == "learned":
            lam = self.gate(hidden)
            out = out + (1 - lam) * img + lam * txt
        elif self.skip == "half":
            out = out + 0.5 * (img + txt)
        if self.mixture is not None:
            out = out + self.mixture(hidden)
        return F.normalize(out, dim=-1)

    def mixing_coefficient(self, image: Tensor, text: Tensor) -> Tensor:
        """Branch 1's ``lambda`` per query, ``[B, 1]``: the text's weight in the convex combination.

        What :meth:`forward` computes before mixing, for analyses of how much each query leans on
        its caption; the variants without a learned convex combination have no ``lambda``.
        """
        if self.gate is None:
            raise ValueError(f"the {self.variant!r} Combiner variant has no learned lambda; only "
                             f"{[v for v, (skip, _) in _VARIANTS.items() if skip == 'learned']} have one")
        img = F.normalize(image, dim=-1)
        txt = F.normalize(text, dim=-1)
        return self.gate(torch.cat((self.image_projection(img), self.text_projection(txt)), dim=-1))




def apply_combine(combine: CombineFn, image: Tensor, text: Tensor, batch_size: int = 4096) -> Tensor:
    """``combine`` over all rows in batches, in eval mode (its training flag restored after) and on
    the device of its parameters; the result is on the CPU."""
    module = combine if isinstance(combine, nn.Module) else None
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else image.device
    with eval_mode(module), torch.no_grad():
        out = [
            combine(image[i : i + batch_size].to(device), text[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(image), batch_size)
        ]
    return torch.cat(out) if out else image.new_zeros(0, image.shape[1])


def load_combiner(ckpt_path: Path | str, device: str | torch.device = "auto") -> Combiner:
    """The best Combiner of a :func:`train_combiner` (or end-to-end :func:`cirlib.methods.stage1.finetune`)
    checkpoint, in eval mode."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not state.get("best_modules") or "combiner" not in state["best_modules"]:
        raise ValueError(f"{ckpt_path} holds no trained Combiner (field 'best_modules.combiner')")
    combiner = Combiner(**state["meta"]["hparams"])
    combiner.load_state_dict(state["best_modules"]["combiner"])
    return combiner.to(get_device(device)).eval()
