#pragma once
// Naive float64 references for the dense, quest and oracle-topk policies. K/V are read
// back through PagedKVCache::read_keys/read_values, so a reference sees exactly the stored
// (possibly bf16/f16-rounded) data; everything after that is double precision and written
// straight from the formulas, sharing nothing with the code under test.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole::reference {

// One sequence's keys and values for one layer, per KV head: [length, d].
struct SeqKV {
  int d = 0;
  int64_t length = 0;
  std::vector<std::vector<double>> keys, values;

  SeqKV(const PagedKVCache& cache, SeqId seq, int layer) : d(cache.config().head_dim), length(cache.length(seq)) {
    std::vector<float> buf(size_t(length) * d);
    for (int h = 0; h < cache.config().num_kv_heads; ++h) {
      if (length > 0) cache.read_keys(seq, layer, h, 0, length, buf.data());
      keys.emplace_back(buf.begin(), buf.end());
      if (length > 0) cache.read_values(seq, layer, h, 0, length, buf.data());
      values.emplace_back(buf.begin(), buf.end());
    }
  }
  const double* key(int h, int64_t pos) const { return keys[h].data() + pos * d; }
  const double* value(int h, int64_t pos) const { return values[h].data() + pos * d; }
};

inline double dot(const float* q, const double* k, int d) {
  double s = 0;
  for (int c = 0; c < d; ++c) s += double(q[c]) * k[c];
  return s;
}

// softmax(scale q_g . k_t) v_t over `positions` of KV head h for G query heads. q: [G, d];
// returns [G, d].
inline std::vector<double> attend(const SeqKV& kv, int h, const std::vector<int64_t>& positions, const float* q,
                                  int G, double scale) {
  const int d = kv.d;
  std::vector<double> out(size_t(G) * d, 0.0);
  for (int g = 0; g < G; ++g) {
    std::vector<double> x;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t p : positions) {
      x.push_back(scale * dot(q + g * d, kv.key(h, p), d));
      m = std::max(m, x.back());
    }
    double l = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      double e = std::exp(x[i] - m);
      l += e;
      for (int c = 0; c < d; ++c) out[g * d + c] += e * kv.value(h, positions[i])[c];
    }
    if (l > 0)
      for (int c = 0; c < d; ++c) out[g * d + c] /= l;
  }
  return out;
}

inline std::vector<int64_t> range(int64_t begin, int64_t end) {
  std::vector<int64_t> r;
  for (int64_t p = begin; p < end; ++p) r.push_back(p);
  return r;
}

// The three regions of a sequence of `length` tokens.
struct Regions {
  int64_t sinks, middle_end, length;
};
inline Regions regions(const AttentionConfig& c, int64_t length) {
  return {std::min<int64_t>(c.cluster.sinks, length), c.middle_end(length), length};
}

// Sinks + the chosen middle positions + window, ascending.
inline std::vector<int64_t> with_sinks_and_window(const Regions& r, std::vector<int64_t> middle) {
  std::sort(middle.begin(), middle.end());
  std::vector<int64_t> all = range(0, r.sinks);
  all.insert(all.end(), middle.begin(), middle.end());
  for (int64_t p = r.middle_end; p < r.length; ++p) all.push_back(p);
  return all;
}

// A selection and how clear-cut it was: `margin` is the relative gap between the last
// chosen and the first rejected score (infinity when nothing was rejected). Where it is
// tiny, float rounding in the policy may legitimately pick the other candidate.
struct Selection {
  std::vector<int64_t> positions;  // sinks + chosen + window
  int64_t chosen_tokens = 0;
  double margin = std::numeric_limits<double>::infinity();
};

// Indices of the top k scores (ties to the lower index) and the relative margin.
inline std::vector<int64_t> top_k(const std::vector<double>& score, int64_t k, double& margin) {
  std::vector<int64_t> idx(score.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  margin = std::numeric_limits<double>::infinity();
  if (k < int64_t(idx.size())) {
    if (k > 0) {
      const double a = score[idx[k - 1]], b = score[idx[k]];
      margin = (a - b) / std::max(1e-30, std::abs(a));
    }
    idx.resize(k);
  }
  return idx;
}

// Quest: pages of P tokens from `sinks`; bound_g = sum_c max(q_gc min_c, q_gc max_c),
// page score = max_g bound_g; top floor(budget / P) pages (a partial last page counts).
inline Selection quest(const SeqKV& kv, int h, const AttentionConfig& c, const float* q, int G) {
  const Regions r = regions(c, kv.length);
  const int P = c.quest_page_size, d = kv.d;
  std::vector<double> score;
  std::vector<std::pair<int64_t, int64_t>> pages;
  for (int64_t b = r.sinks; b < r.middle_end; b += P) {
    const int64_t e = std::min<int64_t>(b + P, r.middle_end);
    pages.push_back({b, e});
    double best = -std::numeric_limits<double>::infinity();
    for (int g = 0; g < G; ++g) {
      double bound = 0;
      for (int ch = 0; ch < d; ++ch) {
        double lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (int64_t p = b; p < e; ++p) {
          lo = std::min(lo, kv.key(h, p)[ch]);
          hi = std::max(hi, kv.key(h, p)[ch]);
        }
        const double qc = q[g * d + ch];
        bound += std::max(qc * lo, qc * hi);
      }
      best = std::max(best, bound);
    }
    score.push_back(best);
  }
  Selection s;
  std::vector<int64_t> middle;
  for (int64_t i : top_k(score, c.budget / P, s.margin))
    for (int64_t p = pages[i].first; p < pages[i].second; ++p) middle.push_back(p);
  s.chosen_tokens = int64_t(middle.size());
  s.positions = with_sinks_and_window(r, middle);
  return s;
}

// Oracle top-k: importance(t) = sum_g softmax_g(scale q_g . k_t) over the middle region;
// the top `budget` keys.
inline Selection oracle_topk(const SeqKV& kv, int h, const AttentionConfig& c, const float* q, int G) {
  const Regions r = regions(c, kv.length);
  const int64_t M = r.middle_end - r.sinks;
  const double scale = c.softmax_scale();
  std::vector<double> importance(M, 0.0);
  for (int g = 0; g < G; ++g) {
    std::vector<double> x(M);
    double m = -std::numeric_limits<double>::infinity(), z = 0;
    for (int64_t t = 0; t < M; ++t) m = std::max(m, x[t] = scale * dot(q + g * kv.d, kv.key(h, r.sinks + t), kv.d));
    for (int64_t t = 0; t < M; ++t) z += std::exp(x[t] - m);
    for (int64_t t = 0; t < M; ++t) importance[t] += std::exp(x[t] - m) / z;
  }
  Selection s;
  std::vector<int64_t> middle = top_k(importance, std::min<int64_t>(c.budget, M), s.margin);
  for (auto& p : middle) p += r.sinks;
  s.chosen_tokens = int64_t(middle.size());
  s.positions = with_sinks_and_window(r, middle);
  return s;
}

}  // namespace multipole::reference
