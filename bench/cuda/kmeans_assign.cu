// Kernel lab: the prefill k-means assignment (src/cuda/kmeans_assign.cuh; gpu-notes item 69).
//
// The assignment is the prefill's largest stage (4.7 of 9.7 ms for 128K tokens x 8 KV heads on
// the H200, item 31): per Lloyd iteration 2 x 1M points x 512 centroids x 128 dims = 137 GFLOP,
// run by mma.sync at ~290 TFLOP/s. This lab runs the library's forms of the tile on the blocks
// of that shape (128 blocks of 8192 points and 512 centroids, d 128) and on ragged ones:
//   mma:        assign_tile_mma (mma.sync m16n8k16, each warp 32 points, 2 stages);
//   wgmma-sS:   assign_tile_wgmma<D, S> (sm_90a warpgroup mma, the CTA's 128 points as two m64
//               tiles, S shared-memory stages, each argmin behind a product; the library runs
//               S = kAssignStages).
// Checks, each form and case, outputs poisoned first: every point written; on every 7th point
// (61st in the prefill case) the chosen centroid's squared distance (f64 over the same f16
// values) within 1e-4 (|x|^2 + |c|^2) of the nearest one's, and dist2 within that of it. Prints
// how often each wgmma form chooses otherwise than mma (near ties: their f32 sums differ in
// order). Timing: median of `runs` launches each (events, forms alternated, L2 not flushed: the
// stage streams 1 GB), TFLOP/s.
// Usage: lab_kmeans_assign [runs, default 20].
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/kmeans_assign.cuh"
#include "lab_util.cuh"

namespace km = multipole::cuda::detail;

namespace {

template <int D>
__global__ void __launch_bounds__(128) mma_kernel(const km::KmAssign a) {
  km::assign_tile_mma<D>(a);
}
template <int D, int S>
__global__ void __launch_bounds__(128) wgmma_kernel(const km::KmAssign a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  km::assign_tile_wgmma<D, S>(a);
#else
  __trap();
#endif
}

// The forms timed: mma.sync, then wgmma with 2, 3 and 4 shared-memory stages.
constexpr int kForms = 4;
const char* const kFormName[kForms] = {"mma", "wgmma-s2", "wgmma-s3", "wgmma-s4"};

template <int D, int S>
void launch_wgmma(unsigned grid, const km::KmAssign& a) {
  constexpr size_t smem = km::assign_wgmma_smem_bytes<D, S>();
  auto* kern = wgmma_kernel<D, S>;
  LAB_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kern<<<grid, 128, smem>>>(a);
}
template <int D>
void launch_form(int form, unsigned grid, const km::KmAssign& a) {
  if (form == 0) mma_kernel<D><<<grid, 128>>>(a);
  else if (form == 1) launch_wgmma<D, 2>(grid, a);
  else if (form == 2) launch_wgmma<D, 3>(grid, a);
  else launch_wgmma<D, 4>(grid, a);
  LAB_CHECK(cudaGetLastError());
}

struct Case {
  const char* name;
  int blocks, n, k, inactive, d;  // inactive: the last clusters of each block get +inf norms
};

// Returns false if a check failed.
bool run_case(const Case& c, int runs, std::mt19937& rng) {
  const int D = c.d;
  std::vector<km::KmBlock> blocks(size_t(c.blocks));
  std::vector<km::KmTile> tiles;
  for (int b = 0; b < c.blocks; ++b) {
    blocks[b] = {};
    blocks[b].point_begin = b * c.n, blocks[b].n = c.n, blocks[b].cluster_begin = b * c.k, blocks[b].k = c.k;
    for (int s = 0; s < c.n; s += km::kKmTilePoints) tiles.push_back({b, s});
  }
  // Points around 32 centres a block (keys cluster), centroids drawn from the points plus noise:
  // distances crowd as in a real Lloyd round.
  const size_t P = size_t(c.blocks) * c.n, K = size_t(c.blocks) * c.k;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<__half> xb(P * D), cb(K * D);
  std::vector<float> xf(P * D), cf(K * D), xnorm(P), cnorm(K);
  for (int b = 0; b < c.blocks; ++b) {
    std::vector<float> centre(size_t(32) * D);
    for (auto& v : centre) v = 2.0f * nd(rng);
    for (int i = 0; i < c.n; ++i) {
      const int g = int(rng() % 32);
      for (int j = 0; j < D; ++j) {
        const size_t at = (size_t(b) * c.n + i) * D + j;
        xb[at] = __float2half_rn(centre[size_t(g) * D + j] + nd(rng));
        xf[at] = __half2float(xb[at]);
      }
    }
    for (int q = 0; q < c.k; ++q) {
      const int i = int(rng() % c.n);
      for (int j = 0; j < D; ++j) {
        const size_t at = (size_t(b) * c.k + q) * D + j;
        cb[at] = __float2half_rn(xf[(size_t(b) * c.n + i) * D + j] + 0.1f * nd(rng));
        cf[at] = __half2float(cb[at]);
      }
    }
  }
  const auto sq = [&](const std::vector<float>& v, size_t row) {
    double s = 0;
    for (int j = 0; j < D; ++j) s += double(v[row * D + j]) * v[row * D + j];
    return s;
  };
  for (size_t p = 0; p < P; ++p) xnorm[p] = float(sq(xf, p));
  for (size_t q = 0; q < K; ++q) cnorm[q] = (q % c.k) >= size_t(c.k - c.inactive) ? INFINITY : float(sq(cf, q));

  km::KmAssign a{};
  a.blocks = lab::upload(blocks), a.tiles = lab::upload(tiles), a.xb = lab::upload(xb), a.xnorm = lab::upload(xnorm);
  a.centb = lab::upload(cb), a.cnorm = lab::upload(cnorm);
  LAB_CHECK(cudaMalloc(&a.labels, P * 4));
  LAB_CHECK(cudaMalloc(&a.dist2, P * 4));
  const auto launch = [&](int form) {
    const unsigned grid = unsigned(tiles.size());
    if (D == 128) launch_form<128>(form, grid, a);
    else launch_form<64>(form, grid, a);
  };

  bool ok = true;
  std::vector<int32_t> labels[kForms];
  for (int form = 0; form < kForms; ++form) {
    LAB_CHECK(cudaMemset(a.labels, 0xff, P * 4));  // -1
    LAB_CHECK(cudaMemset(a.dist2, 0xff, P * 4));   // NaN
    launch(form);
    LAB_CHECK(cudaDeviceSynchronize());
    labels[form].resize(P);
    std::vector<float> dist2(P);
    LAB_CHECK(cudaMemcpy(labels[form].data(), a.labels, P * 4, cudaMemcpyDeviceToHost));
    LAB_CHECK(cudaMemcpy(dist2.data(), a.dist2, P * 4, cudaMemcpyDeviceToHost));
    long unwritten = 0, wrong = 0, checked = 0;
    double worst = 0;
    for (size_t p = 0; p < P; ++p) {
      const int l = labels[form][p];
      if (l < 0 || l >= c.k - c.inactive || !std::isfinite(dist2[p])) {
        ++unwritten;
        continue;
      }
      if (p % (P > 100000 ? 61 : 7)) continue;
      const size_t b = p / c.n;
      double best = INFINITY, chosen = 0, cn_best = 0;
      for (int q = 0; q < c.k - c.inactive; ++q) {
        double s = 0;
        for (int j = 0; j < D; ++j) {
          const double t = double(xf[p * D + j]) - cf[(b * c.k + q) * D + j];
          s += t * t;
        }
        if (s < best) best = s, cn_best = cnorm[b * c.k + q];
        if (q == l) chosen = s;
      }
      const double tol = 1e-4 * (xnorm[p] + cn_best);
      const double err = std::max(chosen - best, std::fabs(double(dist2[p]) - chosen));
      worst = std::max(worst, err / tol);
      if (err > tol) ++wrong;
      ++checked;
    }
    std::printf("%-8s %-6s checked %ld points: %ld unwritten, %ld over tolerance (worst %.3f of it)\n", c.name,
                kFormName[form], checked, unwritten, wrong, worst);
    ok = ok && unwritten == 0 && wrong == 0 && checked > 0;
  }
  for (int form = 1; form < kForms; ++form) {
    long differ = 0;
    for (size_t p = 0; p < P; ++p) differ += labels[0][p] != labels[form][p];
    std::printf("%-8s %s chooses otherwise than mma for %ld of %zu points\n", c.name, kFormName[form], differ, P);
  }

  cudaEvent_t e0, e1;
  LAB_CHECK(cudaEventCreate(&e0));
  LAB_CHECK(cudaEventCreate(&e1));
  std::vector<double> us[kForms];
  for (int i = 0; i < runs; ++i)
    for (int form = 0; form < kForms; ++form) {
      LAB_CHECK(cudaEventRecord(e0));
      launch(form);
      LAB_CHECK(cudaEventRecord(e1));
      LAB_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      LAB_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us[form].push_back(ms * 1e3);
    }
  const double flop = 2.0 * double(P) * c.k * D;
  std::printf("TIME %-8s", c.name);
  for (int form = 0; form < kForms; ++form) {
    const double m = lab::median(us[form]);
    std::printf("  %s %.1f us (%.0f TFLOP/s, %.2fx mma)", kFormName[form], m, flop / m * 1e-6, lab::median(us[0]) / m);
  }
  std::printf("\n");
  LAB_CHECK(cudaEventDestroy(e0));
  LAB_CHECK(cudaEventDestroy(e1));
  for (const void* p : {(const void*)a.blocks, (const void*)a.tiles, (const void*)a.xb, (const void*)a.xnorm,
                        (const void*)a.centb, (const void*)a.cnorm, (const void*)a.labels, (const void*)a.dist2})
    LAB_CHECK(cudaFree(const_cast<void*>(p)));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::atoi(argv[1]) : 20;
  if (runs < 1) {
    std::fprintf(stderr, "usage: lab_kmeans_assign [runs >= 1]\n");
    return 2;
  }
  std::mt19937 rng(20261206);
  const Case cases[] = {
      {"ragged", 6, 1000, 200, 13, 128},   // a partial point tile, a partial centroid stage, inactive clusters
      {"d64", 6, 1000, 200, 13, 64},
      {"prefill", 128, 8192, 512, 0, 128},  // level 0 of 128K tokens x 8 KV heads, blocks of 8192
  };
  bool ok = true;
  for (const Case& c : cases) ok = run_case(c, runs, rng) && ok;
  std::printf("%s\n", ok ? "ALL CHECKS PASSED" : "SOME CHECK FAILED");
  return ok ? 0 : 1;
}
