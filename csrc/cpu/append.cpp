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

void append_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& num_seen, const at::Tensor& ring_slots,
                const at::Tensor& ring_flags, const at::Tensor& free_pages, const at::Tensor& free_top,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& decisions,
                const std::optional<at::Tensor>& valid) {
  dms::check_append(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages,
                    free_top, k, v, decisions, valid);
  const int64_t S = k.size(0), T = k.size(1), P = k_pages.size(0), max_pages = block_table.size(1);
  const int32_t ps = static_cast<int32_t>(k_pages.size(1));
  const int32_t W1 = static_cast<int32_t>(ring_slots.size(1));
  int32_t* bt = block_table.data_ptr<int32_t>();
  int32_t* lens = seq_lens.data_ptr<int32_t>();
  int32_t* seen = num_seen.data_ptr<int32_t>();
  int32_t* slots = ring_slots.data_ptr<int32_t>();
  bool* flags = ring_flags.data_ptr<bool>();
  const int32_t* free_p = free_pages.data_ptr<int32_t>();
  const bool* dec = decisions.data_ptr<bool>();
  const bool* ok = valid ? valid->data_ptr<bool>() : nullptr;
  const int32_t top = free_top.data_ptr<int32_t>()[0];
  TORCH_CHECK(top >= 0 && top <= P, "dms.append: free_top = ", top, " must be in [0, P = ", P, "]");

  // Live pages of every sequence in [0, P): phase 3 writes into them.
  dms::cpu::check_seq_lens("dms.append", k_pages, block_table, seq_lens);

  // Phase 1: dry run.
  std::vector<int32_t> need(S);
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int32_t len = lens[s];
      TORCH_CHECK(seen[s] >= len, "dms.append: corrupt state of sequence ", s, ": num_seen = ", seen[s],
                  " < seq_lens = ", len);
      TORCH_CHECK(dms::num_seen_fits(seen[s], T), "dms.append: num_seen[", s, "] = ", seen[s], " + ", T,
                  " new tokens overflows int32");
      int32_t bad_col = -1;
      const int32_t fresh = dms::count_fresh_slots(flags + s * W1, W1, seen[s], dec + s * T,
                                                   ok ? ok + s * T : nullptr, T, slots + s * W1, len, &bad_col);
      TORCH_CHECK(bad_col < 0, "dms.append: ring_slots[", s, ", ", bad_col, "] = ", slots[s * W1 + bad_col],
                  " is handed over to a new token but is not a live slot in [0, seq_lens = ", len, ")");
      const int32_t pages = dms::pages_for(len + fresh, ps);
      need[s] = pages > max_pages ? kOverflow : pages - dms::pages_for(len, ps);
    }
  });

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
  const int64_t row_bytes = k.size(2) * k.element_size();
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(k_pages.data_ptr());
  char* v_dst = static_cast<char*>(v_pages.data_ptr());
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int32_t n = seen[s], len = lens[s], next_free = top - 1 - first[s];
      int32_t* block_row = bt + s * max_pages;
      for (int64_t t = 0; t < T; ++t) {
        if (ok && !ok[s * T + t]) continue;
        const auto choice = dms::ring_step(slots + s * W1, flags + s * W1, W1, n++, dec[s * T + t], len);
        const int64_t row = dms::place_slot(choice, block_row, ps, free_p, next_free);
        std::memcpy(k_dst + row * row_bytes, k_src + (s * T + t) * row_bytes, row_bytes);
        std::memcpy(v_dst + row * row_bytes, v_src + (s * T + t) * row_bytes, row_bytes);
      }
      seen[s] = n;
      lens[s] = len;
    }
  });
  free_top.data_ptr<int32_t>()[0] = static_cast<int32_t>(top - taken);
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("append", &append_cpu); }
