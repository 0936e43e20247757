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

    // Work items: (sequence, head, chunk). Chunks per sequence so that there are about
    // two items per thread, none shorter than kMinSplit.
    const int64_t pairs = B * heads;
    const int64_t want = std::max<int64_t>(1, (2 * pool.size() + pairs - 1) / std::max<int64_t>(1, pairs));
    items_.clear();
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = cache.length(seqs[b]);
      total += len;
      const int64_t chunks = std::clamp<int64_t>(len / kMinSplit, 1, want);
      const int64_t step = (len + chunks - 1) / chunks;
      for (int h = 0; h < heads; ++h)
        for (int64_t s = 0; s < len; s += step) items_.push_back({int32_t(b), h, s, std::min(len, s + step)});
    }
    const bool split = int64_t(items_.size()) > pairs;
    const size_t state_floats = size_t(G) * (d + 2);
    if (split) cpu::grow(partial_, items_.size() * state_floats);
    tables_.resize(size_t(B));
    for (int64_t b = 0; b < B; ++b) tables_[b] = cache.page_table(seqs[b]).data();
    scratch_.ensure(pool.size());

    pool.parallel_for(int64_t(items_.size()), [&](int64_t i, int thread) {
      const Item& it = items_[size_t(i)];
      const float* qg = q + (int64_t(it.seq) * config_.num_q_heads + int64_t(it.head) * G) * d;
      kernels::SoftmaxState st;
      if (split) {
        float* p = partial_.data() + size_t(i) * state_floats;
        st = kernels::SoftmaxState{G, d, p, p + G, p + 2 * G};
      } else {
        st = scratch_[thread].resize(G, d);
      }
      st.reset();
      kernels::attend_range(kv, tables_[it.seq], it.head, it.begin, it.end, qg, scale, st);
      if (!split) kernels::finalize(st, out + (int64_t(it.seq) * config_.num_q_heads + int64_t(it.head) * G) * d);
    });
    if (split) {
      // Items of one (sequence, head) are consecutive; merge them into the first.
      starts_.clear();
      for (size_t i = 0; i < items_.size(); ++i)
        if (i == 0 || items_[i].seq != items_[i - 1].seq || items_[i].head != items_[i - 1].head) starts_.push_back(i);
      starts_.push_back(items_.size());
      pool.parallel_for(int64_t(starts_.size()) - 1, [&](int64_t k, int) {
        auto state_at = [&](size_t i) {
          float* p = partial_.data() + i * state_floats;
          return kernels::SoftmaxState{G, d, p, p + G, p + 2 * G};
        };
        kernels::SoftmaxState first = state_at(starts_[k]);
        for (size_t i = starts_[k] + 1; i < starts_[k + 1]; ++i) kernels::merge(first, state_at(i));
        const Item& it = items_[starts_[k]];
        kernels::finalize(first, out + (int64_t(it.seq) * config_.num_q_heads + int64_t(it.head) * G) * d);
      });
    }
    stats_ = DecodeStats{};
    stats_.exact_tokens = total * heads;
    stats_.bytes_read = stats_.exact_tokens * 2 * kv.token_bytes;
  }

 private:
  struct Item {
    int32_t seq;
    int head;
    int64_t begin, end;
  };
  std::vector<Item> items_;
  std::vector<size_t> starts_;
  std::vector<float> partial_;
  std::vector<const int32_t*> tables_;
  cpu::PerThread<kernels::OwnedState> scratch_;
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_dense_policy(const AttentionConfig& config) {
  return std::make_unique<DensePolicy>(config);
}

}  // namespace multipole
