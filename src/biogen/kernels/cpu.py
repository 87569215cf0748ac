"""Numba CPU kernels for fingerprint search: pure functions on arrays and row ranges.

They release the GIL (``nogil=True``) so the CPU engine runs several of them at once
from Python threads, one per row window or query block (FPSim2's pattern). Numba has
no ``np.bitwise_count``; ``popcnt64`` emits LLVM's ``llvm.ctpop.i64`` intrinsic, which
compiles to ``popcnt`` (or, auto-vectorized over a row's words, ``vpopcntq`` where the
CPU has AVX-512 VPOPCNTDQ).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

TILE_ROWS = 4096  # rows per cache tile in multi-query scans: 4096 x 256 B = 1 MiB (fits L2)


@intrinsic
def popcnt64(typingctx, x):
    """Number of set bits of a uint64 (``llvm.ctpop.i64``)."""
    if x != types.uint64:
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


@njit(nogil=True, cache=True)
def row_popcounts(fps):
    """int32[N] popcounts of an N x W uint64 array."""
    n, w = fps.shape
    out = np.empty(n, dtype=np.int32)
    for r in range(n):
        c = np.uint64(0)
        for k in range(w):
            c += popcnt64(fps[r, k])
        out[r] = np.int32(c)
    return out


@njit(nogil=True, cache=True)
def common_counts(q, fps, r0, r1, out):
    """out[r - r0] = popcount(q AND fps[r]) for r in [r0, r1): the hot loop.

    Kept separate and branch-free so LLVM vectorizes it (vpopcntq). Output arrays are
    never reassigned inside hot loops: Numba then emits atomic refcount updates per
    iteration, which made a fused scan-and-append loop 6x slower.
    """
    w = q.shape[0]
    for r in range(r0, r1):
        row = fps[r]
        c = np.uint64(0)
        for k in range(w):
            c += popcnt64(q[k] & row[k])
        out[r - r0] = np.int32(c)


@njit(nogil=True, cache=True)
def _select(cnt, pcs, mc, r0, r1, sel):
    """Tile offsets i (row r0 + i) with cnt[i] >= mc[pcs[r0 + i]] into sel; returns how many."""
    m = 0
    for r in range(r0, r1):
        i = r - r0
        if cnt[i] >= mc[pcs[r]]:
            sel[m] = i
            m += 1
    return m


@njit(nogil=True, cache=True)
def _resize(buf, n, cap):
    new = np.empty(cap, dtype=buf.dtype)
    new[:n] = buf[:n]
    return new


@njit(nogil=True, cache=True)
def threshold_candidates(queries, min_common, row_lo, row_hi, fps, pcs, win_lo, win_hi):
    """Pairs (query, row) whose common-bit count passes the query's integer test.

    queries     Q x W uint64     query fingerprints (sorted by popcount for locality)
    min_common  Q x (B+1) int32  least common-bit count per target popcount (``Metric.min_common``)
    row_lo/hi   Q int64          each query's candidate rows [lo, hi) (popcount bound)
    fps         N x W uint64     database, rows sorted by popcount
    pcs         N int32          database popcounts
    win_lo/hi   int              the row window this call covers (work split)

    Returns ``(query_index int32[M], row int64[M], common int32[M])``. Rows are scanned in
    tiles of ``TILE_ROWS`` and every query visits the tile while it is in cache.
    """
    nq = queries.shape[0]
    cnt = np.empty(TILE_ROWS, dtype=np.int32)
    sel = np.empty(TILE_ROWS, dtype=np.int32)
    out_q = np.empty(1024, dtype=np.int32)
    out_r = np.empty(1024, dtype=np.int64)
    out_c = np.empty(1024, dtype=np.int32)
    n = 0
    lo_all = win_hi
    hi_all = win_lo
    for j in range(nq):
        lo_all = min(lo_all, max(row_lo[j], win_lo))
        hi_all = max(hi_all, min(row_hi[j], win_hi))
    for t0 in range(lo_all, hi_all, TILE_ROWS):
        t1 = min(t0 + TILE_ROWS, hi_all)
        for j in range(nq):
            r0 = max(row_lo[j], t0)
            r1 = min(row_hi[j], t1)
            q = queries[j]
            # pass 1: common-bit counts of the tile (a branch-free loop LLVM vectorizes)
            common_counts(q, fps, r0, r1, cnt)
            # pass 2: the exact integer threshold test; survivors' tile offsets into `sel`
            m = _select(cnt, pcs, min_common[j], r0, r1, sel)
            if m == 0:
                continue
            if n + m > out_q.shape[0]:  # grow outside the hot loops (NRT refcounts are atomic)
                cap = max(2 * out_q.shape[0], n + m)
                out_q = _resize(out_q, n, cap)
                out_r = _resize(out_r, n, cap)
                out_c = _resize(out_c, n, cap)
            for i in range(m):
                out_q[n + i] = j
                out_r[n + i] = r0 + sel[i]
                out_c[n + i] = cnt[sel[i]]
            n += m
    return out_q[:n], out_r[:n], out_c[:n]
