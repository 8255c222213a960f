"""CLIP4Cir analysis numerics (cirlib.evaluation.analysis) and their figures (cirlib.viz.plots, Figs. 7-12)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import open_clip
import pytest
import torch
from matplotlib.colors import to_rgba

from cirlib.evaluation import analysis
from cirlib.models.backbone import load_backbone
from cirlib.models.combiner import Combiner, combine_sum
from cirlib.viz import plots

pytestmark = pytest.mark.usefixtures("close_figures")

TINY_RN = "cirlib-test-tiny-RN"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A ResNet CLIP small enough for CPU tests (RN50 random init alone takes ~10 s here)."""
    if TINY_RN not in open_clip.list_models():
        folder = tmp_path_factory.mktemp("rn_config")
        config = {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        }
        (folder / f"{TINY_RN}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    return load_backbone(TINY_RN, pretrained=None)


def _pixels(backbone, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, backbone.image_size, backbone.image_size, generator=gen)


# ------------------------------------------------------------------------ pairwise similarities


def test_pairwise_similarities_hand_checked() -> None:
    assert analysis.pairwise_similarities(np.eye(4)).tolist() == [0.0] * 6  # orthogonal: all 6 pairs
    same = np.array([[1.0, 2.0], [2.0, 4.0], [-3.0, -6.0]])  # cosine ignores the norm, not the sign
    assert analysis.pairwise_similarities(same) == pytest.approx([1.0, -1.0, -1.0])
    mixed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert analysis.pairwise_similarities(mixed) == pytest.approx([1.0, 2 ** -0.5, 2 ** -0.5])
    with pytest.raises(ValueError, match="at least 2"):
        analysis.pairwise_similarities(np.ones((1, 3)))


def test_pairwise_sampling_is_seeded_and_uses_distinct_pairs() -> None:
    feats = np.random.default_rng(1).normal(size=(60, 8))
    a = analysis.pairwise_similarities(feats, n_pairs=200, seed=3)
    assert a.shape == (200,) and a.dtype == np.float64
    assert np.array_equal(a, analysis.pairwise_similarities(feats, n_pairs=200, seed=3))
    assert not np.array_equal(a, analysis.pairwise_similarities(feats, n_pairs=200, seed=4))
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    i, j = np.triu_indices(60, 1)
    all_sims = np.sort((unit[i] * unit[j]).sum(1))
    pos = np.searchsorted(all_sims, a)  # every sample is one of the i < j pairs: no self-pairs (sim 1)
    near = np.minimum(np.abs(all_sims[np.clip(pos, 0, len(all_sims) - 1)] - a),
                      np.abs(all_sims[np.clip(pos - 1, 0, len(all_sims) - 1)] - a))
    assert near.max() < 1e-6 and a.max() < 1 - 1e-6


def test_linear_pair_index_inverts_row_major_enumeration() -> None:
    for n in (2, 3, 7, 120):
        i, j = np.triu_indices(n, 1)
        a, b = analysis._pair_from_linear(np.arange(len(i)), n)
        assert np.array_equal(a, i) and np.array_equal(b, j)


# ------------------------------------------------------------------------------ similarity gap


def test_gap_stats_identical_disjoint_and_partial() -> None:
    same = analysis.gap_stats([0.1, 0.5, 0.9], [0.1, 0.5, 0.9], n_bins=10)
    assert same.overlap == 1.0 and same.mean_gap == 0.0
    apart = analysis.gap_stats([0.8, 0.85, 0.9], [0.1, 0.2], n_bins=20)
    assert apart.overlap == 0.0 and apart.mean_gap == pytest.approx(0.85 - 0.15)
    # bins [0,1) and [1,2]: target masses (.5, .5), non-target (0, 1) -> IoU = .5 / 1.5
    part = analysis.gap_stats([0, 0, 1, 1], [1, 1, 2, 2], n_bins=2)
    assert part.overlap == pytest.approx(1 / 3) and part.mean_gap == -1.0
    for density in part.densities():
        assert (density * np.diff(part.bin_edges)).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-target"):
        analysis.gap_stats([0.5], [])


def test_similarity_gap_hand_made_features() -> None:
    gallery = torch.eye(4)
    query = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    stats = analysis.similarity_gap(query, gallery, [0, 2], exclude_idx=[1, -1], n_non_target=None)
    assert stats.target_sims == pytest.approx([2 ** -0.5, 1.0])
    assert stats.non_target_sims.tolist() == [0.0] * 5  # query 0: rows 2, 3; query 1: rows 0, 1, 3
    assert stats.mean_gap == pytest.approx((2 ** -0.5 + 1) / 2) and stats.overlap == 0.0


def test_similarity_gap_samples_excludes_and_warns() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(30, 6))
    query = gallery[:20] * 2  # each query equals gallery row q: similarity exactly 1 there
    targets = np.arange(20) + 1
    kw = dict(exclude_idx=np.arange(20), n_non_target=5, seed=7)
    stats = analysis.similarity_gap(query, gallery, targets, **kw)
    assert stats.non_target_sims.shape == (100,) and stats.non_target_sims.max() < 1 - 1e-6
    again = analysis.similarity_gap(query, gallery, targets, **kw)
    assert np.array_equal(stats.non_target_sims, again.non_target_sims)
    with pytest.warns(UserWarning, match="1 of 20 queries"):
        partial = analysis.similarity_gap(query, gallery, np.where(targets == 5, -1, targets), **kw)
    assert partial.target_sims.shape == (19,)
    with pytest.raises(ValueError, match="target_idx"):
        analysis.similarity_gap(query, gallery, targets[:3])


# ------------------------------------------------------------------------------------ Grad-CAM


def test_gradcam_vit_shape_range_and_caption_dependence(vit) -> None:
    pixels = _pixels(vit)
    cam = analysis.gradcam(vit, combine_sum, pixels, "is red with long sleeves")
    assert cam.shape == (vit.image_size, vit.image_size) and cam.dtype == np.float32
    assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    other = analysis.gradcam(vit, combine_sum, pixels, "has a star print and no sleeves")
    assert not np.allclose(cam, other)
    with torch.no_grad():
        target = vit.encode_image(_pixels(vit, seed=1))[0]
    towards_target = analysis.gradcam(vit, combine_sum, pixels, "is red with long sleeves", target)
    assert not np.allclose(cam, towards_target)
    with pytest.raises(ValueError, match=r"\[1, 3, S, S\]"):
        analysis.gradcam(vit, combine_sum, pixels[0], "x")


def test_gradcam_leaves_flags_modes_weights_and_grads_untouched(vit) -> None:
    model = vit.model
    model.visual.requires_grad_(False)  # a frozen image tower must still give gradients
    model.visual.transformer.resblocks[0].train()
    combiner = Combiner(vit.embed_dim).train()  # dropout on: eval mode is needed for stable maps
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        first = analysis.gradcam(vit, combiner, _pixels(vit), "is darker")
        second = analysis.gradcam(vit, combiner, _pixels(vit), "is darker")
        assert np.array_equal(first, second) and first.max() == pytest.approx(1.0)
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert modes == {n: m.training for n, m in model.named_modules()}
        assert combiner.training and all(m.training for m in combiner.modules())
        assert all(p.grad is None for p in [*model.parameters(), *combiner.parameters()])
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    finally:
        model.requires_grad_(True)
        model.eval()


def test_gradcam_resnet_last_conv_map(resnet) -> None:
    resnet.model.train()  # BatchNorm statistics must not move
    state = {k: v.clone() for k, v in resnet.model.state_dict().items()}
    pixels = _pixels(resnet)
    cam = analysis.gradcam(resnet, combine_sum, pixels, "is blue")
    assert cam.shape == (128, 128) and cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    assert not np.allclose(cam, analysis.gradcam(resnet, combine_sum, pixels, "has a belt and is shorter"))
    assert resnet.model.training and all(torch.equal(v, state[k]) for k, v in resnet.model.state_dict().items())
    assert "conv" in analysis.gradcam_layer(resnet)
    resnet.model.eval()


def test_reference_input_and_gradcam_grid(vit, fixture_splits) -> None:
    split = fixture_splits["fashioniq/dress"]
    q = split.queries[0]
    pixels, shown = analysis.reference_input(vit, split.image_paths[q.reference])
    assert pixels.shape == (1, 3, vit.image_size, vit.image_size) and shown.size == (vit.image_size,) * 2
    mean, std = torch.tensor(vit.mean).view(3, 1, 1), torch.tensor(vit.std).view(3, 1, 1)
    restored = torch.from_numpy(np.array(shown)).permute(2, 0, 1) / 255.0
    assert torch.allclose(restored, (pixels[0] * std + mean).clamp(0, 1), atol=1 / 255)
    cam = analysis.gradcam(vit, combine_sum, pixels, "is longer")
    layer = analysis.gradcam_layer(vit)
    assert layer == "Grad-CAM on the last ViT block's input tokens"
    fig = plots.gradcam_grid([(shown, "is longer", cam), (shown, "is red", cam)], layer)
    assert len(fig.axes) == 6 and layer in fig._suptitle.get_text()
    assert len(fig.axes[2].images) == 2  # the reference with the heat-map on top


# ------------------------------------------------------------------------ ranked result grids


def test_top_k_names_follows_protocol_exclusion(fixture_splits) -> None:
    split = fixture_splits["cirr"]
    gallery = torch.eye(len(split.gallery))
    ref_rows = [split.gallery.index(q.reference) for q in split.queries]
    names = analysis.top_k_names(split, gallery[ref_rows] + 0.5 * gallery[[1, 2, 3]], gallery, k=3)
    # CIRR removes the reference: the second-best row (weight 0.5) comes first
    assert [row[0] for row in names] == [split.gallery[i] for i in (1, 2, 3)]
    assert all(q.reference not in row for q, row in zip(split.queries, names))
    kept = analysis.top_k_names(split, gallery[ref_rows[:1]], gallery, k=2, query_indices=[0],
                                exclude_reference=False)
    assert kept == [[split.queries[0].reference, split.gallery[0 if ref_rows[0] else 1]]]


def test_retrieval_grid_frames_exactly_the_ground_truths(fixture_splits) -> None:
    split = fixture_splits["circo"]  # query 0: ground truths 102 and 103; query 2: 107, 101, 103, 104
    ranked = [["103", "104", "102", "105"], ["101", "102", "103", "107"]]
    fig = plots.retrieval_grid(split, [0, 2], ranked, k=4)
    green = to_rgba(plots.GREEN)
    cols = 4 + 2
    framed = {(r, c - 2) for r in range(2) for c in range(2, cols)
              if fig.axes[r * cols + c].spines["left"].get_edgecolor() == green}
    assert framed == {(0, 0), (0, 2), (1, 0), (1, 2), (1, 3)}
    assert fig.axes[0].spines["left"].get_edgecolor() != green  # the reference is never framed
    short = plots.retrieval_grid(fixture_splits["fashioniq/dress"], [0], [["B0001DRS02"]], k=3)
    assert short.axes[2].spines["top"].get_linewidth() == 4 and not short.axes[3].axison
    with pytest.raises(ValueError, match="rankings"):
        plots.retrieval_grid(split, [0, 1], ranked[:1])
    labelled = plots.retrieval_grid(split, [0, 0], ranked, k=4, row_labels=["F", "R50"])
    assert [labelled.axes[r * cols].get_xlabel() for r in range(2)] == ["F", "R50"]
    with pytest.raises(ValueError, match="row labels"):
        plots.retrieval_grid(split, [0, 0], ranked, row_labels=["F"])


# ------------------------------------------------------------------------------ distribution plots


def test_similarity_and_gap_histograms_mark_means() -> None:
    rng = np.random.default_rng(0)
    groups = {
        "out-of-the-box": {"image": rng.normal(0.6, 0.05, 500), "text": rng.normal(0.7, 0.05, 500)},
        "fine-tuned": {"image": rng.normal(0.2, 0.1, 500), "text": rng.normal(0.6, 0.05, 500)},
    }
    fig = plots.similarity_histograms(groups)
    assert len(fig.axes) == 4
    mean_line = fig.axes[2].lines[0].get_xdata()[0]  # row "fine-tuned", column "image"
    assert mean_line == pytest.approx(groups["fine-tuned"]["image"].mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = {"sum": analysis.gap_stats(rng.normal(0.5, 0.1, 200), rng.normal(0.3, 0.1, 2000)),
                 "combiner": analysis.gap_stats(rng.normal(0.4, 0.1, 200), rng.normal(0.0, 0.1, 2000))}
        fig = plots.gap_histograms(stats)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert f"gap {stats['combiner'].mean_gap:.3f}" in texts and f"IoU {stats['combiner'].overlap:.3f}" in texts
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim()  # one x-range: the two panels compare by eye
    assert fig.axes[0].get_xlim()[0] <= float(stats["combiner"].bin_edges[0])


def test_gradcam_batch_equals_one_query_at_a_time(vit) -> None:
    pixels = torch.cat([_pixels(vit, seed) for seed in range(3)])
    texts = ["is red", "has a star print", "is red"]
    with torch.no_grad():
        targets = vit.encode_image(torch.cat([_pixels(vit, seed) for seed in (5, 6, 7)]))
    combiner = Combiner(vit.embed_dim)
    cams = analysis.gradcam_batch(vit, combiner, pixels, texts, targets)
    assert cams.shape == (3, vit.image_size, vit.image_size) and cams.dtype == np.float32
    for row in range(3):
        single = analysis.gradcam(vit, combiner, pixels[row : row + 1], texts[row], targets[row])
        assert np.allclose(cams[row], single, atol=1e-5)
        assert cams[row].min() == 0.0 and cams[row].max() == pytest.approx(1.0)  # each map normalised alone
    with pytest.raises(ValueError, match="2 texts for 3 reference images"):
        analysis.gradcam_batch(vit, combiner, pixels, texts[:2])
    with pytest.raises(ValueError, match=r"target_features must be \[3, D\]"):
        analysis.gradcam_batch(vit, combiner, pixels, texts, targets[:2])


# ------------------------------------------------------------------ gap statistics against recall


def test_spearman_rho_hand_computed_with_ties() -> None:
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4) around 2.5: sum of products 4.5, squares 4.5 and 5
    assert analysis.spearman_rho([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert analysis.spearman_rho([0.1, 0.5, 0.3], [3, 1, 2]) == pytest.approx(-1.0)  # a monotone reversal
    assert analysis.spearman_rho(np.exp([1.0, 2.0, 3.0, 4.0]), [1, 2, 3, 4]) == pytest.approx(1.0)  # ranks only
    assert np.isnan(analysis.spearman_rho([1, 1, 1], [1, 2, 3]))  # a constant sample has no ranking
    with pytest.raises(ValueError, match="at least 3 pairs"):
        analysis.spearman_rho([1, 2], [2, 1])
    with pytest.raises(ValueError, match="paired samples, got 3 and 4"):
        analysis.spearman_rho([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-finite"):
        analysis.spearman_rho([1, 2, float("nan")], [1, 2, 3])


def test_gap_recall_correlation_ranks_models() -> None:
    rng = np.random.default_rng(0)
    far = rng.normal(0.0, 0.05, 300)

    def stats(target_mean: float, spread: float) -> analysis.GapStats:
        return analysis.gap_stats(rng.normal(target_mean, spread, 300), far, n_bins=30)

    gaps = {"sum": stats(0.2, 0.05), "combiner": stats(0.5, 0.05), "convex": stats(0.3, 0.05), "tiny": stats(0.05, 0.3)}
    recall = {"sum": 30.0, "combiner": 50.0, "convex": 30.0, "tiny": 10.0}
    corr = analysis.gap_recall_correlation(gaps, recall)
    order = list(gaps)
    assert corr.n == 4
    assert corr.gap_rho == pytest.approx(analysis.spearman_rho([gaps[m].mean_gap for m in order],
                                                               [recall[m] for m in order]))
    # gap ranks (2, 4, 3, 1) against recall ranks (2.5, 4, 2.5, 1): about 0.95
    assert corr.gap_rho == pytest.approx(4.5 / np.sqrt(5 * 4.5))
    assert corr.overlap_rho == pytest.approx(analysis.spearman_rho([gaps[m].overlap for m in order],
                                                                   [recall[m] for m in order]))
    assert corr.overlap_rho < 0  # more overlap, less recall
    with pytest.raises(ValueError, match=r"only gaps: \['tiny'\], only recall: \['clip'\]"):
        analysis.gap_recall_correlation(gaps, {**{m: recall[m] for m in order[:3]}, "clip": 1.0})


# -------------------------------------------------------------------------------- Combiner lambda


def _hand_set_combiner(variant: str = "convex") -> Combiner:
    """Projections = identity, gate = ReLU([[1, 1, 0, 0], [0, 0, 1, 1]] h) -> [1, -1] . + 0.1 -> sigmoid."""
    combiner = Combiner(2, projection_dim=2, hidden_dim=2, dropout=0.5, variant=variant)
    with torch.no_grad():
        for projection in (combiner.image_projection[0], combiner.text_projection[0]):
            projection.weight.copy_(torch.eye(2))
            projection.bias.zero_()
        combiner.gate[0].weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        combiner.gate[0].bias.zero_()
        combiner.gate[3].weight.copy_(torch.tensor([[1.0, -1.0]]))
        combiner.gate[3].bias.fill_(0.1)
    return combiner.train()  # dropout on: lambdas must be read in eval mode


def test_combiner_lambdas_hand_computed() -> None:
    combiner = _hand_set_combiner()
    image = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    # query 0: h = (0.6, 0.8, 1, 0) -> (1.4, 1.0) -> 0.4 + 0.1; query 1: h = (0, 1, 0, 0) -> (1, 0) -> 1.1
    expected = torch.sigmoid(torch.tensor([0.5, 1.1]))
    lambdas = analysis.combiner_lambdas(combiner, image, text, batch_size=1)
    assert lambdas.shape == (2,) and np.allclose(lambdas, expected.numpy())
    assert combiner.training  # its mode comes back
    with torch.no_grad():  # the convex variant outputs the normalised convex combination with exactly this lambda
        combined = combiner.eval()(image, text)
    lam = torch.from_numpy(lambdas)[:, None]
    unit = torch.nn.functional.normalize
    assert torch.allclose(combined, unit((1 - lam) * unit(image, dim=-1) + lam * unit(text, dim=-1), dim=-1), atol=1e-6)


def test_combiner_lambdas_need_a_learned_lambda() -> None:
    image, text = torch.ones(3, 4), torch.ones(3, 4)
    for variant in ("sum", "no_convex", "static_skip"):
        with pytest.raises(ValueError, match=rf"'{variant}' Combiner variant has no learned lambda"):
            analysis.combiner_lambdas(Combiner(4, variant=variant), image, text)
    assert analysis.combiner_lambdas(Combiner(4, variant="combiner"), image, text).shape == (3,)
    with pytest.raises(TypeError, match="only a Combiner has a lambda, got function"):
        analysis.combiner_lambdas(combine_sum, image, text)


def test_lambda_histogram_shares_the_unit_range() -> None:
    rng = np.random.default_rng(0)
    lambdas = {"cirr / Combiner": rng.uniform(0.4, 0.9, 200), "fashioniq / Combiner": rng.uniform(0.1, 0.3, 200)}
    fig = plots.lambda_histogram(lambdas, bins=10)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 2 and all(ax.get_xlim() == (0.0, 1.0) for ax in panels)
    assert panels[1].lines[0].get_xdata()[0] == pytest.approx(lambdas["fashioniq / Combiner"].mean())
    assert [ax.get_title() for ax in panels] == list(lambdas)
    assert sum(p.get_height() for p in panels[0].patches) == 200
    with pytest.raises(ValueError, match="no lambdas"):
        plots.lambda_histogram({})


def test_gradcam_examples_explain_each_query_towards_its_target(vit, fixture_splits) -> None:
    split = fixture_splits["cirr"]
    rows = analysis.gradcam_examples(vit, combine_sum, split, n=2, seed=1)
    assert len(rows) == 2
    by_caption = {q.captions[0]: q for q in split.queries}
    for shown, caption, cam in rows:
        q = by_caption[caption]
        pixels, expected_shown = analysis.reference_input(vit, split.image_paths[q.reference])
        assert np.array_equal(np.asarray(shown), np.asarray(expected_shown))
        target_pixels, _ = analysis.reference_input(vit, split.image_paths[q.target])
        with torch.no_grad():
            target = vit.encode_image(target_pixels)[0]
        assert np.allclose(cam, analysis.gradcam(vit, combine_sum, pixels, caption, target), atol=1e-5)


def test_subset_term_spread_hand_computed() -> None:
    from pathlib import Path

    from cirlib.data.datasets import CIRSplit, Query
    from cirlib.models.features import SplitFeatures

    # gallery: the reference R and three look-alikes a, b, c on the unit circle (2-d features)
    angles = {"R": 0.0, "a": 0.0, "b": np.pi / 2, "c": np.pi}
    names = list(angles)
    gallery = torch.tensor([[np.cos(t), np.sin(t)] for t in angles.values()], dtype=torch.float32)
    queries = [Query("R", ("x",), "a", ("a",), group=("R", "a", "b", "c")),
               Query("R", ("y",), "b", ("b",), group=("R", "a"))]  # one member besides R: left out
    split = CIRSplit("cirr", "val", Path("."), queries, names, {}, 0)
    reference = gallery[[0, 0]] * 3.0  # unnormalised on purpose: the terms are cosines
    text = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    out = analysis.subset_term_spread(split, SplitFeatures(gallery, reference, text))
    # query 0, members a, b, c: image term cos = (1, 0, -1), text term cos = (0, 1, 0); sample std
    assert out["queries"] == 1
    assert out["image"] == pytest.approx(1.0)
    assert out["text"] == pytest.approx(float(np.std([0.0, 1.0, 0.0], ddof=1)))
    with pytest.raises(ValueError, match="no query has two or more"):
        analysis.subset_term_spread(CIRSplit("cirr", "val", Path("."), queries[1:], names, {}, 0),
                                    SplitFeatures(gallery, reference[1:], text[1:]))
