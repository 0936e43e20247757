#pragma once
// Quest and oracle-topk decode on the GPU, for comparisons with multipole on equal terms:
// each baseline only fills per-(sequence, KV head) lists of exact positions (sinks, its
// selection of the middle region, local window) and then runs the same split-KV attention
// kernel as multipole (attend.cuh, multipole variant with the far field off). Selection
// rules are those of the CPU policies (src/attention/quest_policy.cpp,
// oracle_topk_policy.cpp), ties to the lower index.
//   quest:       page scoring (grid over pages) -> top pages -> attention: 3 launches;
//                plus one metadata launch per layer after tokens were appended.
//   oracle-topk: true logits of the middle region (grid over keys, per-chunk softmax
//                partials) -> importance + top budget -> attention: 3 launches.
// No host synchronisation inside a step; capturable in a CUDA graph once planned.
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/cuda/kv_cache.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda {

enum class SparseBaseline { Quest, OracleTopk };

class CudaSparseDecoder {
 public:
  // Uses num_q_heads, num_kv_heads, head_dim (64 or 128), softmax_scale(), budget
  // (<= kMaxPicks), cluster.sinks, cluster.window and quest_page_size.
  CudaSparseDecoder(const AttentionConfig& config, SparseBaseline kind);

  // Plans steps for `seqs` (batch order) on `cache`: split plan, workspaces, and (quest)
  // page metadata for every layer, sized for sequences of up to `max_length` tokens (0: the
  // longest current length). Sequences may grow up to max_length without a new plan.
  // Quest metadata is lost (build_metadata again) when the batch or the capacity changes.
  // Host work plus small synchronous copies: call outside a captured region.
  void plan(const DeviceKVCache& cache, std::span<const SeqId> seqs, int64_t max_length = 0);

  // Quest: per-page, per-channel min and max of the post-RoPE keys of `layer` over the whole
  // middle region of every planned sequence, from the device cache. One launch.
  void build_metadata(const DeviceKVCache& cache, int layer, Stream stream);
  // Quest: after appends, rebuilds the pages the last `window` tokens of each middle region
  // fall in (the region grows by `window` tokens at a time). Valid when called at least
  // once per `window` appended tokens. One launch.
  void update_metadata(const DeviceKVCache& cache, int layer, Stream stream);

  // q:   [B, Hq, D] f32 device, rotated to each query's position
  // out: [B, Hq, D] f32 device (16-byte aligned)
  // Steps share the decoder's workspaces: steps on different streams must not overlap.
  // Timing diagnostics only: stages 1 stops after the first kernel (scoring / logits), 2
  // after the selection.
  void decode(const DeviceKVCache& cache, int layer, const float* q, float* out, Stream stream, int stages = 3) const;

  static constexpr int kDecodeLaunches = 3;
  static constexpr int kUpdateLaunches = 1;
  static constexpr int kMaxPicks = 4096;  // budget (oracle) / pages (quest) per entry

  // Inspection (synchronous; tests and diagnostics).
  // Exact positions of the last step per entry [B * Hkv], ascending: sinks, selection, window.
  std::vector<std::vector<int32_t>> exact_positions() const;
  // Quest metadata of one entry (b * Hkv + h) of `layer`: [pages, 2 (min, max), D] as f32
  // for the first `pages` pages.
  std::vector<float> page_bounds(int layer, int entry, int pages) const;
  uint32_t error_flags() const;  // bit 0: an exact list overflowed its capacity
  int exact_cap() const { return exact_cap_; }
  int attend_ctas() const { return attend_items_ * config_.num_kv_heads; }
  int select_ctas() const;  // CTAs of the step's first kernel

 private:
  void launch_metadata(const DeviceKVCache& cache, int layer, bool update, Stream stream);

  AttentionConfig config_;
  SparseBaseline kind_;
  DType dtype_ = DType::BF16;
  int batch_ = 0, exact_cap_ = 0, chunk_ = 0, attend_items_ = 0;
  int64_t page_cap_ = 0;   // quest pages per entry
  int64_t middle_cap_ = 0; // oracle: middle tokens per entry
  int layers_ = 0;
  DeviceBuffer seq_ids_, item_seq_, item_split_, seq_base_, seq_splits_;
  DeviceBuffer part_o_, part_ml_, counters_, entry_zero_;
  DeviceBuffer exact_rows_, exact_pos_, exact_n_, errors_;
  DeviceBuffer meta_;      // quest: [layers, E, page_cap, 2, D] KV dtype
  DeviceBuffer values_;    // quest: page scores [E, page_cap]; oracle: logits [E, G, middle_cap]
  DeviceBuffer stats_;     // oracle: [E, chunks, G, 2] (max, sum 2^(x - max)) per chunk
  DeviceBuffer importance_;  // oracle: [E, middle_cap]
};

}  // namespace multipole::cuda
