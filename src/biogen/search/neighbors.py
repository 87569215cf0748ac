"""Neighbour lists of a molecule set against itself (input to diversity picking and
clustering), computed in query blocks: never a dense N x N matrix in memory.

    g = neighbor_graph(fps, spec, threshold=0.6)      # or k=10
    g.indptr, g.indices, g.scores                      # CSR: neighbours of i are
                                                       # indices[indptr[i]:indptr[i+1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import ConfigError
from biogen.search.index import SimilarityIndex
from biogen.search.metrics import Metric
from biogen.search.queries import Queries


@dataclass
class NeighborGraph:
    """Sparse similarity graph in CSR form over N molecules (self pairs excluded).

    indptr int64[N+1]; indices int64[E] (neighbour row); scores float64[E]. Within a row,
    neighbours are ordered by score descending, then id.
    """

    indptr: np.ndarray
    indices: np.ndarray
    scores: np.ndarray

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    def neighbors(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.indptr[i], self.indptr[i + 1]
        return self.indices[s:e], self.scores[s:e]

    def to_table(self) -> pa.Table:
        src = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))
        return pa.table({"i": src, "j": self.indices, "score": self.scores})


def neighbor_graph(fps: np.ndarray, spec: FingerprintSpec, *, threshold: float | None = None,
                   k: int | None = None, metric: Metric | None = None, ids=None, engine: str = "cpu",
                   workers: int | None = None, block: int = 4096, progress: bool = False) -> NeighborGraph:
    """Neighbours of every row of ``fps`` (N x W uint64) among the others.

    Exactly one of ``threshold`` (all neighbours with score >= threshold) or ``k`` (the k
    best, ties by id). Queries run in blocks of ``block`` rows; memory is O(N + edges).
    """
    if (threshold is None) == (k is None):
        raise ConfigError("give exactly one of threshold= or k= for a neighbour list")
    metric = metric or Metric()
    fps = np.ascontiguousarray(fps, dtype=np.uint64).reshape(-1, spec.n_words)
    n = len(fps)
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    index = SimilarityIndex.from_fingerprints(fps, spec, ids=ids, engine=engine, workers=workers)
    counts = np.zeros(n, np.int64)
    cols, vals = [], []
    try:
        for s in tqdm(range(0, n, block), desc="neighbours", unit="block", disable=not progress):
            e = min(s + block, n)
            q = Queries(fps[s:e], ids[s:e], [None] * (e - s), spec)
            t = index.top_k(q, k + 1, metric) if k is not None else index.threshold(q, threshold, metric)
            qi = t.column("query_index").to_numpy().astype(np.int64) + s
            j = t.column("library_row").to_numpy()
            sc = t.column("score").to_numpy()
            keep = j != qi
            qi, j, sc = qi[keep], j[keep], sc[keep]
            if k is not None:  # drop the (k+1)-th where self was not among the k+1
                first = np.searchsorted(qi, qi, side="left")
                keep = (np.arange(len(qi)) - first) < k
                qi, j, sc = qi[keep], j[keep], sc[keep]
            counts += np.bincount(qi, minlength=n)
            cols.append(j)
            vals.append(sc)
    finally:
        index.close()
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    scores = np.concatenate(vals) if vals else np.zeros(0)
    return NeighborGraph(indptr, indices.astype(np.int64), scores)
