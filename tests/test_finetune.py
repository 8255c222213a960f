"""Stage-1 task-oriented fine-tuning (CLIP4Cir §3.1) and end-to-end training, on micro open_clip models."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from cirlib.data.datasets import CIRSplit, Query
from cirlib.data.pixels import PixelCache
from cirlib.evaluation.protocols import CachedEvaluator, LiveEvaluator
from cirlib.methods.stage1 import Stage1Config, finetune, trainable_parameters
from cirlib.models import features as features_module
from cirlib.models.backbone import Backbone, load_backbone
from cirlib.models.combiner import Combiner, combine_sum, load_combiner

MICRO_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
MICRO_CONFIGS = {
    "test-micro-ViT": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": MICRO_TEXT,
    },
    "test-micro-RN": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
        "text_cfg": MICRO_TEXT,
    },
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 20),
    "purple": (140, 40, 160),
    "cyan": (40, 200, 210),
}
SHAPES = {  # bounding boxes on a 40 x 32 canvas
    "square": (8, 6, 32, 26),
    "disc": (10, 4, 34, 28),
    "bar": (4, 12, 36, 20),
    "column": (16, 2, 24, 30),
    "dot": (16, 12, 24, 20),
}



@pytest.fixture(scope="session")
def micro_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register two micro open_clip configs (a ViT and a ModifiedResNet with batch norm)."""
    folder = tmp_path_factory.mktemp("model_configs")
    for name, cfg in MICRO_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


def _backbone(name: str = "test-micro-ViT", seed: int = 0) -> Backbone:
    return load_backbone(name, None, device="cpu", seed=seed)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[CIRSplit, CIRSplit]:
    """A FashionIQ-style colour-change task: same shape, caption names the target colour."""
    root = tmp_path_factory.mktemp("toy")
    (root / "images").mkdir()
    paths = {}
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            name = f"{shape}-{colour}"
            im = Image.new("RGB", (40, 32), (255, 255, 255))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape in ("disc", "dot") else draw.rectangle)(SHAPES[shape], fill=rgb)
            paths[name] = root / "images" / f"{name}.png"
            im.save(paths[name])
    names = list(paths)

    def queries(seed: int, n: int) -> list[Query]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            shape = list(SHAPES)[rng.integers(len(SHAPES))]
            a, b = rng.choice(list(COLOURS), 2, replace=False)
            target = f"{shape}-{b}"
            out.append(Query(f"{shape}-{a}", (f"is {b}", f"make it {b}"), target, (target,), category="dress"))
        return out

    train = CIRSplit("fashioniq", "train", root, queries(0, 48), names, paths, 0)
    val = CIRSplit("fashioniq", "val", root, queries(1, 16), names, paths, 0)
    return train, val


FAST = Stage1Config(lr=1e-3, weight_decay=0.0, batch_size=16, epochs=2, patience=5)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ------------------------------------------------------------------------------ what gets trained


@pytest.mark.parametrize("encoders", ["image", "text", "both"])
def test_only_the_chosen_encoder_changes(micro_models, toy, tmp_path: Path, encoders: str) -> None:
    train, val = toy
    backbone = _backbone()
    before, flags = _state(backbone.model), {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    config = replace(FAST, encoders=encoders, epochs=1)
    finetune(backbone, train, LiveEvaluator({"dress": val}), config, tmp_path)
    changed = _changed(before, _state(backbone.model))
    image = {k for k in changed if k.startswith("visual.")}
    text = changed - image
    assert "logit_scale" not in changed
    assert bool(image) == (encoders in ("image", "both")) and bool(text) == (encoders in ("text", "both"))
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == flags  # restored


def test_image_tower_learns_at_image_lr(micro_models, toy, tmp_path: Path) -> None:
    """``image_lr`` scales the image tower's steps alone: its first AdamW step is ~lr in size."""
    train, val = toy
    moves = {}
    for image_lr in (1e-3, 1e-5):
        backbone = _backbone()
        before = _state(backbone.model)
        config = replace(FAST, encoders="both", epochs=1, epoch_size=16, image_lr=image_lr)
        finetune(backbone, train, LiveEvaluator({"dress": val}), config, tmp_path / str(image_lr))
        after = _state(backbone.model)
        moves[image_lr] = {
            tower: max(float((after[k] - before[k]).abs().max()) for k in before if k.startswith("visual.") == is_image)
            for tower, is_image in (("image", True), ("text", False))
        }
    assert moves[1e-3]["text"] == pytest.approx(moves[1e-5]["text"], rel=0.5)  # text at lr=1e-3 both times
    assert moves[1e-5]["image"] < moves[1e-3]["image"] / 20
    assert 5e-6 < moves[1e-5]["image"] < 2e-5  # one Adam step moves a weight by at most ~lr


def test_resnet_batch_norm_stays_frozen(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    backbone = _backbone("test-micro-RN")
    bn_names = {
        f"{m}.{k}"
        for m, mod in backbone.model.named_modules()
        if isinstance(mod, torch.nn.BatchNorm2d)
        for k in mod.state_dict()
    }
    assert any(n.endswith("running_mean") for n in bn_names)
    assert not bn_names & set(trainable_parameters(backbone.model, "image"))
    before = _state(backbone.model)
    finetune(backbone, train, LiveEvaluator(val), replace(FAST, encoders="image", epochs=1), tmp_path)
    changed = _changed(before, _state(backbone.model))
    assert not changed & bn_names  # running statistics, counters and affine parameters
    assert {"visual.conv1.weight", "visual.layer1.0.downsample.0.weight", "visual.attnpool.q_proj.weight"} <= changed


def test_loss_decreases_and_history_is_written(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    backbone = _backbone()
    before = backbone.fingerprint
    config = replace(FAST, epochs=4)
    _, history = finetune(backbone, train, LiveEvaluator({"dress": val}), config, tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"R@10", "R@50", "average"} <= set(history[0])
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert backbone.fingerprint != before  # new weights, new feature-cache key
    reloaded = load_backbone("test-micro-ViT", tmp_path / "backbone.safetensors", device="cpu")
    assert not _changed(_state(backbone.model), _state(reloaded.model))


def test_caption_augmentation_only_in_training(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    for augment in (True, False):
        backbone = _backbone()
        seen: list[str] = []
        tokenize = backbone.tokenize
        backbone.tokenize = lambda texts, seen=seen, tokenize=tokenize: seen.extend(texts) or tokenize(texts)  # type: ignore[method-assign]
        config = replace(FAST, epochs=1, caption_augment=augment)
        finetune(backbone, train, lambda bb, combine: {"average": 1.0}, config, tmp_path / str(augment))
        single = [t for t in seen if " and " not in t]
        swapped = [t for t in seen if t.startswith("Make it")]
        assert (len(single) > 0 and len(swapped) > 0) == augment
        if not augment:
            assert all(t.startswith("Is ") and " and make it " in t for t in seen)


def test_epoch_size_limits_the_triplets_per_epoch(micro_models, toy, tmp_path: Path) -> None:
    train, _ = toy
    backbone = _backbone()
    batches: list[int] = []
    tokenize = backbone.tokenize
    backbone.tokenize = lambda texts: batches.append(len(texts)) or tokenize(texts)  # type: ignore[method-assign]
    config = replace(FAST, epochs=2, epoch_size=20, encoders="text")
    finetune(backbone, train, lambda bb, combine: {"average": 1.0}, config, tmp_path)
    assert batches == [16, 16]  # 20 drawn per epoch, the partial batch of 4 dropped
    with pytest.raises(ValueError, match="epoch_size"):
        Stage1Config(epoch_size=1)


# ------------------------------------------------------------------------------ checkpoints


def test_resume_reproduces_uninterrupted_training(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    config = replace(FAST, epochs=3)
    val_fn = LiveEvaluator(val)
    full, ref_history = finetune(_backbone(), train, val_fn, config, tmp_path / "full")

    calls = 0

    def crashing(backbone, combine):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # killed in epoch 3: epochs 1-2 are checkpointed
        return val_fn(backbone, combine)

    with pytest.raises(KeyboardInterrupt):
        finetune(_backbone(), train, crashing, config, tmp_path / "cut")
    resumed, history = finetune(_backbone(), train, val_fn, config, tmp_path / "cut")
    assert _strip(history) == _strip(ref_history)
    assert not _changed(_state(full.model), _state(resumed.model))
    assert resumed.fingerprint == full.fingerprint


def test_best_epoch_is_returned_and_early_stopping(micro_models, toy, tmp_path: Path) -> None:
    train, _ = toy
    scores = iter([1.0, 4.0, 2.0, 3.0, 9.0])
    snapshots = []

    def scripted(backbone, combine):
        snapshots.append(_state(backbone.model))
        return {"average": next(scores)}

    config = replace(FAST, epochs=8, patience=2)
    backbone, history = finetune(_backbone(), train, scripted, config, tmp_path)
    assert [h["average"] for h in history] == [1.0, 4.0, 2.0, 3.0]
    assert not _changed(snapshots[1], _state(backbone.model))
    assert json.loads((tmp_path / "backbone.safetensors.json").read_text())["provenance"]["best_epoch"] == 2


def test_without_validation_every_epoch_trains_and_the_last_is_kept(micro_models, toy, tmp_path: Path) -> None:
    """A fixed budget: no metric, no early stopping, the weights of the last epoch. They are the
    validated run's epoch-3 weights (validation draws no random numbers), under a run key of its own,
    since a validated run may stop early or keep an earlier epoch."""
    train, _ = toy
    scores, snapshots = iter([3.0, 2.0, 1.0]), []

    def falling(backbone, combine):
        snapshots.append(_state(backbone.model))
        return {"average": next(scores)}

    config = replace(FAST, epochs=3, patience=10)
    validated, _ = finetune(_backbone(), train, falling, config, tmp_path / "validated")
    fixed, history = finetune(_backbone(), train, None, config, tmp_path / "fixed")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "loss", "seconds"}
    _, impatient = finetune(_backbone(), train, None, replace(config, patience=1), tmp_path / "impatient")
    assert len(impatient) == 3  # patience has nothing to count
    assert not _changed(snapshots[2], _state(fixed.model))
    assert _changed(_state(validated.model), _state(fixed.model))  # the validated run kept epoch 1
    provenance = {name: json.loads((tmp_path / name / "backbone.safetensors.json").read_text())["provenance"]
                  for name in ("validated", "fixed")}
    assert provenance["fixed"]["best_epoch"] == 3 and provenance["validated"]["best_epoch"] == 1
    assert provenance["fixed"]["run"] != provenance["validated"]["run"]
    again, history2 = finetune(_backbone(), train, None, config, tmp_path / "fixed")
    assert _strip(history2) == _strip(history) and not _changed(_state(fixed.model), _state(again.model))


def test_finished_run_is_loaded_without_training(micro_models, toy, tmp_path: Path, monkeypatch) -> None:
    train, val = toy
    first, history = finetune(_backbone(), train, LiveEvaluator(val), FAST, tmp_path)
    export_mtime = (tmp_path / "backbone.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must neither decode images nor validate")

    monkeypatch.setattr(PixelCache, "__init__", fail)
    again, history2 = finetune(_backbone(), train, fail, FAST, tmp_path)
    assert history2 == history
    assert not _changed(_state(first.model), _state(again.model))
    assert again.fingerprint == first.fingerprint
    assert (tmp_path / "backbone.safetensors").stat().st_mtime_ns == export_mtime


def test_a_finished_run_survives_moving_the_data(micro_models, toy, tmp_path: Path, monkeypatch) -> None:
    """The run's key holds the images' bytes, not their folder: a copied dataset loads the same checkpoint."""
    train, val = toy
    config = replace(FAST, epochs=1)
    first, history = finetune(_backbone(), train, LiveEvaluator(val), config, tmp_path / "run")
    moved = Path(shutil.copytree(train.root, tmp_path / "moved"))
    paths = {name: moved / path.relative_to(train.root) for name, path in train.image_paths.items()}
    moved_train = replace(train, root=moved, image_paths=paths)

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must neither decode images nor validate")

    monkeypatch.setattr(PixelCache, "__init__", fail)
    again, history2 = finetune(_backbone(), moved_train, fail, config, tmp_path / "run")
    assert history2 == history and again.fingerprint == first.fingerprint


def test_a_run_in_other_arithmetic_is_retrained(micro_models, toy, tmp_path: Path, monkeypatch) -> None:
    """A finished bf16 run is not loaded by a machine that trains in fp32: it trains afresh."""
    from cirlib.core import device

    train, val = toy
    config = replace(FAST, epochs=1)
    monkeypatch.delenv(device.PRECISION_ENV, raising=False)  # simulate the default switch
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: True)
    finetune(_backbone(), train, LiveEvaluator(val), config, tmp_path)
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="training from scratch"):
        finetune(_backbone(), train, LiveEvaluator(val), config, tmp_path)


def test_end_to_end_trains_encoders_and_combiner(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    backbone = _backbone()
    combiner = Combiner(backbone.embed_dim, 64, 64, dropout=0.1)
    before_model, before_comb = _state(backbone.model), _state(combiner)
    config = replace(FAST, encoders="text", combiner_lr=1e-3)
    _, history = finetune(backbone, train, LiveEvaluator(val), config, tmp_path, combiner=combiner)
    assert len(_changed(before_comb, _state(combiner))) == len(before_comb)
    changed = _changed(before_model, _state(backbone.model))
    assert changed and not any(k.startswith("visual.") for k in changed)
    loaded = load_combiner(tmp_path / "checkpoint.pt", device="cpu")
    assert not _changed(_state(combiner), _state(loaded))


# ------------------------------------------------------------------------------ data path


def test_live_evaluator_agrees_with_cached_features(micro_models, toy, tmp_path: Path) -> None:
    _, val = toy
    backbone = _backbone()
    live = LiveEvaluator({"dress": val})(backbone, combine_sum)
    cached = CachedEvaluator({"dress": val}, backbone, cache_dir=tmp_path)(combine_sum)
    assert len(val.gallery) == 30 and 0 < live["R@10"] < 100  # not a trivially perfect score
    assert live == pytest.approx(cached, abs=1e-6)


def _outside_gallery(val: CIRSplit) -> CIRSplit:
    """``val`` with two of its references left out of the gallery, as some real splits have them."""
    targets = {q.target for q in val.queries}
    refs = sorted({q.reference for q in val.queries} - targets)
    return replace(val, gallery=[n for n in val.gallery if n not in refs[:2]])


def test_live_evaluator_agrees_with_cached_features_when_references_lie_outside_the_gallery(
        micro_models, toy, tmp_path: Path) -> None:
    _, val = toy
    split = _outside_gallery(val)
    assert len(features_module.split_outside_references(split)) == 2
    backbone = _backbone()
    live = LiveEvaluator({"dress": split})(backbone, combine_sum)
    cached = CachedEvaluator({"dress": split}, backbone, cache_dir=tmp_path)(combine_sum)
    assert live == pytest.approx(cached, abs=1e-6)


def _no_image_encoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("images were encoded again")
    monkeypatch.setattr(features_module, "_encode_image_files", fail)


def test_training_stores_the_kept_epochs_validation_features(micro_models, toy, tmp_path: Path, monkeypatch) -> None:
    """The last validation's image features land in the feature cache, so evaluating the returned
    model reads them instead of encoding the validation images a second time."""
    train, val = toy
    split = _outside_gallery(val)
    trained, _ = finetune(_backbone(), train, LiveEvaluator({"dress": split}, cache_dir=tmp_path / "cache"),
                          replace(FAST, encoders="image", epochs=2), tmp_path / "run")
    fresh = features_module.encode_split(trained, split, progress=False)  # no cache: encoded here
    untrained = features_module.encode_split(_backbone(), split, progress=False)
    _no_image_encoding(monkeypatch)
    stored = features_module.encode_split(trained, split, cache_dir=tmp_path / "cache", progress=False)
    for name in ("gallery", "reference"):
        assert torch.allclose(getattr(stored, name), getattr(fresh, name), atol=1e-5), name
    assert not torch.allclose(stored.gallery, untrained.gallery, atol=1e-3)  # the trained tower's, not the old


class _Scripted(LiveEvaluator):
    """A live evaluator whose main score follows a script, to choose which epoch is kept."""

    def __init__(self, split: CIRSplit, scores: list[float], cache_dir: Path) -> None:
        super().__init__({"dress": split}, cache_dir=cache_dir)
        self.scores = iter(scores)

    def __call__(self, backbone: Backbone, combine) -> dict[str, float]:
        return {**super().__call__(backbone, combine), "average": next(self.scores)}


def test_no_features_are_stored_for_weights_that_were_not_kept(micro_models, toy, tmp_path: Path) -> None:
    train, val = toy
    evaluator = _Scripted(val, [2.0, 1.0], tmp_path / "cache")  # epoch 1 kept, epoch 2 validated last
    trained, _ = finetune(_backbone(), train, evaluator, replace(FAST, encoders="image", epochs=2),
                          tmp_path / "run")
    assert evaluator.store(trained) == 0
    assert not list((tmp_path / "cache").glob("**/*.safetensors"))
    with pytest.raises(ValueError, match="3 feature rows for 2 images"):
        features_module.store_image_features(trained, [Path("a.png"), Path("b.png")], torch.zeros(3, 4),
                                             cache_dir=tmp_path / "cache")


def test_evaluator_reencodes_images_only_when_the_image_tower_changed(micro_models, toy, monkeypatch) -> None:
    _, val = toy
    backbone = _backbone()
    encoded = []
    original = features_module.encode_pixels
    monkeypatch.setattr(features_module, "encode_pixels", lambda *a, **k: encoded.append(1) or original(*a, **k))
    evaluator = LiveEvaluator(val)
    evaluator(backbone, combine_sum)
    with torch.no_grad():
        backbone.model.token_embedding.weight.mul_(-1.0)  # text tower changed: images reused
    evaluator(backbone, combine_sum)
    assert len(encoded) == 1
    with torch.no_grad():
        backbone.model.visual.conv1.weight.mul_(-1.0)
        backbone.model.token_embedding.weight.mul_(-1.0)
    evaluator(backbone, combine_sum)
    assert len(encoded) == 2


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="encoders must be"):
        Stage1Config(encoders="vision")
    with pytest.raises(ValueError, match="image_lr must be"):
        Stage1Config(image_lr=0.0)
    with pytest.raises(ValueError, match="accumulation must be"):
        Stage1Config(accumulation=0)
    tiny = Stage1Config.for_tiny(epochs=3)
    assert tiny.epochs == 3 and tiny.lr > Stage1Config().lr and tiny.image_lr is None  # one rate, as in the paper
