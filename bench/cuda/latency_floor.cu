// Kernel lab: the latency floors under a batch-1 decode step (gpu-notes item 32).
//
// Issue 4 asks multipole at batch 1 for ~12.5 us a layer-step at 32K and ~14 us at 128K; the
// three-kernel step takes ~48 and ~62 us, bound by chains of dependent steps rather than
// bytes (items 17-18). This lab times the links of such chains alone, the way the bench
// times a step (CUDA graph replay, L2 flushed by a 256 MiB memset before each timed run,
// median), so that a one-launch design can be costed before it is written:
//   launch:  graphs of 1 and 3 empty kernels (the 3 plain, or chained by programmatic
//            dependent launch as the step's kernels are), 8 CTAs or a full wave;
//   chase:   one thread following h dependent global loads (ld.global.cg) through lines
//            spread over 1 GiB, cold (after the flush) and again warm (in L2); the slope
//            over h is one round trip;
//   barrier: __syncthreads (256 / 1024 threads) and cluster barriers (clusters of 8 and,
//            where the GPU fits them, 16 CTAs; 8 clusters as 8 KV heads at batch 1), per
//            barrier from the slope over 0 and 256 barriers;
//   dsmem:   one thread following dependent loads through the shared memory of the other
//            CTAs of its cluster, per hop;
//   chain:   one warp running dependent FMAs, shuffles or shared-memory loads, per step;
//   follow:  what a kernel launched behind another costs, by the kind of the first (plain or
//            clusters of 8 / 16 CTAs as the one-launch step, with or without ~100 KB of dynamic
//            shared memory) and of the second (plain, with or without it): gpu-notes item 38;
//   code:    a kernel of 4 to 192 KB of straight-line code run once, cold (after the flush)
//            and warm: what fetching a large kernel's instructions from DRAM costs (the
//            one-launch step's kernel is ~180 KB of SASS; gpu-notes item 39); and the same
//            kernels returning at once;
//   wait:    the same code behind 8 dependent cold loads: whether a wait for memory hides the
//            fetch of the code behind it (gpu-notes item 43); `helper`: the same with the last
//            warp running the code at once, ahead of the others (item 71);
//   split:   64 or 128 KB of code in 4 or 8 parts, warp w running part w % parts only: whether
//            the SM's schedulers fetch different code at once (item 71).
//   entry:   kernels of the one-launch step's shape returning at entry, by what it has that an
//            empty kernel has not: a 392-byte parameter block (read or not), a stack; then
//            how many clusters of 8-16 CTAs fit at once, at one or two CTAs an SM.
// Usage: lab_latency_floor [iterations, default 41] [code | entry: those lines only].
// Prints one line per measurement.
// H200, session H23 (two runs, medians agree within 0.2 us): 1 empty kernel 2.8-3.0 us, 3
// chained by PDL 4.3-4.5; a DRAM round trip after the flush 0.34-0.36 us, an L2 one 0.15;
// __syncthreads 0.014 (256 threads) / 0.039 us (1024); a cluster barrier 0.19-0.38 us; a
// dependent DSMEM load 0.10 us; one warp's dependent FMA 0.002, shuffle + add 0.018,
// shared-memory load 0.015 us. Session H30 (two runs): a kernel of 8 CTAs behind another adds
// 0.5-0.9 us whatever the first (plain, clusters of 8 or 16, 100 KB of shared memory or none).
// Session H31 (one run, 32 / 256 threads a CTA): straight-line code runs at ~0.09 us per KB
// (~2.8 cycles an instruction, whatever the warps) up to 64 KB, cold as warm; 128 KB: 19.0-19.5
// us cold, 14.1-15.0 warm; 192 KB: 61.6-62.1 cold, 32.7-34.1 warm. The same kernels returning
// at once: 2.94 us cold, 3.6-3.8 warm, whatever their size. Session H34 (two runs): behind 8
// dependent cold loads (6.0 us with the launch) the code costs what it costs alone (16-192 KB:
// the wait hides 0-0.7 us, 128 KB -2.3 to -3.4), so the SM does not fetch code ahead while
// its warps wait for memory. Session H60 (two H100s, one run each): 64 KB in 4 parts, one a
// scheduler, 8.06-8.10 us against 8.58-8.74 as one stream; 128 KB in 4 parts 13.7-13.9 (twice
// 64 KB, not 128 KB's 20.8); a helper warp running the code first costs 1.4-3.7 us more at
// 64-96 KB (the others fetch it again), 1.6-2.0 less at 128 KB. Code comes into an SM as one
// stream, whoever asks for it.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string_view>
#include <utility>
#include <unordered_set>
#include <vector>

#include "cuda/common.cuh"
#include "lab_util.cuh"

namespace cg = cooperative_groups;
using multipole::cuda::detail::launch_maybe_pdl;
using multipole::cuda::detail::pdl_wait;

namespace {

constexpr size_t kChaseBytes = size_t(1) << 30;
constexpr int kLineWords = 32;  // 128-byte lines of uint32 links
constexpr int kMaxHops = 16;

__global__ void empty_kernel(int wait) {
  if (wait) pdl_wait();
}

// link: [kChaseBytes / 4] next index at each chain node; sink: [1]
__global__ void chase_kernel(const uint32_t* link, uint32_t start, int hops, uint32_t* sink) {
  uint32_t cur = start;
  for (int i = 0; i < hops; ++i) cur = __ldcg(link + cur);
  sink[0] = cur;
}

__global__ void block_barrier_kernel(int n, uint32_t* sink) {
  for (int i = 0; i < n; ++i) __syncthreads();
  if (threadIdx.x == 0 && n < 0) sink[0] = 1;
}

__global__ void cluster_barrier_kernel(int n, uint32_t* sink) {
  cg::cluster_group cluster = cg::this_cluster();
  for (int i = 0; i < n; ++i) cluster.sync();
  if (threadIdx.x == 0 && n < 0) sink[0] = 1;
}

// Holds `dynamic` bytes of shared memory and does nothing else (whether the CTA's room matters
// to the kernel behind it).
__global__ void roomy_kernel() {
  extern __shared__ uint8_t room[];
  if (threadIdx.x == 1u << 30) room[0] = 0;
}

// What a kernel that returns at entry costs, by what the one-launch step has that an empty
// kernel has not (gpu-notes item 45): a parameter block of the step's size, read or not, and
// a stack (local memory). sink: [1]
struct StepSizedArgs {
  const void* p[48];
  int flag;
};
template <bool kRead, bool kStack>
__global__ void entry_kernel(const StepSizedArgs a, uint32_t* sink) {
  extern __shared__ uint8_t room[];
  if constexpr (kRead)
    if (a.flag == 0) return;
  if constexpr (kStack) {
    volatile uint32_t local[16];  // (volatile: kept in local memory)
    local[threadIdx.x & 15] = threadIdx.x;
    if (local[(threadIdx.x + 1) & 15] == 1u << 30) sink[0] = 1;
    return;
  }
  if (threadIdx.x == 1u << 30) room[0] = 0, sink[0] = uintptr_t(a.p[0]) != 0;
}

// Blocks x 8 FMAs on x, straight-line (one 16-byte SASS instruction each), 8 independent chains.
template <int Blocks>
__device__ __forceinline__ void fma_blocks(float (&x)[8], float a, float b) {
#pragma unroll
  for (int i = 0; i < Blocks; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x[j]) : "f"(a), "f"(b));
}

// Blocks x 8 FMAs of straight-line code (one 16-byte SASS instruction each), 8 independent
// chains so that issue, not latency, sets the warm time. sink: [1]
// skip: return at once (what a large kernel costs that has nothing to do).
// hops: every thread first follows that many dependent loads through `chain` (cold after the
// flush), and the code depends on the last: whether the SM fetches code ahead while its warps
// wait for memory, as the one-launch step's prologue does (gpu-notes item 43).
// helper: the CTA's last warp skips the loads and runs the code at once, ahead of the others
// (whether one warp's fetch puts the code where the SM's other warps find it).
template <int Blocks>
__global__ void code_kernel(float a, float b, float* sink, int skip, const uint32_t* chain, int hops, int helper) {
  if (skip) return;
  uint32_t at = 0;
  const bool ahead = helper && threadIdx.x / 32 == blockDim.x / 32 - 1;
  for (int i = 0; i < hops && !ahead; ++i) at = __ldcg(chain + at);
  float x[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = float(threadIdx.x + j + (at & 1u));
  fma_blocks<Blocks>(x, a, b);
  float s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += x[j];
  if (s == -1.0f) sink[0] = s;
}

// Blocks x 8 FMAs of straight-line code in Regions parts; warp w runs part w % Regions only
// (warps go to the SM's four schedulers by w % 4): whether parts fetched by different
// schedulers at once come in faster than one warp's stream. sink: [1]
template <int Blocks, int Regions>
__global__ void split_code_kernel(float a, float b, float* sink) {
  static_assert(Blocks % Regions == 0);
  float x[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = float(threadIdx.x + j);
  const int part = int(threadIdx.x / 32) % Regions;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    // Each part multiplies by its own operand, so no two parts are the same code.
    ((part == R ? fma_blocks<Blocks / Regions>(x, a + float(R), b) : void()), ...);
  }(std::make_integer_sequence<int, Regions>());
  float s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += x[j];
  if (s == -1.0f) sink[0] = s;
}

// One warp runs n dependent steps of one kind (the chains a phase of one CTA is made of):
// 0: FMA, 1: warp shuffle + add, 2: shared-memory load. sink: [1]
__global__ void chain_kernel(int kind, int n, uint32_t* sink) {
  __shared__ uint32_t table[1024];
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) table[i] = (i * 97 + 13) & 1023;
  __syncwarp();
  float x = float(threadIdx.x);
  uint32_t cur = threadIdx.x;
  if (kind == 0) {
    for (int i = 0; i < n; ++i) x = fmaf(x, 0.999f, 1.0f);
  } else if (kind == 1) {
    for (int i = 0; i < n; ++i) x += __shfl_xor_sync(0xffffffffu, x, 1 + (i & 15));
  } else {
    for (int i = 0; i < n; ++i) cur = table[cur];
  }
  if (x == -1.0f || cur == 0xffffffffu) sink[0] = cur;
}

// Each CTA's table holds (rank << 16 | slot) links to slots of other CTAs; thread 0 of CTA 0
// follows n of them. sink: [1]
__global__ void dsmem_chase_kernel(int n, uint32_t* sink) {
  __shared__ uint32_t table[256];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = (((rank + 1) % size) << 16) | ((i * 37 + 11) & 255);
  cluster.sync();
  if (rank == 0 && threadIdx.x == 0) {
    uint32_t cur = 1;  // CTA 0, slot 1... then always another CTA
    for (int i = 0; i < n; ++i) cur = *cluster.map_shared_rank(table + (cur & 0xffff), cur >> 16);
    sink[0] = cur;
  }
  cluster.sync();  // no CTA leaves while its shared memory may still be read
}

// The flushed-replay timer with the number of timed runs per line.
struct Lab {
  lab::FlushedTimer timer;
  int iterations = 41;
  // Median over `iterations` flushed replays of `step`.
  double time_us(const std::function<void(cudaStream_t)>& step) {
    const lab::Graph g(step, timer.stream());
    std::vector<double> us;
    for (int i = 0; i < iterations; ++i) us.push_back(timer.run_us(g, true, i));
    return lab::median(us);
  }
};

void report(const char* what, double us) { std::printf("%-58s %9.3f us\n", what, us); }

template <class... Args>
cudaError_t launch_clusters(void (*kernel)(Args...), int clusters, int cluster, int threads, cudaStream_t s,
                            Args... args) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, clusters, cluster, threads, s);
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Clusters of `cluster` CTAs of `threads` that the GPU can hold at once (0: none).
template <class... Args>
int max_clusters(void (*kernel)(Args...), int cluster, int threads) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, 8, cluster, threads, nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// Straight-line code run once by 128 CTAs: cold after the flush, warm right after a replay.
// Then the same code behind kWaitHops dependent cold loads: the time the wait hides.
void code_lines(Lab& bench, uint32_t* sink) {
  const cudaStream_t s = bench.timer.stream();
  std::printf("%-58s %9s %9s %9s\n", "code: KB of straight-line code, 128 CTAs", "cold", "warm", "us/KB");
  float* fsink = reinterpret_cast<float*>(sink);
  // A chain of kWaitHops loads, one 4 KB page apart, ending at 0: [kWaitHops * 1024]
  constexpr int kWaitHops = 8, kHopWords = 1024;
  uint32_t* chain = nullptr;
  LAB_CHECK(cudaMalloc(&chain, size_t(kWaitHops) * kHopWords * 4));
  {
    std::vector<uint32_t> h(size_t(kWaitHops) * kHopWords, 0);
    for (int i = 0; i + 1 < kWaitHops; ++i) h[size_t(i) * kHopWords] = uint32_t(i + 1) * kHopWords;
    LAB_CHECK(cudaMemcpy(chain, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  const auto cold_us = [&](auto kernel, int hops, int helper = 0) {
    const lab::Graph g(
        [&](cudaStream_t st) { kernel<<<128, 256, 0, st>>>(0.999f, 1e-3f, fsink, 0, chain, hops, helper); }, s);
    std::vector<double> cold;
    for (int i = 0; i < bench.iterations; ++i) cold.push_back(bench.timer.run_us(g, true, i));
    return lab::median(cold);
  };
  // Medians of flushed replays and of replays right after another (code and data left in the caches).
  const auto cold_warm_us = [&](const lab::Graph& g) {
    std::vector<double> cold, warm;
    for (int i = 0; i < bench.iterations; ++i) {
      cold.push_back(bench.timer.run_us(g, true, i));
      warm.push_back(bench.timer.run_us(g, false, i));
    }
    return std::pair{lab::median(cold), lab::median(warm)};
  };
  const auto code_line = [&](auto kernel, int kb) {
    for (const int threads : {32, 256, 0}) {  // 0: 256 threads returning at once
      const int skip = threads == 0;
      const lab::Graph g(
          [&](cudaStream_t st) {
            kernel<<<128, skip ? 256 : threads, 0, st>>>(0.999f, 1e-3f, fsink, skip, chain, 0, 0);
          },
          s);
      const auto [c, w] = cold_warm_us(g);
      if (skip)
        std::printf("code: %3d KB, returning at once %33s %9.3f %9.3f us\n", kb, "", c, w);
      else
        std::printf("code: %3d KB, %3d threads a CTA %34s %9.3f %9.3f %9.4f us\n", kb, threads, "", c, w,
                    (c - w) / kb);
    }
  };
  code_line(code_kernel<32>, 4);
  code_line(code_kernel<128>, 16);
  code_line(code_kernel<512>, 64);
  code_line(code_kernel<1024>, 128);
  code_line(code_kernel<1536>, 192);

  std::printf("%-58s %9s %9s %9s\n", "wait: the code behind 8 dependent cold loads, 256 threads", "both",
              "apart", "hidden");
  const double wait = cold_us(code_kernel<0>, kWaitHops), bare = cold_us(code_kernel<0>, 0);
  std::printf("wait: 8 dependent loads alone %28s %9.3f %9s us\n", "", wait, "");
  // helper 1: the last warp skips the loads (code_kernel's `helper`).
  const auto wait_line = [&](auto kernel, int kb, int helper) {
    const double both = cold_us(kernel, kWaitHops, helper), code = cold_us(kernel, 0);
    const double apart = wait + code - bare;  // (the launch counted once)
    std::printf("%s: %3d KB of code behind them %*s %9.3f %9.3f %9.3f us\n", helper ? "helper" : "wait", kb,
                helper ? 24 : 26, "", both, apart, apart - both);
  };
  for (const int helper : {0, 1}) {
    if (helper)
      std::printf("%-58s %9s %9s %9s\n", "helper: as wait, the last warp runs the code at once", "both",
                  "apart", "hidden");
    wait_line(code_kernel<128>, 16, helper);
    wait_line(code_kernel<512>, 64, helper);
    wait_line(code_kernel<768>, 96, helper);
    wait_line(code_kernel<1024>, 128, helper);
    if (!helper) wait_line(code_kernel<1536>, 192, helper);
  }

  std::printf("%-58s %9s %9s\n", "split: KB in parts, warp w runs part w % parts, 256 threads", "cold", "warm");
  const auto split_line = [&](auto kernel, int kb, int parts) {
    const lab::Graph g([&](cudaStream_t st) { kernel<<<128, 256, 0, st>>>(0.999f, 1e-3f, fsink); }, s);
    const auto [c, w] = cold_warm_us(g);
    std::printf("split: %3d KB in %d parts of %3d KB %25s %9.3f %9.3f us\n", kb, parts, kb / parts, "", c, w);
  };
  split_line(split_code_kernel<512, 1>, 64, 1);
  split_line(split_code_kernel<512, 4>, 64, 4);
  split_line(split_code_kernel<512, 8>, 64, 8);
  split_line(split_code_kernel<1024, 4>, 128, 4);
  split_line(split_code_kernel<1024, 8>, 128, 8);
  LAB_CHECK(cudaFree(chain));
}

// Kernels of 8 clusters of 16 CTAs (256 threads, 75 KB of dynamic shared memory, as the
// one-launch step at batch 1) returning at entry.
void entry_lines(Lab& bench, uint32_t* sink) {
  constexpr int kRoom = 75 << 10, kRoomOne = 150 << 10;  // two CTAs an SM, and one
  StepSizedArgs args{};
  args.flag = 0;
  const auto line = [&](const char* what, auto kernel, auto... kernel_args) {
    LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRoom));
    report(what, bench.time_us([&](cudaStream_t st) {
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, 8, 16, 256, st, size_t(kRoom));
      LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, kernel_args...));
    }));
  };
  line("entry: 392-byte parameters, unread", entry_kernel<false, false>, args, sink);
  line("entry: 392-byte parameters, one field read", entry_kernel<true, false>, args, sink);
  line("entry: 392-byte parameters, 64-byte stack", entry_kernel<false, true>, args, sink);
  line("entry: empty kernel, clusters of 16, 75 KB", roomy_kernel);
  // Clusters of n CTAs of 256 threads that fit at once, two CTAs an SM (75 KB each) or one
  // (150 KB): whether the batch-1 step's 8 clusters of 16 get SMs of their own (item 45).
  LAB_CHECK(cudaFuncSetAttribute(roomy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRoomOne));
  for (const int kb : {kRoom >> 10, kRoomOne >> 10})
    for (const int n : {8, 9, 10, 12, 14, 16}) {
      char what[96];
      std::snprintf(what, sizeof what, "fit: clusters of %d CTAs, %d KB a CTA", n, kb);
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, 8, n, 256, nullptr, size_t(kb) << 10);
      int fit = 0;
      LAB_CHECK(cudaOccupancyMaxActiveClusters(&fit, roomy_kernel, &cfg));
      std::printf("%-58s %9d\n", what, fit);
    }
}

}  // namespace

int main(int argc, char** argv) {
  Lab bench;
  if (argc > 1) bench.iterations = std::max(3, std::atoi(argv[1]));
  cudaDeviceProp prop{};
  LAB_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; %d timed runs per line, median; graph replay, L2 flushed by a %zu MiB memset\n",
              prop.name, prop.multiProcessorCount, bench.iterations, lab::FlushedTimer::kFlushBytes >> 20);
  uint32_t* sink = nullptr;
  LAB_CHECK(cudaMalloc(&sink, 64));
  if (argc > 2 && std::string_view(argv[2]) == "code") {  // the code lines only
    code_lines(bench, sink);
    return 0;
  }
  if (argc > 2 && std::string_view(argv[2]) == "entry") {  // the entry lines only
    entry_lines(bench, sink);
    return 0;
  }
  const cudaStream_t s = bench.timer.stream();

  // Launch floors.
  const int wave = prop.multiProcessorCount;
  for (const int ctas : {8, wave}) {
    char what[96];
    std::snprintf(what, sizeof what, "launch: 1 empty kernel, %d CTAs", ctas);
    report(what, bench.time_us([&](cudaStream_t st) { empty_kernel<<<ctas, 256, 0, st>>>(0); }));
    for (const bool pdl : {false, true}) {
      std::snprintf(what, sizeof what, "launch: 3 empty kernels, %d CTAs, %s", ctas, pdl ? "PDL" : "plain");
      report(what, bench.time_us([&](cudaStream_t st) {
        empty_kernel<<<ctas, 256, 0, st>>>(0);
        for (int k = 0; k < 2; ++k) LAB_CHECK(launch_maybe_pdl(empty_kernel, dim3(ctas), dim3(256), 0, st, pdl, int(pdl)));
      }));
    }
  }

  // Dependent global loads: chains of kMaxHops links over random 128-byte lines of 1 GiB,
  // a fresh chain for each timed run.
  uint32_t* link = nullptr;
  LAB_CHECK(cudaMalloc(&link, kChaseBytes));
  LAB_CHECK(cudaMemset(link, 0, kChaseBytes));
  const int chains = bench.iterations;
  std::vector<uint32_t> starts(static_cast<size_t>(chains));
  {
    std::mt19937_64 rng(12345);
    const uint64_t lines = kChaseBytes / (kLineWords * 4);
    std::unordered_set<uint64_t> used;
    auto fresh = [&] {
      for (;;) {
        const uint64_t l = rng() % lines;
        if (used.insert(l).second) return uint32_t(l * kLineWords);
      }
    };
    for (int c = 0; c < chains; ++c) {
      uint32_t cur = starts[size_t(c)] = fresh();
      for (int h = 0; h < kMaxHops; ++h) {
        const uint32_t next = fresh();
        LAB_CHECK(cudaMemcpy(link + cur, &next, 4, cudaMemcpyHostToDevice));
        cur = next;
      }
    }
  }
  std::printf("%-58s %9s %9s\n", "chase: h dependent loads, one thread", "cold", "warm");
  double cold0 = 0, warm0 = 0, coldh = 0, warmh = 0;
  for (const int hops : {0, 1, 2, 4, 8, 16}) {
    const lab::Graph g([&](cudaStream_t st) { chase_kernel<<<1, 32, 0, st>>>(link, starts[0], hops, sink); }, s);
    // A graph's kernel arguments are fixed: each run gets its own chain by a node update.
    cudaGraphNode_t node;
    size_t nodes = 1;
    LAB_CHECK(cudaGraphGetNodes(g.graph, &node, &nodes));
    cudaKernelNodeParams kp{};
    LAB_CHECK(cudaGraphKernelNodeGetParams(node, &kp));
    std::vector<double> cold, warm;
    for (int chain = 0; chain < chains; ++chain) {
      const uint32_t* l = link;
      uint32_t start = starts[size_t(chain)];
      int h = hops;
      uint32_t* sk = sink;
      void* args[] = {&l, &start, &h, &sk};
      kp.kernelParams = args;
      LAB_CHECK(cudaGraphExecKernelNodeSetParams(g.exec, node, &kp));
      cold.push_back(bench.timer.run_us(g, true, chain));
      warm.push_back(bench.timer.run_us(g, false, chain));  // the same chain, now in L2
    }
    const double c = lab::median(cold), w = lab::median(warm);
    std::printf("chase: h = %-46d %9.3f %9.3f us\n", hops, c, w);
    if (hops == 0) cold0 = c, warm0 = w;
    if (hops == kMaxHops) coldh = c, warmh = w;
  }
  std::printf("%-58s %9.3f %9.3f us\n", "chase: one round trip ((h16 - h0) / 16)", (coldh - cold0) / kMaxHops,
              (warmh - warm0) / kMaxHops);
  LAB_CHECK(cudaFree(link));

  // Barriers: per barrier from 0 and 256 of them, 8 CTAs (clusters) as 8 KV heads at batch 1.
  constexpr int kBarriers = 256;
  for (const int threads : {256, 1024}) {
    const double t0 = bench.time_us([&](cudaStream_t st) { block_barrier_kernel<<<8, threads, 0, st>>>(0, sink); });
    const double t1 =
        bench.time_us([&](cudaStream_t st) { block_barrier_kernel<<<8, threads, 0, st>>>(kBarriers, sink); });
    char what[96];
    std::snprintf(what, sizeof what, "barrier: __syncthreads, %d threads", threads);
    report(what, (t1 - t0) / kBarriers);
  }
  LAB_CHECK(cudaFuncSetAttribute(cluster_barrier_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  LAB_CHECK(cudaFuncSetAttribute(dsmem_chase_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for (const int cluster : {8, 16}) {
    for (const int threads : {256, 1024}) {
      const int fit = max_clusters(cluster_barrier_kernel, cluster, threads);
      char what[96];
      if (fit < 8) {
        std::printf("barrier: clusters of %d x %d threads: only %d fit at once, skipped\n", cluster, threads, fit);
        continue;
      }
      const double t0 = bench.time_us(
          [&](cudaStream_t st) { LAB_CHECK(launch_clusters(cluster_barrier_kernel, 8, cluster, threads, st, 0, sink)); });
      const double t1 = bench.time_us([&](cudaStream_t st) {
        LAB_CHECK(launch_clusters(cluster_barrier_kernel, 8, cluster, threads, st, kBarriers, sink));
      });
      std::snprintf(what, sizeof what, "barrier: cluster of %d CTAs x %d threads (%d fit)", cluster, threads, fit);
      report(what, (t1 - t0) / kBarriers);
    }
    const int fit = max_clusters(dsmem_chase_kernel, cluster, 256);
    if (fit < 8) continue;
    const double t0 = bench.time_us(
        [&](cudaStream_t st) { LAB_CHECK(launch_clusters(dsmem_chase_kernel, 8, cluster, 256, st, 0, sink)); });
    const double t1 = bench.time_us(
        [&](cudaStream_t st) { LAB_CHECK(launch_clusters(dsmem_chase_kernel, 8, cluster, 256, st, kBarriers, sink)); });
    char what[96];
    std::snprintf(what, sizeof what, "dsmem: one dependent remote load, cluster of %d", cluster);
    report(what, (t1 - t0) / kBarriers);
  }
  // Dependent instruction chains of one warp, per step from 0 and 4096 steps.
  constexpr int kSteps = 4096;
  const char* kinds[] = {"chain: one dependent FMA, one warp", "chain: one dependent shuffle + add, one warp",
                         "chain: one dependent shared-memory load, one warp"};
  for (int kind = 0; kind < 3; ++kind) {
    const double t0 = bench.time_us([&](cudaStream_t st) { chain_kernel<<<1, 32, 0, st>>>(kind, 0, sink); });
    const double t1 = bench.time_us([&](cudaStream_t st) { chain_kernel<<<1, 32, 0, st>>>(kind, kSteps, sink); });
    report(kinds[kind], (t1 - t0) / kSteps);
  }

  // A kernel behind another: each pair against its first kernel alone. The first as the
  // one-launch step at batch 1 (8 clusters of 16 x 256 threads, 2 CTAs an SM) or plain.
  constexpr int kRoom = 100 << 10;
  LAB_CHECK(cudaFuncSetAttribute(roomy_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  LAB_CHECK(cudaFuncSetAttribute(roomy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRoom));
  struct Kind {
    const char* name;
    int cluster;  // 0: a plain launch of 128 CTAs
    int room;
  };
  const Kind firsts[] = {{"plain", 0, 0}, {"plain 100 KB", 0, kRoom}, {"clusters of 8", 8, 0},
                         {"clusters of 16", 16, 0}, {"clusters of 16, 100 KB", 16, kRoom}};
  const Kind seconds[] = {{"plain 8 CTAs", 0, 0}, {"plain 8 CTAs 100 KB", 0, kRoom}, {"8 clusters of 1", 1, 0},
                          {"clusters of 16", 16, 0}};
  auto launch = [&](const Kind& k, int ctas, cudaStream_t st) {
    if (k.cluster == 0) {
      roomy_kernel<<<ctas, 256, size_t(k.room), st>>>();
      LAB_CHECK(cudaGetLastError());
    } else {
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, 8, k.cluster, 256, st, size_t(k.room));
      LAB_CHECK(cudaLaunchKernelEx(&cfg, roomy_kernel));
    }
  };
  for (const Kind& first : firsts) {
    const double alone = bench.time_us([&](cudaStream_t st) { launch(first, 128, st); });
    char what[96];
    std::snprintf(what, sizeof what, "follow: %s alone", first.name);
    report(what, alone);
    for (const Kind& second : seconds) {
      const double pair = bench.time_us([&](cudaStream_t st) {
        launch(first, 128, st);
        launch(second, 8, st);
      });
      std::snprintf(what, sizeof what, "follow: %s, then %s (added)", first.name, second.name);
      report(what, pair - alone);
    }
  }

  entry_lines(bench, sink);
  code_lines(bench, sink);
  LAB_CHECK(cudaDeviceSynchronize());
  return 0;
}
