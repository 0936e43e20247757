#pragma once
// Paged KV cache. Every layer has one page pool for keys and one for values; a page holds
// page_size consecutive positions of one sequence for all KV heads, laid out
// [kv_head][slot][head_dim], so one head's tokens in a page are contiguous. A sequence owns a
// page table (logical page -> physical page), shared by all layers. Keys are stored after
// RoPE. Nothing is ever copied when a sequence grows.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/core/dtype.hpp"
#include "multipole/core/tensor.hpp"

namespace multipole {

using SeqId = int32_t;

struct KVCacheConfig {
  int num_layers = 1;
  int num_kv_heads = 1;
  int head_dim = 128;
  int page_size = 16;          // tokens per page
  DType dtype = DType::BF16;   // storage type of K and V
  int64_t max_tokens = 1 << 16;  // capacity over all sequences (rounded up to whole pages)
};

// What a kernel needs to address one layer's K/V. Plain data, also valid on a GPU mirror.
struct KVLayerView {
  const std::byte* keys = nullptr;    // [num_pages, num_kv_heads, page_size, head_dim]
  const std::byte* values = nullptr;  // same layout
  DType dtype = DType::BF16;
  int num_kv_heads = 0;
  int page_size = 0;
  int head_dim = 0;
  int64_t page_bytes = 0;  // bytes of one page (all heads)
  int64_t head_bytes = 0;  // bytes of one head's slice of a page
  int64_t token_bytes = 0; // bytes of one token of one head

  // Address of head h, position pos, given the owning sequence's page table.
  const std::byte* key(const int32_t* page_table, int h, int64_t pos) const {
    return keys + page_table[pos / page_size] * page_bytes + h * head_bytes + (pos % page_size) * token_bytes;
  }
  const std::byte* value(const int32_t* page_table, int h, int64_t pos) const {
    return values + page_table[pos / page_size] * page_bytes + h * head_bytes + (pos % page_size) * token_bytes;
  }
};

class PagedKVCache {
 public:
  explicit PagedKVCache(const KVCacheConfig& config);

  const KVCacheConfig& config() const { return config_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const { return int64_t(free_list_.size()); }

  SeqId add_sequence();
  // A new sequence holding positions [0, n) of `src`'s sequence `src_seq`, every layer, as
  // stored (no conversion). `src` may be this cache; it must have the same layers, KV heads,
  // head_dim, page_size and dtype. Throws, adding nothing, when they differ or the pages do
  // not fit.
  SeqId add_copy(const PagedKVCache& src, SeqId src_seq, int64_t n);
  // Overwrites positions [pos, pos + n) of `seq`, every layer, with those of `src`'s
  // `src_seq`, as stored. Both must hold those positions; the layouts must match as for add_copy.
  void copy_positions(const PagedKVCache& src, SeqId src_seq, SeqId seq, int64_t pos, int64_t n);
  void free_sequence(SeqId seq);  // returns its pages to the pool
  bool has_sequence(SeqId seq) const;
  int64_t length(SeqId seq) const;

  // Grows `seq` by n positions, taking pages from the pool; returns the first new position.
  // Throws (changing nothing) when the pool cannot hold them. Contents are written per layer.
  int64_t extend(SeqId seq, int64_t n);

  // Stores positions [pos, pos + n) of one layer, converting to the storage type.
  // keys, values: [n, num_kv_heads, head_dim] f32, keys already rotated.
  void write(SeqId seq, int layer, int64_t pos, int64_t n, const float* keys, const float* values);

  // Reads positions [pos, pos + n) of one head back as f32. out: [n, head_dim].
  void read_keys(SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const;
  void read_values(SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const;

  std::span<const int32_t> page_table(SeqId seq) const;
  KVLayerView layer_view(int layer) const;

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  const Sequence& sequence(SeqId seq) const;
  void check_same_layout(const PagedKVCache& src) const;  // throws naming both layouts
  void check_range(const Sequence& s, SeqId seq, int layer, int head, int64_t pos, int64_t n) const;
  void read(const std::byte* pool, SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const;

  KVCacheConfig config_;
  int64_t num_pages_ = 0;
  int64_t page_bytes_ = 0;
  AlignedBuffer storage_;  // [layer][keys|values][page][head][slot][dim]
  std::vector<int32_t> free_list_;
  std::vector<Sequence> sequences_;
};

}  // namespace multipole
