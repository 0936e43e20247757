#include "multipole/cuda/kv_cache.hpp"

#include <algorithm>
#include <limits>

#include "cuda/launch.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

DeviceKVCache::DeviceKVCache(const KVCacheConfig& config, int max_sequences)
    : config_(config), max_sequences_(max_sequences) {
  const auto& c = config_;
  MP_CHECK(c.dtype == DType::BF16 || c.dtype == DType::F16, "device kv cache: dtype {} must be bf16 or f16",
           dtype_name(c.dtype));
  MP_CHECK(c.num_layers > 0, "device kv cache: num_layers {} must be > 0", c.num_layers);
  MP_CHECK(c.num_kv_heads > 0, "device kv cache: num_kv_heads {} must be > 0", c.num_kv_heads);
  MP_CHECK(c.head_dim > 0 && c.head_dim % 8 == 0, "device kv cache: head_dim {} must be a positive multiple of 8",
           c.head_dim);
  MP_CHECK(c.page_size > 0 && c.page_size <= 4096, "device kv cache: page_size {} must be in [1, 4096]", c.page_size);
  MP_CHECK(c.max_tokens > 0, "device kv cache: max_tokens {} must be > 0", c.max_tokens);
  MP_CHECK(max_sequences > 0, "device kv cache: max_sequences {} must be > 0", max_sequences);
  num_pages_ = (c.max_tokens + c.page_size - 1) / c.page_size;
  // Kernels address a head's row as (page * heads + head) * page_size + slot in 32 bits.
  MP_CHECK(num_pages_ * c.num_kv_heads * c.page_size <= std::numeric_limits<int32_t>::max(),
           "device kv cache: {} pages x {} heads x {} slots exceed the 2^31 row limit", num_pages_, c.num_kv_heads,
           c.page_size);
  page_bytes_ = int64_t(c.num_kv_heads) * c.page_size * c.head_dim * int64_t(dtype_size(c.dtype));
  pools_.reserve(size_t(c.num_layers) * 2 * size_t(num_pages_) * size_t(page_bytes_));
  host_tables_.resize(max_sequences);
  host_offset_.assign(max_sequences, 0);
  host_capacity_.assign(max_sequences, 0);
  host_lengths_.assign(max_sequences, 0);
  dirty_from_.assign(max_sequences, 0);
  table_offset_.reserve(sizeof(int64_t) * max_sequences);
  lengths_.reserve(sizeof(int32_t) * max_sequences);
  relayout_ = true;
  flush_tables();
}

std::byte* DeviceKVCache::key_pool(int layer) const {
  MP_CHECK(layer >= 0 && layer < config_.num_layers, "device kv cache: layer {} out of range [0, {})", layer,
           config_.num_layers);
  return static_cast<std::byte*>(pools_.data()) + size_t(layer) * 2 * size_t(pool_bytes());
}

std::byte* DeviceKVCache::value_pool(int layer) const { return key_pool(layer) + pool_bytes(); }

int64_t DeviceKVCache::host_length(SeqId seq) const {
  MP_CHECK(seq >= 0 && seq < max_sequences_, "device kv cache: sequence {} out of range [0, {})", seq, max_sequences_);
  return host_lengths_[seq];
}

void DeviceKVCache::set_sequence(SeqId seq, std::span<const int32_t> pages, int64_t length) {
  MP_CHECK(seq >= 0 && seq < max_sequences_, "device kv cache: sequence {} out of range [0, max_sequences={})", seq,
           max_sequences_);
  MP_CHECK(length >= 0 && length <= int64_t(pages.size()) * config_.page_size,
           "device kv cache: sequence {} length {} needs more than its {} pages of {}", seq, length, pages.size(),
           config_.page_size);
  for (size_t i = 0; i < pages.size(); ++i)
    MP_CHECK(pages[i] >= 0 && pages[i] < num_pages_, "device kv cache: sequence {} page {} is {}, outside [0, {})", seq,
             i, pages[i], num_pages_);
  auto& t = host_tables_[seq];
  size_t same = 0;
  while (same < t.size() && same < pages.size() && t[same] == pages[same]) ++same;
  dirty_from_[seq] = std::min<int64_t>(dirty_from_[seq], int64_t(same));
  t.assign(pages.begin(), pages.end());
  if (int64_t(t.size()) > host_capacity_[seq]) relayout_ = true;
  host_lengths_[seq] = int32_t(length);
}

void DeviceKVCache::flush_tables() {
  if (relayout_) {
    int64_t total = 0;
    for (int s = 0; s < max_sequences_; ++s) {
      int64_t cap = 0;
      if (!host_tables_[s].empty()) {
        cap = 16;
        while (cap < int64_t(host_tables_[s].size())) cap *= 2;
      }
      host_capacity_[s] = cap;
      host_offset_[s] = total;
      total += cap;
    }
    std::vector<int32_t> all(size_t(std::max<int64_t>(total, 1)), 0);
    for (int s = 0; s < max_sequences_; ++s)
      std::copy(host_tables_[s].begin(), host_tables_[s].end(), all.begin() + host_offset_[s]);
    tables_.reserve(all.size() * sizeof(int32_t));
    tables_.upload(all.data(), all.size() * sizeof(int32_t));
    table_offset_.upload(host_offset_.data(), host_offset_.size() * sizeof(int64_t));
    relayout_ = false;
  } else {
    for (int s = 0; s < max_sequences_; ++s) {
      const auto& t = host_tables_[s];
      if (dirty_from_[s] < int64_t(t.size()))
        tables_.upload(t.data() + dirty_from_[s], (t.size() - dirty_from_[s]) * sizeof(int32_t),
                       (host_offset_[s] + dirty_from_[s]) * sizeof(int32_t));
    }
  }
  for (int s = 0; s < max_sequences_; ++s) dirty_from_[s] = int64_t(host_tables_[s].size());
  lengths_.upload(host_lengths_.data(), host_lengths_.size() * sizeof(int32_t));
}

void DeviceKVCache::sync_tables(const PagedKVCache& cpu) {
  for (SeqId s = 0; s < max_sequences_; ++s) {
    if (cpu.has_sequence(s))
      set_sequence(s, cpu.page_table(s), cpu.length(s));
    else if (!host_tables_[s].empty() || host_lengths_[s] != 0)
      set_sequence(s, {}, 0);
  }
  flush_tables();
}

void DeviceKVCache::check_mirrors(const PagedKVCache& cpu) const {
  const auto& a = cpu.config();
  const auto& c = config_;
  MP_CHECK(a.num_layers == c.num_layers && a.num_kv_heads == c.num_kv_heads && a.head_dim == c.head_dim &&
               a.page_size == c.page_size && a.dtype == c.dtype && cpu.num_pages() == num_pages_,
           "device kv cache: host cache config (layers {}, heads {}, dim {}, page {}, {}, {} pages) differs from the "
           "device mirror's ({}, {}, {}, {}, {}, {} pages)",
           a.num_layers, a.num_kv_heads, a.head_dim, a.page_size, dtype_name(a.dtype), cpu.num_pages(), c.num_layers,
           c.num_kv_heads, c.head_dim, c.page_size, dtype_name(c.dtype), num_pages_);
}

void DeviceKVCache::upload(const PagedKVCache& cpu) {
  check_mirrors(cpu);
  const auto& c = config_;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const KVLayerView v = cpu.layer_view(layer);
    const size_t off = size_t(layer) * 2 * size_t(pool_bytes());
    pools_.upload(v.keys, size_t(pool_bytes()), off);
    pools_.upload(v.values, size_t(pool_bytes()), off + size_t(pool_bytes()));
  }
  sync_tables(cpu);
}

void DeviceKVCache::upload_tokens(const PagedKVCache& cpu, int layer, SeqId seq, int64_t begin, int64_t end) {
  check_mirrors(cpu);
  MP_CHECK(layer >= 0 && layer < config_.num_layers, "device kv cache: layer {} outside [0, {})", layer,
           config_.num_layers);
  MP_CHECK(0 <= begin && begin <= end && end <= cpu.length(seq),
           "device kv cache: positions [{}, {}) outside sequence {}'s {} tokens", begin, end, seq, cpu.length(seq));
  if (begin == end) return;
  const std::span<const int32_t> table = cpu.page_table(seq);
  const KVLayerView v = cpu.layer_view(layer);
  const size_t base = size_t(layer) * 2 * size_t(pool_bytes());
  const int64_t first = begin / config_.page_size, last = (end - 1) / config_.page_size;
  for (int64_t i = first; i <= last;) {
    int64_t j = i + 1;  // extend the run while the pages are consecutive
    while (j <= last && table[size_t(j)] == table[size_t(j - 1)] + 1) ++j;
    const size_t off = size_t(table[size_t(i)]) * size_t(page_bytes_), bytes = size_t(j - i) * size_t(page_bytes_);
    pools_.upload(v.keys + off, bytes, base + off);
    pools_.upload(v.values + off, bytes, base + size_t(pool_bytes()) + off);
    i = j;
  }
}

DeviceKVLayer DeviceKVCache::layer(int layer) const {
  DeviceKVLayer v;
  v.keys = key_pool(layer);
  v.values = value_pool(layer);
  v.dtype = config_.dtype;
  v.num_kv_heads = config_.num_kv_heads;
  v.page_size = config_.page_size;
  v.head_dim = config_.head_dim;
  v.tables = tables_.as<const int32_t>();
  v.table_offset = table_offset_.as<const int64_t>();
  v.lengths = lengths_.as<const int32_t>();
  return v;
}

void DeviceKVCache::append(int layer, const int32_t* seqs, int batch, const float* keys, const float* values,
                           Stream stream) const {
  MP_CHECK(batch >= 0, "device kv cache: append batch {} must be >= 0", batch);
  if (batch == 0) return;
  detail::launch_append(this->layer(layer), key_pool(layer), value_pool(layer), seqs, batch, keys, values, stream);
}

}  // namespace multipole::cuda
