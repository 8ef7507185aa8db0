// The paged store as the op schemas pass it (plain tensors, so other engines can call the ops),
// and the adapter to the kernels' dms::PagedStore. Host only. Tensors an op does not take stay
// undefined and give null pointers; the adapter is meant to run after the op's checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "dms/paged_store.h"

namespace dms {

struct StoreTensors {
  at::Tensor k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages, free_top;
};

namespace detail {
template <typename P>
P* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<P*>(t.data_ptr()) : nullptr;
}
}  // namespace detail

// DType: the type the kernel reads the pages as; its size must divide the element size times
// the head dim (true for the model dtype and for byte or 16-bit word views).
template <typename DType>
PagedStore<DType> paged_store(const StoreTensors& t) {
  using detail::ptr;
  PagedStore<DType> st;
  const at::Tensor& pages = t.k_pages;
  const int64_t per = pages.element_size();
  const int64_t unit = static_cast<int64_t>(sizeof(DType));
  st.k_data = static_cast<DType*>(pages.data_ptr());
  st.v_data = t.v_pages.defined() ? static_cast<DType*>(t.v_pages.data_ptr()) : nullptr;
  st.block_table = ptr<int32_t>(t.block_table);
  st.seq_lens = ptr<int32_t>(t.seq_lens);
  st.num_seen = ptr<int32_t>(t.num_seen);
  st.ring_slots = ptr<int32_t>(t.ring_slots);
  st.ring_flags = ptr<bool>(t.ring_flags);
  st.free_pages = ptr<const int32_t>(t.free_pages);
  st.free_top = ptr<int32_t>(t.free_top);
  st.num_seqs = t.block_table.size(0);
  st.max_pages = t.block_table.size(1);
  st.num_pages = pages.size(0);
  st.page_size = static_cast<int32_t>(pages.size(1));
  st.head_dim = pages.size(2) * per / unit;
  // Contiguous pages (checked); not pages.stride(), which is 1, not 0, past an empty head dim.
  st.stride_row = st.head_dim;
  st.stride_page = st.page_size * st.head_dim;
  st.ring_width = t.ring_slots.defined() ? static_cast<int32_t>(t.ring_slots.size(1)) : 1;
  return st;
}

}  // namespace dms
