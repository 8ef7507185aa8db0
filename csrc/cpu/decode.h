// The CPU decode attention kernels, one set per instruction set, behind one signature.
// A kernel attends the G query rows of one sequence over a span of its slots and leaves the
// unnormalised partial state (split-KV): paged_decode_attention.cpp merges the spans.
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

// Slots [begin, end) of sequence seq.
struct DecodeSpan {
  int64_t seq;
  int32_t begin, end;
};

// Tokens per tile: a tile never crosses a page, so its rows are consecutive.
constexpr int kTile = 16;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Pages come in the block table's order, which the hardware prefetchers cannot follow: a kernel
// prefetches the rows of the tile this many slots on while it computes the current one. About
// 16 KiB of K + V ahead, so that a page asked of DRAM arrives in time (on Zen 4 at D = 64,
// 1 to 8 pages ahead measured alike), in whole pages: the tile there starts at the same offset
// in its page, so its rows are consecutive too.
inline int64_t prefetch_distance(int64_t head_dim, int64_t elem_bytes, int32_t page_size) {
  const int64_t slots = (int64_t{16} << 10) / (2 * head_dim * elem_bytes);
  return round_up(slots > 0 ? slots : 1, page_size);
}

// Into L2 (x86 prefetcht1, aarch64 PLDL2KEEP), not L1: on Zen 4, prefetching the pages ahead
// into L1 gained nothing (the prefetches compete with the loads for L1's miss buffers) while
// into L2 they halved the time per token. Only a hint: any address is allowed.
inline void prefetch_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

// Floats of scratch a kernel call needs (one buffer per thread, reused across calls).
inline int64_t decode_scratch_floats(int64_t G, int64_t D) {
  return G * round_up(D, kTile) + 2 * kTile * D + G * kTile + G + kTile;
}

// Writes acc [G, D] = sum_t exp(score[g, t] - max[g]) * v_t, max [G] (-inf for an empty span)
// and sum [G] = sum_t exp(score[g, t] - max[g]), score = scale * q[g] . k_t, in fp32.
template <typename T>
using DecodeFn = void (*)(const PagedStore<const T>& st, const T* q, int64_t G, float scale, DecodeSpan span,
                          float* acc, float* max, float* sum, float* scratch);

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
