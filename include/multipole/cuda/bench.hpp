#pragma once
// Decode-attention timing on the GPU: dense, multipole and squeezed side by side per
// (batch, context), one layer-step each, timed with CUDA events after warm-up (median),
// optionally replayed from a CUDA graph. The L2 is flushed before every timed step in two
// ways: by writing 256 MB (as triton's do_bench, which times the PyTorch baseline, does;
// the step then also pays for writing back the dirty lines it evicts) and by reading
// 256 MB (clean L2, closer to a decode step that follows the previous layer's GEMMs). Synthetic data: random K/V on scattered pages,
// a synthetic cluster index (sizes 8..24, random centroids) with a coarse level grouping
// consecutive fine clusters into ~coarse_tokens_per_centroid tokens ("multipole",
// "squeezed" and the stages); "mp-1level" times the same fine level without it.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/core/dtype.hpp"

namespace multipole::cuda {

struct CudaBenchOptions {
  std::vector<int> batches = {1, 4, 16};
  std::vector<int64_t> contexts = {32768, 131072};
  int q_heads = 32, kv_heads = 8, head_dim = 128;
  int page_size = 16;
  bool scattered_pages = true;  // pages in random order (a cache that served many requests); false: in order
  int budget = 128;
  // The engine's default levels (ClusterConfig: fine, coarse).
  int tokens_per_centroid = ClusterConfig{}.tokens_per_centroid.at(0);
  int coarse_tokens_per_centroid = ClusterConfig{}.tokens_per_centroid.at(1);  // 0: one level only
  int coarse_budget = 0;                 // tokens under the coarse clusters expanded; 0: 16 x budget
  int rerank_tokens = 0;                 // mp-rerank's and mp-1level-rerank's candidates; 0: 4 x budget
  DType dtype = DType::BF16;      // K/V and value centroids
  DType key_dtype = DType::BF16;  // key centroids: f32 or the KV dtype
  int warmup = 10, iterations = 50;
  bool graph = true;
  bool stages = true;  // also time multipole's first stages (score; score + select)
  // Prefill clustering on the GPU (DeviceKMeans) of the batch's [sinks, middle_end) x KV
  // heads, timed ("kmeans-prefill", ms in `us` / 1000), then multipole decode on that index
  // ("mp-kmeans-index"). Random keys: the work per Lloyd iteration does not depend on them.
  bool kmeans = true;
  int block_size = 8192;
  int prefill_iterations = 10;
  int kmeans_runs = 3;  // timed builds (median)
  uint64_t seed = 1;

  // The attention shape the bench decodes with (validate() checks it).
  AttentionConfig attention_config() const;
  // Throws on options no run can take (no device needed: the CLI checks before it looks for one).
  void validate() const;
};

struct CudaBenchRow {
  int batch = 0;
  int64_t context = 0;
  std::string variant;       // dense, multipole, mp-3launch (the three-kernel step where multipole takes one
                             // launch), squeezed, mp-far-real (the far field at real positions: one launch,
                             // or three kernels and one more), mp-far-real-3launch (beside a one-launch
                             // mp-far-real), mp-rerank (re-ranking picks worth rerank_tokens: in the one-launch
                             // step where it holds, else three kernels and one more), mp-1level, mp-1level-rerank (one
                             // level re-ranking rerank_tokens), mp-score, mp-score+select, mp-attend,
                             // kmeans-prefill (one build for the whole batch), mp-kmeans-index, mp-km-3launch,
                             // mp-km-1launch (its one-launch kernel alone, where two kernels follow it),
                             // kmeans-update, kmeans-upd/token (DeviceKMeans::append of W tokens into a nearly
                             // full block, wall time), kmeans-update-sums-gpu (the same update, device time,
                             // keeping the position sums mp-far-real reads), kmeans-update-life,
                             // kmeans-upd/tok-life (the mean over the block_size / W updates of a block's life)
  double us = 0;             // median time per layer-step, L2 flushed by writes (do_bench-like)
  double us_clean = 0;       // same, L2 flushed by reads
  double ratio_to_dense = 0; // dense time / this time
  double gbps = 0;           // bytes below / time
  int64_t bytes = 0;         // bytes the step must read (K/V rows, centroids, lists)
  int launches = 0;
  int ctas = 0;
};

// Calls on_row as each row is measured; returns all rows. Throws without a CUDA device.
std::vector<CudaBenchRow> run_cuda_attention_bench(const CudaBenchOptions& options,
                                                   const std::function<void(const CudaBenchRow&)>& on_row = {});

}  // namespace multipole::cuda
