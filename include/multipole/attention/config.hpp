#pragma once
// Parameters of the attention policies. Defaults follow docs/multipole-attention.md.
#include <cstdint>
#include <string>
#include <vector>

#include "multipole/attention/rope.hpp"

namespace multipole {

struct ClusterConfig {
  int sinks = 10;          // first tokens, always exact
  int window = 128;        // W: update interval; the local window holds W..2W-1 tokens
  int block_size = 8192;   // tokens per k-means block; finished blocks are frozen
  // Tokens per centroid of each level, finest first; each coarser level clusters the
  // centroids of the level below. {16}: one level at 6.25%. A coarse cluster of 4 fine ones
  // keeps nearly one level's accuracy (8 lost a third of it past 2K tokens:
  // docs/evaluation.md, "Finer coarse clusters").
  std::vector<int> tokens_per_centroid = {16, 64};
  int prefill_iterations = 10;  // Lloyd iterations per block at prefill
  int update_iterations = 3;    // Lloyd iterations of the open block per online update
  uint64_t seed = 0;
};

struct AttentionConfig {
  int num_q_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  float scale = 0.0f;  // 0: 1/sqrt(head_dim)
  RopeConfig rope;     // rope.head_dim must equal head_dim

  int budget = 128;         // tokens per KV head chosen beyond sinks + window
  int coarse_budget = 0;    // tokens under the clusters expanded at each coarser level; 0: 16 x budget
  // Coarser levels are ranked for expansion by s (q.c + w |q| r), r the largest distance of
  // a child centroid from the cluster's centroid: w = 0 (default) is the method's centroid
  // score; w = 1 an upper bound of the best child's score. CPU only (an experiment).
  float coarse_radius_weight = 0.0f;
  bool multipole_far_field = true;   // false: "squeezed" (unselected clusters dropped)
  bool score_real_positions = false; // score centroids at their members' mean position
  // The far field's logits from the unselected centroids rotated to their members' mean
  // positions against the real query, while the selection keeps the fixed-position scores.
  // An experiment (is the far field's error its position?), on the CPU and the GPU.
  bool far_field_real_positions = false;
  // Clusters selected by their members' exact attention mass (the real query against every
  // clustered key) instead of their centroid scores: a cluster oracle, which tells the error
  // of centroid scoring from that of selecting whole clusters. The far field and its
  // normalisation keep the centroids. CPU only (an experiment).
  bool select_by_exact_mass = false;
  // With select_by_exact_mass: every member's key seen as the centroids are scored (at
  // score_position), not at its real position, so the mass holds the spread of a cluster's
  // keys without the position's error. Needs the fixed-position scoring.
  bool mass_at_score_position = false;
  // Each centroid's logit gains the second-order term of its members' log-mean-exp about it,
  // s^2/2 sum_j q_j^2 v_j, v_j the mean square of the members' keys' deviation from the centroid
  // in dimension j at the scoring position (a diagonal quadrupole): selection and far field both
  // see it. The deviations come from every clustered key at each step (an index would keep v, d
  // floats a cluster). Needs the fixed-position scoring. CPU only (an experiment).
  bool score_with_spread = false;
  // Re-ranking of the finest level: the centroid scores pick candidate clusters worth up to
  // rerank_tokens tokens, their members' keys are read and scored exactly (the real query at
  // the real positions), and those exact masses choose the clusters that fill the budget; the
  // far field gives an unchosen candidate its exact mass (with its value centroid). 0: off;
  // otherwise > budget. CUDA: in the three-kernel step (one launch more), not with the far field
  // at real positions.
  int rerank_tokens = 0;
  double score_position = 2048;      // fixed query position for centroid scoring
  ClusterConfig cluster;

  int quest_page_size = 16;  // quest: tokens per page bound

  int group_size() const { return num_q_heads / num_kv_heads; }
  // Multipole's far field on, at real positions (what the GPU decode and index keep it for).
  bool far_field_at_real_positions() const { return multipole_far_field && far_field_real_positions; }
  // End of the middle region for a sequence of `length` tokens: positions [0, sinks) are
  // sinks, [sinks, middle_end) are clustered (multipole) or eligible for selection (quest,
  // oracle-topk), [middle_end, length) is the local window of W..2W-1 tokens (fewer when
  // the sequence is short). Depends on length only, so every policy sees the same regions
  // and the online update runs exactly when the window reaches 2W.
  int64_t middle_end(int64_t length) const;
  // End of the clustered region [sinks, clustered_end): middle_end, never below sinks (so
  // that an empty region is [sinks, sinks) however short the sequence).
  int64_t clustered_end(int64_t length) const;
  float softmax_scale() const;
  // Throws multipole::Error naming the first invalid field.
  void validate() const;
};

}  // namespace multipole
