// Benchmarks of the dms ops, each next to its yardstick measured in the same run:
//  (a) compact of [64 seqs, 8192 tokens, 128 dims] bf16 at 50% keep vs a plain memcpy of the
//      kept bytes (bandwidth = bytes read + written per second);
//  (b) append of one decode step (T = 1, 64 sequences) vs one paged_decode_attention step over
//      8K tokens per sequence (bf16, G = 4 query heads per sequence, D = 128);
//  (c) paged_decode_attention over 32 seqs x 8192 live tokens, G = 4, D = 64, 16-token pages in
//      shuffled order, fp32 / bf16 / fp16, once per CPU kernel (DMS_CPU_ISA), in GB/s of K and V
//      read, next to a sum and a memcpy over the same bytes; on a CUDA device too when there is one.
//  (d) the same in a 4 x 1024-token store on one thread (decode-cache), at D = 64 and 32: the
//      kernels' compute rate, in ns of CPU time per token, with the store in cache.
//  (e) peak: ns per 512-bit FMA and vdpbf16ps on one core, and the decode's compute floor they
//      imply (the roofline's other side, next to the bandwidth of (c)).
// Usage: bench_ops [repeats] [compact|step|decode|decode-cache|peak ...]   (default: all; threads:
// at::get_num_threads(), set OMP_NUM_THREADS to change; DMS_CPU_ISA=name times that kernel only;
// THP_MEM_ALLOC_ENABLE=1 makes torch back large tensors with huge pages: cheaper first touch)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using T = const at::Tensor&;
using Packed = std::tuple<at::Tensor, at::Tensor, c10::SymInt>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

double process_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Median wall time of fn over `repeats` runs, after one warm-up run.
template <typename F>
double median_seconds(int repeats, F&& fn) {
  fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void bench_compact(int repeats) {
  const auto compact = op<Packed(T, T)>("dms::compact");
  const int64_t S = 64, L = 8192, D = 128;
  const auto x = at::randn({S, L, D}).to(at::kBFloat16);
  const auto keep = at::rand({S, L}) < 0.5;
  const int64_t bytes = keep.sum().item<int64_t>() * D * x.element_size();
  const double t_compact = median_seconds(repeats, [&] { compact.call(x, keep); });
  // compact must return a new tensor: its yardstick is a memcpy into a new tensor of the same
  // size (same allocation and first-touch cost); a memcpy into a reused buffer is pure bandwidth.
  const auto src = at::empty({bytes}, at::kByte).fill_(1);
  auto warm = at::empty({bytes}, at::kByte).fill_(0);
  const double t_fresh = median_seconds(repeats, [&] {
    auto dst = at::empty({bytes}, at::kByte);
    std::memcpy(dst.data_ptr(), src.data_ptr(), bytes);
  });
  const double t_warm = median_seconds(repeats, [&] { std::memcpy(warm.data_ptr(), src.data_ptr(), bytes); });
  auto gbps = [&](double t) { return 2.0 * bytes / t / 1e9; };
  std::printf("compact [%lld, %lld, %lld] bf16, 50%% keep, %.1f MB kept: %.2f ms = %.2f GB/s\n", (long long)S,
              (long long)L, (long long)D, bytes / 1e6, t_compact * 1e3, gbps(t_compact));
  std::printf("  memcpy of the kept bytes into a new tensor: %.2f ms = %.2f GB/s -> compact at %.2fx\n", t_fresh * 1e3,
              gbps(t_fresh), t_fresh / t_compact);
  std::printf("  memcpy of the kept bytes into a reused buffer: %.2f ms = %.2f GB/s -> compact at %.2fx\n",
              t_warm * 1e3, gbps(t_warm), t_warm / t_compact);
}

void bench_decode_step(int repeats) {
  const auto append = op<void(T, T, T, T, T, T, T, T, T, T, T, T, const std::optional<at::Tensor>&)>("dms::append");
  const auto attention = op<at::Tensor(T, T, T, T, T, double)>("dms::paged_decode_attention");
  const int64_t S = 64, L = 8192, G = 4, D = 128, page_size = 16, window = 256;
  const int64_t max_pages = L / page_size + 64, P = S * max_pages;
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  auto k_pages = at::zeros({P, page_size, D}, bf16), v_pages = at::zeros({P, page_size, D}, bf16);
  auto block_table = at::full({S, max_pages}, -1, at::kInt);
  auto seq_lens = at::zeros({S}, at::kInt), num_seen = at::zeros({S}, at::kInt);
  auto ring_slots = at::zeros({S, window + 1}, at::kInt);
  auto ring_flags = at::zeros({S, window + 1}, at::kBool);
  auto free_pages = at::arange(P, at::kInt), free_top = at::full({1}, P, at::kInt);
  auto feed = [&](const at::Tensor& k, const at::Tensor& decisions) {
    append.call(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages, free_top, k,
                k, decisions, std::nullopt);
  };
  feed(at::randn({S, L, D}).to(at::kBFloat16), at::zeros({S, L}, at::kBool));  // 8K live tokens each
  const auto k1 = at::randn({S, 1, D}).to(at::kBFloat16);
  const auto d1 = at::rand({S, 1}) < 0.5;  // about half the steps reuse an evicted slot
  const double t_append = median_seconds(repeats * 20, [&] { feed(k1, d1); });
  const auto q = at::randn({S, G, D}).to(at::kBFloat16);
  const double t_attn = median_seconds(repeats, [&] {
    attention.call(q, k_pages, v_pages, block_table, seq_lens, 1.0 / std::sqrt(double(D)));
  });
  std::printf("decode step, %lld seqs x %lld tokens, bf16, G=%lld, D=%lld, page_size=%lld: append(T=1) %.1f us | "
              "paged_decode_attention %.2f ms | append/attention = %.2f%%\n",
              (long long)S, (long long)L, (long long)G, (long long)D, (long long)page_size, t_append * 1e6,
              t_attn * 1e3, 100.0 * t_append / t_attn);
}

// Waits for the device's queued work (no CUDA headers needed: the bench is plain C++).
void sync(const at::Device& device) {
  if (device.is_cuda()) c10::impl::getDeviceGuardImpl(device.type())->synchronizeDevice(device.index());
}

void bench_decode_bandwidth(int repeats, const at::Device& device, const std::vector<const char*>& isas,
                            int64_t S = 32, int64_t L = 8192, int64_t D = 64) {
  const auto attention = op<at::Tensor(T, T, T, T, T, double)>("dms::paged_decode_attention");
  const int64_t G = 4, page_size = 16, pages = L / page_size, P = S * pages;
  // The pool holds exactly the live pages, so the yardsticks stream the very bytes the kernel reads.
  const auto block_table = at::randperm(P, at::kInt).view({S, pages}).to(device);
  const auto seq_lens = at::full({S}, L, at::kInt).to(device);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const auto opt = at::TensorOptions().dtype(dtype).device(device);
    const auto k_pages = at::randn({P, page_size, D}).to(opt), v_pages = at::randn({P, page_size, D}).to(opt);
    const auto q = at::randn({S, G, D}).to(opt);
    const double bytes = 2.0 * k_pages.numel() * k_pages.element_size();
    auto k_copy = at::empty_like(k_pages), v_copy = at::empty_like(v_pages);
    // The yardsticks and every kernel take turns, one run each per round, so that a change in
    // what else the shared machine runs hits them alike. Wall-time medians, and the medians of
    // CPU time / threads: the second leaves out the time other jobs held the cores (it counts
    // idle pool threads that spin).
    std::vector<std::pair<std::string, std::function<void()>>> runs = {
        {"sum", [&] { (void)(k_pages.sum() + v_pages.sum()); }},
        {"copy", [&] {
           k_copy.copy_(k_pages);
           v_copy.copy_(v_pages);
         }}};
    for (const char* isa : isas)
      runs.emplace_back(isa ? isa : "", [&, isa] {
        if (isa) setenv("DMS_CPU_ISA", isa, 1);
        attention.call(q, k_pages, v_pages, block_table, seq_lens, 0.125);
      });
    const double threads = device.is_cpu() ? at::get_num_threads() : 1.0;
    std::vector<std::vector<double>> wall(runs.size()), cpu(runs.size());
    for (int r = -1; r < repeats; ++r)  // round -1 warms up
      for (size_t i = 0; i < runs.size(); ++i) {
        const auto start = std::chrono::steady_clock::now();
        const double cpu_start = process_cpu_seconds();
        runs[i].second();
        sync(device);
        if (r < 0) continue;
        wall[i].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        cpu[i].push_back((process_cpu_seconds() - cpu_start) / threads);
      }
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::vector<std::pair<double, double>> t;  // (wall, cpu / threads) per run
    for (size_t i = 0; i < runs.size(); ++i)
      t.emplace_back(median(wall[i]), device.is_cpu() ? median(cpu[i]) : median(wall[i]));
    const auto gbps = [&](double s) { return bytes / s / 1e9; };
    std::printf("decode %s, %s, %lld seqs x %lld tokens, G=%lld, D=%lld, page_size=%lld, shuffled pages: %.1f MB of "
                "K+V; GB/s of K+V read, median of %d interleaved runs by wall time (by CPU time / threads)\n"
                "  yardsticks: sum %.1f (%.1f) GB/s | copy %.1f (%.1f) GB/s read (+ as much written)\n",
                device.str().c_str(), c10::toString(dtype), (long long)S, (long long)L, (long long)G, (long long)D,
                (long long)page_size, bytes / 1e6, repeats, gbps(t[0].first), gbps(t[0].second), gbps(t[1].first),
                gbps(t[1].second));
    for (size_t i = 2; i < runs.size(); ++i) {
      const char* isa = runs[i].first.c_str();
      std::printf("  paged_decode_attention%s%s: %.2f ms = %.1f (%.1f) GB/s, %.1f ns/token by CPU time = %.0f%% (%.0f%%) "
                  "of sum, %.0f%% (%.0f%%) of copy\n",
                  *isa ? " " : "", isa, t[i].first * 1e3, gbps(t[i].first), gbps(t[i].second),
                  t[i].second * threads * 1e9 / (S * L), 100 * t[0].first / t[i].first, 100 * t[0].second / t[i].second,
                  100 * t[1].first / t[i].first, 100 * t[1].second / t[i].second);
    }
  }
  unsetenv("DMS_CPU_ISA");
}

#if defined(__x86_64__)
// Seconds per instruction over 12 independent accumulators (more than latency x throughput, so
// the rate is the issue rate); the empty asm statements keep the loops from being folded away.
constexpr int kChains = 12;
constexpr long kRounds = 20'000'000;
using Clock = std::chrono::steady_clock;

double per_instruction(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count() / (kRounds * kChains);
}

__attribute__((target("avx512f"))) double seconds_per_fma() {
  __m512 acc[kChains], x = _mm512_set1_ps(1.0001f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));  // unequal: no shared chain
  const auto start = Clock::now();
  for (long r = 0; r < kRounds; ++r, __extension__({ __asm__ volatile("" : "+v"(x)); }))
    for (auto& a : acc) a = _mm512_fmadd_ps(x, x, a);
  for (auto& a : acc) __asm__ volatile("" : : "v"(a));
  return per_instruction(start);
}

__attribute__((target("avx512f,avx512bf16"))) double seconds_per_dpbf16() {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));  // unequal: no shared chain
  __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80));  // bf16 1.0
  const auto start = Clock::now();
  for (long r = 0; r < kRounds; ++r, __extension__({ __asm__ volatile("" : "+v"(x)); }))
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, x);
  for (auto& a : acc) __asm__ volatile("" : : "v"(a));
  return per_instruction(start);
}
#endif

// The decode at G = 4, D = 64 does 512 multiply-adds per token (256 for the scores, 256 for the
// values): 32 fp32 FMAs of 16 lanes, or 16 vdpbf16ps of 32 products. Best of 3 runs each.
void bench_peak() {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("peak: this CPU has no AVX-512\n");
    return;
  }
  const auto best = [](double (*f)()) { return std::min({f(), f(), f()}); };
  const double fma = best(seconds_per_fma);
  std::printf("peak, 1 thread: vfmadd231ps zmm %.3f ns -> fp32 decode floor %.1f ns/token (G=4, D=64)\n", fma * 1e9,
              32 * fma * 1e9);
  if (__builtin_cpu_supports("avx512bf16")) {
    const double dp = best(seconds_per_dpbf16);
    std::printf("peak, 1 thread: vdpbf16ps zmm %.3f ns -> bf16 decode floor %.1f ns/token (G=4, D=64)\n", dp * 1e9,
                16 * dp * 1e9);
  }
#else
  std::printf("peak: measured on x86-64 only\n");
#endif
}

// The CPU kernels this machine can run (a forced ISA it lacks makes the op raise), or only the
// one DMS_CPU_ISA names when it is set.
std::vector<const char*> cpu_isas() {
  static const std::string only = std::getenv("DMS_CPU_ISA") ? std::getenv("DMS_CPU_ISA") : "";
  const auto attention = op<at::Tensor(T, T, T, T, T, double)>("dms::paged_decode_attention");
  const auto pages = at::zeros({1, 1, 1});
  std::vector<const char*> found;
  for (const char* isa : {"scalar", "avx2", "avx512", "avx512_bf16"}) {
    if (!only.empty() && only != isa) continue;
    setenv("DMS_CPU_ISA", isa, 1);
    try {
      attention.call(at::zeros({1, 1, 1}), pages, pages, at::zeros({1, 1}, at::kInt), at::zeros({1}, at::kInt), 1.0);
      found.push_back(isa);
    } catch (const c10::Error&) {
    }
  }
  unsetenv("DMS_CPU_ISA");
  return found;
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 11;
  std::vector<std::string> sections(argv + std::min(argc, 2), argv + argc);
  const auto wanted = [&](const char* name) {
    return sections.empty() || std::find(sections.begin(), sections.end(), name) != sections.end();
  };
  at::manual_seed(0);
  std::printf("threads: %d, repeats: %d (median)\n", at::get_num_threads(), repeats);
  if (wanted("compact")) bench_compact(repeats);
  if (wanted("step")) bench_decode_step(repeats);
  if (wanted("decode")) {
    bench_decode_bandwidth(repeats, at::kCPU, cpu_isas());
    if (at::hasCUDA()) bench_decode_bandwidth(repeats, at::Device(at::kCUDA, 0), {nullptr});
  }
  // The kernels' compute rate: one thread, a 4 x 1024-token store that stays in cache; at head
  // dim 64 and at the shipped models' 32.
  if (wanted("decode-cache")) {
    at::set_num_threads(1);
    std::printf("decode-cache: 1 thread\n");
    for (const int64_t D : {64, 32}) bench_decode_bandwidth(repeats, at::kCPU, cpu_isas(), 4, 1024, D);
  }
  if (wanted("peak")) bench_peak();
  return 0;
}
