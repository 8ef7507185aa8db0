// CTest: the CPU kernels through the dispatcher, and the shared host/device ring helpers.
// A plain executable: prints each failed check and returns nonzero.

#include <iostream>
#include <random>
#include <vector>

#include "dms/ring.h"
#include "dms/store_tensors.h"

#include "dms_ops_test.h"

namespace {

using namespace dms_test;

struct Store {
  at::Tensor k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages, free_top;
  Store(int64_t S, int64_t P, int64_t page_size, int64_t max_pages, int64_t window, int64_t D)
      : k_pages(at::zeros({P, page_size, D})), v_pages(at::zeros({P, page_size, D})),
        block_table(at::full({S, max_pages}, -1, at::kInt)), seq_lens(at::zeros({S}, at::kInt)),
        num_seen(at::zeros({S}, at::kInt)), ring_slots(at::zeros({S, window + 1}, at::kInt)),
        ring_flags(at::zeros({S, window + 1}, at::kBool)), free_pages(at::randperm(P, at::kInt)),
        free_top(at::full({1}, P, at::kInt)) {}
  void feed(const at::Tensor& k, const at::Tensor& decisions, const std::optional<at::Tensor>& valid) {
    append.call(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages, free_top, k,
                -k, decisions, valid);
  }
  std::vector<at::Tensor> all() const {
    return {k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages, free_top};
  }
};

// count_fresh_slots (the dry run) agrees with replaying ring_step on a copy of the ring.
void test_dry_run_matches_ring_replay() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    const int32_t W1 = 1 + rng() % 5, n0 = rng() % 12, T = 1 + rng() % 10;
    std::vector<int32_t> slots(W1);
    bool flags[8], dec[16], valid[16];
    for (int i = 0; i < W1; ++i) flags[i] = rng() % 2;
    for (int t = 0; t < T; ++t) dec[t] = rng() % 2, valid[t] = rng() % 4 != 0;
    const bool* ok = trial % 2 ? valid : nullptr;
    const int32_t dry = dms::count_fresh_slots(flags, W1, n0, dec, ok, T);
    int32_t len = 100, fresh = 0, n = n0;
    for (int t = 0; t < T; ++t)
      if (!ok || ok[t]) fresh += dms::ring_step(slots.data(), flags, W1, n++, dec[t], len).fresh;
    EXPECT(dry == fresh);
    EXPECT(len == 100 + fresh);
  }
}

// Token by token and in chunks, append stores the same tokens: scan_flags' keep set.
void test_append_chunking_and_retained_set() {
  const int64_t S = 4, T = 200, D = 2, window = 3, page_size = 4, max_pages = 64;
  const auto decisions = at::rand({S, T}) < 0.6;
  const auto valid = at::rand({S, T}) < 0.9;
  const auto token = at::arange(T, at::kFloat).view({1, T, 1}).expand({S, T, D}).contiguous();
  Store one(S, S * max_pages, page_size, max_pages, window, D), many(S, S * max_pages, page_size, max_pages, window, D);
  for (int64_t t = 0; t < T; ++t) {
    auto sl = [&](const at::Tensor& x) { return x.slice(1, t, t + 1).contiguous(); };
    one.feed(sl(token), sl(decisions), sl(valid));
  }
  for (int64_t a = 0; a < T; a += 37) {
    auto sl = [&](const at::Tensor& x) { return x.slice(1, a, std::min(a + 37, T)).contiguous(); };
    many.feed(sl(token), sl(decisions), sl(valid));
  }
  const auto [g_one, cu_one, m_one] = gather_varlen.call(one.k_pages, one.block_table, one.seq_lens);
  const auto [g_many, cu_many, m_many] = gather_varlen.call(many.k_pages, many.block_table, many.seq_lens);
  EXPECT(at::equal(g_one, g_many) && at::equal(cu_one, cu_many) && m_one == m_many);
  const auto [keep, offsets, counts] = scan_flags.call(decisions, valid, window);
  EXPECT(at::equal(many.seq_lens, counts));
  const auto [want, cu_want, m_want] = compact.call(token, keep);
  // Slots are not in token order: compare each sequence's token ids as sorted sets.
  for (int64_t s = 0; s < S; ++s) {
    const auto got_s = std::get<0>(at::sort(g_many.slice(0, cu_many[s].item<int64_t>(), cu_many[s + 1].item<int64_t>())
                                                .select(1, 0)));
    const auto want_s = want.slice(0, cu_want[s].item<int64_t>(), cu_want[s + 1].item<int64_t>()).select(1, 0);
    EXPECT(at::equal(got_s, want_s));
  }
}

// The kernels' view of the store: rows found through block_table, views of other widths.
void test_paged_store_view() {
  Store store(2, 8, 4, 3, 2, 6);
  store.feed(at::arange(2 * 7 * 6, at::kFloat).view({2, 7, 6}), at::zeros({2, 7}, at::kBool), std::nullopt);
  const dms::StoreTensors tensors{store.k_pages, store.v_pages, store.block_table, store.seq_lens, store.num_seen,
                                  store.ring_slots, store.ring_flags, store.free_pages, store.free_top};
  const auto st = dms::paged_store<const float>(tensors);
  EXPECT(st.num_seqs == 2 && st.num_pages == 8 && st.max_pages == 3 && st.page_size == 4 && st.head_dim == 6);
  EXPECT(st.ring_width == 3 && st.stride_row == 6 && st.stride_page == 24);
  for (int64_t s = 0; s < 2; ++s)
    for (int32_t slot = 0; slot < 7; ++slot) {
      const float* k = st.k_row(st.row(s, slot));
      EXPECT(k[0] == (s * 7 + slot) * 6 && k[5] == (s * 7 + slot) * 6 + 5);
      EXPECT(st.v_row(st.row(s, slot))[1] == -k[1]);
    }
  const auto bytes = st.as<const char>();
  EXPECT(bytes.head_dim == 24 && bytes.stride_page == 96);
  EXPECT(bytes.k_row(bytes.row(1, 5)) == reinterpret_cast<const char*>(st.k_row(st.row(1, 5))));
}

void test_paged_decode_attention_matches_dense() {
  const int64_t S = 3, G = 4, D = 64, page_size = 16, max_pages = 8;
  Store store(S, S * max_pages, page_size, max_pages, 1000, D);
  const auto k = at::randn({S, 100, D});
  store.feed(k, at::zeros({S, 100}, at::kBool), at::rand({S, 100}) < 0.8);
  const auto q = at::randn({S, G, D});
  const auto out = paged_decode_attention.call(q, store.k_pages, store.v_pages, store.block_table, store.seq_lens, 0.125);
  const auto [kp, cu, m] = gather_varlen.call(store.k_pages, store.block_table, store.seq_lens);
  const auto [vp, cu2, m2] = gather_varlen.call(store.v_pages, store.block_table, store.seq_lens);
  for (int64_t s = 0; s < S; ++s) {
    const auto ks = kp.slice(0, cu[s].item<int64_t>(), cu[s + 1].item<int64_t>());
    const auto vs = vp.slice(0, cu[s].item<int64_t>(), cu[s + 1].item<int64_t>());
    const auto want = at::softmax(at::matmul(q[s], ks.t()) * 0.125, -1).matmul(vs);
    EXPECT(at::allclose(out[s], want, 1e-5, 1e-5));
  }
}

void test_compact_matches_boolean_indexing() {
  const auto x = at::randn({5, 33, 7}).to(at::kBFloat16);
  const auto keep = at::rand({5, 33}) < 0.5;
  const auto [packed, cu, max_seqlen] = compact.call(x, keep);
  EXPECT(at::equal(packed, x.index({keep})));
  EXPECT(max_seqlen == keep.sum(1).max().item<int64_t>());
  EXPECT(cu[5].item<int64_t>() == keep.sum().item<int64_t>());
}

void test_exhaustion_throws_and_changes_nothing() {
  Store store(3, 4, 2, 8, 1, 2);
  store.feed(at::ones({3, 2, 2}), at::zeros({3, 2}, at::kBool), std::nullopt);
  std::vector<at::Tensor> before;
  for (const auto& t : store.all()) before.push_back(t.clone());
  bool threw = false;
  try {
    store.feed(at::ones({3, 2, 2}), at::zeros({3, 2}, at::kBool), std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("page pool exhausted") != std::string::npos;
  }
  EXPECT(threw);
  const auto after = store.all();
  for (size_t i = 0; i < after.size(); ++i) EXPECT(at::equal(before[i], after[i]));
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_dry_run_matches_ring_replay();
  test_append_chunking_and_retained_set();
  test_paged_store_view();
  test_paged_decode_attention_matches_dense();
  test_compact_matches_boolean_indexing();
  test_exhaustion_throws_and_changes_nothing();
  std::cout << (failures ? "FAILED" : "OK") << " (" << failures << " failed checks)" << std::endl;
  return failures ? 1 : 0;
}
