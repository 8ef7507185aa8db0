// AVX-512 decode kernel whose bf16 dot products use AVX512-BF16 (vdpbf16ps: pairs of bf16
// products summed in fp32): the keys with the bf16 query, unconverted; the values with the
// softmax weights rounded to bf16 (as FlashAttention's P V on GPUs; the normaliser sums the
// rounded weights). The fp32 and fp16 kernels are those of decode_avx512.cpp. Compiled for that
// target function by function; called only when the CPU has it (paged_decode_attention.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "decode.h"

#ifdef DMS_X86_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12 flags the intrinsics' own `__Y = __Y` (_mm512_undefined_*) idiom.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dms::cpu {
namespace {

#include "avx512_traits.inc"

struct V : V512 {
  static constexpr bool kBf16Dot = true;
  static constexpr int kPairs = 32;  // bf16 elements per register
  using bits = __m512i;
  static bits zero_bits() { return _mm512_setzero_si512(); }
  static __m512i load_bf16(const Bf16* p) { return _mm512_loadu_si512(p); }
  static __m512i load_bf16_n(const Bf16* p, int n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << n) - 1u), p);
  }
  // acc + sum of the products of the 32 bf16 pairs, two per fp32 lane
  static reg dot_bf16(reg acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
  // dims 0-15 (lo) or 16-31 (hi) of rows a and b as pairs (a[d], b[d]): word 2i = a[i], 2i+1 = b[i]
  alignas(64) static constexpr int16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr int16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  static __m512i interleave_lo(__m512i a, __m512i b) {
    return _mm512_permutex2var_epi16(a, _mm512_load_si512(kLo), b);
  }
  static __m512i interleave_hi(__m512i a, __m512i b) {
    return _mm512_permutex2var_epi16(a, _mm512_load_si512(kHi), b);
  }
  // The bf16 pair p[0], p[1] in every 32-bit lane.
  static __m512i pair(const Bf16* p) {
    uint32_t word;
    std::memcpy(&word, p, sizeof(word));
    return _mm512_set1_epi32(static_cast<int>(word));
  }
  // Stores x rounded to bf16 (nearest even) and returns the rounded values in fp32.
  static reg store_bf16(Bf16* dst, reg x) {
    const __m256bh h = _mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<const __m256i&>(h));
    return _mm512_cvtpbh_ps(h);
  }
};

#include "decode_simd.inc"

// Instantiated here, inside the target region (the table runs only on a CPU with the ISA).
DecodeFn<Bf16> table() { return &decode_pieces<Bf16>; }

}  // namespace
}  // namespace dms::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

dms::cpu::DecodeFn<dms::cpu::Bf16> dms::cpu::avx512_bf16_kernel() { return table(); }

#endif  // DMS_X86_KERNELS
