// CUDA kernel of dms.gather_varlen: one block per sequence copies its live slots in slot order.
// The packed size must reach the host to allocate the output (one sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "dms/ring.h"
#include "launch.cuh"

namespace {

using dms::cuda::word_t;

__global__ void gather_varlen_kernel(const word_t* pages, const int32_t* block_table, const int32_t* seq_lens,
                                     const int32_t* cu_seqlens, int64_t max_pages, int32_t page_size, int64_t words,
                                     word_t* packed) {
  const int64_t s = blockIdx.x;
  const int32_t* block_row = block_table + s * max_pages;
  for (int32_t slot = 0; slot < seq_lens[s]; ++slot) {
    const int64_t row = dms::slot_row(block_row, slot, page_size);
    dms::cuda::copy_row(packed + (cu_seqlens[s] + slot) * words, pages + row * words, words);
  }
}

std::tuple<at::Tensor, at::Tensor, c10::SymInt> gather_varlen_cuda(const at::Tensor& pages,
                                                                   const at::Tensor& block_table,
                                                                   const at::Tensor& seq_lens) {
  dms::check_gather_varlen(pages, block_table, seq_lens);
  const c10::cuda::CUDAGuard guard(pages.device());
  const int64_t S = block_table.size(0), D = pages.size(2);
  auto cu = at::zeros({S + 1}, seq_lens.options());
  cu.slice(0, 1).copy_(seq_lens.cumsum(0, at::kInt));
  const int64_t N = cu[S].item<int64_t>();
  const int64_t max_seqlen = S > 0 ? seq_lens.max().item<int64_t>() : 0;
  auto packed = at::empty({N, D}, pages.options());
  if (N > 0 && D > 0) {
    gather_varlen_kernel<<<static_cast<unsigned>(S), dms::cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const word_t*>(pages.data_ptr()), block_table.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
        cu.data_ptr<int32_t>(), block_table.size(1), static_cast<int32_t>(pages.size(1)),
        dms::cuda::words_per_row(D, pages.element_size()), static_cast<word_t*>(packed.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("gather_varlen", &gather_varlen_cuda); }
