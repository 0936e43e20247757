// The cluster index (cluster_index.hpp): statistics always equal the membership's, CSR
// lists match labels/parents, the block rule, determinism, and that online updates touch
// only the open block. Statistics are recomputed in float64 from the cache
// (reference_multipole.hpp), never taken from the index.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "attention/multipole_policy.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/core/error.hpp"
#include "reference_multipole.hpp"

using namespace multipole;
namespace ref = multipole::reference;

namespace {

using multipole::reference::small_scale;

AttentionConfig small_config(int d, std::vector<int> tpc, int block = 256, int window = 16) {
  AttentionConfig c = ref::attention_config(2, d, 2);
  c.cluster.sinks = 5;
  c.cluster.window = window;
  c.cluster.block_size = block;
  c.cluster.tokens_per_centroid = std::move(tpc);
  c.cluster.seed = 11;
  return c;
}

// Everything the index claims, checked against the cache and its own labels/parents.
void expect_consistent(const ClusterIndex& idx, const PagedKVCache& cache, SeqId seq, int layer, int h,
                       const AttentionConfig& c, const std::string& what) {
  SCOPED_TRACE(what);
  const Rope rope(c.rope);
  const int d = c.head_dim;
  ref::SeqKV kv(cache, seq, layer);
  ASSERT_EQ(idx.begin(), c.cluster.sinks);
  ASSERT_EQ(int64_t(idx.labels().size()), idx.end() - idx.begin());
  const auto stats = ref::stats_from_labels(idx, kv, h, rope);
  for (int l = 0; l < idx.num_levels(); ++l) {
    const ClusterLevel& lv = idx.level(l);
    const auto& st = stats[size_t(l)];
    const int64_t C = lv.count();
    ASSERT_EQ(int64_t(lv.keys.size()), C * d);
    ASSERT_EQ(int64_t(lv.offsets.size()), C + 1);
    for (int64_t i = 0; i < C; ++i) {
      ASSERT_EQ(lv.sizes[i], st.sizes[i]) << "level " << l << " cluster " << i;
      ASSERT_EQ(lv.position_sums[i], st.position_sums[i]) << "level " << l << " cluster " << i;
      if (lv.sizes[i] > 0) {
        ASSERT_FLOAT_EQ(lv.log_sizes[i], std::log(float(lv.sizes[i])));
      } else {
        ASSERT_TRUE(std::isinf(lv.log_sizes[i]) && lv.log_sizes[i] < 0);
      }
      for (int j = 0; j < d; ++j) {
        ASSERT_NEAR(lv.keys[i * d + j], st.keys[i * d + j], 2e-5 * (1 + std::abs(st.keys[i * d + j])))
            << "level " << l << " cluster " << i << " channel " << j;
        ASSERT_NEAR(lv.values[i * d + j], st.values[i * d + j], 2e-5 * (1 + std::abs(st.values[i * d + j])))
            << "level " << l << " cluster " << i << " channel " << j;
      }
      ASSERT_EQ(lv.parents[i] >= 0, l + 1 < idx.num_levels());
      // Radius: the largest distance of a non-empty child's key centroid from this one.
      double want = 0;
      if (l > 0)
        for (int32_t ch : lv.members_of(i)) {
          const auto& below = idx.level(l - 1);
          if (below.sizes[ch] == 0) continue;
          double s = 0;
          for (int j = 0; j < d; ++j) {
            const double diff = double(below.keys[int64_t(ch) * d + j]) - lv.keys[i * d + j];
            s += diff * diff;
          }
          want = std::max(want, std::sqrt(s));
        }
      ASSERT_NEAR(lv.radii[i], want, 1e-4 * (1 + want)) << "level " << l << " cluster " << i;
    }
    // CSR lists: exactly the tokens (children) pointing at the cluster, ascending.
    std::vector<std::vector<int32_t>> want(static_cast<size_t>(C));
    if (l == 0) {
      for (int64_t p = idx.begin(); p < idx.end(); ++p) want[idx.labels()[p - idx.begin()]].push_back(int32_t(p));
    } else {
      const auto& below = idx.level(l - 1);
      for (int64_t ch = 0; ch < below.count(); ++ch) want[below.parents[ch]].push_back(int32_t(ch));
    }
    ASSERT_EQ(lv.offsets[0], 0);
    for (int64_t i = 0; i < C; ++i) {
      auto m = lv.members_of(i);
      ASSERT_EQ(std::vector<int32_t>(m.begin(), m.end()), want[i]) << "level " << l << " cluster " << i;
    }
  }
  // Blocks tile the region; each block's clusters are contiguous and own its tokens.
  int64_t pos = idx.begin();
  std::array<int32_t, 4> next{};
  const auto blocks = idx.blocks();
  for (size_t b = 0; b < blocks.size(); ++b) {
    const auto& blk = blocks[b];
    ASSERT_EQ(blk.begin, pos);
    ASSERT_GT(blk.end, blk.begin);
    ASSERT_EQ(blk.frozen, b + 1 < blocks.size());
    const int64_t n = blk.end - blk.begin;
    for (int l = 0; l < idx.num_levels(); ++l) {
      ASSERT_EQ(blk.first[l], next[l]);
      const int64_t k = blk.last[l] - blk.first[l];
      const int64_t tpc = c.cluster.tokens_per_centroid[size_t(l)];
      ASSERT_GE(k, 1);
      ASSERT_LE(k, (n + tpc - 1) / tpc) << "block " << b << " level " << l;
      next[l] = blk.last[l];
    }
    for (int64_t p = blk.begin; p < blk.end; ++p) {
      const int32_t lab = idx.labels()[p - idx.begin()];
      ASSERT_TRUE(lab >= blk.first[0] && lab < blk.last[0]);
    }
    for (int l = 0; l + 1 < idx.num_levels(); ++l)
      for (int32_t ch = blk.first[l]; ch < blk.last[l]; ++ch)
        ASSERT_TRUE(idx.level(l).parents[ch] >= blk.first[l + 1] && idx.level(l).parents[ch] < blk.last[l + 1]);
    pos = blk.end;
  }
  ASSERT_EQ(pos, idx.end());
  for (int l = 0; l < idx.num_levels(); ++l) ASSERT_EQ(next[l], idx.level(l).count());
}

TEST(ClusterIndex, PrefillStatisticsMatchMembership) {
  for (auto kind : {ref::KeyKind::Random, ref::KeyKind::Clustered, ref::KeyKind::Skewed})
    for (std::vector<int> tpc : {std::vector<int>{16}, std::vector<int>{4, 32}, std::vector<int>{2, 8, 32, 128}}) {
      const AttentionConfig c = small_config(64, tpc);
      ref::SyntheticKV data(c, DType::BF16, 2, 4096, kind, 5);
      const SeqId seq = data.add();
      data.append(seq, 1000);
      const Rope rope(c.rope);
      for (int h = 0; h < c.num_kv_heads; ++h) {
        ClusterIndex idx;
        idx.build(*data.cache, seq, 1, h, c.middle_end(1000), c, rope);
        EXPECT_EQ(idx.end(), c.middle_end(1000));
        expect_consistent(idx, *data.cache, seq, 1, h, c, "levels " + std::to_string(tpc.size()));
      }
    }
}

TEST(ClusterIndex, BlockRule) {
  // block 256, window 16, sinks 5: region lengths and the expected block lengths.
  const AttentionConfig c = small_config(16, {4, 16});
  ref::SyntheticKV data(c, DType::F32, 1, 4096, ref::KeyKind::Random, 6);
  const SeqId seq = data.add();
  data.append(seq, 1500);
  const Rope rope(c.rope);
  struct Case {
    int64_t region;
    std::vector<int64_t> blocks;
  };
  for (const Case& k : {Case{0, {}}, Case{16, {16}}, Case{255, {255}}, Case{256, {256}}, Case{380, {380}},
                        Case{384, {256, 128}}, Case{512, {256, 256}}, Case{1040, {256, 256, 256, 272}},
                        Case{1300, {256, 256, 256, 256, 276}}, Case{1408, {256, 256, 256, 256, 256, 128}}}) {
    ClusterIndex idx;
    idx.build(*data.cache, seq, 0, 0, c.cluster.sinks + k.region, c, rope);
    std::vector<int64_t> got;
    for (const auto& b : idx.blocks()) got.push_back(b.end - b.begin);
    EXPECT_EQ(got, k.blocks) << "region " << k.region;
    for (const auto& b : idx.blocks())
      EXPECT_EQ(b.last[0] - b.first[0], (b.end - b.begin + 3) / 4) << "region " << k.region;
  }
}

TEST(ClusterIndex, SameSeedSameIndexOtherSeedOtherClustering) {
  AttentionConfig c = small_config(32, {8, 32});
  ref::SyntheticKV data(c, DType::BF16, 1, 4096, ref::KeyKind::Random, 7);
  const SeqId seq = data.add();
  data.append(seq, 700);
  const Rope rope(c.rope);
  ClusterIndex a, b, other;
  a.build(*data.cache, seq, 0, 1, 600, c, rope);
  b.build(*data.cache, seq, 0, 1, 600, c, rope);
  c.cluster.seed = 12;
  other.build(*data.cache, seq, 0, 1, 600, c, rope);
  EXPECT_TRUE(std::equal(a.labels().begin(), a.labels().end(), b.labels().begin(), b.labels().end()));
  EXPECT_EQ(a.level(1).parents, b.level(1).parents);
  EXPECT_EQ(a.level(0).keys, b.level(0).keys);
  EXPECT_FALSE(std::equal(a.labels().begin(), a.labels().end(), other.labels().begin(), other.labels().end()));
  // Heads and sequences get their own streams too.
  ClusterIndex head0;
  c.cluster.seed = 11;
  head0.build(*data.cache, seq, 0, 0, 600, c, rope);
  EXPECT_NE(head0.level(0).keys, a.level(0).keys);
}

TEST(ClusterIndex, ClustersFollowStructure) {
  // 16 well separated centers, 64 clusters per block: k-means puts (nearly) each cluster on
  // one center, so the within-cluster spread is near the noise level, far below the data's.
  const AttentionConfig c = small_config(64, {4});
  ref::SyntheticKV data(c, DType::F32, 1, 4096, ref::KeyKind::Clustered, 8, 16);
  const SeqId seq = data.add();
  data.append(seq, 2000);
  const Rope rope(c.rope);
  ClusterIndex idx;
  idx.build(*data.cache, seq, 0, 0, c.middle_end(2000), c, rope);
  ref::SeqKV kv(*data.cache, seq, 0);
  const int d = c.head_dim;
  double within = 0, total = 0;
  std::vector<double> mean(d, 0.0);
  const int64_t n = idx.end() - idx.begin();
  std::vector<std::vector<double>> k0;
  for (int64_t p = idx.begin(); p < idx.end(); ++p) {
    k0.push_back(ref::rotated(rope, kv.key(0, p), d, -double(p)));
    for (int j = 0; j < d; ++j) mean[j] += k0.back()[j] / double(n);
  }
  for (int64_t t = 0; t < n; ++t) {
    const int32_t lab = idx.labels()[t];
    for (int j = 0; j < d; ++j) {
      within += std::pow(k0[t][j] - idx.level(0).keys[int64_t(lab) * d + j], 2);
      total += std::pow(k0[t][j] - mean[j], 2);
    }
  }
  EXPECT_LT(within, 0.05 * total);
}

// Snapshot of everything a frozen block owns.
struct FrozenSlice {
  std::vector<std::vector<float>> keys, values;
  std::vector<std::vector<int32_t>> sizes, parents, offsets, members;
  std::vector<std::vector<int64_t>> position_sums;
  std::vector<int32_t> labels;

  FrozenSlice(const ClusterIndex& idx) {
    const auto blocks = idx.blocks();
    int last_frozen = -1;
    for (size_t b = 0; b < blocks.size(); ++b)
      if (blocks[b].frozen) last_frozen = int(b);
    if (last_frozen < 0) return;
    const auto& fb = blocks[size_t(last_frozen)];
    const int d = idx.head_dim();
    for (int l = 0; l < idx.num_levels(); ++l) {
      const auto& lv = idx.level(l);
      const int32_t e = fb.last[l];
      keys.emplace_back(lv.keys.begin(), lv.keys.begin() + int64_t(e) * d);
      values.emplace_back(lv.values.begin(), lv.values.begin() + int64_t(e) * d);
      sizes.emplace_back(lv.sizes.begin(), lv.sizes.begin() + e);
      parents.emplace_back(lv.parents.begin(), lv.parents.begin() + e);
      offsets.emplace_back(lv.offsets.begin(), lv.offsets.begin() + e + 1);
      members.emplace_back(lv.members.begin(), lv.members.begin() + lv.offsets[e]);
      position_sums.emplace_back(lv.position_sums.begin(), lv.position_sums.begin() + e);
    }
    labels.assign(idx.labels().begin(), idx.labels().begin() + (fb.end - idx.begin()));
  }
  bool operator==(const FrozenSlice&) const = default;
};

TEST(ClusterIndex, OnlineUpdatesStayExactAndTouchOnlyTheOpenBlock) {
  // Tokens appended one by one with an update after each, through the policy; the index
  // must stay consistent, blocks freeze at block_size, frozen blocks never change.
  for (std::vector<int> tpc : {std::vector<int>{4, 32}, std::vector<int>{16}, std::vector<int>{2, 4, 16, 64}}) {
    AttentionConfig c = small_config(32, tpc, 128, 16);
    c.num_kv_heads = 1;
    c.num_q_heads = 2;
    ref::SyntheticKV data(c, DType::BF16, 1, 8192, ref::KeyKind::Clustered, 9);
    const SeqId seq = data.add();
    auto policy = make_attention_policy("multipole", c);
    ThreadPool pool(2);
    const int64_t prompt = 200, total = small_scale() ? 700 : 1100;
    data.append(seq, prompt);
    policy->update(*data.cache, 0, std::span<const SeqId>(&seq, 1), pool);
    int updates = 0, freezes = 0;
    size_t blocks_seen = find_cluster_index(*policy, seq, 0, 0)->blocks().size();
    for (int64_t len = prompt + 1; len <= total; ++len) {
      data.append(seq, 1);
      const ClusterIndex* idx = find_cluster_index(*policy, seq, 0, 0);
      ASSERT_NE(idx, nullptr);
      const FrozenSlice before(*idx);
      const int64_t end_before = idx->end();
      const std::vector<int32_t> labels_before(idx->labels().begin(), idx->labels().end());
      policy->update(*data.cache, 0, std::span<const SeqId>(&seq, 1), pool);
      idx = find_cluster_index(*policy, seq, 0, 0);
      ASSERT_EQ(idx->end(), c.middle_end(len));
      if (idx->end() == end_before) continue;
      ++updates;
      ASSERT_EQ(idx->end() - end_before, c.cluster.window);
      // Old tokens never move, in the open block either.
      ASSERT_TRUE(std::equal(labels_before.begin(), labels_before.end(), idx->labels().begin()));
      const FrozenSlice after_prefix = [&] {
        // The slice that was frozen before, read from the updated index.
        FrozenSlice s(*idx);
        if (before.labels.empty()) return s;
        const int d = idx->head_dim();
        for (int l = 0; l < idx->num_levels(); ++l) {
          const size_t e = before.sizes[size_t(l)].size();
          s.keys[size_t(l)].resize(e * d);
          s.values[size_t(l)].resize(e * d);
          s.sizes[size_t(l)].resize(e);
          s.parents[size_t(l)].resize(e);
          s.offsets[size_t(l)].resize(e + 1);
          s.members[size_t(l)].resize(before.members[size_t(l)].size());
          s.position_sums[size_t(l)].resize(e);
        }
        s.labels.resize(before.labels.size());
        return s;
      }();
      ASSERT_TRUE(before.labels.empty() || after_prefix == before) << "frozen block changed at length " << len;
      if (idx->blocks().size() != blocks_seen) {
        ++freezes;
        // The previous open block reached block_size before it froze.
        const auto& fb = idx->blocks()[idx->blocks().size() - 2];
        ASSERT_GE(fb.end - fb.begin, c.cluster.block_size);
        ASSERT_EQ(idx->blocks().back().end - idx->blocks().back().begin, c.cluster.window);
        blocks_seen = idx->blocks().size();
      }
      if (updates % 7 == 0) expect_consistent(*idx, *data.cache, seq, 0, 0, c, "after update " + std::to_string(updates));
    }
    EXPECT_GE(freezes, 2);
    expect_consistent(*find_cluster_index(*policy, seq, 0, 0), *data.cache, seq, 0, 0, c, "final");
  }
}

TEST(ClusterIndex, OneLateUpdateEqualsOneUpdatePerWindow) {
  // Absorbing several windows at once runs the same per-window steps with the same seeds.
  AttentionConfig c = small_config(32, {4, 16}, 128, 16);
  ref::SyntheticKV data(c, DType::BF16, 1, 4096, ref::KeyKind::Clustered, 12);
  const SeqId seq = data.add();
  data.append(seq, 300);
  const Rope rope(c.rope);
  ClusterIndex each, late;
  each.build(*data.cache, seq, 0, 1, c.middle_end(300), c, rope);
  late.build(*data.cache, seq, 0, 1, c.middle_end(300), c, rope);
  for (int i = 0; i < 20; ++i) {
    data.append(seq, 16);
    each.append(*data.cache, seq, 0, 1, c.middle_end(data.cache->length(seq)), c, rope);
  }
  late.append(*data.cache, seq, 0, 1, c.middle_end(data.cache->length(seq)), c, rope);
  EXPECT_EQ(late.end(), each.end());
  EXPECT_TRUE(std::equal(late.labels().begin(), late.labels().end(), each.labels().begin(), each.labels().end()));
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(late.level(l).keys, each.level(l).keys);
    EXPECT_EQ(late.level(l).parents, each.level(l).parents);
    EXPECT_EQ(late.level(l).members, each.level(l).members);
  }
  expect_consistent(late, *data.cache, seq, 0, 1, c, "late");
}

TEST(ClusterIndex, DuplicateKeysLeaveEmptyClustersButStayConsistent) {
  AttentionConfig c = small_config(16, {4, 16}, 128, 16);
  c.num_kv_heads = 1;
  c.num_q_heads = 1;
  PagedKVCache cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = 1, .head_dim = 16, .page_size = 16,
                                   .dtype = DType::F32, .max_tokens = 2048});
  const SeqId seq = cache.add_sequence();
  const Rope rope(c.rope);
  auto write = [&](int64_t n) {
    std::vector<float> k(size_t(n) * 16, 0.25f), v(size_t(n) * 16, -1.0f);
    const int64_t pos = cache.extend(seq, n);
    for (int64_t t = 0; t < n; ++t) rope.apply(k.data() + t * 16, double(pos + t));
    cache.write(seq, 0, pos, n, k.data(), v.data());
  };
  write(300);
  ClusterIndex idx;
  idx.build(cache, seq, 0, 0, c.middle_end(300), c, rope);
  expect_consistent(idx, cache, seq, 0, 0, c, "prefill");
  for (int i = 0; i < 10; ++i) {
    write(16);
    idx.append(cache, seq, 0, 0, c.middle_end(cache.length(seq)), c, rope);
  }
  expect_consistent(idx, cache, seq, 0, 0, c, "online");
}

TEST(ClusterIndex, DefaultBlocksPastTheBoundary) {
  // Default config (block 8192, {16, 128}, window 128) on a region of 2 blocks + updates.
  AttentionConfig c = ref::attention_config(1, 64, 1);
  const int64_t len = small_scale() ? 10 + 8192 + 4096 + 128 : 10 + 8192 + 6000 + 200;
  ref::SyntheticKV data(c, DType::BF16, 1, len + 1024, ref::KeyKind::Clustered, 10, 200);
  const SeqId seq = data.add();
  data.append(seq, len);
  const Rope rope(c.rope);
  ClusterIndex idx;
  idx.build(*data.cache, seq, 0, 0, c.middle_end(len), c, rope);
  ASSERT_EQ(idx.blocks().size(), 2u);
  EXPECT_EQ(idx.blocks()[0].end - idx.blocks()[0].begin, 8192);
  EXPECT_EQ(idx.level(0).count(), (8192 / 16) + (idx.end() - idx.blocks()[1].begin + 15) / 16);
  data.append(seq, 256);
  idx.append(*data.cache, seq, 0, 0, c.middle_end(len + 256), c, rope);
  expect_consistent(idx, *data.cache, seq, 0, 0, c, "default config");
  // About 1/16 of the keys and values in f32, 8 bytes of membership per token, the open
  // block's f64 sums and one block of spare room: well under a third of an f32 KV copy.
  const double kv_f32 = double(idx.end() - idx.begin()) * c.head_dim * 8;
  EXPECT_LT(idx.memory_bytes(), 0.33 * kv_f32);
  EXPECT_GT(idx.memory_bytes(), kv_f32 / 16);
}

TEST(ClusterIndex, RejectsMisuse) {
  const AttentionConfig c = small_config(16, {4});
  ref::SyntheticKV data(c, DType::F32, 1, 1024, ref::KeyKind::Random, 1);
  const SeqId seq = data.add();
  data.append(seq, 100);
  const Rope rope(c.rope);
  ClusterIndex idx;
  EXPECT_THROW(idx.append(*data.cache, seq, 0, 0, 50, c, rope), Error);  // before build
  EXPECT_THROW(idx.build(*data.cache, seq, 0, 0, 101, c, rope), Error);  // past the sequence
  idx.build(*data.cache, seq, 0, 0, 53, c, rope);
  EXPECT_THROW(idx.append(*data.cache, seq, 0, 0, 40, c, rope), Error);  // backwards
}

}  // namespace
