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
using Store = dms::PagedStore<word_t>;  // rows copied as 16-bit words

// The new tokens of one call: k, v [S, T, head_dim words], decisions and valid (or null) [S, T].
struct Chunk {
  const word_t *k, *v;
  const bool *dec, *valid;
  int64_t T;
};

// status[s] of the dry run. A corrupt state is one the CPU kernel raises on.
enum Status : int8_t { kFits = 0, kRowTooShort = 1, kCorrupt = 2 };

// Also checks what phase 3 follows: seq_lens in range, num_seen >= seq_lens and room in int32
// for the chunk, live page ids in [0, P), ring slots handed over live.
__global__ void count_pages_kernel(Store st, Chunk c, int32_t* need, int8_t* status) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= st.num_seqs) return;
  const int32_t len = st.seq_lens[s], n0 = st.num_seen[s], ps = st.page_size, W1 = st.ring_width;
  const int64_t T = c.T;
  need[s] = 0;
  status[s] = kCorrupt;
  if (len < 0 || len > st.max_pages * ps || n0 < len || !dms::num_seen_fits(n0, T)) return;
  const int32_t* block_row = st.block_row(s);
  for (int32_t p = 0; p < dms::pages_for(len, ps); ++p) {
    if (block_row[p] < 0 || block_row[p] >= st.num_pages) return;
  }
  int32_t bad_col = -1;
  const int32_t fresh = dms::count_fresh_slots(st.ring_flags + s * W1, W1, n0, c.dec + s * T,
                                               c.valid ? c.valid + s * T : nullptr, T, st.ring_slots + s * W1, len,
                                               &bad_col);
  if (bad_col >= 0) return;
  const int32_t pages = dms::pages_for(len + fresh, ps);
  need[s] = pages - dms::pages_for(len, ps);
  status[s] = pages > st.max_pages ? kRowTooShort : kFits;
}

// plan[s] = pages taken by sequences before s; plan[S] = the old free_top, or -1 to cancel.
// Cancelled: free_top = -(pages needed), or INT32_MIN for a corrupt state (a bad free_top or
// popped page id included).
__global__ void plan_kernel(Store st, const int32_t* need, const int8_t* status, int32_t* plan) {
  const int64_t S = st.num_seqs, P = st.num_pages;
  int32_t total = 0;
  bool fits = true, corrupt = false;
  for (int64_t s = 0; s < S; ++s) {
    plan[s] = total;
    total += need[s];
    fits = fits && status[s] == kFits;
    corrupt = corrupt || status[s] == kCorrupt;
  }
  const int32_t top = st.free_top[0];
  corrupt = corrupt || top < 0 || top > P;
  fits = fits && !corrupt && total <= top;
  for (int32_t i = 0; fits && i < total; ++i) {
    const int32_t id = st.free_pages[top - 1 - i];
    corrupt = id < 0 || id >= P;
    fits = !corrupt;
  }
  plan[S] = fits ? top : -1;
  st.free_top[0] = fits ? top - total : (corrupt ? INT32_MIN : -total);
}

__global__ void write_kernel(Store st, Chunk c, const int32_t* plan) {
  const int32_t top = plan[st.num_seqs];
  if (top < 0) return;
  const int64_t s = blockIdx.x, T = c.T, words = st.head_dim;
  const int32_t W1 = st.ring_width;
  __shared__ int64_t row;
  int32_t n = 0, len = 0, next_free = 0;  // thread 0's walk state
  if (threadIdx.x == 0) {
    n = st.num_seen[s];
    len = st.seq_lens[s];
    next_free = top - 1 - plan[s];
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = s * T + t;
    if (c.valid && !c.valid[i]) continue;  // same branch for the whole block
    if (threadIdx.x == 0) {
      const auto choice = dms::ring_step(st.ring_slots + s * W1, st.ring_flags + s * W1, W1, n++, c.dec[i], len);
      row = dms::place_slot(choice, st.block_row(s), st.page_size, st.free_pages, next_free);
    }
    __syncthreads();
    dms::cuda::copy_row(st.k_row(row), c.k + i * words, words);
    dms::cuda::copy_row(st.v_row(row), c.v + i * words, words);
    __syncthreads();  // row is rewritten by the next token
  }
  if (threadIdx.x == 0) {
    st.num_seen[s] = n;
    st.seq_lens[s] = len;
  }
}

void append_cuda(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, const at::Tensor& num_seen, const at::Tensor& ring_slots,
                 const at::Tensor& ring_flags, const at::Tensor& free_pages, const at::Tensor& free_top,
                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& decisions,
                 const std::optional<at::Tensor>& valid) {
  const dms::StoreTensors store{k_pages,    v_pages,    block_table, seq_lens, num_seen,
                                ring_slots, ring_flags, free_pages,  free_top};
  dms::check_append(store, k, v, decisions, valid);
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const int64_t S = k.size(0);
  if (S == 0) return;
  const Store st = dms::paged_store<word_t>(store);
  const Chunk chunk{static_cast<const word_t*>(k.data_ptr()), static_cast<const word_t*>(v.data_ptr()),
                    decisions.data_ptr<bool>(), valid ? valid->data_ptr<bool>() : nullptr, k.size(1)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto need = at::empty({S}, seq_lens.options());
  auto status = at::empty({S}, seq_lens.options().dtype(at::kChar));
  auto plan = at::empty({S + 1}, seq_lens.options());

  count_pages_kernel<<<dms::cuda::blocks_for(S), dms::cuda::kThreads, 0, stream>>>(
      st, chunk, need.data_ptr<int32_t>(), status.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_kernel<<<1, 1, 0, stream>>>(st, need.data_ptr<int32_t>(), status.data_ptr<int8_t>(), plan.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_kernel<<<static_cast<unsigned>(S), dms::cuda::kThreads, 0, stream>>>(st, chunk, plan.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CUDA, m) { m.impl("append", &append_cuda); }
