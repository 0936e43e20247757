#include "attention/kmeans.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "attention/simd_avx2.hpp"
#include "multipole/core/error.hpp"

namespace multipole::kmeans {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kRows = 4;   // points per tile
constexpr int kCols = 16;  // centroids per tile (two 8-lane vectors)

// Partial squared distances ||c||^2 - 2 x.c of kRows points to all padded centroids, one
// tile of kCols centroids at a time, handed to `tile(c0, dist)` with dist[r][0..1] the
// two 8-lane vectors of row r. Accumulators: kRows x 2 vectors; per channel 2 loads +
// kRows broadcasts feed 2*kRows FMAs.
//   rows: [kRows] point pointers; ct: [d, kp] transposed centroids; norms: [kp]
template <class Tile>
inline void distance_tiles(const float* const* rows, const float* ct, const float* norms, int64_t kp, int d,
                           Tile&& tile) {
  const __m256 minus2 = _mm256_set1_ps(-2.0f);
  for (int64_t c0 = 0; c0 < kp; c0 += kCols) {
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* col = ct + c0;
    for (int j = 0; j < d; ++j, col += kp) {
      __m256 a = _mm256_loadu_ps(col), b = _mm256_loadu_ps(col + 8);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        __m256 x = _mm256_broadcast_ss(rows[r] + j);
        acc[r][0] = _mm256_fmadd_ps(x, a, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x, b, acc[r][1]);
      }
    }
    __m256 n0 = _mm256_loadu_ps(norms + c0), n1 = _mm256_loadu_ps(norms + c0 + 8);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = _mm256_fmadd_ps(minus2, acc[r][0], n0);
      acc[r][1] = _mm256_fmadd_ps(minus2, acc[r][1], n1);
    }
    tile(c0, acc);
  }
}

// Nearest of all padded centroids for kRows points, keeping per lane the first minimum.
void nearest_tile(const float* const* rows, const float* ct, const float* norms, int64_t kp, int d, int32_t* best_idx,
                  float* best_val) {
  __m256 bv[kRows];
  __m256i bi[kRows];
  for (int r = 0; r < kRows; ++r) {
    bv[r] = _mm256_set1_ps(kInf);
    bi[r] = _mm256_setzero_si256();
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  distance_tiles(rows, ct, norms, kp, d, [&](int64_t c0, const __m256 (&dist)[kRows][2]) {
    // Strict < keeps the lower index per lane (columns are visited in order).
    __m256i i0 = _mm256_add_epi32(lane, _mm256_set1_epi32(int32_t(c0)));
    __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
    for (int r = 0; r < kRows; ++r) {
      __m256 lt = _mm256_cmp_ps(dist[r][0], bv[r], _CMP_LT_OQ);
      bv[r] = _mm256_blendv_ps(bv[r], dist[r][0], lt);
      bi[r] = _mm256_blendv_epi8(bi[r], i0, _mm256_castps_si256(lt));
      lt = _mm256_cmp_ps(dist[r][1], bv[r], _CMP_LT_OQ);
      bv[r] = _mm256_blendv_ps(bv[r], dist[r][1], lt);
      bi[r] = _mm256_blendv_epi8(bi[r], i1, _mm256_castps_si256(lt));
    }
  });
  for (int r = 0; r < kRows; ++r) {
    alignas(32) float v[8];
    alignas(32) int32_t i[8];
    _mm256_store_ps(v, bv[r]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(i), bi[r]);
    int best = 0;
    for (int l = 1; l < 8; ++l)
      if (v[l] < v[best] || (v[l] == v[best] && i[l] < i[best])) best = l;
    best_val[r] = v[best];
    best_idx[r] = i[best];
  }
}

double squared_norm(const float* x, int d) {
  double s = 0;
  for (int j = 0; j < d; ++j) s += double(x[j]) * x[j];
  return s;
}

}  // namespace

uint64_t mix_seed(uint64_t seed, std::initializer_list<uint64_t> ids) {
  uint64_t state = seed;
  uint64_t h = splitmix64(state);
  for (uint64_t id : ids) {
    state ^= id + 0x632be59bd9b4e019ull + (h << 6) + (h >> 2);
    h = splitmix64(state);
  }
  return h;
}

Rng::Rng(uint64_t seed) {
  for (auto& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

uint64_t Rng::below(uint64_t n) {
  // Lemire's multiply-shift with rejection: unbiased.
  for (;;) {
    unsigned __int128 m = (unsigned __int128)next() * n;
    uint64_t low = uint64_t(m);
    if (low >= n || low >= (0 - n) % n) return uint64_t(m >> 64);
  }
}

void sample_distinct(Rng& rng, int32_t* items, int64_t n, int64_t k, int32_t* out) {
  MP_CHECK(k >= 0 && k <= n, "k-means: cannot draw {} distinct items out of {}", k, n);
  for (int64_t i = 0; i < k; ++i) {
    int64_t j = i + int64_t(rng.below(uint64_t(n - i)));
    std::swap(items[i], items[j]);
    out[i] = items[i];
  }
}

namespace {

// Centroids transposed to [d, kp] (kp = k rounded up to kCols, padding never nearest) and
// their squared norms, in the scratch. Returns kp.
int64_t prepare_centroids(const float* centroids, int64_t k, int d, AssignScratch& scratch) {
  MP_CHECK(k >= 1, "k-means: {} centroids, expected at least 1", k);
  MP_CHECK(d > 0 && d % 8 == 0, "k-means: dimension {} must be a positive multiple of 8", d);
  const int64_t kp = (k + kCols - 1) / kCols * kCols;
  if (scratch.transposed.size() < size_t(kp) * d) scratch.transposed.resize(size_t(kp) * d);
  if (scratch.norms.size() < size_t(kp)) scratch.norms.resize(size_t(kp));
  float* ct = scratch.transposed.data();
  float* norms = scratch.norms.data();
  // Eight centroids at a time: each channel j is one contiguous 8-float store.
  for (int64_t c0 = 0; c0 < kp; c0 += 8) {
    const float* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = c0 + r < k ? centroids + (c0 + r) * d : nullptr;
    for (int j = 0; j < d; ++j) {
      float* dst = ct + int64_t(j) * kp + c0;
      for (int r = 0; r < 8; ++r) dst[r] = rows[r] ? rows[r][j] : 0.0f;
    }
    for (int r = 0; r < 8; ++r) {
      if (!rows[r]) {
        norms[c0 + r] = kInf;  // padding is never nearest
        continue;
      }
      __m256 acc = _mm256_setzero_ps();
      for (int j = 0; j < d; j += 8) {
        __m256 x = _mm256_loadu_ps(rows[r] + j);
        acc = _mm256_fmadd_ps(x, x, acc);
      }
      norms[c0 + r] = simd::hsum(acc);
    }
  }
  return kp;
}

}  // namespace

void assign_nearest(const float* points, int64_t n, const float* centroids, int64_t k, int d, int32_t* labels,
                    float* dist2, AssignScratch& scratch) {
  const int64_t kp = prepare_centroids(centroids, k, d, scratch);
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    const float* rows[kRows];
    for (int r = 0; r < kRows; ++r) rows[r] = points + std::min<int64_t>(i0 + r, n - 1) * d;
    int32_t idx[kRows];
    float val[kRows];
    nearest_tile(rows, scratch.transposed.data(), scratch.norms.data(), kp, d, idx, val);
    for (int r = 0; r < kRows && i0 + r < n; ++r) {
      labels[i0 + r] = idx[r];
      if (dist2) dist2[i0 + r] = std::max(0.0f, float(squared_norm(rows[r], d)) + val[r]);
    }
  }
}

void partial_distances(const float* points, int64_t n, const float* centroids, int64_t k, int d, float* out,
                       int64_t stride, AssignScratch& scratch) {
  const int64_t kp = prepare_centroids(centroids, k, d, scratch);
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    const float* rows[kRows];
    for (int r = 0; r < kRows; ++r) rows[r] = points + std::min<int64_t>(i0 + r, n - 1) * d;
    distance_tiles(rows, scratch.transposed.data(), scratch.norms.data(), kp, d,
                   [&](int64_t c0, const __m256 (&dist)[kRows][2]) {
                     const int64_t cols = std::min<int64_t>(kCols, k - c0);
                     for (int r = 0; r < kRows && i0 + r < n; ++r) {
                       alignas(32) float tmp[kCols];
                       _mm256_store_ps(tmp, dist[r][0]);
                       _mm256_store_ps(tmp + 8, dist[r][1]);
                       std::memcpy(out + (i0 + r) * stride + c0, tmp, size_t(cols) * 4);
                     }
                   });
  }
}

void init_random(const float* points, int64_t n, int d, int64_t k, Rng& rng, float* centroids,
                 std::vector<int32_t>& scratch) {
  MP_CHECK(k >= 1 && k <= n, "k-means: {} centroids for {} points (need 1 <= k <= n)", k, n);
  scratch.resize(size_t(n + k));
  for (int64_t i = 0; i < n; ++i) scratch[i] = int32_t(i);
  int32_t* picked = scratch.data() + n;
  sample_distinct(rng, scratch.data(), n, k, picked);
  for (int64_t c = 0; c < k; ++c) std::memcpy(centroids + c * d, points + int64_t(picked[c]) * d, size_t(d) * 4);
}

LloydResult lloyd(const float* points, const float* weights, int64_t n, int d, int64_t k, int iterations,
                  float* centroids, int32_t* labels, LloydScratch& s) {
  MP_CHECK(iterations >= 1, "k-means: {} iterations, expected at least 1", iterations);
  MP_CHECK(k >= 1 && k <= n, "k-means: {} centroids for {} points (need 1 <= k <= n)", k, n);
  if (weights)
    for (int64_t i = 0; i < n; ++i)
      MP_CHECK(weights[i] > 0 && std::isfinite(weights[i]), "k-means: weight {} of point {} must be finite and > 0",
               weights[i], i);
  s.sums.resize(size_t(k) * d);
  s.weights.resize(size_t(k));
  s.counts.resize(size_t(k));
  s.dist2.resize(size_t(n));
  LloydResult result;
  for (int it = 0; it < iterations; ++it) {
    assign_nearest(points, n, centroids, k, d, labels, s.dist2.data(), s.assign);
    double inertia = 0;
    std::fill(s.counts.begin(), s.counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      inertia += (weights ? weights[i] : 1.0) * s.dist2[i];
      ++s.counts[labels[i]];
    }
    if (it == 0) result.first_inertia = inertia;
    result.inertia = inertia;

    // Empty clusters take the farthest points of clusters that keep at least one point.
    int64_t empty = std::count(s.counts.begin(), s.counts.end(), 0);
    if (empty > 0) {
      s.order.resize(size_t(n));
      for (int64_t i = 0; i < n; ++i) s.order[i] = int32_t(i);
      std::sort(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) {
        return s.dist2[a] > s.dist2[b] || (s.dist2[a] == s.dist2[b] && a < b);
      });
      int64_t next = 0;
      for (int64_t c = 0; c < k; ++c) {
        if (s.counts[c] != 0) continue;
        while (next < n && s.counts[labels[s.order[next]]] < 2) ++next;
        if (next == n || s.dist2[s.order[next]] <= 0.0f) break;  // only duplicates left
        int32_t p = s.order[next++];
        --s.counts[labels[p]];
        labels[p] = int32_t(c);
        s.counts[c] = 1;
        s.dist2[p] = 0.0f;
        ++result.reseeded;
      }
    }

    std::fill(s.sums.begin(), s.sums.end(), 0.0);
    std::fill(s.weights.begin(), s.weights.end(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const double w = weights ? weights[i] : 1.0;
      double* sum = s.sums.data() + int64_t(labels[i]) * d;
      const float* x = points + i * d;
      for (int j = 0; j < d; ++j) sum[j] += w * x[j];
      s.weights[labels[i]] += w;
    }
    for (int64_t c = 0; c < k; ++c) {
      if (s.counts[c] == 0) continue;
      const double inv = 1.0 / s.weights[c];
      for (int j = 0; j < d; ++j) centroids[c * d + j] = float(s.sums[c * d + j] * inv);
    }
  }
  return result;
}

}  // namespace multipole::kmeans
