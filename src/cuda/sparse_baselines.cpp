// Host side of the quest and oracle-topk GPU baselines: planning (split plan of the shared
// attention kernel over each entry's exact list, workspaces) and the launch sequence of a
// step. No synchronisation inside decode() / update_metadata().
#include "multipole/cuda/sparse_baselines.hpp"

#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/check.hpp"
#include "cuda/host_setup.hpp"
#include "cuda/launch.hpp"
#include "cuda/sparse_baselines.cuh"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

using namespace detail;

CudaSparseDecoder::CudaSparseDecoder(const AttentionConfig& config, SparseBaseline kind) : config_(config), kind_(kind) {
  config_.validate();
  MP_CHECK(is_kernel_head_dim(config_.head_dim), "cuda sparse baseline: head_dim {} must be 64 or 128",
           config_.head_dim);
  MP_CHECK(config_.quest_page_size > 0, "cuda sparse baseline: quest_page_size {} must be > 0",
           config_.quest_page_size);
  const int picks = kind_ == SparseBaseline::Quest ? config_.budget / config_.quest_page_size : config_.budget;
  MP_CHECK(config_.budget >= 0 && picks <= kSparseMaxPicks,
           "cuda sparse baseline: budget {} selects {} {} per entry, more than the limit {}", config_.budget, picks,
           kind_ == SparseBaseline::Quest ? "pages" : "keys", kSparseMaxPicks);
  MP_CHECK(config_.cluster.window > 0, "cuda sparse baseline: cluster.window {} must be > 0", config_.cluster.window);
  errors_.reserve(sizeof(uint32_t));
  errors_.memset(0);
}

void CudaSparseDecoder::plan(const DeviceKVCache& cache, std::span<const SeqId> seqs, int64_t max_length) {
  const auto& kc = cache.config();
  const int Hkv = config_.num_kv_heads, G = config_.group_size(), D = config_.head_dim;
  MP_CHECK(kc.num_kv_heads == Hkv && kc.head_dim == D,
           "cuda sparse baseline: cache has {} KV heads of dim {}, the attention config {} of dim {}", kc.num_kv_heads,
           kc.head_dim, Hkv, D);
  MP_CHECK(!seqs.empty(), "cuda sparse baseline: empty batch");
  const int B = int(seqs.size()), E = B * Hkv;
  for (SeqId s : seqs) max_length = std::max(max_length, cache.host_length(s));
  MP_CHECK(max_length < (int64_t(1) << 30), "cuda sparse baseline: max_length {} exceeds 2^30", max_length);
  const int64_t W = config_.cluster.window, sinks = config_.cluster.sinks;
  // sinks + selection (<= budget tokens) + window (< 2W tokens).
  const int64_t cap = (sinks + config_.budget + 2 * W - 1 + 7) / 8 * 8;
  const int64_t middle = std::max<int64_t>(1, max_length - std::min(sinks, max_length));
  const int64_t pages = (middle + config_.quest_page_size - 1) / config_.quest_page_size;
  const bool same_meta = kind_ == SparseBaseline::Quest && B == batch_ && pages == page_cap_ &&
                         layers_ == kc.num_layers && dtype_ == kc.dtype;
  batch_ = B;
  dtype_ = kc.dtype;
  layers_ = kc.num_layers;
  exact_cap_ = int(cap);
  page_cap_ = pages;
  middle_cap_ = middle;

  // Splits: every entry's virtual sequence is its exact list (<= cap rows); whole 32-row
  // tiles per split, as few splits as fill one wave of the attention kernel.
  const int64_t slots = int64_t(current_sm_count()) * attend_ctas_per_sm(kc.dtype, D, attend_rows(G), true);
  const int64_t tiles = (cap + 31) / 32;
  const int64_t per_split = std::max<int64_t>(2, (tiles * E + slots - 1) / slots);
  const int splits = int((tiles + per_split - 1) / per_split);
  chunk_ = int(per_split * 32);
  std::vector<int32_t> item_seq, item_split, base, count;
  for (int b = 0; b < B; ++b) {
    base.push_back(int32_t(item_seq.size()));
    count.push_back(splits);
    for (int s = 0; s < splits; ++s) {
      item_seq.push_back(b);
      item_split.push_back(s);
    }
  }
  attend_items_ = int(item_seq.size());
  upload_vector(item_seq_, item_seq);
  upload_vector(item_split_, item_split);
  upload_vector(seq_base_, base);
  upload_vector(seq_splits_, count);
  upload_vector(seq_ids_, std::vector<int32_t>(seqs.begin(), seqs.end()));
  upload_vector(entry_zero_, std::vector<int32_t>(size_t(E), 0));

  part_o_.reserve(size_t(attend_items_) * Hkv * G * D * sizeof(float));
  part_ml_.reserve(size_t(attend_items_) * Hkv * G * 2 * sizeof(float));
  counters_.reserve(size_t(E) * sizeof(int32_t));
  counters_.memset(0);
  exact_rows_.reserve(size_t(E) * cap * sizeof(int32_t));
  exact_pos_.reserve(size_t(E) * cap * sizeof(int32_t));
  exact_n_.reserve(size_t(E) * sizeof(int32_t));
  exact_n_.memset(0);
  if (kind_ == SparseBaseline::Quest) {
    const size_t meta = size_t(layers_) * E * size_t(pages) * 2 * D * dtype_size(kc.dtype);
    if (!same_meta || meta_.size() < meta) {
      meta_.reserve(meta);
      meta_.memset(0);
    }
    values_.reserve(size_t(E) * size_t(pages) * sizeof(float));
  } else {
    const int chunks = int((middle + kLogitChunk - 1) / kLogitChunk);
    values_.reserve(size_t(E) * G * size_t(middle) * sizeof(float));
    stats_.reserve(size_t(E) * chunks * G * 2 * sizeof(float));
    importance_.reserve(size_t(E) * size_t(middle) * sizeof(float));
  }
}

namespace {
SparseArgs sparse_args(const DeviceKVCache& cache, int layer, const AttentionConfig& c) {
  const DeviceKVLayer kv = cache.layer(layer);
  SparseArgs a;
  a.keys = kv.keys;
  a.tables = kv.tables;
  a.table_offset = kv.table_offset;
  a.lengths = kv.lengths;
  a.page_size = kv.page_size;
  a.num_kv_heads = kv.num_kv_heads;
  a.group = c.group_size();
  a.sinks = c.cluster.sinks;
  a.window = c.cluster.window;
  a.budget = c.budget;
  a.quest_page = c.quest_page_size;
  a.qscale = c.softmax_scale() * 1.4426950408889634f;
  return a;
}
}  // namespace

void CudaSparseDecoder::build_metadata(const DeviceKVCache& cache, int layer, Stream stream) {
  launch_metadata(cache, layer, false, stream);
}

void CudaSparseDecoder::update_metadata(const DeviceKVCache& cache, int layer, Stream stream) {
  launch_metadata(cache, layer, true, stream);
}

void CudaSparseDecoder::launch_metadata(const DeviceKVCache& cache, int layer, bool update, Stream stream) {
  MP_CHECK(kind_ == SparseBaseline::Quest && batch_ > 0, "cuda sparse baseline: page metadata needs a planned quest");
  MP_CHECK(layer >= 0 && layer < layers_, "cuda sparse baseline: layer {} out of range [0, {})", layer, layers_);
  SparseArgs a = sparse_args(cache, layer, config_);
  a.seq_ids = seq_ids_.as<const int32_t>();
  a.meta = meta_.as<std::byte>() + size_t(layer) * batch_ * config_.num_kv_heads * size_t(page_cap_) * 2 *
                                       config_.head_dim * dtype_size(dtype_);
  a.page_cap = page_cap_;
  a.error_flags = errors_.as<uint32_t>();
  a.update = update ? 1 : 0;
  // Update: only the pages that [m - W, m) can touch.
  const int grid_x = update ? (config_.cluster.window + config_.quest_page_size - 1) / config_.quest_page_size + 1
                            : int(page_cap_);
  launch_quest_meta(a, dtype_, config_.head_dim, grid_x, batch_ * config_.num_kv_heads, stream);
}

void CudaSparseDecoder::decode(const DeviceKVCache& cache, int layer, const float* q, float* out, Stream stream,
                               int stages) const {
  MP_CHECK(batch_ > 0, "cuda sparse baseline: decode() before plan()");
  MP_CHECK(q && out, "cuda sparse baseline: null q or out");
  MP_CHECK(layer >= 0 && layer < layers_, "cuda sparse baseline: layer {} out of range [0, {})", layer, layers_);
  const int Hkv = config_.num_kv_heads, E = batch_ * Hkv;
  const bool quest = kind_ == SparseBaseline::Quest;
  SparseArgs s = sparse_args(cache, layer, config_);
  s.seq_ids = seq_ids_.as<const int32_t>();
  s.q = q;
  s.page_cap = page_cap_;
  s.middle_cap = middle_cap_;
  s.chunks = int((middle_cap_ + kLogitChunk - 1) / kLogitChunk);
  s.values = values_.as<float>();
  s.stats = stats_.as<float>();
  s.importance = importance_.as<float>();
  s.exact_cap = exact_cap_;
  s.exact_rows = exact_rows_.as<int32_t>();
  s.exact_pos = exact_pos_.as<int32_t>();
  s.exact_n = exact_n_.as<int32_t>();
  s.error_flags = errors_.as<uint32_t>();
  if (quest) {
    s.meta = meta_.as<std::byte>() + size_t(layer) * E * size_t(page_cap_) * 2 * config_.head_dim * dtype_size(dtype_);
    launch_quest_score(s, dtype_, config_.head_dim, E, stream);
  } else {
    launch_oracle_logits(s, dtype_, config_.head_dim, E, stream);
  }
  if (stages < 2) return;
  launch_sparse_select(s, quest, E, stream);
  if (stages < 3) return;

  const DeviceKVLayer kv = cache.layer(layer);
  AttendArgs a;
  a.keys = kv.keys;
  a.values = kv.values;
  a.page_size = kv.page_size;
  a.page_shift = -1;  // only the dense variant uses it
  a.num_kv_heads = Hkv;
  a.tables = kv.tables;
  a.table_offset = kv.table_offset;
  a.lengths = kv.lengths;
  a.seq_ids = seq_ids_.as<const int32_t>();
  a.q = q;
  a.out = out;
  a.group = config_.group_size();
  a.head_chunks = 1;
  a.qscale = s.qscale;
  a.item_seq = item_seq_.as<const int32_t>();
  a.item_split = item_split_.as<const int32_t>();
  a.seq_item_base = seq_base_.as<const int32_t>();
  a.seq_splits = seq_splits_.as<const int32_t>();
  a.chunk = chunk_;
  a.part_o = part_o_.as<float>();
  a.part_ml = part_ml_.as<float>();
  a.counters = counters_.as<int32_t>();
  a.exact_cap = exact_cap_;
  a.exact_rows = exact_rows_.as<const int32_t>();
  a.exact_n = exact_n_.as<const int32_t>();
  a.entry_begin = entry_zero_.as<const int32_t>();  // read by the multipole variant; no far field
  a.entry_count = entry_zero_.as<const int32_t>();
  a.far_field = 0;
  a.pdl = 1;  // its prologue (Q fragments) overlaps the selection kernel
  if (dtype_ == DType::BF16)
    launch_attend_bf16(a, config_.head_dim, attend_rows(config_.group_size()), true, attend_items_, stream);
  else
    launch_attend_f16(a, config_.head_dim, attend_rows(config_.group_size()), true, attend_items_, stream);
}

int CudaSparseDecoder::select_ctas() const {
  const int E = batch_ * config_.num_kv_heads;
  const int64_t first = kind_ == SparseBaseline::Quest ? (page_cap_ + kQuestPagesPerCta - 1) / kQuestPagesPerCta
                                                       : (middle_cap_ + kLogitChunk - 1) / kLogitChunk;
  return int(first * E);
}

std::vector<std::vector<int32_t>> CudaSparseDecoder::exact_positions() const {
  const size_t E = size_t(batch_) * config_.num_kv_heads;
  std::vector<int32_t> n(E), pos(E * size_t(exact_cap_));
  synchronize();
  exact_n_.download(n.data(), n.size() * sizeof(int32_t));
  exact_pos_.download(pos.data(), pos.size() * sizeof(int32_t));
  std::vector<std::vector<int32_t>> out(E);
  for (size_t e = 0; e < E; ++e)
    out[e].assign(pos.begin() + e * exact_cap_, pos.begin() + e * exact_cap_ + std::min(n[e], exact_cap_));
  return out;
}

std::vector<float> CudaSparseDecoder::page_bounds(int layer, int entry, int pages) const {
  MP_CHECK(kind_ == SparseBaseline::Quest, "cuda sparse baseline: page_bounds() of a non-quest decoder");
  const int D = config_.head_dim, E = batch_ * config_.num_kv_heads;
  MP_CHECK(layer >= 0 && layer < layers_ && entry >= 0 && entry < E && pages >= 0 && pages <= page_cap_,
           "cuda sparse baseline: page_bounds(layer {}, entry {}, pages {}) outside [{}, {}, {}]", layer, entry, pages,
           layers_, E, page_cap_);
  std::vector<uint16_t> raw(size_t(pages) * 2 * D);
  synchronize();
  meta_.download(raw.data(), raw.size() * 2, ((size_t(layer) * E + entry) * size_t(page_cap_)) * 2 * D * 2);
  std::vector<float> out(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) out[i] = dtype_ == DType::BF16 ? bf16_to_f32(raw[i]) : f16_to_f32(raw[i]);
  return out;
}

uint32_t CudaSparseDecoder::error_flags() const {
  uint32_t f = 0;
  synchronize();
  errors_.download(&f, sizeof(f));
  return f;
}

}  // namespace multipole::cuda
