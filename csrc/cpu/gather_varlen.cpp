// CPU kernel of dms.gather_varlen: paged store -> packed varlen, one memcpy per page run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "dms/checks.h"
#include "paged_checks.h"

namespace {

// Copies the live rows of every sequence (pages viewed as bytes) to dst at cu[s].
void gather_varlen_kernel(const dms::PagedStore<const char>& st, const int32_t* cu, char* dst) {
  const int32_t ps = st.page_size;
  const int64_t rb = st.head_dim;
  at::parallel_for(0, st.num_seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int32_t n = st.seq_lens[s];
      for (int32_t slot = 0; slot < n; slot += ps) {  // a page's rows are contiguous
        const int64_t rows = std::min(ps, n - slot);
        std::memcpy(dst + (cu[s] + slot) * rb, st.k_row(st.row(s, slot)), rows * rb);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, c10::SymInt> gather_varlen_cpu(const at::Tensor& pages,
                                                                  const at::Tensor& block_table,
                                                                  const at::Tensor& seq_lens) {
  const dms::StoreTensors store{pages, {}, block_table, seq_lens};
  dms::check_gather_varlen(store);
  const auto st = dms::paged_store<const char>(store);
  dms::cpu::check_seq_lens("dms.gather_varlen", st);
  const int64_t S = st.num_seqs;
  const int32_t* lens = st.seq_lens;
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
  gather_varlen_kernel(st, cu_p, static_cast<char*>(packed.data_ptr()));
  return {packed, cu, c10::SymInt(max_seqlen)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("gather_varlen", &gather_varlen_cpu); }
