#include "multipole/kv/paged_kv_cache.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "multipole/core/error.hpp"

namespace multipole {

PagedKVCache::PagedKVCache(const KVCacheConfig& config) : config_(config) {
  const auto& c = config_;
  MP_CHECK(c.num_layers > 0, "kv cache: num_layers {} must be > 0", c.num_layers);
  MP_CHECK(c.num_kv_heads > 0, "kv cache: num_kv_heads {} must be > 0", c.num_kv_heads);
  MP_CHECK(c.head_dim > 0 && c.head_dim % 8 == 0, "kv cache: head_dim {} must be a positive multiple of 8", c.head_dim);
  MP_CHECK(c.page_size > 0 && c.page_size <= 4096, "kv cache: page_size {} must be in [1, 4096]", c.page_size);
  MP_CHECK(c.max_tokens > 0, "kv cache: max_tokens {} must be > 0", c.max_tokens);
  num_pages_ = (c.max_tokens + c.page_size - 1) / c.page_size;
  MP_CHECK(num_pages_ <= std::numeric_limits<int32_t>::max(), "kv cache: {} pages exceed the int32 page id limit", num_pages_);
  page_bytes_ = int64_t(c.num_kv_heads) * c.page_size * c.head_dim * int64_t(dtype_size(c.dtype));
  storage_ = AlignedBuffer(size_t(c.num_layers) * 2 * size_t(num_pages_) * size_t(page_bytes_));
  free_list_.resize(num_pages_);
  // Hand out low page ids first (free_list_ is used as a stack).
  for (int64_t i = 0; i < num_pages_; ++i) free_list_[i] = int32_t(num_pages_ - 1 - i);
}

SeqId PagedKVCache::add_sequence() {
  for (size_t i = 0; i < sequences_.size(); ++i)
    if (!sequences_[i].live) {
      sequences_[i] = Sequence{true, 0, {}};
      return SeqId(i);
    }
  sequences_.push_back(Sequence{true, 0, {}});
  return SeqId(sequences_.size() - 1);
}

void PagedKVCache::check_same_layout(const PagedKVCache& src) const {
  const KVCacheConfig& a = config_;
  const KVCacheConfig& b = src.config_;
  MP_CHECK(a.num_layers == b.num_layers && a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim &&
               a.page_size == b.page_size && a.dtype == b.dtype,
           "kv cache: cannot copy a sequence of a cache with {} layers x {} KV heads x dim {}, pages of {}, {} into "
           "one with {} x {} x {}, pages of {}, {}",
           b.num_layers, b.num_kv_heads, b.head_dim, b.page_size, dtype_name(b.dtype), a.num_layers, a.num_kv_heads,
           a.head_dim, a.page_size, dtype_name(a.dtype));
}

SeqId PagedKVCache::add_copy(const PagedKVCache& src, SeqId src_seq, int64_t n) {
  check_same_layout(src);
  const int64_t src_length = src.length(src_seq);
  MP_CHECK(n >= 0 && n <= src_length, "kv cache: cannot copy {} positions of sequence {} of length {}", n, src_seq,
           src_length);
  const SeqId seq = add_sequence();
  try {
    extend(seq, n);
  } catch (...) {
    free_sequence(seq);
    throw;
  }
  copy_positions(src, src_seq, seq, 0, n);
  return seq;
}

void PagedKVCache::copy_positions(const PagedKVCache& src, SeqId src_seq, SeqId seq, int64_t pos, int64_t n) {
  check_same_layout(src);
  const Sequence& from = src.sequence(src_seq);
  const Sequence& to = sequence(seq);
  MP_CHECK(pos >= 0 && n >= 0 && pos + n <= from.length && pos + n <= to.length,
           "kv cache: cannot copy positions [{}, {}) of sequence {} (length {}) into sequence {} (length {})", pos,
           pos + n, src_seq, from.length, seq, to.length);
  const int64_t P = config_.page_size;
  for (int l = 0; l < config_.num_layers; ++l) {
    const KVLayerView from_view = src.layer_view(l), to_view = layer_view(l);
    for (const auto& [from_pool, to_pool] : {std::pair{from_view.keys, to_view.keys}, {from_view.values, to_view.values}})
      // Runs of positions within one page, one head at a time: a head's tokens are contiguous in a page.
      for (int64_t p = pos; p < pos + n;) {
        const int64_t run = std::min(pos + n - p, P - p % P);
        const int64_t offset = (p % P) * to_view.token_bytes;
        for (int h = 0; h < config_.num_kv_heads; ++h)
          // memmove: `src` may be this cache.
          std::memmove(const_cast<std::byte*>(to_pool) + to.pages[size_t(p / P)] * page_bytes_ + h * to_view.head_bytes +
                           offset,
                       from_pool + from.pages[size_t(p / P)] * page_bytes_ + h * from_view.head_bytes + offset,
                       size_t(run * to_view.token_bytes));
        p += run;
      }
  }
}

const PagedKVCache::Sequence& PagedKVCache::sequence(SeqId seq) const {
  MP_CHECK(has_sequence(seq), "kv cache: sequence {} does not exist", seq);
  return sequences_[seq];
}

bool PagedKVCache::has_sequence(SeqId seq) const {
  return seq >= 0 && size_t(seq) < sequences_.size() && sequences_[seq].live;
}

void PagedKVCache::free_sequence(SeqId seq) {
  sequence(seq);
  auto& s = sequences_[seq];
  for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) free_list_.push_back(*it);
  s = Sequence{};
}

int64_t PagedKVCache::length(SeqId seq) const { return sequence(seq).length; }

std::span<const int32_t> PagedKVCache::page_table(SeqId seq) const { return sequence(seq).pages; }

int64_t PagedKVCache::extend(SeqId seq, int64_t n) {
  sequence(seq);
  MP_CHECK(n >= 0, "kv cache: cannot extend sequence {} by {} positions", seq, n);
  auto& s = sequences_[seq];
  int64_t needed_pages = (s.length + n + config_.page_size - 1) / config_.page_size - int64_t(s.pages.size());
  MP_CHECK(needed_pages <= free_pages(),
           "kv cache full: sequence {} needs {} more pages of {} tokens, {} of {} are free (max_tokens {})", seq,
           needed_pages, config_.page_size, free_pages(), num_pages_, config_.max_tokens);
  for (int64_t i = 0; i < needed_pages; ++i) {
    s.pages.push_back(free_list_.back());
    free_list_.pop_back();
  }
  int64_t first = s.length;
  s.length += n;
  return first;
}

void PagedKVCache::check_range(const Sequence& s, SeqId seq, int layer, int head, int64_t pos, int64_t n) const {
  MP_CHECK(layer >= 0 && layer < config_.num_layers, "kv cache: layer {} out of range [0, {})", layer, config_.num_layers);
  MP_CHECK(head >= 0 && head < config_.num_kv_heads, "kv cache: kv head {} out of range [0, {})", head, config_.num_kv_heads);
  MP_CHECK(pos >= 0 && n >= 0 && pos + n <= s.length, "kv cache: positions [{}, {}) outside sequence {} of length {}", pos,
           pos + n, seq, s.length);
}

KVLayerView PagedKVCache::layer_view(int layer) const {
  MP_CHECK(layer >= 0 && layer < config_.num_layers, "kv cache: layer {} out of range [0, {})", layer, config_.num_layers);
  KVLayerView v;
  const std::byte* base = storage_.data() + size_t(layer) * 2 * size_t(num_pages_) * size_t(page_bytes_);
  v.keys = base;
  v.values = base + size_t(num_pages_) * size_t(page_bytes_);
  v.dtype = config_.dtype;
  v.num_kv_heads = config_.num_kv_heads;
  v.page_size = config_.page_size;
  v.head_dim = config_.head_dim;
  v.page_bytes = page_bytes_;
  v.token_bytes = int64_t(config_.head_dim) * int64_t(dtype_size(config_.dtype));
  v.head_bytes = v.token_bytes * config_.page_size;
  return v;
}

void PagedKVCache::write(SeqId seq, int layer, int64_t pos, int64_t n, const float* keys, const float* values) {
  const auto& s = sequence(seq);
  check_range(s, seq, layer, 0, pos, n);
  KVLayerView v = layer_view(layer);
  const int d = config_.head_dim, heads = config_.num_kv_heads;
  for (int64_t t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h) {
      size_t src = (size_t(t) * heads + h) * d;
      convert_from_f32(keys + src, v.dtype, const_cast<std::byte*>(v.key(s.pages.data(), h, pos + t)), d);
      convert_from_f32(values + src, v.dtype, const_cast<std::byte*>(v.value(s.pages.data(), h, pos + t)), d);
    }
}

void PagedKVCache::read(const std::byte* pool, SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const {
  const auto& s = sequence(seq);
  check_range(s, seq, layer, head, pos, n);
  KVLayerView v = layer_view(layer);
  for (int64_t t = 0; t < n;) {
    int64_t p = pos + t;
    int64_t run = std::min<int64_t>(n - t, config_.page_size - p % config_.page_size);
    const std::byte* src = pool + s.pages[p / v.page_size] * v.page_bytes + head * v.head_bytes + (p % v.page_size) * v.token_bytes;
    convert_to_f32(src, v.dtype, out + t * v.head_dim, size_t(run) * v.head_dim);
    t += run;
  }
}

void PagedKVCache::read_keys(SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const {
  read(layer_view(layer).keys, seq, layer, head, pos, n, out);
}
void PagedKVCache::read_values(SeqId seq, int layer, int head, int64_t pos, int64_t n, float* out) const {
  read(layer_view(layer).values, seq, layer, head, pos, n, out);
}

}  // namespace multipole
