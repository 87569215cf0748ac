"""CUDA engine (``kernels/similarity.cu`` + ``biogen.search.cuda``) against the CPU engine.

GPU tests (``@pytest.mark.gpu``) run the real kernel and skip only without cupy or a
device. Without a GPU the kernel source still runs here: ``test_emulated_kernel_*``
compiles ``similarity.cu`` with the host C++ compiler against a small emulation of the
CUDA execution model (threads of a block as OS threads, ``__syncthreads`` and warp
ballots/shuffles as barriers) and checks it against the CPU engine, so index arithmetic,
range clipping, grid-stride loops, warp-aggregated appends and the overflow count are
tested on every machine. Real-GPU-only behaviour (memory model, alignment, NVRTC) is
covered by the GPU tests.
"""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess

import numpy as np
import pytest

from biogen.errors import BiogenError
from biogen.resources import kernel_dir
from biogen.search.cpu import CpuEngine
from biogen.search.cuda import FAST_PATHS, grid_shape, launch_shape, shared_bytes
from biogen.search.metrics import NEVER, Metric

from .test_kernels import _cupy_or_skip

METRICS = (Metric("tanimoto"), Metric("dice"), Metric("tversky", 0.3, 0.7))
THRESHOLDS = (0.0, 0.4, 0.7, 1.0)


# -- data ------------------------------------------------------------------------------------


def random_library(rng, n: int, nbits: int, mean_bits: int = 45) -> tuple[np.ndarray, np.ndarray]:
    """N x W uint64 sparse fingerprints sorted by popcount, and their int32 popcounts.

    Rows come in clusters (a random base fingerprint, ~15% of its bits dropped, a few
    added) so that scores spread over the whole [0, 1] range, as in real libraries.
    """
    w = -(-nbits // 64)
    n_clusters = max(1, n // 500)
    density = rng.uniform(0.3, 1.7, size=(n_clusters, 1)) * mean_bits / nbits
    base = rng.random((n_clusters, nbits)) < np.clip(density, 0.0, 0.5)
    parts = []
    for s in range(0, n, 5000):
        m = min(5000, n - s)
        k = rng.integers(0, n_clusters, m)
        bits = np.zeros((m, w * 64), bool)
        bits[:, :nbits] = (base[k] & (rng.random((m, nbits)) >= 0.15)) | (rng.random((m, nbits)) < 0.1 * density[k])
        parts.append(np.packbits(bits, axis=1, bitorder="little").view("<u8").astype(np.uint64))
    fps = np.concatenate(parts) if parts else np.zeros((0, w), np.uint64)
    pcs = np.bitwise_count(fps).sum(axis=1, dtype=np.int32)
    order = np.argsort(pcs, kind="stable")
    return fps[order], pcs[order]


def random_queries(rng, fps: np.ndarray, nq: int, nbits: int) -> np.ndarray:
    """Q x W queries sorted by popcount: half lightly mutated library rows (near and exact
    hits), half fresh random fingerprints."""
    q = fps[rng.integers(0, len(fps), nq)].copy()
    flip = (rng.random(q.shape) < 0.03) & (np.arange(nq) % 4 != 0)[:, None]  # every 4th: exact copy
    q ^= np.where(flip, np.uint64(1) << rng.integers(0, 64, q.shape, dtype=np.uint64), np.uint64(0))
    fresh, _ = random_library(rng, nq - nq // 2, nbits)
    q[nq // 2:] = fresh
    if nbits % 64:
        q[:, -1] &= np.uint64((1 << (nbits % 64)) - 1)
    return q[np.argsort(np.bitwise_count(q).sum(axis=1), kind="stable")]


def tables(queries: np.ndarray, nbits: int, metric: Metric | None = None, threshold: float | None = None):
    """Q x (B+1) min_common: one metric/threshold, or cycling through METRICS and the
    thresholds 0.4, 0.7, 1.0 (0.0, where every scanned row passes, for every 50th query)."""
    a = np.bitwise_count(queries).sum(axis=1)
    rows = []
    for i, ai in enumerate(a):
        m = metric or METRICS[i % len(METRICS)]
        t = (0.0 if i % 50 == 0 else THRESHOLDS[1 + (i // len(METRICS)) % 3]) if threshold is None else threshold
        rows.append(np.asarray(m.min_common(int(ai), t, nbits)).reshape(-1))
    return np.stack(rows).astype(np.int32) if rows else np.zeros((0, nbits + 1), np.int32)


def ranges(mc: np.ndarray, pcs: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query the row interval of the popcounts whose test can pass (the planner's bound)."""
    starts = np.searchsorted(pcs, np.arange(nbits + 2), side="left")
    reach = mc != NEVER
    anyr = reach.any(axis=1)
    b_lo = reach.argmax(axis=1)
    b_hi = reach.shape[1] - 1 - reach[:, ::-1].argmax(axis=1)
    lo = np.where(anyr, starts[b_lo], 0).astype(np.int64)
    hi = np.where(anyr, starts[b_hi + 1], 0).astype(np.int64)
    return lo, hi


def odd_ranges(rng, lo, hi, n_rows):
    """Some ranges replaced by arbitrary windows (not popcount-aligned), some emptied."""
    lo, hi = lo.copy(), hi.copy()
    k = rng.random(len(lo)) < 0.3
    lo[k] = rng.integers(0, max(n_rows, 1), k.sum())
    hi[k] = np.minimum(lo[k] + rng.integers(-5, 900, k.sum()), n_rows)
    e = rng.random(len(lo)) < 0.1
    hi[e] = lo[e]  # lo == hi: nothing to scan
    return lo, hi


def as_sorted(triples):
    q, r, c = (np.asarray(x) for x in triples)
    o = np.lexsort((r, q))
    return q[o], r[o], c[o]


def assert_same(got, want):
    assert got[0].dtype == np.int32 and got[1].dtype == np.int64 and got[2].dtype == np.int32
    assert len(got[0]) == len(got[1]) == len(got[2])
    for a, b in zip(as_sorted(got), as_sorted(want)):
        np.testing.assert_array_equal(a, b)


# -- without a GPU -----------------------------------------------------------------------------


def _block_cupy(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_without_cupy_the_engine_says_how_to_install(monkeypatch):
    from biogen.search import cuda

    _block_cupy(monkeypatch)
    ok, why = cuda.cuda_available()
    assert ok is False and "pip install 'biogen[cuda]'" in why
    assert cuda.device_count() == 0
    fps = np.zeros((4, 32), np.uint64)
    with pytest.raises(BiogenError, match="pip install"):
        cuda.CudaEngine(fps, np.zeros(4, np.int32))


def test_cuda_available_describes_this_machine():
    from biogen.search.cuda import cuda_available, device_count

    ok, why = cuda_available()
    assert isinstance(ok, bool) and why
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert not ok and "pip install" in why
    assert (device_count() > 0) == ok


def test_launch_shapes_fit_shared_memory():
    for w in range(1, 181):
        tpb, group, nbytes = launch_shape(w)
        assert tpb % 32 == 0 and group >= 1 and nbytes == shared_bytes(w, tpb, group) <= 48 * 1024
    assert launch_shape(32)[:2] == (128, 32)
    with pytest.raises(BiogenError, match="too wide"):
        launch_shape(4096)


def test_grid_shape():
    lo, hi = np.array([0, 10, 7]), np.array([1000, 10, 3])  # one real range, two empty
    assert grid_shape(lo, hi, 1000, 128, 32, 4) == (8, 1, 3)
    assert grid_shape(lo, hi, 1000, 128, 32, 4, max_grid=(2, 5)) == (2, 1, 3)
    assert grid_shape(np.array([5]), np.array([5]), 1000, 128, 32, 4)[0] == 0
    gx, gy, group = grid_shape(np.zeros(100, np.int64), np.full(100, 10**6), 10**6, 128, 32, 100)
    assert (gy, group) == (4, 32) and gx * gy >= 100 * 32 - 4


# -- emulated kernel (host C++) -----------------------------------------------------------------

HARNESS = r"""
// Host emulation of the CUDA execution model for kernels/similarity.cu (tests only): the
// threads of a block are OS threads, __syncthreads is a block barrier, warp ballots and
// shuffles exchange through per-warp slots between two warp barriers (a lane that does not
// reach a full-mask ballot deadlocks the test, as divergence would be a bug), blocks run one
// after another with the shared array reused.
#if !__has_include(<barrier>)
#error NO_CXX20_BARRIER
#endif
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
struct alignas(16) ulonglong2 { unsigned long long x, y; };
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
unsigned long long smem[1 << 16];

struct Warp { std::barrier<> bar{32}; unsigned long long slot[32]; };
static std::barrier<>* block_bar;
static std::vector<std::unique_ptr<Warp>> warps;

static void fail(const char* what) { std::fprintf(stderr, "%s\n", what); std::abort(); }
static inline void __syncthreads() { block_bar->arrive_and_wait(); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static unsigned long long exchange(unsigned mask, unsigned long long v, int src, bool ballot) {
    if (mask != 0xffffffffu) fail("partial warp mask");
    Warp& w = *warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = v;
    w.bar.arrive_and_wait();
    unsigned long long r = 0;
    if (ballot) { for (int i = 0; i < 32; ++i) if (w.slot[i]) r |= 1ull << i; }
    else { if (src < 0 || src > 31) fail("shfl source lane"); r = w.slot[src]; }
    w.bar.arrive_and_wait();
    return r;
}
static inline unsigned __ballot_sync(unsigned mask, bool p) { return (unsigned)exchange(mask, p, 0, true); }
static inline unsigned long long __shfl_sync(unsigned mask, unsigned long long v, int src) {
    return exchange(mask, v, src, false);
}

#include "similarity.cu"

template <class T> static T* take(FILE* f, long long n) {  // 256-byte aligned like CuPy, exact size (ASan)
    void* p = nullptr;
    if (posix_memalign(&p, 256, (size_t)(n > 0 ? n : 1) * sizeof(T)) != 0) fail("out of memory");
    if (f && n > 0 && std::fread(p, sizeof(T), (size_t)n, f) != (size_t)n) fail("short input");
    return static_cast<T*>(p);
}

int main(int argc, char** argv) {
    if (argc != 3) fail("usage: harness IN OUT");
    FILE* f = std::fopen(argv[1], "rb");
    long long h[10];
    if (!f || std::fread(h, 8, 10, f) != 10) fail("short header");
    const long long n_rows = h[0], n_words = h[1], nq = h[2], mc_stride = h[3], entry = h[4];
    const long long tpb = h[5], group = h[6], gx = h[7], gy = h[8];
    const unsigned long long capacity = (unsigned long long)h[9];
    auto* fps = take<unsigned long long>(f, n_rows * n_words);
    auto* pcs = take<int>(f, n_rows);
    auto* q = take<unsigned long long>(f, nq * n_words);
    auto* mc = take<int>(f, nq * mc_stride);
    auto* lo = take<long long>(f, nq);
    auto* hi = take<long long>(f, nq);
    std::fclose(f);
    if (tpb % 32 || 8 * (2 * group + group * n_words + tpb * (n_words | 1)) > (long long)sizeof(smem)) fail("shape");
    auto* oq = take<int>(nullptr, (long long)capacity);
    auto* orow = take<long long>(nullptr, (long long)capacity);
    auto* oc = take<int>(nullptr, (long long)capacity);
    unsigned long long counter = 0;
    auto fn = entry == 32 ? similarity_candidates_w32 : entry == 16 ? similarity_candidates_w16 : similarity_candidates;
    blockDim.x = (unsigned)tpb;
    gridDim.x = (unsigned)gx;
    gridDim.y = (unsigned)gy;
    for (long long by = 0; by < gy; ++by) {
        for (long long bx = 0; bx < gx; ++bx) {
            blockIdx.x = (unsigned)bx;
            blockIdx.y = (unsigned)by;
            std::barrier<> bb((std::ptrdiff_t)tpb);
            block_bar = &bb;
            warps.clear();
            for (long long i = 0; i < tpb / 32; ++i) warps.emplace_back(new Warp);
            std::vector<std::thread> threads;
            for (long long t = 0; t < tpb; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx.x = (unsigned)t;
                    fn(q, mc, lo, hi, nq, (int)mc_stride, fps, pcs, n_rows, (int)n_words, (int)group,
                       oq, orow, oc, capacity, &counter);
                });
            }
            for (auto& th : threads) th.join();
        }
    }
    FILE* o = std::fopen(argv[2], "wb");
    const unsigned long long n = counter < capacity ? counter : capacity;
    std::fwrite(&counter, 8, 1, o);
    std::fwrite(oq, 4, n, o);
    std::fwrite(orow, 8, n, o);
    std::fwrite(oc, 4, n, o);
    std::fclose(o);
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to run the emulated kernel")
    d = tmp_path_factory.mktemp("similarity_emu")
    (d / "harness.cpp").write_text(HARNESS)
    base = [cxx, "-std=c++20", "-O1", "-g", "-pthread", f"-I{kernel_dir()}", "-o", str(d / "harness"),
            str(d / "harness.cpp")]
    # AddressSanitizer catches reads past the database or output buffers; UBSan misaligned
    # 16-byte loads and signed overflow. Without sanitizer runtimes, plain build.
    p = subprocess.run(base + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        p = subprocess.run(base, capture_output=True, text=True)
    if "NO_CXX20_BARRIER" in p.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    assert p.returncode == 0, p.stderr
    return d


def emulate(harness, fps, pcs, queries, mc, lo, hi, *, entry, tpb, group, gx, gy, capacity):
    """Run the kernel entry point (32, 16 or 0 = generic) in the emulator; (counter, triples)."""
    header = np.array([len(fps), fps.shape[1], len(queries), mc.shape[1], entry, tpb, group, gx, gy, capacity],
                      np.int64)
    with open(harness / "in.bin", "wb") as f:
        for a, dt in ((header, np.int64), (fps, np.uint64), (pcs, np.int32), (queries, np.uint64),
                      (mc, np.int32), (lo, np.int64), (hi, np.int64)):
            f.write(np.ascontiguousarray(a, dtype=dt).tobytes())
    p = subprocess.run([str(harness / "harness"), str(harness / "in.bin"), str(harness / "out.bin")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert p.returncode == 0, p.stderr
    raw = (harness / "out.bin").read_bytes()
    count = int(np.frombuffer(raw[:8], np.uint64)[0])
    n = min(count, capacity)
    q = np.frombuffer(raw, np.int32, n, 8)
    r = np.frombuffer(raw, np.int64, n, 8 + 4 * n)
    c = np.frombuffer(raw, np.int32, n, 8 + 12 * n)
    return count, (q, r, c)


@pytest.mark.parametrize("nbits,entry", [(2048, 32), (1024, 16), (167, 0), (2048, 0)],
                         ids=["w32", "w16", "maccs-generic", "w32-generic"])
def test_emulated_kernel_matches_cpu_engine(harness, nbits, entry):
    rng = np.random.default_rng(nbits + entry)
    fps, pcs = random_library(rng, 3000, nbits)
    queries = random_queries(rng, fps, 70, nbits)
    mc = tables(queries, nbits)
    lo, hi = odd_ranges(rng, *ranges(mc, pcs, nbits), len(fps))
    want = CpuEngine(fps, pcs, workers=2).candidates(queries, mc, lo, hi)
    assert len(want[0]) > 1000
    w = fps.shape[1]
    assert entry == 0 or FAST_PATHS[w].endswith(f"_w{entry}")
    tpb, group, _ = launch_shape(w)
    # the engine's own launch shape on a small GPU (grid-stride over tiles and groups), then a
    # cramped one: 1 x 1 grid, 32 threads, groups of 5 queries
    gx, gy, group = grid_shape(lo, hi, len(fps), tpb, group, n_sm=1, max_grid=(5, 2))
    for kw in (dict(tpb=tpb, group=group, gx=gx, gy=gy), dict(tpb=32, group=5, gx=1, gy=1)):
        count, got = emulate(harness, fps, pcs, queries, mc, lo, hi, entry=entry, capacity=10**7, **kw)
        assert count == len(want[0])
        assert_same(got, want)
    # overflow: the counter still counts every pass; the slots written are a subset
    count, got = emulate(harness, fps, pcs, queries, mc, lo, hi, entry=entry, capacity=17,
                         tpb=tpb, group=group, gx=gx, gy=gy)
    assert count == len(want[0]) and len(got[0]) == 17
    assert set(zip(*(a.tolist() for a in got))) <= set(zip(*(a.tolist() for a in want)))


def test_emulated_kernel_with_nothing_to_scan(harness):
    rng = np.random.default_rng(3)
    fps, pcs = random_library(rng, 500, 2048)
    queries = random_queries(rng, fps, 40, 2048)
    mc = tables(queries, 2048, Metric("tanimoto"), 0.0)  # everything would pass...
    lo = np.full(40, 250, np.int64)
    hi = lo.copy()  # ...but every range is empty
    count, got = emulate(harness, fps, pcs, queries, mc, lo, hi, entry=32, capacity=100, tpb=128, group=32, gx=3, gy=2)
    assert count == 0 and len(got[0]) == 0


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library_2048():
    return random_library(np.random.default_rng(11), 60_000, 2048)


@pytest.mark.gpu
def test_one_query_over_the_full_library():
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    rng = np.random.default_rng(1)
    fps, pcs = random_library(rng, 400_003, 2048)
    cpu, gpu = CpuEngine(fps, pcs), CudaEngine(fps, pcs)
    try:
        q = random_queries(rng, fps, 2, 2048)[:1]
        full = (np.zeros(1, np.int64), np.full(1, len(fps), np.int64))
        for metric in METRICS:
            for t in THRESHOLDS:
                mc = tables(q, 2048, metric, t)
                assert_same(gpu.candidates(q, mc, *full), cpu.candidates(q, mc, *full))
        zeros = np.zeros((1, 2049), np.int32)  # every row passes: 400,003 results, past the first capacity
        got = gpu.candidates(q, zeros, *full)
        assert len(got[0]) == len(fps)
        assert_same(got, cpu.candidates(q, zeros, *full))
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.gpu
@pytest.mark.parametrize("nbits", [2048, 1024, 167, 512], ids=["w32", "w16", "w3", "w8"])
def test_batch_of_1000_queries_matches_cpu(nbits, library_2048):
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    rng = np.random.default_rng(nbits)
    fps, pcs = library_2048 if nbits == 2048 else random_library(rng, 40_000, nbits)
    queries = random_queries(rng, fps, 1000, nbits)
    mc = tables(queries, nbits)  # tanimoto, dice, tversky(0.3, 0.7) x 0.0, 0.4, 0.7, 1.0
    lo, hi = ranges(mc, pcs, nbits)
    cpu, gpu = CpuEngine(fps, pcs), CudaEngine(fps, pcs)
    try:
        want = cpu.candidates(queries, mc, lo, hi)
        assert_same(gpu.candidates(queries, mc, lo, hi), want)
        lo2, hi2 = odd_ranges(rng, lo, hi, len(fps))
        assert_same(gpu.candidates(queries, mc, lo2, hi2), cpu.candidates(queries, mc, lo2, hi2))
        gpu._max_grid = (3, 2)  # force the kernel's grid-stride loops over tiles and groups
        assert_same(gpu.candidates(queries, mc, lo, hi), want)
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.gpu
def test_each_metric_and_threshold_separately(library_2048):
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    fps, pcs = library_2048
    rng = np.random.default_rng(5)
    queries = random_queries(rng, fps, 300, 2048)
    cpu, gpu = CpuEngine(fps, pcs), CudaEngine(fps, pcs)
    try:
        for metric in METRICS:
            for t in THRESHOLDS:
                mc = tables(queries, 2048, metric, t)
                lo, hi = ranges(mc, pcs, 2048)
                assert_same(gpu.candidates(queries, mc, lo, hi), cpu.candidates(queries, mc, lo, hi))
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.gpu
@pytest.mark.parametrize("initial_capacity", [0, 1, 1000])
def test_overflow_relaunches_with_the_exact_capacity(initial_capacity, library_2048):
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    fps, pcs = library_2048
    rng = np.random.default_rng(6)
    queries = random_queries(rng, fps, 200, 2048)
    mc = tables(queries, 2048, Metric("tanimoto"), 0.0)  # every scanned row passes
    lo = rng.integers(0, len(fps) - 600, 200)
    hi = lo + rng.integers(0, 600, 200)
    want = CpuEngine(fps, pcs).candidates(queries, mc, lo, hi)
    assert len(want[0]) > 10 * max(initial_capacity, 1)
    gpu = CudaEngine(fps, pcs, initial_capacity=initial_capacity)
    try:
        assert_same(gpu.candidates(queries, mc, lo, hi), want)
        assert_same(gpu.candidates(queries, mc, lo, hi), want)  # again, same engine
    finally:
        gpu.close()


@pytest.mark.gpu
def test_empty_ranges_zero_queries_and_empty_library(library_2048):
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    fps, pcs = library_2048
    rng = np.random.default_rng(8)
    queries = random_queries(rng, fps, 50, 2048)
    mc = tables(queries, 2048, Metric("tanimoto"), 0.0)
    gpu = CudaEngine(fps, pcs)
    try:
        lo = rng.integers(0, len(fps), 50)
        got = gpu.candidates(queries, mc, lo, lo)  # lo == hi everywhere
        assert all(len(a) == 0 for a in got)
        hi = lo.copy()
        hi[7] = min(lo[7] + 1000, len(fps))  # one query with rows, the rest empty
        want = CpuEngine(fps, pcs, workers=1).candidates(queries, mc, lo, hi)
        assert_same(gpu.candidates(queries, mc, lo, hi), want)
        assert set(gpu.candidates(queries, mc, lo, hi)[0].tolist()) == {7}
        got = gpu.candidates(queries[:0], mc[:0], lo[:0], hi[:0])  # zero queries
        assert [a.dtype for a in got] == [np.int32, np.int64, np.int32] and all(len(a) == 0 for a in got)
    finally:
        gpu.close()
    gpu.close()  # idempotent
    with pytest.raises(BiogenError, match="closed"):
        gpu.candidates(queries, mc, lo, hi)
    empty = CudaEngine(np.zeros((0, 32), np.uint64), np.zeros(0, np.int32))
    assert empty.n_rows == 0 and all(len(a) == 0 for a in empty.candidates(queries, mc, lo * 0, lo * 0))
    empty.close()


@pytest.mark.gpu
def test_upload_checks_free_memory_and_device(monkeypatch):
    cp = _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    fps, pcs = random_library(np.random.default_rng(9), 1000, 2048)
    with pytest.raises(BiogenError, match="does not exist"):
        CudaEngine(fps, pcs, device=cp.cuda.runtime.getDeviceCount())
    monkeypatch.setattr(cp.cuda.runtime, "memGetInfo", lambda: (1 << 20, 80 << 30))
    monkeypatch.setattr(cp, "get_default_memory_pool", lambda: type("P", (), {"free_bytes": lambda self: 0})())
    with pytest.raises(BiogenError, match="does not fit in the memory of CUDA device"):
        CudaEngine(fps, pcs)


@pytest.mark.gpu
def test_bad_arguments_are_rejected(library_2048):
    _cupy_or_skip()
    from biogen.search.cuda import CudaEngine

    fps, pcs = library_2048
    gpu = CudaEngine(fps[-100:], pcs[-100:], device=0)  # the rows of highest popcount (sorted library)
    try:
        assert pcs[-100:].max() >= 10  # so that a table of 10 columns lacks one this part needs
        q = fps[:2]
        mc = np.zeros((2, 2049), np.int32)
        with pytest.raises(ValueError, match="queries must be Q x 32"):
            gpu.candidates(q[:, :16], mc, np.zeros(2, np.int64), np.ones(2, np.int64))
        with pytest.raises(ValueError, match="within"):
            gpu.candidates(q, mc, np.zeros(2, np.int64), np.full(2, 101, np.int64))
        with pytest.raises(ValueError, match="columns"):
            gpu.candidates(q, mc[:, :10], np.zeros(2, np.int64), np.ones(2, np.int64))
    finally:
        gpu.close()
