// AVX2 + FMA + F16C (x86-64-v3) decode kernel: 8 fp32 lanes, one tile = 8 slots. Compiled for
// that target function by function; called only when the CPU has it (paged_decode_attention.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "decode.h"

#ifdef DMS_X86_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC 12 flags the intrinsics' own `__Y = __Y` (_mm512_undefined_*) idiom.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dms::cpu {
namespace {

struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int kRows = 2;      // query rows per block: 8 + 5 registers for the scores
  static constexpr int kAccRegs = 8;   // of 16 registers, accumulators of the values
  static constexpr int kMaxChunks = 4;
  static constexpr bool kBf16Dot = false;
  static __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static void store_n(float* p, reg x, int n) { _mm256_maskstore_ps(p, first(n), x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 0] (exp_nonpos's range): build 2^n in the exponent bits.
  static reg pow2(reg p, reg n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(p, _mm256_castsi256_ps(e));
  }
  static float reduce_max(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float reduce_add(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static bool any_above(reg x, float m) { return _mm256_movemask_ps(_mm256_cmp_ps(x, set1(m), _CMP_GT_OQ)) != 0; }
  static reg keep_first(reg x, int n, float fill) {
    return _mm256_blendv_ps(set1(fill), x, _mm256_castsi256_ps(first(n)));
  }

  // Scores by transpose-adds: fold4 turns the partial dot products of 4 slots into one
  // vector (per 128-bit half i: slots i and 2 + i, two partials each); finish turns the folds
  // of slots 0-3 and 4-7 into the 8 scores, in slot order.
  static reg fold4(const reg* v) {
    const reg w0 = add(_mm256_permute2f128_ps(v[0], v[1], 0x20), _mm256_permute2f128_ps(v[0], v[1], 0x31));
    const reg w1 = add(_mm256_permute2f128_ps(v[2], v[3], 0x20), _mm256_permute2f128_ps(v[2], v[3], 0x31));
    return add(_mm256_unpacklo_ps(w0, w1), _mm256_unpackhi_ps(w0, w1));
  }
  static reg finish(const reg* x) {
    const reg z = add(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(x[0]), _mm256_castps_pd(x[1]))),
                      _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(x[0]), _mm256_castps_pd(x[1]))));
    // z[4i + j] = score of slot 2j + i
    return _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }

  static reg cvt(const float* p) { return load(p); }
  static reg cvt_n(const float* p, int n) { return load_n(p, n); }
  static __m128i load8(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  // No masked 16-bit load below AVX-512: copy the n elements into a zeroed block.
  static __m128i load8_n(const void* p, int n) {
    alignas(16) uint16_t block[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(block, p, n * sizeof(uint16_t));
    return load8(block);
  }
  static reg cvt(const Fp16* p) { return _mm256_cvtph_ps(load8(p)); }
  static reg cvt_n(const Fp16* p, int n) { return _mm256_cvtph_ps(load8_n(p, n)); }
  static reg bf16_bits(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static reg cvt(const Bf16* p) { return bf16_bits(load8(p)); }
  static reg cvt_n(const Bf16* p, int n) { return bf16_bits(load8_n(p, n)); }
};

#include "decode_simd.inc"

// Instantiated here, inside the target region (the table runs only on a CPU with the ISA).
DecodeKernels table() { return {&decode_pieces<float>, &decode_pieces<Fp16>, &decode_pieces<Bf16>}; }

}  // namespace
}  // namespace dms::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

dms::cpu::DecodeKernels dms::cpu::avx2_kernels() { return table(); }

#endif  // DMS_X86_KERNELS
