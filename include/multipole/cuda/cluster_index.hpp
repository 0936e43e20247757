#pragma once
// Flat device cluster index for Multipole decode: for each (sequence, KV head) of a batch,
// one level of clusters over the clustered region [sinks, clustered_end): key centroids (in
// the pre-RoPE key space), value centroids, sizes, and cluster -> token lists (CSR). Built
// on the host from HostClusterLevel entries (one per (b, h), b-major) and uploaded once;
// decode reads it without host synchronisation.
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/core/dtype.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole {
class ClusterIndex;
}

namespace multipole::cuda {

// One (sequence, KV head): C (fine) clusters of dimension d, optionally under Cc coarse
// clusters whose members are fine cluster ids (decode then scores the coarse level first
// and only the children of the selected coarse clusters; the coarse_* vectors are empty
// for a one-level index).
struct HostClusterLevel {
  int64_t clustered_end = 0;            // the clusters cover positions [sinks, clustered_end)
  std::vector<float> key_centroids;     // [C, d]
  std::vector<float> value_centroids;   // [C, d]
  std::vector<int32_t> sizes;           // [C], sizes[i] == member_offsets[i+1] - member_offsets[i]
  std::vector<int32_t> member_offsets;  // [C + 1]
  std::vector<int32_t> members;         // [member_offsets[C]] token positions
  std::vector<float> coarse_key_centroids;     // [Cc, d]
  std::vector<float> coarse_value_centroids;   // [Cc, d]
  std::vector<int32_t> coarse_sizes;           // [Cc] tokens under each coarse cluster
  std::vector<int32_t> coarse_child_offsets;   // [Cc + 1], or empty for one level
  std::vector<int32_t> coarse_children;        // [C] fine cluster ids (each fine cluster once)
  int num_clusters() const { return int(sizes.size()); }
  int num_coarse() const { return int(coarse_sizes.size()); }
};

// Each cluster's position sum, the coarse clusters' first (each its children's), then the fine
// ones' (each its token positions): the entry's used slots as DeviceClusterIndex lays them out.
std::vector<int64_t> position_sums(const HostClusterLevel& x);

// The CPU policies' index (multipole::ClusterIndex) of one (sequence, layer, KV head): level
// 0 (key centroids in position-0 space, value centroids, sizes, members, end()) and, when
// the index has two levels, level 1 as the coarse level. More than two levels are rejected.
HostClusterLevel host_cluster_level(const ClusterIndex& index);

// Plain view for kernels. Entry (b, h) holds its Cc coarse clusters first, then its fine
// clusters; a coarse cluster's member list holds fine cluster ids local to the fine range.
struct DeviceClusterView {
  const void* key_centroids = nullptr;    // [total_clusters, d], f32 or the KV dtype
  const void* value_centroids = nullptr;  // [total_clusters, d], the KV dtype
  const int32_t* sizes = nullptr;         // [total_clusters]
  const int32_t* member_begin = nullptr;  // [total_clusters] into members
  const int32_t* members = nullptr;       // [total_members] token positions
  const int32_t* entry_begin = nullptr;   // [entries] first cluster of entry (b, h)
  const int32_t* entry_count = nullptr;   // [entries] clusters of entry (b, h)
  const int32_t* entry_end = nullptr;     // [entries] clustered_end of entry (b, h)
  const int32_t* entry_coarse = nullptr;  // [entries] coarse clusters Cc at the entry's start
  // [total_clusters] sum of the token positions under each cluster (the far field at real
  // positions reads them; valid when DeviceClusterIndex::has_position_sums())
  const int64_t* position_sums = nullptr;
  DType key_dtype = DType::F32;
  DType value_dtype = DType::BF16;
};

// Shape of entry (b, h) of an index whose cluster data a device producer writes
// (DeviceKMeans): `fine` clusters over `tokens` clustered positions ending at clustered_end,
// under `coarse` clusters (0: one level).
//
// Capacity (room for the online update, DeviceKMeans::append; 0 = exactly the used size):
// the entry gets fine_capacity fine slots, coarse_capacity coarse slots and member-list room
// for token_capacity tokens (+ fine_capacity child ids with two levels). The entry's
// clusters are still [entry_begin, entry_begin + entry_count) with entry_coarse coarse ones
// first, so readers see no difference: entry_coarse is the coarse capacity, and the coarse
// slots past the used ones are placeholders of size 0 (never scored into the normaliser,
// never selected, never in a far list) whose child lists start where the used ones end (the
// last placeholder's list also spans the unused child room up to the first fine list; it is
// never read, its size being 0); entry_count = coarse capacity + used fine clusters, the
// spare fine slots lie past it. With capacity the index keeps at least one placeholder.
struct DeviceEntryShape {
  int64_t clustered_end = 0;
  int64_t tokens = 0;
  int fine = 0, coarse = 0;
  int64_t token_capacity = 0;
  int fine_capacity = 0, coarse_capacity = 0;
};

// Writable arrays of an index for device producers; layout as DeviceClusterView. (The position
// sums are not among them: refresh_position_sums() derives them from the member lists.)
struct DeviceClusterTarget {
  void* key_centroids = nullptr;
  void* value_centroids = nullptr;
  int32_t* sizes = nullptr;
  int32_t* member_begin = nullptr;
  int32_t* members = nullptr;  // entry e's lists start at member_base(e): coarse child lists, then fine
  int32_t* entry_count = nullptr;  // [entries] (the online update grows it)
  int32_t* entry_end = nullptr;    // [entries]
};

class DeviceClusterIndex {
 public:
  // entries: [batch * num_kv_heads], entry b * num_kv_heads + h describes sequence b of the
  // batch it will decode with, KV head h. key_dtype: f32 or value_dtype; value_dtype: the
  // cache's (bf16/f16). Throws naming the entry and field on inconsistent input. When every
  // entry's centroid vectors are empty, the centroids are left unset on the device for
  // fill_random_centroids (benchmarks).
  // capacity: empty, or per entry the room to allocate (DeviceEntryShape's capacity fields;
  // the data fields are ignored).
  DeviceClusterIndex(int head_dim, int num_kv_heads, DType key_dtype, DType value_dtype,
                     std::span<const HostClusterLevel> entries, std::span<const DeviceEntryShape> capacity = {});

  // Allocates an index of the given shapes whose cluster data (centroids, sizes, lists) is
  // left for a device producer to write through target(); the entry tables are set here.
  DeviceClusterIndex(int head_dim, int num_kv_heads, DType key_dtype, DType value_dtype,
                     std::span<const DeviceEntryShape> shapes);

  DeviceClusterView view() const;
  // For a device producer; marks the position sums stale until refresh_position_sums().
  DeviceClusterTarget target();
  // Position sums: computed on the host by the constructor from host levels; after a device
  // producer's writes, recomputed from the member lists by refresh_position_sums() (enqueued on
  // `stream`, one launch, every used slot).
  bool has_position_sums() const { return position_sums_ok_; }
  void refresh_position_sums(Stream stream);
  // After a device producer changed entry counts / ends (online update): copies them back
  // (synchronous; call before re-planning a decoder).
  void sync_entries();
  // Allocated slots of entry e (coarse slots + fine slots) and its member-list room.
  int entry_capacity(int e) const { return entry_cap_[size_t(e)]; }
  int64_t member_base(int e) const { return member_base_[size_t(e)]; }
  int head_dim() const { return head_dim_; }
  int num_kv_heads() const { return num_kv_heads_; }
  int entries() const { return int(entry_begin_.size()); }
  int max_clusters() const { return max_clusters_; }     // most clusters (coarse + fine) of an entry
  int max_coarse() const { return max_coarse_; }
  bool hierarchical() const { return max_coarse_ > 0; }
  int entry_coarse(int e) const { return entry_coarse_[e]; }
  int64_t total_clusters() const { return total_clusters_; }
  int entry_clusters(int e) const { return entry_count_[e]; }
  int64_t entry_clustered_end(int e) const { return entry_end_[e]; }
  int64_t entry_first_cluster(int e) const { return entry_begin_[e]; }
  DType key_dtype() const { return key_dtype_; }
  DType value_dtype() const { return value_dtype_; }
  // Benchmarks: centroids drawn uniformly from [-1, 1) on the device.
  void fill_random_centroids(uint64_t seed);
  // Bytes of centroids (keys + values) on the device.
  int64_t centroid_bytes() const;

 private:
  int head_dim_ = 0, num_kv_heads_ = 0;
  DType key_dtype_ = DType::F32, value_dtype_ = DType::BF16;
  int max_clusters_ = 0, max_coarse_ = 0;
  int64_t total_clusters_ = 0;
  std::vector<int32_t> entry_begin_, entry_count_, entry_end_, entry_coarse_;
  std::vector<int64_t> member_base_;
  std::vector<int32_t> entry_cap_;
  bool position_sums_ok_ = false;
  DeviceBuffer keys_, values_, sizes_, member_begin_, members_, position_sums_, d_entry_begin_, d_entry_count_,
      d_entry_end_, d_entry_coarse_;
};

}  // namespace multipole::cuda
