// The greedy cluster selection of the multipole kernels (greedy_select.cuh) on its
// own, one CTA per case, against the rule written out plainly on the host: sort by importance
// (descending, lower index first on ties), take a cluster when 0 < n <= what is left of the
// budget. Every algorithm the kernel can take is run on every case: the block-wide radix
// path (its tail walked by one warp), the one-warp walk with and without its hand-over to
// the radix path or to the one-warp sort, and the sort alone. Cases cover 1..3000 clusters, ties,
// empty clusters, clusters larger than the budget, budgets above the total, and long greedy
// tails (a large cluster at the radix boundary leaves a budget that hundreds of tiny ones
// below it compete for): walked by one warp up to 2048 clusters, block-wide beyond.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/check.hpp"
#include "cuda/greedy_select.cuh"
#include "multipole/cuda/runtime.hpp"
#include "test_scale.hpp"

using namespace multipole::cuda;
using multipole::test::small_scale;

namespace {

constexpr int kMaxClusters = 3000;

struct Mode {
  int warp_max, warp_steps;
  bool precheck;
  int sort;
};

// keys, sizes: [C]; out: [C] sizes after the selection (-n: selected), then the budget left.
__global__ void __launch_bounds__(detail::kSelectThreads)
    greedy_select_kernel(const uint32_t* keys, const int* sizes, int C, int R, Mode mode, int* out) {
  using namespace detail;
  __shared__ uint32_t key[kMaxClusters + kMaxClusters / 32 + 1];
  __shared__ int size[kMaxClusters + kMaxClusters / 32 + 1];
  __shared__ __align__(8) unsigned int hist[4096];
  __shared__ unsigned long long tmp64[kSelectWarps];
  __shared__ int digit, above;
  int mine = 0;
  for (int i = threadIdx.x; i < C; i += kSelectThreads) {
    key[pad(i)] = keys[i];
    size[pad(i)] = sizes[i];
    mine += max(sizes[i], 0);
  }
  const int total = block_scan(mine).y;  // its barriers publish key and size
  const SelectShared sh{hist, tmp64, &digit, &above};
  const int left = greedy_select(key, size, C, R, total, sh, mode.warp_max, mode.warp_steps, nullptr, 0, 0,
                                 mode.precheck, mode.sort);
  __syncthreads();
  for (int i = threadIdx.x; i < C; i += kSelectThreads) out[i] = size[pad(i)];
  if (threadIdx.x == 0) out[C] = left;
}

// The rule: taken[i] and the budget left.
std::pair<std::vector<char>, int> reference(const std::vector<float>& imp, const std::vector<int>& sizes, int R) {
  std::vector<int> order(imp.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return imp[size_t(a)] > imp[size_t(b)]; });
  std::vector<char> taken(imp.size(), 0);
  for (const int i : order)
    if (sizes[size_t(i)] > 0 && sizes[size_t(i)] <= R) {
      taken[size_t(i)] = 1;
      R -= sizes[size_t(i)];
    }
  return {taken, R};
}

}  // namespace

TEST(CudaSelect, EveryAlgorithmFollowsTheGreedyRule) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Mode modes[] = {
      {0, 64, true, 0},       // radix, then its tail walked
      {256, 24, true, 0},     // walk (default), precheck
      {256, 2, false, 0},     // walk of 2 picks, then the radix path
      {256, 1000, false, 0},  // walk without a limit
      {256, 24, true, 1},     // walk, or sort where the precheck foresees a long walk
      {256, 2, false, 1},     // walk of 2 picks, then sort
      {256, 24, true, 2},     // sort only
  };
  std::mt19937 rng(1234);
  DeviceBuffer d_keys(kMaxClusters * 4), d_sizes(kMaxClusters * 4), d_out((kMaxClusters + 1) * 4);
  // Fewer cases under the sanitizers (MULTIPOLE_TEST_SCALE=small).
  const std::vector<int> counts = small_scale() ? std::vector<int>{7, 33, 256, 257, 1100}
                                                : std::vector<int>{1, 2, 7, 31, 32, 33, 100, 200, 255, 256, 257, 512, 600, 1100, 2100, 3000};
  const std::vector<int> budgets = small_scale() ? std::vector<int>{5, 128, 2048} : std::vector<int>{0, 5, 128, 2048, 1 << 20};
  int cases = 0;
  for (const int C : counts)
    for (int shape = 0; shape < 7; ++shape)
      for (const int R : budgets) {
        SCOPED_TRACE(::testing::Message() << "C=" << C << " shape=" << shape << " R=" << R);
        std::vector<float> imp(static_cast<size_t>(C));
        std::vector<int> sizes(static_cast<size_t>(C));
        for (int i = 0; i < C; ++i) {
          const float u = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
          switch (shape) {
            case 0: imp[i] = u; sizes[i] = 1 + int(rng() % 32); break;                       // uniform
            case 1: imp[i] = std::floor(u * 4) / 4; sizes[i] = 1 + int(rng() % 8); break;     // many ties
            case 2: imp[i] = 0.5f; sizes[i] = 1 + int(rng() % 3); break;                      // all tied, tiny
            case 3: imp[i] = u * u * 1e-3f; sizes[i] = rng() % 5 == 0 ? 0 : 1 + int(rng() % 200); break;  // empties
            case 4: imp[i] = u; sizes[i] = i % 7 == 0 ? 3000 : 1 + int(rng() % 4); break;     // giants among tiny ones
            case 5: imp[i] = i < 3 ? 1.0f : u * 1e-2f; sizes[i] = i < 3 ? 5000 : 1 + int(rng() % 16); break;  // giants ahead
            default: imp[i] = u; sizes[i] = i % 10 == 0 ? 60 + int(rng() % 60) : 1 + int(rng() % 3);  // long tails
          }
        }
        d_keys.upload(imp.data(), size_t(C) * 4);  // the keys are the importances' f32 bits
        d_sizes.upload(sizes.data(), size_t(C) * 4);
        const auto [want, want_left] = reference(imp, sizes, R);
        for (const Mode& m : modes) {
          SCOPED_TRACE(::testing::Message() << "warp_max=" << m.warp_max << " steps=" << m.warp_steps
                                            << " precheck=" << m.precheck << " sort=" << m.sort);
          d_out.memset(0x7f);  // poison
          greedy_select_kernel<<<1, detail::kSelectThreads>>>(d_keys.as<const uint32_t>(), d_sizes.as<const int>(), C,
                                                              R, m, d_out.as<int>());
          MP_CUDA_CHECK(cudaGetLastError());
          std::vector<int> out(size_t(C) + 1);
          d_out.download(out.data(), out.size() * 4);
          EXPECT_EQ(out[size_t(C)], want_left);
          for (int i = 0; i < C; ++i) {
            const int expect = want[size_t(i)] ? -sizes[size_t(i)] : sizes[size_t(i)];
            ASSERT_EQ(out[size_t(i)], expect) << "cluster " << i;
          }
          ++cases;
        }
      }
  EXPECT_EQ(cases, int(counts.size() * budgets.size()) * 7 * 7);
}
