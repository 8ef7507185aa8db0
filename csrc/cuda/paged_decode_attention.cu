// CUDA kernel of dms.paged_decode_attention, split-K (docs/cuda-decode.md):
//  (1) grid (sequence, split, head group): a block attends up to 8 query heads of one
//      sequence over one span of its slots. Each warp takes its own tiles of 32 slots: lane t
//      scores slot t for every head of the group by itself (no reduction per score), the warp
//      keeps an online softmax per head (one shuffle reduction per tile), then accumulates the
//      tile's values with lanes over the head dim. One barrier merges the warps at the end.
//  (2) one block per sequence merges the splits' partial softmaxes and normalises.
// The split count comes from the store's capacity (max_pages * page_size): seq_lens stay on
// the device (no host sync); splits past a sequence's length leave an empty partial.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "dms/checks.h"
#include "dms/paged_store.h"
#include "launch.cuh"

namespace {

constexpr int kWarps = 4;        // warps per block, each with its own tiles
constexpr int kGroup = 8;        // query heads per block (blockIdx.z = head group)
constexpr int kSplitSlots = 512;  // slots per split, unless that makes more than kMaxSplits
constexpr int kMaxSplits = 64;
constexpr size_t kMaxSmem = 48 * 1024;  // without an opt-in

__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Floats of shared memory of a block: q [kGroup, D], then per warp acc [kGroup, D] and
// weights [kGroup, 32], then the warps' max and sum [kWarps, kGroup] each.
__host__ __device__ inline int64_t smem_floats(int64_t D) {
  return kGroup * D + kWarps * (kGroup * D + kGroup * 32) + 2 * kWarps * kGroup;
}

// part_acc [S, splits, G, D] unnormalised; part_ml [S, splits, G, 2] = (max, sum).
template <typename scalar_t>
__global__ void split_kernel(dms::PagedStore<const scalar_t> st, const scalar_t* q, int64_t G, float scale,
                             int32_t span, float* part_acc, float* part_ml) {
  extern __shared__ float smem[];
  const int64_t D = st.head_dim, s = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t g0 = blockIdx.z * kGroup;
  const int gn = static_cast<int>(G - g0 < kGroup ? G - g0 : kGroup);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qs = smem;
  float* acc = qs + kGroup * D + warp * (kGroup * D + kGroup * 32);
  float* wp = acc + kGroup * D;
  float* wmax = smem + kGroup * D + kWarps * (kGroup * D + kGroup * 32);
  float* wsum = wmax + kWarps * kGroup;

  for (int64_t i = threadIdx.x; i < gn * D; i += blockDim.x)
    qs[i] = static_cast<float>(q[(s * G + g0) * D + i]) * scale;
  for (int64_t i = lane; i < gn * D; i += 32) acc[i] = 0.f;
  __syncthreads();

  float m[kGroup], l[kGroup];  // this warp's online softmax, the same in every lane
#pragma unroll
  for (int g = 0; g < kGroup; ++g) m[g] = -INFINITY, l[g] = 0.f;

  const int32_t begin = static_cast<int32_t>(split * span);
  const int32_t end = min(st.seq_lens[s], begin + span);
  for (int32_t t0 = begin + warp * 32; t0 < end; t0 += kWarps * 32) {
    const int32_t slot = t0 + lane, n = min(32, end - t0);
    const bool live = slot < end;
    float score[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) score[g] = 0.f;
    if (live) {
      const scalar_t* k = st.k_row(st.row(s, slot));
      for (int64_t d = 0; d < D; ++d) {
        const float kd = static_cast<float>(k[d]);
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
          if (g < gn) score[g] += qs[g * D + d] * kd;
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g >= gn) continue;
      const float tile_max = warp_max(live ? score[g] : -INFINITY);
      const float m_new = fmaxf(m[g], tile_max);
      const float a = m[g] == -INFINITY ? 0.f : expf(m[g] - m_new);
      const float p = live ? expf(score[g] - m_new) : 0.f;
      l[g] = l[g] * a + warp_sum(p);
      m[g] = m_new;
      wp[g * 32 + lane] = p;
      for (int64_t d = lane; d < D; d += 32) acc[g * D + d] *= a;
    }
    __syncwarp();
    for (int j = 0; j < n; ++j) {
      const scalar_t* v = st.v_row(st.row(s, t0 + j));
      for (int64_t d = lane; d < D; d += 32) {
        const float vd = static_cast<float>(v[d]);
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
          if (g < gn) acc[g * D + d] += wp[g * 32 + j] * vd;
      }
    }
    __syncwarp();  // wp is rewritten by the next tile
  }

  if (lane == 0)
    for (int g = 0; g < gn; ++g) wmax[warp * kGroup + g] = m[g], wsum[warp * kGroup + g] = l[g];
  __syncthreads();
  const int64_t part = (s * splits + split) * G + g0;  // first head of the group in the partials
  for (int64_t i = threadIdx.x; i < gn * D; i += blockDim.x) {
    const int64_t g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wmax[w * kGroup + g]);
    float total = 0.f, sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (wmax[w * kGroup + g] == -INFINITY) continue;  // a warp without slots
      const float f = expf(wmax[w * kGroup + g] - mx);
      total += f * smem[kGroup * D + w * (kGroup * D + kGroup * 32) + g * D + d];
      sum += f * wsum[w * kGroup + g];
    }
    part_acc[(part + g) * D + d] = total;
    if (d == 0) part_ml[(part + g) * 2] = mx, part_ml[(part + g) * 2 + 1] = sum;
  }
}

template <typename scalar_t>
__global__ void merge_kernel(const float* part_acc, const float* part_ml, int64_t splits, int64_t G, int64_t D,
                             scalar_t* out) {
  const int64_t s = blockIdx.x;
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int64_t g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int64_t k = 0; k < splits; ++k) mx = fmaxf(mx, part_ml[((s * splits + k) * G + g) * 2]);
    float total = 0.f, sum = 0.f;
    for (int64_t k = 0; k < splits; ++k) {
      const int64_t p = (s * splits + k) * G + g;
      if (part_ml[p * 2] == -INFINITY) continue;  // an empty split
      const float f = expf(part_ml[p * 2] - mx);
      total += f * part_acc[p * D + d];
      sum += f * part_ml[p * 2 + 1];
    }
    out[(s * G + g) * D + d] = static_cast<scalar_t>(sum > 0.f ? total / sum : 0.f);  // empty: zeros
  }
}

template <typename scalar_t>
void launch(const at::Tensor& q, const dms::StoreTensors& store, float scale, at::Tensor& out) {
  const auto st = dms::paged_store<const scalar_t>(store);
  const int64_t S = q.size(0), G = q.size(1), D = q.size(2);
  const size_t smem = smem_floats(D) * sizeof(float);
  TORCH_CHECK(smem <= kMaxSmem, "dms.paged_decode_attention: head dim ", D, " needs ", smem,
              " bytes of shared memory per block on CUDA, more than ", kMaxSmem);
  const int64_t capacity = st.max_pages * st.page_size;
  int64_t splits = std::max<int64_t>(1, (capacity + kSplitSlots - 1) / kSplitSlots);
  splits = std::min<int64_t>(splits, kMaxSplits);
  const int64_t span = std::max<int64_t>(1, (capacity + splits - 1) / splits);
  const int64_t groups = (G + kGroup - 1) / kGroup;
  auto part_acc = at::empty({S, splits, G, D}, q.options().dtype(at::kFloat));
  auto part_ml = at::empty({S, splits, G, 2}, q.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(splits), static_cast<unsigned>(groups));
  split_kernel<scalar_t><<<grid, kWarps * 32, smem, stream>>>(st, q.data_ptr<scalar_t>(), G, scale,
                                                             static_cast<int32_t>(span), part_acc.data_ptr<float>(),
                                                             part_ml.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_kernel<scalar_t><<<static_cast<unsigned>(S), dms::cuda::kThreads, 0, stream>>>(
      part_acc.data_ptr<float>(), part_ml.data_ptr<float>(), splits, G, D, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  const dms::StoreTensors store{k_pages, v_pages, block_table, seq_lens};
  dms::check_paged_decode_attention(q, store, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  if (q.numel() == 0) return out;
  // Only the three model dtypes (checked above): fewer instantiations, shorter nvcc time.
  const float sc = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(q, store, sc, out); break;
    case at::kHalf: launch<c10::Half>(q, store, sc, out); break;
    default: launch<c10::BFloat16>(q, store, sc, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("paged_decode_attention", &paged_decode_attention_cuda); }
