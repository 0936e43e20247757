// The "multipole" and "squeezed" policies against the naive float64 reference
// (reference_multipole.hpp) and dense attention (reference_dense.hpp), plus the method's
// invariants, determinism, work saved by the hierarchy and allocation-free decode.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <new>
#include <string>
#include <vector>

#define MULTIPOLE_DEFINE_ALLOCATION_COUNTER
#include "allocation_counter.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"
#include "reference_multipole.hpp"

using namespace multipole;
namespace ref = multipole::reference;

using multipole::test::allocations;
using multipole::test::counting;

namespace {

using multipole::reference::small_scale;

AttentionConfig make_config(int G, int d, int kv_heads = 2) {
  AttentionConfig c = ref::attention_config(G, d, kv_heads);
  c.cluster.seed = 3;
  return c;
}

struct Check {
  int groups = 0, ambiguous = 0;
  double max_err = 0;
};

// Runs update + decode of `policy` on layer `layer` and compares every (sequence, KV head)
// with the reference over the policy's own index. Also checks the reported stats.
Check check_policy(AttentionPolicy& policy, ref::SyntheticKV& data, const AttentionConfig& c, int layer,
                   const std::vector<float>& q, ThreadPool& pool, const std::string& what, double tol = 2e-4) {
  SCOPED_TRACE(what);
  const int G = c.group_size(), d = c.head_dim, Hq = c.num_q_heads;
  const Rope rope(c.rope);
  policy.update(*data.cache, layer, data.seqs, pool);
  std::vector<float> out(q.size(), NAN);
  policy.decode(*data.cache, layer, data.seqs, q.data(), out.data(), pool);
  const DecodeStats st = policy.last_stats();
  Check r;
  int64_t exact = 0, selected = 0, scored = 0, far = 0;
  for (size_t b = 0; b < data.seqs.size(); ++b) {
    ref::SeqKV kv(*data.cache, data.seqs[b], layer);
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const ClusterIndex* idx = find_cluster_index(policy, data.seqs[b], layer, h);
      EXPECT_NE(idx, nullptr);
      if (!idx) return r;
      const float* qg = q.data() + (b * Hq + h * G) * d;
      const ref::MultipoleResult want = ref::multipole(kv, h, *idx, c, rope, qg, G);
      ++r.groups;
      exact += want.exact_tokens;
      selected += want.selected_tokens;
      scored += want.centroids_scored;
      far += want.far_clusters;
      EXPECT_LE(want.selected_tokens, c.budget);
      if (want.ambiguous) {
        ++r.ambiguous;
        continue;
      }
      const double err = reference::relative_error(out.data() + (b * Hq + h * G) * d, want.out);
      r.max_err = std::max(r.max_err, err);
      EXPECT_LT(err, tol) << "sequence " << b << " (length " << kv.length << ") head " << h;
    }
  }
  if (r.ambiguous == 0) {
    EXPECT_EQ(st.exact_tokens, exact);
    EXPECT_EQ(st.selected_tokens, selected);
    EXPECT_EQ(st.centroids_scored, scored);
    EXPECT_EQ(st.pseudo_tokens, c.multipole_far_field ? far : 0);
  }
  EXPECT_GT(st.bytes_read, 0);
  return r;
}

// Runs update + decode of `policy` on layer 0 and returns, per (sequence, KV head), the
// relative error against dense attention.
std::vector<double> errors_vs_dense(AttentionPolicy& policy, ref::SyntheticKV& data, const AttentionConfig& c,
                                    const std::vector<float>& q, ThreadPool& pool) {
  policy.update(*data.cache, 0, data.seqs, pool);
  std::vector<float> out(q.size());
  policy.decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
  std::vector<double> err;
  for (size_t b = 0; b < data.seqs.size(); ++b) {
    ref::SeqKV kv(*data.cache, data.seqs[b], 0);
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const size_t row = (b * c.num_q_heads + h * c.group_size()) * c.head_dim;
      const auto dense = ref::attend(kv, h, ref::range(0, kv.length), q.data() + row, c.group_size(),
                                     c.softmax_scale());
      err.push_back(reference::relative_error(out.data() + row, dense));
    }
  }
  return err;
}

TEST(MultipolePolicy, MatchesReferenceOnRandomAndClusteredInputs) {
  struct Shape {
    int G, d;
  };
  const std::vector<Shape> shapes = small_scale() ? std::vector<Shape>{{1, 64}, {5, 128}, {8, 64}}
                                                  : std::vector<Shape>{{1, 64}, {4, 128}, {5, 64}, {7, 128}, {8, 64}};
  const std::vector<int64_t> lengths = {1, 97, 2049, 2600};
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (const Shape& s : shapes)
    for (auto kind : {ref::KeyKind::Random, ref::KeyKind::Clustered, ref::KeyKind::Skewed})
      for (bool far : {true, false}) {
        AttentionConfig c = make_config(s.G, s.d);
        c.multipole_far_field = far;
        // Small blocks/levels so that 2600 tokens span several blocks and a real hierarchy.
        c.cluster.block_size = 1024;
        c.cluster.window = 64;
        c.cluster.tokens_per_centroid = {8, 64};
        c.budget = 64;
        c.coarse_budget = 512;
        ref::SyntheticKV data(c, DType::BF16, 2, 8192, kind, 21 + s.G);
        for (int64_t len : lengths) data.append(data.add(), len);
        auto policy = make_attention_policy(far ? "multipole" : "squeezed", c);
        EXPECT_EQ(policy->name(), far ? "multipole" : "squeezed");
        const auto q = data.queries(c, kind == ref::KeyKind::Random ? 1.0f : 0.25f);
        const Check r = check_policy(*policy, data, c, 1, q, pool,
                                     "G " + std::to_string(s.G) + " d " + std::to_string(s.d) +
                                         (kind == ref::KeyKind::Random      ? " random"
                                          : kind == ref::KeyKind::Skewed ? " skewed"
                                                                         : " clustered") +
                                         (far ? " multipole" : " squeezed"));
        total += r.groups;
        ambiguous += r.ambiguous;
      }
  std::printf("[ info ] %d of %d groups skipped as near ties\n", ambiguous, total);
  EXPECT_LT(ambiguous, total / 10 + 1);
}

// The coarse_radius_weight experiment: coarse clusters ranked by s (q.c + w |q| r). The
// reference computes the radii from the children itself; a small coarse budget makes the
// ranking decide which children are scored.
TEST(MultipolePolicy, CoarseRadiusWeightMatchesReference) {
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (float w : {0.5f, 1.0f})
    for (auto kind : {ref::KeyKind::Clustered, ref::KeyKind::Skewed}) {
      AttentionConfig c = make_config(4, 64);
      c.cluster.block_size = 1024;
      c.cluster.window = 64;
      c.cluster.tokens_per_centroid = {8, 64};
      c.budget = 64;
      c.coarse_budget = 256;
      c.coarse_radius_weight = w;
      ref::SyntheticKV data(c, DType::BF16, 2, 8192, kind, 41);
      for (int64_t len : {97, 2049, 2600}) data.append(data.add(), len);
      auto policy = make_attention_policy("multipole", c);
      const auto q = data.queries(c, 0.25f);
      const Check r = check_policy(*policy, data, c, 1, q, pool, "w " + std::to_string(w));
      total += r.groups;
      ambiguous += r.ambiguous;
    }
  EXPECT_LT(ambiguous, total / 10 + 1);
  // Another weight selects other coarse clusters somewhere (else the test would not test it).
  AttentionConfig c0 = make_config(4, 64), c1 = c0;
  for (AttentionConfig* c : {&c0, &c1}) {
    c->cluster.block_size = 1024;
    c->cluster.tokens_per_centroid = {8, 64};
    c->budget = 64;
    c->coarse_budget = 256;
  }
  c1.coarse_radius_weight = 1.0f;
  ref::SyntheticKV data(c0, DType::BF16, 1, 8192, ref::KeyKind::Clustered, 43);
  data.append(data.add(), 4000);
  const auto q = data.queries(c0, 0.25f);
  std::vector<float> o0(q.size()), o1(q.size());
  auto p0 = make_attention_policy("multipole", c0), p1 = make_attention_policy("multipole", c1);
  p0->update(*data.cache, 0, data.seqs, pool);
  p1->update(*data.cache, 0, data.seqs, pool);
  p0->decode(*data.cache, 0, data.seqs, q.data(), o0.data(), pool);
  p1->decode(*data.cache, 0, data.seqs, q.data(), o1.data(), pool);
  EXPECT_NE(o0, o1);
}

// The far field at real positions (an experiment) against the reference, on two levels: the
// selection and the frontier's normalisation stay at the fixed position, only the far field's
// logits move. And it changes the output (else the test would not test it).
// The experiments' tests: group 4, d 64, budget 64 with a coarse budget of 256 over small
// blocks, on `levels`.
AttentionConfig experiment_config(std::vector<int> levels) {
  AttentionConfig c = make_config(4, 64);
  c.cluster.block_size = 1024;
  c.cluster.window = 64;
  c.cluster.tokens_per_centroid = std::move(levels);
  c.budget = 64;
  c.coarse_budget = 256;
  return c;
}

// Decodes layer 1 with `policy` (updated already) and with policy `name` under `other`: do
// the outputs differ? (An experiment's test must see it change something.)
bool outputs_differ(AttentionPolicy& policy, const std::string& name, const AttentionConfig& other,
                    ref::SyntheticKV& data, const std::vector<float>& q, ThreadPool& pool) {
  auto p = make_attention_policy(name, other);
  std::vector<float> o0(q.size()), o1(q.size());
  policy.decode(*data.cache, 1, data.seqs, q.data(), o0.data(), pool);
  p->update(*data.cache, 1, data.seqs, pool);
  p->decode(*data.cache, 1, data.seqs, q.data(), o1.data(), pool);
  return o0 != o1;
}

TEST(MultipolePolicy, FarFieldAtRealPositionsMatchesReference) {
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (auto levels : {std::vector<int>{8}, std::vector<int>{8, 64}}) {
    AttentionConfig c = experiment_config(levels);
    c.far_field_real_positions = true;
    ref::SyntheticKV data(c, DType::BF16, 2, 8192, ref::KeyKind::Clustered, 47);
    for (int64_t len : {97, 2049, 2600}) data.append(data.add(), len);
    auto policy = make_attention_policy("multipole", c);
    const auto q = data.queries(c, 0.25f);
    const Check r = check_policy(*policy, data, c, 1, q, pool, "levels " + std::to_string(levels.size()));
    total += r.groups;
    ambiguous += r.ambiguous;
    AttentionConfig fixed = c;
    fixed.far_field_real_positions = false;
    EXPECT_TRUE(outputs_differ(*policy, "multipole", fixed, data, q, pool));
  }
  EXPECT_LT(ambiguous, total / 10 + 1);
}

// The select_by_exact_mass experiment (a cluster oracle) against the reference, which sums
// each cluster's members' softmax itself, on one and two levels, with and without the far
// field, at real positions and at the scoring position; random keys make centroid scores a
// poor guide, so the selection changes the output (else the test would not test it).
TEST(MultipolePolicy, SelectionByExactMassMatchesReference) {
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (auto levels : {std::vector<int>{8}, std::vector<int>{8, 64}})
    for (int mode = 0; mode < 3; ++mode) {
      const bool far = mode != 1;
      AttentionConfig c = experiment_config(levels);
      c.multipole_far_field = far;
      c.select_by_exact_mass = true;
      c.mass_at_score_position = mode == 2;
      ref::SyntheticKV data(c, DType::BF16, 2, 8192, ref::KeyKind::Random, 53);
      for (int64_t len : {97, 2049, 2600}) data.append(data.add(), len);
      const std::string name = far ? "multipole" : "squeezed";
      auto policy = make_attention_policy(name, c);
      const auto q = data.queries(c, 0.25f);
      const Check r = check_policy(*policy, data, c, 1, q, pool,
                                   name + " levels " + std::to_string(levels.size()) + " mode " + std::to_string(mode));
      total += r.groups;
      ambiguous += r.ambiguous;
      AttentionConfig by_centroid = c;
      by_centroid.select_by_exact_mass = false;
      by_centroid.mass_at_score_position = false;
      EXPECT_TRUE(outputs_differ(*policy, name, by_centroid, data, q, pool));
    }
  EXPECT_LT(ambiguous, total / 10 + 1);
  AttentionConfig both = make_config(4, 64);
  both.select_by_exact_mass = true;
  both.coarse_radius_weight = 1.0f;
  EXPECT_THROW(make_attention_policy("multipole", both), Error);
  AttentionConfig real = make_config(4, 64);
  real.select_by_exact_mass = real.mass_at_score_position = real.score_real_positions = true;
  EXPECT_THROW(make_attention_policy("multipole", real), Error);
}

TEST(MultipolePolicy, ScoringWithSpreadMatchesReference) {
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (auto levels : {std::vector<int>{8}, std::vector<int>{8, 64}})
    for (bool far : {true, false}) {
      AttentionConfig c = experiment_config(levels);
      c.multipole_far_field = far;
      c.score_with_spread = true;
      ref::SyntheticKV data(c, DType::BF16, 2, 8192, ref::KeyKind::Clustered, 59);
      for (int64_t len : {97, 2049, 2600}) data.append(data.add(), len);
      const std::string name = far ? "multipole" : "squeezed";
      auto policy = make_attention_policy(name, c);
      const auto q = data.queries(c, 0.25f);
      const Check r = check_policy(*policy, data, c, 1, q, pool, name + " levels " + std::to_string(levels.size()));
      total += r.groups;
      ambiguous += r.ambiguous;
      AttentionConfig by_centroid = c;
      by_centroid.score_with_spread = false;
      EXPECT_TRUE(outputs_differ(*policy, name, by_centroid, data, q, pool));
    }
  EXPECT_LT(ambiguous, total / 10 + 1);
  for (auto bad : {&AttentionConfig::score_real_positions, &AttentionConfig::far_field_real_positions,
                   &AttentionConfig::select_by_exact_mass}) {
    AttentionConfig c = make_config(4, 64);
    c.score_with_spread = true;
    c.*bad = true;
    EXPECT_THROW(make_attention_policy("multipole", c), Error);
  }
}

// rerank_tokens against the reference, which takes the candidates by their centroids, sums
// each one's members' exact softmax itself and gives an unchosen one its exact mass in the far
// field; one and two levels, with and without the far field, clustered and random keys.
TEST(MultipolePolicy, RerankMatchesReference) {
  ThreadPool pool(2);
  int total = 0, ambiguous = 0;
  for (auto levels : {std::vector<int>{8}, std::vector<int>{8, 64}})
    for (auto kind : {ref::KeyKind::Clustered, ref::KeyKind::Random})
      for (bool far : {true, false}) {
        AttentionConfig c = experiment_config(levels);
        c.multipole_far_field = far;
        c.rerank_tokens = 4 * c.budget;
        ref::SyntheticKV data(c, DType::BF16, 2, 8192, kind, 61);
        for (int64_t len : {97, 2049, 2600}) data.append(data.add(), len);
        const std::string name = far ? "multipole" : "squeezed";
        auto policy = make_attention_policy(name, c);
        const auto q = data.queries(c, kind == ref::KeyKind::Random ? 1.0f : 0.25f);
        const Check r = check_policy(*policy, data, c, 1, q, pool,
                                     name + " levels " + std::to_string(levels.size()) +
                                         (kind == ref::KeyKind::Random ? " random" : " clustered"));
        total += r.groups;
        ambiguous += r.ambiguous;
        AttentionConfig plain = c;
        plain.rerank_tokens = 0;
        EXPECT_TRUE(outputs_differ(*policy, name, plain, data, q, pool));
      }
  EXPECT_LT(ambiguous, total / 10 + 1);
  AttentionConfig at_budget = make_config(4, 64);
  at_budget.rerank_tokens = at_budget.budget;
  EXPECT_THROW(make_attention_policy("multipole", at_budget), Error);
  for (auto other : {&AttentionConfig::select_by_exact_mass, &AttentionConfig::score_with_spread}) {
    AttentionConfig both = make_config(4, 64);
    both.rerank_tokens = 4 * both.budget;
    both.*other = true;
    EXPECT_THROW(make_attention_policy("multipole", both), Error);
  }
}

TEST(MultipolePolicy, DefaultConfigPastABlockBoundary) {
  // Default clustering (block 8192, {16, 128}, window 128, budget 128) on sequences with
  // two blocks, plus a short one; group size 4, head dim 128, one KV head (k-means over
  // 8192-token blocks is the slow part).
  AttentionConfig c = make_config(4, 128, 1);
  const int64_t long_len = small_scale() ? 10 + 8192 + 4096 + 200 : 10 + 8192 + 7000 + 300;
  ref::SyntheticKV data(c, DType::BF16, 1, long_len + 4096, ref::KeyKind::Clustered, 31, 128);
  data.append(data.add(), long_len);
  data.append(data.add(), 300);
  ThreadPool pool(2);
  for (bool far : {true, false}) {
    c.multipole_far_field = far;
    auto policy = make_attention_policy(far ? "multipole" : "squeezed", c);
    const auto q = data.queries(c, 0.25f);
    check_policy(*policy, data, c, 0, q, pool, far ? "multipole" : "squeezed");
    EXPECT_EQ(find_cluster_index(*policy, data.seqs[0], 0, 0)->blocks().size(), 2u);
  }
}

TEST(MultipolePolicy, BudgetCoveringAllTokensIsDense) {
  ThreadPool pool(2);
  for (int levels : {1, 2, 3}) {
    AttentionConfig c = make_config(4, 64);
    c.cluster.tokens_per_centroid = std::vector<int>{8, 64, 256};
    c.cluster.tokens_per_centroid.resize(size_t(levels));
    c.budget = 1 << 20;
    ref::SyntheticKV data(c, DType::BF16, 1, 8192, ref::KeyKind::Random, 41);
    for (int64_t len : {1, 11, 300, 2049}) data.append(data.add(), len);
    auto policy = make_attention_policy("multipole", c);
    const auto q = data.queries(c, 1.0f);
    const auto err = errors_vs_dense(*policy, data, c, q, pool);
    EXPECT_EQ(policy->last_stats().pseudo_tokens, 0);
    for (size_t i = 0; i < err.size(); ++i) EXPECT_LT(err[i], 2e-5) << "levels " << levels << " group " << i;
  }
}

// Also with only the far field at real positions (far_field_real_positions): whatever the
// fixed-position scores select, the unselected singletons' far-field terms are their tokens' own.
TEST(MultipolePolicy, SingletonClustersInRealPositionModeAreDenseForAnyBudget) {
  ThreadPool pool(2);
  AttentionConfig c = make_config(5, 64);
  c.cluster.tokens_per_centroid = {1};
  c.cluster.window = 32;
  c.cluster.prefill_iterations = 2;
  ref::SyntheticKV data(c, DType::BF16, 1, 4096, ref::KeyKind::Clustered, 51);
  for (int64_t len : {1, 97, 700}) data.append(data.add(), len);
  for (const bool far_only : {false, true})
  for (int budget : {0, 7, 64, 100000}) {
    c.score_real_positions = !far_only;
    c.far_field_real_positions = far_only;
    c.budget = budget;
    c.coarse_budget = 0;
    auto policy = make_attention_policy("multipole", c);
    const auto q = data.queries(c, 0.3f);
    const auto err = errors_vs_dense(*policy, data, c, q, pool);
    for (size_t i = 0; i < err.size(); ++i)
      EXPECT_LT(err[i], 5e-5) << (far_only ? "far field only, " : "") << "budget " << budget << " group " << i;
    for (SeqId seq : data.seqs)
      for (int h = 0; h < c.num_kv_heads; ++h) {
        const ClusterIndex* idx = find_cluster_index(*policy, seq, 0, h);
        for (int64_t i = 0; i < idx->level(0).count(); ++i) ASSERT_EQ(idx->level(0).sizes[i], 1);
      }
  }
}

TEST(MultipoleVsSqueezed, FarFieldReducesErrorOnClusteredInputs) {
  ThreadPool pool(2);
  AttentionConfig c = make_config(4, 128, 4);
  c.budget = 64;
  ref::SyntheticKV data(c, DType::BF16, 1, 16384, ref::KeyKind::Clustered, 61, 96);
  for (int i = 0; i < 3; ++i) data.append(data.add(), small_scale() ? 2000 : 4000);
  const auto q = data.queries(c, 0.15f);
  double err[2] = {0, 0};
  for (bool far : {true, false}) {
    c.multipole_far_field = far;
    auto policy = make_attention_policy(far ? "multipole" : "squeezed", c);
    for (double e : errors_vs_dense(*policy, data, c, q, pool)) err[far ? 0 : 1] += e;
  }
  std::printf("[ info ] mean relative error vs dense: multipole %.4f, squeezed %.4f\n", err[0] / 12, err[1] / 12);
  EXPECT_LT(err[0], 0.7 * err[1]);
}

TEST(MultipolePolicy, HierarchyScoresFarFewerCentroidsThanFineClusters) {
  ThreadPool pool(2);
  AttentionConfig c = make_config(4, 64, 1);
  const int64_t len = small_scale() ? 12000 : 32000;
  ref::SyntheticKV data(c, DType::BF16, 1, len + 1024, ref::KeyKind::Clustered, 71, 256);
  data.append(data.add(), len);
  auto policy = make_attention_policy("multipole", c);
  const auto q = data.queries(c, 0.25f);
  policy->update(*data.cache, 0, data.seqs, pool);
  std::vector<float> out(q.size());
  policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
  const ClusterIndex* idx = find_cluster_index(*policy, data.seqs[0], 0, 0);
  const int64_t fine = idx->level(0).count(), coarse = idx->level(1).count();
  const DecodeStats st = policy->last_stats();
  std::printf("[ info ] %lld tokens: %lld fine, %lld coarse clusters; %lld scored, %lld pseudo-tokens\n",
              (long long)len, (long long)fine, (long long)coarse, (long long)st.centroids_scored,
              (long long)st.pseudo_tokens);
  // Default levels 16/64: every coarse centroid (fine/4) plus the children of the coarse
  // clusters within the coarse budget (16 x budget tokens, so ~budget fine clusters; twice
  // that allows for the last coarse cluster and uneven sizes): about fine/3 at 32K.
  EXPECT_LT(st.centroids_scored, fine / 2);
  EXPECT_LE(st.centroids_scored, coarse + 2 * c.budget);
  EXPECT_GE(st.centroids_scored, coarse);
  EXPECT_LE(st.selected_tokens, c.budget);
  EXPECT_GT(st.selected_tokens, c.budget / 2);
}

TEST(MultipolePolicy, OnlineUpdatesThenDecodeMatchReference) {
  // Generation: one token at a time, update + decode each step; compare with the
  // reference every few steps (the index there is whatever the online updates made).
  ThreadPool pool(2);
  AttentionConfig c = make_config(4, 64);
  c.cluster.window = 32;
  c.cluster.block_size = 512;
  c.cluster.tokens_per_centroid = {8, 32};
  c.budget = 48;
  ref::SyntheticKV data(c, DType::BF16, 1, 8192, ref::KeyKind::Clustered, 81);
  data.append(data.add(), 400);
  data.append(data.add(), 40);
  auto policy = make_attention_policy("multipole", c);
  const int steps = small_scale() ? 300 : 800;
  std::vector<float> out;
  for (int step = 0; step < steps; ++step) {
    for (SeqId s : data.seqs) data.append(s, 1);
    const auto q = data.queries(c, 0.25f);
    if (step % 97 == 0 || step == steps - 1) {
      check_policy(*policy, data, c, 0, q, pool, "step " + std::to_string(step));
    } else {
      policy->update(*data.cache, 0, data.seqs, pool);
      out.resize(q.size());
      policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
    }
  }
  EXPECT_GE(find_cluster_index(*policy, data.seqs[0], 0, 1)->blocks().size(), 2u);
}

TEST(MultipolePolicy, SameSeedSameOutputOtherSeedOtherClustering) {
  ThreadPool pool(2);
  AttentionConfig c = make_config(4, 64);
  ref::SyntheticKV data(c, DType::BF16, 1, 8192, ref::KeyKind::Clustered, 91);
  data.append(data.add(), 3000);
  const auto q = data.queries(c, 0.25f);
  auto run = [&](uint64_t seed, std::vector<int32_t>* labels) {
    c.cluster.seed = seed;
    auto policy = make_attention_policy("multipole", c);
    policy->update(*data.cache, 0, data.seqs, pool);
    std::vector<float> out(q.size());
    policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
    auto l = find_cluster_index(*policy, data.seqs[0], 0, 1)->labels();
    labels->assign(l.begin(), l.end());
    return out;
  };
  std::vector<int32_t> la, lb, lc;
  const auto a = run(5, &la), b = run(5, &lb), other = run(6, &lc);
  EXPECT_EQ(a, b);
  EXPECT_EQ(la, lb);
  EXPECT_NE(la, lc);
}

TEST(MultipolePolicy, DecodeDoesNotAllocateOnceWarm) {
#ifndef MULTIPOLE_COUNT_ALLOCATIONS
  GTEST_SKIP() << "allocation counting is off under ASan";
#else
  ThreadPool pool(2);
  // fixed position, real positions, the far field at real positions, re-ranked candidates
  for (int mode : {0, 1, 2, 3}) {
    AttentionConfig c = make_config(8, 128);
    c.score_real_positions = mode == 1;
    c.far_field_real_positions = mode == 2;
    c.rerank_tokens = mode == 3 ? 4 * c.budget : 0;
    ref::SyntheticKV data(c, DType::BF16, 1, 16384, ref::KeyKind::Clustered, 101);
    data.append(data.add(), 5000);
    data.append(data.add(), 700);
    auto policy = make_attention_policy("multipole", c);
    policy->update(*data.cache, 0, data.seqs, pool);
    const auto q = data.queries(c, 0.25f);
    std::vector<float> out(q.size());
    policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
    for (int i = 0; i < 4; ++i) {
      allocations = 0;
      counting = true;
      policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
      counting = false;
      EXPECT_EQ(allocations.load(), 0) << "mode " << mode << ", call " << i;
    }
  }
#endif
}

TEST(MultipolePolicy, RejectsMisuse) {
  ThreadPool pool(2);
  AttentionConfig c = make_config(2, 64);
  ref::SyntheticKV data(c, DType::BF16, 2, 4096, ref::KeyKind::Random, 111);
  data.append(data.add(), 500);
  auto policy = make_attention_policy("multipole", c);
  const auto q = data.queries(c, 1.0f);
  std::vector<float> out(q.size());
  EXPECT_THROW(policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool), Error);  // no update yet
  EXPECT_THROW(policy->update(*data.cache, 2, data.seqs, pool), Error);                        // bad layer
  const std::vector<SeqId> twice = {data.seqs[0], data.seqs[0]};
  EXPECT_THROW(policy->update(*data.cache, 0, twice, pool), Error);
  policy->update(*data.cache, 0, data.seqs, pool);
  policy->decode(*data.cache, 0, data.seqs, q.data(), out.data(), pool);
  EXPECT_THROW(policy->decode(*data.cache, 1, data.seqs, q.data(), out.data(), pool), Error);  // layer 1 not indexed
  // A freed and re-added sequence id without forget(): the cache is shorter than the index.
  data.cache->free_sequence(data.seqs[0]);
  const SeqId again = data.cache->add_sequence();
  ASSERT_EQ(again, data.seqs[0]);
  data.append(again, 300);
  EXPECT_THROW(policy->update(*data.cache, 0, data.seqs, pool), Error);
  policy->forget(again);
  EXPECT_EQ(find_cluster_index(*policy, again, 0, 0), nullptr);
  policy->update(*data.cache, 0, data.seqs, pool);
  EXPECT_NE(find_cluster_index(*policy, again, 0, 0), nullptr);
  // Wrong cache shape.
  AttentionConfig other = make_config(2, 128);
  auto p2 = make_attention_policy("squeezed", other);
  EXPECT_THROW(p2->update(*data.cache, 0, data.seqs, pool), Error);
  AttentionConfig negative = c;
  negative.coarse_radius_weight = -1.0f;
  EXPECT_THROW(make_attention_policy("multipole", negative), Error);
}

// Timing harness (not a test): decode step and online update cost at 32K and 128K tokens,
// Qwen3-8B head shapes (32 q heads, 8 KV heads, d 128), bf16 KV, batch 1, budget 128.
// Costs are CPU time of one thread (a pool of 1), which a shared machine disturbs less
// than wall time; wall time with 2 threads is printed too.
// Run with --gtest_also_run_disabled_tests --gtest_filter='*Timing*'; MULTIPOLE_TIMING_LENGTHS
// (comma separated) overrides the lengths.
double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

TEST(MultipolePolicy, DISABLED_Timing) {
  ThreadPool one(1), two(2);
  std::vector<int64_t> lengths = {32768, 131072};
  if (const char* env = std::getenv("MULTIPOLE_TIMING_LENGTHS")) {
    lengths.clear();
    for (const char* p = env; *p;) {
      lengths.push_back(std::strtoll(p, const_cast<char**>(&p), 10));
      if (*p == ',') ++p;
    }
  }
  for (int64_t len : lengths) {
    AttentionConfig c = make_config(4, 128, 8);
    ref::SyntheticKV data(c, DType::BF16, 1, len + 4096, ref::KeyKind::Clustered, 7, 512);
    data.append(data.add(), len);
    auto dense = make_attention_policy("dense", c);
    auto mp = make_attention_policy("multipole", c);
    double t0 = thread_seconds();
    mp->update(*data.cache, 0, data.seqs, one);
    const double prefill = thread_seconds() - t0;
    const auto q = data.queries(c, 0.25f);
    std::vector<float> out(q.size());
    auto cpu = [&](AttentionPolicy& p, int reps) {
      p.decode(*data.cache, 0, data.seqs, q.data(), out.data(), one);
      double s = thread_seconds();
      for (int i = 0; i < reps; ++i) p.decode(*data.cache, 0, data.seqs, q.data(), out.data(), one);
      return (thread_seconds() - s) / reps;
    };
    auto wall = [&](AttentionPolicy& p, int reps) {
      p.decode(*data.cache, 0, data.seqs, q.data(), out.data(), two);
      auto s = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) p.decode(*data.cache, 0, data.seqs, q.data(), out.data(), two);
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count() / reps;
    };
    const double td = cpu(*dense, 5), tm = cpu(*mp, 100), wd = wall(*dense, 5), wm = wall(*mp, 100);
    const DecodeStats st = mp->last_stats();
    // Online update: W new tokens, then one update (amortised over W decode steps).
    double tu = 0;
    const int updates = 16;
    for (int i = 0; i < updates; ++i) {
      data.append(data.seqs[0], c.cluster.window);
      double s = thread_seconds();
      mp->update(*data.cache, 0, data.seqs, one);
      tu += thread_seconds() - s;
    }
    tu /= updates;
    std::printf(
        "[ info ] %6lld tokens, 1 thread CPU: dense %.3f ms, multipole %.3f ms (%.1fx); 2 threads wall: dense %.3f "
        "ms, multipole %.3f ms (%.1fx)\n"
        "[ info ]   update %.3f ms = %.1f%% of a multipole step amortised over W=%d; prefill clustering %.2f s; "
        "per step: %lld exact, %lld scored, %lld pseudo, %.2f MB read\n",
        (long long)len, td * 1e3, tm * 1e3, td / tm, wd * 1e3, wm * 1e3, wd / wm, tu * 1e3,
        100.0 * tu / c.cluster.window / tm, c.cluster.window, prefill, (long long)st.exact_tokens,
        (long long)st.centroids_scored, (long long)st.pseudo_tokens, st.bytes_read / 1e6);
  }
}

}  // namespace
