"""Optimization-based Textual Inversion (OTI): one pseudo-word token per image, by gradient descent.

Each image's token ``v`` starts at random and is optimised so that the text feature of a prompt
holding it ("a photo of $", a template drawn at random each step) matches the image feature
(L_content, with Gaussian noise on the text feature to bridge the modality gap), while L_gpt keeps
``v`` usable inside sentences: the phrase "a photo of $ that is eating by a window" must encode
like "a photo of cat that is eating by a window" for one of the image's concept words. Weight
decay keeps ``v`` short, like real word embeddings; the returned token is an exponential moving
average of the iterates, which smooths out the step-to-step noise of random templates and noise.

Images are optimised in batches: the frozen text encoder runs once per step for a whole batch,
which is where OTI's cost goes (tests/perf/perf_oti.py measures batched against one at a time).
Every random choice of an image (initial token, templates, concepts, phrases, noise) comes from
a generator of its own, seeded by ``(seed, image index)``, and each image's loss is summed, not
averaged, so an image's token does not depend on which batch it ran in.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cirlib.core.device import autocast
from cirlib.core.training import epoch_seed
from cirlib.methods.losses import content_loss, cosine_loss
from cirlib.models.pseudo_word import PLACEHOLDER, encode_with_pseudo_words, frozen, word_embedding

if TYPE_CHECKING:
    from cirlib.models.backbone import Backbone

TEMPLATES: tuple[str, ...] = (
    "a photo of $",
    "a picture of $",
    "an image of $",
    "a photo showing $",
    "$",
)
"""Prompts L_content reads the token through; varying them keeps ``v`` from fitting one prompt."""

Regularisation = Literal["gpt", "concept", "random"]
ConceptSpec = Sequence[str | Sequence[str]]


@dataclass(frozen=True)
class OTIConfig:
    """OTI hyper-parameters; defaults are the method's for CLIP ViT-B/32.

    ``regularisation`` selects L_gpt's phrases: ``"gpt"`` the image's concepts' generated phrases,
    ``"concept"`` only "a photo of {concept}" (the ablation without generated phrases),
    ``"random"`` generated phrases of concepts drawn at random from the phrase vocabulary instead
    of the image's own. ``noise_std=0`` is the ablation without noise, ``content="l2"`` the one
    with a squared-error content loss, and ``concepts=None`` in :func:`oti` the one without
    regularisation.

    :meth:`for_tiny` sets the noise for the course's pretrained tiny backbone, from a measurement
    on 1,024 training images of the embedded FashionIQ with their captions ("a photo of ..."):
    text features have a median norm of 14.3; an image feature scaled to its caption's norm lies
    at a median distance of 10.9 from the caption's text feature (cosine 0.71), 0.96 per
    dimension over 128 dimensions. ``noise_std = 1.0`` moves a text feature about as far as its
    matched image lies, which is what the noise is for: reaching the image's region without
    drowning the text feature (B/32's 0.64 over 512 dimensions is a larger share of its norm).
    """

    steps: int = 500
    lr: float = 2e-2
    weight_decay: float = 0.01
    batch_size: int = 256
    lambda_content: float = 1.0
    lambda_gpt: float = 0.5
    noise_std: float = 0.64  # gamma: std of the Gaussian noise on the raw text features
    content: Literal["cosine", "l2"] = "cosine"
    regularisation: Regularisation = "gpt"
    ema_decay: float = 0.99
    templates: tuple[str, ...] = TEMPLATES
    seed: int = 0
    amp: bool = True  # mixed precision where the device has it (cirlib.core.device.amp_dtype)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.noise_std < 0:
            raise ValueError(f"OTIConfig needs steps, batch_size, lr >= 1/positive and noise_std >= 0: {self}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.content not in ("cosine", "l2") or self.regularisation not in ("gpt", "concept", "random"):
            raise ValueError(f"unknown content loss {self.content!r} or regularisation {self.regularisation!r}")
        if not self.templates or any(PLACEHOLDER not in t for t in self.templates):
            raise ValueError(f"every template must hold the placeholder {PLACEHOLDER!r}: {self.templates}")

    @classmethod
    def for_tiny(cls, **overrides) -> "OTIConfig":
        """The tiny backbone's setting: noise scaled to its features (see the class docstring)."""
        return cls(**{"noise_std": 1.0, **overrides})

    @classmethod
    def quick(cls, **overrides) -> "OTIConfig":
        """A few dozen steps for tests and quick notebook runs (the EMA decays faster to match)."""
        return cls.for_tiny(**{"steps": 40, "ema_decay": 0.9, **overrides})


@dataclass
class OTIResult:
    """Tokens ``[N, width]`` (fp32, CPU) and the mean losses of each step over all images."""

    tokens: Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def pseudo_phrase(phrase: str, concept: str) -> str:
    """``phrase`` with its first whole-word occurrence of ``concept`` replaced by the placeholder."""
    pattern = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    if not pattern.search(phrase):
        raise ValueError(f"phrase {phrase!r} does not contain its concept {concept!r}")
    return pattern.sub(PLACEHOLDER, phrase, count=1)


def _image_concepts(concepts: ConceptSpec, n: int) -> list[tuple[str, ...]]:
    per_image = [(c,) if isinstance(c, str) else tuple(c) for c in concepts]
    if len(per_image) != n or any(len(c) == 0 for c in per_image):
        raise ValueError(f"need a non-empty list of concepts for each of the {n} images, got {len(per_image)} entries")
    return per_image


class PhraseSampler:
    """Draws each image's L_gpt phrase pair and caches the frozen concept phrases' features."""

    def __init__(
        self,
        backbone: "Backbone",
        concepts: ConceptSpec,
        phrases: Mapping[str, Sequence[str]] | None,
        n: int,
        mode: Regularisation,
    ) -> None:
        self.backbone = backbone
        self.mode = mode
        self.concepts = _image_concepts(concepts, n)
        if mode == "concept":
            self.phrases = {c: (f"a photo of {c}",) for cs in self.concepts for c in cs}
        else:
            if phrases is None:
                raise ValueError(f"regularisation {mode!r} needs phrases for the concepts")
            self.phrases = {c: tuple(p) for c, p in phrases.items()}
            needed = sorted(self.phrases) if mode == "random" else sorted({c for cs in self.concepts for c in cs})
            missing = [c for c in needed if not self.phrases.get(c)]
            if missing:
                raise ValueError(f"{len(missing)} concept(s) have no phrases, e.g. {missing[:3]}")
        self.vocabulary = sorted(self.phrases)
        self.pseudo = {(c, p): pseudo_phrase(p, c) for c, ps in self.phrases.items() for p in ps}
        self._features: dict[str, Tensor] = {}

    def draw(self, image: int, generator: torch.Generator) -> tuple[str, str]:
        """(phrase with the concept, the same with the placeholder) for one image and step."""
        pool = self.vocabulary if self.mode == "random" else self.concepts[image]
        concept = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        options = self.phrases[concept]
        phrase = options[int(torch.randint(len(options), (1,), generator=generator))]
        return phrase, self.pseudo[(concept, phrase)]

    def features(self, phrases: Sequence[str]) -> Tensor:
        """Text features of the concept phrases, each encoded once (the encoder is frozen)."""
        new = sorted(set(phrases) - set(self._features))
        if new:
            with torch.no_grad():
                self._features.update(zip(new, self.backbone.encode_text(new).float()))
        return torch.stack([self._features[p] for p in phrases])


def oti(
    backbone: "Backbone",
    image_features: Tensor,
    concepts: ConceptSpec | None = None,
    phrases: Mapping[str, Sequence[str]] | None = None,
    config: OTIConfig = OTIConfig(),
) -> OTIResult:
    """Invert ``image_features`` ``[N, D]`` into pseudo-word tokens ``[N, width]``.

    ``concepts[i]`` names image ``i``'s concept words (one string or several; a step draws one)
    and ``phrases[c]`` the generated phrases of concept ``c``, each containing ``c`` (e.g. "a photo
    of cat that is eating"); with ``concepts=None`` L_gpt is off. Runs where the backbone lives
    (:func:`cirlib.models.backbone.load_backbone` picks the device with
    :func:`cirlib.core.device.get_device`), in mixed precision when ``config.amp``.
    """
    embedding = word_embedding(backbone)
    if image_features.ndim != 2 or image_features.shape[1] != backbone.embed_dim:
        raise ValueError(
            f"image features must be [N, {backbone.embed_dim}] for {backbone.model_name}, "
            f"got {tuple(image_features.shape)}"
        )
    n, width, device = len(image_features), embedding.embedding_dim, backbone.device
    use_gpt = concepts is not None and config.lambda_gpt > 0
    pairs = PhraseSampler(backbone, concepts, phrases, n, config.regularisation) if use_gpt else None
    init_std = float(embedding.weight.detach().float().std())  # start at the scale of real words
    generators = [torch.Generator().manual_seed(epoch_seed(config.seed, i)) for i in range(n)]
    start = time.perf_counter()
    tokens = torch.empty(n, width)
    sums: dict[str, Tensor] = {}
    n_batches = -(-n // config.batch_size)
    bar = tqdm(total=n_batches * config.steps, desc="OTI", disable=not config.progress)
    with frozen(backbone.model):
        for begin in range(0, n, config.batch_size):
            rows = range(begin, min(begin + config.batch_size, n))
            gens = [generators[i] for i in rows]
            init = torch.stack([init_std * torch.randn(width, generator=g) for g in gens])
            v = init.to(device).requires_grad_(True)
            ema = torch.zeros_like(v, requires_grad=False)
            optimizer = torch.optim.AdamW([v], lr=config.lr, weight_decay=config.weight_decay)
            x = image_features[rows.start : rows.stop].to(device).float()
            for step in range(config.steps):
                prompts = [config.templates[int(torch.randint(len(config.templates), (1,), generator=g))] for g in gens]
                noise = (
                    torch.stack([config.noise_std * torch.randn(x.shape[1], generator=g) for g in gens]).to(device)
                    if config.noise_std > 0
                    else None
                )
                drawn = [pairs.draw(i, g) for i, g in zip(rows, gens)] if pairs is not None else []
                with autocast(device, config.amp):
                    y = encode_with_pseudo_words(backbone, prompts, v)
                    y_star = encode_with_pseudo_words(backbone, [p for _, p in drawn], v) if drawn else None
                terms = {"content": content_loss(x, y, noise=noise, kind=config.content, reduction="none")}
                if y_star is not None:
                    target = pairs.features([p for p, _ in drawn]).to(device)
                    terms["gpt"] = cosine_loss(y_star, target, reduction="none")
                total = config.lambda_content * terms["content"]
                if "gpt" in terms:
                    total = total + config.lambda_gpt * terms["gpt"]
                optimizer.zero_grad(set_to_none=True)
                total.sum().backward()  # per-image sums: an image's gradient ignores its batch mates
                optimizer.step()
                with torch.no_grad():
                    ema.mul_(config.ema_decay).add_(v.detach(), alpha=1 - config.ema_decay)
                    for name, t in {"loss": total, **terms}.items():
                        per_step = sums.setdefault(name, torch.zeros(config.steps, device=device))
                        per_step[step] += t.detach().float().sum()
                bar.update(1)
            tokens[rows.start : rows.stop] = (ema / (1 - config.ema_decay**config.steps)).float().cpu()
    bar.close()
    means = {k: (v / n).tolist() for k, v in sums.items()}
    history = [{"step": s + 1, **{k: v[s] for k, v in means.items()}} for s in range(config.steps)]
    return OTIResult(tokens=tokens, history=history, seconds=time.perf_counter() - start)

