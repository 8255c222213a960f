"""Top-k cosine search over a gallery of vectors: exact, or approximate with FAISS, behind one interface.

Every index here ranks by **cosine similarity**: each vector is divided by its L2 norm on the way
in (gallery and queries alike), so callers pass raw features as they would to
:func:`cirlib.evaluation.protocols.per_query_metrics`, and scores are inner products of unit
vectors. A zero or non-finite vector has no direction and raises instead.

* :class:`ExactIndex` multiplies query chunks by gallery chunks and keeps a running top-k, so
  memory stays at ``query_chunk_size x gallery_chunk_size`` scores whatever the gallery size; it
  runs on the device the gallery vectors are on. Ties are broken by the lower gallery index, as
  :func:`cirlib.evaluation.protocols.topk` does, so results do not depend on chunk sizes.
* :class:`IVFIndex` (``IndexIVFFlat``) and :class:`HNSWIndex` (``IndexHNSWFlat``) trade a little
  recall for one to two orders of magnitude less work per query on large galleries. Their order
  among tied scores is FAISS's, not specified. An IVF index moves to the GPU when the gallery is
  on CUDA and the installed FAISS was built with GPU support; otherwise it searches on the CPU.

``search`` returns ``(scores [Q, k], indices [Q, k])``, best first, on the queries' device (CPU for
numpy queries). An approximate index may find fewer than ``k`` items for a query (IVF probing only
near-empty lists); those slots hold index ``-1`` and score ``-inf``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor

VectorsLike = Tensor | np.ndarray
IndexKind = Literal["exact", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexConfig:
    """How :func:`build_index` builds an index; fields of other kinds are ignored.

    The IVF defaults were tuned with ``tests/perf/perf_index.py`` (1M clustered 128-d vectors, top-50
    of 1,000 queries): ``nlist = 4 sqrt(N)`` = 4000 and ``nprobe = 16`` found 98 % of the exact top-50
    over 100x faster than exact search; ``nprobe`` 8 to 64 all met recall >= 0.95 at >= 20x. The HNSW
    defaults (``M = 32``, ``ef_construction = 40``) fell short there (recall@50 0.77 to 0.89 at
    ``ef_search`` 64 to 256, after a 10-minute build): prefer IVF for galleries of that size.
    """

    kind: IndexKind = "exact"
    query_chunk_size: int = 1024
    gallery_chunk_size: int = 16384
    nlist: int | None = None  # IVF lists; None = 4 sqrt(N), the usual rule of thumb
    nprobe: int = 16
    train_size: int | None = None  # IVF k-means sample; None = 64 points per list (all if fewer)
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "ivf", "hnsw"):
            raise ValueError(f"kind must be 'exact', 'ivf' or 'hnsw', got {self.kind!r}")
        optional = {"nlist": self.nlist, "train_size": self.train_size}
        positive = {name: value for name, value in optional.items() if value is not None} | {
            "query_chunk_size": self.query_chunk_size,
            "gallery_chunk_size": self.gallery_chunk_size,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
        }
        bad = {name: value for name, value in positive.items() if value < 1}
        if bad:
            raise ValueError(f"IndexConfig fields must be positive, got {bad}")


def unit_rows(vectors: VectorsLike, what: str, dim: int | None = None) -> Tensor:
    """``vectors`` as an L2-normalised fp32 ``[N, D]`` tensor on its own device, checked first."""
    x = torch.as_tensor(vectors)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{what} must be a float [N, D] matrix, got shape {tuple(x.shape)} and dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]} but the index holds {dim}-d vectors")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values; check the features that produced them")
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = (norms == 0).flatten().nonzero().flatten()
    if len(zero):
        raise ValueError(f"{what} rows {zero[:5].tolist()} are zero vectors: cosine similarity is undefined")
    return x / norms


def _sort_best_first(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ordered by score (descending), equal scores by gallery index (ascending)."""
    indices, by_index = indices.sort(dim=1)
    scores, by_score = scores.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, by_score)


def _chunk_topk(scores: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row of a score chunk, ties broken by the lower index.

    ``torch.topk`` picks the best fast but breaks ties arbitrarily. Taking one more than needed shows
    the rows where a tie straddles the k-th place (the (k+1)-th score equals the k-th; rare with real
    features): those are fully sorted instead.
    """
    extra = int(scores.shape[1] > k)
    best, idx = _sort_best_first(*torch.topk(scores, k + extra, dim=1))
    straddle = (best[:, k - 1] == best[:, k]).nonzero().flatten() if extra else best.new_empty(0, dtype=torch.long)
    best, idx = best[:, :k], idx[:, :k]
    if len(straddle):
        full, full_idx = torch.sort(scores[straddle], dim=1, descending=True, stable=True)
        best[straddle], idx[straddle] = full[:, :k], full_idx[:, :k]
    return best, idx + offset


class VectorIndex(ABC):
    """A gallery of unit vectors searched by inner product (= cosine similarity).

    Subclasses store vectors in :meth:`_add` and rank them in :meth:`_search`; this class checks
    and normalises inputs, so every index fails the same way on bad data.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim

    @abstractmethod
    def __len__(self) -> int:
        """Number of gallery vectors."""

    @abstractmethod
    def _add(self, vectors: Tensor) -> None: ...

    @abstractmethod
    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes the index holds (vectors, codes, lists, graph links), for comparing index kinds."""

    def add(self, vectors: VectorsLike) -> None:
        """Append gallery vectors; they get indices ``len(self)`` onwards."""
        x = unit_rows(vectors, "gallery vectors", self.dim)
        if len(x):
            self._add(x)

    def search(self, queries: VectorsLike, k: int) -> tuple[Tensor, Tensor]:
        """``(scores [Q, k], indices [Q, k])`` of the ``k`` most similar gallery vectors, best first."""
        q = unit_rows(queries, "queries", self.dim)
        if len(self) == 0:
            raise ValueError("the index is empty: add gallery vectors before searching")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the gallery size), got {k}")
        device = q.device
        scores, indices = self._search(q, k)
        return scores.to(device), indices.to(device)


class ExactIndex(VectorIndex):
    """Brute-force search by chunked matrix products, on the gallery's device."""

    def __init__(self, dim: int, query_chunk_size: int = 1024, gallery_chunk_size: int = 16384) -> None:
        super().__init__(dim)
        if query_chunk_size < 1 or gallery_chunk_size < 1:
            raise ValueError(f"chunk sizes must be positive, got {query_chunk_size} and {gallery_chunk_size}")
        self.query_chunk_size = query_chunk_size
        self.gallery_chunk_size = gallery_chunk_size
        self.vectors: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.vectors is None else len(self.vectors)

    def _add(self, vectors: Tensor) -> None:
        self.vectors = vectors if self.vectors is None else torch.cat([self.vectors, vectors.to(self.vectors.device)])

    def memory_bytes(self) -> int:
        return 0 if self.vectors is None else self.vectors.numel() * self.vectors.element_size()

    @torch.no_grad()
    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        gallery = self.vectors
        queries = queries.to(gallery.device)
        scores = torch.empty((len(queries), k), device=gallery.device)
        indices = torch.empty((len(queries), k), dtype=torch.long, device=gallery.device)
        for q0 in range(0, len(queries), self.query_chunk_size):
            rows = slice(q0, q0 + self.query_chunk_size)
            best = best_idx = None
            for g0 in range(0, len(gallery), self.gallery_chunk_size):
                chunk = queries[rows] @ gallery[g0 : g0 + self.gallery_chunk_size].T
                top, top_idx = _chunk_topk(chunk, min(k, chunk.shape[1]), g0)
                if best is None:
                    best, best_idx = top, top_idx
                    continue
                # Earlier chunks hold lower indices and come first, so a stable sort keeps index order on ties.
                merged, order = torch.cat([best, top], dim=1).sort(dim=1, descending=True, stable=True)
                best, best_idx = merged[:, :k], torch.cat([best_idx, top_idx], dim=1).gather(1, order[:, :k])
            scores[rows], indices[rows] = best, best_idx
        return scores, indices


class FaissIndex(VectorIndex):
    """A FAISS inner-product index over unit vectors; subclasses say which structure."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.index: faiss.Index | None = None

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, indices = self.index.search(_numpy(queries), k)
        scores = torch.from_numpy(scores)
        indices = torch.from_numpy(indices)
        return scores.masked_fill(indices < 0, float("-inf")), indices


def _numpy(x: Tensor) -> np.ndarray:
    """The contiguous fp32 CPU array FAISS expects."""
    return np.ascontiguousarray(x.detach().cpu().float().numpy())


def _faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class IVFIndex(FaissIndex):
    """``IndexIVFFlat``: k-means cells over the gallery; a query scans its ``nprobe`` nearest cells.

    The first :meth:`add` trains the cells (on a sample of ``train_size`` vectors); later adds only
    fill them. With ``nprobe == nlist`` every vector is scanned and the search is exact.
    """

    def __init__(
        self, dim: int, nlist: int | None = None, nprobe: int = 16, train_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(dim)
        self.nlist = nlist
        self._nprobe = nprobe
        self.train_size = train_size
        self.seed = seed
        self.gpu_resources: object | None = None  # kept alive as long as a GPU index uses it

    @property
    def nprobe(self) -> int:
        """Cells scanned per query; can be changed after building to trade speed for recall."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be positive, got {value}")
        self._nprobe = value
        if self.index is not None:
            self.index.nprobe = min(value, self.nlist)

    def _train(self, vectors: Tensor) -> None:
        n = len(vectors)
        self.nlist = min(self.nlist or max(1, round(4 * math.sqrt(n))), n)
        sample_size = min(n, self.train_size or 64 * self.nlist)
        sample = vectors[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:sample_size]]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(_numpy(sample))
        index.nprobe = min(self._nprobe, self.nlist)  # FAISS's Python wrapper keeps the quantizer alive
        if vectors.is_cuda and _faiss_gpu_available():
            self.gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.gpu_resources, vectors.device.index or 0, index)
        self.index = index

    def _add(self, vectors: Tensor) -> None:
        if self.index is None:
            self._train(vectors)
        self.index.add(_numpy(vectors))

    def memory_bytes(self) -> int:
        if self.index is None:
            return 0
        if self.gpu_resources is not None:  # lists live in GPU memory; count the same payload
            return len(self) * (4 * self.dim + 8) + self.nlist * 4 * self.dim
        lists = self.index.invlists
        return lists.compute_ntotal() * (lists.code_size + 8) + self.nlist * 4 * self.dim


class HNSWIndex(FaissIndex):
    """``IndexHNSWFlat``: a navigable small-world graph with ``m`` links per node (CPU only in FAISS)."""

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 40, ef_search: int = 128) -> None:
        super().__init__(dim)
        self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.ef_search = ef_search

    def _add(self, vectors: Tensor) -> None:
        self.index.add(_numpy(vectors))

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        self.index.hnsw.efSearch = max(self.ef_search, k)  # fewer candidates than k would cap the results
        return super()._search(queries, k)

    def memory_bytes(self) -> int:
        hnsw = self.index.hnsw
        links = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return len(self) * 4 * self.dim + links


def build_index(vectors: VectorsLike, config: IndexConfig | None = None) -> VectorIndex:
    """An index of the given kind over ``vectors`` (``[N, D]``, normalised on the way in)."""
    config = config or IndexConfig()
    x = torch.as_tensor(vectors)
    if x.dim() != 2:
        raise ValueError(f"gallery vectors must be a [N, D] matrix, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("cannot build an index over an empty gallery")
    dim = x.shape[1]
    index: VectorIndex
    if config.kind == "exact":
        index = ExactIndex(dim, config.query_chunk_size, config.gallery_chunk_size)
    elif config.kind == "ivf":
        index = IVFIndex(dim, config.nlist, config.nprobe, config.train_size, config.seed)
    else:
        index = HNSWIndex(dim, config.hnsw_m, config.ef_construction, config.ef_search)
    index.add(x)
    return index
