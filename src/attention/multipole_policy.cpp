// Multipole Attention decode on the CPU (docs/multipole-attention.md, section 3), with a
// real hierarchy: the coarsest level is scored in full, each finer level only under the
// clusters selected above it; every unselected cluster at every level joins the far field
// as |cluster| copies of its centroid ("squeezed" drops them instead).
#include "attention/multipole_policy.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/cpu_decode_common.hpp"
#include "attention/decode_kernels.hpp"
#include "attention/policies.hpp"
#include "attention/selection.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}

// Per-thread buffers of decode; they only grow, so a warmed-up decode does not allocate.
struct MultipolePolicy::Scratch {
  kernels::OwnedState exact, far;
  std::vector<float> qt;          // [G, d] queries rotated to the scoring position
  std::vector<float> logits;      // [G, n] scale q.c + log n of the level's candidates, then their exp
  std::vector<float> importance;  // [n]
  std::vector<float> bound;       // [n] coarse_radius_weight: optimistic logits, then their exp
  std::vector<int32_t> cand, next;  // candidate cluster ids of this level / the next one
  std::vector<int32_t> sizes;       // [n]
  std::vector<int32_t> picked;      // [n] selected candidates (local indices)
  std::vector<uint8_t> chosen;      // [n]
  std::vector<int32_t> selected_positions, exact_positions;  // chosen middle positions; sinks + middle + window
  std::vector<float> rkeys;  // [n, d] real-position mode: the candidates' key centroids, rotated; or the
                            // [clustered, d] keys at position 0 (exact-mass and spread experiments)
  std::vector<float> far_weights;  // [G, n] far_field_real_positions: n e^{logit - max}, 0 for chosen
  std::vector<float> far_max;      // [G] the far weights' reference maxima (far_reference, far_at_real_positions)
  std::vector<float> token_logits, token_mass;  // [G, N], [N] select_by_exact_mass: the clustered keys
  std::vector<float> masses;                    // [L, candidates] select_by_exact_mass: mass under each cluster
  std::vector<float> spread;  // [L, candidates, d] score_with_spread: members' mean square deviation a dimension
  std::vector<float> fm, fl, zmax, zsum;     // [G] frontier normalisation
  // rerank_tokens: the k candidates read exactly, their members' positions and logits
  std::vector<int32_t> rerank_ids, rerank_picked, rerank_sizes;  // [k] local candidate indices; picks; sizes
  std::vector<int32_t> rerank_positions;                          // [T] members of the k candidates, in order
  std::vector<float> rerank_logits;                               // [G, T]
  std::vector<float> rerank_importance;                           // [k]
  Rotation rotation;
  SelectionScratch selection;

  // Sizes everything for tasks with up to `candidates` clusters per level and `positions`
  // exact keys, so that which thread runs which task never decides whether decode allocates.
  // `clustered` and `levels` size the exact-mass and spread experiments' buffers (0 when off).
  void reserve(int G, int d, int64_t candidates, int64_t selected, int64_t positions, const Rope* real,
               int64_t clustered, int levels, int64_t rerank) {
    exact.resize(G, d);
    far.resize(G, d);
    const size_t n = size_t(candidates);
    cpu::grow(qt, size_t(G) * d);
    cpu::grow(logits, size_t(G) * n);
    cpu::grow(importance, n);
    cpu::grow(cand, n);
    cpu::grow(next, n);
    cpu::grow(sizes, n);
    cpu::grow(picked, n);
    cpu::grow(chosen, n);
    cpu::grow(selected_positions, size_t(selected));
    cpu::grow(exact_positions, size_t(positions));
    cpu::grow(selection.items, n);
    if (real) {
      rotation.set(*real, 0.0);
      cpu::grow(rkeys, n * d);
      cpu::grow(far_weights, size_t(G) * n);
    }
    for (auto* v : {&fm, &fl, &zmax, &zsum, &far_max}) cpu::grow(*v, size_t(G));
    if (rerank > 0) {
      const size_t k = size_t(std::min<int64_t>(candidates, rerank));
      for (auto* v : {&rerank_ids, &rerank_picked, &rerank_sizes}) cpu::grow(*v, k);
      cpu::grow(rerank_positions, size_t(rerank));
      cpu::grow(rerank_logits, size_t(G) * size_t(rerank));
      cpu::grow(rerank_importance, k);
    }
    if (clustered > 0) {
      cpu::grow(token_logits, size_t(G) * size_t(clustered));
      cpu::grow(token_mass, size_t(clustered));
      cpu::grow(masses, size_t(levels) * n);
      cpu::grow(rkeys, size_t(clustered) * d);
      cpu::grow(spread, size_t(levels) * n * d);
    }
  }
};

MultipolePolicy::MultipolePolicy(const AttentionConfig& config) : AttentionPolicy(config), rope_(config.rope) {}
MultipolePolicy::~MultipolePolicy() = default;

const ClusterIndex* MultipolePolicy::index(SeqId seq, int layer, int kv_head) const {
  if (seq < 0 || size_t(seq) >= seqs_.size()) return nullptr;
  const auto& layers = seqs_[size_t(seq)];
  if (layer < 0 || size_t(layer) >= layers.size() || !layers[size_t(layer)].built) return nullptr;
  const auto& heads = layers[size_t(layer)].heads;
  if (kv_head < 0 || size_t(kv_head) >= heads.size()) return nullptr;
  return &heads[size_t(kv_head)];
}

void MultipolePolicy::forget(SeqId seq) {
  if (seq >= 0 && size_t(seq) < seqs_.size()) seqs_[size_t(seq)].clear();
}

void MultipolePolicy::update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) {
  const auto& kc = cache.config();
  MP_CHECK(kc.num_kv_heads == config_.num_kv_heads && kc.head_dim == config_.head_dim,
           "{}: cache has {} KV heads of dim {}, the attention config {} of dim {}", name(), kc.num_kv_heads,
           kc.head_dim, config_.num_kv_heads, config_.head_dim);
  MP_CHECK(layer >= 0 && layer < kc.num_layers, "{}: layer {} out of range [0, {})", name(), layer, kc.num_layers);
  const int heads = config_.num_kv_heads;
  // Each sequence's index is updated by its own tasks: a sequence listed twice would race.
  seen_.assign(seqs.begin(), seqs.end());
  std::sort(seen_.begin(), seen_.end());
  MP_CHECK(std::adjacent_find(seen_.begin(), seen_.end()) == seen_.end(), "{}: update() lists a sequence twice",
           name());
  tasks_.clear();
  for (size_t b = 0; b < seqs.size(); ++b) {
    const SeqId seq = seqs[b];
    const int64_t target = config_.clustered_end(cache.length(seq));
    if (size_t(seq) >= seqs_.size()) seqs_.resize(size_t(seq) + 1);
    auto& layers = seqs_[size_t(seq)];
    if (layers.size() < size_t(kc.num_layers)) layers.resize(size_t(kc.num_layers));
    auto& st = layers[size_t(layer)];
    if (st.built) {
      const int64_t end = st.heads[0].end();
      MP_CHECK(target >= end,
               "{}: sequence {} is shorter ({} tokens) than its index of layer {} (clustered up to {}); call "
               "forget() when a sequence is freed",
               name(), seq, cache.length(seq), layer, end);
      if (target == end) continue;
    } else {
      st.heads.resize(size_t(heads));
    }
    for (int h = 0; h < heads; ++h) tasks_.push_back({int32_t(b), h});
  }
  pool.parallel_for(int64_t(tasks_.size()), [&](int64_t i, int) {
    const auto [b, h] = tasks_[size_t(i)];
    const SeqId seq = seqs[size_t(b)];
    auto& st = seqs_[size_t(seq)][size_t(layer)];
    const int64_t target = config_.clustered_end(cache.length(seq));
    if (st.built)
      st.heads[size_t(h)].append(cache, seq, layer, h, target, config_, rope_);
    else
      st.heads[size_t(h)].build(cache, seq, layer, h, target, config_, rope_);
  });
  for (SeqId seq : seqs) seqs_[size_t(seq)][size_t(layer)].built = true;
}

void MultipolePolicy::decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q,
                             float* out, ThreadPool& pool) {
  cpu::check_decode_args(name(), config_, cache, layer, seqs, q, out);
  const int64_t B = int64_t(seqs.size()), heads = config_.num_kv_heads;
  for (SeqId seq : seqs)
    MP_CHECK(index(seq, layer, 0) != nullptr, "{}: sequence {} has no cluster index for layer {}; call update() first",
             name(), seq, layer);
  // The scoring rotation depends on the sequence only: position length-1 -> score_position.
  if (rotations_.size() < size_t(B)) rotations_.resize(size_t(B));
  if (!config_.score_real_positions)
    for (int64_t b = 0; b < B; ++b)
      rotations_[size_t(b)].set(rope_, config_.score_position - double(cache.length(seqs[b]) - 1));
  int64_t candidates = 1, positions = 1, clustered = 0;
  int levels = 0;
  for (SeqId seq : seqs)
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      const ClusterIndex& idx = *index(seq, layer, h);
      for (int l = 0; l < idx.num_levels(); ++l) candidates = std::max(candidates, idx.level(l).count());
      if (reads_clustered_keys()) {
        clustered = std::max(clustered, idx.end() - idx.begin());
        levels = std::max(levels, idx.num_levels());
      }
      const int64_t len = cache.length(seq);
      positions = std::max(positions, std::min<int64_t>(config_.cluster.sinks, len) + config_.budget +
                                          std::max<int64_t>(0, len - idx.end()));
    }
  while (scratch_.size() < size_t(pool.size())) scratch_.push_back(std::make_unique<Scratch>());
  for (auto& s : scratch_)
    s->reserve(config_.group_size(), config_.head_dim, candidates, config_.budget, positions,
               config_.score_real_positions || config_.far_field_real_positions ? &rope_ : nullptr, clustered,
               levels, config_.rerank_tokens);
  thread_stats_.assign(size_t(pool.size()), DecodeStats{});
  // One small capture so that the std::function of parallel_for needs no allocation.
  struct Context {
    const PagedKVCache& cache;
    KVLayerView kv;
    std::span<const SeqId> seqs;
    int layer;
    const float* q;
    float* out;
  } ctx{cache, cache.layer_view(layer), seqs, layer, q, out};
  pool.parallel_for(B * heads, [this, &ctx](int64_t task, int thread) {
    const int nh = config_.num_kv_heads;
    const int64_t b = task / nh;
    const int h = int(task % nh);
    const int64_t row = (b * config_.num_q_heads + int64_t(h) * config_.group_size()) * config_.head_dim;
    decode_head(ctx.cache, ctx.kv, ctx.seqs[size_t(b)], ctx.layer, h, ctx.q + row, ctx.out + row,
                rotations_[size_t(b)], *scratch_[size_t(thread)], thread_stats_[size_t(thread)]);
  });
  stats_ = cpu::sum_stats(thread_stats_);
}

// The coarse_radius_weight experiment: importances of coarse candidates for their expansion
// only, from the optimistic logits s (q.c + w |q| r) + log n (x holds the true ones, shifted
// and exponentiated, which the far field keeps using).
//   cand: [n] cluster ids of level lv; qs: [G, d] scoring queries; x: [G, n]; imp: [n] out
void MultipolePolicy::rank_by_bound(const ClusterLevel& lv, const int32_t* cand, int64_t n, const float* qs, int G,
                                    int d, float scale, const float* x, Scratch& s, float* imp) const {
  float* b = cpu::grow(s.bound, size_t(n));
  std::fill(imp, imp + n, 0.0f);
  for (int g = 0; g < G; ++g) {
    double q2 = 0;
    for (int j = 0; j < d; ++j) q2 += double(qs[int64_t(g) * d + j]) * qs[int64_t(g) * d + j];
    const float lift = scale * config_.coarse_radius_weight * float(std::sqrt(q2));
    const float* xg = x + int64_t(g) * n;  // n_i e^{logit_i - zmax}, 0 for empty clusters
    float mx = kNegInf;
    for (int64_t i = 0; i < n; ++i) {
      b[i] = xg[i] > 0 ? std::log(xg[i]) + lift * lv.radii[cand[i]] : kNegInf;
      mx = std::max(mx, b[i]);
    }
    if (mx == kNegInf) continue;
    double z = 0;
    for (int64_t i = 0; i < n; ++i) z += b[i] = std::exp(b[i] - mx);
    for (int64_t i = 0; i < n; ++i) imp[i] += float(b[i] / z);
  }
  for (int64_t i = 0; i < n; ++i) imp[i] /= float(lv.sizes[cand[i]]);
}

// The clustered keys [begin, end) of (seq, layer, head) rotated back to position 0, the frame of
// the centroids and of the scoring queries, in s.rkeys.
//   returns [end - begin, d]
const float* MultipolePolicy::clustered_keys_at_position_zero(const PagedKVCache& cache, SeqId seq, int layer,
                                                              int head, const ClusterIndex& idx, Scratch& s) const {
  const int64_t N = idx.end() - idx.begin();
  float* k0 = cpu::grow(s.rkeys, size_t(N) * size_t(config_.head_dim));
  cache.read_keys(seq, layer, head, idx.begin(), N, k0);
  unrotate_consecutive(rope_, k0, N, idx.begin());
  return k0;
}

// The score_with_spread experiment: for every cluster of every level, the mean over the
// clustered tokens under it of (k_j - c_j)^2 in each dimension j, keys and centroids in
// position-0 space.
//   returns [L, stride, d], level l's block holding its clusters' rows
const float* MultipolePolicy::spreads(const PagedKVCache& cache, SeqId seq, int layer, int head,
                                      const ClusterIndex& idx, int64_t stride, Scratch& s) const {
  const int d = config_.head_dim, L = idx.num_levels();
  const int64_t N = idx.end() - idx.begin();
  const float* k0 = clustered_keys_at_position_zero(cache, seq, layer, head, idx, s);
  float* v = cpu::grow(s.spread, size_t(L) * size_t(stride) * size_t(d));
  std::fill(v, v + int64_t(L) * stride * d, 0.0f);
  const std::span<const int32_t> labels = idx.labels();
  for (int64_t t = 0; t < N; ++t) {
    int64_t c = labels[size_t(t)];
    for (int l = 0; l < L; ++l) {
      if (l > 0) c = idx.level(l - 1).parents[size_t(c)];
      const float* centroid = idx.level(l).keys.data() + c * d;
      float* row = v + (int64_t(l) * stride + c) * d;
      for (int j = 0; j < d; ++j) {
        const float e = k0[t * d + j] - centroid[j];
        row[j] += e * e;
      }
    }
  }
  for (int l = 0; l < L; ++l) {
    const ClusterLevel& lv = idx.level(l);
    for (int64_t c = 0; c < lv.count(); ++c)
      if (lv.sizes[c] > 0)
        for (int j = 0; j < d; ++j) v[(int64_t(l) * stride + c) * d + j] /= float(lv.sizes[c]);
  }
  return v;
}

// The select_by_exact_mass experiment: the exact attention mass under every cluster of every
// level, m_l[c] = sum over the clustered tokens t under c of sum_g softmax_g(t), the softmax of
// the real queries over the clustered region [begin, end) (sinks and window are always exact);
// with mass_at_score_position, of the scoring queries against the keys in position-0 space.
//   q, qs: [G, d] real and scoring queries; returns [L, stride], level l's row holding its
//   clusters' masses
const float* MultipolePolicy::exact_masses(const PagedKVCache& cache, SeqId seq, int layer, int head,
                                           const ClusterIndex& idx, const float* q, const float* qs, int G,
                                           float scale, int64_t stride, Scratch& s) const {
  const int64_t N = idx.end() - idx.begin();
  float* x = cpu::grow(s.token_logits, size_t(G) * size_t(N));
  float* w = cpu::grow(s.token_mass, size_t(N));
  if (config_.mass_at_score_position) {
    kernels::score_rows(clustered_keys_at_position_zero(cache, seq, layer, head, idx, s), nullptr, N, qs, G,
                        config_.head_dim, scale, x);
  } else {
    kernels::score_range(cache.layer_view(layer), cache.page_table(seq).data(), head, idx.begin(), idx.end(), q, G,
                         scale, x);
  }
  cpu::group_importance(x, G, N, w);
  const int L = idx.num_levels();
  float* m = cpu::grow(s.masses, size_t(L) * size_t(stride));
  std::fill(m, m + int64_t(L) * stride, 0.0f);
  const std::span<const int32_t> labels = idx.labels();
  for (int64_t t = 0; t < N; ++t) m[labels[size_t(t)]] += w[t];
  for (int l = 1; l < L; ++l) {
    const ClusterLevel& below = idx.level(l - 1);
    for (int64_t c = 0; c < below.count(); ++c) m[l * stride + below.parents[size_t(c)]] += m[(l - 1) * stride + c];
  }
  return m;
}

// Copies of the candidates' key centroids, each rotated to its members' mean position, in s.rkeys.
//   cand: [n] cluster ids of level lv; returns [n, d]
const float* MultipolePolicy::centroids_at_mean_positions(const ClusterLevel& lv, const int32_t* cand, int64_t n,
                                                          int d, Scratch& s) const {
  float* rk = cpu::grow(s.rkeys, size_t(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(lv.keys.data() + int64_t(cand[i]) * d, d, rk + i * d);
    s.rotation.set(rope_, lv.mean_position(cand[i]));
    s.rotation.apply(rk + i * d);
  }
  return rk;
}

// The far field of the unselected candidates (chosen[i] == 0) with logits from their centroids
// rotated to their members' mean positions against the real queries q (the
// far_field_real_positions experiment), into far.
//   cand: [n] cluster ids of level lv; q: [G, d] real queries
void MultipolePolicy::far_at_real_positions(const ClusterLevel& lv, const int32_t* cand, int64_t n,
                                            const uint8_t* chosen, const float* q, int G, int d, float scale,
                                            Scratch& s, kernels::SoftmaxState& far) const {
  float* w = cpu::grow(s.far_weights, size_t(G) * n);
  kernels::score_rows(centroids_at_mean_positions(lv, cand, n, d, s), nullptr, n, q, G, d, scale, w);
  for (int g = 0; g < G; ++g) {
    float* wg = w + int64_t(g) * n;
    float mx = kNegInf;
    for (int64_t i = 0; i < n; ++i) {
      wg[i] = chosen[i] ? kNegInf : wg[i] + lv.log_sizes[cand[i]];
      mx = std::max(mx, wg[i]);
    }
    s.far_max[size_t(g)] = mx;
    if (mx == kNegInf) continue;  // (attend_weighted leaves a head of maximum -inf out)
    for (int64_t i = 0; i < n; ++i) wg[i] -= mx;
    kernels::exp_inplace(wg, n);
  }
  kernels::attend_weighted(lv.values.data(), cand, n, w, s.far_max.data(), far);
}

// The far field's weights x (n e^{logit - zmax}, 0 for the chosen) re-referenced to the largest
// of them, so that the far state's maximum is a far cluster's logit rather than a selected
// one's: a selected logit far above the rest (an overestimate) would otherwise leave the far
// state a tiny l under a maximum that scales the exact part away when they merge.
//   x: [G, n] in place; zmax: [G]; returns the weights' maxima [G] (-inf: no far weight)
const float* MultipolePolicy::far_reference(float* x, int64_t n, int G, const float* zmax, Scratch& s) const {
  float* ref = cpu::grow(s.far_max, size_t(G));
  for (int g = 0; g < G; ++g) {
    float* xg = x + int64_t(g) * n;
    const float top = zmax[g] == kNegInf ? 0.0f : *std::max_element(xg, xg + n);
    ref[g] = top > 0 ? zmax[g] + std::log(top) : kNegInf;
    if (top > 0 && top != 1.0f)
      for (int64_t i = 0; i < n; ++i) xg[i] /= top;
  }
  return ref;
}

// The finest level's re-ranking (rerank_tokens): the centroid importances pick candidates worth
// up to rerank_tokens tokens; their members' keys are scored exactly (real queries, real
// positions) and the candidates' exact masses choose the clusters under the budget. A
// cluster's centroid logit is its members' mean, so their mass is e^{logit} |c| only when they
// agree; the spread along q and the fixed scoring position are the error this removes.
//   cand: [n] level-0 cluster ids; imp, sizes: [n] the centroid ranking; q: [G, d] real queries
//   x: [G, n] weights |c| e^{logit - zmax}, in place: an unchosen candidate read exactly keeps
//      its exact mass for the far field; zmax, zsum: [G], raised to the exact logits where above
//   picked: [n] out, local indices; *read: keys scored
SelectionResult MultipolePolicy::rerank(const KVLayerView& kv, const int32_t* page_table, int head,
                                        const ClusterLevel& lv, const int32_t* cand, int64_t n, const float* imp,
                                        const int32_t* sizes, const float* q, int G, float scale, float* x,
                                        float* zmax, float* zsum, int32_t* picked, Scratch& s, int64_t* read) const {
  const SelectionResult pre = select_clusters(imp, sizes, n, config_.rerank_tokens, picked, s.selection);
  const int64_t k = pre.count;
  int32_t* ids = cpu::grow(s.rerank_ids, size_t(k));
  std::copy(picked, picked + k, ids);
  std::sort(ids, ids + k);  // members in ascending cluster order: a rerun reads the same rows
  int32_t* pos = cpu::grow(s.rerank_positions, size_t(pre.tokens));
  int64_t T = 0;
  for (int64_t j = 0; j < k; ++j)
    for (int32_t p : lv.members_of(cand[ids[j]])) pos[T++] = p;
  float* logit = cpu::grow(s.rerank_logits, size_t(G) * size_t(T));
  kernels::score_positions(kv, page_table, head, pos, T, q, G, scale, logit);
  *read = T;

  for (int g = 0; g < G; ++g) {
    float* xg = x + int64_t(g) * n;
    const float* lg = logit + int64_t(g) * T;
    const float top = T > 0 ? *std::max_element(lg, lg + T) : kNegInf;
    if (top > zmax[g]) {  // a member above every centroid: its e^{logit - zmax} would overflow
      const float f = std::exp(zmax[g] - top);
      for (int64_t i = 0; i < n; ++i) xg[i] *= f;
      zsum[g] *= f;
      zmax[g] = top;
    }
    int64_t t = 0;
    for (int64_t j = 0; j < k; ++j) {
      float e = 0;
      for (const int64_t end = t + lv.sizes[cand[ids[j]]]; t < end; ++t) e += std::exp(lg[t] - zmax[g]);
      zsum[g] += e - xg[ids[j]];
      xg[ids[j]] = e;
    }
  }
  float* sub_imp = cpu::grow(s.rerank_importance, size_t(k));
  int32_t* sub_sizes = cpu::grow(s.rerank_sizes, size_t(k));
  for (int64_t j = 0; j < k; ++j) {
    float acc = 0;
    for (int g = 0; g < G; ++g) acc += zsum[g] > 0 ? x[int64_t(g) * n + ids[j]] / zsum[g] : 0.0f;
    sub_sizes[j] = sizes[ids[j]];
    sub_imp[j] = acc / float(sub_sizes[j]);
  }
  int32_t* sub = cpu::grow(s.rerank_picked, size_t(k));
  const SelectionResult sel = select_clusters(sub_imp, sub_sizes, k, config_.budget, sub, s.selection);
  for (int64_t j = 0; j < sel.count; ++j) picked[j] = ids[sub[j]];
  return sel;
}

// One (sequence, KV head): hierarchical selection, exact part, far field, merge.
//   q, out: [G, d] rows of this KV head's query heads
void MultipolePolicy::decode_head(const PagedKVCache& cache, const KVLayerView& kv, SeqId seq, int layer, int head,
                                  const float* q, float* out, const Rotation& score_rotation, Scratch& s,
                                  DecodeStats& stats) const {
  const ClusterIndex& idx = *index(seq, layer, head);
  const int G = config_.group_size(), d = config_.head_dim;
  const float scale = config_.softmax_scale();
  const bool real = config_.score_real_positions, far_field = config_.multipole_far_field;
  const int64_t len = cache.length(seq);
  MP_CHECK(len >= idx.end() || idx.end() == idx.begin(), "{}: sequence {} has {} tokens but its index covers up to {}",
           name(), seq, len, idx.end());
  const int32_t* page_table = cache.page_table(seq).data();
  kernels::SoftmaxState& exact = s.exact.resize(G, d);
  kernels::SoftmaxState& far = s.far.resize(G, d);
  exact.reset();
  far.reset();

  // Queries for centroid scoring: rotated to score_position, or the real ones when each
  // centroid is rotated to its members' mean position instead.
  const float* qs = q;
  if (!real) {
    float* qt = cpu::grow(s.qt, size_t(G) * d);
    std::copy(q, q + int64_t(G) * d, qt);
    for (int g = 0; g < G; ++g) score_rotation.apply(qt + int64_t(g) * d);
    qs = qt;
  }
  float* fm = cpu::grow(s.fm, size_t(G));
  float* fl = cpu::grow(s.fl, size_t(G));
  float* zmax = cpu::grow(s.zmax, size_t(G));
  float* zsum = cpu::grow(s.zsum, size_t(G));
  std::fill(fm, fm + G, kNegInf);
  std::fill(fl, fl + G, 0.0f);

  int64_t scored = 0, pseudo = 0, chosen_tokens = 0, nselected = 0, reranked = 0;
  const int L = idx.num_levels();
  if (L > 0 && idx.end() > idx.begin()) {
    int64_t stride = 0;  // the experiments' rows a level
    if (reads_clustered_keys())
      for (int l = 0; l < L; ++l) stride = std::max(stride, idx.level(l).count());
    const float* masses =
        config_.select_by_exact_mass ? exact_masses(cache, seq, layer, head, idx, q, qs, G, scale, stride, s) : nullptr;
    const float* spread = config_.score_with_spread ? spreads(cache, seq, layer, head, idx, stride, s) : nullptr;
    // Candidates of the coarsest level: all its non-empty clusters.
    const ClusterLevel& top = idx.level(L - 1);
    int32_t* cand = cpu::grow(s.cand, size_t(top.count()));
    int64_t n = 0;
    for (int64_t c = 0; c < top.count(); ++c)
      if (top.sizes[c] > 0) cand[n++] = int32_t(c);
    for (int l = L - 1; l >= 0 && n > 0; --l) {
      const ClusterLevel& lv = idx.level(l);
      cand = s.cand.data();
      // Values and sizes are read through cand; only the keys may need copies.
      const float* keys = lv.keys.data();
      const int32_t* key_ids = cand;
      if (real) {
        // Rotated copies: centroid i at its members' mean position, scored against the real q.
        keys = centroids_at_mean_positions(lv, cand, n, d, s), key_ids = nullptr;
      }
      float* x = cpu::grow(s.logits, size_t(G) * n);
      kernels::score_rows(keys, key_ids, n, qs, G, d, scale, x);
      scored += n;
      if (spread) {
        // + s^2/2 sum_j q_j^2 v_j: the members' log-mean-exp about the centroid to second order.
        for (int g = 0; g < G; ++g)
          for (int64_t i = 0; i < n; ++i) {
            const float* qg = qs + int64_t(g) * d;
            const float* vi = spread + (int64_t(l) * stride + cand[i]) * d;
            float acc = 0;
            for (int j = 0; j < d; ++j) acc += qg[j] * qg[j] * vi[j];
            x[int64_t(g) * n + i] += 0.5f * scale * scale * acc;
          }
      }

      // p_{g,i} = e^{s q.c_i} / sum_{j in frontier} n_j e^{s q.c_j}; the frontier is the far
      // field so far (fm, fl: its log-sum-exp) plus these candidates.
      for (int g = 0; g < G; ++g) {
        float* xg = x + int64_t(g) * n;
        float mx = fm[g];
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, xg[i] += lv.log_sizes[cand[i]]);
        for (int64_t i = 0; i < n; ++i) xg[i] -= mx;
        kernels::exp_inplace(xg, n);  // n_i e^{s q.c_i - mx}
        float z = fl[g] * (fm[g] == kNegInf ? 0.0f : std::exp(fm[g] - mx));
        for (int64_t i = 0; i < n; ++i) z += xg[i];
        zmax[g] = mx;
        zsum[g] = z;
      }
      float* imp = cpu::grow(s.importance, size_t(n));
      int32_t* sizes = cpu::grow(s.sizes, size_t(n));
      for (int64_t i = 0; i < n; ++i) {
        float acc = 0;
        for (int g = 0; g < G; ++g) acc += x[int64_t(g) * n + i] / zsum[g];
        sizes[i] = lv.sizes[cand[i]];
        imp[i] = acc / float(sizes[i]);
      }
      if (l > 0 && config_.coarse_radius_weight > 0) rank_by_bound(lv, cand, n, qs, G, d, scale, x, s, imp);
      if (masses)
        for (int64_t i = 0; i < n; ++i) imp[i] = masses[l * stride + cand[i]] / float(sizes[i]);
      const int64_t budget =
          l == 0 ? config_.budget
                 : std::max<int64_t>(config_.budget, config_.coarse_budget > 0 ? config_.coarse_budget
                                                                               : int64_t(16) * config_.budget);
      int32_t* picked = cpu::grow(s.picked, size_t(n));
      const SelectionResult sel =
          l == 0 && config_.rerank_tokens > 0
              ? rerank(kv, page_table, head, lv, cand, n, imp, sizes, q, G, scale, x, zmax, zsum, picked, s, &reranked)
              : select_clusters(imp, sizes, n, budget, picked, s.selection);
      uint8_t* chosen = cpu::grow(s.chosen, size_t(n));
      std::fill(chosen, chosen + n, uint8_t(0));
      for (int64_t j = 0; j < sel.count; ++j) chosen[picked[j]] = 1;

      // Unselected candidates join the far field (and the frontier normalisation). Their
      // weights x are the far field's own: the chosen ones get 0, and no logit is recomputed.
      const int64_t nfar = n - sel.count;
      for (int g = 0; g < G; ++g) {
        float* xg = x + int64_t(g) * n;
        float sum = fl[g] * (fm[g] == kNegInf ? 0.0f : std::exp(fm[g] - zmax[g]));
        for (int64_t i = 0; i < n; ++i) {
          if (chosen[i]) xg[i] = 0.0f;
          sum += xg[i];
        }
        fm[g] = zmax[g];
        fl[g] = sum;
      }
      if (far_field && nfar > 0) {
        if (config_.far_field_real_positions && !real)
          far_at_real_positions(lv, cand, n, chosen, q, G, d, scale, s, far);
        else
          kernels::attend_weighted(lv.values.data(), cand, n, x, far_reference(x, n, G, zmax, s), far);
      }
      pseudo += nfar;

      if (l > 0) {
        // Children of the selected clusters, ascending (ties in importance go to the lower id).
        const ClusterLevel& below = idx.level(l - 1);
        int64_t total = 0;
        for (int64_t j = 0; j < sel.count; ++j) total += int64_t(lv.members_of(cand[picked[j]]).size());
        int32_t* next = cpu::grow(s.next, size_t(total));
        int64_t m = 0;
        for (int64_t j = 0; j < sel.count; ++j)
          for (int32_t c : lv.members_of(cand[picked[j]]))
            if (below.sizes[c] > 0) next[m++] = c;
        std::sort(next, next + m);
        std::swap(s.cand, s.next);
        n = m;
      } else {
        int32_t* sel_pos = cpu::grow(s.selected_positions, size_t(sel.tokens));
        int64_t m = 0;
        for (int64_t j = 0; j < sel.count; ++j)
          for (int32_t p : lv.members_of(cand[picked[j]])) sel_pos[m++] = p;
        chosen_tokens = m;
        nselected = m;
      }
    }
  }

  const int64_t sinks = std::min<int64_t>(config_.cluster.sinks, len);
  const int64_t window = std::min(len, std::max(sinks, idx.end()));
  const int64_t exact_tokens =
      cpu::attend_sparse(kv, page_table, head, sinks, window, len, std::span<const int32_t>(s.selected_positions.data(), size_t(nselected)),
                         q, scale, exact, s.exact_positions);
  if (far_field) kernels::merge(exact, far);
  kernels::finalize(exact, out);

  stats.exact_tokens += exact_tokens;
  stats.selected_tokens += chosen_tokens;
  stats.centroids_scored += scored;
  stats.pseudo_tokens += far_field ? pseudo : 0;
  // Scored centroids: key + size; the far field reads only their values (f32).
  stats.bytes_read += exact_tokens * 2 * kv.token_bytes + scored * (int64_t(d) * 4 + 8) +
                        (far_field ? pseudo * int64_t(d) * 4 : 0);
  if (reads_clustered_keys() && L > 0) stats.bytes_read += (idx.end() - idx.begin()) * kv.token_bytes;
  stats.bytes_read += reranked * kv.token_bytes;  // the re-ranked candidates' keys
}

std::unique_ptr<AttentionPolicy> make_multipole_policy(const AttentionConfig& config) {
  return std::make_unique<MultipolePolicy>(config);
}

const ClusterIndex* find_cluster_index(const AttentionPolicy& policy, SeqId seq, int layer, int kv_head) {
  const auto* p = dynamic_cast<const MultipolePolicy*>(&policy);
  return p ? p->index(seq, layer, kv_head) : nullptr;
}

}  // namespace multipole
