// Dense decode attention: every cached key, exactly. The speed floor the sparse policies
// are measured against, so it is bandwidth-bound by design: one pass over K and V.
#include <algorithm>

#include "attention/cpu_decode_common.hpp"
#include "attention/policies.hpp"

namespace multipole {

namespace {

// Sequences are split into chunks of at least this many tokens when there are fewer
// (sequence, KV head) pairs than threads can use; the partial states are merged after.
constexpr int64_t kMinSplit = 2048;

class DensePolicy final : public AttentionPolicy {
 public:
  explicit DensePolicy(const AttentionConfig& config) : AttentionPolicy(config) {}
  std::string_view name() const override { return "dense"; }

  void update(const PagedKVCache&, int, std::span<const SeqId>, ThreadPool&) override {}
  void forget(SeqId) override {}

  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool& pool) override {
    cpu::check_decode_args(name(), config_, cache, layer, seqs, q, out);
    const int heads = config_.num_kv_heads, G = config_.group_size(), d = config_.head_dim;
    const int64_t B = int64_t(seqs.size());
    const KVLayerView kv = cache.layer_view(layer);
    const float scale = config_.softmax_scale();

    // Work items: a chunk of one sequence, all KV heads (heads inner, so the cache is read
    // in address order). Chunks per sequence so that there are about two items per thread,
    // none shorter than kMinSplit; each item keeps one partial state per head.
    const int64_t want = std::max<int64_t>(1, (2 * pool.size() + B - 1) / std::max<int64_t>(1, B));
    items_.clear();
    starts_.clear();
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = cache.length(seqs[b]);
      total += len;
      const int64_t chunks = std::clamp<int64_t>(len / kMinSplit, 1, want);
      const int64_t step = (len + chunks - 1) / chunks;
      starts_.push_back(items_.size());
      for (int64_t s = 0; s < len; s += step) items_.push_back({int32_t(b), s, std::min(len, s + step)});
    }
    starts_.push_back(items_.size());
    const size_t state_floats = size_t(G) * (d + 2);
    cpu::grow(partial_, items_.size() * heads * state_floats);
    cpu::grow(states_, items_.size() * heads);
    for (size_t i = 0; i < items_.size() * heads; ++i) {
      float* p = partial_.data() + i * state_floats;
      states_[i] = kernels::SoftmaxState{G, d, p, p + G, p + 2 * G};
    }
    tables_.resize(size_t(B));
    for (int64_t b = 0; b < B; ++b) tables_[b] = cache.page_table(seqs[b]).data();

    pool.parallel_for(int64_t(items_.size()), [&](int64_t i, int) {
      const Item& it = items_[size_t(i)];
      kernels::SoftmaxState* st = states_.data() + i * heads;
      for (int h = 0; h < heads; ++h) st[h].reset();
      kernels::attend_range_all_heads(kv, tables_[it.seq], it.begin, it.end, q + int64_t(it.seq) * config_.num_q_heads * d,
                                      scale, st);
    });
    // Merge each (sequence, head)'s chunks into the first and normalise.
    pool.parallel_for(B * heads, [&](int64_t task, int) {
      const int64_t b = task / heads;
      const int h = int(task % heads);
      kernels::SoftmaxState& first = states_[starts_[b] * heads + h];
      for (size_t i = starts_[b] + 1; i < starts_[b + 1]; ++i) kernels::merge(first, states_[i * heads + h]);
      kernels::finalize(first, out + (b * config_.num_q_heads + int64_t(h) * G) * d);
    });
    stats_ = DecodeStats{};
    stats_.exact_tokens = total * heads;
    stats_.bytes_read = stats_.exact_tokens * 2 * kv.token_bytes;
  }

 private:
  struct Item {
    int32_t seq;
    int64_t begin, end;
  };
  std::vector<Item> items_;
  std::vector<size_t> starts_;  // per sequence: its first item; then the item count
  std::vector<float> partial_;
  std::vector<kernels::SoftmaxState> states_;
  std::vector<const int32_t*> tables_;
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_dense_policy(const AttentionConfig& config) {
  return std::make_unique<DensePolicy>(config);
}

}  // namespace multipole
