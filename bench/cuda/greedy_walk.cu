// Kernel lab: the greedy walk of the one-launch step's selections (gpu-notes item 38).
//
// On the GPU k-means index the step's coarse selection takes 150-300 picks under a budget of
// 2048 tokens; the radix passes take most at once and the walk's rounds the rest at ~0.5 us a
// pick (26 picks, 13 us, in the slowest entry at 32K b1). This lab runs the library's
// greedy_select (cluster_greedy.cuh) on keys shaped like the step's, one 256-thread CTA per
// entry and two CTAs an SM as in the step, with each walk:
//   walk 0: one pick a round (block-wide maxima, a barrier a pick);
//   walk 1: walk_batched (many keys settled a round);
//   walk 2: one-pick rounds for the first two picks, then walk_batched.
// Checks: each walk's picks equal the CPU's greedy rule (keys in decreasing order, taken when
// they fit) in set and count, and walks 1 and 2 list the same picks (index, payload, rows),
// prefix and bits as walk 0. Timing: thread 0's clock64 around the call and from the walk's start,
// mean and slowest entry, in us at the clock measured by the same CTAs' globaltimer.
// Usage: lab_greedy_walk [entries per case, default 256].
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/cluster_greedy.cuh"
#include "cuda/cluster_greedy_reference.cuh"
#include "lab_util.cuh"

namespace cs = multipole::cuda::detail::cluster_step;

namespace {

constexpr int kPicks = cs::kMaxPicks;
// Per entry: n_picks, prefix_picks, all_picks, all_prefix_picks, pick_j[128], pick_first[128],
// pick_row[129], selected_bits[Keys / 32].
constexpr int kHead = 4, kOutFixed = kHead + 3 * kPicks + 1;

template <int Keys>
constexpr int kOutInts = kOutFixed + Keys / 32;

// keys, payloads: [entries, Keys]; budgets: [entries]; out: [entries, out_ints]; clocks:
// [entries, 3] (cycles of the call, cycles of the walk, ns of the call).
template <int Walk, int Owned, int Keys>
__global__ void __launch_bounds__(cs::kThreads, 2)
    walk_kernel(const unsigned long long* keys, const int* payloads, const int* budgets, int* out,
                long long* clocks) {
  __shared__ cs::Greedy<Keys> gs;
  const int e = blockIdx.x, tid = threadIdx.x;
  unsigned long long key[Owned];
  int pay[Owned];
#pragma unroll
  for (int r = 0; r < Owned; ++r) {
    key[r] = keys[size_t(e) * Keys + tid + r * cs::kThreads];
    pay[r] = payloads[size_t(e) * Keys + tid + r * cs::kThreads];
  }
  for (int w = tid; w < Keys / 32; w += cs::kThreads) gs.selected_bits[w] = 0;
  __syncthreads();
  unsigned long long ns0, ns1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns0));
  const long long t0 = clock64();
  long long tw = t0;
  cs::greedy_select<true, Walk>(key, pay, budgets[e], 255, gs, [] {}, [&] { tw = clock64(); });
  const long long t1 = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns1));
  int* o = out + size_t(e) * kOutInts<Keys>;
  if (tid == 0) {
    o[0] = gs.n_picks, o[1] = gs.prefix_picks, o[2] = gs.all_picks, o[3] = gs.all_prefix_picks;
    clocks[3 * e] = t1 - t0, clocks[3 * e + 1] = t1 - tw, clocks[3 * e + 2] = (long long)(ns1 - ns0);
  }
  for (int i = tid; i < kPicks; i += cs::kThreads)
    o[kHead + i] = i < gs.n_picks ? gs.pick_j[i] : -1, o[kHead + kPicks + i] = i < gs.n_picks ? gs.pick_first[i] : -1;
  for (int i = tid; i <= kPicks; i += cs::kThreads) o[kHead + 2 * kPicks + i] = i <= gs.n_picks ? gs.pick_row[i] : -1;
  for (int w = tid; w < Keys / 32; w += cs::kThreads) o[kOutFixed + w] = int(gs.selected_bits[w]);
}

struct Case {
  const char* name;
  int clusters, budget;
  int shape;  // 0: k-means-like sizes (log-normal, median 11); 1: synthetic coarse (65..87);
              // 2: long tail (every tenth 60..119, the rest 1..3); 3: fine candidates (log-normal,
              // median 11, at most 100); 4: four importances only (ties by index)
};

struct Run {
  std::vector<int> out;
  std::vector<long long> clocks;
};

template <int Walk, int Owned, int Keys>
Run run(const std::vector<unsigned long long>& keys, const std::vector<int>& payloads, const std::vector<int>& budgets) {
  const int entries = int(budgets.size());
  unsigned long long* dk;
  int *dp, *db, *dout;
  long long* dc;
  LAB_CHECK(cudaMalloc(&dk, keys.size() * 8));
  LAB_CHECK(cudaMalloc(&dp, payloads.size() * 4));
  LAB_CHECK(cudaMalloc(&db, budgets.size() * 4));
  LAB_CHECK(cudaMalloc(&dout, size_t(entries) * kOutInts<Keys> * 4));
  LAB_CHECK(cudaMalloc(&dc, size_t(entries) * 3 * 8));
  LAB_CHECK(cudaMemcpy(dk, keys.data(), keys.size() * 8, cudaMemcpyHostToDevice));
  LAB_CHECK(cudaMemcpy(dp, payloads.data(), payloads.size() * 4, cudaMemcpyHostToDevice));
  LAB_CHECK(cudaMemcpy(db, budgets.data(), budgets.size() * 4, cudaMemcpyHostToDevice));
  // Two CTAs an SM, as in the step: each asks for a little under half the SM's shared memory.
  const int pad = 100 << 10;
  LAB_CHECK(cudaFuncSetAttribute(walk_kernel<Walk, Owned, Keys>, cudaFuncAttributeMaxDynamicSharedMemorySize, pad));
  for (int warm = 0; warm < 2; ++warm) walk_kernel<Walk, Owned, Keys><<<entries, cs::kThreads, pad>>>(dk, dp, db, dout, dc);
  LAB_CHECK(cudaGetLastError());
  LAB_CHECK(cudaDeviceSynchronize());
  Run r;
  r.out.resize(size_t(entries) * kOutInts<Keys>);
  r.clocks.resize(size_t(entries) * 3);
  LAB_CHECK(cudaMemcpy(r.out.data(), dout, r.out.size() * 4, cudaMemcpyDeviceToHost));
  LAB_CHECK(cudaMemcpy(r.clocks.data(), dc, r.clocks.size() * 8, cudaMemcpyDeviceToHost));
  cudaFree(dk), cudaFree(dp), cudaFree(db), cudaFree(dout), cudaFree(dc);
  return r;
}

template <int Owned, int Keys>
bool run_case(const Case& c, int entries, std::mt19937_64& rng) {
  std::vector<unsigned long long> keys(size_t(entries) * Keys, 0ull);
  std::vector<int> payloads(size_t(entries) * Keys, 0), budgets(size_t(entries), c.budget);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  for (int e = 0; e < entries; ++e)
    for (int j = 0; j < c.clusters; ++j) {
      int n = 1;
      switch (c.shape) {
        case 0: n = int(std::lround(std::exp(std::log(11.0) + 1.8 * normal(rng)))); break;
        case 1: n = 65 + int(rng() % 23); break;
        case 2: n = j % 10 == 0 ? 60 + int(rng() % 60) : 1 + int(rng() % 3); break;
        case 3: n = std::min(100, int(std::lround(std::exp(std::log(11.0) + 1.2 * normal(rng))))); break;
        default: n = 1 + int(rng() % 40); break;
      }
      n = std::clamp(n, 1, 3000);
      const float imp = c.shape == 4 ? float(1 + rng() % 4) : float(std::exp2(2.5 * normal(rng)));
      const size_t at = size_t(e) * Keys + size_t(j);
      keys[at] = cs::pick_key(imp, j, std::min(n, c.budget + 1));
      payloads[at] = int(rng() % 1000000);
    }
  const Run a = run<0, Owned, Keys>(keys, payloads, budgets);
  const Run b = run<1, Owned, Keys>(keys, payloads, budgets);
  const Run h = run<2, Owned, Keys>(keys, payloads, budgets);
  const auto walk_of = [&](const Run* r) { return r == &a ? 0 : r == &b ? 1 : 2; };
  bool ok = true;
  int mismatches = 0;
  for (int e = 0; e < entries; ++e) {
    const auto [bits, picks] = cs::host_greedy(keys.data() + size_t(e) * Keys, Keys, c.budget);
    for (const Run* r : {&a, &b, &h}) {
      const int* o = r->out.data() + size_t(e) * kOutInts<Keys>;
      bool same = o[2] == picks;
      for (int w = 0; w < Keys / 32; ++w) same = same && uint32_t(o[kOutFixed + w]) == bits[size_t(w)];
      if (!same && mismatches++ < 5)
        std::printf("  MISMATCH %s entry %d walk %d: picks %d, the CPU's %d\n", c.name, e, walk_of(r), o[2], picks);
      ok = ok && same;
    }
    const int* oa = a.out.data() + size_t(e) * kOutInts<Keys>;
    for (const Run* r : {&b, &h}) {
      const int* o = r->out.data() + size_t(e) * kOutInts<Keys>;
      if (!std::equal(oa, oa + kOutInts<Keys>, o)) {
        if (mismatches++ < 5)
          std::printf("  MISMATCH %s entry %d: walk %d's listing differs from walk 0's\n", c.name, e, walk_of(r));
        ok = false;
      }
    }
  }
  // Timing: mean and slowest entry (of the call), us at the clock the CTAs measured.
  double cyc = 0, ns = 0;
  for (int e = 0; e < entries; ++e) cyc += double(a.clocks[3 * e]), ns += double(a.clocks[3 * e + 2]);
  const double ghz = ns > 0 ? cyc / ns : 1.98;
  double picks = 0, prefix = 0;
  for (int e = 0; e < entries; ++e) {
    picks += a.out[size_t(e) * kOutInts<Keys> + 2];
    prefix += a.out[size_t(e) * kOutInts<Keys> + 3];
  }
  std::printf("%-22s C %4d budget %4d: picks %6.1f (%6.1f at once)  %s\n", c.name, c.clusters, c.budget,
              picks / entries, prefix / entries, ok ? "checks pass" : "CHECKS FAIL");
  for (const Run* r : {&a, &b, &h}) {
    double call = 0, walk = 0, call_max = 0, walk_max = 0;
    for (int e = 0; e < entries; ++e) {
      const double c1 = double(r->clocks[3 * e]) / ghz * 1e-3, w1 = double(r->clocks[3 * e + 1]) / ghz * 1e-3;
      call += c1, walk += w1, call_max = std::max(call_max, c1), walk_max = std::max(walk_max, w1);
    }
    std::printf("  walk %d: call mean %6.2f us, slowest %6.2f; walk mean %6.2f us, slowest %6.2f\n", walk_of(r),
                call / entries, call_max, walk / entries, walk_max);
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int entries = argc > 1 ? std::max(1, std::atoi(argv[1])) : 256;
  cudaDeviceProp prop{};
  LAB_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; %d entries per case, one 256-thread CTA each, two an SM\n", prop.name,
              prop.multiProcessorCount, entries);
  std::mt19937_64 rng(20261203);
  bool ok = true;
  // Coarse selections (2048 keys a CTA, 8 a thread) under the coarse budget.
  const Case coarse[] = {{"k-means coarse 32K", 508, 2048, 0}, {"k-means coarse 128K", 2044, 2048, 0},
                         {"synthetic coarse 128K", 1819, 2048, 1}, {"long tail", 2048, 2048, 2},
                         {"ties", 2048, 2048, 4}, {"small budget", 2048, 64, 0}};
  for (const Case& c : coarse) ok = run_case<8, 2048>(c, entries, rng) && ok;
  // Fine selections (512 candidates a CTA, 2 a thread) under the budget.
  const Case fine[] = {{"k-means fine", 305, 128, 3}, {"fine, 512 candidates", 512, 128, 3},
                       {"fine ties", 512, 128, 4}};
  for (const Case& c : fine) ok = run_case<2, 512>(c, entries, rng) && ok;
  std::printf("%s\n", ok ? "all checks pass" : "SOME CHECKS FAIL");
  return ok ? 0 : 1;
}
