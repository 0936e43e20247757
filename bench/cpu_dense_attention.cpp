// Kernel lab: the dense decode path (`kernels::attend_range_all_heads`) alone, one thread,
// on a paged bf16 cache that fits in L2, in L3, or only in DRAM. Prints ns per token and
// KV head and the K+V GB/s, so kernel variants can be compared without the bench's
// surrounding work (docs/cpu-kernels.md records what each variant did).
//   cpu_dense_attention [group size = 4] [head dim = 128] [repeats = 7]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention/decode_block.hpp"
#include "attention/decode_kernels.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

using namespace multipole;

namespace {

// Median over `repeats` timings of `inner` calls of body, in ns per call divided by `per`.
template <class Body>
double median_ns(int repeats, int inner, double per, Body&& body) {
  std::vector<double> ns;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) body();
    ns.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e9 / inner / per);
  }
  std::sort(ns.begin(), ns.end());
  return ns[ns.size() / 2];
}

// The three phases of one 64-token block (logits, online softmax, PV) timed alone on rows in L1.
void time_phases(int G, int d, int repeats) {
  using namespace kernels::detail;
  constexpr int n = kBlock;
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<bf16> k(size_t(n) * d), v(k.size());
  for (auto& x : k) x = bf16(normal(rng));
  for (auto& x : v) x = bf16(normal(rng));
  std::vector<const bf16*> krows(n), vrows(n);
  for (int t = 0; t < n; ++t) krows[t] = k.data() + size_t(t) * d, vrows[t] = v.data() + size_t(t) * d;
  std::vector<float> q(size_t(G) * d), x(size_t(G) * kBlock), o(size_t(G) * d, 0.0f), ml(2 * G);
  for (auto& e : q) e = normal(rng) * 0.3f;
  kernels::SoftmaxState s{G, d, ml.data(), ml.data() + G, o.data()};
  s.reset();
  auto per_token = [&](auto&& body) { return median_ns(repeats, 20000, n, body); };
  const double tl = per_token([&] {
    logits_avx512<bf16>(krows.data(), n, q.data(), G, d, 0.088f, nullptr, x.data(), kBlock, Prefetch<bf16>{});
  });
  std::vector<float> x0 = x;
  const double ts = per_token([&] {
    std::copy(x0.begin(), x0.end(), x.begin());
    softmax_step(x.data(), n, s);
  });
  const double tp = per_token([&] { pv_avx512<bf16>(vrows.data(), n, x.data(), G, d, o.data(), Prefetch<bf16>{}); });
  std::printf("block phases in L1, ns per token-head: logits %.2f, softmax %.2f, PV %.2f (%d zmm FMAs each in "
              "logits and PV)\n", tl, ts, tp, G * d / 16);
}

}  // namespace

int main(int argc, char** argv) {
  const int G = argc > 1 ? std::atoi(argv[1]) : 4;
  const int d = argc > 2 ? std::atoi(argv[2]) : 128;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 7;
  const int Hkv = 8;
  if (G < 1 || G > kernels::detail::kMaxGroups || d < 16 || d > 1024 || d % 16 != 0 || repeats < 1) {
    std::fprintf(stderr, "cpu_dense_attention: group size %d must be 1..%d, head dim %d a multiple of 16 in "
                 "16..1024, repeats %d >= 1\n", G, kernels::detail::kMaxGroups, d, repeats);
    return 2;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::printf("group %d, head dim %d, %d KV heads, bf16, one thread (%s kernels)\n", G, d, Hkv,
              simd_level() == SimdLevel::Avx512 ? "avx512" : "avx2");
  if (simd_level() == SimdLevel::Avx512) time_phases(G, d, repeats);
  std::printf("%10s %10s %14s %10s\n", "tokens", "K+V MB", "ns/token-head", "GB/s");
  for (int64_t n : {96, 512, 4096, 32768}) {
    PagedKVCache cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = Hkv, .head_dim = d, .page_size = 16,
                                     .dtype = DType::BF16, .max_tokens = n + 16});
    const SeqId s = cache.add_sequence();
    cache.extend(s, n);
    std::vector<float> k(size_t(Hkv) * d), v(k.size());
    for (int64_t p = 0; p < n; ++p) {
      for (auto& x : k) x = normal(rng);
      for (auto& x : v) x = normal(rng);
      cache.write(s, 0, p, 1, k.data(), v.data());
    }
    std::vector<float> q(size_t(Hkv) * G * d);
    for (auto& x : q) x = normal(rng) * 0.3f;
    std::vector<float> buf(size_t(Hkv) * G * (d + 2));
    std::vector<kernels::SoftmaxState> st(Hkv);
    for (int h = 0; h < Hkv; ++h) {
      float* b = buf.data() + size_t(h) * G * (d + 2);
      st[h] = kernels::SoftmaxState{G, d, b, b + G, b + 2 * G};
    }
    const KVLayerView kv = cache.layer_view(0);
    const int inner = int(std::max<int64_t>(1, (1 << 22) / n));
    const double med = median_ns(repeats, inner, double(n * Hkv), [&] {
      for (auto& x : st) x.reset();
      kernels::attend_range_all_heads(kv, cache.page_table(s).data(), 0, n, q.data(), 0.088f, st.data());
    });
    std::printf("%10lld %10.1f %14.2f %10.2f\n", (long long)n, double(n) * Hkv * 2 * d * 2 / 1e6, med,
                2.0 * d * 2 / med);
  }
}
