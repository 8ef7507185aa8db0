// CPU kernel of dms.scan_flags: one independent backward/forward scan per sequence.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "dms/scan.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_flags_cpu(const at::Tensor& decisions,
                                                              const std::optional<at::Tensor>& valid,
                                                              int64_t window) {
  dms::check_scan_flags(decisions, valid, window);
  const int64_t S = decisions.size(0), T = decisions.size(1);
  auto keep = at::empty({S, T}, decisions.options());
  auto offsets = at::empty({S, T}, decisions.options().dtype(at::kInt));
  auto counts = at::empty({S}, decisions.options().dtype(at::kInt));
  const bool* dec = decisions.data_ptr<bool>();
  const bool* ok = valid ? valid->data_ptr<bool>() : nullptr;
  bool* keep_p = keep.data_ptr<bool>();
  int32_t* off_p = offsets.data_ptr<int32_t>();
  int32_t* cnt_p = counts.data_ptr<int32_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      cnt_p[s] = dms::scan_sequence(dec + s * T, ok ? ok + s * T : nullptr, T, window, keep_p + s * T,
                                    off_p + s * T);
    }
  });
  return {keep, offsets, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("scan_flags", &scan_flags_cpu); }
