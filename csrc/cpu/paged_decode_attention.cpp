// CPU kernel of dms.paged_decode_attention. The live pages of all sequences are visited in
// pool order (by page id), not in each sequence's block-table order: pages scattered at random
// then stream like one array where the pool is dense, instead of costing a fresh DRAM access
// each. The visit is cut into a few shares per thread; a kernel for the best instruction set
// (decode.h) carries each sequence's partial softmax state through a share, and a merge
// combines the shares of a sequence and normalises.
//
// DMS_CPU_ISA (read on every call) forces the kernel: scalar, avx2, avx512, avx512_bf16, or auto
// (unset, the default: the best one the CPU has). A forced ISA the CPU or the build lacks is an
// error. avx512_bf16 differs from avx512 for bf16 only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "decode.h"
#include "dms/checks.h"
#include "paged_checks.h"

namespace {

using namespace dms::cpu;

constexpr const char* kOp = "dms.paged_decode_attention";
constexpr int64_t kSharesPerThread = 8;
constexpr int64_t kMergeFloats = int64_t{1} << 18;  // of the states' accumulators, per merge task

enum class Isa { scalar, avx2, avx512, avx512_bf16 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512_bf16"};
constexpr int kIsas = 4;

bool cpu_has(Isa isa) {
#ifdef DMS_X86_KERNELS
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::avx512_bf16: return cpu_has(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

std::string available() {
  std::string names;
  for (int i = 0; i < kIsas; ++i)
    if (cpu_has(static_cast<Isa>(i))) names += (names.empty() ? "" : ", ") + std::string(kIsaNames[i]);
  return names;
}

Isa choose_isa() {
  const char* env = std::getenv("DMS_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    for (Isa isa : {Isa::avx512_bf16, Isa::avx512, Isa::avx2})
      if (cpu_has(isa)) return isa;
    return Isa::scalar;
  }
  for (int i = 0; i < kIsas; ++i) {
    if (want != kIsaNames[i]) continue;
    TORCH_CHECK(cpu_has(static_cast<Isa>(i)), kOp, ": DMS_CPU_ISA=", want,
                " is not available on this CPU or build (available: ", available(), ")");
    return static_cast<Isa>(i);
  }
  TORCH_CHECK(false, kOp, ": DMS_CPU_ISA=", want, " is not one of auto, scalar, avx2, avx512, avx512_bf16");
}

DecodeKernels kernels_for(Isa isa) {
#ifdef DMS_X86_KERNELS
  if (isa == Isa::avx512_bf16) {
    DecodeKernels k = avx512_kernels();
    k.bf16 = avx512_bf16_kernel();
    return k;
  }
  if (isa == Isa::avx512) return avx512_kernels();
  if (isa == Isa::avx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

// The live part of every page, in pool order: a counting sort by page id, or a comparison sort
// when the pool is much larger than its live pages (vLLM preallocates it), so that a call costs
// no pass over the whole pool.
template <typename DType>
std::vector<DecodePiece> pieces_in_pool_order(const dms::PagedStore<DType>& st) {
  const int32_t ps = st.page_size;
  const auto pages_of = [&](int64_t s) { return dms::pages_for(st.seq_lens[s], ps); };
  int64_t total = 0;
  for (int64_t s = 0; s < st.num_seqs; ++s) total += pages_of(s);
  std::vector<DecodePiece> pieces(total);
  const auto piece = [&](int64_t s, int32_t j) {
    const int64_t page = st.block_row(s)[j];
    return DecodePiece{page * ps, static_cast<int32_t>(s), std::min(ps, st.seq_lens[s] - j * ps)};
  };
  if (st.num_pages > 8 * total) {
    int64_t i = 0;
    for (int64_t s = 0; s < st.num_seqs; ++s)
      for (int32_t j = 0; j < pages_of(s); ++j) pieces[i++] = piece(s, j);
    std::sort(pieces.begin(), pieces.end(), [](const DecodePiece& a, const DecodePiece& b) { return a.row < b.row; });
    return pieces;
  }
  std::vector<int64_t> start(st.num_pages + 1, 0);
  for (int64_t s = 0; s < st.num_seqs; ++s)
    for (int32_t j = 0; j < pages_of(s); ++j) ++start[st.block_row(s)[j] + 1];
  for (int64_t p = 0; p < st.num_pages; ++p) start[p + 1] += start[p];
  for (int64_t s = 0; s < st.num_seqs; ++s)
    for (int32_t j = 0; j < pages_of(s); ++j) pieces[start[st.block_row(s)[j]]++] = piece(s, j);
  return pieces;
}

template <typename T, typename Out>
void decode(DecodeFn<T> kernel, const dms::PagedStore<const T>& st, const T* q, int64_t G, float scale, Out* out) {
  const int64_t S = st.num_seqs, D = st.head_dim;
  const auto pieces = pieces_in_pool_order(st);
  const int64_t count = static_cast<int64_t>(pieces.size());
  // The pieces are cut into shares, each with its own state for every sequence, that the threads
  // take in turn: several per thread, so that a thread the OS deschedules on a busy machine holds
  // back one share, not 1 / threads of the work. Fewer shares when one would read less than 8
  // times its state's bytes of K and V (the states are zeroed, written and merged, so they must
  // stay small next to the pages). The shares depend on the thread count, not on which thread
  // takes which, and are merged in order: a result does not vary from call to call.
  const int64_t kv_bytes = count * st.page_size * D * 2 * static_cast<int64_t>(sizeof(T));
  const int64_t state_bytes = S * G * (D + 2) * static_cast<int64_t>(sizeof(float));
  const int64_t worth = kv_bytes / std::max<int64_t>(1, 8 * state_bytes);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), worth));
  const int64_t shares =
      threads == 1 ? 1 : std::max<int64_t>(1, std::min({kSharesPerThread * threads, worth, count}));
  std::vector<float> acc(shares * S * G * D, 0.f), max(shares * S * G, -INFINITY), sum(shares * S * G, 0.f);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(decode_scratch_floats(G, D));
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < shares;) {
      const int64_t first = count * i / shares, last = count * (i + 1) / shares;
      kernel(st, q, G, scale, pieces.data() + first, last - first, acc.data() + i * S * G * D,
             max.data() + i * S * G, sum.data() + i * S * G, scratch.data());
    }
  });
  // A small merge runs on the calling thread: a parallel region would cost more.
  const int64_t merge_grain = std::max<int64_t>(1, kMergeFloats / (shares * G * D));
  at::parallel_for(0, S, merge_grain, [&](int64_t begin, int64_t end) {
    std::vector<float> total(D);
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t g = 0; g < G; ++g) {
        const auto state = [&](int64_t i) { return (i * S + s) * G + g; };  // of share i
        float m = -INFINITY, l = 0.f;
        for (int64_t i = 0; i < shares; ++i) m = std::max(m, max[state(i)]);
        std::fill(total.begin(), total.end(), 0.f);
        for (int64_t i = 0; i < shares; ++i) {
          if (max[state(i)] == -INFINITY) continue;  // no slot of s in this share
          const float w = std::exp(max[state(i)] - m);
          l += w * sum[state(i)];
          const float* a = acc.data() + state(i) * D;
          for (int64_t d = 0; d < D; ++d) total[d] += w * a[d];
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;  // 0 for an empty sequence: zeros out
        Out* o = out + (s * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Out>(total[d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  const dms::StoreTensors store{k_pages, v_pages, block_table, seq_lens};
  dms::check_paged_decode_attention(q, store, scale);
  dms::cpu::check_seq_lens(kOp, dms::paged_store<const char>(store));
  const DecodeKernels kernels = kernels_for(choose_isa());
  const int64_t G = q.size(1);
  const float sc = static_cast<float>(scale);
  auto out = at::empty_like(q);
  // The three model dtypes only (checked above).
  switch (q.scalar_type()) {
    case at::kFloat:
      decode(kernels.f32, dms::paged_store<const float>(store), q.data_ptr<float>(), G, sc, out.data_ptr<float>());
      break;
    case at::kHalf:
      decode(kernels.f16, dms::paged_store<const Fp16>(store), static_cast<const Fp16*>(q.data_ptr()), G, sc,
             out.data_ptr<c10::Half>());
      break;
    default:
      decode(kernels.bf16, dms::paged_store<const Bf16>(store), static_cast<const Bf16*>(q.data_ptr()), G, sc,
             out.data_ptr<c10::BFloat16>());
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dms, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention_cpu); }
