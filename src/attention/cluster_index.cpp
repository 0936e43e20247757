#include "multipole/attention/cluster_index.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "attention/kmeans.hpp"
#include "attention/multipole_policy.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

// ---- rotations -------------------------------------------------------------------------

void Rotation::set(const Rope& rope, double delta) {
  const auto& f = rope.inv_freq();
  half_ = int(f.size());
  cos_.resize(f.size());
  sin_.resize(f.size());
  for (int i = 0; i < half_; ++i) {
    double a = delta * f[i];
    cos_[i] = float(std::cos(a));
    sin_[i] = float(std::sin(a));
  }
}

void Rotation::apply(float* x) const {
  for (int i = 0; i < half_; ++i) {
    float a = x[i], b = x[i + half_];
    x[i] = a * cos_[i] - b * sin_[i];
    x[i + half_] = b * cos_[i] + a * sin_[i];
  }
}

void unrotate_consecutive(const Rope& rope, float* x, int64_t n, int64_t first) {
  constexpr int kAnchor = 64;  // exact sin/cos every kAnchor tokens bounds the recurrence error (~1e-14)
  const auto& f = rope.inv_freq();
  const int half = int(f.size()), d = rope.head_dim();
  double c[256], s[256], cf[256], sf[256];  // half <= head_dim / 2 <= 256 (config limit 512)
  MP_CHECK(half <= 256, "rope: rotary_dim {} exceeds 512", 2 * half);
  for (int i = 0; i < half; ++i) {
    cf[i] = std::cos(f[i]);
    sf[i] = std::sin(f[i]);
  }
  for (int64_t t = 0; t < n; ++t) {
    if (t % kAnchor == 0)
      for (int i = 0; i < half; ++i) {
        double a = -double(first + t) * f[i];
        c[i] = std::cos(a);
        s[i] = std::sin(a);
      }
    float* v = x + t * d;
    for (int i = 0; i < half; ++i) {
      float ci = float(c[i]), si = float(s[i]);
      float a = v[i], b = v[i + half];
      v[i] = a * ci - b * si;
      v[i + half] = b * ci + a * si;
      // angle -(p + 1) f = angle - f
      double cn = c[i] * cf[i] + s[i] * sf[i];
      s[i] = s[i] * cf[i] - c[i] * sf[i];
      c[i] = cn;
    }
  }
}

// ---- cluster index ---------------------------------------------------------------------

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread buffers of build/append (they run inside pool tasks).
struct Work {
  std::vector<float> keys, values;     // [n, d] k0 and values of the tokens being clustered
  std::vector<float> centroids;        // [k, d]
  std::vector<float> points, weights;  // coarse level: child centroids and sizes
  std::vector<float> dist2;            // [n]
  std::vector<float> distances, xnorms;  // online update: [new tokens, open centroids], [new tokens]
  std::vector<uint8_t> valid;
  std::vector<int32_t> moved_at, moved;
  std::vector<int32_t> labels, ids, items, picked, cursor, cur, prev, touched;  // prev: labels in use
  std::vector<double> key_sums, value_sums;  // [k, d]
  std::vector<int32_t> counts, stamp;
  kmeans::LloydScratch lloyd;
};
thread_local Work tls_work;

// Scratch of at least n elements; grows geometrically, as the open block's buffers grow a
// little at every update.
template <class T>
T* sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(std::max(n, v.size() * 3 / 2));
  return v.data();
}

// Resizes an index array that grows with the sequence by `step` more elements whenever it
// reallocates: the spare capacity stays within one block's worth (doubling would leave up
// to the whole index unused), and a reallocation happens once per block.
template <class T>
void extend(std::vector<T>& v, size_t n, size_t step, T fill = T()) {
  if (v.capacity() < n) v.reserve(n + step);
  v.resize(n, fill);
}

void read_tokens(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t pos, int64_t n, const Rope& rope,
                 Work& w) {
  const int d = cache.config().head_dim;
  float* k = sized(w.keys, size_t(n) * d);
  cache.read_keys(seq, layer, head, pos, n, k);
  unrotate_consecutive(rope, k, n, pos);
  cache.read_values(seq, layer, head, pos, n, sized(w.values, size_t(n) * d));
}

// Level-0 clusters the open block can reach: 1.5 blocks (the prefill's last block) + W.
int64_t max_open_clusters(const ClusterConfig& cc) {
  return ceil_div(cc.block_size * 3 / 2 + cc.window, cc.tokens_per_centroid[0]) + 1;
}

// Sizes the online update's buffers for k open clusters and `count` new tokens. They are
// sized once for the largest open block (growing them with the block would cost fresh
// pages at every update); build() calls this too, so the pages are touched at prefill.
size_t size_online_work(Work& w, int64_t k, int64_t count, int d) {
  const size_t kc = size_t(k), n = size_t(count);
  sized(w.centroids, kc * d);
  sized(w.points, kc * d);
  sized(w.key_sums, kc * d);
  sized(w.value_sums, kc * d);
  sized(w.distances, n * kc);
  sized(w.weights, n * kc);
  for (auto* v : {&w.counts, &w.cur, &w.moved_at, &w.moved}) sized(*v, kc);
  for (auto* v : {&w.labels, &w.prev, &w.items}) sized(*v, n);
  sized(w.dist2, n);
  sized(w.xnorms, n);
  sized(w.valid, n);
  return kc;
}

uint64_t stream_seed(const AttentionConfig& config, uint64_t kind, SeqId seq, int layer, int head, int64_t where) {
  return kmeans::mix_seed(config.cluster.seed, {kind, uint64_t(uint32_t(seq)), uint64_t(layer), uint64_t(head),
                                                uint64_t(where)});
}

}  // namespace

void ClusterIndex::reset(const AttentionConfig& config, int64_t begin) {
  dim_ = config.head_dim;
  begin_ = end_ = begin;
  step_tokens_ = config.cluster.block_size;
  for (size_t l = 0; l < config.cluster.tokens_per_centroid.size(); ++l)
    step_[l] = (config.cluster.block_size + config.cluster.tokens_per_centroid[l] - 1) / config.cluster.tokens_per_centroid[l];
  levels_.assign(config.cluster.tokens_per_centroid.size(), ClusterLevel{});
  for (auto& lv : levels_) lv.offsets.assign(1, 0);
  blocks_.clear();
  labels_.clear();
  open_key_sums_.clear();
  open_value_sums_.clear();
}

void ClusterIndex::grow(int l, int64_t add) {
  auto& lv = levels_[size_t(l)];
  const size_t c = size_t(lv.count() + add);
  const size_t step = size_t(step_[size_t(l)]);
  extend(lv.keys, c * dim_, step * dim_, 0.0f);
  extend(lv.values, c * dim_, step * dim_, 0.0f);
  extend(lv.sizes, c, step, 0);
  extend(lv.log_sizes, c, step, kNegInf);
  extend(lv.position_sums, c, step, int64_t(0));
  extend(lv.parents, c, step, -1);
  extend(lv.radii, c, step, 0.0f);
  extend(lv.offsets, c + 1, step, lv.offsets.back());
}

void ClusterIndex::set_log_size(int l, int32_t cluster) {
  auto& lv = levels_[size_t(l)];
  lv.log_sizes[cluster] = lv.sizes[cluster] > 0 ? std::log(float(lv.sizes[cluster])) : kNegInf;
}

// Members of the block's level-l clusters, by counting sort of the block's tokens (l = 0)
// or child clusters (l > 0) on their cluster; members come out ascending. Touches only the
// block's slice of offsets/members.
void ClusterIndex::rebuild_members(int l, const ClusterBlock& block) {
  auto& lv = levels_[size_t(l)];
  const int32_t f = block.first[l], e = block.last[l];
  int64_t base, first_item, n;
  const int32_t* label;
  if (l == 0) {
    base = block.begin - begin_;
    first_item = block.begin;
    n = block.end - block.begin;
    label = labels_.data() + base;
  } else {
    base = first_item = block.first[l - 1];
    n = block.last[l - 1] - block.first[l - 1];
    label = levels_[size_t(l - 1)].parents.data() + base;
  }
  extend(lv.members, size_t(base + n), size_t(l == 0 ? step_tokens_ : step_[size_t(l - 1)]));
  int32_t* cursor = sized(tls_work.cursor, size_t(e - f) + 1);
  std::fill(cursor, cursor + (e - f) + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++cursor[label[i] - f + 1];
  lv.offsets[f] = int32_t(base);
  for (int32_t c = f; c < e; ++c) {
    lv.offsets[c + 1] = lv.offsets[c] + cursor[c - f + 1];
    cursor[c - f + 1] = lv.offsets[c];
  }
  for (int64_t i = 0; i < n; ++i) lv.members[cursor[label[i] - f + 1]++] = int32_t(first_item + i);
}

void ClusterIndex::recompute_from_children(int l, int32_t cluster) {
  auto& lv = levels_[size_t(l)];
  const auto& child = levels_[size_t(l - 1)];
  const int d = dim_;
  double* ks = sized(tls_work.key_sums, size_t(d));
  double* vs = sized(tls_work.value_sums, size_t(d));
  std::fill(ks, ks + d, 0.0);
  std::fill(vs, vs + d, 0.0);
  int64_t size = 0, pos = 0;
  for (int32_t c : lv.members_of(cluster)) {
    const double n = child.sizes[c];
    if (n == 0) continue;
    size += child.sizes[c];
    pos += child.position_sums[c];
    const float* k = child.keys.data() + int64_t(c) * d;
    const float* v = child.values.data() + int64_t(c) * d;
    for (int j = 0; j < d; ++j) {
      ks[j] += n * k[j];
      vs[j] += n * v[j];
    }
  }
  lv.sizes[cluster] = int32_t(size);
  lv.position_sums[cluster] = pos;
  float* k = lv.keys.data() + int64_t(cluster) * d;
  float* v = lv.values.data() + int64_t(cluster) * d;
  const double inv = size > 0 ? 1.0 / double(size) : 0.0;
  for (int j = 0; j < d; ++j) {
    k[j] = float(ks[j] * inv);
    v[j] = float(vs[j] * inv);
  }
  double r2 = 0;
  for (int32_t c : lv.members_of(cluster)) {
    if (child.sizes[c] == 0) continue;
    const float* kc = child.keys.data() + int64_t(c) * d;
    double s = 0;
    for (int j = 0; j < d; ++j) s += (double(kc[j]) - k[j]) * (double(kc[j]) - k[j]);
    r2 = std::max(r2, s);
  }
  lv.radii[cluster] = float(std::sqrt(r2));
  set_log_size(l, cluster);
}

// Clusters one block at prefill: k-means of its tokens' k0, then each coarser level by
// weighted k-means of the level below's non-empty centroids.
//   tokens: w.keys / w.values hold the block's k0 and values, [block tokens, d]
void ClusterIndex::build_block(ClusterBlock& block, const AttentionConfig& config, uint64_t seed, bool keep_sums) {
  Work& w = tls_work;
  const auto& cc = config.cluster;
  const int d = dim_;
  const int64_t n = block.end - block.begin;
  kmeans::Rng rng(seed);

  // Level 0.
  const int64_t k = ceil_div(n, cc.tokens_per_centroid[0]);
  float* cent = sized(w.centroids, size_t(k) * d);
  int32_t* lab = sized(w.labels, size_t(n));
  kmeans::init_random(w.keys.data(), n, d, k, rng, cent, w.ids);
  kmeans::lloyd(w.keys.data(), nullptr, n, d, k, cc.prefill_iterations, cent, lab, w.lloyd);
  const int32_t first = int32_t(levels_[0].count());
  grow(0, k);
  block.first[0] = first;
  block.last[0] = int32_t(first + k);
  extend(labels_, size_t(block.end - begin_), size_t(step_tokens_));
  int32_t* labels = labels_.data() + (block.begin - begin_);
  double* ks = sized(w.key_sums, size_t(k) * d);
  double* vs = sized(w.value_sums, size_t(k) * d);
  std::fill(ks, ks + k * d, 0.0);
  std::fill(vs, vs + k * d, 0.0);
  auto& lv0 = levels_[0];
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = lab[i];
    labels[i] = first + c;
    ++lv0.sizes[first + c];
    lv0.position_sums[first + c] += block.begin + i;
    const float* x = w.keys.data() + i * d;
    const float* v = w.values.data() + i * d;
    for (int j = 0; j < d; ++j) {
      ks[c * d + j] += x[j];
      vs[c * d + j] += v[j];
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    const int32_t size = lv0.sizes[first + c];
    const double inv = size > 0 ? 1.0 / size : 0.0;
    for (int j = 0; j < d; ++j) {
      lv0.keys[(first + c) * d + j] = float(ks[c * d + j] * inv);
      lv0.values[(first + c) * d + j] = float(vs[c * d + j] * inv);
    }
    set_log_size(0, int32_t(first + c));
  }
  if (keep_sums) {
    // Room for the block's growth until it freezes, so online updates do not reallocate.
    open_key_sums_.reserve(size_t(k + step_[0]) * d);
    open_value_sums_.reserve(size_t(k + step_[0]) * d);
    open_key_sums_.assign(ks, ks + k * d);
    open_value_sums_.assign(vs, vs + k * d);
  }
  rebuild_members(0, block);

  // Coarser levels.
  for (int l = 1; l < num_levels(); ++l) {
    const auto& below = levels_[size_t(l - 1)];
    int32_t* ids = sized(w.ids, size_t(block.last[l - 1] - block.first[l - 1]));
    int64_t m = 0;
    for (int32_t c = block.first[l - 1]; c < block.last[l - 1]; ++c)
      if (below.sizes[c] > 0) ids[m++] = c;
    float* pts = sized(w.points, size_t(m) * d);
    float* wts = sized(w.weights, size_t(m));
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(pts + i * d, below.keys.data() + int64_t(ids[i]) * d, size_t(d) * 4);
      wts[i] = float(below.sizes[ids[i]]);
    }
    const int64_t kl = std::min<int64_t>(ceil_div(n, cc.tokens_per_centroid[l]), m);
    float* cl = sized(w.centroids, size_t(kl) * d);
    int32_t* ll = sized(w.labels, size_t(m));
    kmeans::init_random(pts, m, d, kl, rng, cl, w.items);
    kmeans::lloyd(pts, wts, m, d, kl, cc.prefill_iterations, cl, ll, w.lloyd);
    const int32_t fl = int32_t(levels_[size_t(l)].count());
    grow(l, kl);
    block.first[l] = fl;
    block.last[l] = int32_t(fl + kl);
    auto& parents = levels_[size_t(l - 1)].parents;
    // Empty children (only possible with duplicate keys) hang under the block's first cluster.
    for (int32_t c = block.first[l - 1]; c < block.last[l - 1]; ++c) parents[c] = fl;
    for (int64_t i = 0; i < m; ++i) parents[ids[i]] = fl + ll[i];
    rebuild_members(l, block);
    for (int32_t c = fl; c < fl + kl; ++c) recompute_from_children(l, c);
  }
}

void ClusterIndex::build(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t end,
                         const AttentionConfig& config, const Rope& rope) {
  MP_CHECK(cache.config().head_dim == config.head_dim, "cluster index: cache head_dim {} differs from config's {}",
           cache.config().head_dim, config.head_dim);
  MP_CHECK(end >= 0 && (end <= cache.length(seq) || end <= config.cluster.sinks),
           "cluster index: end {} outside sequence {} of length {}", end, seq, cache.length(seq));
  const auto& cc = config.cluster;
  reset(config, cc.sinks);
  if (end <= begin_) return;
  const int64_t n = end - begin_, bs = cc.block_size;
  // Block lengths: whole blocks of bs; a remainder < bs/2 joins the last one.
  int64_t full = n / bs, rest = n % bs;
  if (full == 0) {
    full = 0;
  } else if (rest > 0 && rest < bs / 2) {
    rest += bs;
    --full;
  }
  const int64_t nblocks = full + (rest > 0 ? 1 : 0);
  // Room for every block's clusters (at most ceil(block / t) each) plus one block more.
  for (int l = 0; l < num_levels(); ++l) {
    auto& lv = levels_[size_t(l)];
    const size_t c = size_t(n / cc.tokens_per_centroid[size_t(l)] + nblocks + step_[size_t(l)]);
    lv.keys.reserve(c * dim_);
    lv.values.reserve(c * dim_);
    lv.sizes.reserve(c);
    lv.log_sizes.reserve(c);
    lv.position_sums.reserve(c);
    lv.parents.reserve(c);
    lv.offsets.reserve(c + 1);
  }
  labels_.reserve(size_t(n + step_tokens_));
  levels_[0].members.reserve(size_t(n + step_tokens_));
  int64_t pos = begin_;
  for (int64_t b = 0; b < nblocks; ++b) {
    ClusterBlock block;
    block.begin = pos;
    block.end = pos + (b < full ? bs : rest);
    block.frozen = b + 1 < nblocks;
    read_tokens(cache, seq, layer, head, block.begin, block.end - block.begin, rope, tls_work);
    build_block(block, config, stream_seed(config, 0, seq, layer, head, b), !block.frozen);
    blocks_.push_back(block);
    pos = block.end;
  }
  end_ = end;
  size_online_work(tls_work, max_open_clusters(cc), cc.window, dim_);
}

void ClusterIndex::append(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t new_end,
                          const AttentionConfig& config, const Rope& rope) {
  MP_CHECK(dim_ == config.head_dim && num_levels() == int(config.cluster.tokens_per_centroid.size()),
           "cluster index: append before build (or with another config)");
  MP_CHECK(new_end >= end_ && (new_end <= cache.length(seq) || new_end == begin_),
           "cluster index: new end {} must be in [{}, length {}] of sequence {}", new_end, end_, cache.length(seq),
           seq);
  while (end_ < new_end) {
    int64_t count = std::min<int64_t>(config.cluster.window, new_end - end_);
    append_chunk(cache, seq, layer, head, count, config, rope);
  }
}

// One online update: `count` (= W) tokens [end_, end_ + count) join the open block.
void ClusterIndex::append_chunk(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t count,
                                const AttentionConfig& config, const Rope& rope) {
  Work& w = tls_work;
  const auto& cc = config.cluster;
  const int d = dim_;
  const int64_t a = end_;
  if (blocks_.empty() || blocks_.back().end - blocks_.back().begin >= cc.block_size) {
    if (!blocks_.empty()) blocks_.back().frozen = true;
    open_key_sums_.clear();
    open_value_sums_.clear();
    ClusterBlock fresh;
    fresh.begin = fresh.end = a;
    for (int l = 0; l < num_levels(); ++l) fresh.first[l] = fresh.last[l] = int32_t(levels_[size_t(l)].count());
    blocks_.push_back(fresh);
  }
  ClusterBlock& block = blocks_.back();
  const ClusterBlock before = block;
  const int64_t n0 = block.end - block.begin, n1 = n0 + count;
  read_tokens(cache, seq, layer, head, a, count, rope, w);
  const float* keys = w.keys.data();
  const float* values = w.values.data();
  kmeans::Rng rng(stream_seed(config, 1, seq, layer, head, a));

  // Level 0: seed the new centroids from random new tokens, assign, refine by Lloyd
  // iterations that move only the new tokens among the open block's clusters.
  auto& lv0 = levels_[0];
  const int32_t first = block.first[0];
  const int64_t k_old = block.last[0] - first;
  const int64_t k_add = std::min<int64_t>(count, ceil_div(n1, cc.tokens_per_centroid[0]) -
                                                     ceil_div(n0, cc.tokens_per_centroid[0]));
  const int64_t k = k_old + k_add;
  const size_t kcap = size_online_work(w, std::max<int64_t>(k, max_open_clusters(cc)), count, d);
  float* cent = w.centroids.data();
  if (k_old > 0) std::memcpy(cent, lv0.keys.data() + int64_t(first) * d, size_t(k_old) * d * 4);
  int32_t* items = sized(w.items, size_t(count));
  for (int64_t i = 0; i < count; ++i) items[i] = int32_t(i);
  int32_t* seeds = sized(w.picked, size_t(k_add));
  kmeans::sample_distinct(rng, items, count, k_add, seeds);
  for (int64_t j = 0; j < k_add; ++j) std::memcpy(cent + (k_old + j) * d, keys + int64_t(seeds[j]) * d, size_t(d) * 4);

  int32_t* lab = sized(w.labels, size_t(count));
  int32_t* used = sized(w.prev, size_t(count));   // labels the current centroids were computed from
  float* dist2 = sized(w.dist2, size_t(count));
  int32_t* cnt = sized(w.counts, kcap);      // new members per cluster (0 outside `cur`)
  int32_t* cur = sized(w.cur, kcap);         // clusters with new members now
  double* ks = sized(w.key_sums, kcap * d);  // sums over the new members
  double* vs = sized(w.value_sums, kcap * d);
  float* dist = sized(w.distances, size_t(count) * kcap);  // [count, k] ||c||^2 - 2 x.c
  float* xnorm = sized(w.xnorms, size_t(count));
  uint8_t* valid = sized(w.valid, size_t(count));       // lab[i] is the argmin of row i
  int32_t* moved_at = sized(w.moved_at, kcap);     // iteration that last moved a centroid
  int32_t* moved = sized(w.moved, kcap);
  float* moved_cent = sized(w.points, kcap * d);
  float* moved_dist = sized(w.weights, size_t(count) * kcap);
  std::fill(cnt, cnt + k, 0);
  std::fill(moved_at, moved_at + k, -1);
  std::fill(used, used + count, -1);  // the centroids include no new token yet
  int64_t ncur = 0;
  auto old_size = [&](int64_t c) { return c < k_old ? int64_t(lv0.sizes[first + c]) : 0; };
  // Counts of the current labels; an empty new cluster takes the new token farthest from
  // its centroid (from a cluster that keeps a member), as at prefill.
  auto count_and_reseed = [&]() {
    for (int64_t t = 0; t < ncur; ++t) cnt[cur[t]] = 0;
    ncur = 0;
    for (int64_t i = 0; i < count; ++i)
      if (cnt[lab[i]]++ == 0) cur[ncur++] = lab[i];
    for (int64_t c = k_old; c < k; ++c) {
      if (cnt[c] > 0) continue;
      int64_t best = -1;
      for (int64_t i = 0; i < count; ++i)
        if (old_size(lab[i]) + cnt[lab[i]] >= 2 && dist2[i] > 0 && (best < 0 || dist2[i] > dist2[best])) best = i;
      if (best < 0) break;  // only duplicates left
      --cnt[lab[best]];
      lab[best] = int32_t(c);
      cnt[c] = 1;
      cur[ncur++] = int32_t(c);
      dist2[best] = 0;
      valid[best] = 0;
    }
  };
  // Sums over the new members of the listed clusters (values only for the final stats).
  auto sum_new = [&](const int32_t* list, int64_t n, int32_t mark, bool with_values) {
    for (int64_t t = 0; t < n; ++t) {
      std::fill(ks + int64_t(list[t]) * d, ks + int64_t(list[t] + 1) * d, 0.0);
      if (with_values) std::fill(vs + int64_t(list[t]) * d, vs + int64_t(list[t] + 1) * d, 0.0);
    }
    for (int64_t i = 0; i < count; ++i) {
      if (mark >= 0 && moved_at[lab[i]] != mark) continue;
      const float* x = keys + i * d;
      double* sk = ks + int64_t(lab[i]) * d;
      for (int j = 0; j < d; ++j) sk[j] += x[j];
      if (with_values) {
        const float* v = values + i * d;
        double* sv = vs + int64_t(lab[i]) * d;
        for (int j = 0; j < d; ++j) sv[j] += v[j];
      }
    }
  };

  // Distances of the new tokens to the open block's centroids, kept between iterations:
  // only the columns of centroids that moved are recomputed, and a token whose nearest
  // centroid did not move only compares it with the moved ones.
  for (int64_t i = 0; i < count; ++i) {
    double x2 = 0;
    for (int j = 0; j < d; ++j) x2 += double(keys[i * d + j]) * keys[i * d + j];
    xnorm[i] = float(x2);
  }
  auto nearest = [&](int32_t it, int64_t nmoved) {
    for (int64_t i = 0; i < count; ++i) {
      const float* row = dist + i * k;
      int32_t best = 0;
      if (it > 0 && valid[i] && moved_at[lab[i]] != it) {
        best = lab[i];
        for (int64_t m = 0; m < nmoved; ++m) {
          const int32_t c = moved[m];
          if (row[c] < row[best] || (row[c] == row[best] && c < best)) best = c;
        }
      } else {
        for (int32_t c = 1; c < k; ++c)
          if (row[c] < row[best]) best = c;
      }
      lab[i] = best;
      valid[i] = 1;
      dist2[i] = std::max(0.0f, xnorm[i] + row[best]);
    }
  };
  kmeans::partial_distances(keys, count, cent, k, d, dist, k, w.lloyd.assign);
  nearest(0, 0);
  for (int64_t j = 0; j < k_add; ++j) {
    lab[seeds[j]] = int32_t(k_old + j);
    dist2[seeds[j]] = 0;
    valid[seeds[j]] = 0;
  }
  for (int it = 1; it <= cc.update_iterations; ++it) {
    count_and_reseed();
    // Clusters whose new members changed since their centroid was computed move to
    // (old sum + new sum) / size; one left without new members goes back to its old mean
    // (a new one keeps its last centroid). None changed: converged.
    int64_t nmoved = 0;
    auto mark = [&](int32_t c) {
      if (moved_at[c] != it) {
        moved_at[c] = it;
        moved[nmoved++] = c;
      }
    };
    for (int64_t i = 0; i < count; ++i)
      if (lab[i] != used[i]) {
        mark(lab[i]);
        if (used[i] >= 0) mark(used[i]);
      }
    if (nmoved == 0) break;
    sum_new(moved, nmoved, it, false);
    for (int64_t m = 0; m < nmoved; ++m) {
      const int64_t c = moved[m];
      if (cnt[c] > 0) {
        const double inv = 1.0 / double(old_size(c) + cnt[c]);
        const double* old = c < k_old ? open_key_sums_.data() + c * d : nullptr;
        for (int j = 0; j < d; ++j) cent[c * d + j] = float(((old ? old[j] : 0.0) + ks[c * d + j]) * inv);
      } else if (c < k_old) {
        std::memcpy(cent + c * d, lv0.keys.data() + (first + c) * d, size_t(d) * 4);
      }
      std::memcpy(moved_cent + m * d, cent + c * d, size_t(d) * 4);
    }
    std::copy(lab, lab + count, used);
    kmeans::partial_distances(keys, count, moved_cent, nmoved, d, moved_dist, nmoved, w.lloyd.assign);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t m = 0; m < nmoved; ++m) dist[i * k + moved[m]] = moved_dist[i * nmoved + m];
    nearest(it, nmoved);
  }
  count_and_reseed();

  // Final statistics of the clusters with new members: old sums + their new members.
  sum_new(cur, ncur, -1, true);
  grow(0, k_add);
  extend(open_key_sums_, size_t(k) * d, size_t(step_[0]) * d, 0.0);
  extend(open_value_sums_, size_t(k) * d, size_t(step_[0]) * d, 0.0);
  std::vector<int32_t>& touched = w.touched;
  touched.clear();
  for (int64_t t = 0; t < ncur; ++t) {
    const int64_t c = cur[t];
    const int32_t id = int32_t(first + c);
    if (c < k_old) touched.push_back(id);
    lv0.sizes[id] += cnt[c];
    double* ok = open_key_sums_.data() + c * d;
    double* ov = open_value_sums_.data() + c * d;
    const double inv = 1.0 / lv0.sizes[id];
    for (int j = 0; j < d; ++j) {
      ok[j] += ks[c * d + j];
      ov[j] += vs[c * d + j];
      lv0.keys[int64_t(id) * d + j] = float(ok[j] * inv);
      lv0.values[int64_t(id) * d + j] = float(ov[j] * inv);
    }
    set_log_size(0, id);
  }
  extend(labels_, size_t(a + count - begin_), size_t(step_tokens_));
  for (int64_t i = 0; i < count; ++i) {
    labels_[a - begin_ + i] = int32_t(first + lab[i]);
    lv0.position_sums[first + lab[i]] += a + i;
  }
  block.end += count;
  block.last[0] = int32_t(first + k);
  end_ += count;
  rebuild_members(0, block);

  // Coarser levels: each new child gets a parent (new coarse clusters seeded from random new
  // children at the level's rate, the rest to the nearest coarse centroid of the block);
  // clusters whose children changed are recomputed from their children.
  for (int l = 1; l < num_levels(); ++l)
    link_new_children(l, before, block, n0, config, rng, touched);
}

void ClusterIndex::link_new_children(int l, const ClusterBlock& before, ClusterBlock& block, int64_t n0,
                                     const AttentionConfig& config, kmeans::Rng& rng,
                                     std::vector<int32_t>& touched) {
  Work& w = tls_work;
  const int d = dim_;
  auto& lv = levels_[size_t(l)];
  auto& below = levels_[size_t(l - 1)];
  const int64_t n1 = block.end - block.begin, tpc = config.cluster.tokens_per_centroid[l];
  const int32_t new_first = before.last[l - 1], new_last = block.last[l - 1];
  const int64_t new_children = new_last - new_first;
  int32_t* nonempty = sized(w.items, size_t(new_children));
  int64_t m = 0;
  for (int32_t c = new_first; c < new_last; ++c)
    if (below.sizes[c] > 0) nonempty[m++] = c;
  const int64_t k_old = block.last[l] - block.first[l];
  int64_t k_add = std::min<int64_t>(ceil_div(n1, tpc) - ceil_div(n0, tpc), m);
  if (k_old == 0 && k_add == 0 && new_children > 0) k_add = 1;  // a fresh block needs a parent
  int32_t* seeds = sized(w.picked, size_t(k_add));
  if (m >= k_add) {
    kmeans::sample_distinct(rng, nonempty, m, k_add, seeds);
  } else {
    for (int64_t j = 0; j < k_add; ++j) seeds[j] = int32_t(new_first + j);
  }
  const int32_t fl = int32_t(lv.count());
  grow(l, k_add);
  for (int64_t j = 0; j < k_add; ++j)
    std::memcpy(lv.keys.data() + (fl + j) * d, below.keys.data() + int64_t(seeds[j]) * d, size_t(d) * 4);
  block.last[l] = int32_t(fl + k_add);
  if (new_children > 0) {
    const int64_t k = block.last[l] - block.first[l];
    int32_t* lab = sized(w.labels, size_t(new_children));
    kmeans::assign_nearest(below.keys.data() + int64_t(new_first) * d, new_children,
                           lv.keys.data() + int64_t(block.first[l]) * d, k, d, lab, nullptr, w.lloyd.assign);
    for (int64_t i = 0; i < new_children; ++i) below.parents[new_first + i] = block.first[l] + lab[i];
    for (int64_t j = 0; j < k_add; ++j) below.parents[seeds[j]] = int32_t(fl + j);
  }
  rebuild_members(l, block);

  // Touched at this level: parents of changed old children, parents of new children.
  int32_t* stamp = sized(w.stamp, size_t(block.last[l] - block.first[l]));
  int32_t* next = sized(w.cur, size_t(touched.size() + new_children));
  int64_t nnext = 0;
  auto mark = [&](int32_t p) {
    if (stamp[p - block.first[l]] == 0) {
      stamp[p - block.first[l]] = 1;
      next[nnext++] = p;
    }
  };
  std::fill(stamp, stamp + (block.last[l] - block.first[l]), 0);
  for (int32_t c : touched) mark(below.parents[c]);
  for (int32_t c = new_first; c < new_last; ++c) mark(below.parents[c]);
  touched.clear();
  for (int64_t t = 0; t < nnext; ++t) {
    recompute_from_children(l, next[t]);
    if (next[t] < fl) touched.push_back(next[t]);
  }
}

int64_t ClusterIndex::memory_bytes() const {
  auto bytes = [](const auto& v) { return int64_t(v.capacity() * sizeof(v[0])); };
  int64_t total = bytes(labels_) + bytes(open_key_sums_) + bytes(open_value_sums_) + bytes(blocks_);
  for (const auto& lv : levels_)
    total += bytes(lv.keys) + bytes(lv.values) + bytes(lv.sizes) + bytes(lv.log_sizes) + bytes(lv.position_sums) +
             bytes(lv.parents) + bytes(lv.radii) + bytes(lv.offsets) + bytes(lv.members);
  return total;
}

}  // namespace multipole
