"""Zero-shot classification with a CLIP: how well an image encoder separates the attributes the
captions talk about, scored against text prompts only.

Each class is described the way captions describe it (a prompt ensemble over several images'
captions with the attribute set to the class, in every caption template); an image gets the class
whose text embedding is nearest. Pretraining validates with it; notebook 02 reports it per
attribute with confusion matrices.

Two further measurements tell an illegible attribute's two possible causes apart: the caption
choice (does the model prefer an image's true caption to the same caption with one attribute
changed) tests image and text tower together; a linear probe (a classifier trained on the image
features of the train split, scored on val) tests whether the image features hold the attribute
at all, whatever the text tower does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cirlib.core.device import autocast
from cirlib.core.tensors import eval_mode
from cirlib.data.labels import (
    CAPTION_TEMPLATES,
    AttributedImage,
    caption_function,
    changed_caption,
    legibility_attributes,
    probe_labels,
)
from cirlib.data.preprocess import TransformKind
from cirlib.models.backbone import Backbone
from cirlib.models.features import image_features, text_features


@dataclass
class ZeroShotResult:
    """Zero-shot classification of one attribute: accuracy and confusion (rows = true class)."""

    attribute: str
    classes: list[str]
    accuracy: float
    confusion: np.ndarray  # [C, C] counts, rows true, columns predicted
    n: int

    def confusion_frame(self) -> pd.DataFrame:
        """The confusion matrix as a labelled pandas DataFrame (for seaborn heatmaps)."""
        return pd.DataFrame(self.confusion, index=self.classes, columns=self.classes)


@torch.no_grad()
def class_text_features(
    backbone: Backbone, items: Sequence[AttributedImage], attribute: str, classes: Sequence[str], n_contexts: int = 16
) -> torch.Tensor:
    """One normalised text embedding per class: a prompt ensemble over captions and templates.

    Each class is described the way the training captions describe it: the generator's caption of
    ``n_contexts`` attribute sets drawn from ``items`` with ``attribute`` set to the class, in
    every template; the class embedding is the normalised mean (CLIP's prompt ensembling).
    """
    rng = np.random.default_rng(0)
    pick = rng.choice(len(items), size=min(n_contexts, len(items)), replace=False)
    contexts = [items[i] for i in sorted(pick)]
    feats = []
    with eval_mode(backbone.model):
        for value in classes:
            captions = {caption_function(c.benchmark)({**c.attributes, attribute: value}) for c in contexts}
            prompts = [t.format(c) for c in sorted(captions) for t in CAPTION_TEMPLATES]
            with autocast(backbone.device):
                emb = F.normalize(backbone.encode_text(prompts).float(), dim=-1)
            feats.append(F.normalize(emb.mean(0), dim=-1).cpu())
    return torch.stack(feats)


def _encode_items(backbone: Backbone, items: Sequence[AttributedImage], transform_kind: TransformKind,
                  cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """Image features of ``items`` (pixels and features cached under ``cache_dir``).

    Classification, caption choice and linear probes all score the same val images: the feature
    cache encodes them once per backbone and pipeline, not once per measurement.
    """
    return image_features(backbone, [it.path for it in items], transform_kind, batch_size=256, cache_dir=cache_dir,
                          progress=False, decoded=True)


@torch.no_grad()
def zero_shot_accuracy(
    backbone: Backbone,
    items: Sequence[AttributedImage],
    attribute: str,
    image_features: torch.Tensor | None = None,
    transform_kind: TransformKind = "squarepad",
    cache_dir: str | os.PathLike | None = None,
) -> ZeroShotResult:
    """Classify ``attribute`` (colour, pattern, category, ...) of held-out images from text prompts.

    ``items`` are typically the val images of a generated root (:func:`load_attributed_images`);
    only those whose attributes contain ``attribute`` take part. ``image_features`` (aligned with
    ``items``, e.g. from :func:`cirlib.models.features.image_features`) skips decoding and encoding
    the images again when several attributes are scored on the same images; ``cache_dir`` caches
    the decoded pixels and the features.
    The default geometry is the one :class:`PretrainConfig` trains the tiny CLIP with.
    """
    keep = [i for i, item in enumerate(items) if attribute in item.attributes]
    if not keep:
        keys = sorted({k for item in items for k in item.attributes})
        raise ValueError(f"no item has attribute {attribute!r}; available: {keys}")
    chosen = [items[i] for i in keep]
    if image_features is None:
        image_features = _encode_items(backbone, chosen, transform_kind, cache_dir)
    else:
        image_features = image_features[keep]
    image_features = F.normalize(image_features.float().cpu(), dim=-1)
    classes = sorted({str(it.attributes[attribute]) for it in chosen})
    labels = np.array([classes.index(str(it.attributes[attribute])) for it in chosen])
    text = class_text_features(backbone, chosen, attribute, classes)
    pred = (image_features @ text.T).argmax(1).numpy()
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return ZeroShotResult(attribute, classes, float((pred == labels).mean()), confusion, len(chosen))


def zero_shot_accuracies(
    backbone: Backbone,
    items: Sequence[AttributedImage],
    attributes: Sequence[str],
    image_features: torch.Tensor | None = None,
    transform_kind: TransformKind = "squarepad",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, ZeroShotResult]:
    """:func:`zero_shot_accuracy` of each attribute, encoding the images only once."""
    if image_features is None:
        image_features = _encode_items(backbone, items, transform_kind, cache_dir)
    return {a: zero_shot_accuracy(backbone, items, a, image_features=image_features) for a in attributes}


def accuracy_by_pipeline(
    backbone: Backbone,
    items: Sequence[AttributedImage],
    attributes: Sequence[str],
    kinds: Sequence[TransformKind],
    group: str = "category",
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Zero-shot accuracy (%) of each attribute per value of ``group`` and per preprocessing pipeline.

    Rows ``(group value, pipeline)``, one column per attribute plus ``images``. A pipeline that
    shows a backbone its images unlike the ones it was trained on loses accuracy on the attributes
    it can no longer read (a pattern drawn at another scale, a garment cut), before any CIR model
    is trained on top: this tells an input mismatch apart from a weak combining function.
    """
    groups = sorted({str(it.attributes[group]) for it in items if group in it.attributes})
    if not groups:
        raise ValueError(f"no item has attribute {group!r} to group by")
    features = {kind: _encode_items(backbone, items, kind, cache_dir) for kind in kinds}  # one cache entry each
    rows = {}
    for value in groups:
        members = [i for i, it in enumerate(items) if str(it.attributes.get(group)) == value]
        for kind in kinds:
            found = zero_shot_accuracies(backbone, [items[i] for i in members], attributes,
                                         image_features=features[kind][members])
            rows[value, kind] = {a: 100 * r.accuracy for a, r in found.items()} | {"images": len(members)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis([group, "pipeline"])


def available_attributes(items: Sequence[AttributedImage], wanted: Sequence[str]) -> list[str]:
    """The attributes of ``wanted`` that at least two classes of ``items`` carry (classifiable)."""
    return [a for a in wanted if len({str(it.attributes[a]) for it in items if a in it.attributes}) >= 2]


@dataclass
class ChoiceResult:
    """Two-way caption choice for one attribute: how often the true caption beats a changed one."""

    attribute: str
    accuracy: float
    n: int
    chance: float = 0.5


@torch.no_grad()
def caption_choice_accuracies(
    backbone: Backbone,
    items: Sequence[AttributedImage],
    attributes: Sequence[str],
    image_features: torch.Tensor | None = None,
    transform_kind: TransformKind = "squarepad",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, ChoiceResult]:
    """Legibility of what captions talk about: for each image and attribute, does the model score the
    image's true caption above the same caption with that attribute changed (one object's colour,
    one more object, another background, ...)? Chance is 50 %.

    Unlike classification, this works on scenes with several objects, and it asks exactly what a
    relative caption needs: can the model see *this* detail at its input size. Items whose
    generator cannot change an attribute (a full scene cannot gain an object) are left out of it.
    """
    if image_features is None:
        image_features = _encode_items(backbone, items, transform_kind, cache_dir)
    image_features = F.normalize(image_features.float().cpu(), dim=-1)
    true = F.normalize(text_features(backbone, [it.caption for it in items], progress=False), dim=-1)
    out = {}
    for k, attribute in enumerate(attributes):
        rng = np.random.default_rng([seed, k])
        rows, changed = [], []
        for i, item in enumerate(items):
            other = changed_caption(item, attribute, rng)
            if other is None:
                continue
            rows.append(i)
            changed.append(other)
        if not rows:
            raise ValueError(f"no item's {attribute!r} can be changed")
        other_text = F.normalize(text_features(backbone, changed, progress=False), dim=-1)
        img = image_features[rows]
        wins = (img * true[rows]).sum(-1) > (img * other_text).sum(-1)
        out[attribute] = ChoiceResult(attribute, float(wins.float().mean()), len(rows))
    return out


def legibility_table(
    backbone: Backbone,
    items_by_benchmark: dict[str, Sequence[AttributedImage]],
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """:func:`caption_choice_accuracies` of every attribute each generated benchmark's captions talk
    about, as one table: rows ``(benchmark, attribute)``, columns ``images``, ``accuracy %``, ``chance %``."""
    rows = {}
    for name, items in items_by_benchmark.items():
        attributes = legibility_attributes(items[0].benchmark) if items else ()
        for attribute, r in caption_choice_accuracies(backbone, items, attributes, cache_dir=cache_dir).items():
            rows[name, attribute] = {"images": r.n, "accuracy %": 100 * r.accuracy, "chance %": 100 * r.chance}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["benchmark", "attribute"])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4) -> float:
    """Val accuracy of multinomial logistic regression on L2-normalised features.

    Full-batch Adam from zero weights (no randomness), logits scaled by 10 as the features'
    cosines are small; a weak L2 penalty keeps the weights finite on separable data.
    """
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, D] with one D; got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError(f"{len(train_x)} train features for {len(train_y)} labels, {len(val_x)} val for {len(val_y)}")
    classes = int(train_y.max()) + 1  # a val label beyond the train classes can only be an error
    x, v = F.normalize(train_x.float(), dim=-1), F.normalize(val_x.float(), dim=-1)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(10 * x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((10 * v @ weight + bias).argmax(1) == val_y).float().mean())


def probe_table(
    backbone: Backbone,
    train_items: dict[str, Sequence[AttributedImage]],
    val_items: dict[str, Sequence[AttributedImage]],
    transform_kind: TransformKind = "squarepad",
    cache_dir: str | os.PathLike | None = None,
    min_images: int = 20,
) -> pd.DataFrame:
    """:func:`linear_probe` of every :func:`~cirlib.data.labels.probe_labels` attribute of each
    benchmark (an attribute needs ``min_images`` train and val images and two classes in train), as
    one table: rows ``(benchmark, attribute)``, columns ``classes``, ``train images``, ``val images``,
    ``accuracy %``, ``majority %``. Val images of a class unseen in train count as errors."""
    rows = {}
    for name in train_items:
        splits = {"train": train_items[name], "val": val_items[name]}
        feats = {s: F.normalize(_encode_items(backbone, items, transform_kind, cache_dir).float().cpu(), dim=-1)
                 for s, items in splits.items()}
        labels = {s: [probe_labels(it) for it in items] for s, items in splits.items()}
        attributes = dict.fromkeys(a for lab in labels["train"] for a in lab)
        for attribute in attributes:
            keep = {s: [i for i, lab in enumerate(labels[s]) if attribute in lab] for s in feats}
            names = sorted({labels["train"][i][attribute] for i in keep["train"]})
            if min(len(keep["train"]), len(keep["val"])) < min_images or len(names) < 2:
                continue
            index = {c: k for k, c in enumerate(names)}
            y = {s: torch.tensor([index.get(labels[s][i][attribute], len(names)) for i in keep[s]]) for s in feats}
            accuracy = linear_probe(feats["train"][keep["train"]], y["train"], feats["val"][keep["val"]], y["val"])
            majority = float((y["val"] == torch.bincount(y["train"]).argmax()).float().mean())
            rows[name, attribute] = {"classes": len(names), "train images": len(keep["train"]),
                                     "val images": len(keep["val"]), "accuracy %": 100 * accuracy,
                                     "majority %": 100 * majority}
    index = pd.MultiIndex.from_arrays([[b for b, _ in rows], [a for _, a in rows]], names=["benchmark", "attribute"])
    return pd.DataFrame(list(rows.values()), index=index,
                        columns=["classes", "train images", "val images", "accuracy %", "majority %"])
