"""CPU engine: Numba kernels run from a thread pool (they release the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from biogen.kernels.cpu import block_sketch, query_blocks, threshold_candidates

QUERY_BLOCK = 32  # queries per task: they share each cache tile of database rows


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class CpuEngine:
    """``SimilarityEngine`` on the CPU (see ``biogen.search.engine``).

    Work is split into tasks of up to ``QUERY_BLOCK`` queries; when there are fewer
    blocks than workers (one query, a few queries), each block's row span is also cut
    into ``workers`` windows so every core has work.
    """

    name = "cpu"

    def __init__(self, fps: np.ndarray, pcs: np.ndarray, workers: int | None = None):
        self.fps = np.ascontiguousarray(fps, dtype=np.uint64)  # N x W
        self.pcs = np.ascontiguousarray(pcs, dtype=np.int32)  # N
        if len(self.pcs) > 1 and (np.diff(self.pcs) < 0).any():  # the sketch's tile skips rely on it
            raise ValueError("CpuEngine: rows must be sorted by popcount (see biogen.search.engine)")
        self.sketch = block_sketch(self.fps)  # 16-bit block popcounts in 1/8 of the bytes: the bound
        self.n_rows = int(self.fps.shape[0])
        self.workers = max(1, int(workers or default_workers()))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="biogen-search") if self.workers > 1 else None

    def _tasks(self, nq: int, row_lo: np.ndarray, row_hi: np.ndarray):
        blocks = [(s, min(s + QUERY_BLOCK, nq)) for s in range(0, nq, QUERY_BLOCK)]
        n_windows = max(1, -(-self.workers // max(len(blocks), 1))) if self.workers > 1 else 1
        for s, e in blocks:
            lo, hi = int(row_lo[s:e].min()), int(row_hi[s:e].max())
            if hi <= lo:
                continue
            step = -(-(hi - lo) // n_windows)
            for w0 in range(lo, hi, step):
                yield s, e, w0, min(w0 + step, hi)

    def candidates(self, queries, min_common, row_lo, row_hi):
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        query_b = query_blocks(queries)
        min_common = np.ascontiguousarray(min_common, dtype=np.int32)
        row_lo = np.ascontiguousarray(row_lo, dtype=np.int64)
        row_hi = np.ascontiguousarray(row_hi, dtype=np.int64)

        def run(task):
            s, e, w0, w1 = task
            qi, rows, common = threshold_candidates(
                queries[s:e], query_b[s:e], min_common[s:e], row_lo[s:e], row_hi[s:e],
                self.fps, self.sketch, self.pcs, w0, w1
            )
            return qi + np.int32(s), rows, common

        tasks = list(self._tasks(len(queries), row_lo, row_hi))
        parts = list(self._pool.map(run, tasks)) if self._pool and len(tasks) > 1 else [run(t) for t in tasks]
        if not parts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
        return tuple(np.concatenate(x) for x in zip(*parts))

    def close(self) -> None:
        """Stop the threads and let go of the rows (a streamed index loads the next part after this)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.fps = self.sketch = None
