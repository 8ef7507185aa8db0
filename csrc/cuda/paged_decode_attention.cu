// CUDA kernel of dms.paged_decode_attention: one block per (sequence, query head) streams over
// the live slots with an online softmax; each score is a block-wide dot product. Simple rather
// than fast: FlashAttention is the CUDA fast path (DESIGN.md §3).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "dms/ring.h"
#include "dms/softmax.h"
#include "launch.cuh"

namespace {

template <typename scalar_t>
__global__ void paged_decode_attention_kernel(const scalar_t* q, const scalar_t* k_pages, const scalar_t* v_pages,
                                              const int32_t* block_table, const int32_t* seq_lens, int64_t max_pages,
                                              int32_t page_size, int64_t G, int64_t D, float scale, scalar_t* out) {
  extern __shared__ float smem[];
  float* qf = smem;            // [D] scaled query
  float* acc = smem + D;       // [D] weighted sum of values
  float* partial = acc + D;    // [blockDim.x] dot-product partial sums
  const int64_t s = blockIdx.x / G;
  const int64_t head = blockIdx.x;  // row s * G + g of q and out
  const int tid = threadIdx.x;
  // Thread tid owns dims tid, tid + blockDim.x, ... of qf and acc: no sync needed on them.
  for (int64_t d = tid; d < D; d += blockDim.x) {
    qf[d] = static_cast<float>(q[head * D + d]) * scale;
    acc[d] = 0.f;
  }
  dms::OnlineSoftmax softmax;  // every thread holds the same copy
  const int32_t* block_row = block_table + s * max_pages;
  for (int32_t slot = 0; slot < seq_lens[s]; ++slot) {
    const int64_t row = dms::slot_row(block_row, slot, page_size) * D;
    float sum = 0.f;
    for (int64_t d = tid; d < D; d += blockDim.x) sum += qf[d] * static_cast<float>(k_pages[row + d]);
    partial[tid] = sum;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
      if (tid < width) partial[tid] += partial[tid + width];
      __syncthreads();
    }
    const float score = partial[0];
    __syncthreads();  // partial is rewritten by the next slot
    const float a = softmax.rescale(score);
    const float p = softmax.weight(score);
    for (int64_t d = tid; d < D; d += blockDim.x) acc[d] = acc[d] * a + p * static_cast<float>(v_pages[row + d]);
  }
  const float inv = softmax.inv_sum();  // 0 for an empty sequence: zeros out
  for (int64_t d = tid; d < D; d += blockDim.x) out[head * D + d] = static_cast<scalar_t>(acc[d] * inv);
}

template <typename scalar_t>
void launch(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
            const at::Tensor& seq_lens, float scale, at::Tensor& out) {
  const int64_t S = q.size(0), G = q.size(1), D = q.size(2);
  const size_t smem = (2 * D + dms::cuda::kThreads) * sizeof(float);
  paged_decode_attention_kernel<scalar_t>
      <<<static_cast<unsigned>(S * G), dms::cuda::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
          q.data_ptr<scalar_t>(), k_pages.data_ptr<scalar_t>(), v_pages.data_ptr<scalar_t>(),
          block_table.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), block_table.size(1),
          static_cast<int32_t>(k_pages.size(1)), G, D, scale, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  dms::check_paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  if (q.numel() == 0) return out;
  // Only the three model dtypes (checked above): fewer instantiations, shorter nvcc time.
  const float sc = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(q, k_pages, v_pages, block_table, seq_lens, sc, out); break;
    case at::kHalf: launch<c10::Half>(q, k_pages, v_pages, block_table, seq_lens, sc, out); break;
    default: launch<c10::BFloat16>(q, k_pages, v_pages, block_table, seq_lens, sc, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("paged_decode_attention", &paged_decode_attention_cuda); }
