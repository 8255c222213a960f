"""Protocol-aware evaluation from features, on splits whose scores are set by hand.

The gallery features are (scaled) one-hot vectors, so a query feature *is* its score vector up
to a positive factor: cosine similarity keeps its order, and every rank below is known.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cirlib.core.tensors import row_chunks
from cirlib.data.datasets import CIRSplit, Query
from cirlib.evaluation.metrics import per_aspect
from cirlib.evaluation.protocols import (
    PROTOCOLS,
    benchmark_columns,
    chance_levels,
    evaluate_split,
    per_query_metrics,
    per_query_score_metrics,
    similarity_chunks,
    topk,
)


def make_split(dataset: str, queries: list[Query], gallery: list[str], split: str = "val") -> CIRSplit:
    return CIRSplit(
        dataset=dataset, split=split, root=Path("unused"), queries=queries, gallery=gallery, image_paths={}, n_missing=0
    )


def one_hot_gallery(n: int) -> torch.Tensor:
    return 3.0 * torch.eye(n)  # deliberately not unit norm: evaluate normalises


def score_row(n: int, item: int, rank: int) -> torch.Tensor:
    """Distinct positive scores over n items with ``item`` at 0-based ``rank`` (others by index)."""
    order = [i for i in range(n) if i != item]
    order.insert(rank, item)
    row = torch.empty(n)
    row[order] = torch.arange(n, 0, -1, dtype=torch.float32)
    return row


# ----------------------------------------------------------------------------- FashionIQ
G60 = [f"img{i}" for i in range(60)]


def fashioniq_split() -> tuple[CIRSplit, torch.Tensor]:
    queries = [
        Query(reference="img59", captions=("is red", "has dots"), target="img0", ground_truths=("img0",)),
        Query(reference="img58", captions=("a", "b"), target="img1", ground_truths=("img1",)),
        Query(reference="img57", captions=("a", "b"), target="img2", ground_truths=("img2",)),
        Query(reference="img56", captions=("a", "b"), target="gone", ground_truths=("gone",)),
    ]
    features = torch.stack([score_row(60, 0, 0), score_row(60, 1, 15), score_row(60, 2, 55), score_row(60, 5, 0)])
    return make_split("fashioniq", queries, G60), features


def test_fashioniq_recall_with_a_target_missing_from_the_gallery():
    split, features = fashioniq_split()
    with pytest.warns(UserWarning, match=r"1 of 4 queries .* \(e\.g\. 'gone'\)"):
        results = evaluate_split(split, features, one_hot_gallery(60))
    assert results == {"R@10": 25.0, "R@50": 50.0}


def test_fashioniq_keeps_the_reference_unless_asked():
    queries = [Query(reference="img0", captions=("a", "b"), target="img1", ground_truths=("img1",))]
    split, features = make_split("fashioniq", queries, G60), score_row(60, 1, 1)[None]  # img0 is first
    assert evaluate_split(split, features, one_hot_gallery(60), ks=(1,)) == {"R@1": 0.0}
    assert evaluate_split(split, features, one_hot_gallery(60), ks=(1,), exclude_reference=True) == {"R@1": 100.0}


def test_features_are_normalised_and_any_float_dtype_works():
    split, features = fashioniq_split()
    gallery = one_hot_gallery(60)
    with pytest.warns(UserWarning):
        base = evaluate_split(split, features, gallery)
    scale = torch.tensor([[1.0], [7.0], [0.01], [2.0]])
    with pytest.warns(UserWarning):
        assert evaluate_split(split, (features * scale).half(), gallery.double()) == base


# ----------------------------------------------------------------------------- CIRR
G10 = [f"dev-{i}" for i in range(10)]


def cirr_split() -> tuple[CIRSplit, torch.Tensor]:
    groups = [G10[0:6], [G10[i] for i in (6, 7, 8, 9, 0, 1)]]
    queries = [
        Query(reference="dev-0", captions=("c",), target="dev-3", ground_truths=("dev-3",), group=tuple(groups[0])),
        Query(reference="dev-6", captions=("c",), target="dev-7", ground_truths=("dev-7",), group=tuple(groups[1])),
    ]
    features = torch.tensor(
        [
            # q0: the reference dev-0 is best; non-members dev-9, dev-8 and member dev-1 beat dev-3
            [0.99, 0.85, 0.50, 0.80, 0.70, 0.10, 0.00, 0.20, 0.90, 0.95],
            # q1: only the reference dev-6 beats the target dev-7
            [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.90, 0.80, 0.05, 0.01],
        ]
    )
    return make_split("cirr", queries, G10), features


def test_cirr_protocol_hand_computed():
    split, features = cirr_split()
    results = evaluate_split(split, features, one_hot_gallery(10))
    # global ranks without the reference: 3 and 0; subset ranks without the reference: 1 and 0
    assert results == {
        "R@1": 50.0,
        "R@5": 100.0,
        "R@10": 100.0,
        "R@50": 100.0,
        "Rsubset@1": 50.0,
        "Rsubset@2": 100.0,
        "Rsubset@3": 100.0,
        "avg": 75.0,
        "recall_mean": 600.0 / 7,  # CLIP4Cir's CIRR model-selection score
    }
    # Keeping the reference in both rankings costs q1 its R@1 and its Rsubset@1 (no R@5: no avg).
    kept = evaluate_split(split, features, one_hot_gallery(10), ks=(1, 4), exclude_reference=False)
    assert kept == {"R@1": 0.0, "R@4": 50.0, "Rsubset@1": 0.0, "Rsubset@2": 50.0, "Rsubset@3": 100.0}


def test_chance_levels_hand_computed():
    # CIRR: 10 images, the reference removed -> 9 candidates; sets of six minus the reference -> 5
    levels = chance_levels(cirr_split()[0])
    assert levels["R@1"] == pytest.approx(100 / 9) and levels["R@5"] == pytest.approx(500 / 9)
    assert levels["R@10"] == levels["R@50"] == pytest.approx(100.0)
    assert levels["Rsubset@1"] == pytest.approx(20.0) and levels["Rsubset@3"] == pytest.approx(60.0)
    # FashionIQ keeps the reference: 10 of 60
    assert chance_levels(fashioniq_split()[0]) == pytest.approx({"R@10": 100 / 6, "R@50": 500 / 6})


def test_chunked_evaluation_matches_one_shot(monkeypatch):
    split, features = cirr_split()
    one_shot = per_query_metrics(split, features, one_hot_gallery(10))
    monkeypatch.setattr(row_chunks, "__defaults__", (1,))  # one query per chunk, one row per comparison
    chunked = per_query_metrics(split, features, one_hot_gallery(10))
    assert one_shot.keys() == chunked.keys()
    assert all(torch.equal(one_shot[name], chunked[name]) for name in one_shot)
    assert one_shot["R@1"].tolist() == [0.0, 100.0]


# ----------------------------------------------------------------------------- CIRCO
GALLERY9 = [*"abcdefgh", "ref"]


def circo_split() -> tuple[CIRSplit, torch.Tensor]:
    def query(target: str, gts: str | list[str], aspects: tuple[str, ...], reference: str = "ref") -> Query:
        return Query(
            reference=reference,
            captions=("c",),
            target=target,
            ground_truths=tuple(gts),
            shared_concept="thing",
            semantic_aspects=aspects,
        )

    queries = [
        query("a", "acf", ("addition",)),  # GTs at positions 1, 3, 6
        query("b", ["b", "c", "e", "g", "h", "zz"], ("negation", "addition")),  # 6 GTs, "zz" not in the gallery
        query("h", "h", ("viewpoint",)),  # only GT at position 8
        query("b", "b", (), reference="a"),  # the reference "a" is first and kept: b is second
    ]
    features = torch.linspace(0.9, 0.1, 9).repeat(4, 1)  # a > b > ... > h > ref for every query
    return make_split("circo", queries, GALLERY9), features


# AP@K per query from the GT positions above: sum_{p<=K} (#GT up to p)/p / min(K, #GT)
CIRCO_AP = {
    5: [(1 + 2 / 3) / 3, (1 / 2 + 2 / 3 + 3 / 5) / 5, 0.0, 1 / 2],
    10: [(1 + 2 / 3 + 3 / 6) / 3, (1 / 2 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 8) / 6, 1 / 8, 1 / 2],
    25: [(1 + 2 / 3 + 3 / 6) / 3, (1 / 2 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 8) / 6, 1 / 8, 1 / 2],
}


def test_circo_protocol_hand_computed():
    split, features = circo_split()
    results = evaluate_split(split, features, one_hot_gallery(9), ks=(5, 10, 25))
    expected = {f"mAP@{k}": 100 * sum(aps) / 4 for k, aps in CIRCO_AP.items()}
    # CIRCO's recall uses the annotated target only: ranks 0, 1, 7, 1
    expected |= {"R@5": 75.0, "R@10": 100.0, "R@25": 100.0}
    ap10 = CIRCO_AP[10]
    expected |= {
        "mAP@10/addition": 100 * (ap10[0] + ap10[1]) / 2,
        "mAP@10/negation": 100 * ap10[1],
        "mAP@10/viewpoint": 100 * ap10[2],
    }
    assert results == pytest.approx(expected, abs=1e-9)
    assert list(results) == list(expected)  # mAP, then recall, then aspects in the official order


def test_circo_ground_truth_padding_and_dead_links():
    """SEARLE pads GT lists with "" for batching: padding is not a GT and not in min(K, #GT). A GT
    that was annotated but whose image is missing still counts in the denominator (official script)."""
    split, features = circo_split()
    padded = [replace(q, ground_truths=(*q.ground_truths, "", "")) for q in split.queries]
    split_padded = make_split("circo", padded, GALLERY9)
    plain = per_query_metrics(split, features, one_hot_gallery(9), ks=(5, 10))
    assert per_query_metrics(split_padded, features, one_hot_gallery(9), ks=(5, 10))["mAP@10"].tolist() == (
        plain["mAP@10"].tolist())
    # Query 0 has GTs a, c, f on disk; with 5 annotated (two dead links) AP@10 divides by 5, not 3.
    dead = [replace(split.queries[0], n_ground_truths=5), *split.queries[1:]]
    lowered = per_query_metrics(make_split("circo", dead, GALLERY9), features, one_hot_gallery(9), ks=(10,))
    assert lowered["mAP@10"][0].item() == pytest.approx(100 * (1 + 2 / 3 + 3 / 6) / 5)
    assert lowered["mAP@10"][1:].tolist() == plain["mAP@10"][1:].tolist()


def test_circo_reference_exclusion_lifts_ground_truths_and_targets():
    def query(target: str, gts: tuple[str, ...]) -> Query:
        return Query(reference="a", captions=("c",), target=target, ground_truths=gts, shared_concept="thing")

    # The reference "a" is first but never a ground truth: removing it lifts every GT one place.
    split = make_split("circo", [query("b", ("b",)), query("d", ("b", "d"))], [*"abcdefgh"])
    features = torch.linspace(0.8, 0.1, 8).repeat(2, 1)  # a > b > ... > h
    kept = evaluate_split(split, features, one_hot_gallery(8), ks=(1, 2))  # the official protocol
    removed = evaluate_split(split, features, one_hot_gallery(8), ks=(1, 2), exclude_reference=True)
    assert kept == pytest.approx({"mAP@1": 0.0, "mAP@2": (50 + 25) / 2, "R@1": 0.0, "R@2": 50.0})
    assert removed == pytest.approx({"mAP@1": 100.0, "mAP@2": (100 + 50) / 2, "R@1": 50.0, "R@2": 50.0})
    assert list(kept) == list(removed) == ["mAP@1", "mAP@2", "R@1", "R@2"]


def test_circo_defaults_and_reference_exclusion():
    split, features = circo_split()
    results = evaluate_split(split, features, one_hot_gallery(9))
    assert [name for name in results if "/" not in name] == [
        *(f"mAP@{k}" for k in PROTOCOLS["circo"].ks),
        *(f"R@{k}" for k in PROTOCOLS["circo"].ks),
    ]
    assert not PROTOCOLS["circo"].exclude_reference, "CIRCO's official protocol keeps the reference"
    removed = per_query_metrics(split, features, one_hot_gallery(9), ks=(5,), exclude_reference=True)
    assert removed["mAP@5"][3].item() == 100.0  # without its reference a, b comes first


def test_per_aspect_table_of_per_query_values():
    split, features = circo_split()
    per_query = per_query_metrics(split, features, one_hot_gallery(9))
    aspects = [q.semantic_aspects for q in split.queries]
    table = per_aspect({name: per_query[name] for name in ("mAP@10", "R@5")}, aspects)
    assert list(table.index) == ["addition", "negation", "viewpoint"]
    assert table["queries"].tolist() == [2, 1, 1]
    assert table.loc["viewpoint", "mAP@10"] == pytest.approx(100 / 8)
    assert table["R@5"].tolist() == [100.0, 100.0, 0.0]
    cirr, cirr_features = cirr_split()
    assert not [name for name in evaluate_split(cirr, cirr_features, one_hot_gallery(10)) if "/" in name]


def test_benchmark_columns_keep_benchmark_level_metrics():
    results = {"R@10": 1.0, "average": 2.0, "dress/R@10": 3.0, "mAP@10/addition": 4.0}
    assert benchmark_columns("fashioniq", results) == {"fashioniq R@10": 1.0, "fashioniq average": 2.0}
    assert benchmark_columns("cirr", {}) == {}


@pytest.mark.parametrize("make", [fashioniq_split, cirr_split, circo_split])
def test_scores_given_directly_are_scored_like_features(make):
    """Any positive multiple of the score rows ranks alike, so the hand-set rows scored directly give
    the metrics of the same rows used as query features against the one-hot gallery."""
    split, features = make()
    gone = pytest.warns(UserWarning, match="not in the gallery") if split.dataset == "fashioniq" else nullcontext()
    with gone:  # FashionIQ's query 3 has a target outside the gallery: both paths warn and count a miss
        expected = per_query_metrics(split, features, one_hot_gallery(len(split.gallery)))
        got = per_query_score_metrics(split, 2.0 * features)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_scores_must_have_a_row_per_query_and_a_column_per_image():
    split, features = cirr_split()
    with pytest.raises(ValueError, match=r"scores have shape \(2, 9\); expected \[2, 10\]"):
        per_query_score_metrics(split, features[:, :9])
    test_split = make_split("cirr", [Query(reference="dev-0", captions=("c",), group=tuple(G10[:6]))], G10, "test1")
    with pytest.raises(ValueError, match="official evaluation server"):
        per_query_score_metrics(test_split, torch.ones(1, 10))


# ----------------------------------------------------------------------------- failure modes
def test_test_split_must_go_to_the_official_server():
    queries = [Query(reference="dev-0", captions=("c",), group=tuple(G10[:6]))]
    split = make_split("cirr", queries, G10, split="test1")
    with pytest.raises(ValueError, match="cirr/test1 .* official evaluation server"):
        evaluate_split(split, torch.ones(1, 10), one_hot_gallery(10))


@pytest.mark.parametrize(
    ("queries", "gallery", "message"),
    [
        (torch.ones(3, 10), torch.eye(10), r"query_features has shape \(3, 10\); expected \[2, D\]"),
        (torch.ones(2, 10), torch.eye(9), r"gallery_features has shape \(9, 9\); expected \[10, D\]"),
        (torch.ones(2, 10), torch.ones(10, 4), "dimension 10 but gallery_features 4"),
    ],
)
def test_misaligned_features_are_rejected(queries, gallery, message):
    split, _ = cirr_split()
    with pytest.raises(ValueError, match=message):
        evaluate_split(split, queries, gallery)


def test_unknown_dataset_and_empty_split():
    split, features = cirr_split()
    split.dataset = "coco"
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        evaluate_split(split, features, one_hot_gallery(10))
    with pytest.raises(ValueError, match="no queries"):
        evaluate_split(make_split("cirr", [], G10), torch.ones(0, 10), one_hot_gallery(10))


# ----------------------------------------------------------------------------- topk
def test_topk_order_ties_and_exclusion():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.4, 0.3, 0.2, 0.1]])
    values, indices = topk(scores, 3)
    assert indices.tolist() == [[3, 1, 2], [0, 1, 2]]  # the 0.5 tie keeps gallery order
    torch.testing.assert_close(values, torch.tensor([[0.9, 0.5, 0.5], [0.4, 0.3, 0.2]]))
    _, indices = topk(scores, 2, exclude_idx=[3, 0])
    assert indices.tolist() == [[1, 2], [1, 2]]
    values, indices = topk(scores, 10, exclude_idx=[[3, 1], [-1, -1]])  # k clipped, excluded last
    assert indices.tolist() == [[2, 0, 1, 3], [0, 1, 2, 3]]
    assert values[0, 2:].tolist() == [float("-inf")] * 2


def test_topk_chunked_matches_one_shot(monkeypatch):
    scores = torch.randint(0, 4, (25, 12), generator=torch.Generator().manual_seed(0)).float()
    exclude = torch.arange(25) % 12
    one_shot = topk(scores, 5, exclude)
    monkeypatch.setattr(row_chunks, "__defaults__", (30,))
    chunked = topk(scores, 5, exclude)
    assert all(torch.equal(a, b) for a, b in zip(one_shot, chunked))
    with pytest.raises(ValueError, match="at least 1"):
        topk(scores, 0)


def test_similarity_chunks_cover_the_score_matrix(monkeypatch):
    queries, gallery = torch.randn(7, 4), torch.randn(5, 4)
    monkeypatch.setattr(row_chunks, "__defaults__", (10,))  # two rows of five scores per chunk
    chunks = list(similarity_chunks(queries, gallery))
    assert [(rows.start, rows.stop) for rows, _ in chunks] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    torch.testing.assert_close(torch.cat([scores for _, scores in chunks]), queries @ gallery.T)
