"""open_clip backbones behind one small interface, whatever the weights' source.

The course runs the same code on the tiny CLIP pretrained here from scratch (``TINY_MODEL``,
registered with open_clip from ``cirlib/model_configs/``) and on real open_clip models
(``load_backbone("RN50x4", "openai")``). Weights come from one of three places:

- ``pretrained=None``: random init, seeded, so two loads give identical weights;
- a local file: our safetensors + JSON written by :func:`save_backbone`, or any open_clip
  ``.pt``/``.bin``/``.safetensors`` state dict;
- an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...): the only case that may
  download anything, and only because the user asked for it.

Every :class:`Backbone` carries a ``fingerprint`` naming its weights, and an ``image_fingerprint``
naming its image tower's alone, which keys image-feature caches: a text-tuned model (CLIP4Cir's TFT)
shares its image features with the model it was tuned from. Both follow weights edited in place
(training steps, ``load_state_dict``, ``with torch.no_grad(): w.mul_(2)``): every such edit bumps
a tensor's version counter, which the fingerprints compare before trusting what they derived.

Local checkpoints that cannot be used raise :class:`CheckpointError` naming the file and what is
wrong: unreadable or truncated weights, a sidecar that is not JSON, or, for a checkpoint of another
architecture, the parameters whose shapes differ, with the model's and the file's shapes.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file

from cirlib.core.device import get_device
from cirlib.core.io import atomic_path, file_sha256, write_json

TINY_MODEL = "cirlib-tiny-ViT"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CHECKPOINT_FORMAT = "cirlib-backbone"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

if TINY_MODEL not in open_clip.list_models():
    open_clip.add_model_config(MODEL_CONFIG_DIR)


class CheckpointError(ValueError):
    """A local checkpoint or its JSON sidecar is unreadable, or does not fit the requested model."""


def _weights_token(module: torch.nn.Module | dict[str, torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """Cheap identity of a module's (or state entries') current weights: storage address and version
    of each tensor.

    In-place edits bump the version, replacing or moving a tensor changes its address. Edits
    through ``param.data`` bypass the version counter: call :meth:`Backbone.refresh_fingerprint`
    after those.
    """
    state = module if isinstance(module, dict) else module.state_dict(keep_vars=True)
    return tuple((t.data_ptr(), t._version) for t in state.values())


def _text_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state entries text features depend on: all but the image tower and the logit scale/bias."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(("visual.", "logit_"))}


class Backbone:
    """An open_clip CLIP model with its tokenizer, preprocessing statistics and weight fingerprint.

    Encoders return unnormalised features (callers normalise where the method says so) and keep
    whatever grad mode the caller is in, so the same object serves feature extraction and training.
    """

    def __init__(self, model: torch.nn.Module, model_name: str, device: torch.device, fingerprint: str) -> None:
        self.model = model
        self.model_name = model_name
        self.device = device
        self._derived: tuple[tuple, str] | None = None  # (weights token, state fingerprint) after edits
        self._image_fingerprint: tuple[tuple, str] | None = None  # (image-tower token, value)
        self._text_fingerprint: tuple[tuple, str] | None = None  # (text-tower token, value)
        self.fingerprint = fingerprint
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = model.visual.preprocess_cfg
        size = preprocess["size"]
        self.image_size: int = int(size if isinstance(size, int) else size[0])
        self.mean: tuple[float, ...] = tuple(float(m) for m in preprocess["mean"])
        self.std: tuple[float, ...] = tuple(float(s) for s in preprocess["std"])

    def __repr__(self) -> str:
        return f"Backbone({self.model_name!r}, device={self.device}, fingerprint={self.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        """Names the weights: their source as loaded (file digest, tag, seeded init), or a digest of
        the current state once they were edited in place (computed then, once per edit)."""
        token = _weights_token(self.model)
        if token == self._token:
            return self._fingerprint
        if self._derived is None or self._derived[0] != token:
            self._derived = (token, state_fingerprint(self.model_name, self.model))
        return self._derived[1]

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value
        self._token = _weights_token(self.model)

    @property
    def image_fingerprint(self) -> str:
        """Digest of the image tower's current weights, re-derived whenever they change.

        Image features depend on nothing else, so caches keyed by it survive text-encoder training.
        """
        token = _weights_token(self.model.visual)
        if self._image_fingerprint is None or self._image_fingerprint[0] != token:
            digest = state_digest(self.model.visual)
            self._image_fingerprint = (token, f"{self.model_name}:visual-sha256:{digest}")
        return self._image_fingerprint[1]

    @property
    def text_fingerprint(self) -> str:
        """Digest of the weights text features depend on, re-derived whenever they change.

        Caption caches keyed by it survive image-encoder training (CLIP4Cir's IFT), as image
        caches keyed by :attr:`image_fingerprint` survive text-encoder training.
        """
        state = _text_state(self.model)
        token = _weights_token(state)
        if self._text_fingerprint is None or self._text_fingerprint[0] != token:
            self._text_fingerprint = (token, f"{self.model_name}:text-sha256:{state_digest(state)}")
        return self._text_fingerprint[1]

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The text tower's word embedding (where textual inversion puts its pseudo-tokens)."""
        text = getattr(self.model, "text", self.model)
        return text.token_embedding

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` on the CPU (open_clip's tokenizer truncates long texts)."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``[N, 3, S, S]`` -> image features ``[N, embed_dim]``."""
        return self.model.encode_image(pixels.to(self.device))

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Texts (or token ids from :meth:`tokenize`) -> text features ``[N, embed_dim]``."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.model.encode_text(tokens.to(self.device))

    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features plus the spatial activations they are pooled from.

        Returns ``(pooled [N, embed_dim], tokens [N, L, C])``. ``pooled`` equals
        :meth:`encode_image`. ``tokens`` are the patch tokens entering the last transformer block
        of a ViT (``L`` = grid cells, ``C`` = width) or the last conv feature map of a ResNet
        flattened row-major (``C`` = its channels). Both lie on the path to ``pooled``, so
        gradients of any score built from ``pooled`` reach them (GradCAM), and they keep where in
        the image each feature comes from (re-ranking).
        """
        visual = self.model.visual
        captured: list[torch.Tensor] = []
        # The hooks hand the model a re-assembled copy of the activations, built from the tensor
        # they return to the caller: equal values, and the returned tokens are graph ancestors.
        if isinstance(visual, VisionTransformer):
            batch_first = visual.transformer.batch_first

            def split_tokens(_module: torch.nn.Module, args: tuple) -> tuple:
                x = args[0] if batch_first else args[0].transpose(0, 1)
                tokens = x[:, 1:]  # the class token stays out
                captured.append(tokens)
                x = torch.cat([x[:, :1], tokens], dim=1)
                return (x if batch_first else x.transpose(0, 1), *args[1:])

            handle = visual.transformer.resblocks[-1].register_forward_pre_hook(split_tokens)
        elif isinstance(visual, ModifiedResNet):

            def flatten_map(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                tokens = out.flatten(2).transpose(1, 2)
                captured.append(tokens)
                return tokens.transpose(1, 2).reshape(out.shape)

            handle = visual.layer4.register_forward_hook(flatten_map)
        else:
            raise TypeError(
                f"encode_image_tokens supports open_clip VisionTransformer and ModifiedResNet towers, "
                f"not {type(visual).__name__} ({self.model_name})"
            )
        try:
            pooled = self.encode_image(pixels)
        finally:
            handle.remove()
        return pooled, captured[0]

    def refresh_fingerprint(self) -> str:
        """Re-derive the fingerprints from the current weights.

        In-place edits are noticed without it; it is needed after edits through ``param.data``,
        which leave no trace, and it makes a trained model's name a digest of its weights.
        """
        self._image_fingerprint = self._text_fingerprint = None
        self.fingerprint = state_fingerprint(self.model_name, self.model)
        return self.fingerprint


def state_digest(module: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a module's state dict, or of some of its entries (names, dtypes,
    shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted((module if isinstance(module, dict) else module.state_dict()).items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_fingerprint(model_name: str, model: torch.nn.Module) -> str:
    """The fingerprint of weights that exist only in memory (random init, training)."""
    return f"{model_name}:state-sha256:{state_digest(model)}"


def _check_model_name(model: str) -> None:
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return
    names = open_clip.list_models()
    close = difflib.get_close_matches(model, names, n=5, cutoff=0.5)
    examples = close or [TINY_MODEL, "RN50", "RN50x4", "ViT-B-32", "ViT-B-16"]
    raise ValueError(
        f"unknown open_clip model {model!r}; e.g. {', '.join(examples)} "
        f"({len(names)} names in open_clip.list_models())"
    )


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON written next to a checkpoint: ``<checkpoint>.json``."""
    return Path(f"{checkpoint}.json")


def _check_local_checkpoint(model: str, path: Path) -> str:
    """Validate a local checkpoint; return its sha256 (checked against our JSON when present)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    digest = file_sha256(path)
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        return digest
    meta = _read_sidecar(meta_path, path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        return digest
    if meta.get("model") != model:
        raise CheckpointError(
            f"{path} holds weights of model {meta.get('model')!r} ({meta_path}: field 'model'); "
            f"load it with load_backbone({meta.get('model')!r}, pretrained=...)"
        )
    if meta.get("model_cfg") != open_clip.get_model_config(model):
        raise CheckpointError(
            f"{meta_path}: field 'model_cfg' differs from open_clip's current config of {model!r}; "
            "the checkpoint was saved from another architecture"
        )
    if meta.get("sha256") != digest:
        raise CheckpointError(f"{path} does not match the sha256 recorded in {meta_path} (file changed or truncated)")
    return digest


def _read_sidecar(meta_path: Path, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's JSON sidecar, or :class:`CheckpointError` naming it and what is wrong."""
    remedy = f"delete it to load {checkpoint.name} as a plain open_clip checkpoint, or save the backbone again"
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{meta_path}: not UTF-8 text (byte offset {err.start}); {remedy}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{meta_path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} "
            f"(truncated or damaged); {remedy}"
        ) from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {remedy}")
    return meta


def _load_failure(model: str, path: Path, err: Exception) -> CheckpointError:
    """Say why open_clip could not load ``path`` into ``model``: unreadable file, or which tensors differ."""
    try:
        found = {k: tuple(v.shape) for k, v in open_clip.factory.load_state_dict(str(path), device="cpu").items()
                 if isinstance(v, torch.Tensor)}
    except Exception as read_err:  # safetensors, torch.load and pickle each raise their own types
        return CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(read_err).__name__}: {read_err}); "
            "the file is truncated, damaged or not a state dict"
        )
    with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
        expected = {k: tuple(v.shape) for k, v in open_clip.create_model(model, device="cpu").state_dict().items()}
    differ = [f"{k!r} is {expected[k]} in the model but {found[k]} in the file"
              for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    problems = []
    if differ:
        problems.append(f"{len(differ)} parameter shape(s) differ: " + "; ".join(differ[:3]))
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the model are absent from the file, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) of the file are not in the model, e.g. {extra[:3]}")
    if problems:
        return CheckpointError(
            f"{path} does not fit open_clip model {model!r} (saved from another architecture?): "
            + "; ".join(problems)
        )
    return CheckpointError(f"{path}: open_clip cannot load it into {model!r} ({type(err).__name__}: {err})")


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's 'initialized randomly' warning: random init is what ``pretrained=None`` asks for."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_backbone(
    model: str = TINY_MODEL,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> Backbone:
    """Build an open_clip model with weights from nowhere (random, seeded), a local file or a tag.

    ``pretrained`` is a path when it names an existing file, contains a path separator or ends in
    a checkpoint suffix; otherwise it must be one of open_clip's tags for ``model``. Only a tag can
    reach the network (open_clip downloads and caches it). ``seed`` fixes the random init without
    touching the global RNG. The model is returned in eval mode.
    """
    _check_model_name(model)
    dev = get_device(device)
    if pretrained is None:
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(seed)
            net = open_clip.create_model(model, pretrained=None, device="cpu")
        fingerprint = state_fingerprint(model, net)
    elif isinstance(pretrained, os.PathLike) or os.path.isfile(pretrained) or _looks_like_path(pretrained):
        path = Path(pretrained)
        digest = _check_local_checkpoint(model, path)
        try:
            net = open_clip.create_model(model, pretrained=str(path), device="cpu")
        except Exception as err:  # open_clip's own errors name neither the file nor the tensor
            raise _load_failure(model, path, err) from err
        fingerprint = f"{model}:file-sha256:{digest}"
    else:
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise ValueError(
                f"{pretrained!r} is neither an existing checkpoint file nor an open_clip tag of {model!r}; "
                f"tags: {', '.join(tags) if tags else 'none (train it or pass a checkpoint path)'}"
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # the activation the weights were trained with
        net = open_clip.create_model(model, pretrained=pretrained, device="cpu", force_quick_gelu=quick_gelu)
        fingerprint = f"{model}:{pretrained}"
    net = net.to(dev).eval()
    return Backbone(net, model, dev, fingerprint)


def save_backbone(backbone: Backbone, path: str | os.PathLike, provenance: dict[str, Any]) -> Path:
    """Write ``path`` (safetensors state dict) and ``path.json`` (model, config, provenance, sha256).

    Both files are written atomically, weights first; the sha256 in the JSON ties it to its weights,
    so a pair torn by an interruption is refused on load rather than silently mixed.
    ``load_backbone(backbone.model_name, pretrained=path)`` reloads the same weights.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"backbone checkpoints are .safetensors files, got {path}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "model": backbone.model_name})
    write_json(
        sidecar_path(path),
        {
            "format": CHECKPOINT_FORMAT,
            "model": backbone.model_name,
            "model_cfg": open_clip.get_model_config(backbone.model_name),
            "preprocess_cfg": dict(backbone.model.visual.preprocess_cfg),
            "sha256": file_sha256(path),
            "open_clip_version": open_clip.__version__,
            "provenance": provenance,
        },
    )
    return path


def list_pretrained_tags(model: str) -> list[str]:
    """open_clip's pretrained tags for ``model`` (the values ``pretrained`` accepts besides paths)."""
    _check_model_name(model)
    return open_clip.list_pretrained_tags_by_model(model)


__all__: list[str] = [
    "TINY_MODEL",
    "Backbone",
    "CheckpointError",
    "load_backbone",
    "save_backbone",
    "state_digest",
    "state_fingerprint",
    "sidecar_path",
    "list_pretrained_tags",
]
