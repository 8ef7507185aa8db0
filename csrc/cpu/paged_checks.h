// CPU-side validation of the paged store's contents (cheap next to reading the pages). The
// CUDA kernels trust these values: checking them there would need a host sync.
#pragma once

#include <c10/util/Exception.h>

#include "dms/paged_store.h"

namespace dms::cpu {

// 0 <= seq_lens[s] <= max_pages * page_size and every page holding a live slot is in [0, P).
template <typename DType>
void check_seq_lens(const char* op, const PagedStore<DType>& st) {
  const int32_t ps = st.page_size;
  const int32_t* lens = st.seq_lens;
  for (int64_t s = 0; s < st.num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= st.max_pages * ps, op, ": seq_lens[", s, "] = ", lens[s],
                " must be in [0, max_pages * page_size = ", st.max_pages * ps, "]");
    const int32_t* row = st.block_row(s);
    for (int32_t p = 0; p < pages_for(lens[s], ps); ++p) {
      TORCH_CHECK(row[p] >= 0 && row[p] < st.num_pages, op, ": block_table[", s, ", ", p, "] = ", row[p],
                  " must be a page id in [0, ", st.num_pages, ") for a live slot");
    }
  }
}

}  // namespace dms::cpu
