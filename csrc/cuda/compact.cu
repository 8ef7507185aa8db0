// CUDA kernel of dms.compact. Counts and prefixes come from ATen (sum/cumsum on the device);
// the packed size must reach the host to allocate the output (one sync, as for any
// data-dependent size). Then one block copies one kept row.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "launch.cuh"

namespace {

using dms::cuda::word_t;

__global__ void compact_kernel(const word_t* x, const bool* keep, const int32_t* cu_seqlens,
                               const int32_t* kept_before, int64_t S, int64_t T, int64_t words, word_t* packed) {
  for (int64_t r = blockIdx.x; r < S * T; r += gridDim.x) {
    if (!keep[r]) continue;
    const int64_t dst = cu_seqlens[r / T] + kept_before[r];
    dms::cuda::copy_row(packed + dst * words, x + r * words, words);
  }
}

std::tuple<at::Tensor, at::Tensor, c10::SymInt> compact_cuda(const at::Tensor& x, const at::Tensor& keep) {
  dms::check_compact(x, keep);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = x.size(0), T = x.size(1), D = x.size(2);
  const auto counts = keep.sum(1, false, at::kInt);
  auto cu = at::zeros({S + 1}, keep.options().dtype(at::kInt));
  cu.slice(0, 1).copy_(counts.cumsum(0, at::kInt));
  const auto kept_before = keep.cumsum(1, at::kInt) - keep.to(at::kInt);
  const int64_t N = cu[S].item<int64_t>();
  const int64_t max_seqlen = S > 0 ? counts.max().item<int64_t>() : 0;
  auto packed = at::empty({N, D}, x.options());
  if (N > 0 && D > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(S * T, 65535));
    compact_kernel<<<blocks, dms::cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const word_t*>(x.data_ptr()), keep.data_ptr<bool>(), cu.data_ptr<int32_t>(),
        kept_before.data_ptr<int32_t>(), S, T, dms::cuda::words_per_row(D, x.element_size()),
        static_cast<word_t*>(packed.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("compact", &compact_cuda); }
