#pragma once
// Kernel arguments and launch functions of the CUDA attention backend. Plain data only, so
// the host planner (decoder.cpp) needs no CUDA headers. Shapes use: B batch, Hq query heads,
// Hkv KV heads, G = Hq / Hkv, GC query heads per CTA (a chunk of the group), D head dim,
// E = B * Hkv entries, items = CTAs along grid.x (one (sequence, split) each).
#include <cstdint>

#include "multipole/core/dtype.hpp"
#include "multipole/cuda/cluster_index.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda::detail {

// Most splits of one sequence (bounds the merge scratch in shared memory).
constexpr int kMaxSplits = 512;
// Centroids scored per CTA of the scoring kernel.
constexpr int kScoreChunk = 64;
// Threads of the selection kernel (one CTA per entry).
constexpr int kSelectThreads = 512;

struct AttendArgs {
  // Cache (one layer): rows of D elements; row r of the pools = (page * Hkv + h) * P + slot.
  const std::byte* keys = nullptr;      // [num_pages, Hkv, P, D]
  const std::byte* values = nullptr;    // [num_pages, Hkv, P, D]
  int page_size = 0, num_kv_heads = 0;
  int page_shift = -1;                  // log2(page_size) when a power of two, else -1
  const int32_t* tables = nullptr;      // concatenated page tables
  const int64_t* table_offset = nullptr;  // [max_sequences]
  const int32_t* lengths = nullptr;     // [max_sequences]
  const int32_t* seq_ids = nullptr;     // [B]
  const float* q = nullptr;             // [B, Hq, D] f32, rotated to each query's position
  float* out = nullptr;                 // [B, Hq, D] f32
  int group = 0;                        // G
  int head_chunks = 0;                  // ceil(G / GC)
  float qscale = 0;                     // softmax scale * log2(e): logits are in the log2 domain
  // Split plan.
  const int32_t* item_seq = nullptr;    // [items] batch index b
  const int32_t* item_split = nullptr;  // [items] split index within b
  const int32_t* seq_item_base = nullptr;  // [B] first item of b
  const int32_t* seq_splits = nullptr;  // [B] splits of b
  int chunk = 0;                        // virtual positions per split, a multiple of the tile
  float* part_o = nullptr;              // [items, Hkv, G, D] unnormalised partial outputs
  float* part_ml = nullptr;             // [items, Hkv, G, 2] partial (max, sum), log2 domain
  int32_t* counters = nullptr;          // [B, Hkv, head_chunks], zero between launches
  // Multipole: virtual positions [0, exact_cap) are exact rows, [exact_cap, exact_cap + C)
  // the entry's clusters as pseudo-tokens (when far_field).
  int exact_cap = 0;
  const int32_t* exact_rows = nullptr;  // [E, exact_cap] pool rows of the exact set
  const int32_t* exact_n = nullptr;     // [E]
  const float* scores = nullptr;        // [total_clusters, G] log2-domain logits of q_score
  const int32_t* far_size = nullptr;    // [total_clusters] size if in the far field, else 0
  const std::byte* value_centroids = nullptr;  // [total_clusters, D] KV dtype
  const int32_t* entry_begin = nullptr;  // [E]
  const int32_t* entry_count = nullptr;  // [E]
  int far_field = 0;
  // Two-level index: the far field is the compact list far_ids[e, 0 .. far_n[e]) of cluster
  // ids local to the entry (virtual positions [exact_cap, exact_cap + far_n)); null: all of
  // the entry's clusters, masked by far_size.
  const int32_t* far_ids = nullptr;     // [E, far_cap]
  const int32_t* far_n = nullptr;       // [E]
  int far_cap = 0;
  // Launched with programmatic dependent launch after the selection kernel (multipole only):
  // everything up to the Q fragments runs before griddepcontrol.wait.
  int pdl = 0;
  // Behind a one-launch step with a fallback: only the entries it left (fallback[e] != 0) run;
  // the other CTAs return at once. Null: every entry.
  const int32_t* fallback = nullptr;    // [E]
};

struct ScoreArgs {
  const float* q_score = nullptr;       // [B, Hq, D] f32, rotated to the scoring position
  const void* key_centroids = nullptr;  // [total_clusters, D] f32 or KV dtype
  const int32_t* sizes = nullptr;       // [total_clusters]
  const int32_t* entry_begin = nullptr;  // [E]
  const int32_t* entry_count = nullptr;  // [E] clusters scored (from the entry's start)
  // [E] the first entry_normed[e] of them enter the partial normaliser (two levels: the coarse
  // ones, when the fine level is scored too); null: all scored clusters.
  const int32_t* entry_normed = nullptr;
  int num_kv_heads = 0, group = 0, head_chunks = 0;
  float qscale = 0;
  const int32_t* item_seq = nullptr;    // [score_items] b
  const int32_t* item_chunk = nullptr;  // [score_items] centroid chunk (kScoreChunk each)
  float* scores = nullptr;              // [total_clusters, G]
  float* part = nullptr;                // [score_items, Hkv, G, 2] (max, sum n e^(x - max))
};

// The far field at real positions (mean_positions.cuh): its logits from each far cluster's key
// centroid rotated to its members' mean position, against the real (not the scoring) query.
struct FarLogitArgs {
  const float* q = nullptr;               // [E, G, D] f32 (= [B, Hq, D]), rotated to each query's position
  const void* key_centroids = nullptr;    // [total_clusters, D] f32 or KV dtype, position-0 space
  const int64_t* position_sums = nullptr;  // [total_clusters]
  const int32_t* far_size = nullptr;      // [total_clusters] size if in the far field, else 0
  const int32_t* entry_begin = nullptr;   // [E]
  const int32_t* entry_count = nullptr;   // [E]
  // Two levels: the far field is far_ids[e, 0 .. far_n[e]) (cluster ids local to the entry);
  // null: every slot of the entry, masked by far_size.
  const int32_t* far_ids = nullptr;       // [E, far_cap]
  const int32_t* far_n = nullptr;         // [E]
  int far_cap = 0;
  const double* inv_freq = nullptr;       // [half] RoPE angular frequencies
  int half = 0;                           // rotary_dim / 2
  int group = 0;                          // G
  float qscale = 0;                       // softmax scale * log2(e)
  float* scores = nullptr;                // [total_clusters, G] out (the far clusters' rows only)
  int pdl = 0;                            // after the selection kernel, by programmatic dependent launch
};

struct SelectArgs {
  const float* scores = nullptr;         // [total_clusters, G]
  const float* part = nullptr;           // [score_items, Hkv, G, 2]
  const int32_t* seq_score_base = nullptr;   // [B] first score item of b
  const int32_t* seq_score_chunks = nullptr; // [B] its items that hold normaliser partials (the first ones)
  const int32_t* sizes = nullptr;        // [total_clusters]
  const int32_t* member_begin = nullptr;  // [total_clusters]
  const int32_t* members = nullptr;      // token positions
  const int32_t* entry_begin = nullptr;  // [E]
  const int32_t* entry_count = nullptr;  // [E]
  const int32_t* entry_end = nullptr;    // [E] clustered_end
  const int32_t* seq_ids = nullptr;      // [B]
  const int32_t* tables = nullptr;
  const int64_t* table_offset = nullptr;
  const int32_t* lengths = nullptr;
  int page_size = 0, num_kv_heads = 0, group = 0;
  int sinks = 0, budget = 0, exact_cap = 0;
  int32_t* far_size = nullptr;           // [total_clusters] out
  int32_t* exact_rows = nullptr;         // [E, exact_cap] out
  int32_t* exact_n = nullptr;            // [E] out
  uint32_t* error_flags = nullptr;       // bit 0: exact set overflowed exact_cap
  int smem_clusters = 0;                 // capacity of the shared-memory key arrays
  // Two-level index (select_hier_kernel): coarse selection under coarse_budget, then the
  // children of the selected coarse clusters are scored in the same CTA and selected under
  // budget; the far field goes to the compact list far_ids / far_n.
  const int32_t* entry_coarse = nullptr;  // [E] coarse clusters at the start of each entry
  int coarse_budget = 0;
  const float* q_score = nullptr;        // [B, Hq, D] f32, rotated to the scoring position
  const void* key_centroids = nullptr;   // [total_clusters, D] f32, bf16 or f16 (key_kind 0, 1, 2)
  int key_kind = 0, head_dim = 0;
  float qscale = 0;
  float* scores_out = nullptr;           // == scores: the fine candidates' logits are written here
  // The scoring kernel already wrote every fine cluster's logits to `scores` (small batches,
  // where reading all fine centroids on every SM is cheaper than scoring the candidates on one).
  int prescored = 0;
  int32_t* far_ids = nullptr;            // [E, far_cap] out
  int32_t* far_n = nullptr;              // [E] out
  int far_cap = 0;
  // Re-ranking (AttentionConfig::rerank_tokens = rerank > 0): the finest selection runs under
  // `rerank` tokens and, instead of the exact rows, lists its picks and its per-head normaliser;
  // rerank_kernel (rerank.cuh) then scores the picks' members with q and selects under `budget`.
  int rerank = 0;
  int32_t* rerank_ids = nullptr;         // [E, rerank] global ids of the picks, ascending; out, then in
  int32_t* rerank_n = nullptr;           // [E] picks; out, then in
  float* rerank_norms = nullptr;         // [E, G, 2] the finest selection's (M, Z): max and sum of n 2^(x - M)
  const float* q = nullptr;              // [B, Hq, D] f32, rotated to each query's position (rerank_kernel)
  const std::byte* keys = nullptr;       // [num_pages, Hkv, P, D] the cache's 16-bit keys (rerank_kernel)
  // Diagnostics (null in normal runs): thread 0 of the CTA of entry e adds the clock64 cycles
  // of each phase to prof[e][phase] and counts to the slots named in select.cuh (kProf*).
  unsigned long long* prof = nullptr;  // [entries, kPhaseClockSlots] (phase_clock.hpp)
  // Greedy selections over at most this many clusters (and <= 256) are walked by one warp
  // without barriers; larger ones take the block-wide radix path.
  int warp_select_max = 256;
  // Picks of the warp walk before the radix path takes over: ~0.3 us per pick; synthetic
  // indexes need ~10-15, k-means coarse levels of random keys (many 1-child clusters of a
  // few tokens) 60+, where the radix path's ~7 us is cheaper.
  int warp_select_steps = 24;
  // Skip the warp walk when over warp_select_steps clusters are tiny (<= budget / (steps + 1)):
  // the radix path runs at once (same selection).
  int warp_select_precheck = 1;
  // 1: where the warp walk stops early, the clusters left are sorted (sorted_greedy)
  // instead of handed to the radix path; 2: sorted without a walk (same selection).
  int warp_select_sort = 1;
  // Candidates whose logits and sizes select_hier_kernel keeps in shared memory (the rest
  // are read back from global memory); planned from the shared memory left.
  int cand_cache = 0;
  // Launched with programmatic dependent launch after the scoring kernel: the prologue
  // (scoring queries, page-table prefetch, entry look-ups) runs before griddepcontrol.wait.
  int pdl = 0;
  // Behind a one-launch step with a fallback: only the entries it left (fallback[e] != 0) run;
  // the other CTAs return at once. Null: every entry.
  const int32_t* fallback = nullptr;    // [E]
};

// What the one-launch step holds (fused_step.cuh checks its constants against these).
struct FusedStepLimits {
  static constexpr int kHeadDim = 128, kGroup = 4, kMaxBudget = 128;
  static constexpr int kExactRows = 512;  // sinks + selected tokens + tokens past the clustered region
  static constexpr int kMaxCoarse = 2048, kMaxFine = 16384, kMaxCand = 512;  // per entry
  static constexpr int kMaxRerank = 512;  // rerank_tokens (the picks' rows, scored 32 a CTA)
  static constexpr int kCtasPerEntry = 16;  // one thread-block cluster an entry
};

// The one-launch step over an index of two levels or one (fused_step.cuh): one 16-CTA cluster
// per entry.
struct FusedStepArgs {
  bool hierarchical = true;              // two levels; false: one (entry_coarse all 0, <= 2048 clusters an entry)
  const float* q = nullptr;              // [B, Hq, D] f32, rotated to each query's position (exact rows)
  const float* q_score = nullptr;        // [B, Hq, D] f32, rotated to the scoring position
  float qscale = 0;                      // softmax scale * log2(e)
  int group = 0, num_kv_heads = 0;       // G <= 4, Hkv
  const int32_t* seq_ids = nullptr;      // [B]
  const int32_t* lengths = nullptr;      // [max_sequences]
  const int32_t* tables = nullptr;       // concatenated page tables
  const int64_t* table_offset = nullptr; // [max_sequences]
  int page_shift = 0;                    // log2 of the page size (the plan takes this step only for powers of two)
  const std::byte* keys = nullptr;       // [num_pages, Hkv, P, 128] of the cache's 16-bit type
  const std::byte* values = nullptr;     // [num_pages, Hkv, P, 128]
  const void* key_centroids = nullptr;   // [total_clusters, 128] of the cache's type
  const void* value_centroids = nullptr; // [total_clusters, 128]
  const int32_t* sizes = nullptr;        // [total_clusters]
  const int32_t* member_begin = nullptr; // [total_clusters]
  const int32_t* members = nullptr;      // token positions (fine), fine ids (coarse)
  const int32_t* entry_begin = nullptr;  // [E]
  const int32_t* entry_count = nullptr;  // [E]
  const int32_t* entry_coarse = nullptr; // [E]
  const int32_t* entry_end = nullptr;    // [E] clustered_end
  int max_coarse = 0;                    // most coarse clusters (one level: clusters) of an entry, <= 2048: the staging room
  // The first cluster and the count of the clusters scored first (coarse, or one level's) of
  // entries [0, planned_entries) as the plan saw them, so that each CTA's slice is copied at the
  // kernel's entry rather than a DRAM round trip later, when entry_begin and the count arrive
  // (an entry whose count changed since the plan is staged again then). 0 entries: off.
  static constexpr int kPlannedEntries = 16;
  int planned_entries = 0;
  int32_t planned_begin[kPlannedEntries] = {}, planned_count[kPlannedEntries] = {};
  int sinks = 0, budget = 0, coarse_budget = 0, far_field = 1;
  int rerank = 0;                        // rerank_tokens (<= kMaxRerank; cluster_rerank.cuh), 0: off
  // The far field at real positions (AttentionConfig::far_field_real_positions; RoPE over all 128
  // dims): its logits from q against each far cluster's key centroid rotated to its members' mean
  // position. Null position_sums: the far field at the scoring position. (Not profiled: prof unused.)
  const int64_t* position_sums = nullptr;  // [total_clusters]
  const double* inv_freq = nullptr;      // [64] RoPE angular frequencies
  float* out = nullptr;                  // [B, Hq, D] f32
  int32_t* far_size = nullptr;           // [total_clusters] out, or null
  int32_t* exact_n = nullptr;            // [E] out
  uint32_t* error_flags = nullptr;       // bit 0: over 512 exact rows, bit 2: over 512 candidates without a fallback
  // [E] out, or null: 1 where the entry listed over 512 candidates and stopped after its
  // coarse selection (the selection and attention kernels launched next finish it), else 0.
  int32_t* fallback = nullptr;
  // With a fallback, what the scoring kernel would have written for a left entry, so that the
  // selection kernel (not prescored) runs without it: the coarse logits and the normaliser,
  // the whole of it in the sequence's first score item, (-inf, 0) in its others.
  float* scores = nullptr;                    // [total_clusters, G]
  float* part = nullptr;                      // [score_items, Hkv, G, 2]
  const int32_t* seq_score_base = nullptr;    // [B]
  const int32_t* seq_score_chunks = nullptr;  // [B]
  // Diagnostics (null in normal runs): each CTA adds its phases' clock64 cycles to its own
  // kPhaseClockSlots slots (phase_clock.hpp; the profiled variant of the kernel).
  unsigned long long* prof = nullptr;    // [E * 16, kPhaseClockSlots]
  bool prof_return = false;              // (with prof) every CTA returns at entry: the launch's own cost
};
// Launches `entries` clusters of the one-launch step (dtype: bf16 or f16).
void launch_fused_step(const FusedStepArgs& a, DType dtype, int entries, Stream stream);
// How many of its 16-CTA clusters fit the current device at once (0: none, or no cluster launch).
int fused_step_clusters_at_once(DType dtype, int max_coarse, bool hierarchical, bool far_real, bool rerank);

// grid: (items, Hkv * head_chunks); rows: 8 (G <= 8) or 16 (G <= 16) tensor-core rows;
// mp selects the multipole variant.
void launch_attend_bf16(const AttendArgs& a, int head_dim, int rows, bool mp, int items, Stream stream);
void launch_attend_f16(const AttendArgs& a, int head_dim, int rows, bool mp, int items, Stream stream);
// Scoring of `items` score items x Hkv x head_chunks by `ctas` persistent CTAs (at most
// score_resident_ctas(); the plan picks it).
void launch_score(const ScoreArgs& a, int head_dim, int gc, DType key_dtype, int items, int ctas, Stream stream);
// CTAs of the scoring kernel that fit on the current device at once.
int score_resident_ctas(int head_dim, int gc, DType key_dtype);
// Position sums of the used slots of the index's E entries of at most max_slots slots each, from
// its member lists. sums: [total_clusters] out.
void launch_position_sums(const DeviceClusterView& index, int64_t* sums, int entries, int max_slots, Stream stream);
// The far field's logits of E entries of about max_far far clusters each (sizes the grid; the
// kernel reads the counts and strides past it).
void launch_far_logits_at_mean_positions(const FarLogitArgs& a, int head_dim, DType key_dtype, int entries,
                                         int max_far, Stream stream);
void launch_select(const SelectArgs& a, int entries, Stream stream);
void launch_select_hier(const SelectArgs& a, int entries, Stream stream);
// Re-ranks the finest selection's picks (SelectArgs::rerank): after launch_select or
// launch_select_hier with the same arguments; kv_dtype: the cache's 16-bit type.
void launch_rerank(const SelectArgs& a, DType kv_dtype, int entries, Stream stream);
// Key rows the re-ranking stages at a time (two buffers).
constexpr int kRerankChunk = 128;
// Its dynamic shared memory for picks worth up to `tokens` tokens: the staged rows, q, logits and
// masses, then the picks' lists.
constexpr size_t rerank_smem_bytes(int tokens, int group, int head_dim) {
  const size_t r = size_t(tokens);
  return 2 * size_t(kRerankChunk) * (2 * size_t(head_dim) + 16) + size_t(group) * (size_t(head_dim) + 2 * r) * 4 +
         (2 * (r + r / 32 + 1) + 5 * r + 1) * 4;
}
// Dynamic shared memory of the selection kernel for entries of up to `clusters` clusters
// (key and size padded by one word per 32, list offset); it also holds 16 KB of static
// histogram.
constexpr size_t select_smem_bytes(int clusters) {
  return (2 * (size_t(clusters) + size_t(clusters) / 32 + 1) + size_t(clusters)) * 4;
}
constexpr size_t kSelectStaticSmem = 17 * 1024;
// Most candidates of the two-level selection whose logits and sizes stay in shared memory.
constexpr int kSelectCandCache = 512;
// The two-level selection also keeps the candidate ids, the group's scoring queries and the
// logits + sizes of the first cand_cache candidates.
constexpr size_t select_hier_smem_bytes(int clusters, int group, int head_dim, int cand_cache) {
  return select_smem_bytes(clusters) + size_t(clusters) * 4 + size_t(group) * size_t(head_dim) * 4 +
         size_t(cand_cache) * (size_t(group) + 1) * 4;
}
// Query heads per CTA of the scoring kernel for a group of G: 1, 2, 4 or 8 (the rest of
// the chunk is masked).
int heads_per_cta(int group);
// Tensor-core rows of the attention kernel for a group of G: 8 or 16.
inline int attend_rows(int group) { return group <= 8 ? 8 : 16; }
// Resident CTAs per SM of the attention kernel (occupancy API), for split planning.
int attend_ctas_per_sm(DType dtype, int head_dim, int rows, bool mp);

}  // namespace multipole::cuda::detail

namespace multipole::cuda {
struct DeviceKVLayer;
}
namespace multipole::cuda::detail {
// Writes keys/values [batch, Hkv, D] f32 at position lengths[seqs[b]] - 1 of each sequence.
void launch_append(const DeviceKVLayer& layer, std::byte* key_pool, std::byte* value_pool, const int32_t* seqs,
                   int batch, const float* keys, const float* values, Stream stream);
// Fills n elements of `dtype` with a hash of (seed, index) mapped to [-1, 1) (benchmarks).
void launch_fill_random(void* data, int64_t n, DType dtype, uint64_t seed, Stream stream);
// Reads `bytes` (a multiple of 16) of `data` and writes one word per CTA to `sink`: leaves
// the L2 full of clean lines (benchmarks).
void launch_read_flush(const void* data, size_t bytes, uint32_t* sink, Stream stream);
int attend_occupancy_bf16(int head_dim, int rows, bool mp);
int attend_occupancy_f16(int head_dim, int rows, bool mp);
}  // namespace multipole::cuda::detail
