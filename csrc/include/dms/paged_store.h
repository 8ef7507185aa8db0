// The paged KV store of one layer as plain pointers, sizes and strides (docs/design.md §2), in
// the spirit of FlashInfer's paged_kv_t: framework-free, trivially copyable, so the same value
// is passed to CPU code and by value to CUDA kernels. It owns nothing; dms/store_tensors.h
// builds it from the op's tensors after validation. An op sets only the fields it reads or
// writes: the ring and free-list pointers are null for the read-only ops.
//
//   k_data, v_data  [num_pages, page_size, head_dim]  row r of page p at p * stride_page + r * stride_row
//   block_table     [num_seqs, max_pages]  page id of each page of a sequence, -1 = none
//   seq_lens        [num_seqs]  live slots: slots 0 .. seq_lens[s]-1 are all live
//   num_seen        [num_seqs]  valid tokens appended so far
//   ring_slots      [num_seqs, ring_width]  slot of token n at column n % ring_width
//   ring_flags      [num_seqs, ring_width]  eviction flag of that token (newest: false)
//   free_pages      [num_pages]  free page ids are free_pages[0 .. *free_top)
//   free_top        [1]
// DType is the element type the kernel reads the pages as (the model dtype, or a word type
// for byte copies: as<U>() reinterprets, rescaling head_dim and the strides).
#pragma once

#include "dms/common.h"

namespace dms {

DMS_HOST_DEVICE inline int32_t pages_for(int32_t slots, int32_t page_size) {
  return (slots + page_size - 1) / page_size;
}

// Row of `slot` in the pages viewed as [num_pages * page_size, head_dim].
DMS_HOST_DEVICE inline int64_t slot_row(const int32_t* block_row, int32_t slot, int32_t page_size) {
  return static_cast<int64_t>(block_row[slot / page_size]) * page_size + slot % page_size;
}

template <typename DType>
struct PagedStore {
  DType* k_data = nullptr;
  DType* v_data = nullptr;
  int32_t* block_table = nullptr;
  int32_t* seq_lens = nullptr;
  int32_t* num_seen = nullptr;
  int32_t* ring_slots = nullptr;
  bool* ring_flags = nullptr;
  const int32_t* free_pages = nullptr;
  int32_t* free_top = nullptr;
  int64_t num_seqs = 0, num_pages = 0, max_pages = 0;
  int64_t head_dim = 0;                   // elements of DType per row
  int64_t stride_page = 0, stride_row = 0;  // in elements of DType
  int32_t page_size = 1;
  int32_t ring_width = 1;  // window + 1

  DMS_HOST_DEVICE int32_t* block_row(int64_t s) const { return block_table + s * max_pages; }

  // Row of a slot of sequence s (see slot_row).
  DMS_HOST_DEVICE int64_t row(int64_t s, int32_t slot) const { return slot_row(block_row(s), slot, page_size); }

  // Element offset of a row in k_data / v_data.
  DMS_HOST_DEVICE int64_t offset(int64_t row) const {
    return (row / page_size) * stride_page + (row % page_size) * stride_row;
  }

  DMS_HOST_DEVICE DType* k_row(int64_t row) const { return k_data + offset(row); }
  DMS_HOST_DEVICE DType* v_row(int64_t row) const { return v_data + offset(row); }

  template <typename U>
  DMS_HOST_DEVICE PagedStore<U> as() const {
    PagedStore<U> out;
    out.k_data = reinterpret_cast<U*>(k_data);
    out.v_data = reinterpret_cast<U*>(v_data);
    out.block_table = block_table;
    out.seq_lens = seq_lens;
    out.num_seen = num_seen;
    out.ring_slots = ring_slots;
    out.ring_flags = ring_flags;
    out.free_pages = free_pages;
    out.free_top = free_top;
    out.num_seqs = num_seqs;
    out.num_pages = num_pages;
    out.max_pages = max_pages;
    out.head_dim = head_dim * static_cast<int64_t>(sizeof(DType)) / static_cast<int64_t>(sizeof(U));
    out.stride_page = stride_page * static_cast<int64_t>(sizeof(DType)) / static_cast<int64_t>(sizeof(U));
    out.stride_row = stride_row * static_cast<int64_t>(sizeof(DType)) / static_cast<int64_t>(sizeof(U));
    out.page_size = page_size;
    out.ring_width = ring_width;
    return out;
  }
};

}  // namespace dms
