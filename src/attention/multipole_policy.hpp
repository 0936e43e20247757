#pragma once
// The "multipole" policy (and "squeezed": the same with the far field off) on the CPU, plus
// the fast RoPE rotations it and the cluster index need.
#include <memory>
#include <vector>

#include "attention/selection.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/policy.hpp"

namespace multipole {

namespace kernels {
struct SoftmaxState;
}

// Rotation of head vectors by a fixed number of positions, with cos/sin computed once and
// applied to many vectors (Rope::rotate_by recomputes them per call).
class Rotation {
 public:
  // Prepares rotate_by(., delta) for `rope`.
  void set(const Rope& rope, double delta);
  // x: [head_dim] rotated in place.
  void apply(float* x) const;

 private:
  int half_ = 0;
  std::vector<float> cos_, sin_;  // [rotary_dim / 2]
};

// Rotates n head vectors at consecutive positions first, first+1, ... back to position 0:
// x_t = rotate_by(x_t, -(first + t)). Angles advance by a recurrence in f64, re-anchored
// every few tokens, so this costs a few flops per channel instead of a sin/cos pair.
//   x: [n, head_dim]
void unrotate_consecutive(const Rope& rope, float* x, int64_t n, int64_t first);

// Decode per (sequence, KV head): score the coarsest level's clusters, select under the
// coarse budget (max(budget, coarse_budget or 16 x budget) tokens) by greedy-with-skip on
// I_i = sum_g e^{s q~_g.c_i} / sum_{j in frontier} n_j e^{s q~_g.c_j}, send the unselected to
// the far field and expand the selected into the next level's candidates; at level 0 select
// under `budget` and attend the chosen clusters' tokens exactly with sinks and window. The
// frontier is the far field so far plus the current candidates (all tokens, once each).
class MultipolePolicy final : public AttentionPolicy {
 public:
  explicit MultipolePolicy(const AttentionConfig& config);
  ~MultipolePolicy() override;

  std::string_view name() const override { return config_.multipole_far_field ? "multipole" : "squeezed"; }
  void update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) override;
  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool& pool) override;
  void forget(SeqId seq) override;

  // The index of (seq, layer, KV head), or nullptr when that sequence/layer has none yet.
  const ClusterIndex* index(SeqId seq, int layer, int kv_head) const;

 private:
  struct LayerState {
    bool built = false;
    std::vector<ClusterIndex> heads;  // [num_kv_heads]
  };
  struct Scratch;
  void decode_head(const PagedKVCache& cache, const KVLayerView& kv, SeqId seq, int layer, int head, const float* q,
                   float* out, const Rotation& score_rotation, Scratch& s, DecodeStats& stats) const;
  void rank_by_bound(const ClusterLevel& lv, const int32_t* cand, int64_t n, const float* qs, int G, int d,
                     float scale, const float* x, Scratch& s, float* imp) const;
  const float* centroids_at_mean_positions(const ClusterLevel& lv, const int32_t* cand, int64_t n, int d,
                                           Scratch& s) const;
  // The exact-mass and spread experiments read every clustered key at each step.
  bool reads_clustered_keys() const { return config_.select_by_exact_mass || config_.score_with_spread; }
  const float* clustered_keys_at_position_zero(const PagedKVCache& cache, SeqId seq, int layer, int head,
                                               const ClusterIndex& idx, Scratch& s) const;
  const float* spreads(const PagedKVCache& cache, SeqId seq, int layer, int head, const ClusterIndex& idx,
                       int64_t stride, Scratch& s) const;
  const float* exact_masses(const PagedKVCache& cache, SeqId seq, int layer, int head, const ClusterIndex& idx,
                           const float* q, const float* qs, int G, float scale, int64_t stride, Scratch& s) const;
  const float* far_reference(float* x, int64_t n, int G, const float* zmax, Scratch& s) const;
  SelectionResult rerank(const KVLayerView& kv, const int32_t* page_table, int head, const ClusterLevel& lv,
                         const int32_t* cand, int64_t n, const float* imp, const int32_t* sizes, const float* q, int G,
                         float scale, float* x, float* zmax, float* zsum, int32_t* picked, Scratch& s,
                         int64_t* read) const;
  void far_at_real_positions(const ClusterLevel& lv, const int32_t* cand, int64_t n, const uint8_t* chosen,
                             const float* q, int G, int d, float scale, Scratch& s,
                             kernels::SoftmaxState& far) const;

  Rope rope_;
  std::vector<std::vector<LayerState>> seqs_;  // [seq id][layer]
  std::vector<std::unique_ptr<Scratch>> scratch_;  // per pool thread
  std::vector<DecodeStats> thread_stats_;          // per pool thread
  std::vector<Rotation> rotations_;                 // per sequence of the batch
  std::vector<std::pair<int32_t, int32_t>> tasks_;  // (batch index, KV head) pending an update
  std::vector<SeqId> seen_;                         // update(): the batch, sorted
};

}  // namespace multipole
