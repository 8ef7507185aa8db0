// CUDA kernel of dms.scan_flags: one thread scans one sequence (dms::scan_sequence).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "dms/scan.h"
#include "launch.cuh"

namespace {

__global__ void scan_flags_kernel(const bool* dec, const bool* valid, int64_t S, int64_t T, int64_t window,
                                  bool* keep, int32_t* offsets, int32_t* counts) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= S) return;
  counts[s] = dms::scan_sequence(dec + s * T, valid ? valid + s * T : nullptr, T, window, keep + s * T,
                                 offsets + s * T);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_flags_cuda(const at::Tensor& decisions,
                                                               const std::optional<at::Tensor>& valid,
                                                               int64_t window) {
  dms::check_scan_flags(decisions, valid, window);
  const c10::cuda::CUDAGuard guard(decisions.device());
  const int64_t S = decisions.size(0), T = decisions.size(1);
  auto keep = at::empty({S, T}, decisions.options());
  auto offsets = at::empty({S, T}, decisions.options().dtype(at::kInt));
  auto counts = at::empty({S}, decisions.options().dtype(at::kInt));
  if (S > 0) {
    scan_flags_kernel<<<dms::cuda::blocks_for(S), dms::cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        decisions.data_ptr<bool>(), valid ? valid->data_ptr<bool>() : nullptr, S, T, window, keep.data_ptr<bool>(),
        offsets.data_ptr<int32_t>(), counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {keep, offsets, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("scan_flags", &scan_flags_cuda); }
