// similarity.cu — fused threshold scan: common-bit counts and selection in one pass
// (CuPy RawModule via NVRTC with -std=c++17, or nvcc). Used by biogen.search.cuda.CudaEngine.
//
// Contract
//   inputs : queries    const uint64 [n_queries * n_words], row-major, biogen's library layout
//                       (fingerprint bit i is bit i % 64 of word i / 64); queries sorted by
//                       popcount so neighbours share row ranges (not needed for correctness)
//            min_common const int32 [n_queries * mc_stride], mc_stride = nbits + 1:
//                       min_common[q * mc_stride + b] = least popcount(query q AND row) that a
//                       row of popcount b needs (any value > 64 * n_words, e.g. 1 << 30, = never)
//            row_lo     const int64 [n_queries]  query q scans rows [row_lo[q], row_hi[q]);
//            row_hi     const int64 [n_queries]  lo >= hi = nothing; clamped to [0, n_rows]
//            n_queries  int64
//            mc_stride  int32 (nbits + 1)
//            fps        const uint64 [n_rows * n_words], row-major, rows sorted by popcount;
//                       16-byte aligned (any CuPy allocation is) for the _w32 / _w16 entry points
//            pcs        const int32 [n_rows], 0 <= pcs[r] < mc_stride
//            n_rows     int64
//            n_words    int32, 64-bit words per fingerprint (the _w32 / _w16 entry points
//                       require n_words == 32 / 16; similarity_candidates takes any n_words >= 1)
//            group_size int32 QG, queries per block group (1 <= QG <= 32 is what the host uses)
//            capacity   uint64, slots in each output buffer
//   output : out_query  int32 [capacity]   one entry per passing pair (q, r): row_lo[q] <= r <
//            out_row    int64 [capacity]   row_hi[q] and c = popcount(query q AND fps[r]) >=
//            out_common int32 [capacity]   min_common[q * mc_stride + pcs[r]]; entry = (q, r, c),
//                                          in no particular order, written only if its slot <
//                                          capacity
//            counter    uint64 [1], zeroed by the caller; counts EVERY passing pair (also those
//                       not written), so counter > capacity means overflow: the host reallocates
//                       the buffers to exactly counter slots, zeroes it and launches again.
//   launch : block (TPB, 1, 1), TPB a multiple of 32 (warp-aggregated appends use full-warp
//            ballots); grid (gx, gy) of any size >= 1: blockIdx.y strides over query groups of QG
//            consecutive queries, blockIdx.x strides over tiles of TPB rows of the group's row
//            span (union of its queries' ranges). Dynamic shared memory, in bytes:
//            8 * (2 * QG + QG * n_words + TPB * (n_words | 1)).
//
// Design. A block stages its group's QG queries and ranges in shared memory, then walks tiles
// of TPB consecutive database rows: a tile is copied global -> shared with a flat, coalesced
// loop (consecutive threads read consecutive words; 16-byte loads when n_words is even), each
// thread then owns one row of the tile (in registers for the _w32 / _w16 entry points, read
// from shared memory otherwise; the shared row stride n_words | 1 is odd, so the per-thread
// row reads are free of bank conflicts) and tests it against every query of the group whose
// range covers it, reading the query words as shared-memory broadcasts. Database traffic is
// thus paid once per group of QG queries, not once per query. Passing pairs are appended with
// one atomicAdd per warp and query (ballot + prefix popcount). No score matrix, no sort.

typedef unsigned long long u64;

__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long lmax(long long a, long long b) { return a > b ? a : b; }

// The thread's database row: WT words in registers (WT > 0), or a pointer into the shared tile.
template <int WT>
struct Row {
    u64 w[WT];
    __device__ __forceinline__ void load(const u64* s) {
#pragma unroll
        for (int k = 0; k < WT; ++k) {
            w[k] = s[k];
        }
    }
    __device__ __forceinline__ int common(const u64* q, int) const {
        int c = 0;
#pragma unroll
        for (int k = 0; k < WT; ++k) {
            c += __popcll(q[k] & w[k]);
        }
        return c;
    }
};

template <>
struct Row<0> {
    const u64* p;
    __device__ __forceinline__ void load(const u64* s) { p = s; }
    __device__ __forceinline__ int common(const u64* q, int n_words) const {
        int c = 0;
        for (int k = 0; k < n_words; ++k) {
            c += __popcll(q[k] & p[k]);
        }
        return c;
    }
};

// Copy rows [t0, t0 + nt) of fps (flat words) into the shared tile, row stride sw.
template <int WT>
__device__ __forceinline__ void load_tile(const u64* __restrict__ fps, long long t0, int nt, int w,
                                          int sw, u64* s_rows)
{
    if constexpr (WT > 0 && WT % 2 == 0) {
        // 16-byte loads: t0 * WT words is a multiple of 2, so src is 16-byte aligned; both words
        // of a pair lie in the same row (WT even).
        const ulonglong2* src = reinterpret_cast<const ulonglong2*>(fps + t0 * WT);
        const int n_pairs = nt * (WT / 2);
#pragma unroll 4
        for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
            const ulonglong2 v = src[i];
            const int rr = (2 * i) / WT;
            const int k = 2 * i - rr * WT;
            s_rows[rr * sw + k] = v.x;
            s_rows[rr * sw + k + 1] = v.y;
        }
    } else {
        const u64* src = fps + t0 * w;
        const int n_flat = nt * w;
#pragma unroll 4
        for (int i = threadIdx.x; i < n_flat; i += blockDim.x) {
            const int rr = i / w;
            s_rows[rr * sw + (i - rr * w)] = src[i];
        }
    }
}

template <int WT>
__device__ __forceinline__ void candidates_impl(
    const u64* __restrict__ queries, const int* __restrict__ min_common,
    const long long* __restrict__ row_lo, const long long* __restrict__ row_hi,
    const long long n_queries, const int mc_stride,
    const u64* __restrict__ fps, const int* __restrict__ pcs, const long long n_rows,
    const int n_words, const int group_size,
    int* __restrict__ out_query, long long* __restrict__ out_row, int* __restrict__ out_common,
    const u64 capacity, u64* __restrict__ counter)
{
    const int w = WT > 0 ? WT : n_words;
    const int sw = w | 1;          // odd shared row stride: conflict-free per-thread row reads
    const int qg = group_size;
    const int tpb = blockDim.x;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const unsigned lanes_below = (1u << lane) - 1u;

    extern __shared__ u64 smem[];
    long long* s_lo = reinterpret_cast<long long*>(smem);  // [qg] clamped ranges
    long long* s_hi = s_lo + qg;                            // [qg]
    u64* s_q = smem + 2 * qg;                               // [qg * w] group queries
    u64* s_rows = s_q + qg * w;                             // [tpb * sw] row tile

    const long long n_groups = (n_queries + qg - 1) / qg;
    for (long long g = blockIdx.y; g < n_groups; g += gridDim.y) {
        const long long q0 = g * qg;
        const int gq = (int)lmin((long long)qg, n_queries - q0);  // >= 1

        __syncthreads();  // the previous group's shared data is no longer read
        for (int j = tid; j < gq; j += tpb) {
            const long long lo = lmax(row_lo[q0 + j], 0);
            const long long hi = lmin(row_hi[q0 + j], n_rows);
            s_lo[j] = lo;
            s_hi[j] = lmax(hi, lo);  // empty ranges become lo == hi
        }
        const u64* qsrc = queries + q0 * w;
        for (int i = tid; i < gq * w; i += tpb) {
            s_q[i] = qsrc[i];
        }
        __syncthreads();

        // The group's row span: union hull of its non-empty ranges (block-uniform values).
        long long span_lo = n_rows;
        long long span_hi = 0;
        for (int j = 0; j < gq; ++j) {
            if (s_lo[j] < s_hi[j]) {
                span_lo = lmin(span_lo, s_lo[j]);
                span_hi = lmax(span_hi, s_hi[j]);
            }
        }

        for (long long t0 = span_lo + (long long)blockIdx.x * tpb; t0 < span_hi;
             t0 += (long long)gridDim.x * tpb) {
            const int nt = (int)lmin((long long)tpb, span_hi - t0);  // rows in this tile, >= 1
            const long long t1 = t0 + nt;

            __syncthreads();  // the previous tile is no longer read
            load_tile<WT>(fps, t0, nt, w, sw, s_rows);
            __syncthreads();

            const bool valid = tid < nt;
            const long long r = t0 + tid;
            const int b = valid ? pcs[r] : 0;
            Row<WT> row;
            row.load(s_rows + tid * sw);  // in bounds for every tid; unused when !valid

            for (int j = 0; j < gq; ++j) {
                const long long lo = s_lo[j];
                const long long hi = s_hi[j];
                if (hi <= t0 || lo >= t1) {
                    continue;  // block-uniform: the whole tile is outside query j's range
                }
                const long long q = q0 + j;
                bool pass = false;
                int c = 0;
                if (valid && r >= lo && r < hi) {
                    const int need = min_common[q * mc_stride + b];  // load overlaps the count
                    c = row.common(s_q + j * w, w);
                    pass = c >= need;
                }
                // Warp-aggregated append: every lane of the warp reaches this ballot (the loop
                // bounds and the skip above are block-uniform, TPB is a multiple of 32).
                const unsigned mask = __ballot_sync(0xffffffffu, pass);
                if (mask != 0u) {
                    const int leader = __ffs(mask) - 1;
                    u64 base = 0;
                    if (lane == leader) {
                        base = atomicAdd(counter, (u64)__popc(mask));
                    }
                    base = __shfl_sync(0xffffffffu, base, leader);
                    if (pass) {
                        const u64 slot = base + (u64)__popc(mask & lanes_below);
                        if (slot < capacity) {
                            out_query[slot] = (int)q;
                            out_row[slot] = r;
                            out_common[slot] = c;
                        }
                    }
                }
            }
        }
    }
}

#define SIMILARITY_ARGS                                                                       \
    const u64* __restrict__ queries, const int* __restrict__ min_common,                      \
        const long long* __restrict__ row_lo, const long long* __restrict__ row_hi,           \
        const long long n_queries, const int mc_stride, const u64* __restrict__ fps,          \
        const int* __restrict__ pcs, const long long n_rows, const int n_words,               \
        const int group_size, int* __restrict__ out_query, long long* __restrict__ out_row,   \
        int* __restrict__ out_common, const u64 capacity, u64* __restrict__ counter

#define SIMILARITY_PASS                                                                       \
    queries, min_common, row_lo, row_hi, n_queries, mc_stride, fps, pcs, n_rows, n_words,     \
        group_size, out_query, out_row, out_common, capacity, counter

// Any n_words (MACCS 3, 512 bits 8, 4096 bits 64, ...): rows read from shared memory.
extern "C" __global__ void similarity_candidates(SIMILARITY_ARGS)
{
    candidates_impl<0>(SIMILARITY_PASS);
}

// n_words == 32 (2048 bits): rows in registers.
extern "C" __global__ void similarity_candidates_w32(SIMILARITY_ARGS)
{
    candidates_impl<32>(SIMILARITY_PASS);
}

// n_words == 16 (1024 bits): rows in registers.
extern "C" __global__ void similarity_candidates_w16(SIMILARITY_ARGS)
{
    candidates_impl<16>(SIMILARITY_PASS);
}
