"""phi, the textual inversion network: image feature -> pseudo-word token in one forward pass.

Optimising a pseudo-word per image (OTI) takes hundreds of text-encoder steps; phi learns the same
map once, from OTI's tokens, and then inverts any image at the cost of a small MLP. Three linear
layers widen the image feature to ``hidden_dim`` twice and end in the word-embedding width; GELU and
dropout follow the first two. The last layer stays linear: word embeddings have coordinates of
both signs and any size, which a GELU (bounded below by -0.17) could not produce, and dropout on
the token itself would rescale what the text encoder reads. How phi is trained lives in
:mod:`cirlib.methods.phi_training`.
"""

from __future__ import annotations

from torch import Tensor, nn


class Phi(nn.Module):
    """MLP ``input_dim -> hidden_dim -> hidden_dim -> token_dim``, GELU and dropout between layers.

    For real CLIP the hidden width is 2048 (B/32: 512 -> 2048 -> 2048 -> 512; dropout 0.5).
    :meth:`for_dims` scales it as 4x the wider end, which is 2048 for B/32 and 512 for the tiny
    backbone (128-d features, 128-d tokens): the same 4x expansion as a transformer MLP, about
    0.4 M parameters, so phi stays a cheap surrogate of OTI on a CPU yet is four times wider
    than what it maps.
    """

    def __init__(self, input_dim: int, token_dim: int, hidden_dim: int = 2048, dropout: float = 0.5) -> None:
        super().__init__()
        if min(input_dim, token_dim, hidden_dim) < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"dims must be >= 1 and dropout in [0, 1); got input {input_dim}, token {token_dim}, "
                f"hidden {hidden_dim}, dropout {dropout}"
            )
        self.hparams = {"input_dim": input_dim, "token_dim": token_dim, "hidden_dim": hidden_dim, "dropout": dropout}
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, token_dim),
        )

    @classmethod
    def for_dims(cls, input_dim: int, token_dim: int, dropout: float = 0.5) -> "Phi":
        """phi with ``hidden_dim = 4 * max(input_dim, token_dim)``."""
        return cls(input_dim, token_dim, 4 * max(input_dim, token_dim), dropout)

    def forward(self, image_features: Tensor) -> Tensor:
        """Image features ``[N, input_dim]`` -> pseudo-word tokens ``[N, token_dim]``."""
        return self.layers(image_features)
