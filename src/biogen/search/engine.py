"""The engine interface: one primitive both backends implement identically.

An engine holds one popcount-sorted block of fingerprints (uploaded once, in the
constructor) and answers a single question for a batch of queries: which rows pass
each query's exact integer threshold test. Everything else (metrics, popcount bounds,
top-k seeding, merging, ids) is written once above the engines, in ``plan.py`` and
``index.py``.

    engine.candidates(queries, min_common, row_lo, row_hi) -> (query_index, row, common)

queries     Q x W  uint64  query fingerprints (little-endian words, the library layout)
min_common  Q x (B+1) int32  per query, the least ``popcount(query AND row)`` a row of
                           popcount b needs (``Metric.min_common``; ``NEVER`` = unreachable)
row_lo/hi   Q int64        per query, the rows [lo, hi) worth scanning (popcount bound)
returns     three equal-length arrays: int32 query index, int64 row, int32 common bits,
            one entry per passing (query, row) pair, in no particular order.

The database inside an engine: ``fps`` N x W uint64 and ``pcs`` N int32, rows sorted by
non-decreasing popcount (so a popcount interval is a row interval).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SimilarityEngine(Protocol):
    name: str
    n_rows: int

    def candidates(
        self, queries: np.ndarray, min_common: np.ndarray, row_lo: np.ndarray, row_hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
