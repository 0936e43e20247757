#pragma once
// An attention policy that runs a candidate policy and dense attention side by side on the
// same query and cache, records the candidate's relative error per layer, and hands the
// candidate's output on: the model runs exactly as under the candidate alone, and we learn
// how far each layer's attention output was from the exact one along the way.
#include <memory>
#include <span>
#include <vector>

#include "multipole/attention/policy.hpp"

namespace multipole::eval {

class ComparingPolicy final : public AttentionPolicy {
 public:
  // candidate: the policy under test (its config is this policy's config).
  ComparingPolicy(std::unique_ptr<AttentionPolicy> candidate, int num_layers);

  std::string_view name() const override { return candidate_->name(); }
  void update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) override;
  // Candidate output to `out`; dense output to scratch; errors_[layer] = ||o_c - o_d|| / ||o_d||
  // over the whole [B, num_q_heads, head_dim] output.
  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool& pool) override;
  void forget(SeqId seq) override;

  // Relative error of each layer's last decode, [num_layers] (NaN for layers not decoded yet).
  std::span<const double> last_errors() const { return errors_; }
  AttentionPolicy& candidate() { return *candidate_; }

 private:
  std::unique_ptr<AttentionPolicy> candidate_;
  std::unique_ptr<AttentionPolicy> dense_;
  std::vector<float> dense_out_;
  std::vector<double> errors_;
};

}  // namespace multipole::eval
