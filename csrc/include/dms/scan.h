// Per-sequence eviction-flag scan of a whole sequence on an empty cache (schema of `scan_flags`).
#pragma once

#include "dms/common.h"

namespace dms {

// keep[t]: valid and (among the last window+1 valid tokens or flag 0), where the flag of a
// valid token is the decision of the next valid token. offsets[t]: kept tokens before t.
// Returns the number kept. Walks backwards so each flag is the decision seen last.
DMS_HOST_DEVICE inline int32_t scan_sequence(const bool* dec, const bool* valid, int64_t T,
                                             int64_t window, bool* keep, int32_t* offsets) {
  bool next_decision = false;  // the newest valid token has no flag
  int64_t from_end = 0;        // valid tokens after t
  for (int64_t t = T - 1; t >= 0; --t) {
    const bool ok = !valid || valid[t];
    keep[t] = ok && (from_end <= window || !next_decision);
    if (ok) {
      next_decision = dec[t];
      ++from_end;
    }
  }
  int32_t kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    offsets[t] = kept;
    kept += keep[t] ? 1 : 0;
  }
  return kept;
}

}  // namespace dms
