#pragma once
// Shared by the GPU k-means tests (test_cuda_kmeans.cpp, test_cuda_online_update.cpp): a
// clustered synthetic KV cache on host and device, the clustering keys of its tokens, and
// the exact invariants of an index entry.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "attention/multipole_policy.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/cuda/decode.hpp"
#include "multipole/cuda/kmeans.hpp"

namespace multipole::test {

using namespace multipole::cuda;

#define REQUIRE_GPU() \
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device"

struct Case {
  int Hkv = 2, D = 128;
  std::vector<int> tpc = {16, 128};
  int block = 1024;
  std::vector<int64_t> lengths;
  double zero_share = 0.0;  // share of tokens whose key is exactly 0 (duplicates: empty clusters)
  uint32_t seed = 1;
  DType dtype = DType::BF16;  // KV cache
};

// Keys drawn around a few centres with skewed (Zipf-like) popularity in the position-0
// space, then rotated to their positions as a model's cache holds them; values N(0, 1).
struct KmSetup {
  AttentionConfig ac;
  KVCacheConfig kc;
  PagedKVCache cpu;
  std::vector<SeqId> seqs;
  std::vector<int64_t> ends;
  DeviceKVCache dev;

  static KVCacheConfig cache_config(const Case& c) {
    KVCacheConfig kc;
    kc.num_layers = 1;
    kc.num_kv_heads = c.Hkv;
    kc.head_dim = c.D;
    kc.page_size = 16;
    kc.dtype = c.dtype;
    kc.max_tokens = std::accumulate(c.lengths.begin(), c.lengths.end(), int64_t(0)) + 64 * int64_t(c.lengths.size());
    return kc;
  }
  // end_back: the index ends at middle_end(length - end_back) (room for online updates).
  explicit KmSetup(const Case& c, int64_t end_back = 0) : kc(cache_config(c)), cpu(kc), dev(kc, 16) {
    ac.num_kv_heads = c.Hkv;
    ac.num_q_heads = 4 * c.Hkv;
    ac.head_dim = c.D;
    ac.rope.head_dim = c.D;
    ac.cluster.tokens_per_centroid = c.tpc;
    ac.cluster.block_size = c.block;
    ac.cluster.seed = 1234 + c.seed;
    std::mt19937 rng(c.seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const Rope rope(ac.rope);
    for (int64_t n : c.lengths) {
      const SeqId s = cpu.add_sequence();
      seqs.push_back(s);
      cpu.extend(s, n);
      ends.push_back(ac.middle_end(std::max<int64_t>(0, n - end_back)));
      const int centres = 24;
      std::vector<float> centre(size_t(centres) * c.D);
      for (auto& x : centre) x = 2.0f * nd(rng);
      std::vector<double> cdf(centres);
      double acc = 0;
      for (int j = 0; j < centres; ++j) cdf[size_t(j)] = acc += 1.0 / std::pow(j + 1.0, 1.3);
      std::uniform_real_distribution<double> u(0.0, acc);
      std::uniform_real_distribution<double> u01(0.0, 1.0);
      std::vector<float> k(size_t(n) * c.Hkv * c.D), v(k.size());
      for (int64_t t = 0; t < n; ++t)
        for (int h = 0; h < c.Hkv; ++h) {
          float* kr = k.data() + (size_t(t) * c.Hkv + h) * c.D;
          if (u01(rng) < c.zero_share) {
            std::fill(kr, kr + c.D, 0.0f);
          } else {
            const int j = int(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
            for (int i = 0; i < c.D; ++i) kr[i] = centre[size_t(std::min(j, centres - 1)) * c.D + i] + 0.4f * nd(rng);
            rope.rotate_by(kr, double(t));
          }
          float* vr = v.data() + (size_t(t) * c.Hkv + h) * c.D;
          for (int i = 0; i < c.D; ++i) vr[i] = nd(rng);
        }
      if (n) cpu.write(s, 0, 0, n, k.data(), v.data());
    }
    dev.upload(cpu);
  }
};

// Clustering keys (cached keys rotated back to position 0) and values of [0, end).
inline void host_rows(const KmSetup& s, size_t b, int h, std::vector<float>& k0, std::vector<float>& v) {
  const int64_t n = s.cpu.length(s.seqs[b]);
  const int D = s.kc.head_dim;
  k0.assign(size_t(n) * D, 0.0f);
  v.assign(size_t(n) * D, 0.0f);
  if (n == 0) return;
  s.cpu.read_keys(s.seqs[b], 0, h, 0, n, k0.data());
  unrotate_consecutive(Rope(s.ac.rope), k0.data(), n, 0);
  s.cpu.read_values(s.seqs[b], 0, h, 0, n, v.data());
}

inline double dist2(const float* x, const float* c, int D) {
  double s = 0;
  for (int j = 0; j < D; ++j) s += (double(x[j]) - c[j]) * (double(x[j]) - c[j]);
  return s;
}

inline double inertia_of(const HostClusterLevel& x, const std::vector<float>& k0, int D) {
  double s = 0;
  for (int c = 0; c < x.num_clusters(); ++c)
    for (int m = x.member_offsets[size_t(c)]; m < x.member_offsets[size_t(c) + 1]; ++m)
      s += dist2(k0.data() + size_t(x.members[size_t(m)]) * D, x.key_centroids.data() + size_t(c) * D, D);
  return s;
}

inline void expect_close(double got, double want, double tol, const char* what, int e, int c) {
  EXPECT_LE(std::abs(got - want), tol * (1.0 + std::abs(want))) << what << " entry " << e << " cluster " << c;
}

// Exact invariants of one entry of the device result.
// value_tol: value centroids read back from the index are rounded to the KV dtype (bf16:
// 2^-9 relative) where DeviceKMeans::download() gives the f32 ones.
inline void check_invariants(const HostClusterLevel& x, const std::vector<float>& k0, const std::vector<float>& v, int D,
                             int64_t sinks, int e, double value_tol = 2e-5) {
  const int C = x.num_clusters();
  std::vector<int> seen(size_t(std::max<int64_t>(x.clustered_end, 0)), 0);
  for (int c = 0; c < C; ++c) {
    const int m0 = x.member_offsets[size_t(c)], m1 = x.member_offsets[size_t(c) + 1];
    ASSERT_EQ(x.sizes[size_t(c)], m1 - m0) << "entry " << e << " cluster " << c;
    std::vector<double> ks(size_t(D), 0.0), vs(size_t(D), 0.0);
    for (int m = m0; m < m1; ++m) {
      const int p = x.members[size_t(m)];
      ASSERT_TRUE(p >= sinks && p < x.clustered_end) << "entry " << e << " member " << p;
      if (m > m0) {
        EXPECT_LT(x.members[size_t(m) - 1], p) << "members not ascending, entry " << e;
      }
      ++seen[size_t(p)];
      for (int j = 0; j < D; ++j) {
        ks[size_t(j)] += k0[size_t(p) * D + j];
        vs[size_t(j)] += v[size_t(p) * D + j];
      }
    }
    const double inv = m1 > m0 ? 1.0 / (m1 - m0) : 0.0;
    for (int j = 0; j < D; ++j) {
      expect_close(x.key_centroids[size_t(c) * D + j], ks[size_t(j)] * inv, 2e-5, "key centroid", e, c);
      expect_close(x.value_centroids[size_t(c) * D + j], vs[size_t(j)] * inv, value_tol, "value centroid", e, c);
    }
  }
  for (int64_t p = sinks; p < x.clustered_end; ++p) ASSERT_EQ(seen[size_t(p)], 1) << "entry " << e << " token " << p;
  // Level 1: every fine cluster under exactly one coarse cluster; sizes and centroids are the
  // size-weighted statistics of the children.
  if (x.num_coarse() == 0) return;
  std::vector<int> parent(size_t(C), 0);
  for (int i = 0; i < x.num_coarse(); ++i) {
    int64_t size = 0;
    std::vector<double> ks(size_t(D), 0.0), vs(size_t(D), 0.0);
    for (int m = x.coarse_child_offsets[size_t(i)]; m < x.coarse_child_offsets[size_t(i) + 1]; ++m) {
      const int c = x.coarse_children[size_t(m)];
      ASSERT_TRUE(c >= 0 && c < C);
      ++parent[size_t(c)];
      size += x.sizes[size_t(c)];
      for (int j = 0; j < D; ++j) {
        ks[size_t(j)] += double(x.sizes[size_t(c)]) * x.key_centroids[size_t(c) * D + j];
        vs[size_t(j)] += double(x.sizes[size_t(c)]) * x.value_centroids[size_t(c) * D + j];
      }
    }
    ASSERT_EQ(x.coarse_sizes[size_t(i)], size) << "entry " << e << " coarse " << i;
    const double inv = size > 0 ? 1.0 / double(size) : 0.0;
    for (int j = 0; j < D; ++j) {
      expect_close(x.coarse_key_centroids[size_t(i) * D + j], ks[size_t(j)] * inv, 2e-5, "coarse key", e, i);
      expect_close(x.coarse_value_centroids[size_t(i) * D + j], vs[size_t(j)] * inv, value_tol, "coarse value", e, i);
    }
  }
  for (int c = 0; c < C; ++c) EXPECT_EQ(parent[size_t(c)], 1) << "entry " << e << " fine cluster " << c;
}

// One multipole decode step of the batch with random queries (seeded) on each index; the
// outputs [B, Hq, D] per index.
inline std::vector<std::vector<float>> decode_outputs(const KmSetup& s, std::span<const DeviceClusterIndex* const> indexes,
                                                      uint32_t seed) {
  const int B = int(s.seqs.size()), Hq = s.ac.num_q_heads, D = s.kc.head_dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(size_t(B) * Hq * D);
  for (auto& x : q) x = nd(rng);
  DeviceBuffer dq(q.size() * 4), dout(q.size() * 4);
  dq.upload(q.data(), q.size() * 4);
  std::vector<std::vector<float>> outs;
  for (const DeviceClusterIndex* idx : indexes) {
    CudaDecoder dec(s.ac);
    dec.plan(s.dev, s.seqs, idx);
    dout.memset(0xff);
    synchronize();
    dec.multipole(s.dev, 0, *idx, dq.as<float>(), dq.as<float>(), dout.as<float>(), nullptr);
    synchronize();
    outs.emplace_back(q.size());
    dout.download(outs.back().data(), q.size() * 4);
    EXPECT_EQ(dec.error_flags(), 0u);
  }
  return outs;
}

}  // namespace multipole::test
