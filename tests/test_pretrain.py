"""Pretraining: corpus, loss, schedule, temperature, checkpoints, resume, zero-shot (tiny synthetic data)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from cirlib.core.io import file_sha256
from cirlib.data.synth.fashion import VOCAB, absolute_caption
from cirlib.data.synth.render import COLOURS
from cirlib.methods import pretrain as P
from cirlib.models.backbone import TINY_MODEL, load_backbone, sidecar_path

COLOUR_NAMES = ("red", "navy blue", "yellow", "green")
PATTERN_NAMES = ("plain", "stripes")
SPLIT_SIZES = {"train": 8, "val": 4, "test": 2}  # images per category


def _draw(colour: str, pattern: str, category: str) -> Image.Image:
    """A garment-ish block on white: tall for dresses, wide for tops, striped or plain."""
    w, h = {"dress": (48, 80), "shirt": (64, 70), "toptee": (72, 64)}[category]
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.rectangle((6, 6, w - 7, h - 7), fill=COLOURS[colour])
    if pattern == "stripes":
        for y in range(6, h - 7, 8):
            draw.rectangle((6, y, w - 7, y + 3), fill=(250, 250, 250))
    return im


def make_fashion_root(root: Path) -> Path:
    """A FashionIQ-layout root with a fashion-generator ``cirlib_meta.json`` (no triplets needed)."""
    attributes: dict[str, dict] = {}
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    for split, n in SPLIT_SIZES.items():
        for category in ("dress", "shirt", "toptee"):
            names = []
            for i in range(n):
                colour, pattern = COLOUR_NAMES[i % 4], PATTERN_NAMES[(i // 4) % 2]
                name = f"{category}-{split}-{i:02d}"
                _draw(colour, pattern, category).save(root / "images" / f"{name}.png")
                attributes[name] = {"category": category, "colour": colour, "pattern": pattern, "logo": "none"}
                names.append(name)
            (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(names))
            (root / "captions" / f"cap.{category}.{split}.json").write_text("[]")
    meta = {"generator": "cirlib.data.synth.fashion/1", "seed": 0, "fingerprint": "synthetic", "attributes": attributes}
    (root / "cirlib_meta.json").write_text(json.dumps(meta))
    return root



@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("bench") / "fashion")


FAST = P.PretrainConfig(
    steps=6, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=3, eval_items=12, log_every=1, device="cpu",
)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint))


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ corpus
def test_build_corpus_uses_train_split_and_generator_captions(fashion_root):
    corpus = P.build_corpus([fashion_root])
    assert len(corpus) == 3 * SPLIT_SIZES["train"]
    meta = json.loads((fashion_root / "cirlib_meta.json").read_text())["attributes"]
    for path, caption, image in corpus:
        assert image is not None and image.caption == caption
        assert "-train-" in path.name and path.is_file()
        assert caption == absolute_caption(meta[path.stem])
    captions = {it.caption for it in corpus}
    assert "a red striped dress" in captions and "a plain navy blue top" in captions
    assert len(P.build_corpus([fashion_root], "val")) == 3 * SPLIT_SIZES["val"]


def test_build_corpus_adds_partial_descriptions_of_a_share_of_the_images(fashion_root):
    full = P.build_corpus([fashion_root])
    corpus = P.build_corpus([fashion_root], partial_share=0.5, seed=3)
    assert corpus[: len(full)] == full and corpus == P.build_corpus([fashion_root], partial_share=0.5, seed=3)
    partial = corpus[len(full):]
    assert 0 < len(partial) < len(full)
    assert len({p for p, *_ in partial}) == len(partial)  # at most one partial description per image
    meta = json.loads((fashion_root / "cirlib_meta.json").read_text())["attributes"]
    for path, caption, image in partial:
        assert image is None
        attrs = meta[path.stem]
        assert caption != absolute_caption(attrs)
        named = [c for c in COLOURS if re.search(rf"\b{c}\b", caption)]
        assert named in ([], [attrs["colour"]]), (caption, attrs)  # only the image's own colour, if any
        assert "strip" not in caption or attrs["pattern"] == "stripes", (caption, attrs)
    assert len(P.build_corpus([fashion_root], partial_share=1.0)) == 2 * len(full)


def test_build_corpus_errors_name_the_file(tmp_path, fashion_root):
    with pytest.raises(FileNotFoundError, match="cirlib_meta.json"):
        P.build_corpus([tmp_path])
    broken = make_fashion_root(tmp_path / "broken")
    meta = json.loads((broken / "cirlib_meta.json").read_text())
    del meta["attributes"]["shirt-train-03"]
    (broken / "cirlib_meta.json").write_text(json.dumps(meta))
    expected = r"cirlib_meta.json: field 'attributes' has no entry for image 'shirt-train-03'"
    with pytest.raises(ValueError, match=expected):
        P.build_corpus([broken])


def test_augment_identity_at_full_scale():
    x = torch.rand(3, 3, 16, 16) * 255
    out = P.augment(x, torch.Generator().manual_seed(0), min_scale=1.0)
    assert torch.allclose(out, x, atol=1e-3)
    zoomed = P.augment(x, torch.Generator().manual_seed(0), min_scale=0.5)
    assert zoomed.shape == x.shape and not torch.allclose(zoomed, x)


def test_caption_neighbours_rank_one_attribute_changes_first():
    captions = ["a red striped dress", "a red checked dress", "a blue striped dress", "two bags on a grey background"]
    nb = P.caption_neighbours(captions, k=2)
    assert nb.shape == (4, 2)
    assert nb[0].tolist() == [1, 2]  # both one word away; ties go to the lower index
    assert 3 not in nb[:3].flatten().tolist() and 0 not in nb[0].tolist()


def test_batches_are_deterministic_clusters_of_near_captions(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    config = replace(FAST, batch_size=8, cluster_size=4)
    data = P._prepare(P.build_corpus([fashion_root]), bb, config, None, progress=False)
    idx = P.sample_batch(data, config, step=3)
    assert idx.shape == (8,) and torch.equal(idx, P.sample_batch(data, config, step=3))
    assert not torch.equal(idx, P.sample_batch(data, config, step=4))
    for cluster in idx.view(2, 4):
        anchor, *near = (data.captions[g] for g in data.groups[cluster].tolist())
        allowed = {data.captions[g] for g in data.neighbours[data.captions.index(anchor)].tolist()}
        assert set(near) <= allowed
    uniform = P.sample_batch(data, replace(config, cluster_size=1), step=3)
    assert uniform.shape == (8,)


def test_foil_captions_change_one_attribute_of_a_fully_described_image(fashion_root):
    corpus = P.build_corpus([fashion_root], partial_share=1.0)
    image = corpus[0].image
    rng = np.random.default_rng(0)
    changed = set()
    for _ in range(60):
        foil = P.foil_caption(image, rng)
        assert foil is not None and foil != image.caption
        # exactly one of colour / pattern / print differs: the caption of the attributes it describes
        attrs = [a for a in ("colour", "pattern", "logo") if any(
            absolute_caption({**image.attributes, a: v}) == foil for v in VOCAB[a])]
        assert len(attrs) == 1, foil
        changed |= set(attrs)
    assert changed == {"colour", "pattern", "logo"}


def test_sample_foils_are_deterministic_and_skip_partial_descriptions(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    corpus = P.build_corpus([fashion_root], partial_share=1.0)
    data = P._prepare(corpus, bb, FAST, None, progress=False)
    full, part = len(corpus) // 2, len(corpus) // 2 + 1  # an image's full caption, a partial description
    idx = torch.tensor([full - 1, part, 0])
    templates = torch.tensor([1, 2, 0])
    tokens, mask = P.sample_foils(bb, data, idx, templates, seed=0, step=5)
    assert mask.tolist() == [True, False, True] and tokens.shape == (2, data.tokens.shape[-1])
    again, _ = P.sample_foils(bb, data, idx, templates, seed=0, step=5)
    assert torch.equal(tokens, again)
    # each foil is its own image's caption in the same template, one attribute changed
    rng = np.random.default_rng([0, 2, 5])
    first = P.foil_caption(data.images[full - 1], rng)
    assert torch.equal(tokens[0], bb.tokenize([P.CAPTION_TEMPLATES[1].format(first)])[0])
    assert not torch.equal(tokens[0], data.tokens[data.groups[full - 1], 1])


def test_a_step_with_foils_trains_and_differs_from_one_without(fashion_root):
    losses = {}
    for foils in (False, True):
        torch.manual_seed(0)
        bb = load_backbone(TINY_MODEL, device="cpu", seed=0)
        config = replace(FAST, foil_captions=foils)
        data = P._prepare(P.build_corpus([fashion_root]), bb, config, None, progress=False)
        opt = torch.optim.AdamW(bb.model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        losses[foils] = P._train_step(P._Pairs(bb, False), data, config, 0, opt, sched, scaler)
    assert math.isfinite(losses[True]) and losses[True] > losses[False]  # one more negative per image


# -------------------------------------------------------------------------------- loss & schedule
def test_templated_tokens_splice_equals_tokenising_each_templated_text(monkeypatch):
    """The fast path encodes each caption once; it must give the tokenizer's own output for every
    template, truncation included (captions near and past the context fall back to the bare one)."""
    backbone = load_backbone(TINY_MODEL, None, "cpu", seed=0)
    length = backbone.context_length
    captions = ["a red dress", "is navy blue and has stripes", "Two  BAGS, left of a star.", "x",
                "a dress " * ((length - 6) // 2), "a dress " * ((length - 4) // 2), "word " * (length - 3),
                "word " * (length - 2), "word " * (length + 10), "a green t-shirt's 3 logos",
                # the end-of-text token exactly in the last slot, nothing cut: a 3-token and a 6-token template
                "word " * (length - 5), "word " * (length - 6), "word " * (length - 8), "word " * (length - 9)]
    fast = P.templated_tokens(backbone, captions)
    texts = [t.format(c) for c in captions for t in P.CAPTION_TEMPLATES]
    slow = backbone.tokenize(texts).view(len(captions), len(P.CAPTION_TEMPLATES), -1)
    eot_last = slow[..., -1] == backbone.tokenizer.eot_token_id  # the context is full: the bare caption
    expected = torch.where(eot_last[..., None], slow[:, :1], slow)
    assert fast.shape == (len(captions), len(P.CAPTION_TEMPLATES), length)
    assert torch.equal(fast, expected)
    assert eot_last[:, 1:].any() and not eot_last[:, 0].all()  # the fall-back and truncation were exercised
    assert not eot_last[-3, 1:5].any() and eot_last[-4, 1:5].all()  # either side of the boundary, 3-token prefixes
    assert not eot_last[-1, 5] and eot_last[-2, 5]  # and the 6-token one
    assert torch.equal(fast[0, 1], backbone.tokenize("a photo of a red dress")[0])
    monkeypatch.setattr(P, "SimpleTokenizer", type("OtherTokenizer", (), {}))  # another tokenizer: the general path
    assert torch.equal(P.templated_tokens(backbone, captions), fast)


def test_lr_schedule_values_at_known_steps():
    f = lambda s: P.lr_factor(s, warmup_steps=10, total_steps=110)  # noqa: E731
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(10), f(60), f(110), f(200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_temperature_is_clamped_at_100():
    bb = load_backbone(TINY_MODEL, device="cpu")
    with torch.no_grad():
        bb.model.logit_scale.fill_(math.log(1000.0))
    P.clamp_logit_scale(bb.model)
    assert bb.model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        bb.model.logit_scale.fill_(-2.0)
    P.clamp_logit_scale(bb.model)
    assert bb.model.logit_scale.item() == 0.0


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def finished_run(fashion_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, P.pretrain(FAST, [fashion_root], out, progress=False)


def test_pretrain_writes_atomic_checkpoint_with_provenance(finished_run):
    out, result = finished_run
    assert result.checkpoint == out / P.CHECKPOINT_NAME and not result.cached and result.resumed_from is None
    assert _no_temp_files(out) and not (out / P.STATE_NAME).exists()
    meta = json.loads(sidecar_path(result.checkpoint).read_text())
    prov = meta["provenance"]
    assert meta["model"] == TINY_MODEL and meta["sha256"] == file_sha256(result.checkpoint)
    assert prov["finished"] and prov["step"] == FAST.steps and prov["config"]["lr"] == FAST.lr
    assert set(prov["zero_shot"]) == {"colour", "pattern", "category"} == set(result.zero_shot)
    assert result.backbone.fingerprint == f"{TINY_MODEL}:file-sha256:{meta['sha256']}"
    train_rows = [h for h in result.history if h["phase"] == "train"]
    assert [h["step"] for h in train_rows] == list(range(1, FAST.steps + 1))
    # the logged lr is the one each step used: base * factor(step index)
    for h in train_rows:
        assert h["lr"] == pytest.approx(FAST.lr * P.lr_factor(h["step"] - 1, FAST.warmup_steps, FAST.steps))
    assert [h["step"] for h in result.history if h["phase"] == "eval"] == [3, 6]
    assert all(h["temperature"] <= 100.0 for h in train_rows)


def test_finished_run_is_loaded_not_retrained(finished_run, fashion_root, monkeypatch):
    out, first = finished_run
    monkeypatch.setattr(P, "_train_step", lambda *a: pytest.fail("retrained a finished run"))
    again = P.pretrain(FAST, [fashion_root], out, progress=False)
    assert again.cached and again.history == first.history
    assert again.backbone.fingerprint == first.backbone.fingerprint


def test_arithmetic_is_part_of_the_fingerprint(monkeypatch):
    """A checkpoint trained in bf16 is never reused where the run would be fp32, and vice versa."""
    from cirlib.core import device

    fingerprints = {}
    for native in (True, False):
        monkeypatch.delenv(device.PRECISION_ENV, raising=False)  # simulate the default switch
        monkeypatch.setattr(device, "native_cpu_bf16", lambda native=native: native)
        for amp in (True, False):
            fingerprints[native, amp] = P.PretrainConfig(device="cpu", amp=amp).fingerprint("corpus")
    assert fingerprints[True, True] != fingerprints[False, True]  # same config, bf16 vs fp32 arithmetic
    assert fingerprints[True, False] == fingerprints[False, False]  # amp off: fp32 on either CPU


def test_config_change_invalidates_the_checkpoint(finished_run, fashion_root, tmp_path):
    out, first = finished_run
    other = tmp_path / "other"
    other.mkdir()
    for name in (P.CHECKPOINT_NAME, P.CHECKPOINT_NAME + ".json"):
        (other / name).write_bytes((out / name).read_bytes())
    changed = P.pretrain(replace(FAST, lr=5e-4, steps=2), [fashion_root], other, progress=False)
    assert not changed.cached and changed.resumed_from is None
    prov = json.loads(sidecar_path(changed.checkpoint).read_text())["provenance"]
    assert prov["config"]["lr"] == 5e-4 and prov["step"] == 2
    assert changed.backbone.fingerprint != first.backbone.fingerprint


def test_loss_decreases(fashion_root, tmp_path):
    # without partial descriptions: the fixture's (4 colours x 2 patterns) are shared by so many of its
    # 24 images that batches of 8 are mostly positives of each other, and the loss has little to lose
    config = replace(FAST, steps=40, warmup_steps=3, eval_every=100, partial_captions=0.0)
    result = P.pretrain(config, [fashion_root], tmp_path, progress=False)
    losses = [h["loss"] for h in result.history if h["phase"] == "train"]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


def test_resume_reproduces_the_uninterrupted_run(finished_run, fashion_root, tmp_path, monkeypatch):
    out, uninterrupted = finished_run
    real_step = P._train_step

    def crash_at_step_5(net, data, config, step, *rest):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(net, data, config, step, *rest)

    monkeypatch.setattr(P, "_train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(FAST, [fashion_root], tmp_path, progress=False)
    # the first round (steps 0-2, eval_every=3) is checkpointed; weights are exported only at the end
    state = torch.load(tmp_path / P.STATE_NAME, weights_only=True)
    assert state["epoch"] == 1 and not state["finished"] and not (tmp_path / P.CHECKPOINT_NAME).exists()
    assert _no_temp_files(tmp_path)

    monkeypatch.setattr(P, "_train_step", real_step)
    resumed = P.pretrain(FAST, [fashion_root], tmp_path, progress=False)
    assert resumed.resumed_from == 3 and not resumed.cached
    a, b = _weights(uninterrupted.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda r: [h["loss"] for h in r.history if h["phase"] == "train"]  # noqa: E731
    assert losses(resumed) == losses(uninterrupted)


def test_one_step_keeps_temperature_clamped(fashion_root):
    bb = load_backbone(TINY_MODEL, device="cpu")
    with torch.no_grad():
        bb.model.logit_scale.fill_(math.log(99.999))
    data = P._prepare(P.build_corpus([fashion_root]), bb, FAST, None, progress=False)
    opt = torch.optim.AdamW(bb.model.parameters(), lr=1.0)  # a huge step pushes the scale up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    bb.model.logit_scale.register_hook(lambda g: -torch.ones_like(g))  # gradient that raises it
    P._train_step(P._Pairs(bb, FAST.amp), data, FAST, 0, opt, sched, scaler)
    assert bb.model.logit_scale.item() == pytest.approx(math.log(100.0))


# ------------------------------------------------------------------------------ two processes (gloo)
def _pretrain_on_ranks(rank: int, world: int, root: str, folder: str) -> None:
    """One process of a data-parallel pretraining run; records its curves and whether it saved weights."""
    out = Path(folder)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    real_save = P.save_backbone

    def recording_save(*args, **kwargs):
        (out / f"saved-by-rank-{rank}").touch()
        return real_save(*args, **kwargs)

    P.save_backbone = recording_save
    try:
        result = P.pretrain(replace(FAST, amp=False), [Path(root)], out / "run", progress=False)
        (out / f"history-{rank}.json").write_text(json.dumps(result.history))
    finally:
        P.save_backbone = real_save
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_pretrain_like_one(fashion_root, tmp_path):
    """Each process trains on half of every batch, scored against the gathered whole batch: the
    curves of one and two processes agree within float round-off; only rank 0 writes weights."""
    curves = {}
    for world in (1, 2):
        folder = tmp_path / f"world-{world}"
        folder.mkdir()
        mp.spawn(_pretrain_on_ranks, args=(world, str(fashion_root), str(folder)), nprocs=world, join=True)
        assert sorted(p.name for p in folder.glob("saved-by-rank-*")) == ["saved-by-rank-0"]
        histories = [json.loads((folder / f"history-{r}.json").read_text()) for r in range(world)]
        curves[world] = [[h.get("loss", h.get("val_loss")) for h in history] for history in histories]
    assert curves[2][0] == curves[2][1]  # losses averaged over the processes, metrics broadcast
    assert len(curves[1][0]) == len(curves[2][0]) == FAST.steps + 2  # a train row per step, 2 evals
    assert curves[2][0] == pytest.approx(curves[1][0], rel=1e-4, abs=1e-5)
