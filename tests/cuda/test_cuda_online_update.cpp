// GPU online update of the cluster index (DeviceKMeans::append) against the CPU's
// ClusterIndex::append: after a prefill (the CPU index uploaded, or the GPU prefill) and
// several updates of W tokens (one chunk at a time, then several chunks and a partial one
// in one call): sizes and key/value centroids are exact statistics of the final membership,
// every clustered token is in one fine cluster and every fine cluster under one coarse
// cluster, frozen blocks are untouched byte for byte, quality and membership are close to
// the CPU update started from the same state, two runs are bit-identical, and the updated
// index decodes like the same statistics uploaded from the host; the position sums that the far
// field at real positions reads follow the member lists. Skips without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "kmeans_test_util.hpp"

using namespace multipole;
using namespace multipole::cuda;
using namespace multipole::test;

namespace {

constexpr int kUpdates = 5;
// Value centroids are stored in the cache's dtype (bf16 or f16): checked to bf16's rounding.
constexpr double kBf16Tol = 1.0 / 256;

// New ends of every update: kUpdates single chunks, then one call of 2 W + 37 tokens.
std::vector<std::vector<int64_t>> update_ends(const KmSetup& s) {
  const int64_t W = s.ac.cluster.window;
  std::vector<std::vector<int64_t>> out;
  std::vector<int64_t> e = s.ends;
  for (int u = 0; u <= kUpdates; ++u) {
    for (size_t b = 0; b < e.size(); ++b)
      e[b] = std::min(s.cpu.length(s.seqs[b]), e[b] + (u < kUpdates ? W : 2 * W + 37));
    out.push_back(e);
  }
  return out;
}

// Fine and coarse clusters and tokens of the blocks frozen in `cpu` (all but the last).
struct Frozen {
  int fine = 0, coarse = 0;
  int64_t end = 0;  // positions before it
};
Frozen frozen_part(const ClusterIndex& cpu) {
  Frozen f;
  f.end = cpu.begin();
  if (cpu.blocks().size() < 2) return f;
  const ClusterBlock& last = cpu.blocks().back();
  f.fine = last.first[0];
  f.coarse = cpu.num_levels() == 2 ? last.first[1] : 0;
  f.end = last.begin;
  return f;
}

// The frozen part of an entry, byte for byte (f32 copies of the stored centroids compare
// exactly when the stored bits are equal).
void expect_frozen_equal(const HostClusterLevel& before, const HostClusterLevel& after, const Frozen& fz, int D, int e) {
  for (int c = 0; c < fz.fine; ++c) {
    ASSERT_EQ(before.sizes[size_t(c)], after.sizes[size_t(c)]) << "entry " << e << " frozen fine " << c;
    for (int j = 0; j < D; ++j) {
      ASSERT_EQ(before.key_centroids[size_t(c) * D + j], after.key_centroids[size_t(c) * D + j]) << "entry " << e;
      ASSERT_EQ(before.value_centroids[size_t(c) * D + j], after.value_centroids[size_t(c) * D + j]) << "entry " << e;
    }
    for (int m = before.member_offsets[size_t(c)]; m < before.member_offsets[size_t(c) + 1]; ++m)
      ASSERT_EQ(before.members[size_t(m)],
                after.members[size_t(after.member_offsets[size_t(c)] + m - before.member_offsets[size_t(c)])]);
  }
  for (int c = 0; c < fz.coarse; ++c) {
    ASSERT_EQ(before.coarse_sizes[size_t(c)], after.coarse_sizes[size_t(c)]) << "entry " << e << " frozen coarse " << c;
    ASSERT_EQ(before.coarse_child_offsets[size_t(c) + 1], after.coarse_child_offsets[size_t(c) + 1]);
    for (int j = 0; j < D; ++j)
      ASSERT_EQ(before.coarse_key_centroids[size_t(c) * D + j], after.coarse_key_centroids[size_t(c) * D + j]);
  }
  for (int k = 0; k < (fz.coarse > 0 ? before.coarse_child_offsets[size_t(fz.coarse)] : 0); ++k)
    ASSERT_EQ(before.coarse_children[size_t(k)], after.coarse_children[size_t(k)]);
}

// Level-0 cluster of every clustered position.
std::vector<int> labels_of(const HostClusterLevel& x) {
  std::vector<int> l(size_t(std::max<int64_t>(0, x.clustered_end)), -1);
  for (int c = 0; c < x.num_clusters(); ++c)
    for (int m = x.member_offsets[size_t(c)]; m < x.member_offsets[size_t(c) + 1]; ++m) l[size_t(x.members[size_t(m)])] = c;
  return l;
}

// Inertia of the tokens at or after `from`.
double inertia_from(const HostClusterLevel& x, const std::vector<float>& k0, int D, int64_t from) {
  double s = 0;
  for (int c = 0; c < x.num_clusters(); ++c)
    for (int m = x.member_offsets[size_t(c)]; m < x.member_offsets[size_t(c) + 1]; ++m)
      if (x.members[size_t(m)] >= from)
        s += dist2(k0.data() + size_t(x.members[size_t(m)]) * D, x.key_centroids.data() + size_t(c) * D, D);
  return s;
}

// The CPU index uploaded, then the same updates on both sides.
void run_from_cpu_state(const Case& c, double min_agree) {
  SCOPED_TRACE(::testing::Message() << "D=" << c.D << " levels=" << c.tpc.size() << " block=" << c.block);
  const int W = 128;
  KmSetup s(c, (kUpdates + 3) * W);
  const Rope rope(s.ac.rope);
  const int D = c.D, Hkv = c.Hkv;
  std::vector<ClusterIndex> cpu(s.seqs.size() * size_t(Hkv));
  std::vector<const ClusterIndex*> ptrs;
  for (size_t b = 0; b < s.seqs.size(); ++b)
    for (int h = 0; h < Hkv; ++h) {
      cpu[b * Hkv + h].build(s.cpu, s.seqs[b], 0, h, s.ends[b], s.ac, rope);
      ptrs.push_back(&cpu[b * Hkv + h]);
    }
  std::vector<Frozen> fz;
  for (const auto& x : cpu) fz.push_back(frozen_part(x));
  DeviceKMeans km;
  km.load(s.dev, 0, s.seqs, ptrs, s.ac, rope, DType::F32, (kUpdates + 3) * W);
  std::vector<HostClusterLevel> before;
  for (int e = 0; e < km.entries(); ++e) before.push_back(km.download_index(e));
  for (const auto& ends : update_ends(s)) {
    for (size_t b = 0; b < s.seqs.size(); ++b)
      for (int h = 0; h < Hkv; ++h) cpu[b * Hkv + h].append(s.cpu, s.seqs[b], 0, h, ends[b], s.ac, rope);
    km.append(s.dev, ends, s.ac, nullptr);
  }
  synchronize();
  double gi_all = 0, ci_all = 0;
  int64_t agree = 0, total = 0;
  for (size_t b = 0; b < s.seqs.size(); ++b)
    for (int h = 0; h < Hkv; ++h) {
      const int e = int(b) * Hkv + h;
      const HostClusterLevel got = km.download_index(e), want = host_cluster_level(cpu[size_t(e)]);
      ASSERT_EQ(got.clustered_end, want.clustered_end) << "entry " << e;
      ASSERT_EQ(got.num_clusters(), want.num_clusters()) << "entry " << e;
      ASSERT_EQ(got.num_coarse(), want.num_coarse()) << "entry " << e;
      std::vector<float> k0, v;
      host_rows(s, b, h, k0, v);
      check_invariants(got, k0, v, D, s.ac.cluster.sinks, e, kBf16Tol);
      if (::testing::Test::HasFatalFailure()) return;
      expect_frozen_equal(before[size_t(e)], got, fz[size_t(e)], D, e);
      if (::testing::Test::HasFatalFailure()) return;
      const double gi = inertia_from(got, k0, D, fz[size_t(e)].end), ci = inertia_from(want, k0, D, fz[size_t(e)].end);
      gi_all += gi;
      ci_all += ci;
      EXPECT_LE(gi, 1.03 * ci + 1e-6) << "entry " << e << ": GPU inertia " << gi << " vs CPU " << ci;
      const std::vector<int> lg = labels_of(got), lc = labels_of(want);
      for (int64_t p = s.ends[b]; p < got.clustered_end; ++p) {
        agree += lg[size_t(p)] == lc[size_t(p)];
        ++total;
      }
    }
  const double share = total ? double(agree) / double(total) : 1.0;
  std::printf("[ online ] D=%d levels=%zu block=%d: updated-region inertia GPU/CPU = %.5f; new tokens in the same "
              "cluster as the CPU's: %lld / %lld (%.4f)\n",
              D, c.tpc.size(), c.block, ci_all > 0 ? gi_all / ci_all : 1.0, (long long)agree, (long long)total, share);
  EXPECT_LE(gi_all, 1.01 * ci_all + 1e-6);
  EXPECT_GE(share, min_agree);
}

TEST(CudaOnlineUpdate, MatchesCpuUpdateD128TwoLevels) {
  REQUIRE_GPU();
  Case c;
  c.block = 512;  // the open block fills up and freezes during the updates
  c.lengths = {3001, 2200, 1500};
  c.seed = 21;
  run_from_cpu_state(c, 0.97);
}

TEST(CudaOnlineUpdate, MatchesCpuUpdateD64OneLevel) {
  REQUIRE_GPU();
  Case c;
  c.D = 64;
  c.tpc = {16};
  c.block = 1024;
  c.lengths = {2900, 1700};
  c.seed = 22;
  run_from_cpu_state(c, 0.97);
}

TEST(CudaOnlineUpdate, MatchesCpuUpdateD64TwoLevelsOddRates) {
  REQUIRE_GPU();
  Case c;
  c.D = 64;
  c.tpc = {8, 64};
  c.block = 512;
  c.lengths = {2500, 1900, 1300};
  c.seed = 23;
  run_from_cpu_state(c, 0.97);
}

// An f16 cache: the update keeps the chunk's values as the cache's 16-bit bits and converts
// them by the cache's dtype.
TEST(CudaOnlineUpdate, MatchesCpuUpdateF16Cache) {
  REQUIRE_GPU();
  Case c;
  c.dtype = DType::F16;
  c.block = 512;
  c.lengths = {2600, 1700};
  c.seed = 24;
  run_from_cpu_state(c, 0.97);
}

// The updated index and its statistics uploaded from the host decode alike (s.ac's policy).
// Placeholder coarse slots change the scoring grid, hence the normaliser's summation order:
// equal up to f32 rounding.
void expect_decodes_like_its_upload(const KmSetup& s, const DeviceClusterIndex& updated,
                                    const DeviceClusterIndex& uploaded, uint32_t seed, const char* what) {
  const DeviceClusterIndex* both[] = {&updated, &uploaded};
  const auto outs = decode_outputs(s, both, seed);
  double worst = 0;
  for (size_t i = 0; i < outs[0].size(); ++i) {
    ASSERT_TRUE(std::isfinite(outs[0][i])) << i;
    worst = std::max(worst, double(std::abs(outs[0][i] - outs[1][i])));
  }
  std::printf("[ online ] decode on the updated index vs its upload%s: max |diff| %.3g\n", what, worst);
  EXPECT_LE(worst, 1e-4);
}

// GPU prefill with room, then the updates: invariants, frozen blocks, determinism, and the
// updated index decoding like its statistics uploaded from the host. The update runs on
// `split` CTAs per entry, and again on one: the same index, bit for bit.
void run_after_gpu_prefill(const Case& c, DType key_dtype, bool decode, int split) {
  SCOPED_TRACE(::testing::Message() << "D=" << c.D << " levels=" << c.tpc.size() << " zero_share=" << c.zero_share);
  const int W = 128;
  KmSetup s(c, (kUpdates + 3) * W);
  const Rope rope(s.ac.rope);
  const int D = c.D;
  auto run = [&](DeviceKMeans& km) {
    km.build(s.dev, 0, s.seqs, s.ends, s.ac, rope, key_dtype, nullptr, (kUpdates + 3) * W);
    std::vector<HostClusterLevel> before;
    for (int e = 0; e < km.entries(); ++e) before.push_back(km.download_index(e));
    for (const auto& ends : update_ends(s)) km.append(s.dev, ends, s.ac, nullptr);
    synchronize();
    return before;
  };
  DeviceKMeans km, again;
  km.set_update_split(split);
  again.set_update_split(1);
  const std::vector<HostClusterLevel> before = run(km);
  run(again);
  for (size_t b = 0; b < s.seqs.size(); ++b)
    for (int h = 0; h < c.Hkv; ++h) {
      const int e = int(b) * c.Hkv + h;
      const HostClusterLevel got = km.download_index(e), twice = again.download_index(e);
      std::vector<float> k0, v;
      host_rows(s, b, h, k0, v);
      if (key_dtype == DType::F32) check_invariants(got, k0, v, D, s.ac.cluster.sinks, e, kBf16Tol);
      if (::testing::Test::HasFatalFailure()) return;
      // The blocks frozen before the updates, from the block rule of the prefill.
      ClusterIndex shape;
      shape.build(s.cpu, s.seqs[b], 0, h, s.ends[b], s.ac, rope);
      Frozen fz = frozen_part(shape);
      if (c.zero_share > 0) fz.coarse = 0;  // the GPU keeps empty surplus coarse clusters: other ids
      expect_frozen_equal(before[size_t(e)], got, fz, D, e);
      EXPECT_EQ(got.members, twice.members) << "entry " << e;
      EXPECT_EQ(got.key_centroids, twice.key_centroids) << "entry " << e;
      EXPECT_EQ(got.value_centroids, twice.value_centroids) << "entry " << e;
      EXPECT_EQ(got.coarse_children, twice.coarse_children) << "entry " << e;
      EXPECT_EQ(got.coarse_key_centroids, twice.coarse_key_centroids) << "entry " << e;
    }
  if (!decode) return;
  km.sync_index();
  std::vector<HostClusterLevel> host;
  for (int e = 0; e < km.entries(); ++e) {
    host.push_back(km.download_index(e));
    EXPECT_EQ(km.index().entry_clustered_end(e), host.back().clustered_end);
    EXPECT_EQ(km.index().entry_clusters(e) - km.index().entry_coarse(e), host.back().num_clusters());
  }
  DeviceClusterIndex uploaded(D, c.Hkv, key_dtype, s.kc.dtype, host);
  expect_decodes_like_its_upload(s, km.index(), uploaded, 19, "");
}

TEST(CudaOnlineUpdate, AfterGpuPrefillD128) {
  REQUIRE_GPU();
  Case c;
  c.block = 512;
  c.lengths = {3001, 1800, 700};
  c.seed = 31;
  run_after_gpu_prefill(c, DType::F32, false, 4);
}

TEST(CudaOnlineUpdate, DuplicateKeys) {
  REQUIRE_GPU();
  Case c;
  c.D = 64;
  c.zero_share = 0.6;
  c.block = 512;
  c.lengths = {2100, 1400};
  c.seed = 32;
  run_after_gpu_prefill(c, DType::F32, false, 3);
}

TEST(CudaOnlineUpdate, UpdatedIndexFeedsMultipoleDecode) {
  REQUIRE_GPU();
  Case c;
  c.lengths = {4100, 2600};
  c.seed = 33;
  run_after_gpu_prefill(c, DType::BF16, true, 2);
}

// The position sums of entry e against its lists as downloaded (position_sums(), checked against
// the CPU index's by test_cuda_cluster_index.cpp): the used coarse slots, then the fine ones past
// the entry's coarse capacity.
void expect_position_sums(const DeviceClusterIndex& index, const HostClusterLevel& x, int e) {
  const int cap = index.entry_coarse(e), Cc = x.num_coarse();
  std::vector<int64_t> got(size_t(cap + x.num_clusters()));
  ASSERT_EQ(cudaMemcpy(got.data(), index.view().position_sums + index.entry_first_cluster(e), got.size() * 8,
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  const std::vector<int64_t> want = position_sums(x);
  for (int p = 0; p < Cc; ++p) ASSERT_EQ(got[size_t(p)], want[size_t(p)]) << "entry " << e << " coarse cluster " << p;
  for (int c = 0; c < x.num_clusters(); ++c)
    ASSERT_EQ(got[size_t(cap + c)], want[size_t(Cc + c)]) << "entry " << e << " fine cluster " << c;
}

// With the far field at real positions in its config, the GPU prefill and every update leave
// the index's position sums equal to its lists' (and the host upload computes the same); the
// updated index then decodes like its upload through that far field. An update under a config
// without it leaves the sums stale, and the decoder refuses them. from_nothing: the build finds
// nothing to cluster yet (a prompt shorter than sinks + window, as eval's short prefixes), so
// the updates make the whole index.
void keeps_position_sums(bool from_nothing) {
  SCOPED_TRACE(from_nothing ? "built from nothing" : "built from a prefill");
  Case c;
  c.block = 512;
  c.lengths = {3001, 1800, from_nothing ? 1400 : 700};  // (from nothing: the updates' ends stay in the middle)
  c.seed = 34;
  const int W = 128;
  KmSetup s(c, (kUpdates + 4) * W);
  s.ac.far_field_real_positions = true;
  if (from_nothing)
    for (int64_t& end : s.ends) end = s.ac.clustered_end(16);
  const Rope rope(s.ac.rope);
  DeviceKMeans km;
  km.build(s.dev, 0, s.seqs, s.ends, s.ac, rope, DType::BF16, nullptr, (kUpdates + 4) * W);
  synchronize();
  ASSERT_TRUE(km.index().has_position_sums());
  for (int e = 0; e < km.entries(); ++e) {
    SCOPED_TRACE("after the prefill");
    expect_position_sums(km.index(), km.download_index(e), e);
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (const auto& ends : update_ends(s)) {
    km.append(s.dev, ends, s.ac, nullptr);
    ASSERT_TRUE(km.index().has_position_sums());
    for (int e = 0; e < km.entries(); ++e) {
      SCOPED_TRACE(::testing::Message() << "after the update to " << ends[0]);
      expect_position_sums(km.index(), km.download_index(e), e);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
  km.sync_index();
  std::vector<HostClusterLevel> host;
  for (int e = 0; e < km.entries(); ++e) host.push_back(km.download_index(e));
  if (from_nothing) {
    ASSERT_GT(host[0].num_clusters(), 0) << "the updates clustered nothing";
  }
  DeviceClusterIndex uploaded(c.D, c.Hkv, DType::BF16, s.kc.dtype, host);
  ASSERT_TRUE(uploaded.has_position_sums());
  for (int e = 0; e < uploaded.entries(); ++e) {
    SCOPED_TRACE("uploaded from the host");
    expect_position_sums(uploaded, host[size_t(e)], e);
    if (::testing::Test::HasFatalFailure()) return;
  }
  expect_decodes_like_its_upload(s, km.index(), uploaded, 20, " (far field at real positions)");

  AttentionConfig fixed = s.ac;
  fixed.far_field_real_positions = false;
  std::vector<int64_t> ends = update_ends(s).back();
  for (size_t b = 0; b < ends.size(); ++b) ends[b] = std::min(s.cpu.length(s.seqs[b]), ends[b] + W);
  km.append(s.dev, ends, fixed, nullptr);
  EXPECT_FALSE(km.index().has_position_sums());
  km.sync_index();
  CudaDecoder dec(s.ac);
  EXPECT_ANY_THROW(dec.plan(s.dev, s.seqs, &km.index()));
}

TEST(CudaOnlineUpdate, KeepsPositionSumsForTheFarFieldAtRealPositions) {
  REQUIRE_GPU();
  keeps_position_sums(false);
}

TEST(CudaOnlineUpdate, KeepsPositionSumsFromAnIndexBuiltFromNothing) {
  REQUIRE_GPU();
  keeps_position_sums(true);
}

}  // namespace
