// Input validation shared by the CPU and CUDA kernels (host only). Every message names the
// operator, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>

#include "dms/store_tensors.h"

namespace dms {

// t must be on `device`, have the given sizes (-1 = any) and be contiguous. `layout` spells
// the expected shape for the message, e.g. "[S, T, D]".
inline void check_arg(const char* op, const char* name, const at::Tensor& t, const c10::Device& device,
                      std::initializer_list<int64_t> sizes, const char* layout) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
              " like the other inputs, got ", t.device());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), op, ": ", name, " must be ", layout,
              ", got shape ", t.sizes());
  int64_t d = 0;
  for (int64_t want : sizes) {
    TORCH_CHECK(want < 0 || t.size(d) == want, op, ": ", name, " must be ", layout, " (size ", want,
                " in dim ", d, "), got shape ", t.sizes());
    ++d;
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Model tensors (keys, values, queries, activations): fp32, fp16 or bf16.
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

inline void check_scan_flags(const at::Tensor& decisions, const std::optional<at::Tensor>& valid,
                             int64_t window) {
  constexpr const char* op = "dms.scan_flags";
  TORCH_CHECK(window >= 0, op, ": window must be >= 0, got ", window);
  check_dtype(op, "decisions", decisions, at::kBool);
  check_arg(op, "decisions", decisions, decisions.device(), {-1, -1}, "[S, T]");
  if (valid) {
    check_dtype(op, "valid", *valid, at::kBool);
    check_arg(op, "valid", *valid, decisions.device(), {decisions.size(0), decisions.size(1)},
              "[S, T] like decisions");
  }
}

inline void check_compact(const at::Tensor& x, const at::Tensor& keep) {
  constexpr const char* op = "dms.compact";
  check_float(op, "x", x);
  check_arg(op, "x", x, x.device(), {-1, -1, -1}, "[S, T, D]");
  check_dtype(op, "keep", keep, at::kBool);
  check_arg(op, "keep", keep, x.device(), {x.size(0), x.size(1)}, "[S, T] like x's first two dims");
}

// Pages [P, page_size, D]; block_table int32 [S, max_pages]; seq_lens int32 [S].
inline void check_paged_store(const char* op, const char* name, const at::Tensor& pages,
                              const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t S,
                              const c10::Device& device) {
  check_float(op, name, pages);
  check_arg(op, name, pages, device, {-1, -1, -1}, "[P, page_size, D]");
  TORCH_CHECK(pages.size(1) >= 1, op, ": ", name, " must have page_size >= 1, got shape ", pages.sizes());
  check_dtype(op, "block_table", block_table, at::kInt);
  check_arg(op, "block_table", block_table, device, {S, -1}, "[S, max_pages]");
  check_dtype(op, "seq_lens", seq_lens, at::kInt);
  check_arg(op, "seq_lens", seq_lens, device, {S}, "[S]");
}

// The store of gather_varlen has its `pages` in k_pages.
inline void check_gather_varlen(const StoreTensors& st) {
  check_paged_store("dms.gather_varlen", "pages", st.k_pages, st.block_table, st.seq_lens, st.block_table.size(0),
                    st.k_pages.device());
}

inline void check_paged_decode_attention(const at::Tensor& q, const StoreTensors& st, double scale) {
  constexpr const char* op = "dms.paged_decode_attention";
  const at::Tensor &k_pages = st.k_pages, &v_pages = st.v_pages;
  // The kernels scale in fp32: a double beyond float's range is as bad as inf.
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), op, ": scale must be finite in float32, got ", scale);
  check_float(op, "q", q);
  check_arg(op, "q", q, q.device(), {-1, -1, -1}, "[S, G, D]");
  const int64_t S = q.size(0);
  check_paged_store(op, "k_pages", k_pages, st.block_table, st.seq_lens, S, q.device());
  check_arg(op, "k_pages", k_pages, q.device(), {-1, -1, q.size(2)}, "[P, page_size, D] with q's D");
  check_dtype(op, "k_pages", k_pages, q.scalar_type());
  check_arg(op, "v_pages", v_pages, q.device(), {k_pages.size(0), k_pages.size(1), q.size(2)},
            "[P, page_size, D] like k_pages");
  check_dtype(op, "v_pages", v_pages, q.scalar_type());
}

inline void check_append(const StoreTensors& st, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& decisions, const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "dms.append";
  const at::Tensor &k_pages = st.k_pages, &v_pages = st.v_pages, &block_table = st.block_table,
                   &seq_lens = st.seq_lens, &num_seen = st.num_seen, &ring_slots = st.ring_slots,
                   &ring_flags = st.ring_flags, &free_pages = st.free_pages, &free_top = st.free_top;
  const c10::Device device = k_pages.device();
  check_float(op, "k", k);
  check_arg(op, "k", k, device, {-1, -1, -1}, "[S, T, D]");
  const int64_t S = k.size(0), T = k.size(1), D = k.size(2);
  check_paged_store(op, "k_pages", k_pages, block_table, seq_lens, S, device);
  const int64_t P = k_pages.size(0);
  check_arg(op, "k_pages", k_pages, device, {P, -1, D}, "[P, page_size, D] with k's D");
  check_dtype(op, "k_pages", k_pages, k.scalar_type());
  check_arg(op, "v_pages", v_pages, device, {P, k_pages.size(1), D}, "[P, page_size, D] like k_pages");
  check_dtype(op, "v_pages", v_pages, k.scalar_type());
  check_arg(op, "v", v, device, {S, T, D}, "[S, T, D] like k");
  check_dtype(op, "v", v, k.scalar_type());
  check_dtype(op, "num_seen", num_seen, at::kInt);
  check_arg(op, "num_seen", num_seen, device, {S}, "[S]");
  check_dtype(op, "ring_slots", ring_slots, at::kInt);
  check_arg(op, "ring_slots", ring_slots, device, {S, -1}, "[S, window + 1]");
  TORCH_CHECK(ring_slots.size(1) >= 1, op, ": ring_slots must be [S, window + 1] with window >= 0, got shape ",
              ring_slots.sizes());
  check_dtype(op, "ring_flags", ring_flags, at::kBool);
  check_arg(op, "ring_flags", ring_flags, device, {S, ring_slots.size(1)}, "[S, window + 1] like ring_slots");
  check_dtype(op, "free_pages", free_pages, at::kInt);
  check_arg(op, "free_pages", free_pages, device, {P}, "[P] (P = k_pages.size(0))");
  check_dtype(op, "free_top", free_top, at::kInt);
  check_arg(op, "free_top", free_top, device, {1}, "[1]");
  check_dtype(op, "decisions", decisions, at::kBool);
  check_arg(op, "decisions", decisions, device, {S, T}, "[S, T] like k");
  if (valid) {
    check_dtype(op, "valid", *valid, at::kBool);
    check_arg(op, "valid", *valid, device, {S, T}, "[S, T] like k");
  }
}

}  // namespace dms
