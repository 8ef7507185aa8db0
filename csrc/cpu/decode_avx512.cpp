// AVX-512 (F, BW, VL, DQ) decode kernel: 16 fp32 lanes, one tile = 16 slots. Compiled for that
// target function by function; called only when the CPU has it (paged_decode_attention.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "decode.h"

#ifdef DMS_X86_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

namespace dms::cpu {
namespace {

struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static void store_n(float* p, reg x, int n) { _mm512_mask_storeu_ps(p, first(n), x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg pow2(reg p, reg n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
  static float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  static float reduce_add(reg x) { return _mm512_reduce_add_ps(x); }
  static reg keep_first(reg x, int n, float fill) { return _mm512_mask_blend_ps(first(n), set1(fill), x); }

  // Lane t = the sum of the lanes of v[t]: three transpose-add rounds (128-bit halves, then
  // 128-bit quarters, then within 128 bits), then one permute back to token order.
  static reg hsum_lanes(const reg* v) {
    reg w[8], x[4];
    for (int j = 0; j < 8; ++j)
      w[j] = add(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44), _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; ++j)
      x[j] = add(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88), _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
    const reg y0 = add(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const reg y1 = add(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    const reg z = add(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(y0), _mm512_castps_pd(y1))),
                      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(y0), _mm512_castps_pd(y1))));
    // z[4i + j] = sum of v[4j + i]
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, z);
  }

  static reg cvt(const float* p) { return load(p); }
  static reg cvt_n(const float* p, int n) { return load_n(p, n); }
  static reg cvt(const Fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static reg cvt_n(const Fp16* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p)); }
  static reg bf16_bits(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static reg cvt(const Bf16* p) { return bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static reg cvt_n(const Bf16* p, int n) { return bf16_bits(_mm256_maskz_loadu_epi16(first(n), p)); }
};

#include "decode_simd.inc"

}  // namespace
}  // namespace dms::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

dms::cpu::DecodeKernels dms::cpu::avx512_kernels() { return {&decode_f32, &decode_f16, &decode_bf16}; }

#endif  // DMS_X86_KERNELS
