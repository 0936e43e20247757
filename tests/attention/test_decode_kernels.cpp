// The CPU decode kernels against a naive float64 implementation of the same formulas.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/decode_kernels.hpp"
#include "multipole/core/error.hpp"
#include "simd_levels.hpp"
#include "test_scale.hpp"

using namespace multipole;
using namespace multipole::kernels;

namespace {

using multipole::test::small_scale;

// Owns the buffers of a SoftmaxState.
struct State {
  std::vector<float> m, l, o;
  SoftmaxState s;
  State(int groups, int dim) : m(groups), l(groups), o(size_t(groups) * dim) {
    s = SoftmaxState{groups, dim, m.data(), l.data(), o.data()};
    s.reset();
  }
};

// Naive f64 attention of G query heads over a list of (key, value, bias) rows.
struct Reference {
  std::vector<double> m, l, out;  // out: [G, d] normalised
};

Reference reference(const std::vector<const float*>& keys, const std::vector<const float*>& values,
                    const std::vector<double>& bias, const float* q, int groups, int d, double scale) {
  Reference r;
  r.m.assign(groups, -std::numeric_limits<double>::infinity());
  r.l.assign(groups, 0.0);
  r.out.assign(size_t(groups) * d, 0.0);
  const size_t n = keys.size();
  for (int g = 0; g < groups; ++g) {
    std::vector<double> x(n);
    for (size_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += double(q[g * d + c]) * keys[t][c];
      x[t] = scale * dot + (bias.empty() ? 0.0 : bias[t]);
      r.m[g] = std::max(r.m[g], x[t]);
    }
    for (size_t t = 0; t < n; ++t) {
      double e = std::exp(x[t] - r.m[g]);
      r.l[g] += e;
      for (int c = 0; c < d; ++c) r.out[g * d + c] += e * values[t][c];
    }
    if (r.l[g] > 0)
      for (int c = 0; c < d; ++c) r.out[g * d + c] /= r.l[g];
  }
  return r;
}

// Compares a state (m, l, finalized output) with the reference.
void expect_matches(const State& st, const Reference& r, double tol, const std::string& what) {
  const int groups = st.s.groups, d = st.s.dim;
  std::vector<float> out(size_t(groups) * d);
  finalize(st.s, out.data());
  for (int g = 0; g < groups; ++g) {
    if (std::isinf(r.m[g])) {
      EXPECT_EQ(st.m[g], -std::numeric_limits<float>::infinity()) << what;
      EXPECT_EQ(st.l[g], 0.0f) << what;
    } else {
      ASSERT_NEAR(st.m[g], r.m[g], 1e-5 * (1 + std::abs(r.m[g]))) << what << " head " << g;
      ASSERT_NEAR(st.l[g], r.l[g], 2e-5 * r.l[g]) << what << " head " << g;
    }
    for (int c = 0; c < d; ++c)
      ASSERT_NEAR(out[g * d + c], r.out[g * d + c], tol) << what << " head " << g << " channel " << c;
  }
}

// A cache holding one sequence of `length` random tokens for 2 KV heads; a second sequence
// grows interleaved with it so that the page table is not contiguous.
struct Fixture {
  PagedKVCache cache;
  SeqId seq;
  int d;
  std::vector<std::vector<float>> keys, values;  // per head: [length, d] as stored (read back)

  Fixture(DType dtype, int d_, int64_t length, int page_size, uint32_t seed)
      : cache(KVCacheConfig{.num_layers = 2, .num_kv_heads = 2, .head_dim = d_, .page_size = page_size,
                            .dtype = dtype, .max_tokens = 3 * length + 64 * page_size}),
        d(d_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    seq = cache.add_sequence();
    SeqId other = cache.add_sequence();
    for (int64_t done = 0; done < length;) {
      int64_t n = std::min<int64_t>(length - done, 1 + (done * 7 + 3) % (2 * page_size + 1));
      cache.extend(seq, n);
      cache.extend(other, done % 3 == 0 ? page_size : 1);
      std::vector<float> k(size_t(n) * 2 * d), v(k.size());
      for (auto& x : k) x = dist(rng);
      for (auto& x : v) x = dist(rng);
      cache.write(seq, 1, done, n, k.data(), v.data());
      done += n;
    }
    for (int h = 0; h < 2; ++h) {
      keys.emplace_back(size_t(length) * d);
      values.emplace_back(size_t(length) * d);
      if (length > 0) {
        cache.read_keys(seq, 1, h, 0, length, keys[h].data());
        cache.read_values(seq, 1, h, 0, length, values[h].data());
      }
    }
  }
  KVLayerView view() const { return cache.layer_view(1); }
  const int32_t* table() const { return cache.page_table(seq).data(); }
  Reference ref(int h, const std::vector<int64_t>& pos, const float* q, int groups, double scale) const {
    std::vector<const float*> k, v;
    for (int64_t p : pos) {
      k.push_back(keys[h].data() + p * d);
      v.push_back(values[h].data() + p * d);
    }
    return reference(k, v, {}, q, groups, d, scale);
  }
};

std::vector<float> random_q(int groups, int d, float magnitude, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, magnitude);
  std::vector<float> q(size_t(groups) * d);
  for (auto& x : q) x = dist(rng);
  return q;
}

std::vector<int64_t> iota_range(int64_t begin, int64_t end) {
  std::vector<int64_t> p(std::max<int64_t>(0, end - begin));
  std::iota(p.begin(), p.end(), begin);
  return p;
}

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16};

// Every test runs once per instruction set this CPU has (AVX2, and AVX-512 where present).
class DecodeKernels : public multipole::test::SimdLevelTest {};

}  // namespace

MULTIPOLE_INSTANTIATE_SIMD_LEVELS(DecodeKernels);

TEST_P(DecodeKernels, AttendRangeMatchesNaive) {
  const std::vector<int64_t> lengths = small_scale() ? std::vector<int64_t>{1, 97, 300} : std::vector<int64_t>{1, 97, 2049};
  std::mt19937 rng(11);
  for (DType t : kTypes)
    for (int d : {64, 128, 48, 40})  // 48: AVX-512 without the bf16 even/odd split; 40: AVX2 only
      for (int64_t len : lengths) {
        Fixture f(t, d, len, 16, uint32_t(len * 131 + d));
        for (int groups : {1, 4, 5, 7, 8, 16}) {
          // Magnitude 3 makes the softmax peaky so that the running max matters.
          auto q = random_q(groups, d, groups % 2 ? 3.0f : 1.0f, rng);
          const float scale = 1.0f / std::sqrt(float(d));
          const int h = groups % 2;
          // Whole sequence, then a range that starts and ends inside pages.
          for (auto [b, e] : {std::pair<int64_t, int64_t>{0, len}, {std::min<int64_t>(len, 5), std::max<int64_t>(0, len - 3)}}) {
            State st(groups, d);
            attend_range(f.view(), f.table(), h, b, e, q.data(), scale, st.s);
            auto r = f.ref(h, iota_range(b, e), q.data(), groups, scale);
            expect_matches(st, r, 2e-5,
                           "range " + std::to_string(b) + ".." + std::to_string(e) + " " + std::string(dtype_name(t)) +
                               " d=" + std::to_string(d) + " G=" + std::to_string(groups));
          }
        }
      }
}

TEST_P(DecodeKernels, EmptyRangeLeavesStateEmpty) {
  Fixture f(DType::BF16, 64, 40, 16, 1);
  std::mt19937 rng(2);
  auto q = random_q(4, 64, 1.0f, rng);
  State st(4, 64);
  attend_range(f.view(), f.table(), 0, 17, 17, q.data(), 0.125f, st.s);
  attend_positions(f.view(), f.table(), 0, nullptr, 0, q.data(), 0.125f, st.s);
  std::vector<float> out(4 * 64, 1.0f);
  finalize(st.s, out.data());
  for (int g = 0; g < 4; ++g) {
    EXPECT_EQ(st.m[g], -std::numeric_limits<float>::infinity());
    EXPECT_EQ(st.l[g], 0.0f);
  }
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST_P(DecodeKernels, AttendPositionsMatchesNaive) {
  std::mt19937 rng(5);
  for (DType t : kTypes)
    for (int d : {64, 128, 48}) {
      const int64_t len = small_scale() ? 300 : 2049;
      Fixture f(t, d, len, 7, uint32_t(d));
      for (int groups : {1, 4, 5, 7, 8, 16})
        for (int64_t count : {int64_t(1), int64_t(97), len}) {
          std::vector<int64_t> pos = iota_range(0, len);
          std::shuffle(pos.begin(), pos.end(), rng);
          pos.resize(count);
          std::vector<int32_t> pos32(pos.begin(), pos.end());
          auto q = random_q(groups, d, 2.0f, rng);
          State st(groups, d);
          attend_positions(f.view(), f.table(), 1, pos32.data(), count, q.data(), 0.1f, st.s);
          expect_matches(st, f.ref(1, pos, q.data(), groups, 0.1), 2e-5,
                         "positions " + std::to_string(count) + " " + std::string(dtype_name(t)) + " d=" +
                             std::to_string(d) + " G=" + std::to_string(groups));
        }
    }
}

TEST_P(DecodeKernels, MergeOfSplitRangesEqualsWholeRange) {
  std::mt19937 rng(7);
  for (DType t : kTypes)
    for (int groups : {1, 5, 8, 16}) {
      const int d = 128;
      const int64_t len = small_scale() ? 300 : 2049;
      Fixture f(t, d, len, 16, uint32_t(groups));
      auto q = random_q(groups, d, 3.0f, rng);
      const float scale = 0.09f;
      State whole(groups, d);
      attend_range(f.view(), f.table(), 0, 0, len, q.data(), scale, whole.s);
      // Random cut points, including empty pieces; merged left to right and as a tree.
      std::vector<int64_t> cuts = {0, len};
      for (int i = 0; i < 6; ++i) cuts.push_back(std::uniform_int_distribution<int64_t>(0, len)(rng));
      cuts.push_back(cuts[2]);  // an empty piece
      std::sort(cuts.begin(), cuts.end());
      State merged(groups, d);
      State empty(groups, d);
      merge(merged.s, empty.s);
      for (size_t i = 0; i + 1 < cuts.size(); ++i) {
        State part(groups, d);
        attend_range(f.view(), f.table(), 0, cuts[i], cuts[i + 1], q.data(), scale, part.s);
        merge(merged.s, part.s);
      }
      merge(merged.s, empty.s);
      auto r = f.ref(0, iota_range(0, len), q.data(), groups, scale);
      expect_matches(merged, r, 2e-5, "merged " + std::string(dtype_name(t)) + " G=" + std::to_string(groups));
      expect_matches(whole, r, 2e-5, "whole " + std::string(dtype_name(t)) + " G=" + std::to_string(groups));
    }
}

// A state whose weights all underflowed (l = 0) under a maximum far above the other's (a far
// field referenced to a selected cluster's logit) must leave the other's mass as it is, in
// either order of the merge; before the guard the merge gave 0 / 0.
TEST_P(DecodeKernels, MergeIgnoresAStateWithoutMass) {
  std::mt19937 rng(23);
  const int d = 64, groups = 5;
  const int64_t len = 200;
  Fixture f(DType::BF16, d, len, 16, 29);
  auto q = random_q(groups, d, 2.0f, rng);
  const auto r = f.ref(0, iota_range(0, len), q.data(), groups, 0.1);
  std::vector<float> values(size_t(3) * d, 1.0f), zero(size_t(groups) * 3, 0.0f), high(size_t(groups), 0.0f);
  for (int g = 0; g < groups; ++g) high[size_t(g)] = float(r.m[size_t(g)]) + 500.0f;
  for (bool massless_first : {false, true}) {
    State exact(groups, d), massless(groups, d);
    attend_range(f.view(), f.table(), 0, 0, len, q.data(), 0.1f, exact.s);
    attend_weighted(values.data(), nullptr, 3, zero.data(), high.data(), massless.s);
    ASSERT_EQ(massless.l[0], 0.0f);
    ASSERT_GT(massless.m[0], exact.m[0] + 400.0f);
    if (massless_first) {
      merge(massless.s, exact.s);
      expect_matches(massless, r, 2e-5, "massless first");
    } else {
      merge(exact.s, massless.s);
      expect_matches(exact, r, 2e-5, "massless second");
    }
  }
}

TEST_P(DecodeKernels, AttendPseudoAndScoreRowsMatchNaive) {
  std::mt19937 rng(9);
  std::normal_distribution<float> dist;
  for (int d : {64, 128, 48})
    for (int groups : {1, 4, 5, 7, 8, 16}) {
      const int C = 300;
      std::vector<float> keys(size_t(C) * d), values(keys.size()), bias(C);
      for (auto& x : keys) x = dist(rng);
      for (auto& x : values) x = dist(rng);
      for (auto& x : bias) x = std::log(float(1 + rng() % 40));
      auto q = random_q(groups, d, 2.0f, rng);
      const float scale = 1.0f / std::sqrt(float(d));
      std::vector<int32_t> ids(C);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int64_t count : {1, 97, C}) {
        for (bool use_ids : {true, false}) {
          std::vector<const float*> k, v;
          std::vector<double> b;
          for (int64_t j = 0; j < count; ++j) {
            int id = use_ids ? ids[j] : int(j);
            k.push_back(keys.data() + int64_t(id) * d);
            v.push_back(values.data() + int64_t(id) * d);
            b.push_back(bias[id]);
          }
          const std::string what = "pseudo d=" + std::to_string(d) + " G=" + std::to_string(groups) + " count=" +
                                   std::to_string(count) + (use_ids ? " ids" : " all");
          // Weights as the scoring leaves them: e^{logit - max}, computed here in double.
          std::vector<float> w(size_t(groups) * count), mx(groups);
          for (int g = 0; g < groups; ++g) {
            std::vector<double> logit(count);
            double m = -INFINITY;
            for (int64_t j = 0; j < count; ++j) {
              double dot = 0;
              for (int c = 0; c < d; ++c) dot += double(q[g * d + c]) * k[j][c];
              logit[j] = scale * dot + b[j];
              m = std::max(m, logit[j]);
            }
            mx[g] = float(m);
            for (int64_t j = 0; j < count; ++j) w[g * count + j] = float(std::exp(logit[j] - m));
          }
          State st(groups, d);
          attend_weighted(values.data(), use_ids ? ids.data() : nullptr, count, w.data(), mx.data(), st.s);
          expect_matches(st, reference(k, v, b, q.data(), groups, d, scale), 2e-5, what);
          // Into a state that already holds other rows: the same as attending them all.
          State both(groups, d);
          attend_weighted(values.data(), use_ids ? ids.data() : nullptr, count, w.data(), mx.data(), both.s);
          std::vector<float> w2(w.size()), mx2(groups);
          for (int g = 0; g < groups; ++g) {  // the same rows again, weights 3x at a max 2 higher
            mx2[g] = mx[g] + 2.0f;
            for (int64_t j = 0; j < count; ++j) w2[g * count + j] = 3.0f * std::exp(-2.0f) * w[g * count + j];
          }
          attend_weighted(values.data(), use_ids ? ids.data() : nullptr, count, w2.data(), mx2.data(), both.s);
          // Every row now weighs 1 + 3 = 4 times its share, seen from a maximum 2 higher.
          Reference twice = reference(k, v, b, q.data(), groups, d, scale);
          for (int g = 0; g < groups; ++g) {
            twice.m[g] += 2.0;
            twice.l[g] *= 4.0 * std::exp(-2.0);
          }
          expect_matches(both, twice, 2e-5, what + " twice");

          std::vector<float> out(size_t(groups) * count);
          score_rows(keys.data(), use_ids ? ids.data() : nullptr, count, q.data(), groups, d, scale, out.data());
          for (int g = 0; g < groups; ++g)
            for (int64_t j = 0; j < count; ++j) {
              double dot = 0;
              for (int c = 0; c < d; ++c) dot += double(q[g * d + c]) * k[j][c];
              ASSERT_NEAR(out[g * count + j], scale * dot, 1e-5 * (1 + std::abs(scale * dot))) << what;
            }
        }
      }
    }
}

TEST_P(DecodeKernels, PseudoTokensWithZeroWeightOrNoMaximumHaveNoWeight) {
  const int d = 16, groups = 2;
  std::vector<float> values(3 * d);
  for (int i = 0; i < 3 * d; ++i) values[i] = float(i / d);
  std::vector<float> w = {0.0f, 1.0f, 0.0f, 0.0f, 1.0f, 0.0f}, mx = {0.5f, 0.5f};
  State st(groups, d);
  attend_weighted(values.data(), nullptr, 3, w.data(), mx.data(), st.s);
  std::vector<float> out(groups * d);
  finalize(st.s, out.data());
  for (float x : out) EXPECT_FLOAT_EQ(x, 1.0f);
  // A maximum of -inf (every logit -inf: the weights are NaN): the state stays empty.
  State none(groups, d);
  std::vector<int32_t> ids = {0, 2};
  std::vector<float> nan_w(4, NAN), no_max = {-INFINITY, -INFINITY};
  attend_weighted(values.data(), ids.data(), 2, nan_w.data(), no_max.data(), none.s);
  finalize(none.s, out.data());
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST_P(DecodeKernels, ExpAccuracy) {
  std::mt19937 rng(13);
  std::vector<float> x;
  for (int i = 0; i < 200000; ++i) x.push_back(std::uniform_real_distribution<float>(-87.0f, 88.0f)(rng));
  for (int i = 0; i < 20000; ++i) x.push_back(std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng));
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, 0.34657359f, -0.34657359f, 88.0f, -87.0f, 1e-8f, -1e-8f}) x.push_back(v);
  std::vector<float> y = x;
  exp_inplace(y.data(), int64_t(y.size()));
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double e = std::exp(double(x[i]));
    worst = std::max(worst, std::abs(y[i] - e) / e);
  }
  EXPECT_LT(worst, 2e-7);
  EXPECT_EQ(y[x.size() - 10], 1.0f);  // e^0

  // Specials, with a length that is not a multiple of 8 (the tail path).
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> s = {-inf, -1000.0f, -200.0f, -104.5f, 89.0f, 1000.0f, inf, std::nanf(""), -100.0f, 88.7f, -87.5f};
  exp_inplace(s.data(), int64_t(s.size()));
  EXPECT_EQ(s[0], 0.0f);
  EXPECT_EQ(s[1], 0.0f);
  EXPECT_EQ(s[2], 0.0f);
  EXPECT_EQ(s[3], 0.0f);
  EXPECT_EQ(s[4], inf);
  EXPECT_EQ(s[5], inf);
  EXPECT_EQ(s[6], inf);
  EXPECT_TRUE(std::isnan(s[7]));
  EXPECT_NEAR(s[8], std::exp(-100.0), 1e-45);  // subnormal: absolute accuracy only
  EXPECT_NEAR(s[9], std::exp(double(88.7f)), 2e-7 * std::exp(double(88.7f)));
  EXPECT_NEAR(s[10], std::exp(-87.5), 2e-6 * std::exp(-87.5));  // just below FLT_MIN
}

TEST_P(DecodeKernels, RejectsMismatchedShapes) {
  Fixture f(DType::F32, 64, 20, 16, 3);
  std::vector<float> q(3 * 128);
  State wrong_dim(3, 128);
  EXPECT_THROW(attend_range(f.view(), f.table(), 0, 0, 20, q.data(), 1.0f, wrong_dim.s), Error);
  State ok(3, 64);
  EXPECT_THROW(attend_range(f.view(), f.table(), 2, 0, 20, q.data(), 1.0f, ok.s), Error);
  State a(3, 64), b(4, 64);
  EXPECT_THROW(merge(a.s, b.s), Error);
  EXPECT_THROW(score_rows(q.data(), nullptr, 2, q.data(), 17, 64, 1.0f, q.data()), Error);
}

namespace {

// out[g * n + i] against scale * q_g . keys[positions[i]] in double.
//   out: [G, n]; q: [G, d]; keys: [len, d]
void expect_key_logits(const std::vector<float>& out, const std::vector<float>& q, const std::vector<float>& keys,
                       const std::vector<int64_t>& positions, int groups, int d, double scale, const std::string& what) {
  const int64_t n = int64_t(positions.size());
  for (int g = 0; g < groups; ++g)
    for (int64_t i = 0; i < n; ++i) {
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += double(q[g * d + c]) * keys[positions[size_t(i)] * d + c];
      ASSERT_NEAR(out[g * n + i], scale * dot, 1e-5 * (1 + std::abs(scale * dot))) << what << " item " << i;
    }
}

}  // namespace

TEST_P(DecodeKernels, ScoreRangeMatchesNaive) {
  std::mt19937 rng(17);
  for (DType t : kTypes)
    for (int d : {64, 48}) {
      const int64_t len = 300;
      Fixture f(t, d, len, 16, uint32_t(d + 1));
      for (int groups : {1, 5, 8, 16}) {
        auto q = random_q(groups, d, 1.0f, rng);
        const int64_t b = 7, e = 290, n = e - b;
        std::vector<float> out(size_t(groups) * n);
        score_range(f.view(), f.table(), 1, b, e, q.data(), groups, 0.2f, out.data());
        expect_key_logits(out, q, f.keys[1], iota_range(b, e), groups, d, 0.2,
                          std::string(dtype_name(t)) + " d " + std::to_string(d) + " G " + std::to_string(groups));
      }
    }
}

// Listed positions in any order, across pages, with a repeat: each logit lands in its own slot.
TEST_P(DecodeKernels, ScorePositionsMatchesNaive) {
  std::mt19937 rng(23);
  for (DType t : kTypes)
    for (int d : {64, 48}) {
      const int64_t len = 300;
      Fixture f(t, d, len, 16, uint32_t(d + 5));
      std::vector<int32_t> pos = {299, 0, 17, 16, 15, 250, 17, 128};
      for (int i = 0; i < 40; ++i) pos.push_back(int32_t(rng() % len));
      const int64_t n = int64_t(pos.size());
      for (int groups : {1, 5, 8, 16}) {
        auto q = random_q(groups, d, 1.0f, rng);
        std::vector<float> out(size_t(groups) * n, NAN);
        score_positions(f.view(), f.table(), 1, pos.data(), n, q.data(), groups, 0.2f, out.data());
        expect_key_logits(out, q, f.keys[1], std::vector<int64_t>(pos.begin(), pos.end()), groups, d, 0.2,
                          std::string(dtype_name(t)) + " d " + std::to_string(d) + " G " + std::to_string(groups));
      }
    }
}

TEST_P(DecodeKernels, AttendRangeAllHeadsMatchesNaive) {
  std::mt19937 rng(19);
  for (DType t : kTypes)
    for (int groups : {1, 5, 8, 16}) {
      const int d = groups == 5 ? 48 : 128;
      const int64_t len = small_scale() ? 300 : 1100;
      Fixture f(t, d, len, 16, uint32_t(groups * 3));
      auto q = random_q(2 * groups, d, 2.0f, rng);  // [H=2, G, d]
      State s0(groups, d), s1(groups, d);
      SoftmaxState states[2] = {s0.s, s1.s};
      const int64_t b = 3, e = len - 5;
      attend_range_all_heads(f.view(), f.table(), b, e, q.data(), 0.1f, states);
      for (int h = 0; h < 2; ++h)
        expect_matches(h == 0 ? s0 : s1, f.ref(h, iota_range(b, e), q.data() + h * groups * d, groups, 0.1), 2e-5,
                       "all heads " + std::string(dtype_name(t)) + " G=" + std::to_string(groups) + " head " +
                           std::to_string(h));
    }
}

TEST_P(DecodeKernels, ScoreRowsTypedMatchesNaive) {
  std::mt19937 rng(23);
  std::normal_distribution<float> dist;
  for (DType t : kTypes)
    for (int groups : {1, 4, 7, 16}) {
      const int d = 256, C = 150;  // d = 2 x 128: quest's [lo | hi] rows
      std::vector<float> rows(size_t(C) * d), stored(rows.size());
      for (auto& x : rows) x = dist(rng);
      std::vector<uint8_t> raw(rows.size() * dtype_size(t));
      convert_from_f32(rows.data(), t, raw.data(), rows.size());
      convert_to_f32(raw.data(), t, stored.data(), rows.size());
      auto q = random_q(groups, d, 1.0f, rng);
      std::vector<float> out(size_t(groups) * C);
      score_rows_typed(raw.data(), t, nullptr, C, q.data(), groups, d, 0.5f, out.data());
      for (int g = 0; g < groups; ++g)
        for (int j = 0; j < C; ++j) {
          double dot = 0;
          for (int c = 0; c < d; ++c) dot += double(q[g * d + c]) * stored[size_t(j) * d + c];
          ASSERT_NEAR(out[g * C + j], 0.5 * dot, 1e-5 * (1 + std::abs(0.5 * dot))) << dtype_name(t) << " G=" << groups;
        }
    }
}
