// The CPU decode attention kernels, one set per instruction set, behind one signature.
// A kernel visits a list of pieces (a page's live slots of one sequence each) in the order given
// and continues each sequence's unnormalised softmax state; paged_decode_attention.cpp hands
// each thread the pages in pool order and merges the threads' states.
// Framework-free: the ISA files include it before switching their target.
#pragma once

#include <cstdint>

#include "dms/paged_store.h"

namespace dms::cpu {

// The 16-bit model dtypes as raw bits (layout of c10::Half / c10::BFloat16).
struct Fp16 {
  uint16_t bits;
};
struct Bf16 {
  uint16_t bits;
};

// The live slots of sequence seq in one page: rows row .. row + n - 1 of the pages viewed as
// [num_pages * page_size, head_dim] (row is a multiple of page_size).
struct DecodePiece {
  int64_t row;
  int32_t seq, n;
};

// Tokens per tile: a tile never crosses a page, so its rows are consecutive.
constexpr int kTile = 16;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Pieces ahead whose rows a kernel prefetches while it computes the current one: about 16 KiB
// of K + V, so that a page asked of DRAM arrives in time (4 to 64 KiB measured alike on Zen 5,
// D = 32, live pages scattered through the pool). The hardware prefetchers stop at the end of a
// 4 KiB page, and the pieces' pages need not be adjacent.
inline int64_t prefetch_pieces(int64_t head_dim, int64_t elem_bytes, int32_t page_size) {
  const int64_t pages = (int64_t{16} << 10) / (2 * head_dim * elem_bytes * page_size);
  return pages > 0 ? pages : 1;
}

// Into L2 (x86 prefetcht1, aarch64 PLDL2KEEP). Measured both ways (alternated, 2 threads,
// BENCHMARKS.md): on Zen 4, L2 took 28-41% less time per call than L1 (fp32 and bf16); on Zen 5, L1
// read 4-5 points more of the same-run sum. L2 is the default: its gain on Zen 4 is far larger
// than its loss on Zen 5.
// Only a hint: any address is allowed.
// Always inlined: GCC 12 drops the prefetch of this baseline-ISA function when an always-inline
// function of an ISA target region (decode_simd.inc) inlines it; always-inline here too keeps it
// (tests/ops/test_decode_prefetch_build.py reads the built kernels for the instruction).
#if defined(__GNUC__) || defined(__clang__)
inline __attribute__((always_inline)) void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 2); }
#else
inline void prefetch_line(const void*) {}
#endif

// Bytes per cache line on x86-64 and most aarch64 cores (Apple's have 128, where this stride only
// prefetches each line twice): the prefetch stride.
constexpr int64_t kCacheLine = 64;

// Whether the chunk at element offset d of a row starts a cache line (rows of kCacheLine multiples
// start on one): a kernel whose vector chunk is narrower than a line (AVX2: fp32 half a line, bf16
// a quarter) prefetches each line once instead of once per chunk.
template <typename T>
constexpr bool starts_line(int64_t d) {
  return d * static_cast<int64_t>(sizeof(T)) % kCacheLine == 0;
}

// Floats of scratch a kernel call needs (one buffer per thread).
inline int64_t decode_scratch_floats(int64_t G, int64_t D) {
  return G * round_up(D, kTile) + 2 * kTile * D + G * kTile + G + kTile;
}

// For each piece, continues the state of its sequence: acc [S, G, D] = sum_t exp(score[g, t] -
// max[g]) * v_t, max [S, G] (-inf before any slot) and sum [S, G] = sum_t exp(score[g, t] -
// max[g]), score = scale * q[g] . k_t in fp32, q [S, G, D].
template <typename T>
using DecodeFn = void (*)(const PagedStore<const T>& st, const T* q, int64_t G, float scale, const DecodePiece* pieces,
                          int64_t count, float* acc, float* max, float* sum, float* scratch);

struct DecodeKernels {
  DecodeFn<float> f32;
  DecodeFn<Fp16> f16;
  DecodeFn<Bf16> bf16;
};

DecodeKernels scalar_kernels();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DMS_X86_KERNELS 1
DecodeKernels avx2_kernels();    // AVX2 + FMA + F16C (x86-64-v3)
DecodeKernels avx512_kernels();  // AVX-512 F/BW/VL/DQ
DecodeFn<Bf16> avx512_bf16_kernel();  // + AVX512-BF16 dot products (the other dtypes: avx512)
#endif

}  // namespace dms::cpu
