"""The search engine ranks as the evaluation protocols do, offers only the methods on disk, and
refuses bad input clearly (cirlib.search.engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cirlib.core import artifacts
from cirlib.core.device import grad_scaler
from cirlib.core.training import TrainingLoop
from cirlib.data.datasets import ImageLoadError, query_text
from cirlib.evaluation.analysis import top_k_names
from cirlib.evaluation.metrics import indices_of, name_index
from cirlib.evaluation.protocols import per_query_metrics
from cirlib.methods import isearle, reranking
from cirlib.models.backbone import save_backbone
from cirlib.models.combiner import Combiner, apply_combine, combine_sum
from cirlib.models.features import encode_split
from cirlib.models.multimodal import CandidateFilter, DualEncoderReranker
from cirlib.models.phi import Phi
from cirlib.search.engine import (
    CombineScorer,
    PhiScorer,
    RerankScorer,
    Retriever,
    available_methods,
)

SPLITS = ("fashioniq/dress", "cirr", "circo")


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


@pytest.fixture(scope="module")
def combiner(vit) -> Combiner:
    return _seeded(lambda: Combiner(vit.embed_dim, 32, 64))


@pytest.fixture(scope="module")
def phi(vit) -> Phi:
    return _seeded(lambda: Phi.for_dims(vit.embed_dim, vit.token_embedding.embedding_dim))


@pytest.fixture(scope="module")
def two_stage(vit) -> tuple[CandidateFilter, DualEncoderReranker]:
    return (_seeded(lambda: CandidateFilter.from_backbone(vit, layers=1)),
            _seeded(lambda: DualEncoderReranker.from_backbone(vit, layers=2)))


def _names(hits) -> list[str]:
    return [h.name for h in hits]


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize("method", ["sum", "combiner", "isearle"])
def test_benchmark_queries_rank_as_the_protocol(name, method, fixture_splits, vit, combiner, phi, tmp_path) -> None:
    split = fixture_splits[name]
    feats = encode_split(vit, split, cache_dir=tmp_path, progress=False)
    if method == "isearle":
        scorer, queries = PhiScorer(phi), isearle.phi_query_features(vit, phi, split, feats)
    else:
        combine = combine_sum if method == "sum" else combiner
        scorer, queries = CombineScorer(combine), apply_combine(combine, feats.reference, feats.text)
    retriever = Retriever(split, vit, scorer, method, cache_dir=tmp_path)
    every = list(range(len(split.queries)))

    expected = top_k_names(split, queries, feats.gallery, k=4)
    assert [_names(h) for h in retriever.search_queries(every, k=4)] == expected
    assert _names(retriever.search_query(1, k=4)) == expected[1]
    assert top_k_names(split, retriever.query_scores(), torch.eye(len(split.gallery)), k=4) == expected
    ranks = retriever.target_ranks()
    metrics = per_query_metrics(split, queries, feats.gallery)
    k = 5 if name == "circo" else 10
    assert torch.equal((ranks >= 1) & (ranks <= k), metrics[f"R@{k}"] > 0)


def test_reranking_ranks_as_the_two_stage_pipeline(fixture_splits, vit, two_stage, tmp_path) -> None:
    filt, reranker = two_stage
    for name in ("fashioniq/dress", "cirr"):
        split = fixture_splits[name]
        k = len(split.gallery) - 2
        retriever = Retriever(split, vit, RerankScorer(filt, reranker, k), "reranking", cache_dir=tmp_path)
        queries = reranking.QuerySet.build(vit, split, cache_dir=tmp_path, progress=False)
        first = reranking.filter_stage(filt, queries)
        candidates = first.candidates(k, queries.exclude)
        scores = reranking.rerank(reranker, filt, queries, candidates, progress=False)
        order, gallery = reranking.ranking_features(first, candidates, scores)
        every = list(range(len(split.queries)))
        assert [_names(h) for h in retriever.search_queries(every, k=3)] == top_k_names(split, order, gallery, k=3)
        # a free-text search from a gallery reference is the same ranking as its benchmark query
        query = split.queries[0]
        free = retriever.search(query.reference, query_text(query), k=3)
        assert _names(free) == _names(retriever.search_query(0, k=3))
        # a re-ranked candidate shows the re-ranker's score, not its position
        assert free[0].score == pytest.approx(float(scores[0].max()), abs=1e-4)


def test_reranking_caps_k_at_what_the_protocol_can_hand_over(fixture_splits, vit, two_stage, tmp_path) -> None:
    filt, reranker = two_stage
    for name in ("cirr", "circo"):  # CIRR drops the reference from the ranking, CIRCO keeps it
        split = fixture_splits[name]
        retriever = Retriever(split, vit, RerankScorer(filt, reranker, 10**6), "reranking", cache_dir=tmp_path)
        queries = reranking.QuerySet.build(vit, split, cache_dir=tmp_path, progress=False)
        assert queries.max_candidates == len(split.gallery) - (name == "cirr")
        first = reranking.filter_stage(filt, queries)
        candidates = first.candidates(queries.max_candidates, queries.exclude)
        order, gallery = reranking.ranking_features(
            first, candidates, reranking.rerank(reranker, filt, queries, candidates, progress=False))
        every = list(range(len(split.queries)))
        assert [_names(h) for h in retriever.search_queries(every, k=3)] == top_k_names(split, order, gallery, k=3)


def test_free_text_search_and_references(fixture_splits, vit, tmp_path) -> None:
    split = fixture_splits["cirr"]
    retriever = Retriever(split, vit, CombineScorer(combine_sum), cache_dir=tmp_path)
    query = split.queries[0]
    ref = split.gallery.index(query.reference)
    ranking = retriever.ranking(ref, query_text(query))
    expected = retriever.split_features  # the protocol's own features of the query
    combined = apply_combine(combine_sum, expected.reference[:1], expected.text[:1])
    cos = torch.nn.functional.normalize(combined, dim=-1) @ torch.nn.functional.normalize(expected.gallery, dim=-1).T
    torch.testing.assert_close(ranking.order, cos[0], atol=1e-5, rtol=0)
    # CIRR's protocol leaves the reference out; an explicit exclude replaces that default
    hits = retriever.search(ref, "a dog", k=100)
    assert ref not in [h.index for h in hits] and len(hits) == len(split.gallery) - 1
    assert ref in [h.index for h in retriever.search(ref, "a dog", k=100, exclude=[])]
    assert [h.index for h in retriever.search(ref, "a dog", k=100, exclude=[0, 1])][:1] != [0]
    # every form of a reference resolves to the same image
    by_name = retriever.search(query.reference, "a dog", k=3)
    by_path = retriever.search(split.image_paths[query.reference], "a dog", k=3)
    assert _names(by_name) == _names(by_path) == _names(retriever.search(ref, "a dog", k=3))
    # a decoded image (an upload) is encoded as the cached gallery row it copies
    pil = Image.open(split.image_paths[query.reference])
    torch.testing.assert_close(retriever.encode_image(pil), retriever.gallery_features[ref], atol=1e-4, rtol=1e-4)
    # ranks agree with the hits
    for position, hit in enumerate(ranking.hits(5), 1):
        assert ranking.rank(hit.index) == position


def test_bad_input_is_refused_clearly(fixture_splits, vit, tmp_path) -> None:
    retriever = Retriever(fixture_splits["fashioniq/dress"], vit, CombineScorer(combine_sum), cache_dir=tmp_path)
    for caption in ("", "   "):
        with pytest.raises(ValueError, match="caption is empty"):
            retriever.search(0, caption)
    with pytest.raises(ImageLoadError, match="does not exist"):
        retriever.search(tmp_path / "missing.png", "is red")
    with pytest.raises(IndexError, match="out of range"):
        retriever.search(len(retriever.gallery_names), "is red")
    with pytest.raises(TypeError, match="gallery index"):
        retriever.search(1.5, "is red")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(ImageLoadError, match="cannot decode"):
        retriever.search(not_an_image, "is red")


# --------------------------------------------------------------------------------------------
# The course's artifacts: what is offered, and what for_method loads
# --------------------------------------------------------------------------------------------


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A quick-mode course on real-layout fixture roots with its own project root (empty data/)."""
    from real_layout import real_layout_roots

    from cirlib.course import Course
    from cirlib.data.benchmarks import BenchmarkRoots

    monkeypatch.setenv("CIRLIB_ROOT", str(tmp_path / "project"))
    (tmp_path / "project").mkdir()
    roots = real_layout_roots(tmp_path / "datasets")
    return Course(True, 0, BenchmarkRoots(roots["fashioniq_root"], roots["cirr_root"], roots["circo_root"]),
                  generated=False)


def _finished(module: torch.nn.Module, name: str, path: Path, select: bool) -> None:
    """Write ``module`` as a finished TrainingLoop checkpoint, as the trainers leave them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loop = TrainingLoop({name: module}, torch.optim.SGD(module.parameters(), lr=0.0), grad_scaler(torch.device("cpu")),
                        path, "test", epochs=1, seed=0, main_metric="score" if select else None, progress=False,
                        meta={"hparams": module.hparams})
    loop.run(lambda _epoch: 0.0, (lambda: {"score": 1.0}) if select else None)


def test_only_methods_on_disk_are_offered(course) -> None:
    assert list(available_methods(course, "fashioniq")) == ["zero-shot-sum"]
    assert list(available_methods(course, "circo")) == ["zero-shot-sum"]
    stage1 = artifacts.stage1_dir(True, "fashioniq", "both") / "backbone.safetensors"
    stage1.parent.mkdir(parents=True)
    stage1.touch()
    assert list(available_methods(course, "fashioniq")) == ["zero-shot-sum", "finetuned-sum"]
    assert list(available_methods(course, "cirr")) == ["zero-shot-sum"]  # fine-tuned on fashioniq only
    combiner = artifacts.combiner_checkpoint(True, "fashioniq", "both")
    combiner.parent.mkdir(parents=True)
    combiner.touch()
    artifacts.filter_checkpoint(True, "fashioniq").parent.mkdir(parents=True)
    artifacts.filter_checkpoint(True, "fashioniq").touch()
    assert "reranking" not in available_methods(course, "fashioniq")  # the re-ranker is still missing
    artifacts.reranker_checkpoint(True, "fashioniq").touch()
    artifacts.phi_checkpoint(True, "fashioniq+cirr").parent.mkdir(parents=True)
    artifacts.phi_checkpoint(True, "fashioniq+cirr").touch()
    assert list(available_methods(course, "fashioniq")) == [
        "zero-shot-sum", "finetuned-sum", "combiner", "isearle", "reranking"]
    assert list(available_methods(course, "circo")) == ["zero-shot-sum", "isearle"]  # zero-shot methods only
    with pytest.raises(ValueError, match="unknown benchmark"):
        available_methods(course, "coco")


@pytest.mark.filterwarnings("ignore::cirlib.data.datasets.MissingImagesWarning")  # the fixtures' dead links
def test_for_method_loads_the_course_artifacts(course, vit, phi, two_stage) -> None:
    save_backbone(vit, artifacts.pretrained_checkpoint(True), {"test": True})
    with pytest.raises(ValueError, match="not available.*artifacts are not on disk"):
        Retriever.for_method(course, "cirr", "cirr", "isearle")
    with pytest.raises(ValueError, match="unknown method"):
        Retriever.for_method(course, "cirr", "cirr", "magic")
    with pytest.raises(ValueError, match="not a cirr split"):
        Retriever.for_method(course, "cirr", "circo", "zero-shot-sum")

    _finished(phi, "phi", artifacts.phi_checkpoint(True, "fashioniq+cirr"), select=False)
    retriever = Retriever.for_method(course, "circo", "circo", "isearle")
    loaded = retriever.scorer.phi
    assert not loaded.training
    for a, b in zip(loaded.state_dict().values(), phi.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert retriever.gallery_names == course.val_splits["circo"].gallery

    filt, reranker = two_stage
    _finished(filt, "filter", artifacts.filter_checkpoint(True, "cirr"), select=True)
    _finished(reranker, "reranker", artifacts.reranker_checkpoint(True, "cirr"), select=True)
    retriever = Retriever.for_method(course, "cirr", "cirr", "reranking")
    assert retriever.scorer.k == reranking.PAPER_K["cirr"]
    for mine, theirs in ((retriever.scorer.filt, filt), (retriever.scorer.reranker, reranker)):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a.cpu(), b.cpu())
    assert retriever.search(0, "a red bag", k=3)

    split = course.val_splits["fashioniq/dress"]
    zero_shot = Retriever.for_method(course, "fashioniq", "fashioniq/dress", "zero-shot-sum")
    names = name_index(split.gallery)
    assert indices_of([split.queries[0].target], names).tolist() != [-1]
    assert zero_shot.search_query(0, k=2)
