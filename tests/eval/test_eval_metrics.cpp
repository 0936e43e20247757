// The fidelity metrics against independent closed-form values on hand-made logits, and
// ComparingPolicy against running the candidate and dense policies separately.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "attention/attention_test_config.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/comparing_policy.hpp"
#include "multipole/eval/metrics.hpp"

namespace multipole::eval {
namespace {

TEST(EvalMetrics, KlMatchesClosedForm) {
  // softmax(0, ln 2, ln 3) = (1, 2, 3) / 6; softmax(0, 0, 0) = uniform.
  const std::vector<float> p = {0.0f, float(std::log(2.0)), float(std::log(3.0))};
  const std::vector<float> q = {0.0f, 0.0f, 0.0f};
  const double want = (1.0 / 6) * std::log((1.0 / 6) / (1.0 / 3)) + (2.0 / 6) * std::log((2.0 / 6) / (1.0 / 3)) +
                      (3.0 / 6) * std::log((3.0 / 6) / (1.0 / 3));
  EXPECT_NEAR(kl_divergence(p, q), want, 1e-7);
  // KL(uniform || p) = sum 1/3 ln((1/3) / p_i).
  const double back = (std::log((1.0 / 3) / (1.0 / 6)) + std::log((1.0 / 3) / (2.0 / 6)) +
                       std::log((1.0 / 3) / (3.0 / 6))) / 3;
  EXPECT_NEAR(kl_divergence(q, p), back, 1e-7);
  EXPECT_NE(kl_divergence(p, q), kl_divergence(q, p));  // not symmetric
  EXPECT_EQ(kl_divergence(p, p), 0.0);
}

TEST(EvalMetrics, KlIsShiftInvariantAndStableForLargeLogits) {
  const std::vector<float> a = {1000.0f, 999.0f, 990.0f}, b = {1000.0f, 1000.0f, 980.0f};
  std::vector<float> a2 = a, b2 = b;
  for (float& x : a2) x -= 1000.0f;
  for (float& x : b2) x -= 1000.0f;
  const double k = kl_divergence(a, b);
  EXPECT_TRUE(std::isfinite(k));
  EXPECT_NEAR(k, kl_divergence(a2, b2), 1e-6);
  // Independent: p = softmax(0, -1, -10), q = softmax(0, 0, -20).
  const double zp = 1 + std::exp(-1.0) + std::exp(-10.0), zq = 2 + std::exp(-20.0);
  const double p0 = 1 / zp, p1 = std::exp(-1.0) / zp, p2 = std::exp(-10.0) / zp;
  const double q0 = 1 / zq, q1 = 1 / zq, q2 = std::exp(-20.0) / zq;
  EXPECT_NEAR(k, p0 * std::log(p0 / q0) + p1 * std::log(p1 / q1) + p2 * std::log(p2 / q2), 1e-6);
}

TEST(EvalMetrics, ArgmaxAndRelativeError) {
  EXPECT_EQ(argmax(std::vector<float>{0.5f, 2.0f, 2.0f, -1.0f}), 1);  // first of the tied maxima
  EXPECT_EQ(argmax(std::vector<float>{-3.0f}), 0);
  // ||(1,2,2) - (1,0,0)|| / ||(1,0,0)|| = sqrt(8).
  EXPECT_NEAR(relative_error(std::vector<float>{1, 2, 2}, std::vector<float>{1, 0, 0}), std::sqrt(8.0), 1e-12);
  EXPECT_NEAR(relative_error(std::vector<float>{3, 4}, std::vector<float>{6, 8}), 0.5, 1e-12);
  EXPECT_EQ(relative_error(std::vector<float>{0, 0}, std::vector<float>{0, 0}), 0.0);
  EXPECT_TRUE(std::isinf(relative_error(std::vector<float>{1, 0}, std::vector<float>{0, 0})));
  EXPECT_THROW(relative_error(std::vector<float>{1}, std::vector<float>{1, 2}), Error);
  EXPECT_THROW(kl_divergence(std::vector<float>{1}, std::vector<float>{1, 2}), Error);
}

// A cache of random keys/values for one sequence: layers x n tokens.
struct Filled {
  std::unique_ptr<PagedKVCache> cache;
  SeqId seq = 0;
};
Filled fill(const AttentionConfig& c, int layers, int64_t n, uint64_t seed) {
  KVCacheConfig kc;
  kc.num_layers = layers;
  kc.num_kv_heads = c.num_kv_heads;
  kc.head_dim = c.head_dim;
  kc.dtype = DType::F32;
  kc.max_tokens = n;
  Filled f;
  f.cache = std::make_unique<PagedKVCache>(kc);
  f.seq = f.cache->add_sequence();
  f.cache->extend(f.seq, n);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> k(size_t(n) * c.num_kv_heads * c.head_dim), v(k.size());
  for (int l = 0; l < layers; ++l) {
    for (float& x : k) x = g(rng);
    for (float& x : v) x = g(rng);
    f.cache->write(f.seq, l, 0, n, k.data(), v.data());
  }
  return f;
}

TEST(EvalComparingPolicy, PassesTheCandidateOnAndMeasuresItsErrorPerLayer) {
  AttentionConfig c = test::attention_config(2, 32);
  c.budget = 16;
  c.cluster.sinks = 4;
  c.cluster.window = 16;
  c.quest_page_size = 8;
  const int layers = 2;
  const int64_t n = 300;
  Filled f = fill(c, layers, n, 3);
  ThreadPool pool(2);
  ComparingPolicy cmp(make_attention_policy("quest", c), layers);
  auto quest = make_attention_policy("quest", c);
  auto dense = make_attention_policy("dense", c);
  EXPECT_EQ(cmp.name(), "quest");
  EXPECT_TRUE(std::isnan(cmp.last_errors()[0]));
  std::mt19937_64 rng(9);
  std::normal_distribution<float> g;
  const size_t qn = size_t(c.num_q_heads) * c.head_dim;
  const SeqId seqs[1] = {f.seq};
  for (int l = 0; l < layers; ++l) {
    std::vector<float> q(qn), o_cmp(qn), o_quest(qn), o_dense(qn);
    for (float& x : q) x = 3.0f * g(rng);  // peaked attention: selection matters
    cmp.update(*f.cache, l, seqs, pool);
    quest->update(*f.cache, l, seqs, pool);
    dense->update(*f.cache, l, seqs, pool);
    cmp.decode(*f.cache, l, seqs, q.data(), o_cmp.data(), pool);
    quest->decode(*f.cache, l, seqs, q.data(), o_quest.data(), pool);
    dense->decode(*f.cache, l, seqs, q.data(), o_dense.data(), pool);
    EXPECT_EQ(o_cmp, o_quest) << "layer " << l;  // the candidate's output, untouched
    // The recorded error, recomputed here in double from the two outputs.
    double diff = 0, norm = 0;
    for (size_t i = 0; i < qn; ++i) {
      diff += (double(o_quest[i]) - o_dense[i]) * (double(o_quest[i]) - o_dense[i]);
      norm += double(o_dense[i]) * o_dense[i];
    }
    EXPECT_NEAR(cmp.last_errors()[size_t(l)], std::sqrt(diff / norm), 1e-9) << "layer " << l;
    EXPECT_GT(cmp.last_errors()[size_t(l)], 1e-4) << "budget 16 of 300 tokens should not be exact";
    EXPECT_EQ(cmp.last_stats().exact_tokens, quest->last_stats().exact_tokens);
  }
  cmp.forget(f.seq);
}

}  // namespace
}  // namespace multipole::eval
