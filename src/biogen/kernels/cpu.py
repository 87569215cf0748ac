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
BOUND_PROBE = 256  # rows of a tile that decide whether the per-word bound is worth using


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


@intrinsic
def cttz64(typingctx, x):
    """Index of the lowest set bit of a nonzero uint64 (``llvm.cttz.i64``)."""
    if x != types.uint64:
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, ir.IntType(1)])
        fn = builder.module.declare_intrinsic("llvm.cttz", [i64], fnty)
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

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
    """out[r - r0] = popcount(q AND fps[r]) for r in [r0, r1): the brute-force scan.

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
def word_bound_select(qwc, wc, pcs, mc, r0, r1, sel, base, m):
    """Rows of [r0, r1) that may pass: sum_k min(qwc[k], wc[r, k]) >= mc[pcs[r]].

    ``wc`` holds each row's per-word popcounts (N x W uint8, 1/8 of the fingerprint
    bytes); the sum is an upper bound of popcount(q AND row), so rows failing it are
    skipped without reading their fingerprint. Offsets (r - base) are appended to ``sel``
    after its first ``m`` entries; returns the new count.
    """
    w = qwc.shape[0]
    for r in range(r0, r1):
        row = wc[r]
        bound = 0
        for k in range(w):
            bound += min(qwc[k], row[k])
        if bound >= mc[pcs[r]]:
            sel[m] = r - base
            m += 1
    return m


@njit(nogil=True, cache=True)
def common_counts_at(q, fps, r0, sel, m, out):
    """out[i] = popcount(q AND fps[r0 + sel[i]]) for i < m (rows that passed the bound)."""
    w = q.shape[0]
    for i in range(m):
        row = fps[r0 + sel[i]]
        c = np.uint64(0)
        for k in range(w):
            c += popcnt64(q[k] & row[k])
        out[i] = np.int32(c)


@njit(nogil=True, cache=True)
def _resize(buf, n, cap):
    new = np.empty(cap, dtype=buf.dtype)
    new[:n] = buf[:n]
    return new


@njit(nogil=True, cache=True)
def threshold_candidates(queries, query_wc, min_common, row_lo, row_hi, fps, wc, pcs, win_lo, win_hi):
    """Pairs (query, row) whose common-bit count passes the query's integer test.

    queries     Q x W uint64     query fingerprints (sorted by popcount for locality)
    query_wc    Q x W uint8      their per-word popcounts
    min_common  Q x (B+1) int32  least common-bit count per target popcount (``Metric.min_common``)
    row_lo/hi   Q int64          each query's candidate rows [lo, hi) (popcount bound)
    fps         N x W uint64     database, rows sorted by popcount
    wc          N x W uint8      database per-word popcounts (``np.bitwise_count(fps)``)
    pcs         N int32          database popcounts
    win_lo/hi   int              the row window this call covers (work split)

    Returns ``(query_index int32[M], row int64[M], common int32[M])``. Rows are scanned in
    tiles of ``TILE_ROWS`` and every query visits the tile while it is in cache. Per
    tile and query: (1) the per-word bound sum_k min(q_k, row_k) >= min_common drops most
    rows after reading 1/8 of their bytes (when it keeps more than half of the first
    ``BOUND_PROBE`` rows, the tile is counted directly instead); (2) exact
    popcount(q AND row) of the rest; (3) the exact test, appending survivors.
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
            if r1 <= r0:
                continue
            mc = min_common[j]
            probe = min(r1 - r0, BOUND_PROBE)
            m = word_bound_select(query_wc[j], wc, pcs, mc, r0, r0 + probe, sel, r0, 0)
            if 2 * m > probe:
                # the bound keeps most rows here (low threshold): count every row directly
                m = r1 - r0
                common_counts(queries[j], fps, r0, r1, cnt)
                for i in range(m):
                    sel[i] = i
            else:
                m = word_bound_select(query_wc[j], wc, pcs, mc, r0 + probe, r1, sel, r0, m)
                if m == 0:
                    continue
                common_counts_at(queries[j], fps, r0, sel, m, cnt)
            h = 0
            for i in range(m):  # exact test; compact the survivors in place
                r = r0 + sel[i]
                if cnt[i] >= mc[pcs[r]]:
                    sel[h] = sel[i]
                    cnt[h] = cnt[i]
                    h += 1
            if h == 0:
                continue
            if n + h > out_q.shape[0]:  # grow outside the hot loops (NRT refcounts are atomic)
                cap = max(2 * out_q.shape[0], n + h)
                out_q = _resize(out_q, n, cap)
                out_r = _resize(out_r, n, cap)
                out_c = _resize(out_c, n, cap)
            for i in range(h):
                out_q[n + i] = j
                out_r[n + i] = r0 + sel[i]
                out_c[n + i] = cnt[i]
            n += h
    return out_q[:n], out_r[:n], out_c[:n]


FUSE_MAX, FUSE_MEAN, FUSE_TOPN = 0, 1, 2  # fusion codes of fused_scores
METRIC_TANIMOTO, METRIC_DICE, METRIC_TVERSKY = 0, 1, 2
FUSE_TILE = 1024  # rows per tile: 1024 x 256 B = 256 KiB of a 2048-bit library, next to the queries in L2


@njit(nogil=True, cache=True)
def _pair_score(c, a, b, metric, alpha, beta):
    """float64 score with ``biogen.search.metrics.Metric.score``'s expressions and conventions."""
    if a == 0 or b == 0:
        return 0.0
    fc = np.float64(c)
    fa = np.float64(a)
    fb = np.float64(b)
    if metric == METRIC_TANIMOTO:
        num = fc
        den = fa + fb - fc
    elif metric == METRIC_DICE:
        num = 2.0 * fc
        den = fa + fb
    else:
        num = fc
        den = alpha * fa + beta * fb + (1.0 - alpha - beta) * fc
    if den == 0.0:
        return 1.0
    return num / den


@njit(nogil=True, cache=True)
def fused_scores(queries, qpc, fps, pcs, r0, r1, metric, alpha, beta, fusion, top_n, out):
    """out[r - r0] = fusion over all Q queries of score(query, fps[r]), r in [r0, r1).

    fusion: FUSE_MAX (max), FUSE_MEAN (mean), FUSE_TOPN (mean of the top_n best scores;
    all Q when Q < top_n). Every pair is scored (the screen needs every row's score), in
    row tiles of FUSE_TILE so that a tile and the Q x W queries stay in cache while each
    query sweeps the tile (the word loop vectorizes to vpopcntq).
    """
    nq, w = queries.shape
    n_top = min(top_n, nq) if fusion == FUSE_TOPN else 1
    acc = np.zeros(FUSE_TILE, dtype=np.float64)
    top = np.full((FUSE_TILE, max(n_top, 1)), -1.0)
    counts = np.empty(FUSE_TILE, dtype=np.int32)
    for t0 in range(r0, r1, FUSE_TILE):
        t1 = min(t0 + FUSE_TILE, r1)
        m = t1 - t0
        acc[:m] = -1.0 if fusion == FUSE_MAX else 0.0
        if fusion == FUSE_TOPN:
            top[:m, :] = -1.0
        for qi in range(nq):
            common_counts(queries[qi], fps, t0, t1, counts)
            a = qpc[qi]
            for i in range(m):
                s = _pair_score(counts[i], a, pcs[t0 + i], metric, alpha, beta)
                if fusion == FUSE_MAX:
                    if s > acc[i]:
                        acc[i] = s
                elif fusion == FUSE_MEAN:
                    acc[i] += s
                else:  # keep the n_top best in descending order
                    if s > top[i, n_top - 1]:
                        j = n_top - 1
                        while j > 0 and top[i, j - 1] < s:
                            top[i, j] = top[i, j - 1]
                            j -= 1
                        top[i, j] = s
        for i in range(m):
            if fusion == FUSE_MAX:
                out[t0 - r0 + i] = acc[i] if nq > 0 else 0.0
            elif fusion == FUSE_MEAN:
                out[t0 - r0 + i] = acc[i] / nq if nq > 0 else 0.0
            else:
                s = 0.0
                for j in range(n_top):
                    s += top[i, j]
                out[t0 - r0 + i] = s / n_top if n_top > 0 else 0.0
