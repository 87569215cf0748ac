// popcount.cu — per-row popcounts of packed fingerprints (CuPy RawModule, NVRTC or nvcc).
//
// Contract
//   inputs : fps      const uint64 [n * n_words], row-major; fingerprint bit i of row r is
//                     bit (i % 64) of word fps[r * n_words + i / 64] (biogen's library layout)
//            n        number of rows
//            n_words  64-bit words per row (2048 bits -> 32)
//   output : out      int32 [n]; out[r] = number of set bits of row r
//   launch : any 1-D grid; a grid-stride loop covers all rows, one thread per row.
// Used to check or compute popcounts of a library uploaded to the GPU without a round
// trip to the host (the library stores them; the GPU index re-derives them on upload).

extern "C" __global__ void popcount_rows(const unsigned long long* __restrict__ fps,
                                         const long long n,
                                         const int n_words,
                                         int* __restrict__ out)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < n; r += stride) {
        const unsigned long long* row = fps + r * n_words;
        int c = 0;
        for (int w = 0; w < n_words; ++w) {
            c += __popcll(row[w]);
        }
        out[r] = c;
    }
}
