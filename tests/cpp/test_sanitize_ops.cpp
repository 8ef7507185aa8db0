// CTest for the sanitizer build (scripts/sanitize.sh), also run by the plain build: every CPU
// kernel on edge shapes where an off-by-one would read or write past a buffer (pages at the end
// of the pool, partly filled last pages, page size 1, window 0, odd head dims, empty sequences,
// S = 0), in the three model dtypes, plus the error paths (an exception through the dispatcher
// must not leak or touch freed memory). Results are checked against simple recomputations.

#include <functional>
#include <iostream>
#include <string>

#include "dms_ops_test.h"

namespace {

using namespace dms_test;

// Expects `call` to throw a c10::Error whose message contains `arg`.
void expect_error(const std::function<void()>& call, const std::string& arg) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(arg) == std::string::npos) {
      std::cerr << "error does not name " << arg << ": " << msg << std::endl;
      ++dms_test::failures;
    }
    return;
  }
  std::cerr << "no error naming " << arg << std::endl;
  ++dms_test::failures;
}

// Fills a pool whose free list hands out the LAST page ids first, so live pages sit at the end
// of the allocation; then checks gather_varlen and paged_decode_attention against dense math.
void test_store_edges(at::ScalarType dtype, int64_t page_size, int64_t window, int64_t D) {
  const int64_t S = 3, T = 11, max_pages = (T + page_size - 1) / page_size;
  const int64_t P = S * max_pages;
  auto opt = at::TensorOptions().dtype(dtype);
  auto k_pages = at::empty({P, page_size, D}, opt), v_pages = at::empty({P, page_size, D}, opt);
  auto table = at::full({S, max_pages}, -1, at::kInt);
  auto lens = at::zeros({S}, at::kInt), seen = at::zeros({S}, at::kInt);
  auto ring_slots = at::zeros({S, window + 1}, at::kInt);
  auto ring_flags = at::zeros({S, window + 1}, at::kBool);
  auto free_pages = at::arange(P, at::kInt), free_top = at::full({1}, P, at::kInt);
  const auto k = at::randn({S, T, D}).to(dtype);
  const auto decisions = at::rand({S, T}) < 0.5;
  auto valid = at::rand({S, T}) < 0.8;
  valid[1].fill_(false);  // an empty sequence
  for (int64_t t = 0; t < T; ++t) {  // decode-style: one token at a time
    auto sl = [&](const at::Tensor& x) { return x.slice(1, t, t + 1).contiguous(); };
    append.call(k_pages, v_pages, table, lens, seen, ring_slots, ring_flags, free_pages, free_top, sl(k), sl(-k),
                sl(decisions), sl(valid));
  }
  const auto [keep, offsets, counts] = scan_flags.call(decisions, valid, window);
  EXPECT(at::equal(lens, counts));
  const auto [kp, cu, max_seqlen] = gather_varlen.call(k_pages, table, lens);
  EXPECT(kp.size(0) == counts.sum().item<int64_t>());
  EXPECT(max_seqlen == counts.max().item<int64_t>());
  const auto q = at::randn({S, 2, D}).to(dtype);
  const auto out = paged_decode_attention.call(q, k_pages, v_pages, table, lens, 0.5);
  for (int64_t s = 0; s < S; ++s) {
    const auto ks = kp.slice(0, cu[s].item<int64_t>(), cu[s + 1].item<int64_t>()).to(at::kFloat);
    const auto want = ks.size(0) == 0 ? at::zeros({2, D})
                                      : at::softmax(at::matmul(q[s].to(at::kFloat), ks.t()) * 0.5, -1).matmul(-ks);
    EXPECT(at::allclose(out[s].to(at::kFloat), want, 2e-2, 2e-2));
  }
  EXPECT(lens[1].item<int32_t>() == 0);
}

void test_empty_and_degenerate_shapes() {
  const auto [keep, offsets, counts] = scan_flags.call(at::zeros({0, 5}, at::kBool), std::nullopt, 3);
  EXPECT(keep.numel() == 0 && counts.numel() == 0);
  const auto [packed, cu, m] = compact.call(at::randn({0, 4, 3}), at::zeros({0, 4}, at::kBool));
  EXPECT(packed.size(0) == 0 && cu.numel() == 1 && m == 0);
  const auto [p1, cu1, m1] = compact.call(at::randn({2, 0, 3}), at::zeros({2, 0}, at::kBool));
  EXPECT(p1.size(0) == 0 && m1 == 0);
  const auto [g, cu2, m2] = gather_varlen.call(at::randn({1, 2, 3}), at::zeros({0, 1}, at::kInt), at::zeros({0}, at::kInt));
  EXPECT(g.size(0) == 0 && cu2.numel() == 1);
  const auto out = paged_decode_attention.call(at::randn({2, 1, 3}), at::randn({1, 2, 3}), at::randn({1, 2, 3}),
                                               at::full({2, 1}, -1, at::kInt), at::zeros({2}, at::kInt), 1.0);
  EXPECT(at::equal(out, at::zeros({2, 1, 3})));
  // compact with every row kept, odd D, half precision: runs of rows end exactly at the buffer end.
  const auto x = at::randn({3, 9, 5}).to(at::kHalf);
  const auto [all, cu3, m3] = compact.call(x, at::ones({3, 9}, at::kBool));
  EXPECT(at::equal(all, x.reshape({27, 5})) && m3 == 9);
}

void test_error_paths() {
  auto pages = at::randn({4, 2, 3});
  auto table = at::tensor({0, 1, 2, -1}, at::kInt).view({2, 2});
  expect_error([&] { gather_varlen.call(pages, table, at::tensor({5, 0}, at::kInt)); }, "seq_lens");
  expect_error([&] { gather_varlen.call(pages, at::tensor({0, 9, 2, -1}, at::kInt).view({2, 2}),
                                        at::tensor({3, 1}, at::kInt)); }, "block_table");
  expect_error([&] { paged_decode_attention.call(at::randn({2, 1, 3}), pages, pages, table,
                                                 at::tensor({3, -1}, at::kInt), 1.0); }, "seq_lens");
  expect_error([&] { scan_flags.call(at::zeros({2, 3}, at::kBool), std::nullopt, -1); }, "window");
  expect_error([&] { compact.call(at::randn({2, 3, 4}), at::zeros({2, 4}, at::kBool)); }, "keep");
  // A refused append (pool exhausted) and one with an out-of-range free page id.
  auto k_pages = at::zeros({2, 2, 3}), v_pages = at::zeros({2, 2, 3});
  auto bt = at::full({2, 4}, -1, at::kInt);
  auto lens = at::zeros({2}, at::kInt), seen = at::zeros({2}, at::kInt);
  auto slots = at::zeros({2, 2}, at::kInt);
  auto flags = at::zeros({2, 2}, at::kBool);
  auto free_pages = at::tensor({0, 1}, at::kInt), top = at::full({1}, 2, at::kInt);
  const auto k = at::ones({2, 3, 3});
  expect_error([&] { append.call(k_pages, v_pages, bt, lens, seen, slots, flags, free_pages, top, k, k,
                                 at::zeros({2, 3}, at::kBool), std::nullopt); }, "page pool exhausted");
  auto bad_free = at::tensor({0, 7}, at::kInt);
  const auto k1 = at::ones({2, 1, 3});
  expect_error([&] { append.call(k_pages, v_pages, bt, lens, seen, slots, flags, bad_free, top, k1, k1,
                                 at::zeros({2, 1}, at::kBool), std::nullopt); }, "free_pages");
  EXPECT(lens.sum().item<int64_t>() == 0 && top.item<int32_t>() == 2);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16})
    for (int64_t page_size : {1, 3, 16})
      for (int64_t window : {0, 2, 50})
        for (int64_t D : {1, 7, 64}) test_store_edges(dtype, page_size, window, D);
  test_empty_and_degenerate_shapes();
  test_error_paths();
  std::cout << (failures ? "FAILED" : "OK") << " (" << failures << " failed checks)" << std::endl;
  return failures ? 1 : 0;
}
