// CPU kernel of dms.append, in three phases so that nothing is written unless the whole chunk
// fits: (1) per-sequence dry run counting the pages each sequence needs, (2) exclusive prefix
// over sequences (sequence s pops its pages after those of sequences 0..s-1), (3) per-sequence
// write. Phases 1-2 validate every index phase 3 follows (live page ids, ring slots handed
// over, popped page ids), so phase 3 cannot fail. Rows are copied as bytes: no dtype dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "dms/checks.h"
#include "dms/ring.h"
#include "paged_checks.h"

namespace {

constexpr int32_t kOverflow = -1;  // need[s] marker: the block_table row is too short

// The new tokens of one call: k, v [S, T, row_bytes], decisions and valid (or null) [S, T].
struct Chunk {
  const char *k, *v;
  const bool *dec, *valid;
  int64_t T, row_bytes;
};

// The store is viewed as bytes: rows are copied, never read as numbers.
void append_kernel(const dms::PagedStore<char>& st, const Chunk& c) {
  const int64_t S = st.num_seqs, T = c.T, P = st.num_pages, max_pages = st.max_pages;
  const int32_t ps = st.page_size, W1 = st.ring_width;
  int32_t* lens = st.seq_lens;
  int32_t* seen = st.num_seen;
  int32_t* slots = st.ring_slots;
  bool* flags = st.ring_flags;
  const int32_t* free_p = st.free_pages;
  const bool *dec = c.dec, *ok = c.valid;
  const int32_t top = st.free_top[0];
  TORCH_CHECK(top >= 0 && top <= P, "dms.append: free_top = ", top, " must be in [0, P = ", P, "]");

  // Live pages of every sequence in [0, P): phase 3 writes into them.
  dms::cpu::check_seq_lens("dms.append", st);

  // Phase 1: dry run. It raises nothing itself: the checks run in sequence order below, so that
  // the error names the first bad sequence whatever the thread count.
  std::vector<int32_t> need(S), bad_col(S, -1);
  const auto state_ok = [&](int64_t s) { return seen[s] >= lens[s] && dms::num_seen_fits(seen[s], T); };
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (!state_ok(s)) continue;
      const int32_t len = lens[s];
      const int32_t fresh = dms::count_fresh_slots(flags + s * W1, W1, seen[s], dec + s * T,
                                                   ok ? ok + s * T : nullptr, T, slots + s * W1, len, &bad_col[s]);
      const int32_t pages = dms::pages_for(len + fresh, ps);
      need[s] = pages > max_pages ? kOverflow : pages - dms::pages_for(len, ps);
    }
  });
  for (int64_t s = 0; s < S; ++s) {
    const int32_t len = lens[s], col = bad_col[s];
    TORCH_CHECK(seen[s] >= len, "dms.append: corrupt state of sequence ", s, ": num_seen = ", seen[s],
                " < seq_lens = ", len);
    TORCH_CHECK(dms::num_seen_fits(seen[s], T), "dms.append: num_seen[", s, "] = ", seen[s], " + ", T,
                " new tokens overflows int32");
    TORCH_CHECK(col < 0, "dms.append: ring_slots[", s, ", ", col, "] = ", slots[s * W1 + col],
                " is handed over to a new token but is not a live slot in [0, seq_lens = ", len, ")");
  }

  // Phase 2: prefix; raise before anything is written.
  std::vector<int32_t> first(S);  // pages popped by sequences before s
  int64_t taken = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(need[s] != kOverflow, "dms.append: block_table has room for ", max_pages,
                " pages per sequence; sequence ", s, " needs more");
    first[s] = static_cast<int32_t>(taken);
    taken += need[s];
  }
  TORCH_CHECK(taken <= top, "dms.append: page pool exhausted: need ", taken, " pages, ", top, " free");
  for (int64_t i = 0; i < taken; ++i) {
    const int32_t id = free_p[top - 1 - i];
    TORCH_CHECK(id >= 0 && id < P, "dms.append: free_pages[", top - 1 - i, "] = ", id, " is not a page id in [0, ",
                P, ")");
  }
  // Two sequences given the same page would overwrite each other's keys.
  std::vector<int32_t> popped(free_p + top - taken, free_p + top);
  std::sort(popped.begin(), popped.end());
  const auto dup = std::adjacent_find(popped.begin(), popped.end());
  TORCH_CHECK(dup == popped.end(), "dms.append: free_pages[", top - taken, ":", top, "] (the ids to pop) hold page ",
              *dup, " twice");

  // Phase 3: write.
  const int64_t rb = c.row_bytes;
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int32_t n = seen[s], len = lens[s], next_free = top - 1 - first[s];
      int32_t* block_row = st.block_row(s);
      for (int64_t t = 0; t < T; ++t) {
        if (ok && !ok[s * T + t]) continue;
        const auto choice = dms::ring_step(slots + s * W1, flags + s * W1, W1, n++, dec[s * T + t], len);
        const int64_t row = dms::place_slot(choice, block_row, ps, free_p, next_free);
        std::memcpy(st.k_row(row), c.k + (s * T + t) * rb, rb);
        std::memcpy(st.v_row(row), c.v + (s * T + t) * rb, rb);
      }
      seen[s] = n;
      lens[s] = len;
    }
  });
  st.free_top[0] = static_cast<int32_t>(top - taken);
}

void append_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& num_seen, const at::Tensor& ring_slots,
                const at::Tensor& ring_flags, const at::Tensor& free_pages, const at::Tensor& free_top,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& decisions,
                const std::optional<at::Tensor>& valid) {
  const dms::StoreTensors store{k_pages,    v_pages,    block_table, seq_lens, num_seen,
                                ring_slots, ring_flags, free_pages,  free_top};
  dms::check_append(store, k, v, decisions, valid);
  const Chunk chunk{static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr()),
                    decisions.data_ptr<bool>(), valid ? valid->data_ptr<bool>() : nullptr, k.size(1),
                    k.size(2) * k.element_size()};
  append_kernel(dms::paged_store<char>(store), chunk);
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("append", &append_cpu); }
