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
void decode_scalar(const PagedStore<const T>& st, const T* q, int64_t G, float scale, const DecodePiece* pieces,
                   int64_t count, float* acc, float* max, float* sum, float* scratch) {
  const int64_t D = st.head_dim;
  float* qf = scratch;         // [G, D] scaled query of the current sequence
  float* scores = qf + G * D;  // [kTile]
  const int64_t ahead = prefetch_pieces(D, sizeof(T), st.page_size);
  int64_t loaded = -1;
  for (int64_t i = 0; i < count; ++i) {
    const DecodePiece& piece = pieces[i];
    if (piece.seq != loaded) {
      for (int64_t j = 0; j < G * D; ++j) qf[j] = to_float(q[piece.seq * G * D + j]) * scale;
      loaded = piece.seq;
    }
    if (i + ahead < count) {
      const DecodePiece& later = pieces[i + ahead];
      const char* nk = reinterpret_cast<const char*>(st.k_row(later.row));
      const char* nv = reinterpret_cast<const char*>(st.v_row(later.row));
      for (int64_t b = 0; b < later.n * D * static_cast<int64_t>(sizeof(T)); b += kCacheLine) {
        prefetch_line(nk + b);
        prefetch_line(nv + b);
      }
    }
    for (int32_t first = 0; first < piece.n; first += kTile) {
      const int32_t n = std::min(kTile, piece.n - first);
      const T* k = st.k_row(piece.row + first);
      const T* v = st.v_row(piece.row + first);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        for (int32_t t = 0; t < n; ++t) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * to_float(k[t * D + d]);
          scores[t] = s;
        }
        float& mx = max[piece.seq * G + g];
        float& sm = sum[piece.seq * G + g];
        OnlineSoftmax online{mx, sm};
        const float a = online.rescale(*std::max_element(scores, scores + n));
        float* ag = acc + (piece.seq * G + g) * D;
        for (int64_t d = 0; d < D; ++d) ag[d] *= a;
        for (int32_t t = 0; t < n; ++t) {
          const float p = online.weight(scores[t]);
          for (int64_t d = 0; d < D; ++d) ag[d] += p * to_float(v[t * D + d]);
        }
        mx = online.max;
        sm = online.sum;
      }
    }
  }
}

}  // namespace

DecodeKernels scalar_kernels() { return {&decode_scalar<float>, &decode_scalar<Fp16>, &decode_scalar<Bf16>}; }

}  // namespace dms::cpu
