"""The Combiner (CLIP4Cir Fig. 4), its §4.4 variants, and training on cached features."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cirlib.core.training import batch_slices, best_epoch
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.evaluation.protocols import CachedEvaluator, evaluate_split, merge_metrics
from cirlib.methods.combiner_training import (
    CombinerConfig,
    CombinerData,
    build_combiner_data,
    train_combiner,
    training_triplets,
)
from cirlib.models.combiner import VARIANTS, Combiner, apply_combine, combine_sum, load_combiner

D = 8



def _feats(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 3, torch.randn(n, D, generator=gen) * 0.5


# ------------------------------------------------------------------------------ architecture


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_dimensions() -> None:
    """§4.1: projections (d, 4d); branch layers (8d, 8d) then (8d, 1) and (8d, d)."""
    c = Combiner(D)
    assert [tuple(m.weight.shape) for m in (c.image_projection[0], c.text_projection[0])] == [(4 * D, D)] * 2
    assert [tuple(m.weight.shape) for m in c.gate if isinstance(m, torch.nn.Linear)] == [(8 * D, 8 * D), (1, 8 * D)]
    assert [tuple(m.weight.shape) for m in c.mixture if isinstance(m, torch.nn.Linear)] == [(8 * D, 8 * D), (D, 8 * D)]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in c.modules()) == 4  # after every hidden layer
    assert isinstance(c.gate[-1], torch.nn.Sigmoid)


def test_variant_parameter_counts() -> None:
    proj = 2 * (D * 4 * D + 4 * D)
    gate = 8 * D * 8 * D + 8 * D + 8 * D + 1
    mixture = 8 * D * 8 * D + 8 * D + 8 * D * D + D
    expected = {
        "combiner": proj + gate + mixture,
        "sum": 0,
        "convex": proj + gate,
        "no_convex": proj + mixture,
        "static_skip": proj + mixture,
    }
    assert {v: _n_params(Combiner(D, variant=v)) for v in VARIANTS} == expected


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="unknown Combiner variant 'gated'"):
        Combiner(D, variant="gated")


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_is_unit_norm_and_deterministic_in_eval(variant: str) -> None:
    img, txt = _feats(5, 0)
    c = Combiner(D, variant=variant).eval()
    out = c(img, txt)
    assert out.shape == (5, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert torch.equal(out, c(img, txt))


def test_dropout_is_active_in_training() -> None:
    img, txt = _feats(5, 0)
    c = Combiner(D).train()
    torch.manual_seed(0)
    assert not torch.equal(c(img, txt), c(img, txt))


def test_sum_variant_is_combine_sum() -> None:
    img, txt = _feats(7, 1)
    assert torch.equal(Combiner(D, variant="sum")(img, txt), combine_sum(img, txt))
    # and combine_sum weighs both modalities equally whatever their norms
    expected = F.normalize(F.normalize(img, dim=-1) + F.normalize(txt, dim=-1), dim=-1)
    torch.testing.assert_close(combine_sum(img * 10, txt), expected)


def _zero_last_linear(seq: torch.nn.Sequential) -> None:
    last = [m for m in seq if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


def test_variants_follow_section_4_4() -> None:
    """Each variant's output equals the formula of §4.4 computed by hand from its branches."""
    img, txt = _feats(6, 2)
    ni, nt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)

    def branches(c: Combiner) -> torch.Tensor:
        return torch.cat((c.image_projection(ni), c.text_projection(nt)), dim=-1)

    torch.manual_seed(0)
    full = Combiner(D).eval()
    h = branches(full)
    lam, v = full.gate(h), full.mixture(h)
    assert ((lam > 0) & (lam < 1)).all() and lam.shape == (6, 1)
    torch.testing.assert_close(full(img, txt), F.normalize((1 - lam) * ni + lam * nt + v, dim=-1))

    convex = Combiner(D, variant="convex").eval()
    lam = convex.gate(branches(convex))
    torch.testing.assert_close(convex(img, txt), F.normalize((1 - lam) * ni + lam * nt, dim=-1))

    no_convex = Combiner(D, variant="no_convex").eval()
    torch.testing.assert_close(no_convex(img, txt), F.normalize(no_convex.mixture(branches(no_convex)), dim=-1))

    static = Combiner(D, variant="static_skip").eval()
    v = static.mixture(branches(static))
    torch.testing.assert_close(static(img, txt), F.normalize(0.5 * ni + 0.5 * nt + v, dim=-1))
    _zero_last_linear(static.mixture)  # v = 0 leaves the element-wise sum
    torch.testing.assert_close(static(img, txt), combine_sum(img, txt))


def test_gate_at_one_half_without_mixture_is_the_sum() -> None:
    """The convex combination generalises the element-wise sum (the point of §3.2)."""
    img, txt = _feats(4, 3)
    c = Combiner(D).eval()
    _zero_last_linear(c.gate)  # sigmoid(0) = 0.5
    _zero_last_linear(c.mixture)
    torch.testing.assert_close(c(img, txt), combine_sum(img, txt))


def test_custom_dimensions() -> None:
    c = Combiner(D, projection_dim=5, hidden_dim=7, dropout=0.1)
    assert c.image_projection[0].out_features == 5 and c.gate[0].out_features == 7
    assert c.hparams == {"feature_dim": D, "projection_dim": 5, "hidden_dim": 7, "dropout": 0.1, "variant": "combiner"}
    assert CombinerConfig().build(D).hparams == Combiner(D).hparams  # paper widths: 4d and 8d
    tiny = CombinerConfig.for_tiny(variant="convex").build(D).hparams
    assert (tiny["projection_dim"], tiny["hidden_dim"], tiny["variant"]) == (2 * D, 4 * D, "convex")


# ----------------------------------------------------------------------------- shared loop pieces


def test_apply_combine_runs_in_eval_mode_and_restores_the_flag() -> None:
    torch.manual_seed(0)
    net = Combiner(8).train()  # dropout on: apply_combine must switch it off
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    out = apply_combine(net, image, text, batch_size=2)
    assert net.training and all(m.training for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(out, net.eval()(image, text))
    assert apply_combine(combine_sum, image[:0], text[:0]).shape == (0, 8)


def test_batch_slices_drop_the_partial_batch_unless_it_is_all() -> None:
    order = torch.arange(10)
    assert [b.tolist() for b in batch_slices(order, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b.tolist() for b in batch_slices(order, 16)] == [list(range(10))]
    assert list(batch_slices(torch.arange(1), 4)) == []  # one triplet: no negatives, no loss


def test_merge_metrics_fashioniq_average_and_prefixes() -> None:
    per = {"dress": {"R@10": 10.0, "R@50": 30.0}, "shirt": {"R@10": 20.0, "R@50": 40.0}}
    merged = merge_metrics(per, "fashioniq")
    assert merged["R@10"] == 15.0 and merged["R@50"] == 35.0 and merged["average"] == 25.0
    assert merged["dress/R@10"] == 10.0 and merged["shirt/R@50"] == 40.0
    assert merge_metrics({"dress": per["dress"]}, "fashioniq") == {"R@10": 10.0, "R@50": 30.0, "average": 20.0}
    assert merge_metrics({"val": {"avg": 1.0}}, "cirr") == {"avg": 1.0}
    with pytest.raises(ValueError, match="one split at a time"):
        merge_metrics({"a": {"avg": 1.0}, "b": {"avg": 2.0}}, "cirr")


# ----------------------------------------------------------------------------- training on a synthetic task


def _synthetic(n_gallery: int = 120, n_train: int = 240, n_val: int = 60, seed: int = 0):
    """Gallery vectors; a caption is the displacement to the target plus noise, with a learnable twist."""
    gen = torch.Generator().manual_seed(seed)
    gallery = F.normalize(torch.randn(n_gallery, D, generator=gen), dim=-1)
    rotate = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]  # text lives in a rotated space

    def triplets(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ref = torch.randint(n_gallery, (n,), generator=gen)
        tgt = torch.randint(n_gallery, (n,), generator=gen)
        txt = ((gallery[tgt] - 0.5 * gallery[ref]) + 0.05 * torch.randn(n, D, generator=gen)) @ rotate
        return ref, tgt, txt

    ref, tgt, txt = triplets(n_train)
    train = CombinerData(
        images=gallery,
        reference_index=ref,
        target_index=tgt,
        texts=torch.cat([txt, txt + 0.01]),
        text_index=torch.stack([torch.arange(n_train), torch.arange(n_train) + n_train], dim=1),
        dataset="fashioniq",
    )
    vref, vtgt, vtxt = triplets(n_val)
    names = [f"g{i}" for i in range(n_gallery)]
    split = CIRSplit(
        dataset="fashioniq",
        split="val",
        root=Path("."),
        queries=[
            Query(names[r], ("x",), names[t], (names[t],), category="dress")
            for r, t in zip(vref.tolist(), vtgt.tolist())
        ],
        gallery=names,
        image_paths={},
        n_missing=0,
    )
    def val_fn(combine) -> dict[str, float]:
        with torch.no_grad():
            return merge_metrics({"dress": evaluate_split(split, combine(gallery[vref], vtxt), gallery)}, "fashioniq")

    return train, val_fn


FAST = CombinerConfig(lr=3e-3, batch_size=32, epochs=6, patience=6, dropout=0.1)


def test_training_improves_retrieval(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    before = val_fn(FAST.build(D).eval())["average"]
    combiner, history = train_combiner(train, val_fn, FAST, tmp_path / "c.pt")
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < history[0]["loss"]
    best = max(h["average"] for h in history)
    assert best > before + 20
    assert val_fn(combiner)["average"] == pytest.approx(best)  # the best epoch is what comes back
    assert not combiner.training


def test_resume_reproduces_uninterrupted_training(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    reference, ref_history = train_combiner(train, val_fn, FAST, tmp_path / "full.pt")

    calls = 0

    def crashing(combine) -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # killed during epoch 4's validation: epochs 1-3 are on disk
        return val_fn(combine)

    with pytest.raises(KeyboardInterrupt):
        train_combiner(train, crashing, FAST, tmp_path / "cut.pt")
    resumed, history = train_combiner(train, val_fn, FAST, tmp_path / "cut.pt")

    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert strip(history) == strip(ref_history)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_finished_run_is_loaded_not_retrained(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    first, history = train_combiner(train, val_fn, FAST, tmp_path / "c.pt")

    def never(combine):
        raise AssertionError("a finished run must not validate again")

    again, history2 = train_combiner(train, never, FAST, tmp_path / "c.pt")
    assert history2 == history
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    loaded = load_combiner(tmp_path / "c.pt", device="cpu")
    assert loaded.hparams == first.hparams and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), loaded.state_dict().values()))


def test_other_config_or_data_retrains(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    train_combiner(train, val_fn, FAST, tmp_path / "c.pt")
    calls = []
    changed = re.escape(f"another configuration or data (changed: config.lr: {FAST.lr} -> 0.001)")
    with pytest.warns(UserWarning, match=changed):
        train_combiner(train, lambda c: calls.append(1) or val_fn(c), replace(FAST, lr=1e-3), tmp_path / "c.pt")
    assert len(calls) == 6


def test_best_epoch_and_early_stopping(tmp_path: Path) -> None:
    train, _ = _synthetic()
    scores = iter([1.0, 5.0, 3.0, 2.0, 9.0])
    snapshots = []

    def scripted(combine) -> dict[str, float]:
        snapshots.append({k: v.clone() for k, v in combine.state_dict().items()})
        return {"average": next(scores)}

    config = replace(FAST, epochs=10, patience=2)
    combiner, history = train_combiner(train, scripted, config, tmp_path / "c.pt")
    assert [h["average"] for h in history] == [1.0, 5.0, 3.0, 2.0]  # stopped after 2 epochs without gain
    assert all(torch.equal(v, snapshots[1][k]) for k, v in combiner.state_dict().items())


def test_missing_main_metric_and_parameter_free_variant(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    with pytest.raises(KeyError, match="'R@1' is not among the validation metrics"):
        train_combiner(train, val_fn, replace(FAST, main_metric="R@1"))
    with pytest.raises(ValueError, match="no parameters"):
        train_combiner(train, val_fn, CombinerConfig(variant="sum"))


def test_unreadable_checkpoint_is_retrained(tmp_path: Path) -> None:
    train, val_fn = _synthetic()
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        _, history = train_combiner(train, val_fn, FAST, tmp_path / "c.pt")
    assert len(history) == FAST.epochs


def test_combiner_data_checks_shapes() -> None:
    with pytest.raises(ValueError, match="index shapes disagree"):
        CombinerData(torch.zeros(3, D), torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                     torch.zeros(2, D), torch.zeros(4, 1, dtype=torch.long), "cirr")
    with pytest.raises(ValueError, match="one D"):
        CombinerData(torch.zeros(3, D), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                     torch.zeros(2, D + 1), torch.zeros(4, 1, dtype=torch.long), "cirr")


# ----------------------------------------------------------------------------- building features from a split


class _PixelMeanBackbone:
    """Backbone API subset: image feature = mean colour, text feature = a hash embedding."""

    image_size, embed_dim = 16, 3
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    device = torch.device("cpu")
    fingerprint = image_fingerprint = text_fingerprint = "pixel-mean"

    def __init__(self) -> None:
        self.model = torch.nn.Identity()
        self.texts: list[str] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.texts += texts
        return torch.tensor([[len(t), sum(map(ord, t)) % 101, 1] for t in texts], dtype=torch.float32)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def _fashion_split(root: Path) -> CIRSplit:
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (128, 128, 128)}
    (root / "images").mkdir(parents=True)
    paths = {}
    for name, rgb in colours.items():
        paths[name] = root / "images" / f"{name}.png"
        Image.new("RGB", (20, 20), rgb).save(paths[name])
    queries = [
        Query("red", ("is green", "make it greener"), "green", ("green",), category="dress"),
        Query("green", ("is blue.", "blue please"), "blue", ("blue",), category="dress"),
        Query("blue", ("is grey", "grey"), "grey", ("grey",), category="dress"),
    ]
    return CIRSplit("fashioniq", "train", root, queries, list(colours), paths, 0)


def test_training_triplets_need_two_usable_ones(tmp_path: Path) -> None:
    split = _fashion_split(tmp_path)
    assert len(training_triplets([split])) == 3
    lonely = replace(split, queries=[split.queries[0], replace(split.queries[1], target="gone")])
    with pytest.warns(UserWarning, match="1 training queries skipped"), pytest.raises(
        ValueError, match=r"1 usable training triplet\(s\) in fashioniq/train; contrastive training needs at least 2"
    ):
        training_triplets([lonely])


def test_build_combiner_data_encodes_each_image_and_rendering_once(tmp_path: Path) -> None:
    split = _fashion_split(tmp_path)
    backbone = _PixelMeanBackbone()
    data = build_combiner_data(split, backbone, caption_samples=6, seed=3, cache_dir=tmp_path / "cache")
    assert data.dataset == "fashioniq" and len(data) == 3 and data.text_index.shape == (3, 6)
    assert data.images.shape == (4, 3)  # red, green, blue, grey: each once
    assert len(backbone.texts) == len(set(backbone.texts)) == data.texts.shape[0]
    # rows point at the right images: the reference of query 0 is pure red
    torch.testing.assert_close(data.images[data.reference_index[0]], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(data.images[data.target_index[0]], torch.tensor([0.0, 1.0, 0.0]))
    # the renderings of query 0 are query_text draws: both captions in some order, or one
    rendered = {backbone.texts[i] for i in data.text_index[0].tolist()}
    allowed = {"Is green and make it greener", "Make it greener and is green", "Is green", "Make it greener"}
    assert rendered <= allowed and len(rendered) > 1
    second = _PixelMeanBackbone()
    again = build_combiner_data(split, second, caption_samples=6, seed=3, cache_dir=tmp_path / "cache")
    assert again.fingerprint() == data.fingerprint()
    assert second.texts == []  # the renderings' features come from the caption cache


def test_cached_evaluator_scores_combining_functions(tmp_path: Path) -> None:
    split = _fashion_split(tmp_path)
    split.split = "val"
    val_fn = CachedEvaluator({"dress": split}, _PixelMeanBackbone(), cache_dir=tmp_path / "cache")

    def oracle(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # query text -> its target colour
        table = {
            "Is green and make it greener": [0.0, 1.0, 0.0],
            "Is blue and blue please": [0.0, 0.0, 1.0],
            "Is grey and grey": [0.5, 0.5, 0.5],
        }
        return torch.tensor([table[query_text(q)] for q in split.queries], dtype=torch.float32)

    metrics = val_fn(oracle)
    assert metrics["R@10"] == 100.0 and metrics["average"] == 100.0
    assert set(val_fn(combine_sum)) == {"R@10", "R@50", "average"}
    # the per-query values behind each number: their mean is the number, one value per query
    for fn in (oracle, combine_sum):
        per_query, summary = val_fn.per_query(fn), val_fn(fn)
        assert len(per_query.strata) == len(split.queries)
        for metric, value in summary.items():
            assert per_query.mean(metric) == pytest.approx(value), metric


def test_cached_evaluator_reuses_the_features_of_encode_split(tmp_path: Path) -> None:
    """Notebooks encode validation splits with encode_split first; the Combiner's evaluator must hit that cache."""
    from cirlib.models.features import encode_split

    split = _fashion_split(tmp_path)
    split.split = "val"
    cache = tmp_path / "cache"
    encode_split(_PixelMeanBackbone(), split, cache_dir=cache, progress=False)
    files = sorted(cache.iterdir())
    CachedEvaluator({"dress": split}, _PixelMeanBackbone(), cache_dir=cache)
    assert sorted(cache.iterdir()) == files


def test_build_is_seeded_whatever_the_global_rng_state() -> None:
    from cirlib.methods.combiner_training import CombinerConfig

    torch.manual_seed(1)
    a = CombinerConfig.for_tiny(seed=3).build(16)
    torch.rand(100)
    b = CombinerConfig.for_tiny(seed=3).build(16)
    c = CombinerConfig.for_tiny(seed=4).build(16)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_best_epoch_is_the_first_maximum_as_the_training_loop_keeps_it() -> None:
    history = [{"epoch": 1, "avg": 3.0}, {"epoch": 2, "avg": 5.0}, {"epoch": 3, "avg": 5.0}, {"epoch": 4, "avg": 4.0}]
    assert best_epoch(history, "avg") == 2
    assert best_epoch([], "avg") == 0
    with pytest.raises(KeyError):
        best_epoch(history, "R@1")
