// What every C++ test of the dms ops shares: a non-fatal EXPECT that counts failures, and
// typed handles to the operators, looked up through the dispatcher by their schema names (the
// way another engine calls them). Each test is its own executable, so one counter per program.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <optional>
#include <tuple>

namespace dms_test {

inline int failures = 0;

#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::cerr << __FILE__ << ":" << __LINE__ << ": failed: " #cond << std::endl; \
      ++dms_test::failures;                                                       \
    }                                                                             \
  } while (0)

using T = const at::Tensor&;
using Packed = std::tuple<at::Tensor, at::Tensor, c10::SymInt>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const auto scan_flags =
    op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T, const std::optional<at::Tensor>&, int64_t)>("dms::scan_flags");
inline const auto compact = op<Packed(T, T)>("dms::compact");
inline const auto gather_varlen = op<Packed(T, T, T)>("dms::gather_varlen");
inline const auto paged_decode_attention = op<at::Tensor(T, T, T, T, T, double)>("dms::paged_decode_attention");
inline const auto append =
    op<void(T, T, T, T, T, T, T, T, T, T, T, T, const std::optional<at::Tensor>&)>("dms::append");

}  // namespace dms_test
