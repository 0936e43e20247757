#include "multipole/eval/comparing_policy.hpp"

#include <limits>

#include "multipole/core/error.hpp"
#include "multipole/eval/metrics.hpp"

namespace multipole::eval {

ComparingPolicy::ComparingPolicy(std::unique_ptr<AttentionPolicy> candidate, int num_layers)
    : AttentionPolicy(candidate->config()),
      candidate_(std::move(candidate)),
      dense_(make_attention_policy("dense", config_)),
      errors_(size_t(num_layers), std::numeric_limits<double>::quiet_NaN()) {
  MP_CHECK(num_layers >= 1, "ComparingPolicy: num_layers {} must be >= 1", num_layers);
}

void ComparingPolicy::update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) {
  candidate_->update(cache, layer, seqs, pool);
  dense_->update(cache, layer, seqs, pool);
}

void ComparingPolicy::decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q,
                             float* out, ThreadPool& pool) {
  MP_CHECK(layer >= 0 && size_t(layer) < errors_.size(), "ComparingPolicy: layer {} outside [0, {})", layer,
           errors_.size());
  const size_t n = seqs.size() * size_t(config_.num_q_heads) * size_t(config_.head_dim);
  if (dense_out_.size() < n) dense_out_.resize(n);
  candidate_->decode(cache, layer, seqs, q, out, pool);
  dense_->decode(cache, layer, seqs, q, dense_out_.data(), pool);
  errors_[size_t(layer)] = relative_error({out, n}, {dense_out_.data(), n});
  stats_ = candidate_->last_stats();
}

void ComparingPolicy::forget(SeqId seq) {
  candidate_->forget(seq);
  dense_->forget(seq);
}

}  // namespace multipole::eval
