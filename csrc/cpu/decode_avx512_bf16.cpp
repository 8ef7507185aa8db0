// AVX-512 decode kernel whose bf16 key dot products use AVX512-BF16 (vdpbf16ps: pairs of bf16
// products summed in fp32, no conversion of the keys). The fp32 and fp16 kernels are those of
// decode_avx512.cpp. Compiled for that target function by function; called only when the CPU
// has it (paged_decode_attention.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
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
};

#include "decode_simd.inc"

// Instantiated here, inside the target region (the table runs only on a CPU with the ISA).
DecodeFn<Bf16> table() { return &decode_span<Bf16>; }

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
