// CPU kernel of dms.paged_decode_attention. Each sequence's live slots are cut into spans
// (split-KV: several spans per sequence when there are fewer sequences than threads can keep
// busy); a kernel for the best instruction set (decode.h) leaves each span's partial softmax
// state, and a merge combines the spans of a sequence and normalises.
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

// Spans: one per sequence, unless that leaves threads idle; then long sequences are cut into
// spans of at least kMinSpan slots so that every thread gets several.
constexpr int32_t kMinSpan = 512;

std::vector<DecodeSpan> plan_spans(const int32_t* lens, int64_t S, int32_t page_size) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int32_t longest = 0;
  for (int64_t s = 0; s < S; ++s) longest = std::max(longest, lens[s]);
  int64_t span = longest;
  if (S < want && longest > kMinSpan) {
    const int64_t splits = (want + S - 1) / S;
    span = round_up(std::max<int64_t>(kMinSpan, (longest + splits - 1) / splits), page_size);
  }
  std::vector<DecodeSpan> spans;
  for (int64_t s = 0; s < S; ++s) {
    int32_t begin = 0;
    do {
      const int32_t end = static_cast<int32_t>(std::min<int64_t>(lens[s], begin + std::max<int64_t>(span, 1)));
      spans.push_back({s, begin, end});
      begin = end;
    } while (begin < lens[s]);
  }
  return spans;
}

template <typename T, typename Out>
void decode(DecodeFn<T> kernel, const dms::PagedStore<const T>& st, const T* q, int64_t G, float scale, Out* out) {
  const int64_t S = st.num_seqs, D = st.head_dim;
  const auto spans = plan_spans(st.seq_lens, S, st.page_size);
  const int64_t n = static_cast<int64_t>(spans.size());
  std::vector<float> acc(n * G * D), max(n * G), sum(n * G);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(decode_scratch_floats(G, D));
    for (int64_t i = begin; i < end; ++i)
      kernel(st, q + spans[i].seq * G * D, G, scale, spans[i], acc.data() + i * G * D, max.data() + i * G,
             sum.data() + i * G, scratch.data());
  });
  // Spans of a sequence are adjacent in `spans`.
  std::vector<int64_t> first(S + 1, n);
  for (int64_t i = n - 1; i >= 0; --i) first[spans[i].seq] = i;
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(D);
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY, l = 0.f;
        for (int64_t i = first[s]; i < first[s + 1]; ++i) m = std::max(m, max[i * G + g]);
        std::fill(total.begin(), total.end(), 0.f);
        for (int64_t i = first[s]; i < first[s + 1]; ++i) {
          if (max[i * G + g] == -INFINITY) continue;  // an empty span
          const float w = std::exp(max[i * G + g] - m);
          l += w * sum[i * G + g];
          const float* a = acc.data() + (i * G + g) * D;
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
