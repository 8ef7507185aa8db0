// AVX-512 (F, BW, VL, DQ) decode kernel. Compiled for that target function by function; called
// only when the CPU has it (paged_decode_attention.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "decode.h"

#ifdef DMS_X86_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// GCC 12 flags the intrinsics' own `__Y = __Y` (_mm512_undefined_*) idiom.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dms::cpu {
namespace {

#include "avx512_traits.inc"

struct V : V512 {
  static constexpr bool kBf16Dot = false;
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

dms::cpu::DecodeKernels dms::cpu::avx512_kernels() { return table(); }

#endif  // DMS_X86_KERNELS
