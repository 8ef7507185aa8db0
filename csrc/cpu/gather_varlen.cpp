// CPU kernel of dms.gather_varlen: paged store -> packed varlen, one memcpy per page run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "dms/checks.h"
#include "paged_checks.h"
#include "dms/ring.h"

namespace {

std::tuple<at::Tensor, at::Tensor, c10::SymInt> gather_varlen_cpu(const at::Tensor& pages,
                                                              const at::Tensor& block_table,
                                                              const at::Tensor& seq_lens) {
  dms::check_gather_varlen(pages, block_table, seq_lens);
  dms::cpu::check_seq_lens("dms.gather_varlen", pages, block_table, seq_lens);
  const int64_t S = block_table.size(0), max_pages = block_table.size(1);
  const int32_t ps = static_cast<int32_t>(pages.size(1));
  const int64_t row_bytes = pages.size(2) * pages.element_size();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  auto cu = at::empty({S + 1}, seq_lens.options());
  int32_t* cu_p = cu.data_ptr<int32_t>();
  cu_p[0] = 0;
  int64_t max_seqlen = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t total = static_cast<int64_t>(cu_p[s]) + lens[s];
    TORCH_CHECK(total <= INT32_MAX, "dms.gather_varlen: more than 2^31-1 slots do not fit int32 cu_seqlens");
    cu_p[s + 1] = static_cast<int32_t>(total);
    max_seqlen = std::max<int64_t>(max_seqlen, lens[s]);
  }
  auto packed = at::empty({cu_p[S], pages.size(2)}, pages.options());
  const char* src = static_cast<const char*>(pages.data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  const int32_t* bt = block_table.data_ptr<int32_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int32_t* row = bt + s * max_pages;
      for (int32_t slot = 0; slot < lens[s]; slot += ps) {
        const int64_t rows = std::min(ps, lens[s] - slot);
        std::memcpy(dst + (cu_p[s] + slot) * row_bytes, src + dms::slot_row(row, slot, ps) * row_bytes,
                    rows * row_bytes);
      }
    }
  });
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("gather_varlen", &gather_varlen_cpu); }
