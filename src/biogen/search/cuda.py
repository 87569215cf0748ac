"""CUDA engine: the fused scan-and-select kernel of ``kernels/similarity.cu`` run with CuPy.

The database block is uploaded once (constructor); each ``candidates`` call uploads the
small per-query arrays, launches one kernel that counts common bits and appends passing
(query, row, common) triples to output buffers through a global counter, and reads the
triples back. If the counter exceeds the buffers' capacity the buffers are reallocated to
exactly the count and the kernel runs again, so no result is ever lost; if even that does
not fit in GPU memory the query batch is split in halves.

CuPy is optional (``pip install 'biogen[cuda]'``): this module imports without it, and
``cuda_available()`` says whether (and why not) the GPU path can run.
"""

from __future__ import annotations

import numpy as np

from biogen.errors import BiogenError
from biogen.kernels.cuda import _cupy, get_kernel

KERNEL_FILE = "similarity"
FAST_PATHS = {32: "similarity_candidates_w32", 16: "similarity_candidates_w16"}  # n_words -> kernel
GENERIC_KERNEL = "similarity_candidates"
DEFAULT_CAPACITY = 1 << 20  # first guess of result slots per call (16 B each), grown on demand
SHARED_LIMIT = 48 * 1024  # dynamic shared memory a kernel may use without an opt-in attribute
LAUNCH_SHAPES = ((128, 32), (64, 32), (64, 16), (32, 16), (32, 8), (32, 4), (32, 1))  # (threads, queries/group)
BLOCKS_PER_SM = 32  # blocks launched per SM (several waves: balances groups of unequal spans)
UPLOAD_HEADROOM = 256 << 20  # bytes kept free beside the database for query tables and results
MAX_GRID_Y = 65535


def cuda_available() -> tuple[bool, str]:
    """``(True, description)`` if CuPy imports and sees a CUDA device, else ``(False, why)``."""
    try:
        cp = _cupy()
    except BiogenError:
        return False, "cupy not installed (pip install 'biogen[cuda]')"
    except Exception as exc:  # a broken install: CUDA libraries missing or mismatched
        return False, f"cupy failed to import ({type(exc).__name__}: {exc}); reinstall it (pip install 'biogen[cuda]')"
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
        return False, f"no usable CUDA device ({exc})"
    if n < 1:
        return False, "no CUDA device"
    return True, f"{n} CUDA device{'s' if n > 1 else ''}"


def device_count() -> int:
    """Number of CUDA devices CuPy can use (0 without CuPy or a device)."""
    ok, _ = cuda_available()
    return int(_cupy().cuda.runtime.getDeviceCount()) if ok else 0


def free_device_bytes(device: int | None = None) -> int:
    """Free memory of a CUDA device, counting blocks CuPy's pool holds but does not use."""
    cp = _cupy()
    with cp.cuda.Device(device if device is not None else cp.cuda.Device().id):
        free, _total = cp.cuda.runtime.memGetInfo()
        return int(free) + int(cp.get_default_memory_pool().free_bytes())


def launch_shape(n_words: int) -> tuple[int, int, int]:
    """``(threads per block, queries per group, shared bytes)`` for fingerprints of ``n_words``.

    The largest shape whose dynamic shared memory (see the kernel's contract) fits in
    ``SHARED_LIMIT``; raises ``BiogenError`` for fingerprints too wide for any.
    """
    for tpb, group in LAUNCH_SHAPES:
        nbytes = shared_bytes(n_words, tpb, group)
        if nbytes <= SHARED_LIMIT:
            return tpb, group, nbytes
    raise BiogenError(
        f"fingerprints of {64 * n_words} bits are too wide for the GPU kernel (at most about "
        f"{64 * 180} bits); use a smaller fingerprint size or the CPU engine (engine=cpu)"
    )


def shared_bytes(n_words: int, tpb: int, group: int) -> int:
    """Dynamic shared memory of one block: group ranges, group queries, the padded row tile."""
    return 8 * (2 * group + group * n_words + tpb * (n_words | 1))


def grid_shape(row_lo: np.ndarray, row_hi: np.ndarray, n_rows: int, tpb: int, group: int, n_sm: int,
               max_grid: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """``(gx, gy, group)`` of one launch for Q queries with row ranges ``row_lo/hi`` (Q int64).

    ``group`` shrinks to Q for small batches (less shared memory); gy covers the query
    groups (up to ``MAX_GRID_Y``, the kernel strides over more), gx the tiles of ``tpb`` rows
    of the widest group span, capped near ``BLOCKS_PER_SM * n_sm`` blocks in all (the kernel
    strides over the rest). gx == 0 when no query has a row to scan. ``max_grid`` caps
    (gx, gy) further (tests use it to exercise the kernel's grid-stride loops).
    """
    nq = len(row_lo)
    group = max(1, min(group, nq))
    n_groups = -(-nq // group)
    nonempty = row_hi > row_lo
    lo = np.full(n_groups * group, n_rows, np.int64)
    hi = np.zeros(n_groups * group, np.int64)
    lo[:nq] = np.where(nonempty, row_lo, n_rows)
    hi[:nq] = np.where(nonempty, row_hi, 0)
    span = np.maximum(hi.reshape(n_groups, group).max(1) - lo.reshape(n_groups, group).min(1), 0)
    max_tiles = -(-int(span.max(initial=0)) // tpb)
    if max_tiles == 0:
        return 0, 0, group
    gy = min(n_groups, MAX_GRID_Y)
    gx = min(max_tiles, max(1, -(-n_sm * BLOCKS_PER_SM // gy)), 2**31 - 1)
    if max_grid is not None:
        gx, gy = min(gx, max_grid[0]), min(gy, max_grid[1])
    return gx, gy, group


class _TooManyResults(Exception):
    """The result buffers of one call do not fit in GPU memory (split the query batch)."""


class CudaEngine:
    """``SimilarityEngine`` on one CUDA device (see ``biogen.search.engine``).

    fps  N x W uint64  database rows sorted by popcount (uploaded once)
    pcs  N int32       their popcounts
    device             CUDA device id (default: CuPy's current device)
    initial_capacity   result slots allocated before the first launch of a call (grown to
                       the exact count when exceeded; small values exercise that path)
    """

    name = "cuda"

    def __init__(self, fps: np.ndarray, pcs: np.ndarray, device: int | None = None,
                 initial_capacity: int = DEFAULT_CAPACITY):
        cp = _cupy()
        fps = np.ascontiguousarray(fps, dtype=np.uint64)
        pcs = np.ascontiguousarray(pcs, dtype=np.int32)
        if fps.ndim != 2 or fps.shape[1] < 1:
            raise ValueError(f"fps must be N x W uint64 with W >= 1, got shape {fps.shape}")
        if pcs.shape != (fps.shape[0],):
            raise ValueError(f"pcs must have one popcount per row ({fps.shape[0]}), got shape {pcs.shape}")
        if initial_capacity < 0:
            raise ValueError(f"initial_capacity must be >= 0, got {initial_capacity}")
        self.n_rows = int(fps.shape[0])
        self.n_words = int(fps.shape[1])
        self.initial_capacity = int(initial_capacity)
        self._pcs_range = (int(pcs.min()), int(pcs.max())) if self.n_rows else (0, -1)
        if self._pcs_range[0] < 0:
            raise ValueError("pcs holds negative popcounts")
        self._tpb, self._group, _ = launch_shape(self.n_words)
        self._max_grid: tuple[int, int] | None = None  # (gx, gy) cap; tests force grid-stride loops

        ok, why = cuda_available()
        if not ok:
            raise BiogenError(f"the CUDA engine cannot run: {why}; use the CPU engine (engine=cpu)")
        n_dev = int(cp.cuda.runtime.getDeviceCount())
        self.device = int(cp.cuda.Device().id) if device is None else int(device)
        if not 0 <= self.device < n_dev:
            raise BiogenError(f"CUDA device {self.device} does not exist; this machine has devices 0..{n_dev - 1}")
        self._cp = cp
        self._fps = self._pcs = None
        with cp.cuda.Device(self.device):
            self._check_fits(fps.nbytes + pcs.nbytes)
            try:
                self._fps = cp.asarray(fps)  # N x W uint64, device copy
                self._pcs = cp.asarray(pcs)  # N int32
            except cp.cuda.memory.OutOfMemoryError as exc:
                self.close()
                raise BiogenError(self._fit_message(fps.nbytes + pcs.nbytes, f"allocation failed: {exc}")) from None
            self._kernel = get_kernel(KERNEL_FILE, FAST_PATHS.get(self.n_words, GENERIC_KERNEL))
            self._n_sm = int(cp.cuda.Device(self.device).attributes.get("MultiProcessorCount", 108))

    # -- memory ------------------------------------------------------------------------------

    def _free_bytes(self) -> int:
        """Free device memory including blocks CuPy's pool holds but does not use."""
        free, _total = self._cp.cuda.runtime.memGetInfo()
        return int(free) + int(self._cp.get_default_memory_pool().free_bytes())

    def _fit_message(self, need: int, detail: str) -> str:
        return (f"this library part ({need / 2**30:.2f} GiB of fingerprints, {self.n_rows} rows) does not "
                f"fit in the memory of CUDA device {self.device} ({detail}); stream smaller parts "
                f"(SimilarityIndex part_bytes=...), free the GPU (other processes), or use the CPU engine (engine=cpu)")

    def _check_fits(self, need: int) -> None:
        free = self._free_bytes()
        if need + UPLOAD_HEADROOM > free:
            raise BiogenError(self._fit_message(
                need, f"{free / 2**30:.2f} GiB free, {(need + UPLOAD_HEADROOM) / 2**30:.2f} GiB needed "
                      f"with {UPLOAD_HEADROOM >> 20} MiB headroom"))

    # -- search ------------------------------------------------------------------------------

    def candidates(self, queries, min_common, row_lo, row_hi):
        """Passing (query, row, common) triples; see ``biogen.search.engine``.

        queries Q x W uint64, min_common Q x (B+1) int32, row_lo/row_hi Q int64 ->
        (int32 query index, int64 row, int32 common bits), equal lengths, any order.
        """
        if self._fps is None:
            raise BiogenError("this CUDA engine was closed; open the index again")
        queries = np.ascontiguousarray(queries, dtype=np.uint64)
        min_common = np.ascontiguousarray(min_common, dtype=np.int32)
        row_lo = np.ascontiguousarray(row_lo, dtype=np.int64)
        row_hi = np.ascontiguousarray(row_hi, dtype=np.int64)
        nq = int(queries.shape[0]) if queries.ndim == 2 else -1
        if nq < 0 or queries.shape[1] != self.n_words:
            raise ValueError(f"queries must be Q x {self.n_words} uint64 (the library's fingerprint size), "
                             f"got shape {queries.shape}")
        if nq == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
        if min_common.ndim != 2 or min_common.shape[0] != nq:
            raise ValueError(f"min_common must be {nq} x (nbits + 1) int32, got shape {min_common.shape}")
        if row_lo.shape != (nq,) or row_hi.shape != (nq,):
            raise ValueError(f"row_lo and row_hi must have {nq} entries, got {row_lo.shape} and {row_hi.shape}")
        if self._pcs_range[1] >= min_common.shape[1]:
            raise ValueError(f"min_common has {min_common.shape[1]} columns but the database holds a row "
                             f"of popcount {self._pcs_range[1]} (nbits + 1 columns are needed)")
        nonempty = row_hi > row_lo
        if (nonempty & ((row_lo < 0) | (row_hi > self.n_rows))).any():
            raise ValueError(f"row ranges must lie within [0, {self.n_rows}]")
        return self._candidates(queries, min_common, row_lo, row_hi)

    def _candidates(self, queries, min_common, row_lo, row_hi):
        """``candidates`` on validated arrays; splits the batch when the results do not fit."""
        try:
            return self._run(queries, min_common, row_lo, row_hi)
        except _TooManyResults as exc:
            nq = len(queries)
            if nq <= 1:
                raise BiogenError(f"one query has {exc} candidates, more than fit in GPU memory; raise the "
                                  f"threshold or use the CPU engine (engine=cpu)") from None
            h = nq // 2
            a = self._candidates(queries[:h], min_common[:h], row_lo[:h], row_hi[:h])
            b = self._candidates(queries[h:], min_common[h:], row_lo[h:], row_hi[h:])
            return (np.concatenate([a[0], b[0] + np.int32(h)]), np.concatenate([a[1], b[1]]),
                    np.concatenate([a[2], b[2]]))

    def _run(self, queries, min_common, row_lo, row_hi):
        cp = self._cp
        nq = len(queries)
        empty = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32))
        if nq == 0 or self.n_rows == 0:
            return empty
        gx, gy, group = grid_shape(row_lo, row_hi, self.n_rows, self._tpb, self._group, self._n_sm, self._max_grid)
        if gx == 0:
            return empty
        pairs = int(np.maximum(row_hi - row_lo, 0).sum())  # no more results than pairs scanned
        capacity = min(pairs, self.initial_capacity)
        shared = shared_bytes(self.n_words, self._tpb, group)
        with cp.cuda.Device(self.device):
            d_q = cp.asarray(queries)
            d_mc = cp.asarray(min_common)
            d_lo = cp.asarray(row_lo)
            d_hi = cp.asarray(row_hi)
            counter = cp.zeros(1, dtype=cp.uint64)
            relaunched = False
            while True:
                out = self._alloc(capacity)
                counter.fill(0)
                self._kernel(
                    (gx, gy), (self._tpb,),
                    (d_q, d_mc, d_lo, d_hi, np.int64(nq), np.int32(min_common.shape[1]),
                     self._fps, self._pcs, np.int64(self.n_rows), np.int32(self.n_words), np.int32(group),
                     out[0], out[1], out[2], np.uint64(capacity), counter),
                    shared_mem=shared,
                )
                n = int(counter.get()[0])
                if relaunched and n != capacity:  # pragma: no cover - the pair set is deterministic
                    raise RuntimeError(f"CUDA similarity kernel: {capacity} results, then {n} on relaunch")
                if n <= capacity:
                    return tuple(cp.asnumpy(a[:n]) for a in out)
                del out
                capacity, relaunched = n, True  # exactly the count: the relaunch writes every result

    def _alloc(self, capacity: int):
        """Result buffers of ``capacity`` slots (at least 1); ``_TooManyResults`` if they cannot fit."""
        cp = self._cp
        slots = max(capacity, 1)
        for attempt in range(2):
            try:
                return (cp.empty(slots, cp.int32), cp.empty(slots, cp.int64), cp.empty(slots, cp.int32))
            except cp.cuda.memory.OutOfMemoryError:
                if attempt == 0:
                    cp.get_default_memory_pool().free_all_blocks()
        raise _TooManyResults(capacity)

    def close(self) -> None:
        """Free the device copy of the database (idempotent)."""
        if getattr(self, "_fps", None) is None and getattr(self, "_pcs", None) is None:
            return
        cp = self._cp
        self._fps = self._pcs = None
        with cp.cuda.Device(self.device):
            cp.get_default_memory_pool().free_all_blocks()
