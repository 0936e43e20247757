// Kernel lab: does compute-sanitizer synccheck misreport the barriers of a thread-block-cluster
// launch whose clusters do not all fit at once (gpu-notes item 48)?
//
// The one-launch step passes synccheck where its clusters all run at once
// (CudaMultipole.OneLevelInOneLaunch) and gets thousands of "Barrier error detected. Divergent
// thread(s) in warp" at its __syncthreads where they run in waves (OneLaunchInWaves), though its
// SASS has no divergent path there. This probe has none anywhere: each CTA (256 threads, 75 KB of
// dynamic shared memory, so two an SM) runs rounds of a predicated store, __syncthreads and a
// fixed-count FMA loop between cluster barriers. Run it under the tool:
//   compute-sanitizer --tool synccheck lab_synccheck_waves_probe [clustered 0|1] [clusters N]
// clustered 1 (default): clusters of 16 CTAs; 0: the same CTAs without a cluster. N: 120 by
// default (waves); 6 fit at once. Seen on the H200 (CUDA 13.0): reports with 120 clusters only.
#include <cooperative_groups.h>

#include <cstdio>
#include <cstdlib>

#include "lab_util.cuh"

namespace {

constexpr int kThreads = 256, kCtas = 16, kRounds = 20;
constexpr size_t kSmem = 75 * 1024;

__global__ void __launch_bounds__(kThreads, 2) probe(float* out, bool clustered) {
  namespace cg = cooperative_groups;
  extern __shared__ float smem[];  // [8][kThreads]
  __shared__ float part[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (clustered) cg::this_cluster().sync();
  float x = float(tid);
  for (int r = 0; r < kRounds; ++r) {
    smem[tid + kThreads * (r & 7)] = x;
    if (lane == 0) part[warp] = x;  // (a predicated store: no branch)
    __syncthreads();
    x += part[(warp + 1) % (kThreads / 32)] * 0.5f + smem[(tid + 1) % kThreads];
    for (int i = 0; i < 400; ++i) x = x * 0.999f + 1e-3f;  // (a fixed trip count)
    __syncthreads();
  }
  if (clustered) cg::this_cluster().sync();
  out[size_t(blockIdx.x) * kThreads + tid] = x;
}

}  // namespace

int main(int argc, char** argv) {
  const bool clustered = argc > 1 ? std::atoi(argv[1]) != 0 : true;
  const int clusters = argc > 2 ? std::atoi(argv[2]) : 120;
  if (clusters < 1 || clusters > 4096) {
    std::fprintf(stderr, "clusters %d: must be in [1, 4096]\n", clusters);
    return 2;
  }
  float* out = nullptr;
  LAB_CHECK(cudaMalloc(&out, size_t(clusters) * kCtas * kThreads * sizeof(float)));
  LAB_CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  LAB_CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = lab::cluster_launch_config(attr, clusters, kCtas, kThreads, nullptr, kSmem);
  if (!clustered) cfg.numAttrs = 0;  // the same grid of CTAs, no cluster
  int fit = 0;
  if (clustered) LAB_CHECK(cudaOccupancyMaxActiveClusters(&fit, probe, &cfg));
  LAB_CHECK(cudaLaunchKernelEx(&cfg, probe, out, clustered));
  LAB_CHECK(cudaDeviceSynchronize());
  std::printf("%s: %d x %d CTAs (clusters at once: %d) ran\n", clustered ? "clusters" : "plain CTAs", clusters, kCtas,
              fit);
  LAB_CHECK(cudaFree(out));
  return 0;
}
