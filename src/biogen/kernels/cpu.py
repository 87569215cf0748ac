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
BOUND_PROBE = 256  # rows of a tile that decide whether the block bound is worth using


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


SKETCH_ROWS = 64  # rows per sketch tile: one 64-byte column per word, one byte per row
CODE_MAX = 3  # a sketch code of 3 means "3 or more bits" in that 16-bit block (saturated)
SKETCH_MAX_POPCOUNT = 255  # the bound is summed in uint8: queries with more bits count directly


@njit(nogil=True, cache=True)
def block_sketch(fps):
    """uint8[ceil(N/64), W, 64]: each row's 16-bit block popcounts, 2 bits each, tile-major.

    Byte ``[t, k, i]`` describes row ``64 t + i``, word ``k``: bits ``2j, 2j + 1`` hold
    the popcount of the word's j-th 16-bit block, saturated at ``CODE_MAX`` (sparse
    fingerprints rarely put 3 bits in 16: ECFP4 about 1% of occupied blocks). The sketch
    is 1/8 of the fingerprint bytes, and its layout puts 64 rows of one word side by side
    so the bound below runs down columns in SIMD byte lanes. Rows past N are zero.
    """
    n, w = fps.shape
    nt = (n + SKETCH_ROWS - 1) // SKETCH_ROWS
    sk = np.zeros((nt, w, SKETCH_ROWS), dtype=np.uint8)
    m16 = np.uint64(0xFFFF)
    top = np.uint64(CODE_MAX)
    for r in range(n):
        t = r // SKETCH_ROWS
        i = r - t * SKETCH_ROWS
        for k in range(w):
            x = fps[r, k]
            code = np.uint64(0)
            for j in range(4):
                c = min(popcnt64((x >> np.uint64(16 * j)) & m16), top)
                code |= c << np.uint64(2 * j)
            sk[t, k, i] = np.uint8(code)
    return sk


def query_blocks(queries: np.ndarray) -> np.ndarray:
    """uint8[Q, W, 4]: exact popcounts of each query word's four 16-bit blocks."""
    q = np.ascontiguousarray(queries, dtype="<u8")
    return np.bitwise_count(q.view("<u2")).astype(np.uint8).reshape(q.shape[0], q.shape[1], 4)


@njit(nogil=True, cache=True, inline="always")
def _block_min(code, q, exact):
    """min(query block count, row code); unless ``exact``, a saturated code (``CODE_MAX``)
    stands for any count and contributes the query's own."""
    if not exact and code == np.uint8(CODE_MAX):
        return q
    return code if code < q else q


@njit(nogil=True, cache=True, inline="always")
def _add_block_bounds(acc, col, q0, q1, q2, q3, exact):
    """acc[i] += the block bound of row i of a sketch column (its four 2-bit codes).

    Every value is cast back to uint8: Numba widens small-int arithmetic to int64, which
    would stop LLVM from running the loop in byte lanes (vpminub/vpaddb)."""
    c3 = np.uint8(CODE_MAX)
    for i in range(SKETCH_ROWS):
        x = col[i]
        lo = np.uint8(_block_min(np.uint8(x & c3), q0, exact) + _block_min(np.uint8((x >> np.uint8(2)) & c3), q1, exact))
        hi = np.uint8(_block_min(np.uint8((x >> np.uint8(4)) & c3), q2, exact) + _block_min(np.uint8(x >> np.uint8(6)), q3, exact))
        acc[i] = np.uint8(acc[i] + np.uint8(lo + hi))


@njit(nogil=True, cache=True)
def sketch_select(qb, sk, pcs, mc, r0, r1, sel, base, m):
    """Rows of [r0, r1) that may pass: a bound on popcount(q AND row) reaches mc[pcs[row]].

    The bound is the sum over 16-bit blocks of min(popcount(q_block), popcount(row_block)),
    an upper bound of the common bits read from the sketch (1/8 of the row's bytes); a
    saturated row code stands for "any", so the bound stays safe. ``qb`` is the query's
    ``query_blocks`` (W x 4); its popcount must be <= ``SKETCH_MAX_POPCOUNT`` (the sum is
    kept in uint8 lanes). Tiles whose popcounts cannot reach the threshold at all are
    skipped unread. Offsets (row - base) are appended to ``sel`` after its first ``m``
    entries; returns the new count.
    """
    w = qb.shape[0]
    acc = np.empty(SKETCH_ROWS, dtype=np.uint8)
    c3 = np.uint8(CODE_MAX)
    one = np.uint64(1)
    for t in range(r0 // SKETCH_ROWS, (r1 + SKETCH_ROWS - 1) // SKETCH_ROWS):
        b0 = t * SKETCH_ROWS
        lo = max(r0, b0)
        hi = min(r1, b0 + SKETCH_ROWS)
        if hi <= lo:
            continue
        p0 = pcs[lo]
        p1 = pcs[hi - 1]
        th = mc[p0]
        for p in range(p0 + 1, p1 + 1):
            th = min(th, mc[p])
        if th > SKETCH_MAX_POPCOUNT:  # no popcount of this tile can reach the threshold
            continue
        acc[:] = 0
        for k in range(w):
            q0 = qb[k, 0]
            q1 = qb[k, 1]
            q2 = qb[k, 2]
            q3 = qb[k, 3]
            if q0 == 0 and q1 == 0 and q2 == 0 and q3 == 0:
                continue
            col = sk[t, k]
            # min(q, code) is exact while every query block has <= 3 bits; otherwise a
            # saturated row code stands for "any". One loop body, specialized both ways
            # (a loop-invariant test inside the loop would stop its vectorization)
            if q0 <= c3 and q1 <= c3 and q2 <= c3 and q3 <= c3:
                _add_block_bounds(acc, col, q0, q1, q2, q3, True)
            else:
                _add_block_bounds(acc, col, q0, q1, q2, q3, False)
        if p0 == p1:  # one popcount in the tile: one threshold, a bit mask of survivors
            thb = np.uint8(th)
            mask = np.uint64(0)
            for i in range(SKETCH_ROWS):
                mask |= np.uint64(acc[i] >= thb) << np.uint64(i)
            if lo > b0:
                mask &= ~((one << np.uint64(lo - b0)) - one)
            if hi < b0 + SKETCH_ROWS:
                mask &= (one << np.uint64(hi - b0)) - one
            while mask:
                sel[m] = b0 + np.int64(cttz64(mask)) - base
                m += 1
                mask &= mask - one
        else:
            for r in range(lo, hi):
                if acc[r - b0] >= mc[pcs[r]]:
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
def threshold_candidates(queries, query_b, min_common, row_lo, row_hi, fps, sketch, pcs, win_lo, win_hi):
    """Pairs (query, row) whose common-bit count passes the query's integer test.

    queries     Q x W uint64     query fingerprints (sorted by popcount for locality)
    query_b     Q x W x 4 uint8  their 16-bit block popcounts (``query_blocks``)
    min_common  Q x (B+1) int32  least common-bit count per target popcount (``Metric.min_common``)
    row_lo/hi   Q int64          each query's candidate rows [lo, hi) (popcount bound)
    fps         N x W uint64     database, rows sorted by popcount
    sketch      uint8[T, W, 64]  database block popcount codes (``block_sketch(fps)``)
    pcs         N int32          database popcounts
    win_lo/hi   int              the row window this call covers (work split)

    Returns ``(query_index int32[M], row int64[M], common int32[M])``. Rows are scanned in
    tiles of ``TILE_ROWS`` and every query visits the tile while it is in cache. Per
    tile and query: (1) the block bound (``sketch_select``) drops most rows after
    reading 1/8 of their bytes (when it keeps more than half of the first
    ``BOUND_PROBE`` rows, or the query has more than ``SKETCH_MAX_POPCOUNT`` bits, the
    tile is counted directly instead); (2) exact popcount(q AND row) of the rest;
    (3) the exact test, appending survivors.
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
    sketchable = np.empty(nq, dtype=np.bool_)
    for j in range(nq):
        lo_all = min(lo_all, max(row_lo[j], win_lo))
        hi_all = max(hi_all, min(row_hi[j], win_hi))
        a = 0
        for k in range(query_b.shape[1]):
            for h in range(4):
                a += query_b[j, k, h]
        sketchable[j] = a <= SKETCH_MAX_POPCOUNT
    lo_all -= lo_all % SKETCH_ROWS  # tiles start on sketch tiles (TILE_ROWS is a multiple)
    for t0 in range(lo_all, hi_all, TILE_ROWS):
        t1 = min(t0 + TILE_ROWS, hi_all)
        for j in range(nq):
            r0 = max(row_lo[j], t0, win_lo)
            r1 = min(row_hi[j], t1)
            if r1 <= r0:
                continue
            mc = min_common[j]
            m = 0
            probe = r1 - r0
            if sketchable[j]:  # probe up to a sketch tile boundary, so no tile is read twice
                pe = min(r1, max(r0 + 1, (r0 + BOUND_PROBE) // SKETCH_ROWS * SKETCH_ROWS))
                probe = pe - r0
                m = sketch_select(query_b[j], sketch, pcs, mc, r0, pe, sel, r0, 0)
            if 2 * m > probe or not sketchable[j]:
                # the bound keeps most rows here (low threshold): count every row directly
                m = r1 - r0
                common_counts(queries[j], fps, r0, r1, cnt)
                for i in range(m):
                    sel[i] = i
            else:
                m = sketch_select(query_b[j], sketch, pcs, mc, r0 + probe, r1, sel, r0, m)
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


@njit(nogil=True, cache=True)
def select_top_k(qi, score, key, q0, q1, k):
    """Indices of the ``k`` best pairs per query, in (query, score descending, key) order.

    ``qi`` int32 query of each pair, ``score`` float64, ``key`` int64 tie order (unique
    per row: the hit id's rank); only queries ``q0 <= qi < q1`` are selected (so disjoint
    query ranges can run in parallel threads). O(n) grouping by query plus a partition per
    query, so a round of top-k over millions of candidate pairs is not a global sort.
    """
    n = qi.shape[0]
    nq = q1 - q0
    starts = np.zeros(nq + 1, dtype=np.int64)
    for i in range(n):
        q = qi[i] - q0
        if 0 <= q < nq:
            starts[q + 1] += 1
    for q in range(nq):
        starts[q + 1] += starts[q]
    order = np.empty(starts[nq], dtype=np.int64)
    fill = starts[:nq].copy()
    for i in range(n):
        q = qi[i] - q0
        if 0 <= q < nq:
            order[fill[q]] = i
            fill[q] += 1
    out = np.empty(starts[nq], dtype=np.int64)
    m = 0
    for q in range(nq):
        g = order[starts[q]:starts[q + 1]]
        if g.size == 0:
            continue
        if g.size > k:  # keep the pairs at or above the k-th best score (ties included)
            neg = -score[g]
            kth = -np.partition(neg, k - 1)[k - 1]
            g = g[score[g] >= kth]
        g = g[np.argsort(key[g], kind="mergesort")]  # by key, then stably by score
        g = g[np.argsort(-score[g], kind="mergesort")]
        take = min(k, g.size)
        out[m:m + take] = g[:take]
        m += take
    return out[:m]


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
def _real_min_common(a, b, t, metric, alpha, beta):
    """The real ``c`` where the score equals ``t`` (a starting guess; nan where none)."""
    if metric == METRIC_TANIMOTO:  # c / (a + b - c) >= t  <=>  c >= t (a + b) / (1 + t)
        return t * (a + b) / (1.0 + t)
    if metric == METRIC_DICE:  # 2c / (a + b) >= t
        return t * (a + b) / 2.0
    gain = 1.0 - t * (1.0 - alpha - beta)  # c gain >= t (alpha a + beta b)
    if gain > 0.0:
        return t * (alpha * a + beta * b) / gain
    return np.nan


@njit(nogil=True, cache=True)
def min_common_table(a, t, nbits, metric, alpha, beta, never):
    """int32[Q, nbits + 1]: least ``c`` with ``_pair_score(c, a[j], b) >= t[j]`` per ``b``.

    ``never`` where even ``c = min(a, b)`` falls short. The search starts from the real
    solution and is confirmed (or redone by bisection) with the float64 score itself, so
    the integer test agrees exactly with the scores returned (``Metric.min_common``).
    """
    nq = a.shape[0]
    out = np.empty((nq, nbits + 1), dtype=np.int32)
    for j in range(nq):
        aj = a[j]
        tj = t[j]
        for b in range(nbits + 1):
            cmax = min(aj, b)
            if _pair_score(cmax, aj, b, metric, alpha, beta) < tj:
                out[j, b] = never
                continue
            lo = 0
            hi = cmax
            g = _real_min_common(np.float64(aj), np.float64(b), tj, metric, alpha, beta)
            if np.isfinite(g):
                glo = min(max(np.int64(np.floor(g)) - 1, 0), cmax)
                ghi = min(max(np.int64(np.ceil(g)) + 1, 0), cmax)
                if (glo == 0 or _pair_score(glo - 1, aj, b, metric, alpha, beta) < tj) and \
                        _pair_score(ghi, aj, b, metric, alpha, beta) >= tj:
                    lo = glo
                    hi = ghi
            while lo < hi:  # scores are non-decreasing in c
                mid = (lo + hi) // 2
                if _pair_score(mid, aj, b, metric, alpha, beta) >= tj:
                    hi = mid
                else:
                    lo = mid + 1
            out[j, b] = lo
    return out


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


# ----------------------------------------------------------------------------- dense top-k

NO_ROW = np.iinfo(np.int64).max  # an empty heap slot's row (loses every tie)


@njit(nogil=True, cache=True)
def heap_top_k(scores, rows, heap_s, heap_r, q0, q1):
    """Fold the score block ``scores`` (float32 [Q, B]; column c is library row ``rows[c]``)
    into each query's running top k, for queries ``q0 <= q < q1`` (disjoint ranges run in
    parallel threads). ``heap_s``/``heap_r`` [Q, k]: a min-heap per query on (score, then
    the larger row is worse): the root is the current k-th best, so most scores are
    rejected by one comparison (faiss's pattern) and the result is the exact top k in
    (score descending, row ascending) order, whatever order the blocks come in. Empty
    slots: score -inf, row ``NO_ROW``. NaN scores are never kept."""
    k = heap_s.shape[1]
    n = scores.shape[1]
    for q in range(q0, q1):
        hs = heap_s[q]
        hr = heap_r[q]
        for c in range(n):
            s = scores[q, c]
            r = rows[c]
            if not (s > hs[0] or (s == hs[0] and r < hr[0])):
                continue
            # replace the root, sift down: a child is worse when its score is lower, or equal with a larger row
            i = 0
            while True:
                lo = 2 * i + 1
                if lo >= k:
                    break
                w = lo
                hi = lo + 1
                if hi < k and (hs[hi] < hs[lo] or (hs[hi] == hs[lo] and hr[hi] > hr[lo])):
                    w = hi
                if hs[w] < s or (hs[w] == s and hr[w] > r):
                    hs[i] = hs[w]
                    hr[i] = hr[w]
                    i = w
                else:
                    break
            hs[i] = s
            hr[i] = r
