// CUDA kernel of dms.append, the same three phases as the CPU kernel, without a host sync:
// (1) one thread per sequence counts the pages it needs (dms::count_fresh_slots), (2) one thread
// prefixes the counts and either commits (free_top -= total) or, if the pool or a block_table
// row is too small, sets free_top = -(pages needed) and cancels phase 3 (INT32_MIN if phase 1
// or 2 found a corrupt state: an index phase 3 would follow out of bounds), (3) one block per
// sequence walks its tokens (thread 0 runs dms::ring_step) and copies each row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dms/checks.h"
#include "dms/ring.h"
#include "launch.cuh"

namespace {

using dms::cuda::word_t;

// status[s] of the dry run. A corrupt state is one the CPU kernel raises on.
enum Status : int8_t { kFits = 0, kRowTooShort = 1, kCorrupt = 2 };

// Also checks what phase 3 follows: seq_lens in range, num_seen >= seq_lens and room in int32
// for the chunk, live page ids in [0, P), ring slots handed over live.
__global__ void count_pages_kernel(const int32_t* ring_slots, const bool* ring_flags, int32_t W1,
                                   const int32_t* num_seen, const int32_t* seq_lens, const int32_t* block_table,
                                   const bool* dec, const bool* valid, int64_t S, int64_t T, int32_t page_size,
                                   int64_t max_pages, int64_t P, int32_t* need, int8_t* status) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= S) return;
  const int32_t len = seq_lens[s], n0 = num_seen[s];
  need[s] = 0;
  status[s] = kCorrupt;
  if (len < 0 || len > max_pages * page_size || n0 < len || !dms::num_seen_fits(n0, T)) return;
  for (int32_t p = 0; p < dms::pages_for(len, page_size); ++p) {
    const int32_t id = block_table[s * max_pages + p];
    if (id < 0 || id >= P) return;
  }
  int32_t bad_col = -1;
  const int32_t fresh = dms::count_fresh_slots(ring_flags + s * W1, W1, n0, dec + s * T,
                                               valid ? valid + s * T : nullptr, T, ring_slots + s * W1, len,
                                               &bad_col);
  if (bad_col >= 0) return;
  const int32_t pages = dms::pages_for(len + fresh, page_size);
  need[s] = pages - dms::pages_for(len, page_size);
  status[s] = pages > max_pages ? kRowTooShort : kFits;
}

// plan[s] = pages taken by sequences before s; plan[S] = the old free_top, or -1 to cancel.
// Cancelled: free_top = -(pages needed), or INT32_MIN for a corrupt state (a bad free_top or
// popped page id included).
__global__ void plan_kernel(const int32_t* need, const int8_t* status, const int32_t* free_pages, int64_t S,
                            int64_t P, int32_t* free_top, int32_t* plan) {
  int32_t total = 0;
  bool fits = true, corrupt = false;
  for (int64_t s = 0; s < S; ++s) {
    plan[s] = total;
    total += need[s];
    fits = fits && status[s] == kFits;
    corrupt = corrupt || status[s] == kCorrupt;
  }
  const int32_t top = free_top[0];
  corrupt = corrupt || top < 0 || top > P;
  fits = fits && !corrupt && total <= top;
  for (int32_t i = 0; fits && i < total; ++i) {
    const int32_t id = free_pages[top - 1 - i];
    corrupt = id < 0 || id >= P;
    fits = !corrupt;
  }
  plan[S] = fits ? top : -1;
  free_top[0] = fits ? top - total : (corrupt ? INT32_MIN : -total);
}

__global__ void write_kernel(word_t* k_pages, word_t* v_pages, int32_t* block_table, int32_t* seq_lens,
                             int32_t* num_seen, int32_t* ring_slots, bool* ring_flags, int32_t W1,
                             const int32_t* free_pages, const int32_t* plan, const word_t* k, const word_t* v,
                             const bool* dec, const bool* valid, int64_t S, int64_t T, int64_t words,
                             int32_t page_size, int64_t max_pages) {
  const int32_t top = plan[S];
  if (top < 0) return;
  const int64_t s = blockIdx.x;
  __shared__ int64_t row;
  int32_t n = 0, len = 0, next_free = 0;  // thread 0's walk state
  if (threadIdx.x == 0) {
    n = num_seen[s];
    len = seq_lens[s];
    next_free = top - 1 - plan[s];
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = s * T + t;
    if (valid && !valid[i]) continue;  // same branch for the whole block
    if (threadIdx.x == 0) {
      const auto choice = dms::ring_step(ring_slots + s * W1, ring_flags + s * W1, W1, n++, dec[i], len);
      row = dms::place_slot(choice, block_table + s * max_pages, page_size, free_pages, next_free);
    }
    __syncthreads();
    dms::cuda::copy_row(k_pages + row * words, k + i * words, words);
    dms::cuda::copy_row(v_pages + row * words, v + i * words, words);
    __syncthreads();  // row is rewritten by the next token
  }
  if (threadIdx.x == 0) {
    num_seen[s] = n;
    seq_lens[s] = len;
  }
}

void append_cuda(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, const at::Tensor& num_seen, const at::Tensor& ring_slots,
                 const at::Tensor& ring_flags, const at::Tensor& free_pages, const at::Tensor& free_top,
                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& decisions,
                 const std::optional<at::Tensor>& valid) {
  dms::check_append(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages,
                    free_top, k, v, decisions, valid);
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const int64_t S = k.size(0), T = k.size(1), P = k_pages.size(0), max_pages = block_table.size(1);
  if (S == 0) return;
  const int32_t ps = static_cast<int32_t>(k_pages.size(1));
  const int32_t W1 = static_cast<int32_t>(ring_slots.size(1));
  const bool* ok = valid ? valid->data_ptr<bool>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto need = at::empty({S}, seq_lens.options());
  auto status = at::empty({S}, seq_lens.options().dtype(at::kChar));
  auto plan = at::empty({S + 1}, seq_lens.options());

  count_pages_kernel<<<dms::cuda::blocks_for(S), dms::cuda::kThreads, 0, stream>>>(
      ring_slots.data_ptr<int32_t>(), ring_flags.data_ptr<bool>(), W1, num_seen.data_ptr<int32_t>(),
      seq_lens.data_ptr<int32_t>(), block_table.data_ptr<int32_t>(), decisions.data_ptr<bool>(), ok, S, T, ps,
      max_pages, P, need.data_ptr<int32_t>(), status.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_kernel<<<1, 1, 0, stream>>>(need.data_ptr<int32_t>(), status.data_ptr<int8_t>(),
                                   free_pages.data_ptr<int32_t>(), S, P, free_top.data_ptr<int32_t>(),
                                   plan.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_kernel<<<static_cast<unsigned>(S), dms::cuda::kThreads, 0, stream>>>(
      static_cast<word_t*>(k_pages.data_ptr()), static_cast<word_t*>(v_pages.data_ptr()),
      block_table.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), num_seen.data_ptr<int32_t>(),
      ring_slots.data_ptr<int32_t>(), ring_flags.data_ptr<bool>(), W1, free_pages.data_ptr<int32_t>(),
      plan.data_ptr<int32_t>(), static_cast<const word_t*>(k.data_ptr()), static_cast<const word_t*>(v.data_ptr()),
      decisions.data_ptr<bool>(), ok, S, T, dms::cuda::words_per_row(k.size(2), k.element_size()), ps, max_pages);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("append", &append_cuda); }
