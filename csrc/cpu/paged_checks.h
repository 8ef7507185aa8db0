// CPU-side validation of the paged store's contents (cheap next to reading the pages). The
// CUDA kernels trust these values: checking them there would need a host sync.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dms/ring.h"

namespace dms::cpu {

// 0 <= seq_lens[s] <= max_pages * page_size and every page holding a live slot is in [0, P).
inline void check_seq_lens(const char* op, const at::Tensor& pages, const at::Tensor& block_table,
                           const at::Tensor& seq_lens) {
  const int64_t S = block_table.size(0), max_pages = block_table.size(1), P = pages.size(0);
  const int32_t ps = static_cast<int32_t>(pages.size(1));
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= max_pages * ps, op, ": seq_lens[", s, "] = ", lens[s],
                " must be in [0, max_pages * page_size = ", max_pages * ps, "]");
    for (int32_t p = 0; p < pages_for(lens[s], ps); ++p) {
      const int32_t id = bt[s * max_pages + p];
      TORCH_CHECK(id >= 0 && id < P, op, ": block_table[", s, ", ", p, "] = ", id,
                  " must be a page id in [0, ", P, ") for a live slot");
    }
  }
}

}  // namespace dms::cpu
