// CPU kernel of dms.paged_decode_attention: per sequence, the G query rows stream over the
// live slots page by page with an online softmax in fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#include "dms/checks.h"
#include "dms/ring.h"
#include "dms/softmax.h"
#include "paged_checks.h"

namespace {

// The fp32 inner loops are also compiled for AVX2 + FMA, picked at load time (GCC/Clang ifunc),
// so the wheel still runs on baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DMS_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DMS_VECTOR_CLONES
#endif

// Eight independent partial sums let the compiler vectorise without reassociating.
inline float dot(const float* a, const float* b, int64_t D) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (; i < D; ++i) sum += a[i] * b[i];
  for (int j = 0; j < 8; ++j) sum += part[j];
  return sum;
}

// scores[g * ps + r] = q[g] . k[r] for the rows of one page.
DMS_VECTOR_CLONES void score_rows(const float* k, int64_t rows, const float* q, int64_t G, int64_t D, int64_t ps,
                                  float* scores) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) scores[g * ps + r] = dot(q + g * D, k + r * D, D);
}

// acc[g] += weights[g * ps + r] * v[r] for the rows of one page.
DMS_VECTOR_CLONES void accumulate_rows(const float* v, int64_t rows, const float* weights, int64_t G, int64_t D,
                                       int64_t ps, float* acc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float p = weights[g * ps + r];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * v[r * D + d];
    }
}

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

// bf16 is the high half of an fp32: a shift, which vectorises.
DMS_VECTOR_CLONES void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &word, sizeof(word));
  }
}

void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

struct Scratch {
  std::vector<float> q, acc, rows, scores;
  std::vector<dms::OnlineSoftmax> softmax;
  Scratch(int64_t G, int64_t D, int64_t ps) : q(G * D), acc(G * D), rows(ps * D), scores(G * ps), softmax(G) {}
};

template <typename scalar_t>
void attend_sequence(const scalar_t* q, const scalar_t* k_pages, const scalar_t* v_pages, const int32_t* block_row,
                     int32_t n, int32_t ps, int64_t G, int64_t D, float scale, scalar_t* out, Scratch& w) {
  for (int64_t i = 0; i < G * D; ++i) w.q[i] = static_cast<float>(q[i]) * scale;
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.softmax.begin(), w.softmax.end(), dms::OnlineSoftmax{});
  for (int32_t first = 0; first < n; first += ps) {
    const int64_t rows = std::min(ps, n - first);
    const int64_t base = dms::slot_row(block_row, first, ps) * D;  // a page's slots are consecutive rows
    to_float(k_pages + base, w.rows.data(), rows * D);
    score_rows(w.rows.data(), rows, w.q.data(), G, D, ps, w.scores.data());
    for (int64_t g = 0; g < G; ++g) {
      float* sc = w.scores.data() + g * ps;
      const float a = w.softmax[g].rescale(*std::max_element(sc, sc + rows));
      if (a != 1.f)
        for (int64_t d = 0; d < D; ++d) w.acc[g * D + d] *= a;
      for (int64_t r = 0; r < rows; ++r) sc[r] = w.softmax[g].weight(sc[r]);
    }
    to_float(v_pages + base, w.rows.data(), rows * D);
    accumulate_rows(w.rows.data(), rows, w.scores.data(), G, D, ps, w.acc.data());
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = w.softmax[g].inv_sum();  // 0 for an empty sequence: zeros out
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<scalar_t>(w.acc[g * D + d] * inv);
  }
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  dms::check_paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale);
  dms::cpu::check_seq_lens("dms.paged_decode_attention", k_pages, block_table, seq_lens);
  const int64_t S = q.size(0), G = q.size(1), D = q.size(2), max_pages = block_table.size(1);
  const int32_t ps = static_cast<int32_t>(k_pages.size(1));
  auto out = at::empty_like(q);
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_pages.data_ptr<scalar_t>();
    const scalar_t* vp = v_pages.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      Scratch w(G, D, ps);
      for (int64_t s = begin; s < end; ++s)
        attend_sequence(qp + s * G * D, kp, vp, bt + s * max_pages, lens[s], ps, G, D, static_cast<float>(scale),
                        op + s * G * D, w);
    });
  };
  // The three model dtypes only (checked above).
  switch (q.scalar_type()) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kHalf: run(static_cast<c10::Half*>(nullptr)); break;
    default: run(static_cast<c10::BFloat16*>(nullptr)); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention_cpu); }
