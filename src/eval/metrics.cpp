#include "multipole/eval/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "multipole/core/error.hpp"

namespace multipole::eval {

namespace {

// max and log(sum exp(x - max)) of a logit vector.
void log_partition(std::span<const float> x, double& max, double& log_sum) {
  max = -std::numeric_limits<double>::infinity();
  for (float v : x) max = std::max(max, double(v));
  double sum = 0;
  for (float v : x) sum += std::exp(double(v) - max);
  log_sum = std::log(sum);
}

}  // namespace

double kl_divergence(std::span<const float> ref_logits, std::span<const float> cand_logits) {
  MP_CHECK(ref_logits.size() == cand_logits.size() && !ref_logits.empty(),
           "kl_divergence: logits of {} and {} entries", ref_logits.size(), cand_logits.size());
  double mr, lr, mc, lc;
  log_partition(ref_logits, mr, lr);
  log_partition(cand_logits, mc, lc);
  double kl = 0;
  for (size_t i = 0; i < ref_logits.size(); ++i) {
    const double lp = double(ref_logits[i]) - mr - lr;  // log P_ref(i)
    const double lq = double(cand_logits[i]) - mc - lc;
    kl += std::exp(lp) * (lp - lq);
  }
  return std::max(0.0, kl);
}

int32_t argmax(std::span<const float> logits) {
  MP_CHECK(!logits.empty(), "argmax: no logits");
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double relative_error(std::span<const float> approx, std::span<const float> exact) {
  MP_CHECK(approx.size() == exact.size(), "relative_error: vectors of {} and {} entries", approx.size(), exact.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    const double d = double(approx[i]) - double(exact[i]);
    diff += d * d;
    norm += double(exact[i]) * double(exact[i]);
  }
  if (norm == 0) return diff == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

}  // namespace multipole::eval
