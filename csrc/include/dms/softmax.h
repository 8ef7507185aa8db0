// Online (streaming) softmax state of one query row, fp32 (FlashAttention style).
#pragma once

#include <cmath>

#include "dms/common.h"

namespace dms {

struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.f;

  // Raises the running max to cover a new block of scores whose max is block_max. Returns the
  // factor by which the caller must shrink its weighted accumulator (sum is shrunk here).
  DMS_HOST_DEVICE float rescale(float block_max) {
    const float m = fmaxf(max, block_max);
    const float a = expf(max - m);  // 0 on the first block (max = -inf)
    max = m;
    sum *= a;
    return a;
  }

  // Weight of one score of the current block; adds it to the denominator.
  DMS_HOST_DEVICE float weight(float score) {
    const float p = expf(score - max);
    sum += p;
    return p;
  }

  DMS_HOST_DEVICE float inv_sum() const { return sum > 0.f ? 1.f / sum : 0.f; }
};

}  // namespace dms
