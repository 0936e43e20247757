#pragma once
// Prefill clustering on the GPU: the blocked two-level k-means of ClusterIndex::build (same
// block rule, same seeds, same initial centroids, same empty-cluster re-seeding, same
// iteration count) over the device KV cache, written straight into a DeviceClusterIndex.
//
// Per block and level: initial centroids = distinct random points drawn by the CPU's Rng on
// the device; each Lloyd iteration = distances by f16 tensor-core mma (points and centroids
// centred on the block's mean) fused with the argmin
// (no [n, k] matrix in memory), counts + re-seeding + a stable counting sort into member
// lists (one CTA per block), then centroids as f64 sums of the f32 keys over the members
// (deterministic: no atomics on values). After the last iteration the key centroids, value
// centroids and sizes are exactly those of the final membership. Level 1 clusters the non-empty
// level-0 centroids weighted by their sizes; its statistics are the size-weighted means of
// its children. Differences from the CPU: assignments use f16 distances (labels can differ
// where two centroids are within f16 rounding), and when duplicates leave fewer non-empty
// fine clusters than coarse ones the surplus coarse clusters stay empty (size 0) instead of
// not existing. Limit (not checked): the distances use f16 copies of the keys centred on
// their block, so a key component more than 65504 from the block's mean would overflow to
// inf and corrupt that block's labels (real post-norm keys are orders of magnitude smaller).
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/cuda/cluster_index.hpp"
#include "multipole/cuda/kv_cache.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole {
class ClusterIndex;
}

namespace multipole::cuda {

// Per-block result of one level (for tests and benchmarks).
struct KMeansBlockStats {
  int entry = 0, block = 0, level = 0;
  double first_inertia = 0, inertia = 0;  // sum of w ||x - c||^2 at the first / last assignment
};

class DeviceKMeans {
 public:
  DeviceKMeans();
  ~DeviceKMeans();
  DeviceKMeans(DeviceKMeans&&) noexcept;
  DeviceKMeans& operator=(DeviceKMeans&&) noexcept;
  // Clusters [sinks, ends[b]) of KV head h of sequence seqs[b], for every b and h, of `layer`
  // of the device cache (keys rotated to their positions: clustered after rotating back to
  // position 0 with `rope`, as the CPU index does). ends[b] is what ClusterIndex::build takes
  // (config.middle_end(length)). Waits for `stream` first (the work buffers are reused), then
  // uploads small block descriptors and enqueues every kernel on `stream` without waiting.
  // The index (entries b * Hkv + h) holds key centroids in key_dtype (f32 or the cache's
  // dtype), value centroids in the cache's dtype.
  //
  // reserve_tokens > 0 prepares online updates (append()): every entry gets room for that
  // many more clustered tokens (DeviceEntryShape capacity) and the open blocks' state is set
  // up on the device after the build.
  void build(const DeviceKVCache& cache, int layer, std::span<const SeqId> seqs, std::span<const int64_t> ends,
             const AttentionConfig& config, const Rope& rope, DType key_dtype, Stream stream,
             int64_t reserve_tokens = 0);
  // The CPU policies' indexes of (seqs[b], KV head h) = cpu[b * Hkv + h] (one or two levels)
  // uploaded with room for reserve_tokens more tokens per entry, ready for append() (tests:
  // the device update from the very state the CPU update starts from). Synchronous.
  void load(const DeviceKVCache& cache, int layer, std::span<const SeqId> seqs,
            std::span<const ClusterIndex* const> cpu, const AttentionConfig& config, const Rope& rope,
            DType key_dtype, int64_t reserve_tokens);

  // Online update (ClusterIndex::append on the device): absorbs [clustered end, new_ends[b])
  // of every entry of sequence b in chunks of config.cluster.window tokens, one launch per
  // chunk for the whole batch (1-4 CTAs per entry: set_update_split), reading only the new
  // tokens from the cache. Same rule, seeds and Rng as the CPU's append_chunk: the open block
  // gains fine centroids seeded from random new tokens, update_iterations Lloyd rounds move
  // only the new tokens (distances as 3xBF16 tensor-core products, ~2^-16 relative), new fine
  // clusters get parents (new coarse clusters seeded from random new children), touched coarse
  // clusters are recomputed from their children; sizes, key and value centroids stay exact
  // statistics of the membership (f64 sums of the open block). Frozen blocks are not touched.
  // Enqueued on `stream` with the chunk descriptors (copied from pinned staging in stream
  // order, so consecutive appends go on one stream; the host waits only for the copy of the
  // append before last, almost always done); the index's host-side entry counts are stale
  // until sync_index(). Throws when an entry would outgrow the capacity reserved at
  // build()/load(). With config.far_field_real_positions (and the far field on), build(), load()
  // and append() end by recomputing the index's position sums from its member lists (one launch
  // over every slot), which that far field reads.
  void append(const DeviceKVCache& cache, std::span<const int64_t> new_ends, const AttentionConfig& config,
              Stream stream);
  // Host-side entry counts and ends from the device (synchronous; before re-planning a decoder).
  void sync_index() { index_->sync_entries(); }
  // Launches enqueued by the last append().
  int update_launches() const { return update_launches_; }
  // Diagnostics: a device buffer of 32 u64 (zeroed by the caller) that the online update
  // kernel adds its per-phase clock64 cycles to (slot names: kmeans.cu, kUpd*); null: off.
  void set_update_profile(unsigned long long* device_slots) { update_profile_ = device_slots; }
  // CTAs per entry of the online update (1 to 8: the first updates, the others share its
  // distances); 0, the default: MULTIPOLE_UPDATE_SPLIT if set, else 4, 2 or 1, the most for
  // which the device holds all the batch's clusters at once. The index it writes is the same
  // whatever the split.
  void set_update_split(int ctas);
  // CTAs per entry of the last append().
  int update_split() const { return update_split_used_; }
  // Entry e as stored in the index (used clusters only; f32 copies of the centroids), for
  // tests; synchronous.
  HostClusterLevel download_index(int entry) const;

  // Valid after build(); the index is complete once the stream reaches this point. A build of
  // the same shapes and dtypes rewrites the same index object.
  const DeviceClusterIndex& index() const { return *index_; }
  int entries() const { return int(entry_seq_.size()); }
  int levels() const { return levels_; }

  // Synchronous downloads (tests): the f32 statistics of entry e as the CPU adapter
  // host_cluster_level() would give them, and per-block inertias.
  HostClusterLevel download(int entry) const;
  std::vector<KMeansBlockStats> block_stats() const;
  // Launches enqueued by the last build().
  int launches() const { return launches_; }
  // Diagnostics: with profiling on, build() records a CUDA event after every launch (this
  // serialises nothing but adds event records); stage_ms() waits for the GPU and returns the
  // time per stage kind ("gather", "L0 assign", ...), summed over iterations.
  void set_profile(bool on) { profile_ = on; }
  std::vector<std::pair<std::string, double>> stage_ms() const;
  // Device bytes held for the work buffers (the index not included).
  int64_t scratch_bytes() const;

 private:
  struct Level {
    int64_t points = 0, clusters = 0;
    int max_n = 0, max_k = 0;
    DeviceBuffer blocks;  // [nblocks] block descriptors
    DeviceBuffer tiles;   // [tiles] (block, first point) of the assignment CTAs
    int num_tiles = 0;
    DeviceBuffer xb, xnorm, labels, dist2, members;  // per point
    DeviceBuffer k_active;  // [nblocks] clusters initialised (k, or fewer points of weight > 0)
    DeviceBuffer cent, centb, cnorm, counts, offsets, values, sizes;  // per cluster
    DeviceBuffer inertia;  // [nblocks, 2] first, last
    DeviceBuffer mean;     // [nblocks, d] origin of the centred f16 copies
    DeviceBuffer big, big_n;  // clusters with long member lists (update load balance)
  };

  void mark(const char* stage, Stream stream);
  // The end of every build(), whether or not it clustered: the online state's start, and the
  // position sums where the config's far field reads them.
  void finish_build(const DeviceKVCache& cache, const AttentionConfig& config, Stream stream);
  bool profile_ = false;
  std::vector<std::pair<std::string, void*>> marks_;  // (stage ended, cudaEvent_t)
  int sms_ = 0;
  int64_t smem_optin_ = 0;
  int levels_ = 0, head_dim_ = 0, num_kv_heads_ = 0, num_blocks_ = 0, launches_ = 0;
  std::vector<int32_t> entry_seq_;
  std::vector<int32_t> block_entry_, block_index_;
  Level lv_[2];
  DeviceBuffer points_;          // [tokens, d] f32 clustering keys of level 0
  DeviceBuffer rng_;             // [nblocks, 4] u64 Rng state (level 0 init -> level 1 init)
  DeviceBuffer entry_desc_, inv_freq_;
  std::unique_ptr<DeviceClusterIndex> index_;
  std::vector<DeviceEntryShape> shapes_;

  // Online update state (host mirror of the open blocks, capacities, device buffers).
  struct Online;
  struct Staging;  // pinned host staging of the update descriptors (kept across builds)
  std::unique_ptr<Online> online_;
  std::unique_ptr<Staging> staging_;
  int layer_ = 0, update_launches_ = 0, update_split_ = 0, update_split_used_ = 1;
  unsigned long long* update_profile_ = nullptr;
};

}  // namespace multipole::cuda
