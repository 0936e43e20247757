#pragma once
// Plain-data descriptors and launch functions of the GPU k-means (src/cuda/kmeans.cu); the
// host driver (src/cuda/kmeans.cpp) needs no CUDA headers.
#include <cstdint>

#include "multipole/cuda/cluster_index.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda::detail {

constexpr int kKmTilePoints = 128;  // points per assignment CTA (4 warps x 32)

// One block of one level. Level 0: points are tokens; level 1: points are the level-0
// clusters of the same token block.
struct KmBlock {
  int32_t point_begin, n;      // the level's point arrays
  int32_t cluster_begin, k;    // the level's cluster arrays (k allocated)
  int32_t seq, head;           // cache coordinates (level 0)
  int32_t token_begin;         // level 0: position of point 0
  int32_t dev_cluster;         // first cluster of the block in the index
  int32_t dev_member;          // the block's member lists in the index start here
  int32_t fine_local;          // level 1: entry-local fine id of the block's first child
  uint64_t seed;               // level 0: Rng seed
};

struct KmEntry {
  int32_t seq, head, point_begin, count;  // tokens [sinks, sinks + count) -> points from point_begin
};

struct KmTile {
  int32_t block, start;  // assignment CTA: points [start, start + kKmTilePoints) of a block
};

// The cache as the kernels read it (one layer).
struct KvRead {
  const std::byte* keys;
  const std::byte* values;
  const int32_t* tables;
  const int64_t* table_offset;
  int page_size, num_kv_heads, f16;
};

// d: 64 or 128. Shapes: P points, K clusters of a level; xb/centb f16 [., d], centred on
// the block's mean [blocks, d].
void km_gather(int d, const KvRead& kv, const KmEntry* entries, int num_entries, int max_count,
               const double* inv_freq, int half, int sinks, float* points, Stream s);
void km_mean(int d, int blocks, const KmBlock* b, const float* points, float* mean, Stream s);
void km_init(int blocks, int max_n, int max_k, const KmBlock* b, int level, int d, const float* points,
             const int32_t* weights, uint64_t* rng, float* cent, int32_t* k_active, Stream s);
void km_prep(int d, int blocks, int max_rows, const KmBlock* b, const int32_t* k_active, bool by_points,
             const float* src, const float* mean, void* dst, float* norm, Stream s);
void km_assign(int d, int tiles, const KmBlock* b, const KmTile* t, const void* xb, const float* xnorm,
               const void* centb, const float* cnorm, int32_t* labels, float* dist2, Stream s);
void km_count(int blocks, int max_n, int max_k, const KmBlock* b, const int32_t* k_active, const int32_t* weights,
              int32_t* labels, float* dist2, int32_t* counts, int32_t* offsets, int32_t* members, double* inertia,
              bool first_iteration, Stream s);
void km_update(int d, int blocks, int max_k, const KmBlock* b, const KvRead& kv, const float* points,
               const int32_t* weights, const float* point_values, const int32_t* counts, const int32_t* offsets,
               const int32_t* members, float* cent, float* values, int32_t* sizes, bool final_pass, void* big,
               int32_t* big_n, int sms, Stream s);  // big: [K] int2 scratch, big_n: one int (3 launches)
void km_emit(int d, int blocks, int max_k, const KmBlock* b, int level, const float* cent, const float* values,
             const int32_t* sizes, const int32_t* offsets, const int32_t* members, const DeviceClusterTarget& out,
             int key_kind, bool value_f16, Stream s);

// ---- online update (ClusterIndex::append_chunk on the device) -----------------------------

// Open-block state of one entry (device, updated by every chunk; the host keeps a mirror).
struct KmOpen {
  int32_t seq, head;
  int32_t has_block;       // 0: no block yet (nothing clustered)
  int32_t begin, end;      // open block tokens [begin, end); end = the entry's clustered end
  int32_t first0, last0;   // its fine clusters, entry-local (last0 = fine clusters in use)
  int32_t first1, last1;   // its coarse clusters, entry-local (last1 = coarse slots in use)
  int32_t cluster_base;    // index: the entry's first cluster (coarse slots, then fine slots)
  int32_t coarse_cap;      // coarse slots (0: one level)
  int32_t member_base;     // index: child lists at member_base, token lists at + child_cap
  int32_t child_cap;       // fine slots with two levels, else 0
};

// One chunk of one entry: tokens [a, a + count) join the open block (count 0: none).
struct KmChunk {
  int32_t a, count;
  uint64_t seed;  // stream_seed(config, 1, seq, layer, head, a) of the CPU index
};

// Sizes of the per-entry online buffers and the clustering rule.
struct KmOnlineDims {
  int ko, ko1, to;  // open fine clusters (a multiple of 4), open coarse clusters, open tokens (upper bounds)
  int window, block_size, t0, t1, levels, iterations, sinks;
};

// Per-entry buffers (entry e at e * the per-entry size).
struct KmOnlineBuffers {
  KmOpen* open;        // [E]
  double* key_sums;    // [E, ko, d] f64 sums of k0 over each open fine cluster's members
  double* value_sums;  // [E, ko, d]
  int32_t* parents;    // [E, ko] open-block coarse cluster of each open fine cluster
  float* coarse_keys;  // [E, ko1, d] f32 key centroids of the open coarse clusters
  float* cent;         // [E, ko, d] working centroids
  float* cnorm;        // [E, ko]
  float* dist;         // [E, window, ko] partial distances of the chunk's tokens
  int32_t* scratch;    // [E, to] old member lists while the lists are rebuilt
  unsigned long long* prof = nullptr;  // [kPhaseClockSlots] per-phase cycles (diagnostics) or null
};

// Open-block statistics from the index (after a build or an upload): f64 sums from the
// cache, working centroids and norms, parents, f32 coarse keys; placeholders emptied.
void km_online_init(int d, int entries, const KvRead& kv, const double* inv_freq, int half,
                    const KmOnlineDims& dims, const KmOnlineBuffers& buf, const DeviceClusterTarget& out, int key_kind,
                    bool value_f16, Stream s);
// Dynamic shared memory of km_online_update (the host checks it against the device limit).
size_t km_online_smem(int d, const KmOnlineDims& dims);
// Clusters of `split` online-update CTAs the device holds at once.
int km_online_max_clusters(int d, const KmOnlineDims& dims, int split);
// One chunk for every entry: a cluster of `split` (1 to 8) CTAs each, the first doing the
// update and the others a share of its distance tiles.
void km_online_update(int d, int entries, int split, const KvRead& kv, const double* inv_freq, int half,
                      const KmOnlineDims& dims, const KmOnlineBuffers& buf, const KmChunk* chunks,
                      const DeviceClusterTarget& out, int key_kind, bool value_f16, Stream s);

}  // namespace multipole::cuda::detail
