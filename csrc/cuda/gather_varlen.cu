// CUDA kernel of dms.gather_varlen: one block per sequence copies its live slots in slot order.
// The packed size must reach the host to allocate the output (one sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "launch.cuh"

namespace {

using dms::cuda::word_t;

__global__ void gather_varlen_kernel(dms::PagedStore<const word_t> st, const int32_t* cu_seqlens, word_t* packed) {
  const int64_t s = blockIdx.x, words = st.head_dim;
  for (int32_t slot = 0; slot < st.seq_lens[s]; ++slot)
    dms::cuda::copy_row(packed + (cu_seqlens[s] + slot) * words, st.k_row(st.row(s, slot)), words);
}

std::tuple<at::Tensor, at::Tensor, c10::SymInt> gather_varlen_cuda(const at::Tensor& pages,
                                                                   const at::Tensor& block_table,
                                                                   const at::Tensor& seq_lens) {
  const dms::StoreTensors store{pages, {}, block_table, seq_lens};
  dms::check_gather_varlen(store);
  const c10::cuda::CUDAGuard guard(pages.device());
  const int64_t S = block_table.size(0), D = pages.size(2);
  auto cu = at::zeros({S + 1}, seq_lens.options());
  cu.slice(0, 1).copy_(seq_lens.cumsum(0, at::kInt));
  const int64_t N = cu[S].item<int64_t>();
  const int64_t max_seqlen = S > 0 ? seq_lens.max().item<int64_t>() : 0;
  auto packed = at::empty({N, D}, pages.options());
  if (N > 0 && D > 0) {
    gather_varlen_kernel<<<static_cast<unsigned>(S), dms::cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dms::paged_store<const word_t>(store), cu.data_ptr<int32_t>(), static_cast<word_t*>(packed.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("gather_varlen", &gather_varlen_cuda); }
