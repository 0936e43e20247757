// Oracle top-k: an upper bound on what any selection of `budget` middle keys can do. Every
// middle key is scored exactly; key t's importance for the GQA group is
// sum_g softmax_g(t), the softmax over the middle region per query head; the `budget` most
// important keys (ties to the lower position) are attended exactly with the sinks and the
// local window. Its cost (a full pass over the middle keys) is not the point.
#include <algorithm>
#include <numeric>

#include "attention/cpu_decode_common.hpp"
#include "attention/policies.hpp"

namespace multipole {

namespace {

class OracleTopkPolicy final : public AttentionPolicy {
 public:
  explicit OracleTopkPolicy(const AttentionConfig& config) : AttentionPolicy(config) {}
  std::string_view name() const override { return "oracle-topk"; }

  void update(const PagedKVCache&, int, std::span<const SeqId>, ThreadPool&) override {}  // stateless
  void forget(SeqId) override {}

  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool& pool) override {
    cpu::check_decode_args(name(), config_, cache, layer, seqs, q, out);
    const int heads = config_.num_kv_heads, G = config_.group_size(), d = config_.head_dim;
    const KVLayerView kv = cache.layer_view(layer);
    const float scale = config_.softmax_scale();
    const int64_t budget = config_.budget;
    // Every thread's scratch is sized here, serially, for the largest sequence: which thread
    // runs which task varies, and the parallel part must not allocate.
    const int64_t max_len = cpu::longest_sequence(cache, seqs);
    scratch_.ensure(pool.size());
    for (int i = 0; i < pool.size(); ++i) {
      Scratch& sc = scratch_[i];
      cpu::grow(sc.index, size_t(max_len));
      cpu::grow(sc.logits, size_t(G) * max_len);
      cpu::grow(sc.importance, size_t(max_len));
      cpu::grow(sc.positions, size_t(max_len));
      sc.state.resize(G, d);
    }
    stats_parts_.assign(size_t(pool.size()), DecodeStats{});

    pool.parallel_for(int64_t(seqs.size()) * heads, [&](int64_t task, int thread) {
      const int64_t b = task / heads;
      const int h = int(task % heads);
      Scratch& sc = scratch_[thread];
      DecodeStats& st = stats_parts_[size_t(thread)];
      const int64_t len = cache.length(seqs[b]);
      const int32_t* table = cache.page_table(seqs[b]).data();
      const int64_t sinks = std::min<int64_t>(config_.cluster.sinks, len), middle_end = config_.middle_end(len);
      const int64_t M = middle_end - sinks;
      const float* qg = q + (b * config_.num_q_heads + int64_t(h) * G) * d;

      int32_t* idx = cpu::grow(sc.index, size_t(M));
      std::iota(idx, idx + M, int32_t(sinks));
      int64_t picked = M;
      if (M > budget) {
        float* x = cpu::grow(sc.logits, size_t(G) * M);
        float* imp = cpu::grow(sc.importance, size_t(M));
        kernels::score_range(kv, table, h, sinks, middle_end, qg, G, scale, x);
        cpu::group_importance(x, G, M, imp);
        std::nth_element(idx, idx + budget, idx + M, [imp, sinks](int32_t a, int32_t c) {
          const float ia = imp[a - sinks], ic = imp[c - sinks];
          return ia > ic || (ia == ic && a < c);
        });
        picked = budget;
        std::sort(idx, idx + picked);
        st.bytes_read += M * kv.token_bytes;
      }
      cpu::attend_selected(kv, table, h, sinks, middle_end, len, {idx, size_t(picked)}, qg, G, scale,
                           out + (b * config_.num_q_heads + int64_t(h) * G) * d, sc.state, sc.positions, st);
    });
    stats_ = cpu::sum_stats(stats_parts_);
  }

 private:
  struct Scratch {
    std::vector<float> logits, importance;
    std::vector<int32_t> index, positions;
    kernels::OwnedState state;
  };
  std::vector<DecodeStats> stats_parts_;
  cpu::PerThread<Scratch> scratch_;
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_oracle_topk_policy(const AttentionConfig& config) {
  return std::make_unique<OracleTopkPolicy>(config);
}

}  // namespace multipole
