// The device index's host side, which needs no GPU: the position sums DeviceClusterIndex uploads
// for the far field at real positions (position_sums()) against the CPU index's own
// (ClusterLevel::position_sums, kept by its k-means and online updates), at one and two levels,
// after the prefill and after online updates.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/config.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/cuda/cluster_index.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

using namespace multipole;

namespace {

void expect_sums_of(const ClusterIndex& idx, const char* when) {
  SCOPED_TRACE(when);
  const std::vector<int64_t> got = cuda::position_sums(cuda::host_cluster_level(idx));
  std::vector<int64_t> want;
  if (idx.num_levels() == 2) {
    const ClusterLevel& coarse = idx.level(1);
    want.assign(coarse.position_sums.begin(), coarse.position_sums.begin() + coarse.count());
  }
  const ClusterLevel& fine = idx.level(0);
  want.insert(want.end(), fine.position_sums.begin(), fine.position_sums.begin() + fine.count());
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(got, want);
}

TEST(CudaClusterIndexHost, PositionSumsAreTheCpuIndexes) {
  for (const std::vector<int>& tpc : {std::vector<int>{16}, std::vector<int>{8, 64}}) {
    SCOPED_TRACE(::testing::Message() << "levels " << tpc.size());
    constexpr int d = 32;
    AttentionConfig c;
    c.num_kv_heads = 1;
    c.num_q_heads = 1;
    c.head_dim = d;
    c.rope.head_dim = d;
    c.cluster.sinks = 4;
    c.cluster.window = 16;
    c.cluster.block_size = 256;
    c.cluster.tokens_per_centroid = tpc;
    PagedKVCache cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = 1, .head_dim = d, .page_size = 16,
                                     .dtype = DType::F32, .max_tokens = 4096});
    const SeqId seq = cache.add_sequence();
    const Rope rope(c.rope);
    std::mt19937 rng(71);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto write = [&](int64_t n) {
      std::vector<float> k(size_t(n) * d), v(size_t(n) * d);
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      const int64_t pos = cache.extend(seq, n);
      for (int64_t t = 0; t < n; ++t) rope.apply(k.data() + t * d, double(pos + t));
      cache.write(seq, 0, pos, n, k.data(), v.data());
    };
    write(1000);
    ClusterIndex idx;
    idx.build(cache, seq, 0, 0, c.middle_end(1000), c, rope);
    ASSERT_EQ(idx.num_levels(), int(tpc.size()));
    expect_sums_of(idx, "prefill");
    for (int i = 0; i < 20; ++i) {
      write(16);
      idx.append(cache, seq, 0, 0, c.middle_end(cache.length(seq)), c, rope);
    }
    expect_sums_of(idx, "online updates");
  }
}

}  // namespace
