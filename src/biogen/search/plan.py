"""Search planning written once above both engines: popcount bounds and top-k seeding.

Rows of an engine's block are sorted by popcount, so ``starts[b]`` (first row with
popcount >= b) turns any popcount interval into a row interval. For a query of popcount
``a`` and a threshold ``t``, ``Metric.min_common`` gives the least common-bit count per
target popcount; the popcounts that can reach ``t`` at all form the Swamidass–Baldi
interval (for Tanimoto ``[t*a, a/t]``), and only those rows are scanned.

Top-k (``SimilarityIndex._top_k_part``) is a series of threshold scans whose threshold
is the k-th best score found so far (the k-NN bound): windows of rows grow outward from
the query's own popcount, and each round's threshold narrows the popcount interval
still worth scanning, and one speculative scan at a higher threshold may finish the
search early (exact either way; see ``_top_k_part``). Engines thus only ever run one
fused scan-and-select primitive; the final k are selected from the small candidate set,
never from a dense score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biogen.search.metrics import NEVER, Metric


def popcount_starts(pcs: np.ndarray, nbits: int) -> np.ndarray:
    """int64[nbits + 2]: ``starts[b]`` = first row whose popcount is >= b (pcs sorted)."""
    return np.searchsorted(pcs, np.arange(nbits + 2), side="left").astype(np.int64)


@dataclass
class ScanPlan:
    """Arguments of one ``engine.candidates`` call for a batch of Q queries.

    min_common Q x (B+1) int32; row_lo, row_hi Q int64.
    """

    min_common: np.ndarray
    row_lo: np.ndarray
    row_hi: np.ndarray


def rows_of(min_common: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row interval per query covering every popcount whose test can pass."""
    reach = min_common != NEVER  # Q x (B+1)
    anyr = reach.any(axis=1)
    b_lo = reach.argmax(axis=1)
    b_hi = reach.shape[1] - 1 - reach[:, ::-1].argmax(axis=1)
    lo = np.where(anyr, starts[b_lo], 0)
    hi = np.where(anyr, starts[b_hi + 1], 0)
    return lo.astype(np.int64), hi.astype(np.int64)


def threshold_plan(metric: Metric, qpop: np.ndarray, threshold, nbits: int, starts: np.ndarray) -> ScanPlan:
    """Plan of a threshold search; ``threshold`` is a scalar or one value per query."""
    mc = metric.min_common(qpop, threshold, nbits)
    lo, hi = rows_of(mc, starts)
    return ScanPlan(mc, lo, hi)
