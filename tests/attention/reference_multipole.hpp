#pragma once
// Naive float64 reference of Multipole Attention (docs/multipole-attention.md, section 3)
// over a given cluster index, plus synthetic key/value generators for the tests.
//
// The reference takes from the index only what defines the method's inputs: the
// membership (token labels, parents) and the centroids/sizes/mean positions. Everything
// else is recomputed here in double: rotations from Rope::inv_freq(), scores, the frontier
// softmax, the greedy selection by full sort, the exact part (tokens found by scanning the
// labels, not through the index's member lists), the far field and the final softmax.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/config.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/kv/paged_kv_cache.hpp"
#include "reference_dense.hpp"
#include "test_scale.hpp"
#include "attention/attention_test_config.hpp"

namespace multipole::reference {

// MULTIPOLE_TEST_SCALE=small (the sanitizer CI run): tests shrink their sizes.
using multipole::test::small_scale;

// Default attention config with G query heads per KV head and head dim d.
using multipole::test::attention_config;

// ||out - want|| / ||want|| (absolute when want is 0).
inline double relative_error(const float* out, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (out[i] - want[i]) * (out[i] - want[i]);
    den += want[i] * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// x rotated by `delta` positions (pure rotation, rotate-half layout), in double.
inline std::vector<double> rotated(const Rope& rope, const double* x, int d, double delta) {
  std::vector<double> y(x, x + d);
  const auto& f = rope.inv_freq();
  const int half = int(f.size());
  for (int i = 0; i < half; ++i) {
    const double c = std::cos(delta * f[i]), s = std::sin(delta * f[i]);
    y[i] = x[i] * c - x[i + half] * s;
    y[i + half] = x[i + half] * c + x[i] * s;
  }
  return y;
}

inline double dot(const std::vector<double>& a, const double* b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Greedy-with-skip by full sort: decreasing importance, ties to the lower id; a cluster is
// taken iff its size fits in what is left. Returns the chosen ids, ascending.
inline std::vector<int64_t> greedy_select(const std::vector<double>& importance, const std::vector<int64_t>& sizes,
                                          const std::vector<int64_t>& ids, int64_t budget) {
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return importance[a] > importance[b] || (importance[a] == importance[b] && ids[a] < ids[b]);
  });
  std::vector<int64_t> chosen;
  for (size_t i : order)
    if (sizes[i] <= budget) {
      budget -= sizes[i];
      chosen.push_back(ids[i]);
    }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

// Statistics of every cluster recomputed from the token labels (level l: the token's
// level-0 label followed up the parents), in double from the cache.
struct LevelStats {
  std::vector<int64_t> sizes, position_sums;
  std::vector<double> keys, values;  // [C, d] means (0 for an empty cluster)
};

inline std::vector<LevelStats> stats_from_labels(const ClusterIndex& idx, const SeqKV& kv, int h, const Rope& rope) {
  const int d = kv.d;
  std::vector<LevelStats> out(size_t(idx.num_levels()));
  for (int l = 0; l < idx.num_levels(); ++l) {
    const int64_t C = idx.level(l).count();
    auto& st = out[size_t(l)];
    st.sizes.assign(size_t(C), 0);
    st.position_sums.assign(size_t(C), 0);
    st.keys.assign(size_t(C) * d, 0.0);
    st.values.assign(size_t(C) * d, 0.0);
    for (int64_t p = idx.begin(); p < idx.end(); ++p) {
      int64_t c = idx.labels()[size_t(p - idx.begin())];
      for (int up = 0; up < l; ++up) c = idx.level(up).parents[size_t(c)];
      const std::vector<double> k0 = rotated(rope, kv.key(h, p), d, -double(p));
      ++st.sizes[size_t(c)];
      st.position_sums[size_t(c)] += p;
      for (int j = 0; j < d; ++j) {
        st.keys[size_t(c) * d + j] += k0[j];
        st.values[size_t(c) * d + j] += kv.value(h, p)[j];
      }
    }
    for (int64_t c = 0; c < C; ++c)
      if (st.sizes[size_t(c)] > 0)
        for (int j = 0; j < d; ++j) {
          st.keys[size_t(c) * d + j] /= double(st.sizes[size_t(c)]);
          st.values[size_t(c) * d + j] /= double(st.sizes[size_t(c)]);
        }
  }
  return out;
}

struct MultipoleResult {
  std::vector<double> out;       // [G, d]
  bool ambiguous = false;        // some selection flips under a 1e-5 relative perturbation
  int64_t exact_tokens = 0, selected_tokens = 0, centroids_scored = 0, far_clusters = 0;
  std::vector<int64_t> selected;  // chosen level-0 clusters, ascending
};

// Multipole (or squeezed, config.multipole_far_field = false) decode of one KV head.
//   q: [G, d] queries of the KV head's group, rotated to position length - 1
inline MultipoleResult multipole(const SeqKV& kv, int h, const ClusterIndex& idx, const AttentionConfig& c,
                                 const Rope& rope, const float* q, int G) {
  const int d = kv.d;
  const int64_t len = kv.length;
  const double scale = c.softmax_scale();
  const bool real = c.score_real_positions;
  MultipoleResult res;

  std::vector<std::vector<double>> qreal(static_cast<size_t>(G)), qscore(static_cast<size_t>(G));
  for (int g = 0; g < G; ++g) {
    qreal[size_t(g)].assign(q + g * d, q + (g + 1) * d);
    qscore[size_t(g)] = real ? qreal[size_t(g)]
                             : rotated(rope, qreal[size_t(g)].data(), d, c.score_position - double(len - 1));
  }
  // Centroid of (level, id) rotated to its members' mean position.
  auto at_mean_position = [&](int l, int64_t i) {
    const auto& lv = idx.level(l);
    const std::vector<double> k(lv.keys.begin() + i * d, lv.keys.begin() + (i + 1) * d);
    return rotated(rope, k.data(), d, lv.mean_position(i));
  };
  // Centroid of (level, id) as scored: fixed-position space, or rotated to its mean position.
  auto centroid = [&](int l, int64_t i) {
    const auto& lv = idx.level(l);
    return real ? at_mean_position(l, i) : std::vector<double>(lv.keys.begin() + i * d, lv.keys.begin() + (i + 1) * d);
  };

  struct Far {
    int l;
    int64_t id;
  };
  std::vector<Far> far;
  std::vector<std::vector<double>> far_logits(static_cast<size_t>(G));  // scale q.c + log n of the far clusters
  std::vector<int64_t> cand;
  std::set<int64_t> chosen0;
  const int L = idx.num_levels();
  if (L > 0)
    for (int64_t i = 0; i < idx.level(L - 1).count(); ++i)
      if (idx.level(L - 1).sizes[size_t(i)] > 0) cand.push_back(i);
  // select_by_exact_mass: each clustered token's sum over g of its softmax among the clustered
  // tokens under the real queries (mass_at_score_position: the scoring queries against the
  // keys rotated back to position 0).
  std::vector<double> token_mass;
  if (c.select_by_exact_mass) {
    token_mass.assign(size_t(idx.end() - idx.begin()), 0.0);
    for (int g = 0; g < G; ++g) {
      std::vector<double> x;
      double m = -std::numeric_limits<double>::infinity(), z = 0;
      for (int64_t p = idx.begin(); p < idx.end(); ++p) {
        x.push_back(c.mass_at_score_position
                        ? scale * dot(qscore[size_t(g)], rotated(rope, kv.key(h, p), d, -double(p)).data())
                        : scale * dot(qreal[size_t(g)], kv.key(h, p)));
        m = std::max(m, x.back());
      }
      for (double& v : x) z += v = std::exp(v - m);
      for (size_t t = 0; t < x.size(); ++t) token_mass[t] += x[t] / z;
    }
  }
  std::mt19937_64 rng(12345);
  for (int l = L - 1; l >= 0 && !cand.empty(); --l) {
    const auto& lv = idx.level(l);
    const size_t n = cand.size();
    res.centroids_scored += int64_t(n);
    std::vector<std::vector<double>> score(static_cast<size_t>(G), std::vector<double>(n));
    for (size_t i = 0; i < n; ++i) {
      const std::vector<double> ci = centroid(l, cand[i]);
      for (int g = 0; g < G; ++g) score[size_t(g)][i] = scale * dot(qscore[size_t(g)], ci.data());
    }
    if (c.score_with_spread) {
      // + s^2/2 sum_j q_j^2 v_j, v_j the mean of (k_j - c_j)^2 over the cluster's tokens at position 0.
      for (size_t i = 0; i < n; ++i) {
        const std::vector<double> ci = centroid(l, cand[i]);
        std::vector<double> v(size_t(d), 0.0);
        for (int64_t p = idx.begin(); p < idx.end(); ++p) {
          int64_t a = idx.labels()[size_t(p - idx.begin())];
          for (int up = 0; up < l; ++up) a = idx.level(up).parents[size_t(a)];
          if (a != cand[i]) continue;
          const std::vector<double> k0 = rotated(rope, kv.key(h, p), d, -double(p));
          for (int j = 0; j < d; ++j) v[size_t(j)] += (k0[size_t(j)] - ci[size_t(j)]) * (k0[size_t(j)] - ci[size_t(j)]);
        }
        for (int g = 0; g < G; ++g) {
          double acc = 0;
          for (int j = 0; j < d; ++j) acc += qscore[size_t(g)][size_t(j)] * qscore[size_t(g)][size_t(j)] * v[size_t(j)];
          score[size_t(g)][i] += 0.5 * scale * scale * acc / double(idx.level(l).sizes[size_t(cand[i])]);
        }
      }
    }
    std::vector<double> importance(n, 0.0);
    std::vector<int64_t> sizes(n);
    for (size_t i = 0; i < n; ++i) sizes[i] = lv.sizes[size_t(cand[i])];
    for (int g = 0; g < G; ++g) {
      double m = -std::numeric_limits<double>::infinity();
      for (double x : far_logits[size_t(g)]) m = std::max(m, x);
      for (size_t i = 0; i < n; ++i) m = std::max(m, score[size_t(g)][i] + std::log(double(sizes[i])));
      double z = 0;
      for (double x : far_logits[size_t(g)]) z += std::exp(x - m);
      for (size_t i = 0; i < n; ++i) z += double(sizes[i]) * std::exp(score[size_t(g)][i] - m);
      for (size_t i = 0; i < n; ++i) importance[i] += std::exp(score[size_t(g)][i] - m) / z;
    }
    if (l > 0 && c.coarse_radius_weight > 0) {
      // Coarse ranking by s (q.c + w |q| r): r from the children's centroids, computed here.
      std::vector<double> radius(n, 0.0);
      for (size_t i = 0; i < n; ++i) {
        const std::vector<double> ci = centroid(l, cand[i]);
        for (int64_t ch = 0; ch < idx.level(l - 1).count(); ++ch)
          if (idx.level(l - 1).parents[size_t(ch)] == cand[i] && idx.level(l - 1).sizes[size_t(ch)] > 0) {
            const std::vector<double> cc = centroid(l - 1, ch);
            double s = 0;
            for (int j = 0; j < d; ++j) s += (cc[size_t(j)] - ci[size_t(j)]) * (cc[size_t(j)] - ci[size_t(j)]);
            radius[i] = std::max(radius[i], std::sqrt(s));
          }
      }
      std::fill(importance.begin(), importance.end(), 0.0);
      for (int g = 0; g < G; ++g) {
        const double lift = scale * c.coarse_radius_weight * std::sqrt(dot(qscore[size_t(g)], qscore[size_t(g)].data()));
        std::vector<double> b(n);
        double m = -std::numeric_limits<double>::infinity(), z = 0;
        for (size_t i = 0; i < n; ++i) m = std::max(m, b[i] = score[size_t(g)][i] + lift * radius[i]);
        for (size_t i = 0; i < n; ++i) z += double(sizes[i]) * std::exp(b[i] - m);
        for (size_t i = 0; i < n; ++i) importance[i] += std::exp(b[i] - m) / z;
      }
    }
    if (c.select_by_exact_mass) {
      std::fill(importance.begin(), importance.end(), 0.0);
      for (int64_t p = idx.begin(); p < idx.end(); ++p) {
        int64_t a = idx.labels()[size_t(p - idx.begin())];
        for (int up = 0; up < l; ++up) a = idx.level(up).parents[size_t(a)];
        const auto it = std::lower_bound(cand.begin(), cand.end(), a);
        if (it != cand.end() && *it == a) importance[size_t(it - cand.begin())] += token_mass[size_t(p - idx.begin())];
      }
      for (size_t i = 0; i < n; ++i) importance[i] /= double(sizes[i]);
    }
    const int64_t budget =
        l == 0 ? c.budget : std::max<int64_t>(c.budget, c.coarse_budget > 0 ? c.coarse_budget : 16 * int64_t(c.budget));
    auto check_ties = [&](const std::vector<double>& imp, const std::vector<int64_t>& sz,
                          const std::vector<int64_t>& ids, int64_t b, const std::vector<int64_t>& want) {
      for (int trial = 0; trial < 6 && !res.ambiguous; ++trial) {
        std::vector<double> perturbed = imp;
        for (auto& x : perturbed) x *= 1.0 + 1e-5 * (double(rng() % 2001) / 1000.0 - 1.0);
        if (greedy_select(perturbed, sz, ids, b) != want) res.ambiguous = true;
      }
    };
    // rerank_tokens: the candidates worth that many tokens by their centroids are re-ranked by
    // their members' exact logits (real query, real positions), log-sum-exp'd a cluster.
    std::vector<int64_t> run_ids = cand, run_sizes = sizes;
    std::vector<double> run_importance = importance;
    std::vector<std::vector<double>> exact_lse(static_cast<size_t>(G), std::vector<double>(n, NAN));
    if (l == 0 && c.rerank_tokens > 0) {
      const std::vector<int64_t> pre = greedy_select(importance, sizes, cand, c.rerank_tokens);
      check_ties(importance, sizes, cand, c.rerank_tokens, pre);
      run_ids.clear(), run_sizes.clear(), run_importance.clear();
      std::vector<size_t> at;  // positions in cand of the re-ranked candidates
      for (size_t i = 0; i < n; ++i)
        if (std::binary_search(pre.begin(), pre.end(), cand[i])) at.push_back(i);
      for (int g = 0; g < G; ++g)
        for (size_t i : at) {
          double m = -std::numeric_limits<double>::infinity(), z = 0;
          std::vector<double> x;
          for (int64_t p = idx.begin(); p < idx.end(); ++p)
            if (idx.labels()[size_t(p - idx.begin())] == cand[i]) {
              x.push_back(scale * dot(qreal[size_t(g)], kv.key(h, p)));
              m = std::max(m, x.back());
            }
          for (double v : x) z += std::exp(v - m);
          exact_lse[size_t(g)][i] = m + std::log(z);
        }
      run_importance.assign(at.size(), 0.0);
      for (int g = 0; g < G; ++g) {
        auto logit = [&](size_t i) {
          return std::isnan(exact_lse[size_t(g)][i]) ? score[size_t(g)][i] + std::log(double(sizes[i]))
                                                     : exact_lse[size_t(g)][i];
        };
        double m = -std::numeric_limits<double>::infinity(), z = 0;
        for (double x : far_logits[size_t(g)]) m = std::max(m, x);
        for (size_t i = 0; i < n; ++i) m = std::max(m, logit(i));
        for (double x : far_logits[size_t(g)]) z += std::exp(x - m);
        for (size_t i = 0; i < n; ++i) z += std::exp(logit(i) - m);
        for (size_t j = 0; j < at.size(); ++j) run_importance[j] += std::exp(logit(at[j]) - m) / z;
      }
      for (size_t j = 0; j < at.size(); ++j) {
        run_ids.push_back(cand[at[j]]);
        run_sizes.push_back(sizes[at[j]]);
        run_importance[j] /= double(sizes[at[j]]);
      }
    }
    const std::vector<int64_t> chosen = greedy_select(run_importance, run_sizes, run_ids, budget);
    check_ties(run_importance, run_sizes, run_ids, budget, chosen);
    std::vector<int64_t> next;
    for (size_t i = 0; i < n; ++i) {
      if (std::binary_search(chosen.begin(), chosen.end(), cand[i])) {
        if (l > 0)
          for (int64_t ch = 0; ch < idx.level(l - 1).count(); ++ch)
            if (idx.level(l - 1).parents[size_t(ch)] == cand[i] && idx.level(l - 1).sizes[size_t(ch)] > 0)
              next.push_back(ch);
        continue;
      }
      far.push_back({l, cand[i]});
      for (int g = 0; g < G; ++g)
        far_logits[size_t(g)].push_back(std::isnan(exact_lse[size_t(g)][i])
                                            ? score[size_t(g)][i] + std::log(double(sizes[i]))
                                            : exact_lse[size_t(g)][i]);
    }
    if (l == 0) chosen0.insert(chosen.begin(), chosen.end());
    std::sort(next.begin(), next.end());
    cand = next;
  }
  res.selected.assign(chosen0.begin(), chosen0.end());
  res.far_clusters = int64_t(far.size());

  // Exact set: sinks, tokens whose label was chosen, window after the clustered region.
  std::vector<int64_t> exact = range(0, std::min<int64_t>(c.cluster.sinks, len));
  for (int64_t p = idx.begin(); p < idx.end(); ++p)
    if (chosen0.count(idx.labels()[size_t(p - idx.begin())])) {
      exact.push_back(p);
      ++res.selected_tokens;
    }
  for (int64_t p = std::max<int64_t>(c.cluster.sinks, idx.end()); p < len; ++p) exact.push_back(p);
  res.exact_tokens = int64_t(exact.size());

  res.out.assign(size_t(G) * d, 0.0);
  for (int g = 0; g < G; ++g) {
    std::vector<double> logit;
    std::vector<const double*> value;
    std::vector<std::vector<double>> far_values;
    for (int64_t p : exact) {
      logit.push_back(scale * dot(qreal[size_t(g)], kv.key(h, p)));
      value.push_back(kv.value(h, p));
    }
    if (c.multipole_far_field) {
      far_values.reserve(far.size());
      for (size_t i = 0; i < far.size(); ++i) {
        const auto& lv = idx.level(far[i].l);
        far_values.emplace_back(lv.values.begin() + far[i].id * d, lv.values.begin() + (far[i].id + 1) * d);
        if (c.far_field_real_positions && !real) {
          // The experiment: the centroid at its members' mean position against the real query
          // (the selection and its normalisation above kept the fixed-position logits).
          const std::vector<double> k = at_mean_position(far[i].l, far[i].id);
          logit.push_back(scale * dot(qreal[size_t(g)], k.data()) + std::log(double(lv.sizes[size_t(far[i].id)])));
        } else {
          logit.push_back(far_logits[size_t(g)][i]);
        }
        value.push_back(far_values.back().data());
      }
    }
    double m = -std::numeric_limits<double>::infinity(), z = 0;
    for (double x : logit) m = std::max(m, x);
    for (size_t t = 0; t < logit.size(); ++t) {
      const double e = std::exp(logit[t] - m);
      z += e;
      for (int j = 0; j < d; ++j) res.out[size_t(g) * d + j] += e * value[t][j];
    }
    if (z > 0)
      for (int j = 0; j < d; ++j) res.out[size_t(g) * d + j] /= z;
  }
  return res;
}

// ---- synthetic data ------------------------------------------------------------------------

// Keys for the tests: k0 (position-0 key) per token, stored after RoPE at its position.
enum class KeyKind {
  Random,     // i.i.d. normal keys and values
  Clustered,  // keys = one of `centers` + small noise, Zipf-like popularity; values
              // follow the center, so a cluster's value centroid summarises it well
  Skewed,     // as Clustered, but 85% of the tokens come from one center
};

struct SyntheticKV {
  std::unique_ptr<PagedKVCache> cache;
  std::vector<SeqId> seqs;
  KVCacheConfig config;
  Rope rope;
  KeyKind kind;
  std::mt19937 rng;
  std::vector<std::vector<float>> key_centers, value_centers;  // per KV head: [centers, d]
  int centers = 0;

  SyntheticKV(const AttentionConfig& c, DType dtype, int layers, int64_t capacity, KeyKind kind_, uint32_t seed,
              int centers_ = 64)
      : rope(c.rope), kind(kind_), rng(seed), centers(centers_) {
    config = KVCacheConfig{.num_layers = layers, .num_kv_heads = c.num_kv_heads, .head_dim = c.head_dim,
                           .page_size = 16, .dtype = dtype, .max_tokens = capacity};
    cache = std::make_unique<PagedKVCache>(config);
    std::normal_distribution<float> nd;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      std::vector<float> kc(size_t(centers) * c.head_dim), vc(kc.size());
      for (auto& x : kc) x = 2.0f * nd(rng);
      for (auto& x : vc) x = nd(rng);
      key_centers.push_back(kc);
      value_centers.push_back(vc);
    }
  }

  SeqId add() {
    seqs.push_back(cache->add_sequence());
    return seqs.back();
  }

  // Appends n tokens to every layer of seq.
  void append(SeqId seq, int64_t n) {
    const int H = config.num_kv_heads, d = config.head_dim;
    const int64_t pos = cache->extend(seq, n);
    std::normal_distribution<float> nd;
    // Zipf-like popularity: center j with weight 1/(j+1)^1.3.
    std::vector<double> w(static_cast<size_t>(centers));
    for (int j = 0; j < centers; ++j) w[size_t(j)] = 1.0 / std::pow(j + 1.0, 1.3);
    std::discrete_distribution<int> pick(w.begin(), w.end());
    for (int layer = 0; layer < config.num_layers; ++layer) {
      std::vector<float> k(size_t(n) * H * d), v(k.size());
      for (int64_t t = 0; t < n; ++t)
        for (int h = 0; h < H; ++h) {
          float* kt = k.data() + (t * H + h) * d;
          float* vt = v.data() + (t * H + h) * d;
          if (kind == KeyKind::Random) {
            for (int j = 0; j < d; ++j) {
              kt[j] = nd(rng);
              vt[j] = nd(rng);
            }
          } else {
            const int cidx = kind == KeyKind::Skewed ? (rng() % 100 < 85 ? 0 : 1 + int(rng() % (centers - 1)))
                                                     : pick(rng);
            for (int j = 0; j < d; ++j) {
              kt[j] = key_centers[size_t(h)][size_t(cidx) * d + j] + 0.15f * nd(rng);
              vt[j] = value_centers[size_t(h)][size_t(cidx) * d + j] + 0.1f * nd(rng);
            }
          }
          rope.apply(kt, double(pos + t));
        }
      cache->write(seq, layer, pos, n, k.data(), v.data());
    }
  }

  // Queries [seqs, num_q_heads, d], rotated to each sequence's last position. Clustered
  // data: each query head aims at a random key center, so attention is peaked.
  std::vector<float> queries(const AttentionConfig& c, float magnitude) {
    std::normal_distribution<float> nd;
    std::uniform_int_distribution<int> any(0, centers - 1);
    const int d = c.head_dim, G = c.group_size();
    std::vector<float> q(seqs.size() * c.num_q_heads * d);
    for (size_t b = 0; b < seqs.size(); ++b)
      for (int hq = 0; hq < c.num_q_heads; ++hq) {
        float* x = q.data() + (b * c.num_q_heads + hq) * d;
        const int cidx = any(rng);
        for (int j = 0; j < d; ++j)
          x[j] = kind == KeyKind::Random ? magnitude * nd(rng)
                                         : magnitude * key_centers[size_t(hq / G)][size_t(cidx) * d + j] / 2.0f +
                                               0.3f * magnitude * nd(rng);
        rope.apply(x, double(cache->length(seqs[b]) - 1));
      }
    return q;
  }
};

}  // namespace multipole::reference
