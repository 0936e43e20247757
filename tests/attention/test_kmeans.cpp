// k-means pieces (kmeans.hpp) against naive float64 computations.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "attention/kmeans.hpp"
#include "multipole/core/error.hpp"
#include "reference_multipole.hpp"

using namespace multipole;

namespace {

using multipole::reference::small_scale;

std::vector<float> normal(size_t n, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> x(n);
  for (auto& v : x) v = nd(rng);
  return x;
}

double dist2(const float* a, const float* b, int d) {
  double s = 0;
  for (int j = 0; j < d; ++j) s += (double(a[j]) - b[j]) * (double(a[j]) - b[j]);
  return s;
}

TEST(KMeans, AssignNearestMatchesNaiveArgmin) {
  std::mt19937 rng(1);
  for (int d : {8, 64, 128}) {
    for (int64_t k : {1, 5, 16, 17, 100}) {
      const int64_t n = 133;
      auto pts = normal(size_t(n) * d, rng), cen = normal(size_t(k) * d, rng);
      if (k > 3) std::copy(cen.begin(), cen.begin() + d, cen.begin() + 3 * d);  // duplicate: tie to index 0
      std::vector<int32_t> lab(n);
      std::vector<float> dd(n);
      kmeans::AssignScratch scratch;
      kmeans::assign_nearest(pts.data(), n, cen.data(), k, d, lab.data(), dd.data(), scratch);
      for (int64_t i = 0; i < n; ++i) {
        int64_t best = 0;
        for (int64_t c = 1; c < k; ++c)
          if (dist2(&pts[i * d], &cen[c * d], d) < dist2(&pts[i * d], &cen[best * d], d)) best = c;
        const double want = dist2(&pts[i * d], &cen[best * d], d);
        const double got = dist2(&pts[i * d], &cen[lab[i] * d], d);
        // Same centroid, or one as near up to float rounding of ||c||^2 - 2 x.c.
        EXPECT_LE(got - want, 1e-4 * (1 + want)) << "d " << d << " k " << k << " i " << i;
        EXPECT_NE(lab[i], 3 < k ? 3 : -1) << "tie must go to the lower index";
        EXPECT_NEAR(dd[i], got, 1e-3 * (1 + got));
      }
    }
  }
}

TEST(KMeans, PartialDistancesMatchNaive) {
  std::mt19937 rng(11);
  const int d = 64;
  for (int64_t k : {1, 7, 16, 33}) {
    const int64_t n = 10, stride = k + 3;
    auto pts = normal(size_t(n) * d, rng), cen = normal(size_t(k) * d, rng);
    std::vector<float> out(size_t(n * stride), -12345.0f);
    kmeans::AssignScratch scratch;
    kmeans::partial_distances(pts.data(), n, cen.data(), k, d, out.data(), stride, scratch);
    for (int64_t i = 0; i < n; ++i) {
      double x2 = 0;
      for (int j = 0; j < d; ++j) x2 += double(pts[i * d + j]) * pts[i * d + j];
      for (int64_t c = 0; c < k; ++c)
        EXPECT_NEAR(out[i * stride + c] + x2, dist2(&pts[i * d], &cen[c * d], d), 1e-3) << i << " " << c;
      for (int64_t c = k; c < stride; ++c) EXPECT_EQ(out[i * stride + c], -12345.0f) << "wrote past k";
    }
  }
}

TEST(KMeans, LloydReducesInertiaAndEndsWithExactMeans) {
  std::mt19937 rng(2);
  const int d = 32;
  const int64_t n = 1000, k = 20;
  // Points around 20 well separated centers, weighted.
  auto centers = normal(size_t(k) * d, rng, 5.0f);
  std::vector<float> pts(size_t(n) * d), w(n);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = int64_t(rng() % k);
    for (int j = 0; j < d; ++j) pts[i * d + j] = centers[c * d + j] + nd(rng);
    w[i] = float(1 + rng() % 5);
  }
  for (bool weighted : {false, true}) {
    kmeans::Rng r(42);
    std::vector<float> cen(size_t(k) * d);
    std::vector<int32_t> scratch_ids;
    kmeans::init_random(pts.data(), n, d, k, r, cen.data(), scratch_ids);
    kmeans::LloydScratch scratch;
    std::vector<int32_t> lab(n);
    const float* wt = weighted ? w.data() : nullptr;
    auto res = kmeans::lloyd(pts.data(), wt, n, d, k, 10, cen.data(), lab.data(), scratch);
    EXPECT_LT(res.inertia, 0.7 * res.first_inertia);
    // Centroids are the weighted means of exactly the returned labels.
    std::vector<double> sum(size_t(k) * d, 0.0), ws(size_t(k), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const double wi = weighted ? w[i] : 1.0;
      ws[lab[i]] += wi;
      for (int j = 0; j < d; ++j) sum[lab[i] * d + j] += wi * pts[i * d + j];
    }
    double inertia = 0;
    for (int64_t c = 0; c < k; ++c) {
      ASSERT_GT(ws[c], 0) << "cluster " << c << " left empty";
      for (int j = 0; j < d; ++j) EXPECT_NEAR(cen[c * d + j], sum[c * d + j] / ws[c], 1e-4);
    }
    for (int64_t i = 0; i < n; ++i) inertia += (weighted ? w[i] : 1.0) * dist2(&pts[i * d], &cen[lab[i] * d], d);
    // Final inertia (means of the last labels) cannot exceed the last assignment's.
    EXPECT_LE(inertia, res.inertia * (1 + 1e-5));
  }
}

TEST(KMeans, ReseedsEmptyClusters) {
  std::mt19937 rng(3);
  const int d = 16;
  const int64_t n = 200, k = 4;
  auto pts = normal(size_t(n) * d, rng);
  // Two initial centroids far away from everything: no point picks them.
  std::vector<float> cen(size_t(k) * d);
  std::copy(pts.begin(), pts.begin() + 2 * d, cen.begin());
  for (int j = 0; j < 2 * d; ++j) cen[2 * d + j] = 1000.0f + j;
  kmeans::LloydScratch scratch;
  std::vector<int32_t> lab(n);
  auto res = kmeans::lloyd(pts.data(), nullptr, n, d, k, 3, cen.data(), lab.data(), scratch);
  EXPECT_GE(res.reseeded, 2);
  std::set<int32_t> used(lab.begin(), lab.end());
  EXPECT_EQ(used.size(), size_t(k));
  for (float x : cen) EXPECT_LT(std::abs(x), 100.0f);

  // All points identical: nothing to re-seed from; clusters stay empty, no failure.
  std::vector<float> same(size_t(n) * d, 0.5f), c2(size_t(k) * d, 0.5f);
  auto res2 = kmeans::lloyd(same.data(), nullptr, n, d, k, 3, c2.data(), lab.data(), scratch);
  EXPECT_EQ(res2.inertia, 0.0);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(lab[i], 0);
}

TEST(KMeans, SeedingIsDeterministicAndDistinct) {
  kmeans::Rng a(kmeans::mix_seed(5, {1, 2, 3})), b(kmeans::mix_seed(5, {1, 2, 3})), c(kmeans::mix_seed(6, {1, 2, 3}));
  EXPECT_NE(kmeans::mix_seed(5, {1, 2, 3}), kmeans::mix_seed(5, {1, 2, 4}));
  EXPECT_NE(kmeans::mix_seed(5, {1, 2}), kmeans::mix_seed(5, {2, 1}));
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    uint64_t x = a.next(), y = b.next(), z = c.next();
    EXPECT_EQ(x, y);
    differs |= x != z;
  }
  EXPECT_TRUE(differs);
  std::vector<int32_t> items(50), out(50);
  for (int i = 0; i < 50; ++i) items[i] = i;
  kmeans::sample_distinct(a, items.data(), 50, 50, out.data());
  EXPECT_EQ(std::set<int32_t>(out.begin(), out.end()).size(), 50u);
  // below() is uniform enough: every value of [0, 7) appears.
  std::set<uint64_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(a.below(7));
  EXPECT_EQ(seen.size(), 7u);
}

TEST(KMeans, RejectsBadArguments) {
  std::vector<float> pts(64, 1.0f), cen(64, 1.0f);
  std::vector<int32_t> lab(8);
  kmeans::LloydScratch scratch;
  EXPECT_THROW(kmeans::lloyd(pts.data(), nullptr, 8, 8, 9, 1, cen.data(), lab.data(), scratch), Error);
  EXPECT_THROW(kmeans::lloyd(pts.data(), nullptr, 8, 8, 2, 0, cen.data(), lab.data(), scratch), Error);
  std::vector<float> w(8, 1.0f);
  w[3] = 0.0f;
  EXPECT_THROW(kmeans::lloyd(pts.data(), w.data(), 8, 8, 2, 1, cen.data(), lab.data(), scratch), Error);
  EXPECT_THROW(kmeans::assign_nearest(pts.data(), 8, cen.data(), 0, 8, lab.data(), nullptr, scratch.assign), Error);
  EXPECT_THROW(kmeans::assign_nearest(pts.data(), 8, cen.data(), 1, 12, lab.data(), nullptr, scratch.assign), Error);
}

TEST(KMeans, AssignmentThroughput) {
  // One prefill block at d = 128: 8192 tokens x 512 centroids (small scale: a quarter).
  const int d = 128;
  const int64_t n = small_scale() ? 2048 : 8192, k = n / 16;
  std::mt19937 rng(4);
  auto pts = normal(size_t(n) * d, rng), cen = normal(size_t(k) * d, rng);
  std::vector<int32_t> lab(n);
  kmeans::AssignScratch scratch;
  kmeans::assign_nearest(pts.data(), n, cen.data(), k, d, lab.data(), nullptr, scratch);
  auto t0 = std::chrono::steady_clock::now();
  kmeans::assign_nearest(pts.data(), n, cen.data(), k, d, lab.data(), nullptr, scratch);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double gflops = 2.0 * n * k * d / s * 1e-9;
  std::printf("[ info ] assign_nearest %lld x %lld x %d: %.2f ms, %.1f GFLOP/s (printed, not checked)\n",
              (long long)n, (long long)k, d, s * 1e3, gflops);
  // The timed call's labels: each sampled point's centroid is (up to rounding) its nearest one.
  const auto dist = [&](int64_t i, int64_t c) { return dist2(&pts[size_t(i * d)], &cen[size_t(c * d)], d); };
  for (int64_t i = 0; i < n; i += 37) {
    ASSERT_GE(lab[size_t(i)], 0);
    ASSERT_LT(lab[size_t(i)], k);
    double best = dist(i, 0);
    for (int64_t c = 1; c < k; ++c) best = std::min(best, dist(i, c));
    EXPECT_LE(dist(i, lab[size_t(i)]), best * (1 + 1e-4)) << "point " << i;
  }
}

}  // namespace
