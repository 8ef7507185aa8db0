// Launch helpers shared by the CUDA kernels (docs/building.md #4: c10/cuda headers only, no
// ATen/cuda/CUDAContext.h). Rows are copied as 16-bit words: every supported dtype is a whole
// number of them, so the copy kernels need one instantiation.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace dms::cuda {

constexpr int kThreads = 128;  // a power of two (block reductions halve it)

using word_t = uint16_t;

inline int64_t words_per_row(int64_t D, int64_t element_size) {
  return D * element_size / static_cast<int64_t>(sizeof(word_t));
}

inline unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

// Block-wide copy of one row of `words` 16-bit words.
__device__ inline void copy_row(word_t* dst, const word_t* src, int64_t words) {
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
}

}  // namespace dms::cuda
