// Portable decode attention kernel: plain C++ for any target (aarch64 included); on x86-64 it
// is the baseline path. Same tiles and online softmax as the SIMD kernels.
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "decode.h"
#include "dms/softmax.h"

namespace dms::cpu {
namespace {

inline float to_float(float x) { return x; }
inline float to_float(Fp16 x) { return c10::detail::fp16_ieee_to_fp32_value(x.bits); }
inline float to_float(Bf16 x) {
  const uint32_t word = static_cast<uint32_t>(x.bits) << 16;  // bf16 is the high half of an fp32
  float f;
  std::memcpy(&f, &word, sizeof(f));
  return f;
}

template <typename T>
void decode_scalar(const PagedStore<const T>& st, const T* q, int64_t G, float scale, DecodeSpan span, float* acc,
                   float* max, float* sum, float* scratch) {
  const int64_t D = st.head_dim;
  float* qf = scratch;           // [G, D] scaled query
  float* scores = qf + G * D;    // [kTile]
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * scale;
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) max[g] = -INFINITY, sum[g] = 0.f;
  const int32_t ps = st.page_size;
  const int64_t ahead = prefetch_distance(D, sizeof(T), ps);
  for (int32_t first = span.begin; first < span.end;) {
    const int32_t n = std::min({kTile, span.end - first, ps - first % ps});
    const int64_t row = st.row(span.seq, first);
    const T* k = st.k_row(row);
    const T* v = st.v_row(row);
    if (first + ahead < span.end) {
      const int64_t next = st.row(span.seq, static_cast<int32_t>(first + ahead));
      const char* nk = reinterpret_cast<const char*>(st.k_row(next));
      const char* nv = reinterpret_cast<const char*>(st.v_row(next));
      for (int64_t b = 0; b < n * D * static_cast<int64_t>(sizeof(T)); b += 64) {
        prefetch_l2(nk + b);
        prefetch_l2(nv + b);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      for (int32_t t = 0; t < n; ++t) {
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qg[d] * to_float(k[t * D + d]);
        scores[t] = s;
      }
      OnlineSoftmax sm{max[g], sum[g]};
      const float a = sm.rescale(*std::max_element(scores, scores + n));
      float* ag = acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] *= a;
      for (int32_t t = 0; t < n; ++t) {
        const float p = sm.weight(scores[t]);
        for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(v[t * D + d]);
      }
      max[g] = sm.max;
      sum[g] = sm.sum;
    }
    first += n;
  }
}

}  // namespace

DecodeKernels scalar_kernels() { return {&decode_scalar<float>, &decode_scalar<Fp16>, &decode_scalar<Bf16>}; }

}  // namespace dms::cpu
