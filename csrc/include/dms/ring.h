// The delayed-eviction window of one sequence (docs/design.md §1-§2, schema of `append`).
//
// The ring holds the last W1 = window + 1 tokens: column n % W1 has the slot and the flag of
// token n. Token n's decision flags token n-1; token n - W1 leaves the window when token n
// arrives and, if flagged, hands its slot to token n.
#pragma once

#include "dms/paged_store.h"

namespace dms {

struct SlotChoice {
  int32_t slot;
  bool fresh;  // slot == the old length: a new slot at the end of the sequence
};

// Feeds token n (with its decision) through the ring; `length` grows when a new slot is taken.
DMS_HOST_DEVICE inline SlotChoice ring_step(int32_t* slots, bool* flags, int32_t W1, int32_t n,
                                            bool decision, int32_t& length) {
  if (n > 0) flags[(n - 1) % W1] = decision;
  const int32_t col = n % W1;  // also the column of token n - W1
  SlotChoice c;
  c.fresh = !(n >= W1 && flags[col]);
  c.slot = c.fresh ? length++ : slots[col];
  slots[col] = c.slot;
  flags[col] = false;  // the newest token has no flag yet
  return c;
}

// Dry run of ring_step over a chunk (T tokens, decisions `dec`, `valid` may be null) that
// leaves the ring untouched: the number of fresh slots the chunk takes. Token n reuses a slot
// iff n >= W1 and token m = n - W1 is flagged. For m < n0 - 1 that flag is already in the ring
// (column m % W1 still holds token m: only token n overwrites it); otherwise it is the
// decision of the chunk's valid token number m - n0 + 1, found by a cursor lagging behind.
// With `ring_slots`, a slot handed over from the ring (m < n0) must be live, in [0, length):
// otherwise *bad_col is set to its column (the first one found), else left alone.
// Needs 0 <= n0 <= INT32_MAX - T (num_seen_fits), or n0 + j overflows.
DMS_HOST_DEVICE inline int32_t count_fresh_slots(const bool* ring_flags, int32_t W1, int32_t n0,
                                                 const bool* dec, const bool* valid, int64_t T,
                                                 const int32_t* ring_slots = nullptr, int32_t length = 0,
                                                 int32_t* bad_col = nullptr) {
  int32_t fresh = 0, j = 0;  // j: index of the current token among the chunk's valid tokens
  int64_t lag = -1;          // position of the chunk's valid token number lag_j
  int32_t lag_j = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (valid && !valid[t]) continue;
    const int32_t m = n0 + j - W1;
    ++j;
    bool flagged = false;
    if (m >= 0 && m < n0 - 1) {
      flagged = ring_flags[m % W1];
    } else if (m >= 0) {
      while (lag_j < m - n0 + 1) {
        ++lag;
        if (!valid || valid[lag]) ++lag_j;
      }
      flagged = dec[lag];
    }
    fresh += flagged ? 0 : 1;
    if (flagged && m < n0 && ring_slots) {
      const int32_t slot = ring_slots[m % W1];
      if ((slot < 0 || slot >= length) && *bad_col < 0) *bad_col = m % W1;
    }
  }
  return fresh;
}

// num_seen + T (and every token number of the chunk) fits int32; n0 >= 0.
DMS_HOST_DEVICE inline bool num_seen_fits(int32_t n0, int64_t T) { return T <= INT32_MAX - n0; }

// A fresh slot that starts a page maps that page to the next id popped from the free list
// (`next_free` counts down from the top). Returns the slot's row.
DMS_HOST_DEVICE inline int64_t place_slot(SlotChoice c, int32_t* block_row, int32_t page_size,
                                          const int32_t* free_pages, int32_t& next_free) {
  if (c.fresh && c.slot % page_size == 0) block_row[c.slot / page_size] = free_pages[next_free--];
  return slot_row(block_row, c.slot, page_size);
}

}  // namespace dms
