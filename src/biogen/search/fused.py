"""Fused similarity of every library row to a set of queries (screening by known actives).

Unlike top-k and threshold search, a screen needs a score for every row: the fusion
(max, mean, or mean of the top n) of its similarity to all known actives. The Numba
kernel scores every pair with the exact expressions of ``Metric.score`` and keeps only
the fused value per row, so no Q x N matrix is ever held in memory.
"""

from __future__ import annotations

import numpy as np

from biogen.errors import ConfigError, InputError
from biogen.kernels import cpu as kcpu
from biogen.search.metrics import Metric

FUSIONS = {"max": kcpu.FUSE_MAX, "mean": kcpu.FUSE_MEAN, "top_n": kcpu.FUSE_TOPN}


def check_fusion(fusion: str, top_n: int) -> None:
    if fusion not in FUSIONS:
        raise ConfigError(f"similarity fusion={fusion!r} is not valid; choose one of {', '.join(FUSIONS)}")
    if fusion == "top_n" and top_n < 1:
        raise ConfigError(f"similarity top_n={top_n} must be >= 1 for fusion=top_n")


def fused_similarity(queries: np.ndarray, query_popcounts: np.ndarray, fps: np.ndarray,
                     popcounts: np.ndarray, metric: Metric = Metric(), fusion: str = "max",
                     top_n: int = 5) -> np.ndarray:
    """float64[N]: fused score of each row of ``fps`` (N x W) against ``queries`` (Q x W).

    query_popcounts: Q int32; popcounts: N int32 (the library's stored popcounts).
    """
    check_fusion(fusion, top_n)
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise InputError("no query fingerprints to fuse over (the set of known actives is empty)")
    if fps.ndim != 2 or fps.shape[1] != queries.shape[1]:
        raise InputError(f"fingerprint widths differ: queries {queries.shape[1]} words, library "
                         f"{fps.shape[1] if fps.ndim == 2 else fps.shape} words")
    out = np.empty(fps.shape[0], dtype=np.float64)
    if fps.shape[0]:
        kcpu.fused_scores(queries, np.ascontiguousarray(query_popcounts, dtype=np.int32),
                          np.ascontiguousarray(fps, dtype=np.uint64), np.ascontiguousarray(popcounts, dtype=np.int32),
                          0, fps.shape[0], metric.code, float(metric.alpha), float(metric.beta),
                          FUSIONS[fusion], int(top_n), out)
    return out


def warm_up() -> None:
    """Load the Numba kernel from its on-disk cache (~0.4 s per process: a screen's worker
    does it when it starts, not on its first shard)."""
    q = np.zeros((1, 1), dtype=np.uint64)
    pc = np.zeros(1, dtype=np.int32)
    fused_similarity(q, pc, q, pc)
