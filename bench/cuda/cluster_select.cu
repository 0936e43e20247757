// Kernel lab: one level's greedy selection over a 16-CTA cluster, as the one-launch step runs it
// against a distributed one (gpu-notes item 65).
//
// Variant 0 (the step's, fused_step.cuh): each CTA pushes the logits of its slice of an entry's
// 2048 clusters and its (max, sum) parts into every CTA; after one cluster barrier every CTA
// computes all 2048 importances and runs the greedy rule over them (cluster_greedy.cuh).
// Variant 1: each CTA holds clusters rank + 16 t (interleaved, so that importances that follow
// position spread over the CTAs), pushes only its parts; after that barrier it keys its own 128
// clusters and pushes its kTop largest keys, the largest it kept back (its bound) and the least
// size it kept back into every CTA; after a second barrier every CTA ranks the 256 published
// keys and walks them (top_select.cuh). The walk is exact above the largest bound L; past it, unpublished keys
// can only matter while the room left is at least the least size kept back, and only then does
// the cluster fall back to variant 0's rule (every CTA sees the same data, so all fall back).
// Variant 2: variant 1 over variant 0's slices (the step's staging), for its fallbacks. Variant 3:
// variant 2 with its keys published by all threads, one store each (select_top<true>).
// Checks: every CTA's selected set and pick count equal the CPU's greedy rule, and variant 0's
// bit for bit, in every variant.
// Timing: each CTA's clock64 from a cluster barrier after its inputs are loaded to the end of the
// selection (mean over CTAs and launches, and the mean of each launch's slowest CTA), and the
// whole kernel's replay after an L2 flush (median); thread 0's clock at the rule's phase marks
// (variant 0: its barrier and normalisers; 1 and 2: select_top's marks), from the same start.
// The launch packs two CTAs an SM (load-balancing placement), as the b1 step packs only its eighth
// entry: where the step's rule is slowest, so the lab favours the others (gpu-notes item 66).
// Usage: lab_cluster_select [launches, default 20] [check: the checks without the flushed replays].
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/cluster_greedy_reference.cuh"
#include "cuda/cluster_step.cuh"
#include "top_select.cuh"
#include "lab_util.cuh"

namespace cs = multipole::cuda::detail::cluster_step;

namespace {

constexpr int kC = 2048;               // clusters an entry at most (one level, 32K tokens)
constexpr int kPer = kC / cs::kCtas;   // 128 a CTA
constexpr int kOwned = kC / cs::kThreads;
constexpr int kOutInts = 2 + kC / 32;  // picks, fell back, selected bits

struct Shared {
  float4 xall[kC];
  cs::Greedy<kC> gs;
  cs::TopSelect ts;
  float2 slice_norm[cs::kCtas][cs::kG];
  float red[cs::kWarps][cs::kG], red_z[cs::kWarps][cs::kG], gmax[cs::kG], gzinv[cs::kG], own_m[cs::kG], own_z[cs::kG];
  int fell_back;
  long long marks[4];  // thread 0's clock at the rule's phases (variant 0's barrier and normalisers; select_top's marks)
};

struct Args {
  const float4* x;     // [E, C] logits (log2 domain) of the group's heads
  const int* n;        // [E, C] sizes
  const int* payload;  // [E, C] member offsets
  int clusters, budget, variant;
  int* out;             // [E, kCtas, kOutInts]
  long long* clocks;    // [E, kCtas, 6]: cycles of the selection, ns of it, the four marks from its start
};

// The slice's (max, sum) parts of this thread's cluster (x, n), merged over the block and pushed
// into every CTA (slice_norm[rank]).
__device__ void push_norm_parts(Shared& sh, int rank, float4 x, int n) {
  float m[cs::kG], z[cs::kG];
#pragma unroll
  for (int g = 0; g < cs::kG; ++g)
    m[g] = n > 0 ? reinterpret_cast<const float*>(&x)[g] : -INFINITY, z[g] = n > 0 ? float(n) : 0.0f;
  cs::block_max_sum<true>(m, z, sh.red, sh.red_z, sh.own_m, sh.own_z);
  if (const int g = threadIdx.x % cs::kG; threadIdx.x < cs::kCtas * cs::kG)
    cs::st_cluster(cs::cluster_addr(&sh.slice_norm[rank][g], threadIdx.x / cs::kG), make_float2(sh.own_m[g], sh.own_z[g]));
}

// The rule over every cluster's logit in xall (pushed, visible), normalisers known, this thread's
// clusters j = tid + 256 r of sizes own_n[r] and member offsets own_first[r]: variant 0's selection
// and variant 1's fallback.
__device__ void select_all(const Args& a, const int (&own_n)[kOwned], const int (&own_first)[kOwned], Shared& sh) {
  unsigned long long key[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = int(threadIdx.x) + r * cs::kThreads;
    key[r] = own_n[r] > 0 ? cs::pick_key(cs::importance(sh.xall[j], sh.gmax, sh.gzinv), j, min(own_n[r], a.budget + 1))
                          : 0ull;
  }
  cs::greedy_select<true>(key, own_first, a.budget, 255, sh.gs, [] {}, [] {});
}

// This thread's clusters of select_all (as the step's prologue loads them).
__device__ void load_owned(const Args& a, const int* n_e, const int* pay_e, int (&own_n)[kOwned], int (&own_first)[kOwned]) {
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = int(threadIdx.x) + r * cs::kThreads;
    own_n[r] = j < a.clusters ? n_e[j] : 0;
    own_first[r] = j < a.clusters ? pay_e[j] : 0;
  }
}

// Variants 1-3 after their first barrier (normalisers merged): this CTA's keys into select_top, or,
// where the published keys do not settle the rule, variant 0's rule.
__device__ void select_distributed(const cooperative_groups::cluster_group& cluster, const Args& a, float4 x, int n,
                                   int pay, int j, const int* n_e, const int* pay_e, Shared& sh) {
  const unsigned long long key = threadIdx.x < kPer && n > 0
                                     ? cs::pick_key(cs::importance(x, sh.gmax, sh.gzinv), j, min(n, a.budget + 1))
                                     : 0ull;
  const auto mark = [&](int k) {
    if (threadIdx.x == 0) sh.marks[k] = clock64();
  };
  const bool settled = a.variant == 3 ? cs::select_top<true>(cluster, key, pay, a.budget, sh.ts, sh.gs, mark)
                                      : cs::select_top<false>(cluster, key, pay, a.budget, sh.ts, sh.gs, mark);
  if (threadIdx.x == 0) sh.fell_back = settled ? 0 : 1;
  if (settled) return;
  for (int w = threadIdx.x; w < kC / 32; w += cs::kThreads) sh.gs.selected_bits[w] = 0;
  // Every CTA's logits into every CTA at their cluster index, then the rule over all.
  if (threadIdx.x < kPer && j < a.clusters)
    for (int d = 0; d < cs::kCtas; ++d) cs::st_cluster(cs::cluster_addr(&sh.xall[j], d), x);
  int own_n[kOwned], own_first[kOwned];
  load_owned(a, n_e, pay_e, own_n, own_first);
  cluster.sync();
  select_all(a, own_n, own_first, sh);
}

// One 16-CTA cluster an entry.
__global__ void __launch_bounds__(cs::kThreads, 2) select_kernel(const Args a) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ Shared sh;
  const int rank = int(cluster.block_rank()), e = blockIdx.x / cs::kCtas, tid = threadIdx.x;
  const float4* x_e = a.x + size_t(e) * kC;
  const int *n_e = a.n + size_t(e) * kC, *pay_e = a.payload + size_t(e) * kC;
  // Variants 0 and 2: the slice [c0, c0 + per); variant 1: clusters rank + 16 t.
  const int per = (a.clusters + cs::kCtas - 1) / cs::kCtas, c0 = rank * per;
  const bool slice = a.variant != 1;
  const int j = slice ? c0 + tid : rank + cs::kCtas * tid;
  const bool mine = tid < kPer && (slice ? tid < per && j < a.clusters : j < a.clusters);
  const float4 x = mine ? x_e[j] : make_float4(0, 0, 0, 0);
  const int n = mine ? n_e[j] : 0, pay = mine ? pay_e[j] : 0;
  for (int w = tid; w < kC / 32; w += cs::kThreads) sh.gs.selected_bits[w] = 0;
  sh.ts.clear();
  int own_n[kOwned], own_first[kOwned];
  if (a.variant == 0) load_owned(a, n_e, pay_e, own_n, own_first);
  if (a.variant == 0 && mine) sh.xall[j] = x;  // (before a barrier: other threads push it)
  cluster.sync();
  unsigned long long ns0, ns1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns0));
  const long long t0 = clock64();
  push_norm_parts(sh, rank, x, n);
  if (a.variant == 0) {
    cs::push_to_cluster(cluster, sh.xall, c0, max(0, min(per, a.clusters - c0)));
    if (tid == 0) sh.marks[0] = sh.marks[1] = clock64();
    cluster.sync();
    if (tid == 0) sh.marks[2] = clock64();
    cs::merge_slice_norms(sh.slice_norm, sh.gmax, sh.gzinv, cs::kG);
    if (tid == 0) sh.marks[3] = clock64();
    select_all(a, own_n, own_first, sh);
  } else {
    cluster.sync();
    cs::merge_slice_norms(sh.slice_norm, sh.gmax, sh.gzinv, cs::kG);
    select_distributed(cluster, a, x, n, pay, j, n_e, pay_e, sh);
  }
  __syncthreads();
  const long long t1 = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns1));
  int* o = a.out + (size_t(e) * cs::kCtas + rank) * kOutInts;
  if (tid == 0) {
    o[0] = sh.gs.all_picks, o[1] = a.variant != 0 ? sh.fell_back : 0;
    long long* c = a.clocks + 6 * (size_t(e) * cs::kCtas + rank);
    c[0] = t1 - t0, c[1] = (long long)(ns1 - ns0);
    for (int k = 0; k < 4; ++k) c[2 + k] = sh.marks[k] - t0;
  }
  for (int w = tid; w < kC / 32; w += cs::kThreads) o[2 + w] = int(sh.gs.selected_bits[w]);
  cluster.sync();  // (no CTA leaves while another may still store into it)
}

struct Case {
  const char* name;
  int entries, clusters;
  int shape;  // 0: k-means-like sizes (log-normal, median 11); 1: gaps between random cuts (mean 16);
              // 2: sizes 40 but every 50th 1..8 (a tail deep in the order); 3: as 0, importance falling
              // with the index (position-ordered); 4: as 0 with every fifth cluster empty
};

// One case: inputs of its shape (head g's logit of cluster j in the log2 domain), the CPU's picks, every
// variant checked against them and against variant 0, then timed.
bool run_case(const Case& c, int launches, bool timed, lab::FlushedTimer& timer, std::mt19937_64& rng) {
  const int E = c.entries, budget = 128;
  std::vector<float4> x(size_t(E) * kC, make_float4(0, 0, 0, 0));
  std::vector<int> n(size_t(E) * kC, 0), pay(size_t(E) * kC, 0);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int e = 0; e < E; ++e) {
    std::vector<int> cuts;
    if (c.shape == 1) {
      for (int i = 0; i < c.clusters - 1; ++i) cuts.push_back(1 + int(rng() % uint64_t(16 * c.clusters - 1)));
      cuts.push_back(0), cuts.push_back(16 * c.clusters);
      std::sort(cuts.begin(), cuts.end());
    }
    for (int j = 0; j < c.clusters; ++j) {
      const size_t at = size_t(e) * kC + size_t(j);
      int s = 1;
      switch (c.shape) {
        case 1: s = cuts[size_t(j) + 1] - cuts[size_t(j)]; break;
        case 2: s = j % 50 == 7 ? 1 + int(rng() % 8) : 40; break;
        default: s = int(std::lround(std::exp(std::log(11.0) + 1.8 * normal(rng)))); break;
      }
      n[at] = c.shape == 4 && j % 5 == 0 ? 0 : std::clamp(s, c.shape == 1 ? 0 : 1, 3000);
      pay[at] = int(rng() % 1000000);
      float* xs = reinterpret_cast<float*>(&x[at]);
      const double trend = c.shape == 3 ? -8.0 * double(j) / c.clusters : 0.0;
      for (int g = 0; g < cs::kG; ++g) xs[g] = float(trend + 2.5 * normal(rng));
    }
  }
  float4* dx;
  int *dn, *dp, *dout;
  long long* dc;
  LAB_CHECK(cudaMalloc(&dx, x.size() * sizeof(float4)));
  LAB_CHECK(cudaMalloc(&dn, n.size() * 4));
  LAB_CHECK(cudaMalloc(&dp, pay.size() * 4));
  LAB_CHECK(cudaMalloc(&dout, size_t(E) * cs::kCtas * kOutInts * 4));
  LAB_CHECK(cudaMalloc(&dc, size_t(E) * cs::kCtas * 6 * 8));
  LAB_CHECK(cudaMemcpy(dx, x.data(), x.size() * sizeof(float4), cudaMemcpyHostToDevice));
  LAB_CHECK(cudaMemcpy(dn, n.data(), n.size() * 4, cudaMemcpyHostToDevice));
  LAB_CHECK(cudaMemcpy(dp, pay.data(), pay.size() * 4, cudaMemcpyHostToDevice));

  // The CPU's keys, from the same normalisers (f64 here; a near-tie could differ from the
  // kernels' f32, which the check would report).
  std::vector<std::pair<std::vector<uint32_t>, int>> want;
  for (int e = 0; e < E; ++e) {
    double mx[cs::kG], z[cs::kG];
    for (int g = 0; g < cs::kG; ++g) {
      mx[g] = -INFINITY, z[g] = 0;
      for (int j = 0; j < c.clusters; ++j)
        if (n[size_t(e) * kC + j] > 0) mx[g] = std::max(mx[g], double(reinterpret_cast<const float*>(&x[size_t(e) * kC + j])[g]));
      for (int j = 0; j < c.clusters; ++j)
        if (n[size_t(e) * kC + j] > 0)
          z[g] += n[size_t(e) * kC + j] * std::exp2(double(reinterpret_cast<const float*>(&x[size_t(e) * kC + j])[g]) - mx[g]);
    }
    std::vector<unsigned long long> keys(kC, 0ull);
    for (int j = 0; j < c.clusters; ++j) {
      const size_t at = size_t(e) * kC + j;
      if (n[at] <= 0) continue;
      double imp = 0;
      for (int g = 0; g < cs::kG; ++g) imp += std::exp2(double(reinterpret_cast<const float*>(&x[at])[g]) - mx[g]) / z[g];
      keys[size_t(j)] = cs::pick_key(float(imp), j, std::min(n[at], budget + 1));
    }
    want.push_back(cs::host_greedy(keys.data(), kC, budget));
  }

  bool ok = true;
  std::vector<int> first;  // variant 0's output of its first launch: every variant must give the same
  std::printf("%-34s E %2d C %4d:", c.name, E, c.clusters);
  for (int variant = 0; variant < 4; ++variant) {
    const Args args{dx, dn, dp, c.clusters, budget, variant, dout, dc};
    const auto launch = [&](cudaStream_t s) {
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, E, cs::kCtas, cs::kThreads, s, 58 << 10);
      LAB_CHECK(cudaLaunchKernelEx(&cfg, select_kernel, args));
    };
    double mean_cyc = 0, slowest_cyc = 0, ns = 0, cyc = 0, marks[4] = {};
    int fell = 0, picks = 0, bad = 0;
    for (int l = 0; l < launches; ++l) {
      launch(timer.stream());
      LAB_CHECK(cudaStreamSynchronize(timer.stream()));
      std::vector<int> out(size_t(E) * cs::kCtas * kOutInts);
      std::vector<long long> clk(size_t(E) * cs::kCtas * 6);
      LAB_CHECK(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));
      LAB_CHECK(cudaMemcpy(clk.data(), dc, clk.size() * 8, cudaMemcpyDeviceToHost));
      double slow = 0;
      for (int e = 0; e < E; ++e)
        for (int r = 0; r < cs::kCtas; ++r) {
          const int* o = out.data() + (size_t(e) * cs::kCtas + r) * kOutInts;
          bool same = o[0] == want[size_t(e)].second;
          for (int w = 0; w < kC / 32; ++w) same = same && uint32_t(o[2 + w]) == want[size_t(e)].first[size_t(w)];
          if (!same && bad++ < 3)
            std::printf("\n  MISMATCH variant %d entry %d CTA %d: picks %d, the CPU's %d", variant, e, r, o[0],
                        want[size_t(e)].second);
          // Against variant 0's first launch (same f32 importances): bit for bit.
          const int* o0 = variant == 0 ? o : first.data() + (size_t(e) * cs::kCtas + r) * kOutInts;
          if (!std::equal(o0 + 2, o0 + kOutInts, o + 2) || o0[0] != o[0]) {
            if (bad++ < 3) std::printf("\n  MISMATCH variant %d entry %d CTA %d against variant 0", variant, e, r);
            same = false;
          }
          ok = ok && same;
          if (l == 0 && r == 0) fell += o[1], picks += o[0];
          const long long* ck = clk.data() + 6 * (size_t(e) * cs::kCtas + r);
          const double cc = double(ck[0]);
          mean_cyc += cc, cyc += cc, ns += double(ck[1]);
          for (int k = 0; k < 4; ++k) marks[k] += double(ck[2 + k]);
          slow = std::max(slow, cc);
        }
      slowest_cyc += slow;
      if (variant == 0 && l == 0) first = out;
    }
    const double ghz = ns > 0 ? cyc / ns : 1.8;
    std::vector<double> flushed{0.0};
    if (timed) {
      flushed.clear();
      lab::Graph g(launch, timer.stream());
      for (int i = 0; i < 21; ++i) flushed.push_back(timer.run_us(g, true, i));
    }
    const double per = double(launches) * E * cs::kCtas * ghz * 1e3;
    std::printf("  v%d: %5.2f us (slowest %5.2f), kernel %5.2f, picks %5.1f, fallback %d/%d", variant,
                mean_cyc / per, slowest_cyc / launches / ghz * 1e-3, lab::median(flushed), double(picks) / E, fell, E);
    std::printf(" (marks %.2f %.2f %.2f %.2f)", marks[0] / per, marks[1] / per, marks[2] / per, marks[3] / per);
    std::printf(" |");
  }
  std::printf("  %s\n", ok ? "checks pass" : "CHECKS FAIL");
  cudaFree(dx), cudaFree(dn), cudaFree(dp), cudaFree(dout), cudaFree(dc);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  const bool timed = !(argc > 2 && std::string(argv[2]) == "check");  // check: no flushed replays (sanitizers)
  cudaDeviceProp prop{};
  LAB_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; one-level selection over a 16-CTA cluster an entry, %d launches a case\n", prop.name,
              prop.multiProcessorCount, launches);
  LAB_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  LAB_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeClusterSchedulingPolicyPreference,
                                 cudaClusterSchedulingPolicyLoadBalancing));
  LAB_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 58 << 10));
  lab::FlushedTimer timer;
  std::mt19937_64 rng(20261206);
  const Case cases[] = {{"k-means-like sizes", 8, 2048, 0},        {"cuts (mean 16)", 8, 2048, 1},
                        {"k-means-like, 16 entries", 16, 2048, 0}, {"importance falls with position", 8, 2048, 3},
                        {"empty clusters", 8, 2048, 4},            {"1000 clusters", 8, 1000, 0},
                        {"a deep tail (falls back)", 8, 2048, 2}};
  bool ok = true;
  for (const Case& c : cases) ok = run_case(c, launches, timed, timer, rng) && ok;
  std::printf("%s\n", ok ? "all checks pass" : "SOME CHECKS FAIL");
  return ok ? 0 : 1;
}
