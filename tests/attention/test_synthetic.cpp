#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "multipole/attention/synthetic.hpp"
#include "multipole/core/error.hpp"

using namespace multipole;

namespace {

// Rotate-half RoPE in float64, independent of the library's Rope.
void rope64(std::vector<double>& x, double pos, double theta) {
  const int d = int(x.size()), half = d / 2;
  for (int i = 0; i < half; ++i) {
    double a = pos * std::pow(theta, -2.0 * i / d);
    double x0 = x[i], x1 = x[i + half];
    x[i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
  }
}

// Mean over queries and heads of the softmax mass held by the top `fraction` of keys.
double top_mass(const Trace& t, double fraction) {
  const int d = t.head_dim, group = t.num_q_heads / t.num_kv_heads;
  double total = 0;
  int count = 0;
  for (int64_t s = 0; s < t.generated; s += std::max<int64_t>(1, t.generated / 8)) {
    const int64_t pos = t.prompt_tokens() + s;
    for (int g = 0; g < t.num_q_heads; ++g) {
      std::vector<double> q(t.q.begin() + (s * t.num_q_heads + g) * d, t.q.begin() + (s * t.num_q_heads + g + 1) * d);
      rope64(q, double(pos), t.rope.theta);
      std::vector<double> logits(pos + 1);
      for (int64_t j = 0; j <= pos; ++j) {
        const float* kp = &t.k[(j * t.num_kv_heads + g / group) * d];
        std::vector<double> k(kp, kp + d);
        rope64(k, double(j), t.rope.theta);
        logits[j] = std::inner_product(q.begin(), q.end(), k.begin(), 0.0) / std::sqrt(double(d));
      }
      double m = *std::max_element(logits.begin(), logits.end()), z = 0;
      for (double& x : logits) z += x = std::exp(x - m);
      std::sort(logits.begin(), logits.end(), std::greater<>());
      int64_t top = std::max<int64_t>(1, int64_t(fraction * double(pos + 1)));
      total += std::accumulate(logits.begin(), logits.begin() + top, 0.0) / z;
      ++count;
    }
  }
  return total / count;
}

}  // namespace

TEST(SyntheticTrace, ShapesAndDeterminism) {
  SyntheticTraceParams p{.tokens = 500, .generated = 20, .num_q_heads = 6, .num_kv_heads = 3, .head_dim = 16,
                         .clusters = 10, .seed = 7};
  Trace a = make_synthetic_trace(p), b = make_synthetic_trace(p);
  EXPECT_EQ(a.q.size(), 20u * 6 * 16);
  EXPECT_EQ(a.k.size(), 500u * 3 * 16);
  EXPECT_EQ(a.v.size(), a.k.size());
  EXPECT_EQ(a.rope.theta, 10000);
  EXPECT_EQ(a.q, b.q);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.v, b.v);
  p.seed = 8;
  Trace c = make_synthetic_trace(p);
  EXPECT_NE(a.k, c.k);
  EXPECT_NE(a.metadata.at("synthetic").find("seed=7"), std::string::npos);
}

// Aligned queries concentrate attention on few keys; random queries do not.
TEST(SyntheticTrace, AttentionIsPeaked) {
  SyntheticTraceParams p{.tokens = 2048, .generated = 16, .num_q_heads = 4, .num_kv_heads = 2, .head_dim = 64};
  const double peaked = top_mass(make_synthetic_trace(p), 0.05);
  p.random_queries = true;
  const double flat = top_mass(make_synthetic_trace(p), 0.05);
  EXPECT_GT(peaked, 0.6);
  EXPECT_LT(flat, 0.3);
  std::printf("top 5%% of keys hold %.3f of the attention (random queries: %.3f)\n", peaked, flat);
}

TEST(SyntheticTrace, RejectsBadParameters) {
  auto bad = [](auto edit) {
    SyntheticTraceParams p;
    edit(p);
    EXPECT_THROW(make_synthetic_trace(p), Error);
  };
  bad([](auto& p) { p.generated = p.tokens + 1; });
  bad([](auto& p) { p.generated = 0; });
  bad([](auto& p) { p.num_q_heads = 3; });
  bad([](auto& p) { p.head_dim = 7; });
  bad([](auto& p) { p.clusters = 0; });
  bad([](auto& p) { p.spread = -1; });
  bad([](auto& p) { p.stickiness = 1; });
  bad([](auto& p) { p.rope_theta = 1; });
  bad([](auto& p) { p.tokens = int64_t(1) << 40; });
}
