"""Training and inference of candidate re-ranking (cirlib.methods.reranking), on random tensors standing in
for the frozen image tower's cached outputs of the course's tiny backbone (random weights)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.labels import load_attributed_images
from cirlib.evaluation.protocols import per_query_metrics
from cirlib.methods import reranking
from cirlib.methods.reranking import (
    MATCHED_SCHEDULES,
    PAPER_K,
    FilterConfig,
    FirstStage,
    ImageBank,
    MatchingConfig,
    QuerySet,
    RerankerConfig,
    TrainingData,
    combine_stage,
    filter_stage,
    image_captions,
    pretrain_matching,
    ranking_features,
    rerank,
    train_filter,
    train_reranker,
)
from cirlib.models.backbone import TINY_MODEL, Backbone, load_backbone
from cirlib.models.combiner import combine_sum
from cirlib.models.features import image_features, patch_token_shape, patch_tokens
from cirlib.models.multimodal import CandidateFilter, DualEncoderReranker

COLOURS = ["red", "blue", "green", "black"]
FAST_FILTER = FilterConfig(lr=1e-3, weight_decay=0.0, batch_size=8, epochs=2, progress=False)
FAST_RERANKER = RerankerConfig(layers=1, lr=1e-3, weight_decay=0.0, batch_size=4, epochs=2, k=5, progress=False)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(TINY_MODEL, device="cpu")


def _bank(tiny: Backbone, n: int, seed: int) -> ImageBank:
    gen = torch.Generator().manual_seed(seed)
    length, width = patch_token_shape(tiny)
    return ImageBank(torch.randn(n, tiny.embed_dim, generator=gen),
                     torch.randn(n, length, width, generator=gen).to(torch.float16))


def _queries(n_queries: int, n_images: int, seed: int, dataset: str) -> list[Query]:
    """Captions name a colour; the target is a function of reference and colour, so it can be learned."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_queries):
        ref, colour = int(torch.randint(n_images, (1,), generator=gen)), int(torch.randint(4, (1,), generator=gen))
        target = (ref + 1 + colour) % n_images
        group = tuple(f"img{(ref + d) % n_images}" for d in range(6)) if dataset == "cirr" else ()
        out.append(Query(f"img{ref}", (f"make it {COLOURS[colour]}",), f"img{target}", (f"img{target}",), group=group,
                         category="dress" if dataset == "fashioniq" else None))
    return out


def _training(tiny: Backbone, n_queries: int = 24, n_images: int = 10) -> TrainingData:
    queries = _queries(n_queries, n_images, 0, "fashioniq")
    ref = torch.tensor([int(q.reference[3:]) for q in queries])
    tgt = torch.tensor([int(q.target[3:]) for q in queries])
    return TrainingData(_bank(tiny, n_images, 0), ref, tgt, queries, "fashioniq")


def _query_set(tiny: Backbone, dataset: str = "fashioniq", n_queries: int = 12, n_images: int = 10,
               seed: int = 1) -> QuerySet:
    queries = _queries(n_queries, n_images, seed, dataset)
    names = [f"img{i}" for i in range(n_images)]
    split = CIRSplit(dataset, "val", Path("/nowhere"), queries, names, {n: Path(f"/nowhere/{n}.png") for n in names}, 0)
    reference_rows = torch.tensor([int(q.reference[3:]) for q in queries])
    return QuerySet(split, _bank(tiny, n_images, seed), reference_rows, tiny.tokenize([query_text(q) for q in queries]))


def _no_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------- first stages and top K


def test_candidates_are_the_first_stage_top_k_and_skip_the_excluded_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    first = FirstStage(torch.randn(5, 8, generator=gen), torch.randn(20, 8, generator=gen))
    full = first.scores().argsort(dim=1, descending=True)
    assert torch.equal(first.candidates(6), full[:, :6])
    exclude = torch.tensor([full[0, 0], full[1, 3], -1, full[3, 15], full[4, 5]])
    kept = first.candidates(6, exclude)
    for q in range(5):
        assert kept[q].tolist() == [g for g in full[q].tolist() if g != exclude[q]][:6]


def test_k_larger_than_the_gallery_is_refused() -> None:
    first = FirstStage(torch.randn(2, 4), torch.randn(7, 4))
    assert first.candidates(7).shape == (2, 7)
    with pytest.raises(ValueError, match="K=8 candidates asked for, but the gallery holds 7 images"):
        first.candidates(8)
    with pytest.raises(ValueError, match="excluded reference"):
        first.candidates(7, torch.tensor([0, -1]))


def test_the_sum_serves_as_a_first_stage() -> None:
    gen = torch.Generator().manual_seed(0)
    reference, text, gallery = (torch.randn(4, 6, generator=gen) for _ in range(3))
    first = combine_stage(combine_sum, reference, text, gallery)
    torch.testing.assert_close(first.query_features, combine_sum(reference, text))
    assert first.candidates(3).shape == (4, 3)


def test_reranking_reorders_only_the_top_k() -> None:
    gen = torch.Generator().manual_seed(3)
    first = FirstStage(torch.randn(6, 8, generator=gen), torch.randn(15, 8, generator=gen))
    candidates = first.candidates(4)
    scores = torch.randn(6, 4, generator=gen)
    query, gallery = ranking_features(first, candidates, scores)
    ranking = (query @ gallery.T).argsort(dim=1, descending=True)
    filter_ranking = first.scores().argsort(dim=1, descending=True)
    for q in range(6):
        top = candidates[q][scores[q].argsort(descending=True)]
        assert torch.equal(ranking[q, :4], top)
        rest = [g for g in filter_ranking[q].tolist() if g not in set(top.tolist())]
        assert ranking[q, 4:].tolist() == rest


def test_ranking_features_go_through_the_official_protocols(tiny: Backbone) -> None:
    qs = _query_set(tiny, "cirr", n_queries=8, n_images=12)
    targets = torch.tensor([int(q.target[3:]) for q in qs.split.queries])
    # a first stage that puts each target third (behind two other images), never the reference first
    gallery = torch.eye(12)
    query = torch.full((8, 12), -1.0)
    for i, t in enumerate(targets.tolist()):
        query[i, (t + 1) % 12], query[i, (t + 2) % 12], query[i, t] = 3.0, 2.0, 1.0
    first = FirstStage(query, gallery)
    candidates = first.candidates(3, qs.exclude)
    before = per_query_metrics(qs.split, query, gallery)
    scores = (candidates == targets.view(-1, 1)).float()  # a re-ranker that finds every target it is shown
    after = per_query_metrics(qs.split, *ranking_features(first, candidates, scores))
    shown = (candidates == targets.view(-1, 1)).any(dim=1)
    assert before["R@1"].sum() == 0
    assert torch.equal(after["R@1"], shown.float() * 100)
    assert torch.equal(after["R@50"], before["R@50"])  # the same images, in another order
    assert set(after) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"}


def test_two_stage_per_query_means_are_the_two_stage_metrics(tiny: Backbone) -> None:
    qs = {"dress": _query_set(tiny, n_queries=9, seed=1), "shirt": _query_set(tiny, n_queries=7, seed=2)}
    gen = torch.Generator().manual_seed(0)
    firsts = {n: FirstStage(torch.randn(len(q), 6, generator=gen), torch.randn(10, 6, generator=gen))
              for n, q in qs.items()}
    candidates = {n: f.candidates(4) for n, f in firsts.items()}
    scores = {n: torch.randn(len(q), 4, generator=gen) for n, q in qs.items()}
    for given in (None, scores):
        pq = reranking.two_stage_per_query(qs, firsts, candidates, given)
        means = reranking.two_stage_metrics(qs, firsts, candidates, None if given is None else scores.__getitem__)
        assert pq.names == ("dress", "shirt") and len(pq.strata) == 16
        for metric in ("R@10", "R@50"):
            assert pq.mean(metric) == pytest.approx(means[metric])


def test_reorder_sorts_each_querys_candidates_by_score_ties_in_first_stage_order() -> None:
    candidates = torch.tensor([[7, 3, 5, 1], [2, 4, 6, 8]])
    scores = torch.tensor([[0.1, 0.9, 0.1, 0.5], [1.0, 1.0, 1.0, 2.0]])
    assert reranking.reorder(candidates, scores).tolist() == [[3, 1, 7, 5], [8, 2, 4, 6]]
    with pytest.raises(ValueError, match=r"must both be \[Q, K\]"):
        reranking.reorder(candidates, scores[:, :3])


def test_target_positions_coverage_and_rank_changes(tiny: Backbone) -> None:
    qs = _query_set(tiny, n_queries=4, n_images=10)
    targets = [int(q.target[3:]) for q in qs.split.queries]
    others = [[g for g in range(10) if g != t] for t in targets]
    # the target 3rd, 1st, absent, 4th among 4 candidates
    candidates = torch.tensor([others[0][:2] + [targets[0]] + others[0][2:3], [targets[1]] + others[1][:3],
                               others[2][:4], others[3][:3] + [targets[3]]])
    before = reranking.target_positions(qs, candidates)
    assert before.tolist() == [3, 1, 0, 4]
    scores = torch.tensor([[0.0, 0.0, 5.0, 1.0], [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    after = reranking.target_positions(qs, candidates, scores)
    assert after.tolist() == [1, 4, 0, 4]  # ties keep the first stage's order
    assert reranking.coverage(before, [1, 2, 3, 4]) == {1: 25.0, 2: 25.0, 3: 50.0, 4: 75.0}
    moves = reranking.rank_changes(before, after)
    assert moves["queries"] == 3
    assert moves["initial"] == pytest.approx(8 / 3) and moves["re-ranked"] == pytest.approx(3.0)
    assert moves["difference"] == pytest.approx(-1 / 3) and moves["decrease %"] == pytest.approx(-12.5)
    with pytest.raises(ValueError, match="only re-orders"):
        reranking.rank_changes(before, torch.tensor([1, 1, 2, 4]))
    gains = reranking.gains_by_initial_rank(before, after, [1, 2, 4, 5])
    assert gains["queries"].tolist() == [1, 1, 1]
    assert gains["mean gain"].tolist() == [-3.0, 2.0, 0.0]
    assert gains["forward %"].tolist() == [0.0, 100.0, 0.0] and gains["back %"].tolist() == [100.0, 0.0, 0.0]
    assert list(gains.index) == ["1", "2-3", "4"]
    names = reranking.ranked_names(qs, candidates, scores, k=2)
    assert names[0] == [f"img{targets[0]}", f"img{others[0][2]}"] and names[1][0] == f"img{others[1][2]}"
    assert reranking.ranked_names(qs, candidates, k=1)[1] == [f"img{targets[1]}"]


def _one_epoch_models(tiny: Backbone, tmp_path: Path) -> tuple[QuerySet, CandidateFilter, DualEncoderReranker]:
    """Four queries, and a filter and a re-ranker trained one epoch each: enough to time them."""
    qs = _query_set(tiny, n_queries=4)
    train = _training(tiny)
    filt, _ = train_filter(tiny, train, {"dress": qs}, replace(FAST_FILTER, epochs=1), tmp_path / "f.pt")
    reranker, _ = train_reranker(tiny, filt, train, {"dress": qs}, replace(FAST_RERANKER, epochs=1), tmp_path / "r.pt")
    return qs, filt, reranker


def test_inference_times_cover_each_k(tiny: Backbone, tmp_path: Path) -> None:
    qs, filt, reranker = _one_epoch_models(tiny, tmp_path)
    times = reranking.inference_times(reranker, filt, qs, [2, 4])
    assert list(times.index) == [2, 4] and (times > 0).all().all()
    ratio = times["re-rank s/query"] / times["filter s/query"]
    assert times["re-rank / filter"].tolist() == pytest.approx(ratio.tolist())
    with pytest.raises(ValueError, match="filter_repeats"):
        reranking.inference_times(reranker, filt, qs, [2], filter_repeats=0)


def test_inference_times_keep_the_median_filter_lap(tiny: Backbone, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: the filter's laps take 9, 1 and 2 s, re-ranking no time; the median lap is 2 s."""
    qs, filt, reranker = _one_epoch_models(tiny, tmp_path)
    clock, laps, real_stage = [0.0], iter([9.0, 1.0, 2.0]), reranking.filter_stage

    def timed_stage(*args, **kwargs):
        clock[0] += next(laps)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(reranking, "filter_stage", timed_stage)
    monkeypatch.setattr(reranking.time, "perf_counter", lambda: clock[0])
    times = reranking.inference_times(reranker, filt, qs, [2, 4], filter_repeats=3)
    assert times["filter s/query"].tolist() == [2.0 / 4, 2.0 / 4]
    assert times["re-rank s/query"].tolist() == [0.0, 0.0]


def test_query_sets_and_training_data_read_image_files_through_the_caches(tiny: Backbone, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(8)]
    paths = {}
    for name in names:
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[name])
    queries = [Query("img6", ("show it red",), "img1"), Query("img2", ("make it blue",), "img3"),
               Query("img7", ("add a dog",), "img0")]
    split = CIRSplit("cirr", "val", tmp_path, queries, names[:6], paths, 0)  # img6, img7 are outside the gallery
    qs = QuerySet.build(tiny, split, cache_dir=tmp_path / "cache", progress=False)
    assert len(qs.images) == 8 and qs.gallery_size == 6 and qs.tokens.shape == (3, 32)
    assert qs.reference_rows.tolist() == [6, 2, 7] and qs.exclude.tolist() == [-1, 2, -1]
    gallery_paths = [paths[n] for n in names[:6]]
    assert torch.equal(qs.images.features[:6], image_features(tiny, gallery_paths, progress=False))
    assert torch.equal(qs.images.tokens[6:], patch_tokens(tiny, [paths["img6"], paths["img7"]], progress=False))
    assert len(list((tmp_path / "cache").glob("patch-tokens-*"))) == 2  # gallery and outside references
    train = TrainingData.build(tiny, replace(split, split="train"), cache_dir=tmp_path / "cache", progress=False)
    assert (train.reference_rows.tolist(), train.target_rows.tolist()) == ([0, 2, 4], [1, 3, 5])
    # img1 again, read through the pixel cache in another batch
    torch.testing.assert_close(train.images.tokens[1].float(), qs.images.tokens[1].float(), rtol=1e-3, atol=1e-3)
    assert train.dataset == "cirr" and train.captions(torch.tensor([2]), None) == ["add a dog"]
    # rows in first-seen order, each triplet's reference then its target
    assert train.image_paths == tuple(paths[n] for n in ("img6", "img1", "img2", "img3", "img7", "img0"))


def test_a_subset_keeps_queries_and_their_inputs_together(tiny: Backbone) -> None:
    qs = _query_set(tiny, "cirr", n_queries=12)
    part = qs.subset(5)
    assert len(part) == len(part.split.queries) == len(part.tokens) == 5 and part.images is qs.images
    rows = [next(i for i, x in enumerate(qs.split.queries) if x is q) for q in part.split.queries]
    assert rows == sorted(rows) and torch.equal(part.tokens, qs.tokens[rows])
    assert torch.equal(part.reference_rows, qs.reference_rows[rows]) and torch.equal(part.exclude, qs.exclude[rows])
    assert qs.subset(None) is qs and qs.subset(50) is qs


def test_paper_k() -> None:
    assert PAPER_K == {"fashioniq": 100, "cirr": 50}


# ------------------------------------------------------------------------------------- training


def test_filter_training_lowers_the_loss_and_leaves_the_backbone_alone(tiny: Backbone, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    filt, history = train_filter(tiny, _training(tiny), {"dress": _query_set(tiny)},
                                 replace(FAST_FILTER, epochs=3), tmp_path / "filter.pt")
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0]
    assert {"R@10", "R@50", "average", "epoch"} <= set(history[0])
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert all(p.grad is None for p in tiny.model.parameters())  # nothing reached the frozen towers
    assert not filt.training
    assert filt.logit_scale.item() != pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())  # learned lambda


def test_reranker_training_lowers_the_loss(tiny: Backbone, tmp_path: Path) -> None:
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, _ = train_filter(tiny, train, val, FAST_FILTER, tmp_path / "filter.pt")
    filter_state = {k: v.clone() for k, v in filt.state_dict().items()}
    reranker, history = train_reranker(tiny, filt, train, val, replace(FAST_RERANKER, epochs=3),
                                       tmp_path / "reranker.pt")
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0]
    assert {"R@10", "R@50", "average"} <= set(history[0])
    assert all(torch.equal(filter_state[k], v) for k, v in filt.state_dict().items())


def test_keep_last_trains_the_whole_schedule_without_validating(tiny: Backbone, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, _ = train_filter(tiny, train, val, replace(FAST_FILTER, epochs=1), tmp_path / "filter.pt")
    config = replace(FAST_RERANKER, epochs=3, keep="last")

    def no_validation(*args, **kwargs):
        raise AssertionError("keep='last' must not validate")

    with monkeypatch.context() as m:
        m.setattr(reranking, "two_stage_metrics", no_validation)
        reranker, history = train_reranker(tiny, filt, train, val, config, tmp_path / "last.pt")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(set(row) == {"epoch", "loss", "seconds"} for row in history)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["finished"] and state["best_epoch"] == 3 and state["best_modules"] is None
    for name, weight in reranker.state_dict().items():  # what the loop saved is the last epoch's weights
        assert torch.equal(state["modules"]["reranker"][name], weight)
    # a second call loads the finished run instead of training again (nothing validates either way)
    again, history_again = train_reranker(tiny, filt, train, val, config, tmp_path / "last.pt")
    assert history_again == history
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), reranker.state_dict().values()))
    with pytest.raises(ValueError, match="neither patience nor main_metric"):
        RerankerConfig(keep="last", patience=2)
    with pytest.raises(ValueError, match="keep must be"):
        RerankerConfig(keep="first")  # type: ignore[arg-type]


def test_validation_k_is_capped_by_the_smallest_gallery(tiny: Backbone, tmp_path: Path) -> None:
    cirr = _query_set(tiny, "cirr", n_queries=6, n_images=10)
    assert cirr.max_candidates == 9 and _query_set(tiny).max_candidates == 10  # CIRR leaves the reference out
    train, val = _training(tiny), {"cirr": cirr}
    filt, _ = train_filter(tiny, train, val, replace(FAST_FILTER, epochs=1), tmp_path / "filter.pt")
    with pytest.warns(UserWarning, match="re-ranks the top 9, not 50"):
        train_reranker(tiny, filt, train, val, replace(FAST_RERANKER, epochs=1, k=50), tmp_path / "reranker.pt")


def test_filter_negatives_are_the_filters_top_ranked_other_images(tiny: Backbone, tmp_path: Path) -> None:
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, _ = train_filter(tiny, train, val, replace(FAST_FILTER, epochs=1), tmp_path / "filter.pt")
    hard = reranking.filter_negatives(filt, tiny, train, 3, batch_size=5)
    assert hard.shape == (len(train), 3)
    with torch.no_grad():
        tokens = tiny.tokenize(train.captions(torch.arange(len(train)), None))
        query, _ = filt(tokens, train.images.tokens[train.reference_rows].float())
    ranking = FirstStage(query, train.images.features).scores().argsort(dim=1, descending=True)
    for i in range(len(train)):
        pair = {int(train.reference_rows[i]), int(train.target_rows[i])}
        assert hard[i].tolist() == [g for g in ranking[i].tolist() if g not in pair][:3]
    with pytest.raises(ValueError, match="n must be"):
        reranking.filter_negatives(filt, tiny, train, len(train.images) - 1)


def test_reranker_training_with_filter_negatives_lowers_the_loss(tiny: Backbone, tmp_path: Path) -> None:
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, _ = train_filter(tiny, train, val, FAST_FILTER, tmp_path / "filter.pt")
    _, history = train_reranker(tiny, filt, train, val, replace(FAST_RERANKER, epochs=3, hard_negatives=2),
                                tmp_path / "reranker.pt")
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["loss"] > 1.0  # six candidates per row (4 in-batch + 2 hard): ln 6 = 1.79 at chance
    with pytest.raises(ValueError, match="hard_negatives"):
        RerankerConfig(hard_negatives=-1)


def test_ref_cls_reranker_trains_its_projection_and_reranks_without_z_t(tiny: Backbone, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The "w. Ref_CLS" ablation: Encoder-z_t reads the reference's class token through a new
    projection that learns, and re-ranking never asks the filter for z_t."""
    qs = _query_set(tiny, n_queries=5)
    train = _training(tiny)
    filt, _ = train_filter(tiny, train, {"dress": qs}, replace(FAST_FILTER, epochs=1), tmp_path / "f.pt")
    config = replace(FAST_RERANKER, epochs=3, reference="cls")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        start = DualEncoderReranker.from_backbone(tiny, config.layers, reference="cls").reference_projection.weight
    reranker, history = train_reranker(tiny, filt, train, {"dress": qs}, config, tmp_path / "r.pt")
    assert reranker.hparams["reference"] == "cls" and history[-1]["loss"] < history[0]["loss"]
    assert not torch.equal(reranker.reference_projection.weight, start)
    candidates = filter_stage(filt, qs).candidates(4)
    monkeypatch.setattr(filt, "forward", lambda *a: pytest.fail("Ref_CLS re-ranking asked the filter for z_t"))
    scores = rerank(reranker, filt, qs, candidates, pair_batch_size=8, amp=False, progress=False)  # fp32, as below
    with torch.no_grad():
        one = reranker(qs.tokens[1:2].repeat(4, 1), qs.images.tokens[qs.reference_rows[1:2]].float().repeat(4, 1, 1),
                       qs.images.tokens[candidates[1]].float())
    torch.testing.assert_close(scores[1], one, rtol=1e-4, atol=1e-5)


def _interrupted(monkeypatch: pytest.MonkeyPatch, train_fn, *args):
    """``train_fn(*args)`` killed at its second validation (after one saved epoch), then run again."""
    real, calls = reranking.two_stage_metrics, []

    def crash_at_second_validation(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(reranking, "two_stage_metrics", crash_at_second_validation)
        train_fn(*args)
    return train_fn(*args)


def test_interrupted_runs_resume_to_the_same_result(tiny: Backbone, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, filter_history = train_filter(tiny, train, val, FAST_FILTER, tmp_path / "whole" / "filter.pt")
    reranker, reranker_history = train_reranker(tiny, filt, train, val, FAST_RERANKER,
                                                tmp_path / "whole" / "reranker.pt")
    resumed_filter, history = _interrupted(monkeypatch, train_filter, tiny, train, val, FAST_FILTER,
                                           tmp_path / "cut" / "filter.pt")
    assert _no_seconds(history) == _no_seconds(filter_history) and len(history) == 2
    for a, b in zip(resumed_filter.state_dict().values(), filt.state_dict().values()):
        assert torch.equal(a, b)
    resumed, history = _interrupted(monkeypatch, train_reranker, tiny, resumed_filter, train, val, FAST_RERANKER,
                                    tmp_path / "cut" / "reranker.pt")
    assert _no_seconds(history) == _no_seconds(reranker_history) and len(history) == 2
    for a, b in zip(resumed.state_dict().values(), reranker.state_dict().values()):
        assert torch.equal(a, b)


def test_rerank_scores_each_query_with_its_candidates(tiny: Backbone, tmp_path: Path) -> None:
    qs = _query_set(tiny, n_queries=5)
    train = _training(tiny)
    filt, _ = train_filter(tiny, train, {"dress": qs}, replace(FAST_FILTER, epochs=1), tmp_path / "f.pt")
    reranker, _ = train_reranker(tiny, filt, train, {"dress": qs}, replace(FAST_RERANKER, epochs=1), tmp_path / "r.pt")
    first = filter_stage(filt, qs)
    assert first.query_features.shape == (5, tiny.embed_dim) and first.gallery_features.shape == (10, tiny.embed_dim)
    candidates = first.candidates(4)
    scores = rerank(reranker, filt, qs, candidates, pair_batch_size=6, amp=False, progress=False)  # fp32, as below
    assert scores.shape == (5, 4)
    with torch.no_grad():
        _, z_t = filt(qs.tokens[2:3], qs.images.tokens[qs.reference_rows[2:3]].float())
        one = reranker(qs.tokens[2:3].repeat(4, 1), z_t.repeat(4, 1, 1), qs.images.tokens[candidates[2]].float())
    torch.testing.assert_close(scores[2], one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="gallery"):
        rerank(reranker, filt, qs, torch.full((5, 4), 10), progress=False)


def test_matching_pretraining_learns_and_starts_the_reranker(tiny: Backbone, tmp_path: Path) -> None:
    images = _bank(tiny, 12, 5)
    captions = [f"a {COLOURS[i % 4]} thing" for i in range(8)] + [f"a {COLOURS[i]} thing with dots" for i in range(4)]
    config = MatchingConfig(layers=1, lr=1e-3, weight_decay=0.0, batch_size=6, epochs=4, epoch_size=None,
                            progress=False)
    matcher, history = pretrain_matching(tiny, images, captions, config, tmp_path / "matcher.pt")
    losses = [row["loss"] for row in history]
    assert len(history) == 4 and losses[-1] < losses[0] and matcher.streams == ("t",) and not matcher.training
    again, history_again = pretrain_matching(tiny, images, captions, config, tmp_path / "matcher.pt")  # loaded
    assert history_again == history
    torch.testing.assert_close(again.layers[0].cross_attn["t"].attn.out_proj.weight,
                               matcher.layers[0].cross_attn["t"].attn.out_proj.weight)
    # a re-ranker trained at learning rate 0 keeps what it started from: the matcher's weights, in both streams
    train, val = _training(tiny), {"dress": _query_set(tiny)}
    filt, _ = train_filter(tiny, train, val, FAST_FILTER, tmp_path / "filter.pt")
    still = replace(FAST_RERANKER, lr=0.0, epochs=1, keep="last", k=None)
    reranker, _ = train_reranker(tiny, filt, train, val, still, tmp_path / "reranker.pt", matcher=matcher)
    for stream in ("t", "z"):
        torch.testing.assert_close(reranker.layers[0].cross_attn[stream].attn.in_proj_weight,
                                   matcher.layers[0].cross_attn["t"].attn.in_proj_weight)
    plain, _ = train_reranker(tiny, filt, train, val, still, tmp_path / "plain.pt")
    assert not torch.equal(plain.layers[0].cross_attn["z"].attn.in_proj_weight,
                           reranker.layers[0].cross_attn["z"].attn.in_proj_weight)
    with pytest.raises(ValueError, match="11 captions for 12 images"):
        pretrain_matching(tiny, images, captions[:11], config)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        MatchingConfig(batch_size=1)


def test_image_captions_come_from_the_generated_attributes(tiny: Backbone, quick_fashion_root: Path) -> None:
    items = load_attributed_images([quick_fashion_root], "train")[:5]
    bank = _bank(tiny, 5, 0)
    train = TrainingData(bank, torch.tensor([0, 2]), torch.tensor([1, 3]), [], "fashioniq",
                         tuple(item.path for item in items))
    assert image_captions(train, [quick_fashion_root]) == [item.caption for item in items]
    elsewhere = replace(train, image_paths=(*train.image_paths[:4], Path("/nowhere/real.jpg")))
    with pytest.raises(ValueError, match=r"1 of 5 training images have no generated attributes.*/nowhere/real.jpg"):
        image_captions(elsewhere, [quick_fashion_root])
    with pytest.raises(ValueError, match="lists no image paths"):
        image_captions(replace(train, image_paths=()), [quick_fashion_root])


def test_bad_training_inputs(tiny: Backbone) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        RerankerConfig(batch_size=1)
    with pytest.raises(ValueError, match="one N"):
        ImageBank(torch.zeros(3, 4), torch.zeros(2, 5, 4))
    mixed = {"dress": _query_set(tiny), "cirr": _query_set(tiny, "cirr")}
    with pytest.raises(ValueError, match="one benchmark"):
        train_filter(tiny, _training(tiny), mixed, FAST_FILTER)


def test_tiny_configs() -> None:
    tiny_filter, tiny_reranker = FilterConfig.for_tiny(), RerankerConfig.for_tiny(k=20)
    assert tiny_filter.layers is None and tiny_filter.epoch_size is not None and tiny_filter.patience is not None
    assert tiny_reranker.k == 20 and tiny_reranker.keep == "last" and tiny_reranker.patience is None
    assert tiny_reranker.batch_size == 16
    assert (RerankerConfig().batch_size, RerankerConfig().lr, FilterConfig().batch_size) == (16, 2e-5, 512)
    matched = RerankerConfig.for_tiny("cirr", matched=True)
    assert (matched.epochs, matched.epoch_size, matched.hard_negatives) == (6, 1500, 8) == tuple(
        MATCHED_SCHEDULES["cirr"][k] for k in ("epochs", "epoch_size", "hard_negatives"))
    # a benchmark without a matched schedule keeps its own; overrides still win
    assert RerankerConfig.for_tiny("fashioniq", matched=True) == RerankerConfig.for_tiny("fashioniq")
    assert RerankerConfig.for_tiny("cirr", matched=True, epochs=2).epochs == 2


@pytest.mark.slow
def test_matching_pretraining_reads_a_generated_roots_training_images(tiny: Backbone, quick_scenes_root: Path,
                                                                       tmp_path: Path) -> None:
    """The chain notebook 08 runs with ``matching = True``, on a generated CIRR-format root: every training
    image found among the generated attributes, the matcher trained, a re-ranker started from it."""
    from cirlib.data.datasets import load_cirr

    split = load_cirr(quick_scenes_root / "CIRR", "train")
    train = TrainingData.build(tiny, split, cache_dir=tmp_path / "cache", progress=False)
    captions = image_captions(train, [split.root])
    assert len(captions) == len(train.images) == len(train.image_paths) and all(captions)
    attributes = {item.path.name: item.caption for item in load_attributed_images([split.root], "train")}
    assert captions[0] == attributes[train.image_paths[0].name]
    config = MatchingConfig(layers=1, batch_size=8, epochs=1, epoch_size=32, progress=False)
    matcher, history = pretrain_matching(tiny, train.images, captions, config, tmp_path / "matcher.pt")
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    val = {"cirr": QuerySet.build(tiny, load_cirr(split.root, "val"), cache_dir=tmp_path / "cache",
                                  progress=False)}
    filt, _ = train_filter(tiny, train, val, replace(FAST_FILTER, epochs=1), tmp_path / "filter.pt")
    reranker, _ = train_reranker(tiny, filt, train, val, replace(FAST_RERANKER, epochs=1, keep="last", k=None,
                                                                 epoch_size=16), tmp_path / "reranker.pt",
                                 matcher=matcher)
    assert reranker.streams == ("t", "z")
