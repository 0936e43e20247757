// Host side of CUDA decode: split planning (fill the SMs from batch x heads x length) and
// the launch sequence of a step. No synchronisation inside dense() / multipole().
#include "multipole/cuda/decode.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "cuda/check.hpp"
#include "cuda/host_setup.hpp"
#include "cuda/launch.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

using namespace detail;

namespace {

int env_int(const char* name, int fallback) {
  const char* e = std::getenv(name);
  return e ? std::atoi(e) : fallback;
}

constexpr int kTile = 32;        // virtual positions per attention tile
constexpr int kMinChunkTiles = 2;

struct SplitPlan {
  int chunk = 0;
  std::vector<int32_t> item_seq, item_split, seq_base, seq_splits;
};

// Smallest chunk (whole tiles) whose CTAs fit in one wave of `slots`, given `columns` CTAs
// per (sequence, split) along grid.y; at most kMaxSplits splits per sequence.
SplitPlan plan_splits(std::span<const int64_t> vlen, int columns, int64_t slots, int64_t min_chunk_tiles = kMinChunkTiles) {
  int64_t max_tiles = 1, total_tiles = 0;
  for (int64_t n : vlen) {
    const int64_t t = (n + kTile - 1) / kTile;
    max_tiles = std::max(max_tiles, t);
    total_tiles += t;
  }
  int64_t chunk_tiles = std::max<int64_t>(min_chunk_tiles, (total_tiles * columns + slots - 1) / std::max<int64_t>(slots, 1));
  chunk_tiles = std::max(chunk_tiles, (max_tiles + kMaxSplits - 1) / kMaxSplits);
  auto ctas = [&](int64_t ct) {
    int64_t n = 0;
    for (int64_t v : vlen) n += std::max<int64_t>(1, ((v + kTile - 1) / kTile + ct - 1) / ct);
    return n * columns;
  };
  while (ctas(chunk_tiles) > slots && chunk_tiles < max_tiles) chunk_tiles += std::max<int64_t>(1, chunk_tiles / 16);
  SplitPlan p;
  p.chunk = int(chunk_tiles * kTile);
  for (size_t b = 0; b < vlen.size(); ++b) {
    const int splits = int(std::max<int64_t>(1, ((vlen[b] + kTile - 1) / kTile + chunk_tiles - 1) / chunk_tiles));
    p.seq_base.push_back(int32_t(p.item_seq.size()));
    p.seq_splits.push_back(splits);
    for (int s = 0; s < splits; ++s) {
      p.item_seq.push_back(int32_t(b));
      p.item_split.push_back(s);
    }
  }
  return p;
}

}  // namespace

namespace detail {
int attend_ctas_per_sm(DType dtype, int head_dim, int rows, bool mp) {
  return dtype == DType::BF16 ? attend_occupancy_bf16(head_dim, rows, mp) : attend_occupancy_f16(head_dim, rows, mp);
}
int heads_per_cta(int group) {
  // The largest chunk of at most 8 heads, rounded up to an instantiated size.
  const int chunks = (group + 7) / 8;
  const int per = (group + chunks - 1) / chunks;
  return per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 8;
}
}  // namespace detail

CudaDecoder::CudaDecoder(const AttentionConfig& config) : config_(config) {
  config_.validate();
  MP_CHECK(is_kernel_head_dim(config_.head_dim), "cuda decode: head_dim {} must be 64 or 128",
           config_.head_dim);
  MP_CHECK(config_.coarse_radius_weight == 0, "cuda decode: coarse_radius_weight {} is a cpu-only experiment",
           config_.coarse_radius_weight);
  MP_CHECK(!config_.select_by_exact_mass, "cuda decode: selection by exact mass is a cpu-only experiment");
  MP_CHECK(!config_.score_with_spread, "cuda decode: scoring with the clusters' spread is a cpu-only experiment");
  MP_CHECK(config_.rerank_tokens == 0 || !config_.far_field_at_real_positions(),
           "cuda decode: rerank_tokens {} with the far field at real positions is cpu-only", config_.rerank_tokens);
  MP_CHECK(!config_.score_real_positions,
           "cuda decode: scoring at real positions is not implemented on the GPU (it scores at score_position)");
  gc_ = heads_per_cta(config_.group_size());
  head_chunks_ = (config_.group_size() + gc_ - 1) / gc_;
  errors_.reserve(sizeof(uint32_t));
  errors_.memset(0);
  select_warp_max_ = env_int("MULTIPOLE_SELECT_WARP_MAX", select_warp_max_);
  select_warp_steps_ = env_int("MULTIPOLE_SELECT_WARP_STEPS", select_warp_steps_);
  select_precheck_ = env_int("MULTIPOLE_SELECT_PRECHECK", 1) != 0;
  select_sort_ = env_int("MULTIPOLE_SELECT_SORT", select_sort_);
  pdl_ = env_int("MULTIPOLE_PDL", 1) != 0;
  fused_allowed_ = env_int("MULTIPOLE_FUSED", 1) != 0;
  fused_rerank_allowed_ = env_int("MULTIPOLE_FUSED_RERANK", 1) != 0;
  fused_waves_ = env_int("MULTIPOLE_FUSED_WAVES", fused_waves_);
  fused_stage_ahead_ = env_int("MULTIPOLE_FUSED_STAGE_AHEAD", fused_stage_ahead_);
  prescore_mode_ = env_int("MULTIPOLE_PRESCORE", -1);
  if (config_.far_field_at_real_positions()) {
    const Rope rope(config_.rope);
    const std::vector<double>& f = rope.inv_freq();
    MP_CHECK(2 * int64_t(f.size()) <= config_.head_dim, "cuda decode: rotary dim {} exceeds head_dim {}",
             2 * f.size(), config_.head_dim);
    rope_half_ = int(f.size());
    upload_vector(inv_freq_, f);
  }
}

void CudaDecoder::plan(const DeviceKVCache& cache, std::span<const SeqId> seqs, const DeviceClusterIndex* index) {
  const auto& kc = cache.config();
  const int Hkv = config_.num_kv_heads, G = config_.group_size(), D = config_.head_dim;
  MP_CHECK(kc.num_kv_heads == Hkv && kc.head_dim == D,
           "cuda decode: cache has {} KV heads of dim {}, the attention config {} of dim {}", kc.num_kv_heads,
           kc.head_dim, Hkv, D);
  MP_CHECK(!seqs.empty(), "cuda decode: empty batch");
  const int B = int(seqs.size());
  std::vector<int32_t> ids(seqs.begin(), seqs.end());
  std::vector<int64_t> lens(B);
  for (int b = 0; b < B; ++b) lens[b] = cache.host_length(seqs[b]);
  const int64_t sms = current_sm_count();

  info_ = DecodePlanInfo{};
  info_.batch = B;
  info_.heads_per_cta = attend_rows(G);
  upload_vector(seq_ids_, ids);

  const int rows = attend_rows(G);
  // Planned for at most 2 resident CTAs per SM although the stacked dense kernel (G <= 8) fits
  // 3: measured, its extra splits cost more at batch 1 (+5 us, 49 splits per head instead of
  // 32) than they gain at batch 16 (-1%; gpu-notes item 14; again in item 16: +6% at 32K b1,
  // -0.5% at 128K b16). MULTIPOLE_DENSE_CTAS_PER_SM: the cap (0: none).
  int dense_per_sm = attend_ctas_per_sm(kc.dtype, D, rows, false);
  if (const int cap = env_int("MULTIPOLE_DENSE_CTAS_PER_SM", 2); cap > 0) dense_per_sm = std::min(dense_per_sm, cap);
  const SplitPlan dp = plan_splits(lens, Hkv, sms * dense_per_sm);
  upload_vector(d_item_seq_, dp.item_seq);
  upload_vector(d_item_split_, dp.item_split);
  upload_vector(d_seq_base_, dp.seq_base);
  upload_vector(d_seq_splits_, dp.seq_splits);
  info_.dense_chunk = dp.chunk;
  info_.dense_ctas = int(dp.item_seq.size()) * Hkv;
  info_.dense_max_splits = *std::max_element(dp.seq_splits.begin(), dp.seq_splits.end());
  int64_t items = int64_t(dp.item_seq.size());

  if (index) {
    MP_CHECK(index->entries() == B * Hkv && index->head_dim() == D && index->num_kv_heads() == Hkv,
             "cuda decode: cluster index has {} entries of {} heads, dim {}; the batch needs {} x {} of dim {}",
             index->entries(), index->num_kv_heads(), index->head_dim(), B, Hkv, D);
    MP_CHECK(index->value_dtype() == kc.dtype, "cuda decode: value centroids are {}, the cache is {}",
             dtype_name(index->value_dtype()), dtype_name(kc.dtype));
    int64_t cap = 1;
    const bool hier = index->hierarchical();
    const int64_t coarse_budget = std::max<int64_t>(
        config_.budget, config_.coarse_budget > 0 ? config_.coarse_budget : int64_t(16) * config_.budget);
    // Fine scoring in the scoring launch (set_prescore): from the fine slots' key bytes.
    int64_t fine_key_bytes = 0;
    for (int e = 0; e < B * Hkv; ++e)
      fine_key_bytes += int64_t(index->entry_capacity(e) - index->entry_coarse(e)) * D * dtype_size(index->key_dtype());
    const bool prescore = hier && (prescore_mode_ < 0 ? fine_key_bytes <= kPrescoreMaxBytes : prescore_mode_ > 0);
    std::vector<int64_t> vlen(B), score_chunks(B), norm_chunks(B);
    int64_t far_most = 0;
    for (int b = 0; b < B; ++b) {
      int64_t cmax = 0, smax = 0, nmax = 0;
      for (int h = 0; h < Hkv; ++h) {
        const int e = b * Hkv + h;
        const int64_t end = index->entry_clustered_end(e);
        MP_CHECK(end <= lens[b], "cuda decode: entry (batch {}, head {}) clusters up to {}, beyond the length {}", b, h,
                 end, lens[b]);
        cap = std::max<int64_t>(cap, std::min<int64_t>(config_.cluster.sinks, end) + config_.budget + (lens[b] - end));
        const int64_t Cc = index->entry_coarse(e), Cf = index->entry_clusters(e) - Cc;
        // Two-level: the far list holds the coarse level plus the candidates, which the
        // split plan estimates as twice the fine clusters under the coarse budget (the last
        // split runs to the end of the list, so an underestimate only costs balance).
        const int64_t clustered = std::max<int64_t>(1, end - std::min<int64_t>(config_.cluster.sinks, end));
        const int64_t far = hier ? Cc + std::min<int64_t>(Cf, (2 * coarse_budget * Cf + clustered - 1) / clustered)
                                 : index->entry_clusters(e);
        cmax = std::max<int64_t>(cmax, far);
        // Scored: the coarse level, or every slot (the online update may fill spare ones).
        nmax = std::max<int64_t>(nmax, hier ? Cc : index->entry_clusters(e));
        smax = std::max<int64_t>(smax, prescore ? index->entry_capacity(e) : nmax);
      }
      vlen[b] = cmax;  // pseudo-tokens; exact slots added below
      far_most = std::max(far_most, cmax);
      score_chunks[b] = (smax + kScoreChunk - 1) / kScoreChunk;
      norm_chunks[b] = (nmax + kScoreChunk - 1) / kScoreChunk;  // the coarse level comes first
    }
    info_.hierarchical = hier;
    info_.prescored = prescore;
    info_.far_cap = hier ? std::max(1, index->max_clusters()) : 0;
    coarse_budget_ = int(std::min<int64_t>(coarse_budget, std::numeric_limits<int32_t>::max()));
    cap = (cap + 7) / 8 * 8;
    MP_CHECK(cap < (int64_t(1) << 30), "cuda decode: exact set capacity {} too large", cap);
    info_.exact_cap = int(cap);
    for (int b = 0; b < B; ++b) vlen[b] = cap + (config_.multipole_far_field ? vlen[b] : 0);
    // MULTIPOLE_MP_CHUNK_TILES / MULTIPOLE_MP_WAVES: shortest split and CTA waves (A/B knobs).
    const SplitPlan mp = plan_splits(vlen, Hkv,
                                     sms * attend_ctas_per_sm(kc.dtype, D, rows, true) *
                                         std::max(1, env_int("MULTIPOLE_MP_WAVES", 1)),
                                     std::max(1, env_int("MULTIPOLE_MP_CHUNK_TILES", kMinChunkTiles)));
    upload_vector(m_item_seq_, mp.item_seq);
    upload_vector(m_item_split_, mp.item_split);
    upload_vector(m_seq_base_, mp.seq_base);
    upload_vector(m_seq_splits_, mp.seq_splits);
    info_.mp_chunk = mp.chunk;
    info_.mp_ctas = int(mp.item_seq.size()) * Hkv;
    items = std::max<int64_t>(items, int64_t(mp.item_seq.size()));

    std::vector<int32_t> s_seq, s_chunk, s_base, s_count;
    for (int b = 0; b < B; ++b) {
      s_base.push_back(int32_t(s_seq.size()));
      s_count.push_back(int32_t(norm_chunks[b]));
      for (int c = 0; c < score_chunks[b]; ++c) {
        s_seq.push_back(b);
        s_chunk.push_back(c);
      }
    }
    upload_vector(s_item_seq_, s_seq);
    upload_vector(s_item_chunk_, s_chunk);
    upload_vector(s_seq_base_, s_base);
    upload_vector(s_seq_chunks_, s_count);
    // Scoring: one work item per centroid chunk and head chunk, on at most one wave of
    // persistent CTAs. MULTIPOLE_SCORE_CTAS: a cap (tests give CTAs several items).
    info_.score_work = int(s_seq.size()) * Hkv * head_chunks_;
    const DType key_dtype = index->key_dtype() == DType::F32 ? DType::F32 : kc.dtype;
    info_.score_ctas = std::min(info_.score_work, score_resident_ctas(D, gc_, key_dtype));
    if (const int cap = env_int("MULTIPOLE_SCORE_CTAS", 0); cap > 0) info_.score_ctas = std::min(info_.score_ctas, cap);
    int dev = 0, optin = 0;
    MP_CUDA_CHECK(cudaGetDevice(&dev));
    MP_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const size_t select_smem = hier ? select_hier_smem_bytes(index->max_clusters(), G, D, 0)
                                    : select_smem_bytes(index->max_clusters());
    MP_CHECK(select_smem + kSelectStaticSmem <= size_t(optin),
             "cuda decode: {} clusters in one (sequence, head) exceed the selection kernel's shared-memory limit of "
             "{} clusters",
             index->max_clusters(), (size_t(optin) - kSelectStaticSmem) * 32 / (12 * 32 + 8));
    index_clusters_ = index->total_clusters();
    smem_clusters_ = std::max(1, index->max_clusters());
    // Candidate logits cached in what shared memory is left (the rest come from L2).
    cand_cache_ = hier ? int(std::min<size_t>({size_t(kSelectCandCache), size_t(smem_clusters_),
                                               (size_t(optin) - kSelectStaticSmem - select_smem) / (size_t(G + 1) * 4)}))
                       : 0;
    scores_.reserve(size_t(std::max<int64_t>(index_clusters_, 1)) * G * sizeof(float));
    score_part_.reserve(std::max<size_t>(s_seq.size(), 1) * Hkv * G * 2 * sizeof(float));
    far_size_.reserve(size_t(std::max<int64_t>(index_clusters_, 1)) * sizeof(int32_t));
    exact_rows_.reserve(size_t(B) * Hkv * cap * sizeof(int32_t));
    exact_n_.reserve(size_t(B) * Hkv * sizeof(int32_t));
    exact_n_.memset(0);
    info_.far_real = rope_half_ > 0;
    if (info_.far_real) {
      MP_CHECK(index->has_position_sums(),
               "cuda decode: the far field at real positions reads the index's position sums, stale since its last "
               "device update (DeviceKMeans keeps them when its AttentionConfig has far_field_real_positions)");
      MP_CHECK(int64_t(G) * D * 4 <= 48 * 1024,
               "cuda decode: the far field at real positions stages the group's {} query heads of dim {} in shared "
               "memory: {} B, over the 48 KB limit",
               G, D, int64_t(G) * D * 4);
      info_.far_items = int(std::min<int64_t>(far_most, std::numeric_limits<int32_t>::max()));
      // Zeroed when allocated, not per plan (a policy plans every step): rows of clusters that are
      // never far are loaded by the attention and not used.
      if (const size_t bytes = size_t(std::max<int64_t>(index_clusters_, 1)) * G * sizeof(float);
          far_scores_.size() < bytes) {
        far_scores_.reserve(bytes);
        far_scores_.memset(0);
      }
    }
    info_.rerank = config_.rerank_tokens > 0;
    if (info_.rerank) {
      const int R = config_.rerank_tokens;
      const size_t smem = rerank_smem_bytes(R, G, D);
      MP_CHECK(smem + kSelectStaticSmem <= size_t(optin),
               "cuda decode: rerank_tokens {} needs {} B of shared memory for a group of {} heads of dim {}, over this "
               "GPU's {} B",
               R, smem + kSelectStaticSmem, G, D, optin);
      rerank_ids_.reserve(size_t(B) * Hkv * R * sizeof(int32_t));
      rerank_n_.reserve(size_t(B) * Hkv * sizeof(int32_t));
      rerank_norms_.reserve(size_t(B) * Hkv * G * 2 * sizeof(float));
    }
    plan_fused(*index, cap, kc.page_size);
    if (hier) {
      far_ids_.reserve(size_t(B) * Hkv * info_.far_cap * sizeof(int32_t));
      far_n_.reserve(size_t(B) * Hkv * sizeof(int32_t));
      far_n_.memset(0);
    }
  }
  part_o_.reserve(size_t(items) * Hkv * G * D * sizeof(float));
  part_ml_.reserve(size_t(items) * Hkv * G * 2 * sizeof(float));
  counters_.reserve(size_t(B) * Hkv * sizeof(int32_t));
  counters_.memset(0);
}

namespace {
// log2(page_size) when a power of two, else -1.
int page_shift_of(int page_size) {
  for (int sft = 0; sft < 31; ++sft)
    if ((1 << sft) == page_size) return sft;
  return -1;
}

// The most candidates (children of the coarse clusters a selection under `budget` tokens can
// take) of one entry: the fractional-knapsack bound over coarse clusters of (tokens, children),
// densest first. size/child_begin: the entry's coarse sizes and child-list starts ([Cc + 1]).
int64_t candidate_bound(std::span<const int32_t> size, std::span<const int32_t> child_begin, int64_t budget) {
  struct Item {
    int64_t tokens, children;
  };
  std::vector<Item> items;
  for (size_t c = 0; c < size.size(); ++c)
    if (size[c] > 0 && size[c] <= budget) items.push_back({size[c], int64_t(child_begin[c + 1]) - child_begin[c]});
  std::sort(items.begin(), items.end(),
            [](const Item& l, const Item& r) { return l.children * r.tokens > r.children * l.tokens; });
  int64_t room = budget, bound = 0;
  for (const Item& it : items) {
    if (room <= 0) break;
    const int64_t take = std::min(room, it.tokens);
    bound += (it.children * take + it.tokens - 1) / it.tokens;
    room -= take;
  }
  return bound;
}

// The clusters of an entry the one-launch step scores and stages first: coarse, or one level's.
int fused_staged(const DeviceClusterIndex& index) {
  return index.hierarchical() ? index.max_coarse() : index.max_clusters();
}
}  // namespace

// Whether this plan's steps can run in one launch (DecodePlanInfo::fused says what it needs).
// Reads the coarse levels' sizes and child counts back from the device (synchronous).
void CudaDecoder::plan_fused(const DeviceClusterIndex& index, int64_t exact_rows, int page_size) {
  using L = detail::FusedStepLimits;
  info_.fused = false;
  info_.fused_fallback = false;
  info_.fused_candidate_bound = 0;
  stage_begin_.clear(), stage_count_.clear();
  const DType kv_dtype = index.value_dtype();
  const int E = index.entries();
  const auto why = [&](const char* reason) { info_.fused_why = reason; };
  if (!fused_allowed_) return why("turned off (MULTIPOLE_FUSED=0 or set_fused(false))");
  if (info_.rerank && !fused_rerank_allowed_)
    return why("re-ranking in one launch is off (MULTIPOLE_FUSED_RERANK=0 or set_fused_rerank(false))");
  if (info_.rerank && config_.rerank_tokens > L::kMaxRerank) return why("re-ranking over 512 tokens");
  if (config_.head_dim != L::kHeadDim) return why("head dim is not 128");
  if (info_.far_real && 2 * rope_half_ != L::kHeadDim)
    return why("far field at real positions with RoPE on part of the head dims");
  if (config_.group_size() > L::kGroup) return why("GQA group over 4");
  if (index.key_dtype() != kv_dtype) return why("key centroids not in the cache's type");
  if (config_.budget > L::kMaxBudget) return why("budget over 128");
  if (coarse_budget_ >= 65535) return why("coarse budget over 65534");
  if (page_shift_of(page_size) < 0) return why("page size not a power of two");
  if (exact_rows > L::kExactRows) return why("over 512 exact rows");
  const bool hier = index.hierarchical();
  if (!hier && index.max_clusters() > L::kMaxCoarse) return why("one level of over 2048 clusters in an entry");
  if (index.max_coarse() > L::kMaxCoarse) return why("over 2048 coarse clusters in an entry");
  for (int e = 0; e < E; ++e) {
    if (hier && index.entry_clusters(e) - index.entry_coarse(e) > L::kMaxFine)
      return why("over 16384 fine clusters in an entry");
    if (index.entry_clustered_end(e) >= (int64_t(1) << 20)) return why("over 2^20 clustered tokens");
  }
  // Clusters are independent (no exchange between entries), so past those held at once the
  // rest start as the first end: waves.
  info_.fused_clusters_at_once = detail::fused_step_clusters_at_once(kv_dtype, fused_staged(index), hier, info_.far_real, info_.rerank);
  if (info_.fused_clusters_at_once == 0) return why("no cluster launch on this device");
  if (fused_waves_ > 0 && E > int64_t(fused_waves_) * info_.fused_clusters_at_once)
    return why(fused_waves_ == 1 ? "more entries than its clusters fit at once" : "more entries than its waves of clusters hold");
  if (fused_stage_ahead_ > 0 && E <= FusedStepArgs::kPlannedEntries)
    for (int e = 0; e < E; ++e) {
      const int n = hier ? index.entry_coarse(e) : index.entry_clusters(e);
      stage_begin_.push_back(int32_t(index.entry_first_cluster(e)));
      stage_count_.push_back(fused_stage_ahead_ == 2 ? std::max(0, n - 1) : n);
    }
  if (!hier) {  // no candidates
    info_.fused = true;
    return why("");
  }
  const DeviceClusterView cv = index.view();
  std::vector<int32_t> sizes, begins;
  int64_t bound = 0;
  for (int e = 0; e < E; ++e) {
    const int64_t cb = index.entry_first_cluster(e), Cc = index.entry_coarse(e);
    const int64_t n = std::min<int64_t>(Cc + 1, index.total_clusters() - cb);
    if (Cc == 0) {  // no coarse level: every fine cluster is a candidate
      bound = std::max<int64_t>(bound, index.entry_clusters(e));
      continue;
    }
    sizes.resize(size_t(Cc));
    begins.assign(size_t(Cc + 1), 0);
    MP_CUDA_CHECK(cudaMemcpy(sizes.data(), cv.sizes + cb, size_t(Cc) * 4, cudaMemcpyDeviceToHost));
    MP_CUDA_CHECK(cudaMemcpy(begins.data(), cv.member_begin + cb, size_t(n) * 4, cudaMemcpyDeviceToHost));
    if (n == Cc) begins[size_t(Cc)] = begins[size_t(Cc - 1)];  // no fine level after it: nothing selectable
    bound = std::max(bound, candidate_bound(sizes, begins, coarse_budget_));
  }
  info_.fused_candidate_bound = int(std::min<int64_t>(bound, std::numeric_limits<int>::max()));
  // (The kernels behind a fallback would need the far logits' launch between them.)
  if (info_.far_real && bound > L::kMaxCand) return why("far field at real positions over 512 candidates");
  info_.fused = true;
  info_.fused_fallback = bound > L::kMaxCand;
  if (info_.fused_fallback) {
    fallback_.reserve(size_t(E) * sizeof(int32_t));
    fallback_.memset(0);
  }
  why("");
}

namespace {
AttendArgs base_args(const DeviceKVCache& cache, int layer, const AttentionConfig& c) {
  const DeviceKVLayer kv = cache.layer(layer);
  AttendArgs a;
  a.keys = kv.keys;
  a.values = kv.values;
  a.page_size = kv.page_size;
  a.page_shift = page_shift_of(kv.page_size);
  a.num_kv_heads = kv.num_kv_heads;
  a.tables = kv.tables;
  a.table_offset = kv.table_offset;
  a.lengths = kv.lengths;
  a.group = c.group_size();
  a.head_chunks = 1;  // the tensor-core rows hold the whole group
  a.qscale = c.softmax_scale() * 1.4426950408889634f;
  return a;
}
void launch_attend(const AttendArgs& a, DType dtype, int head_dim, int group, bool mp, int items, Stream stream) {
  if (dtype == DType::BF16)
    launch_attend_bf16(a, head_dim, attend_rows(group), mp, items, stream);
  else
    launch_attend_f16(a, head_dim, attend_rows(group), mp, items, stream);
}
}  // namespace

void CudaDecoder::dense(const DeviceKVCache& cache, int layer, const float* q, float* out, Stream stream) const {
  MP_CHECK(info_.batch > 0, "cuda decode: dense() before plan()");
  MP_CHECK(q && out, "cuda decode: null q or out");
  AttendArgs a = base_args(cache, layer, config_);
  a.seq_ids = seq_ids_.as<const int32_t>();
  a.q = q;
  a.out = out;
  a.item_seq = d_item_seq_.as<const int32_t>();
  a.item_split = d_item_split_.as<const int32_t>();
  a.seq_item_base = d_seq_base_.as<const int32_t>();
  a.seq_splits = d_seq_splits_.as<const int32_t>();
  a.chunk = info_.dense_chunk;
  a.part_o = part_o_.as<float>();
  a.part_ml = part_ml_.as<float>();
  a.counters = counters_.as<int32_t>();
  launch_attend(a, cache.config().dtype, config_.head_dim, config_.group_size(), false,
                info_.dense_ctas / config_.num_kv_heads, stream);
}

void CudaDecoder::multipole(const DeviceKVCache& cache, int layer, const DeviceClusterIndex& index, const float* q,
                            const float* q_score, float* out, Stream stream, int stages) const {
  MP_CHECK(info_.exact_cap > 0, "cuda decode: multipole() before plan() with a cluster index");
  MP_CHECK(index.total_clusters() == index_clusters_ && index.max_clusters() <= smem_clusters_,
           "cuda decode: the cluster index changed since plan()");
  MP_CHECK(q && q_score && out, "cuda decode: null q, q_score or out");
  MP_CHECK(reinterpret_cast<uintptr_t>(q_score) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0,
           "cuda decode: q_score and out must be 16-byte aligned");
  const int Hkv = config_.num_kv_heads, E = info_.batch * Hkv;
  const DeviceClusterView cv = index.view();
  const DeviceKVLayer kv = cache.layer(layer);

  const bool one_launch = info_.fused && (stages == 3 || stages == 5);
  far_sizes_recorded_ = !one_launch || record_far_sizes_;
  if (one_launch) {
    FusedStepArgs f;
    f.q = q;
    f.q_score = q_score;
    f.qscale = config_.softmax_scale() * 1.4426950408889634f;
    f.group = config_.group_size();
    f.num_kv_heads = Hkv;
    f.seq_ids = seq_ids_.as<const int32_t>();
    f.lengths = kv.lengths;
    f.tables = kv.tables;
    f.table_offset = kv.table_offset;
    f.page_shift = page_shift_of(kv.page_size);
    f.keys = kv.keys;
    f.values = kv.values;
    f.key_centroids = cv.key_centroids;
    f.value_centroids = cv.value_centroids;
    f.sizes = cv.sizes;
    f.member_begin = cv.member_begin;
    f.members = cv.members;
    f.entry_begin = cv.entry_begin;
    f.entry_count = cv.entry_count;
    f.entry_coarse = cv.entry_coarse;
    f.entry_end = cv.entry_end;
    f.hierarchical = index.hierarchical();
    f.max_coarse = fused_staged(index);
    f.planned_entries = int(stage_begin_.size());
    std::copy(stage_begin_.begin(), stage_begin_.end(), f.planned_begin);
    std::copy(stage_count_.begin(), stage_count_.end(), f.planned_count);
    f.sinks = config_.cluster.sinks;
    f.budget = config_.budget;
    f.coarse_budget = coarse_budget_;
    f.far_field = config_.multipole_far_field ? 1 : 0;
    f.rerank = info_.rerank ? config_.rerank_tokens : 0;
    if (info_.far_real) {
      f.position_sums = cv.position_sums;
      f.inv_freq = inv_freq_.as<const double>();
    }
    f.out = out;
    f.far_size = record_far_sizes_ ? far_size_.as<int32_t>() : nullptr;
    f.exact_n = exact_n_.as<int32_t>();
    f.error_flags = errors_.as<uint32_t>();
    f.prof = step_prof_;
    f.prof_return = step_prof_return_;
    f.fallback = info_.fused_fallback ? fallback_.as<int32_t>() : nullptr;
    f.scores = scores_.as<float>();
    f.part = score_part_.as<float>();
    f.seq_score_base = s_seq_base_.as<const int32_t>();
    f.seq_score_chunks = s_seq_chunks_.as<const int32_t>();
    launch_fused_step(f, cache.config().dtype, E, stream);
    if (!info_.fused_fallback || stages == 5) return;
  }
  // Behind the one-launch step: only the entries it left, whose coarse logits and normalisers
  // it wrote (no scoring launch; the selection scores their candidates).
  const int32_t* fallback = info_.fused && stages == 3 ? fallback_.as<const int32_t>() : nullptr;

  // stages: 1 score, 2 score + select, 3 all, 4 attention only (diagnostics).
  const DType score_dtype = cv.key_dtype == DType::F32 ? DType::F32 : cache.config().dtype;
  if (info_.score_ctas > 0 && stages != 4 && !fallback) {
    ScoreArgs s;
    s.q_score = q_score;
    s.key_centroids = cv.key_centroids;
    s.sizes = cv.sizes;
    s.entry_begin = cv.entry_begin;
    // Two levels: the coarse level only, or every cluster with the coarse ones normalised.
    s.entry_count = info_.hierarchical && !info_.prescored ? cv.entry_coarse : cv.entry_count;
    s.entry_normed = info_.prescored ? cv.entry_coarse : nullptr;
    s.num_kv_heads = Hkv;
    s.group = config_.group_size();
    s.head_chunks = head_chunks_;
    s.qscale = config_.softmax_scale() * 1.4426950408889634f;
    s.item_seq = s_item_seq_.as<const int32_t>();
    s.item_chunk = s_item_chunk_.as<const int32_t>();
    s.scores = scores_.as<float>();
    s.part = score_part_.as<float>();
    launch_score(s, config_.head_dim, gc_, score_dtype, info_.score_work / (Hkv * head_chunks_), info_.score_ctas,
                 stream);
  }

  if (stages < 2) return;
  SelectArgs sa;
  if (stages != 4) {
  sa.scores = scores_.as<const float>();
  sa.part = score_part_.as<const float>();
  sa.seq_score_base = s_seq_base_.as<const int32_t>();
  sa.seq_score_chunks = s_seq_chunks_.as<const int32_t>();
  sa.sizes = cv.sizes;
  sa.member_begin = cv.member_begin;
  sa.members = cv.members;
  sa.entry_begin = cv.entry_begin;
  sa.entry_count = cv.entry_count;
  sa.entry_end = cv.entry_end;
  sa.seq_ids = seq_ids_.as<const int32_t>();
  sa.tables = kv.tables;
  sa.table_offset = kv.table_offset;
  sa.lengths = kv.lengths;
  sa.page_size = kv.page_size;
  sa.num_kv_heads = Hkv;
  sa.group = config_.group_size();
  sa.sinks = config_.cluster.sinks;
  sa.budget = config_.budget;
  sa.exact_cap = info_.exact_cap;
  sa.far_size = far_size_.as<int32_t>();
  sa.exact_rows = exact_rows_.as<int32_t>();
  sa.exact_n = exact_n_.as<int32_t>();
  sa.error_flags = errors_.as<uint32_t>();
  sa.smem_clusters = smem_clusters_;
  sa.prof = select_prof_;
  sa.warp_select_max = select_warp_max_;
  sa.warp_select_steps = select_warp_steps_;
  sa.warp_select_precheck = select_precheck_ ? 1 : 0;
  sa.warp_select_sort = select_sort_;
  sa.cand_cache = std::min(cand_cache_, std::max(select_cand_max_, 0));
  sa.fallback = fallback;
  // Programmatic dependent launch only right after our own scoring kernel (a kernel node).
  sa.pdl = pdl_ && info_.score_ctas > 0 && !fallback ? 1 : 0;
  sa.head_dim = config_.head_dim;
  sa.qscale = config_.softmax_scale() * 1.4426950408889634f;
  sa.scores_out = scores_.as<float>();
  if (info_.rerank) {
    // The finest selection lists picks worth rerank_tokens tokens; their members' exact logits
    // choose among them (launch_rerank below).
    sa.rerank = config_.rerank_tokens;
    sa.rerank_ids = rerank_ids_.as<int32_t>();
    sa.rerank_n = rerank_n_.as<int32_t>();
    sa.rerank_norms = rerank_norms_.as<float>();
    sa.q = q;
    sa.keys = kv.keys;
  }
  if (info_.hierarchical) {
    sa.entry_coarse = cv.entry_coarse;
    sa.coarse_budget = coarse_budget_;
    sa.q_score = q_score;
    sa.key_centroids = cv.key_centroids;
    sa.key_kind = cv.key_dtype == DType::F32 ? 0 : cv.key_dtype == DType::BF16 ? 1 : 2;
    sa.prescored = info_.prescored && !fallback ? 1 : 0;
    sa.far_ids = far_ids_.as<int32_t>();
    sa.far_n = far_n_.as<int32_t>();
    sa.far_cap = info_.far_cap;
    launch_select_hier(sa, E, stream);
  } else {
    launch_select(sa, E, stream);
  }
  if (info_.rerank) {
    sa.pdl = pdl_ ? 1 : 0;  // right after the selection kernel
    launch_rerank(sa, cache.config().dtype, E, stream);
  }
  }
  if (stages < 3) return;

  if (info_.far_real && stages != 4) {
    // The far field's logits: the real q against the far clusters' key centroids at their mean
    // positions (the selection's logits stay at the scoring position).
    FarLogitArgs f;
    f.q = q;
    f.key_centroids = cv.key_centroids;
    f.position_sums = cv.position_sums;
    f.far_size = far_size_.as<const int32_t>();
    f.entry_begin = cv.entry_begin;
    f.entry_count = cv.entry_count;
    if (info_.hierarchical) {
      f.far_ids = far_ids_.as<const int32_t>();
      f.far_n = far_n_.as<const int32_t>();
      f.far_cap = info_.far_cap;
    }
    f.inv_freq = inv_freq_.as<const double>();
    f.half = rope_half_;
    f.group = config_.group_size();
    f.qscale = config_.softmax_scale() * 1.4426950408889634f;
    f.scores = far_scores_.as<float>();
    f.pdl = pdl_ ? 1 : 0;  // right after the selection kernel
    launch_far_logits_at_mean_positions(f, config_.head_dim, score_dtype, E, info_.far_items, stream);
  }
  AttendArgs a = base_args(cache, layer, config_);
  a.seq_ids = seq_ids_.as<const int32_t>();
  a.q = q;
  a.out = out;
  a.item_seq = m_item_seq_.as<const int32_t>();
  a.item_split = m_item_split_.as<const int32_t>();
  a.seq_item_base = m_seq_base_.as<const int32_t>();
  a.seq_splits = m_seq_splits_.as<const int32_t>();
  a.chunk = info_.mp_chunk;
  a.part_o = part_o_.as<float>();
  a.part_ml = part_ml_.as<float>();
  a.counters = counters_.as<int32_t>();
  a.exact_cap = info_.exact_cap;
  a.exact_rows = exact_rows_.as<const int32_t>();
  a.exact_n = exact_n_.as<const int32_t>();
  a.scores = (info_.far_real ? far_scores_ : scores_).as<const float>();  // (read for the far field only)
  a.far_size = far_size_.as<const int32_t>();
  a.value_centroids = static_cast<const std::byte*>(cv.value_centroids);
  a.entry_begin = cv.entry_begin;
  a.entry_count = cv.entry_count;
  a.far_field = config_.multipole_far_field ? 1 : 0;
  a.pdl = pdl_ && stages != 4 ? 1 : 0;  // right after the selection kernel (or the far logits')
  a.fallback = fallback;
  if (info_.hierarchical) {
    a.far_ids = far_ids_.as<const int32_t>();
    a.far_n = far_n_.as<const int32_t>();
    a.far_cap = info_.far_cap;
  }
  launch_attend(a, cache.config().dtype, config_.head_dim, config_.group_size(), true, info_.mp_ctas / Hkv, stream);
}

std::vector<int32_t> CudaDecoder::far_sizes() const {
  MP_CHECK(far_sizes_recorded_,
           "cuda decode: far_sizes(): the last multipole step did not record them (a step in one launch "
           "records them only after set_record_far_sizes(true))");
  std::vector<int32_t> v(static_cast<size_t>(index_clusters_));
  synchronize();
  far_size_.download(v.data(), v.size() * sizeof(int32_t));
  return v;
}

std::vector<int32_t> CudaDecoder::exact_counts() const {
  std::vector<int32_t> v(size_t(info_.batch) * config_.num_kv_heads);
  synchronize();
  exact_n_.download(v.data(), v.size() * sizeof(int32_t));
  return v;
}

std::vector<int32_t> CudaDecoder::fused_fallbacks() const {
  std::vector<int32_t> v(size_t(info_.batch) * config_.num_kv_heads, 0);
  if (!info_.fused_fallback) return v;
  synchronize();
  fallback_.download(v.data(), v.size() * sizeof(int32_t));
  return v;
}

uint32_t CudaDecoder::error_flags() const {
  uint32_t f = 0;
  synchronize();
  errors_.download(&f, sizeof(f));
  return f;
}

void CudaDecoder::clear_error_flags() { errors_.memset(0); }

}  // namespace multipole::cuda
