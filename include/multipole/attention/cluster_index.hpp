#pragma once
// The cluster index of one (sequence, layer, KV head), as used by the "multipole" and
// "squeezed" policies (docs/multipole-attention.md, section 2), in flat arrays that the
// CUDA port and `multipole attn --dump-index` read directly.
//
// Regions: positions [0, sinks) are sinks, [begin(), end()) is clustered, the rest is the
// local window. end() is AttentionConfig::middle_end(length) at the last update.
//
// Clustering space: keys are cached after RoPE; a token's clustering key is its cached key
// rotated back to position 0, k0 = Rope::rotate_by(k, -pos). Per cluster the index keeps
// the key centroid (mean k0 of the tokens under it), the value centroid (mean stored value,
// f32), the size (tokens under it) and the sum of those tokens' positions. These always
// equal the statistics of the current membership: level 0 is computed from its tokens (f64
// sums, only ever added to, never drifting through removals), a coarser cluster from its
// children (token-weighted), every time a cluster is touched.
//
// Levels: level 0 has one centroid per tokens_per_centroid[0] tokens, level l one per
// tokens_per_centroid[l] tokens, clustering the centroids of level l-1 (weighted by size).
// Decode scores the coarsest level first and expands only the selected clusters.
//
// Blocks: clustering is done in blocks of consecutive tokens, each with its own clusters
// at every level (count per level = ceil(block tokens / tokens_per_centroid[l]), capped by
// the number of non-empty clusters of the level below). The prefill (first build) splits
// the clustered region into blocks of block_size tokens; a remainder shorter than
// block_size/2 joins the last block (which then holds up to 1.5 block_size), a longer one is
// a block of its own. All blocks but the last are frozen forever. The online update appends
// the W = window tokens that leave the local window to the last ("open") block; if the
// open block already holds >= block_size tokens it is frozen first and those W tokens start
// a new open block. Cluster ids are block-major at every level: the open block's clusters
// are the tail of each level's arrays, so an update rewrites only that tail.
//
// Prefill (per block): Lloyd k-means on squared Euclidean distance, prefill_iterations
// rounds, initial centroids = distinct random tokens, an empty cluster re-seeded with the
// point farthest from its centroid; then each coarser level by weighted k-means of the
// finer centroids. Seeds mix cluster.seed with (sequence, layer, head, block).
// Online update (per W new tokens, seeds mixing in the chunk's first position): the open
// block gains ceil(n'/t0) - ceil(n/t0) level-0 centroids seeded from random new tokens;
// the new tokens are assigned to the nearest level-0 centroid of the open block, then
// update_iterations Lloyd rounds move only the new tokens among the open block's clusters
// (old members never move). At each coarser level new children get a parent: new coarse
// clusters (at the level's rate) are seeded from random new children, the other new
// children join the nearest coarse centroid of the open block; every coarse cluster whose
// children changed is recomputed from them. Only the W new tokens are read from the cache.
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole {

class AttentionPolicy;
namespace kmeans {
class Rng;
}

struct ClusterLevel {
  // Per cluster i of this level (C = count()):
  std::vector<float> keys;             // [C, d] key centroids (position-0 space)
  std::vector<float> values;           // [C, d] value centroids
  std::vector<int32_t> sizes;          // [C] tokens under the cluster (0 only when duplicates left it empty)
  std::vector<float> log_sizes;        // [C] log(size): the far-field bias; -inf when empty
  std::vector<int64_t> position_sums;  // [C] sum of the positions of the tokens under it
  std::vector<int32_t> parents;        // [C] cluster of the next coarser level; -1 at the coarsest
  std::vector<float> radii;            // [C] level l > 0: largest distance of a non-empty child's key centroid from
                                       // this key centroid (0 at level 0)
  // Membership as CSR, members of cluster i = members[offsets[i], offsets[i+1]) ascending:
  // level 0: token positions; level l > 0: ids of level l-1 clusters (its children).
  std::vector<int32_t> offsets;  // [C + 1]
  std::vector<int32_t> members;  // level 0: [tokens clustered]; level l > 0: [C of level l-1]

  int64_t count() const { return int64_t(sizes.size()); }
  std::span<const int32_t> members_of(int64_t i) const {
    return {members.data() + offsets[i], size_t(offsets[i + 1] - offsets[i])};
  }
  // Mean position of the tokens under cluster i (0 when empty).
  double mean_position(int64_t i) const { return sizes[i] > 0 ? double(position_sums[i]) / sizes[i] : 0.0; }
};

struct ClusterBlock {
  static constexpr int kMaxLevels = 4;
  int64_t begin = 0, end = 0;            // token positions [begin, end)
  std::array<int32_t, kMaxLevels> first{};  // its clusters of level l are [first[l], last[l])
  std::array<int32_t, kMaxLevels> last{};
  bool frozen = false;
};

class ClusterIndex {
 public:
  int head_dim() const { return dim_; }
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  int num_levels() const { return int(levels_.size()); }
  const ClusterLevel& level(int l) const { return levels_[size_t(l)]; }
  std::span<const ClusterBlock> blocks() const { return blocks_; }
  // Level-0 cluster of each clustered token: labels()[pos - begin()].
  std::span<const int32_t> labels() const { return labels_; }

  // Prefill clustering: indexes [config.cluster.sinks, end) of KV head `head` of `seq` from
  // the cache, replacing any previous state. k-means seeds mix config.cluster.seed with
  // (seq, layer, head, block).
  void build(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t end, const AttentionConfig& config,
             const Rope& rope);
  // Online update: absorbs [end(), new_end) in chunks of config.cluster.window tokens, each
  // joining the open block (see the block rule above). Reads only the new tokens.
  void append(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t new_end,
              const AttentionConfig& config, const Rope& rope);

  // Bytes allocated (centroids, membership, open-block sums), spare capacity included.
  int64_t memory_bytes() const;

 private:
  void reset(const AttentionConfig& config, int64_t begin);
  void grow(int l, int64_t add);
  void build_block(ClusterBlock& block, const AttentionConfig& config, uint64_t seed, bool keep_sums);
  void append_chunk(const PagedKVCache& cache, SeqId seq, int layer, int head, int64_t count,
                    const AttentionConfig& config, const Rope& rope);
  void link_new_children(int l, const ClusterBlock& before, ClusterBlock& block, int64_t n0,
                         const AttentionConfig& config, kmeans::Rng& rng, std::vector<int32_t>& touched);
  void rebuild_members(int l, const ClusterBlock& block);
  void recompute_from_children(int l, int32_t cluster);
  void set_log_size(int l, int32_t cluster);

  int dim_ = 0;
  int64_t begin_ = 0, end_ = 0;
  int64_t step_tokens_ = 0;                            // growth step of token arrays (a block)
  std::array<int64_t, ClusterBlock::kMaxLevels> step_{};  // ... of each level's arrays (a block's clusters)
  std::vector<ClusterLevel> levels_;
  std::vector<ClusterBlock> blocks_;
  std::vector<int32_t> labels_;
  // f64 sums of k0 and of values over the members of each open-block level-0 cluster:
  // [open clusters, d]. Only ever added to, so centroids stay exact means of the members.
  std::vector<double> open_key_sums_, open_value_sums_;
};

// The index that a "multipole" or "squeezed" policy keeps for (seq, layer, KV head);
// nullptr when `policy` is of another kind or has not indexed that sequence and layer yet.
const ClusterIndex* find_cluster_index(const AttentionPolicy& policy, SeqId seq, int layer, int kv_head);

}  // namespace multipole
