#pragma once
// Pieces shared by the CPU decode of the policies: argument checks, per-thread scratch and
// the exact pass over sinks + selected positions + local window.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "attention/decode_kernels.hpp"
#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cpu {

// Checks that cache, layer, sequences and buffers fit the policy's config.
inline void check_decode_args(std::string_view policy, const AttentionConfig& c, const PagedKVCache& cache, int layer,
                              std::span<const SeqId> seqs, const float* q, float* out) {
  const auto& kc = cache.config();
  MP_CHECK(kc.num_kv_heads == c.num_kv_heads, "{}: cache has {} KV heads, the attention config {}", policy,
           kc.num_kv_heads, c.num_kv_heads);
  MP_CHECK(kc.head_dim == c.head_dim, "{}: cache head_dim {} differs from the attention config's {}", policy,
           kc.head_dim, c.head_dim);
  MP_CHECK(layer >= 0 && layer < kc.num_layers, "{}: layer {} out of range [0, {})", policy, layer, kc.num_layers);
  MP_CHECK(seqs.empty() || (q && out), "{}: q and out must not be null", policy);
  for (SeqId s : seqs)
    MP_CHECK(cache.length(s) > 0, "{}: sequence {} is empty; decode needs at least the current token", policy, s);
}

// One object per pool thread, created on first use and reused afterwards.
template <class Scratch>
class PerThread {
 public:
  Scratch& operator[](int thread) { return items_[size_t(thread)]; }
  void ensure(int threads) {
    if (int(items_.size()) < threads) items_.resize(size_t(threads));
  }

 private:
  std::vector<Scratch> items_;
};

// Grows a vector to at least n elements (geometrically, so that a slowly growing
// sequence reallocates rarely) and returns its data.
template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(std::max(n, v.size() * 3 / 2));
  return v.data();
}

// Length of the longest sequence of a batch: per-thread scratch is sized for it before the
// parallel part, since which thread runs which task varies.
inline int64_t longest_sequence(const PagedKVCache& cache, std::span<const SeqId> seqs) {
  int64_t longest = 0;
  for (SeqId s : seqs) longest = std::max(longest, cache.length(s));
  return longest;
}

// Sums the per-thread stats of one decode call.
inline DecodeStats sum_stats(std::span<const DecodeStats> parts) {
  DecodeStats s;
  for (const auto& p : parts) {
    s.exact_tokens += p.exact_tokens;
    s.selected_tokens += p.selected_tokens;
    s.centroids_scored += p.centroids_scored;
    s.pseudo_tokens += p.pseudo_tokens;
    s.bytes_read += p.bytes_read;
  }
  return s;
}

// imp[t] = sum_g softmax_g(x_g)[t]: a key's importance for the GQA group, each query head's
// softmax taken over the same n keys (oracle-topk; multipole's exact-mass experiment).
//   x: [G, n] logits, overwritten by e^{x - max}; imp: [n] out
inline void group_importance(float* x, int groups, int64_t n, float* imp) {
  std::fill(imp, imp + n, 0.0f);
  if (n == 0) return;
  for (int g = 0; g < groups; ++g) {
    float* xg = x + g * n;
    const float mx = *std::max_element(xg, xg + n);
    for (int64_t t = 0; t < n; ++t) xg[t] -= mx;
    kernels::exp_inplace(xg, n);
    double z = 0;
    for (int64_t t = 0; t < n; ++t) z += xg[t];
    const float inv = float(1.0 / z);
    for (int64_t t = 0; t < n; ++t) imp[t] += xg[t] * inv;
  }
}

// Exact attention over sinks [0, sinks), the selected middle positions (ascending) and the
// local window [middle_end, length), as one list so blocks span region boundaries.
// `positions` is scratch. Returns the number of keys attended.
inline int64_t attend_sparse(const KVLayerView& kv, const int32_t* page_table, int head, int64_t sinks,
                             int64_t middle_end, int64_t length, std::span<const int32_t> selected, const float* q,
                             float scale, kernels::SoftmaxState& state, std::vector<int32_t>& positions) {
  const int64_t n = sinks + int64_t(selected.size()) + (length - middle_end);
  int32_t* p = grow(positions, size_t(n));
  for (int64_t i = 0; i < sinks; ++i) *p++ = int32_t(i);
  p = std::copy(selected.begin(), selected.end(), p);
  for (int64_t i = middle_end; i < length; ++i) *p++ = int32_t(i);
  kernels::attend_positions(kv, page_table, head, positions.data(), n, q, scale, state);
  return n;
}

// attend_sparse for G query heads from an empty state, normalised into `out`, with the work
// counted into `stats`.
//   q, out: [G, d]; `state` and `positions` are the calling thread's scratch
inline void attend_selected(const KVLayerView& kv, const int32_t* page_table, int head, int64_t sinks,
                            int64_t middle_end, int64_t length, std::span<const int32_t> selected, const float* q,
                            int groups, float scale, float* out, kernels::OwnedState& state,
                            std::vector<int32_t>& positions, DecodeStats& stats) {
  kernels::SoftmaxState& st = state.resize(groups, kv.head_dim);
  st.reset();
  const int64_t n = attend_sparse(kv, page_table, head, sinks, middle_end, length, selected, q, scale, st, positions);
  kernels::finalize(st, out);
  stats.exact_tokens += n;
  stats.selected_tokens += int64_t(selected.size());
  stats.bytes_read += n * 2 * kv.token_bytes;
}

}  // namespace multipole::cpu
