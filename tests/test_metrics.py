"""Metrics on small score matrices whose ranks, recalls and APs are worked out by hand.

The benchmark protocols built on them (CIRR, CIRCO) are checked on hand-made splits in
``test_evaluate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from cirlib.core.tensors import row_chunks
from cirlib.evaluation.metrics import (
    MISS_RANK,
    IndexLike,
    average_precision,
    fashioniq_average,
    group_members,
    index_lists,
    indices_of,
    name_index,
    per_aspect,
    per_query_hits,
    rank_of,
    subset_rank,
    summarise,
    with_cirr_average,
)

GALLERY8 = list("abcdefgh")
# One row per query; gallery a..h always scored in that order (a best), so positions are obvious.
DESCENDING8 = torch.linspace(0.8, 0.1, 8)


def recall_at_k(
    scores: torch.Tensor, target: IndexLike, ks: Sequence[int], exclude: IndexLike | None = None
) -> dict[str, float]:
    """Recall@K in percent, as the protocols compute it: the mean of the per-query hits."""
    return summarise(per_query_hits(rank_of(scores, target, exclude), ks))


# ----------------------------------------------------------------------------- rank_of / recall
def test_rank_of_counts_better_items():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.3, 0.4]])
    assert rank_of(scores, torch.tensor([2, 0])).tolist() == [1, 3]
    assert rank_of(scores, [0, 1]).tolist() == [0, 0]


def test_ties_are_pessimistic():
    scores = torch.tensor([[0.5, 0.5, 0.2, 0.5]])
    # Every other item at the target's score goes first, whatever the gallery order.
    assert [rank_of(scores, [t]).item() for t in range(4)] == [2, 2, 3, 2]
    collapsed = torch.full((1, 5), 0.3)  # a collapsed model: all scores equal
    assert rank_of(collapsed, [0]).item() == 4
    assert recall_at_k(collapsed, [0], ks=(1, 4, 5)) == {"R@1": 0.0, "R@4": 0.0, "R@5": 100.0}


def test_missing_target_is_a_miss_even_beyond_the_gallery_size():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    ranks = rank_of(scores, [-1, 0])
    assert ranks.tolist() == [MISS_RANK, 0]
    assert recall_at_k(scores, [-1, 0], ks=(1, 1000)) == {"R@1": 50.0, "R@1000": 50.0}


def test_exclusion_removes_items_from_the_ranking():
    scores = torch.tensor([[0.9, 0.8, 0.1]])
    assert rank_of(scores, [1]).item() == 1
    assert rank_of(scores, [1], exclude_idx=[0]).item() == 0
    assert rank_of(scores, [2], exclude_idx=[[0, 1]]).item() == 0
    assert rank_of(scores, [2], exclude_idx=[[0, -1]]).item() == 1  # -1 pads, excludes nothing
    assert rank_of(scores, [2], exclude_idx=[[0, 0]]).item() == 1  # a repeated index is excluded once
    assert rank_of(scores, [1], exclude_idx=[1]).item() == MISS_RANK  # an excluded target cannot be found
    assert torch.equal(scores, torch.tensor([[0.9, 0.8, 0.1]]))  # input left untouched


def test_recall_at_k_percentages():
    scores = DESCENDING8.repeat(4, 1)
    # targets at ranks 0, 1, 4, 7
    assert recall_at_k(scores, [0, 1, 4, 7], ks=(1, 2, 5, 8)) == {
        "R@1": 25.0,
        "R@2": 50.0,
        "R@5": 75.0,
        "R@8": 100.0,
    }


@pytest.mark.parametrize(
    ("scores", "target", "message"),
    [
        (torch.tensor([[0.1, float("nan")]]), [0], "NaN"),
        (torch.tensor([0.1, 0.2]), [0], "matrix"),
        (torch.tensor([[1, 2]]), [0], "float"),
        (torch.tensor([[0.1, 0.2]]), [2], r"\[0, 2\)"),
        (torch.tensor([[0.1, 0.2]]), [-2], r"\[0, 2\)"),
        (torch.tensor([[0.1, 0.2]]), [0, 1], "one entry per query"),
    ],
)
def test_rank_of_rejects_bad_input(scores, target, message):
    with pytest.raises(ValueError, match=message):
        rank_of(scores, target)


def test_ks_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(torch.tensor([[0.1, 0.2]]), [0], ks=(0, 5))
    with pytest.raises(ValueError, match="positive"):
        average_precision(torch.tensor([[0.1, 0.2]]), [[0]], ks=())


def test_summaries_and_cirr_average():
    per_query = per_query_hits(torch.tensor([0, 3, MISS_RANK, 1]), (1, 5), prefix="Rsubset")
    assert {k: v.tolist() for k, v in per_query.items()} == {
        "Rsubset@1": [100.0, 0.0, 0.0, 0.0],
        "Rsubset@5": [100.0, 100.0, 0.0, 100.0],
    }
    assert summarise(per_query) == {"Rsubset@1": 25.0, "Rsubset@5": 75.0}
    assert with_cirr_average({"R@5": 60.0, "Rsubset@1": 30.0}) == {"R@5": 60.0, "Rsubset@1": 30.0, "avg": 45.0}
    assert with_cirr_average({"R@10": 60.0}) == {"R@10": 60.0}  # FashionIQ, CIRCO: no CIRR average
    seven = {"R@1": 10.0, "R@5": 30.0, "R@10": 40.0, "R@50": 90.0, "Rsubset@1": 20.0, "Rsubset@2": 50.0,
             "Rsubset@3": 70.0}
    out = with_cirr_average(dict(seven))
    assert out["recall_mean"] == pytest.approx(310.0 / 7) and out["avg"] == 25.0
    with pytest.raises(ValueError, match="zero queries"):
        summarise({"R@1": torch.zeros(0)})


# ----------------------------------------------------------------------------- CIRR
G10 = [f"g{i}" for i in range(10)]
CIRR_SCORES = torch.tensor(
    [
        # q0: reference g0 (best overall), non-members g9, g8 beat the target g3 globally
        [0.99, 0.85, 0.50, 0.80, 0.70, 0.10, 0.00, 0.20, 0.90, 0.95],
        # q1: reference g6 beats target g7; everything else is below both
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.90, 0.80, 0.05, 0.01],
    ]
)
CIRR_REFS = ["g0", "g6"]
CIRR_TARGETS = ["g3", "g7"]
CIRR_GROUPS = [["g0", "g1", "g2", "g3", "g4", "g5"], ["g6", "g7", "g8", "g9", "g0", "g1"]]


def test_global_and_subset_ranks_without_the_reference():
    index = name_index(G10)
    target, reference = indices_of(CIRR_TARGETS, index), indices_of(CIRR_REFS, index)
    groups = index_lists(CIRR_GROUPS, index)
    assert groups.shape == (2, 6)
    # Global ranks: q0's target g3 is below g0 (the reference), g9, g8 and g1; q1's below g6 only.
    assert rank_of(CIRR_SCORES, target).tolist() == [4, 1]
    assert rank_of(CIRR_SCORES, target, reference).tolist() == [3, 0]
    # q0: members minus g0 are g1 .85 > g3 .80 > g4 .70 > g2 .50 > g5 .10 -> rank 1.
    # q1: g6 (the reference) is the only member above g7; removing it makes g7 first.
    assert subset_rank(CIRR_SCORES, target, groups, reference).tolist() == [1, 0]
    assert subset_rank(CIRR_SCORES, target, groups).tolist() == [2, 1]
    # A target outside its group or outside the gallery is a subset miss.
    outside = index_lists([["g0", "g1", "g2", "g4", "g5", "g6"], CIRR_GROUPS[1]], index)
    assert subset_rank(CIRR_SCORES, torch.tensor([3, -1]), outside, reference).tolist() == [MISS_RANK] * 2


# ----------------------------------------------------------------------------- CIRCO mAP@K
MAP_GTS = [
    ["a", "c", "f"],  # GTs at positions 1, 3, 6
    ["b", "c", "e", "g", "h", "zz"],  # #GT = 6 > K; "zz" is not in the gallery but still counts
    ["h"],  # the only GT sits at position 8, beyond K = 2 and 5
]
# Position p (1-based) of each GT; AP@K = sum_{p<=K} (#GT up to p)/p / min(K, #GT).
MAP_EXPECTED = {
    2: [1 / 2, (1 / 2) / 2, 0.0],
    5: [(1 + 2 / 3) / 3, (1 / 2 + 2 / 3 + 3 / 5) / 5, 0.0],
    10: [(1 + 2 / 3 + 3 / 6) / 3, (1 / 2 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 8) / 6, 1 / 8],
}


def test_average_precision_hand_computed():
    scores = DESCENDING8.repeat(3, 1)
    gts = index_lists(MAP_GTS, name_index(GALLERY8))
    per_query = average_precision(scores, gts, (2, 5, 10), [len(set(names)) for names in MAP_GTS])
    expected = torch.tensor([[MAP_EXPECTED[k][q] for k in (2, 5, 10)] for q in range(3)], dtype=torch.float64)
    torch.testing.assert_close(per_query, expected)
    # Without the annotated counts, "zz" (not in the gallery) no longer counts for query 1.
    listed = average_precision(scores, gts, (10,))
    assert listed[1].item() == pytest.approx((1 / 2 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 8) / 5)


def test_map_exclusion_lifts_every_ground_truth():
    scores = DESCENDING8.repeat(2, 1)
    gts = [[1, -1], [1, 3]]  # "b"; "b" and "d"
    # The reference "a" is first but never a ground truth: removing it lifts every GT one place.
    kept = average_precision(scores, gts, ks=(1, 2))
    removed = average_precision(scores, gts, ks=(1, 2), exclude_idx=[0, 0])
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5], [0.0, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(removed, torch.tensor([[1.0, 1.0], [1.0, 0.5]], dtype=torch.float64))


def test_map_ties_put_non_ground_truths_first():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    # GTs 0 and 1 tie with non-GT 2: pessimistic order 2, {0, 1}, 3 -> precisions 1/2 and 2/3.
    ap = average_precision(scores, [[0, 1]], ks=(3, 1))
    assert ap.tolist()[0] == pytest.approx([(1 / 2 + 2 / 3) / 2, 0.0])
    assert average_precision(torch.full((1, 4), 0.2), [[3]], ks=(4,)).item() == pytest.approx(1 / 4)


def test_map_edge_cases():
    scores = DESCENDING8[None]
    assert average_precision(scores, [[-1]], ks=(5,)).item() == 0.0  # no GT in the gallery
    assert average_precision(scores, [[-1]], ks=(5,), n_gt=[0]).item() == 0.0  # no GT annotated
    assert average_precision(scores, [[0]], ks=(5,), exclude_idx=[0]).item() == 0.0  # GT excluded
    with pytest.raises(ValueError, match="one count per query"):
        average_precision(scores, [[0]], ks=(5,), n_gt=[1, 2])


def _oracle_ap(row: torch.Tensor, gts: set[int], excluded: int, k: int) -> float:
    """The official CIRCO definition on an explicitly sorted list (scores must be distinct)."""
    ranking = [g for g in torch.argsort(row, descending=True).tolist() if g != excluded]
    hits, total = 0, 0.0
    for position, item in enumerate(ranking[:k], start=1):
        if item in gts:
            hits += 1
            total += hits / position
    return total / min(k, len(gts))


def test_average_precision_matches_sorted_list_definition():
    gen = torch.Generator().manual_seed(0)
    n_queries, n_gallery = 40, 60
    scores = torch.rand(n_queries, n_gallery, generator=gen, dtype=torch.float64)
    gts = [torch.randperm(n_gallery, generator=gen)[: 1 + q % 7].tolist() for q in range(n_queries)]
    excluded = torch.randint(0, n_gallery, (n_queries,), generator=gen)
    padded = index_lists([[str(g) for g in row] for row in gts], {str(i): i for i in range(n_gallery)})
    ks = (1, 5, 10, 25, 50)
    ap = average_precision(scores, padded, ks, n_gt=[len(g) for g in gts], exclude_idx=excluded)
    expected = [[_oracle_ap(scores[q], set(gts[q]), int(excluded[q]), k) for k in ks] for q in range(n_queries)]
    torch.testing.assert_close(ap, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ap.max() > 0.5  # the comparison is not all zeros


# ----------------------------------------------------------------------------- chunking, devices
def _everything(scores: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    n_queries, n_gallery = scores.shape
    target = torch.randint(-1, n_gallery, (n_queries,), generator=gen)
    exclude = torch.randint(-1, n_gallery, (n_queries, 2), generator=gen)
    group = torch.randint(-1, n_gallery, (n_queries, 6), generator=gen)
    gts = torch.stack([torch.randperm(n_gallery, generator=gen)[:4] for _ in range(n_queries)])
    return [
        rank_of(scores, target, exclude),
        subset_rank(scores, target, group, exclude),
        average_precision(scores, gts, (1, 3, 10), exclude_idx=exclude),
    ]


def test_chunking_gives_identical_results(monkeypatch):
    scores = torch.randint(0, 5, (30, 20), generator=torch.Generator().manual_seed(1)).float()  # many ties
    one_shot = _everything(scores, torch.Generator().manual_seed(2))
    for budget in (1, 37, 500):  # one row per chunk, a few rows, most rows
        monkeypatch.setattr(row_chunks, "__defaults__", (budget,))  # every caller's chunk budget
        chunked = _everything(scores, torch.Generator().manual_seed(2))
        assert all(torch.equal(a, b) for a, b in zip(one_shot, chunked))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_agree():
    scores = torch.randint(0, 5, (30, 20), generator=torch.Generator().manual_seed(1)).float()
    cpu = _everything(scores, torch.Generator().manual_seed(2))
    gpu = _everything(scores.cuda(), torch.Generator().manual_seed(2))
    assert all(g.is_cuda for g in gpu)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


# ----------------------------------------------------------------------------- names, tables
def test_name_helpers():
    index = name_index(["x", "y", "z"])
    assert indices_of(["z", "nope", None], index).tolist() == [2, -1, -1]
    assert index_lists([["y", "y", "x", "nope"], []], index).tolist() == [[1, 0], [-1, -1]]
    with pytest.raises(ValueError, match="'y' appears twice"):
        name_index(["x", "y", "y"])


def test_fashioniq_average():
    per_category = {
        "dress": {"R@10": 10.0, "R@50": 30.0},
        "shirt": {"R@10": 20.0, "R@50": 40.0},
        "toptee": {"R@50": 50.0, "R@10": 30.0},
    }
    assert fashioniq_average(per_category) == pytest.approx({"R@10": 20.0, "R@50": 40.0, "average": 30.0})
    with pytest.raises(ValueError, match="different metrics"):
        fashioniq_average({"dress": {"R@10": 1.0}, "shirt": {"R@50": 1.0}})
    with pytest.raises(ValueError, match="at least one"):
        fashioniq_average({})


def test_group_members_orders_named_groups_first_and_files_queries_under_each_label():
    groups = group_members(["b", ("a", "c"), (), ("c", "c")], order=("c", "x"))
    assert list(groups) == ["c", "a", "b"]  # the order's names present, then the rest sorted
    assert groups["c"].tolist() == [False, True, False, True]
    assert groups["a"].tolist() == [False, True, False, False]
    assert groups["b"].tolist() == [True, False, False, False]
    assert group_members([]) == {}


def test_per_aspect_counts_a_query_in_each_of_its_aspects():
    values = torch.tensor([10.0, 20.0, 30.0, 40.0])
    aspects = [("negation", "addition"), ("addition",), (), ("zzz_custom", "addition", "addition")]
    table = per_aspect(values, aspects)
    assert list(table.index) == ["addition", "negation", "zzz_custom"]  # official order, then others
    assert table.index.name == "aspect"
    assert table["value"].tolist() == pytest.approx([70 / 3, 10.0, 40.0])
    assert table["queries"].tolist() == [3, 1, 1]
    both = per_aspect({"mAP@5": values, "mAP@10": values * 2}, aspects)
    assert list(both.columns) == ["mAP@5", "mAP@10", "queries"]
    assert both.loc["negation", "mAP@10"] == 20.0
    with pytest.raises(ValueError, match="4 values for 3"):
        per_aspect(values, aspects[:3])
