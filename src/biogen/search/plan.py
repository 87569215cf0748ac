"""Search planning written once above both engines: popcount bounds and top-k seeding.

Rows of an engine's block are sorted by popcount, so ``starts[b]`` (first row with
popcount >= b) turns any popcount interval into a row interval. For a query of popcount
``a`` and a threshold ``t``, ``Metric.min_common`` gives the least common-bit count per
target popcount; the popcounts that can reach ``t`` at all form the Swamidass–Baldi
interval (for Tanimoto ``[t*a, a/t]``), and only those rows are scanned.

Top-k is a threshold search with a threshold found on the fly (the k-NN bound):
1. seed: scan the few popcount bins whose upper bound is highest (at least
   ``seed_rows`` rows), every row a candidate; the k-th best score there, ``t0``, is a
   lower bound of the true k-th best score (a subset cannot do better);
2. scan the popcount interval that can reach ``t0`` with the exact test ``score >= t0``;
   every true top-k row (and every tie at the k-th score) is among those candidates.
Engines thus only ever run one fused scan-and-select primitive; selection of the final k
happens on the small candidate set, never on a dense score matrix.
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


def threshold_plan(metric: Metric, qpop: np.ndarray, threshold, nbits: int,
                   starts: np.ndarray, block: int = 256) -> ScanPlan:
    """Plan of a threshold search; ``threshold`` is a scalar or one value per query."""
    qpop = np.asarray(qpop, dtype=np.int64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), qpop.shape)
    tables = [metric.min_common(qpop[s:s + block], t[s:s + block], nbits)
              for s in range(0, len(qpop), block)]
    mc = np.concatenate(tables) if tables else np.zeros((0, nbits + 1), np.int32)
    lo, hi = rows_of(mc, starts)
    return ScanPlan(mc, lo, hi)


def seed_plan(metric: Metric, qpop: np.ndarray, nbits: int, starts: np.ndarray,
              seed_rows: int) -> ScanPlan:
    """Plan of the top-k seed scan: the popcount bins of highest bound, >= seed_rows rows.

    For each distinct query popcount, bins are taken in decreasing order of their
    upper bound until they hold ``seed_rows`` rows; the seed covers the interval
    [lowest, highest] of the bins taken. Every row in it is a candidate (min_common 0).
    """
    qpop = np.asarray(qpop, dtype=np.int64)
    b = np.arange(nbits + 1)
    counts = np.diff(starts)[: nbits + 1]  # rows per popcount bin
    lo = np.empty(len(qpop), np.int64)
    hi = np.empty(len(qpop), np.int64)
    for a in np.unique(qpop):
        order = np.argsort(-metric.upper_bound(int(a), b), kind="stable")
        csum = np.cumsum(counts[order])
        take = order[: int(np.searchsorted(csum, seed_rows, side="left")) + 1]
        sel = qpop == a
        lo[sel] = starts[take.min()]
        hi[sel] = starts[take.max() + 1]
    mc = np.zeros((len(qpop), nbits + 1), np.int32)
    return ScanPlan(mc, lo, hi)
