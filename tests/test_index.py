"""Vector indexes for first-stage retrieval: the exact index equals a brute-force top-k whatever the
chunking, FAISS IVF / HNSW find (almost) the same neighbours on clustered data, bad input fails loudly."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cirlib.evaluation.protocols import topk
from cirlib.search.index import ExactIndex, HNSWIndex, IndexConfig, IVFIndex, build_index

faiss.omp_set_num_threads(1)


def clustered(n: int, dim: int = 16, clusters: int = 8, seed: int = 0) -> torch.Tensor:
    """Unit vectors around ``clusters`` random centres: distinct scores (no ties), real neighbourhoods."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    labels = torch.randint(clusters, (n,), generator=g)
    return F.normalize(centres[labels] + torch.randn(n, dim, generator=g) / dim**0.5, dim=1)


def brute_force(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T, k, dim=1)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(1).double().mean())


# ----------------------------------------------------------------------------- exact index
def test_exact_hand_checked_neighbours() -> None:
    # Raw (un-normalised) rows: the index divides by the norms, here 1, 5, 2 and 3.
    gallery = torch.tensor([[1.0, 0, 0], [0, 5, 0], [1, 1, 1.4142135], [0, 0, -3]])
    index = build_index(gallery, IndexConfig(kind="exact"))
    scores, indices = index.search(torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 1, 0]]), 4)
    assert indices.tolist() == [[0, 2, 1, 3], [2, 0, 1, 3], [1, 2, 0, 3]]
    expected = [[1, 0.5, 0, 0], [0.7071068, 0, 0, -1], [1, 0.5, 0, 0]]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_exact_equals_brute_force() -> None:
    gallery, queries = clustered(1000, seed=1), clustered(70, seed=2)
    scores, indices = build_index(gallery).search(queries, 25)
    ref_scores, ref_indices = brute_force(queries, gallery, 25)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("query_chunk, gallery_chunk", [(1, 1), (4, 13), (5, 399), (64, 400), (1000, 333)])
def test_exact_chunking_does_not_change_results(query_chunk: int, gallery_chunk: int) -> None:
    gallery, queries = clustered(400, seed=3), clustered(6, seed=4)
    ref_scores, ref_indices = brute_force(queries, gallery, 10)
    config = IndexConfig(kind="exact", query_chunk_size=query_chunk, gallery_chunk_size=gallery_chunk)
    scores, indices = build_index(gallery, config).search(queries, 10)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gallery_chunk", [1, 3, 5, 64])
def test_exact_ties_go_to_the_lower_index(gallery_chunk: int) -> None:
    # Components 0 and +-1 with norms 1, 2 or 4: every normalised entry and dot product is exact, so the
    # many ties are true ties; they must be ordered by index as protocols.topk orders them.
    g = torch.Generator().manual_seed(5)
    gallery = torch.zeros(64, 16)
    for row in gallery:
        row[torch.randperm(16, generator=g)[: [1, 4, 16][int(torch.randint(3, (1,), generator=g))]]] = 1.0
    gallery *= torch.where(torch.rand(64, 16, generator=g) < 0.3, -1.0, 1.0)
    queries = gallery[:9]
    config = IndexConfig(kind="exact", query_chunk_size=4, gallery_chunk_size=gallery_chunk)
    scores, indices = build_index(gallery, config).search(queries, 12)
    ref_scores, ref_indices = topk(F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T, 12)
    assert (scores[:, :-1] == scores[:, 1:]).any()  # the data does tie
    assert torch.equal(indices, ref_indices)
    assert torch.equal(scores, ref_scores)


def test_exact_add_appends_and_accepts_numpy() -> None:
    gallery, queries = clustered(300, seed=6), clustered(10, seed=7)
    index = ExactIndex(16, gallery_chunk_size=50)
    index.add(gallery[:120].numpy())
    index.add(gallery[120:].double())
    assert len(index) == 300 and index.memory_bytes() == 300 * 16 * 4
    scores, indices = index.search(queries.numpy(), 5)
    assert isinstance(indices, torch.Tensor) and indices.device.type == "cpu"
    assert torch.equal(indices, brute_force(queries, gallery, 5)[1])


def test_exact_stays_on_the_gallery_device_and_returns_on_the_queries() -> None:
    gallery, queries = clustered(200, seed=8), clustered(5, seed=9)
    index = build_index(gallery.to("cpu"))
    assert index.vectors.device.type == "cpu"
    scores, indices = index.search(queries.to("cpu"), 3)
    assert scores.device == indices.device == torch.device("cpu")
    assert scores.dtype == torch.float32 and indices.dtype == torch.long and scores.shape == (5, 3)


# ----------------------------------------------------------------------------- FAISS indexes
@pytest.fixture(scope="module")
def clustered_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gallery, queries = clustered(4000, dim=32, clusters=20, seed=10), clustered(100, dim=32, clusters=20, seed=10)
    return gallery, queries, brute_force(queries, gallery, 20)[1]


def test_ivf_recall_on_clustered_data(clustered_data) -> None:
    gallery, queries, truth = clustered_data
    index = build_index(gallery, IndexConfig(kind="ivf", nlist=64, nprobe=8))
    assert isinstance(index, IVFIndex) and len(index) == 4000
    scores, indices = index.search(queries, 20)
    assert recall(indices, truth) >= 0.95
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_ivf_scanning_every_list_is_exact(clustered_data) -> None:
    gallery, queries, truth = clustered_data
    index = build_index(gallery, IndexConfig(kind="ivf", nlist=64, nprobe=64))
    scores, indices = index.search(queries, 20)
    assert torch.equal(indices, truth)
    torch.testing.assert_close(scores, brute_force(queries, gallery, 20)[0], atol=1e-5, rtol=0)


def test_ivf_default_nlist_and_nprobe_change() -> None:
    gallery, queries = clustered(2500, seed=11), clustered(30, seed=12)
    index = build_index(gallery, IndexConfig(kind="ivf", nprobe=1))
    assert index.nlist == 200  # 4 sqrt(2500)
    index.nprobe = index.nlist
    assert torch.equal(index.search(queries, 10)[1], brute_force(queries, gallery, 10)[1])


def test_hnsw_recall_on_clustered_data(clustered_data) -> None:
    gallery, queries, truth = clustered_data
    index = build_index(gallery, IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64))
    assert isinstance(index, HNSWIndex)
    scores, indices = index.search(queries, 20)
    assert recall(indices, truth) >= 0.95
    torch.testing.assert_close(scores[:, 0], brute_force(queries, gallery, 1)[0][:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_memory_matches_the_serialised_index(kind: str) -> None:
    index = build_index(clustered(2000, seed=13), IndexConfig(kind=kind, nlist=32))
    serialised = len(faiss.serialize_index(index.index))
    assert abs(index.memory_bytes() - serialised) < 0.02 * serialised


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_k_beyond_the_gallery_and_wrong_dims_fail(kind: str) -> None:
    index = build_index(clustered(50, seed=14), IndexConfig(kind=kind, nlist=4))
    with pytest.raises(ValueError, match="k must be in"):
        index.search(clustered(3), 51)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(clustered(3), 0)
    with pytest.raises(ValueError, match="dimension 8 but the index holds 16"):
        index.search(clustered(3, dim=8), 5)
    with pytest.raises(ValueError, match="dimension 8"):
        index.add(clustered(3, dim=8))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        index.search(clustered(3)[0], 5)


def test_bad_vectors_fail() -> None:
    with pytest.raises(ValueError, match="empty gallery"):
        build_index(torch.zeros(0, 16))
    with pytest.raises(ValueError, match="NaN or infinite"):
        build_index(torch.tensor([[1.0, float("nan")]]))
    index = build_index(clustered(10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(torch.full((1, 16), float("inf")), 1)
    with pytest.raises(ValueError, match=r"rows \[1\] are zero vectors"):
        build_index(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="float"):
        build_index(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="index is empty"):
        ExactIndex(4).search(torch.ones(1, 4), 1)
    with pytest.raises(ValueError, match="kind must be"):
        IndexConfig(kind="pq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        IndexConfig(gallery_chunk_size=0)
