#pragma once
// Device mirror of a PagedKVCache: the same page pools ([num_pages, num_kv_heads, page_size,
// head_dim] per layer for keys and for values, bf16 or f16) and the same page tables, in GPU
// memory. The host cache stays the page allocator; the mirror copies page tables (small) and
// never the cache contents once uploaded: new tokens are written on the device (append).
#include <cstdint>
#include <span>
#include <vector>

#include "multipole/cuda/runtime.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole::cuda {

// What a kernel needs to address one layer of the device cache. Plain data.
struct DeviceKVLayer {
  const std::byte* keys = nullptr;    // [num_pages, num_kv_heads, page_size, head_dim]
  const std::byte* values = nullptr;  // same layout
  DType dtype = DType::BF16;
  int num_kv_heads = 0;
  int page_size = 0;
  int head_dim = 0;
  const int32_t* tables = nullptr;        // page tables of all sequences, concatenated
  const int64_t* table_offset = nullptr;  // [max_sequences] start of sequence s's table
  const int32_t* lengths = nullptr;       // [max_sequences] tokens cached per sequence
};

class DeviceKVCache {
 public:
  // Pools for config.max_tokens tokens (same pages as a PagedKVCache with this config);
  // dtype must be bf16 or f16. Sequence ids must stay below max_sequences.
  explicit DeviceKVCache(const KVCacheConfig& config, int max_sequences = 256);

  const KVCacheConfig& config() const { return config_; }
  int64_t num_pages() const { return num_pages_; }
  int max_sequences() const { return max_sequences_; }

  // Copies every layer's pools and the page tables and lengths of all live sequences of
  // `cpu`, whose config must match. Synchronous.
  void upload(const PagedKVCache& cpu);
  // Copies the pages that hold positions [begin, end) of `seq` in `layer` of `cpu` (keys and
  // values; whole pages, runs of consecutive pages in one copy). Tables are not touched: call
  // sync_tables() too. Synchronous.
  void upload_tokens(const PagedKVCache& cpu, int layer, SeqId seq, int64_t begin, int64_t end);
  // Page tables and lengths only (after cpu.extend()); copies only what changed.
  void sync_tables(const PagedKVCache& cpu);
  // For callers that manage pages themselves: sequence `seq` holds `length` tokens in `pages`.
  void set_sequence(SeqId seq, std::span<const int32_t> pages, int64_t length);
  // Uploads the table edits made by set_sequence/sync_tables (called by both).
  void flush_tables();

  // Writes one token per sequence at position length-1 of `layer` (the host has extended the
  // sequence and synced its table). seqs: [batch] device int32 sequence ids;
  // keys, values: [batch, num_kv_heads, head_dim] f32 device, keys already rotated.
  void append(int layer, const int32_t* seqs, int batch, const float* keys, const float* values, Stream stream) const;

  DeviceKVLayer layer(int layer) const;
  // Raw pools of one layer (num_pages * page_bytes bytes each), e.g. to fill benchmarks.
  std::byte* key_pool(int layer) const;
  std::byte* value_pool(int layer) const;
  int64_t pool_bytes() const { return num_pages_ * page_bytes_; }
  int64_t host_length(SeqId seq) const;

 private:
  // Throws unless `cpu` has this mirror's layout (layers, heads, dim, page size, dtype, pages).
  void check_mirrors(const PagedKVCache& cpu) const;

  KVCacheConfig config_;
  int max_sequences_ = 0;
  int64_t num_pages_ = 0;
  int64_t page_bytes_ = 0;
  DeviceBuffer pools_;  // [layer][keys|values][page][head][slot][dim]
  // Host copies of the tables; each sequence owns a slice [offset, offset + capacity).
  std::vector<std::vector<int32_t>> host_tables_;
  std::vector<int64_t> host_offset_, host_capacity_;
  std::vector<int32_t> host_lengths_;
  std::vector<int64_t> dirty_from_;  // first table entry not yet on the device, per sequence
  bool relayout_ = true;
  DeviceBuffer tables_, table_offset_, lengths_;
};

}  // namespace multipole::cuda
