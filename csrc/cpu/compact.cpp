// CPU kernel of dms.compact: per-sequence counts -> prefix -> per-sequence copy. Rows are
// moved as bytes, one memcpy per run of consecutive kept rows, so no dtype dispatch is needed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "dms/checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor, c10::SymInt> compact_cpu(const at::Tensor& x, const at::Tensor& keep) {
  dms::check_compact(x, keep);
  const int64_t S = x.size(0), T = x.size(1);
  const int64_t row_bytes = x.size(2) * x.element_size();
  const bool* kp = keep.data_ptr<bool>();
  auto cu = at::empty({S + 1}, keep.options().dtype(at::kInt));
  int32_t* cu_p = cu.data_ptr<int32_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int32_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += kp[s * T + t];
      cu_p[s + 1] = n;
    }
  });
  cu_p[0] = 0;
  int64_t max_seqlen = 0;
  for (int64_t s = 0; s < S; ++s) {
    max_seqlen = std::max<int64_t>(max_seqlen, cu_p[s + 1]);
    const int64_t total = static_cast<int64_t>(cu_p[s]) + cu_p[s + 1];
    TORCH_CHECK(total <= INT32_MAX, "dms.compact: more than 2^31-1 kept rows do not fit int32 cu_seqlens");
    cu_p[s + 1] = static_cast<int32_t>(total);
  }
  auto packed = at::empty({cu_p[S], x.size(2)}, x.options());
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const bool* ks = kp + s * T;
      char* out = dst + cu_p[s] * row_bytes;
      for (int64_t t = 0; t < T;) {
        if (!ks[t]) {
          ++t;
          continue;
        }
        int64_t run = t;
        while (run < T && ks[run]) ++run;
        const size_t bytes = (run - t) * row_bytes;
        std::memcpy(out, src + (s * T + t) * row_bytes, bytes);
        out += bytes;
        t = run;
      }
    }
  });
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("compact", &compact_cpu); }
