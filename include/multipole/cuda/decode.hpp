#pragma once
// Decode attention on the GPU for a batch of sequences of different lengths over the device
// paged KV cache: dense (split-KV + merge, one launch per layer-step) and Multipole
// (score -> select -> exact + far field, three launches per layer-step, no host sync;
// squeezed when config.multipole_far_field is false). With a two-level index the scoring
// launch scores the coarse level only (at small batch the fine level too: set_prescore);
// the selection launch selects coarse clusters under the coarse budget, scores their
// children (or gathers their logits) and selects among them (still three launches). Where the
// plan finds that it holds (DecodePlanInfo::fused; small batches, G <= 4, d 128), a two-level
// step runs in one launch instead: one 16-CTA thread-block cluster per (sequence, KV head)
// (cuda/fused_step.cuh), the same rule and outputs; where the index allows more candidates
// than that kernel holds, the selection and attention kernels follow it and finish only the
// entries that listed too many (DecodePlanInfo::fused_fallback). With
// config.far_field_real_positions (and the far field on) the far field's logits come from the
// real query against each far cluster's key centroid rotated to its members' mean position (the
// index's position sums), the selection's from q_score as always: in the three-kernel step one
// launch more, between the selection and the attention, over the far clusters only; in the
// one-launch step, in that kernel (RoPE over all dims, no fallback). With config.rerank_tokens
// (the CPU policy's re-ranking) the finest selection runs under rerank_tokens and its picks'
// members are scored exactly to choose under the budget: in the three-kernel step one launch more
// (rerank.cuh); in the one-launch step (rerank_tokens <= 512) in that kernel (cluster_rerank.cuh).
// All launches of a step are asynchronous on the given stream and capturable in a CUDA graph once
// planned.
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/cuda/cluster_index.hpp"
#include "multipole/cuda/kv_cache.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda {

struct DecodePlanInfo {
  int batch = 0;
  int dense_chunk = 0, dense_ctas = 0, dense_max_splits = 0;  // virtual positions per split, CTAs
  int mp_chunk = 0, mp_ctas = 0, exact_cap = 0;
  int score_work = 0, score_ctas = 0;  // scoring items (centroid chunk x head chunk), persistent CTAs
  int heads_per_cta = 0;
  bool hierarchical = false;  // two-level index: coarse scoring, fine scoring in the selection
  bool prescored = false;     // two-level index, small batch: the scoring launch scores the fine level too
  int far_cap = 0;            // far-list capacity per entry (two-level)
  bool far_real = false;      // the far field at real positions (three kernels: one launch more)
  int far_items = 0;          // its estimate of the far clusters of an entry (sizes its grid)
  bool rerank = false;        // config.rerank_tokens (three kernels: one launch more between selection and attention)
  // The step runs in one launch (fused_step.cuh: one 16-CTA cluster per entry) where it holds:
  // head dim 128, G <= 4, keys in the cache's type, budget <= 128, pages of a power-of-two
  // size, <= 512 exact rows per entry, two levels of <= 2048 coarse and <= 16384 fine clusters
  // per entry or one level of <= 2048, and the entries' clusters in at most set_fused_waves()
  // waves of the clusters the GPU holds at once. fused_why: why not, if not. Candidates: where
  // the index's bound allows over 512, fused_fallback: the selection and attention kernels are
  // launched behind the one-launch step and run only the entries that listed over 512 (the
  // others' CTAs return at once), so a step is 3 launches and exact whatever the index. With
  // the far field at real positions: RoPE over all 128 dims, and no fallback.
  bool fused = false;
  bool fused_fallback = false;
  const char* fused_why = "";
  int fused_candidate_bound = 0;  // most candidates any entry can list (two levels; one level: 0)
  int fused_clusters_at_once = 0;  // the one-launch step's clusters the GPU holds at once (0: not asked)
};

class CudaDecoder {
 public:
  // Uses num_q_heads, num_kv_heads, head_dim (64 or 128), softmax_scale(), budget,
  // cluster.sinks, multipole_far_field, far_field_real_positions and rope (for the latter),
  // rerank_tokens. Throws on unsupported shapes and options.
  explicit CudaDecoder(const AttentionConfig& config);

  // Plans the next step(s) for `seqs` from the lengths the cache mirror holds on the host:
  // splits per sequence to fill the GPU, sequence ids and split tables uploaded. With an
  // index, also the multipole plan (the index must describe exactly these sequences, in
  // order). Host work plus small synchronous copies: call outside a captured region, again
  // when the batch or its lengths change (a sequence that grew since is still covered).
  void plan(const DeviceKVCache& cache, std::span<const SeqId> seqs, const DeviceClusterIndex* index = nullptr);
  const DecodePlanInfo& plan_info() const { return info_; }
  // Steps share the decoder's workspaces: steps on different streams must not overlap.

  // q:   [B, Hq, D] f32 device, rotated to each query's position
  // out: [B, Hq, D] f32 device (16-byte aligned)
  void dense(const DeviceKVCache& cache, int layer, const float* q, float* out, Stream stream) const;

  // q:       [B, Hq, D] f32 device, rotated to each query's position (exact part)
  // q_score: [B, Hq, D] f32 device (16-byte aligned), rotated to config.score_position
  //          (cluster scoring and far field, against the pre-RoPE centroids)
  // out:     [B, Hq, D] f32 device (16-byte aligned)
  // Timing diagnostics only: stages 1 stops after scoring, 2 after selection, 4 runs the
  // attention kernel alone (on the previous step's selection); these are the three-kernel
  // step's kernels, also where the plan chose one launch. 5: the one-launch kernel alone, without
  // the two kernels behind it in a fused_fallback plan (the entries it leaves stay unfinished); as 3
  // where the plan is not fused.
  void multipole(const DeviceKVCache& cache, int layer, const DeviceClusterIndex& index, const float* q,
                 const float* q_score, float* out, Stream stream, int stages = 3) const;

  static constexpr int kDenseLaunches = 1;
  static constexpr int kMultipoleLaunches = 3;
  int multipole_launches() const {
    // A fused_fallback step: the one-launch kernel, then selection and attention for what it left.
    return info_.fused ? (info_.fused_fallback ? 3 + (info_.rerank ? 1 : 0) : 1)
                       : kMultipoleLaunches + (info_.far_real ? 1 : 0) + (info_.rerank ? 1 : 0);
  }
  // Tests and A/B: whether plan() may choose the one-launch step (default: yes, unless the
  // environment sets MULTIPOLE_FUSED=0). Takes effect at the next plan().
  void set_fused(bool allow) { fused_allowed_ = allow; }
  // Tests and A/B: whether plan() may take re-ranking (config.rerank_tokens <= 512) into the
  // one-launch step (cluster_rerank.cuh) rather than the three-kernel step and its re-ranking
  // launch (default: yes, unless the environment sets MULTIPOLE_FUSED_RERANK=0). Next plan().
  void set_fused_rerank(bool allow) { fused_rerank_allowed_ = allow; }
  // Waves of clusters the one-launch step may take: entries <= waves x the clusters the GPU
  // holds at once (0: any number). Default kFusedWaves, or MULTIPOLE_FUSED_WAVES. Next plan().
  static constexpr int kFusedWaves = 1;
  void set_fused_waves(int waves) { fused_waves_ = waves; }
  // The one-launch step copies each CTA's slice of the clusters it scores first at the kernel's
  // entry, from the entry's first cluster and count as plan() saw them (up to 16 entries),
  // instead of a DRAM round trip later; an entry whose count changed since is staged again when
  // its count arrives. 1 (default, or MULTIPOLE_FUSED_STAGE_AHEAD): on; 0: off; 2 (tests): the
  // plan's counts one cluster short, so that every entry with clusters is staged again. Next plan().
  void set_fused_stage_ahead(int mode) { fused_stage_ahead_ = mode; }

  // Inspection of the last multipole step (synchronous; tests and diagnostics). A step in one
  // launch records the far sizes only after set_record_far_sizes(true) (default off: their
  // writes cost the 128K batch-1 step ~0.2-0.4 us, gpu-notes item 59); far_sizes() after one that
  // did not throws. The three-kernel step always records them (its attention reads them).
  void set_record_far_sizes(bool on) { record_far_sizes_ = on; }
  std::vector<int32_t> far_sizes() const;       // [total_clusters]: n if far field, 0 if selected/empty
  std::vector<int32_t> exact_counts() const;    // [B * Hkv]
  // [B * Hkv]: 1 where the last one-launch step left the entry to the kernels behind it (over
  // 512 candidates), else 0; all 0 without fused_fallback.
  std::vector<int32_t> fused_fallbacks() const;
  // bit 0: an exact set overflowed its capacity; bit 2: the one-launch step found more
  // candidates than it holds without a fallback planned (the index grew past the plan's
  // bound: plan again)
  uint32_t error_flags() const;
  void clear_error_flags();
  // Diagnostics: a device buffer of 32 u64 per entry (B x Hkv, zeroed by the caller) that
  // the two-level selection kernel adds each entry's per-phase clock64 cycles and counts to;
  // null turns it off.
  void set_select_profile(unsigned long long* device_slots) { select_prof_ = device_slots; }
  // Diagnostics: the one-launch step's phase cycles, kPhaseClockSlots u64 per CTA (16 per
  // entry, zeroed by the caller; the profiled variant of the kernel runs); null turns it off.
  // return_at_entry: every CTA returns at once (the launch's own cost). The first CTA's slots
  // also get the launch's span (phase_clock.hpp).
  void set_step_profile(unsigned long long* device_slots, bool return_at_entry = false) {
    step_prof_ = device_slots, step_prof_return_ = return_at_entry;
  }
  // Diagnostics and tests: greedy selections over at most min(warp_max, 256) clusters are
  // walked by one warp, handing over to the block-wide radix path after `warp_steps` picks;
  // warp_max 0: always the radix path. Both give the same selection. Defaults: 256 and 24,
  // or the environment's MULTIPOLE_SELECT_WARP_MAX / MULTIPOLE_SELECT_WARP_STEPS. At most
  // `cand_cache` candidates keep their logits in shared memory (the rest are read back
  // from global memory; same values). precheck: skip the walk when over `warp_steps`
  // clusters are tiny (<= budget / (warp_steps + 1): a long greedy tail is likely); default
  // on, or MULTIPOLE_SELECT_PRECHECK; off exercises the hand-over. sort: 1 (default, or
  // MULTIPOLE_SELECT_SORT), where the walk stops early the clusters left are sorted
  // (block-wide) instead of handed to the radix path; 2, sorted without a walk; 0, never.
  void set_select_options(int warp_max, int warp_steps, int cand_cache = 1 << 30, bool precheck = true,
                          int sort = 1) {
    select_warp_max_ = warp_max;
    select_warp_steps_ = warp_steps;
    select_cand_max_ = cand_cache;
    select_precheck_ = precheck;
    select_sort_ = sort;
  }
  // The selection and attention kernels of a multipole step are launched with programmatic
  // dependent launch (each starts its input-only prologue while the previous kernel of the
  // step runs; same results). Default on, or the environment's MULTIPOLE_PDL (0: off). The
  // step's first kernel is launched plainly, so q and q_score must be complete before
  // multipole() is called on the stream (as for any launch).
  void set_pdl(bool on) { pdl_ = on; }
  // Two-level index: who scores the fine candidates. 0: the selection kernel, one CTA per
  // entry, reading only the candidates' centroids; 1: the scoring kernel, which then reads
  // every fine centroid with all SMs (cheaper at small batch, where the selection's CTAs
  // are few); -1 (default, or the environment's MULTIPOLE_PRESCORE): 1 while the batch's
  // fine key centroids come to at most kPrescoreMaxBytes (H200, Qwen3-8B shapes: -8 us at
  // 32K batch 1 with 4 MB of them, +3 us at 128K batch 1 with 17 MB). Decided by plan(); the
  // selection can differ only where two importances tie to the last bit (the logits are
  // summed in another order).
  void set_prescore(int mode) { prescore_mode_ = mode; }
  static constexpr int64_t kPrescoreMaxBytes = int64_t(8) << 20;

 private:
  AttentionConfig config_;
  int gc_ = 0, head_chunks_ = 0;
  DecodePlanInfo info_;
  // Dense plan.
  DeviceBuffer seq_ids_, d_item_seq_, d_item_split_, d_seq_base_, d_seq_splits_;
  // Multipole plan.
  DeviceBuffer m_item_seq_, m_item_split_, m_seq_base_, m_seq_splits_;
  DeviceBuffer s_item_seq_, s_item_chunk_, s_seq_base_, s_seq_chunks_;
  // Workspaces.
  DeviceBuffer part_o_, part_ml_, counters_, scores_, score_part_, far_size_, exact_rows_, exact_n_, errors_;
  DeviceBuffer far_ids_, far_n_;
  DeviceBuffer fallback_;  // [B * Hkv] the one-launch step's leftovers (fused_fallback)
  bool record_far_sizes_ = false;
  mutable bool far_sizes_recorded_ = false;  // by the last multipole step
  // The far field at real positions: RoPE frequencies [half] (f64) and the far clusters' logits
  // against the real q [total_clusters, G].
  DeviceBuffer inv_freq_, far_scores_;
  // Re-ranking (config.rerank_tokens = R): the finest selection's picks [E, R], their count [E]
  // and its normalisers [E, G, 2].
  DeviceBuffer rerank_ids_, rerank_n_, rerank_norms_;
  int rope_half_ = 0;
  int64_t index_clusters_ = 0;
  int smem_clusters_ = 0;
  int cand_cache_ = 0;  // candidates of the two-level selection cached in shared memory
  int coarse_budget_ = 0;
  unsigned long long* select_prof_ = nullptr;
  int select_warp_max_ = 256, select_warp_steps_ = 24, select_cand_max_ = 1 << 30;
  bool select_precheck_ = true;
  int select_sort_ = 1;
  bool pdl_ = true;
  bool fused_allowed_ = true, fused_rerank_allowed_ = true;
  int fused_waves_ = kFusedWaves;
  int fused_stage_ahead_ = 1;
  std::vector<int32_t> stage_begin_, stage_count_;  // [entries] as plan() saw them (fused_stage_ahead_)
  unsigned long long* step_prof_ = nullptr;
  bool step_prof_return_ = false;
  void plan_fused(const DeviceClusterIndex& index, int64_t exact_rows, int page_size);
  int prescore_mode_ = -1;
};

}  // namespace multipole::cuda
