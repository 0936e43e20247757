#include "multipole/engine/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "multipole/core/error.hpp"

namespace multipole {

void SamplerConfig::validate() const {
  MP_CHECK(std::isfinite(temperature) && temperature >= 0, "sampler: temperature {} must be finite and >= 0",
           temperature);
  MP_CHECK(top_k >= 0, "sampler: top_k {} must be >= 0 (0: off)", top_k);
  MP_CHECK(top_p > 0 && top_p <= 1, "sampler: top_p {} must be in (0, 1]", top_p);
  MP_CHECK(min_p >= 0 && min_p <= 1, "sampler: min_p {} must be in [0, 1]", min_p);
  MP_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0,
           "sampler: repetition_penalty {} must be finite and > 0 (1: off)", repetition_penalty);
  MP_CHECK(repeat_last_n >= -1, "sampler: repeat_last_n {} must be >= -1 (-1: whole history)", repeat_last_n);
}

Sampler::Sampler(const SamplerConfig& config) : config_(config), rng_(config.seed) { config_.validate(); }

void Sampler::reseed(uint64_t seed) {
  config_.seed = seed;
  rng_.seed(seed);
}

std::vector<TokenProb> Sampler::distribution(std::span<const float> logits, std::span<const int32_t> history) {
  const int64_t V = int64_t(logits.size());
  MP_CHECK(V > 0, "sampler: empty logits");
  work_.assign(logits.begin(), logits.end());
  for (int64_t i = 0; i < V; ++i)
    MP_CHECK(!std::isnan(work_[size_t(i)]), "sampler: logit of token {} is NaN", i);

  // Repetition penalty (HF): each distinct recent token's logit is divided by the penalty
  // when positive, multiplied when negative.
  if (config_.repetition_penalty != 1.0f && !history.empty()) {
    size_t n = config_.repeat_last_n < 0 ? history.size() : std::min(history.size(), size_t(config_.repeat_last_n));
    std::unordered_set<int32_t> seen;
    for (size_t i = history.size() - n; i < history.size(); ++i) {
      int32_t t = history[i];
      if (t < 0 || t >= V || !seen.insert(t).second) continue;
      float& x = work_[size_t(t)];
      x = x > 0 ? x / config_.repetition_penalty : x * config_.repetition_penalty;
    }
  }

  auto better = [&](int32_t a, int32_t b) {
    return work_[size_t(a)] > work_[size_t(b)] || (work_[size_t(a)] == work_[size_t(b)] && a < b);
  };
  if (config_.temperature == 0.0f) {
    int32_t best = 0;
    for (int32_t i = 1; i < V; ++i)
      if (better(i, best)) best = i;
    return {{best, 1.0f}};
  }

  for (float& x : work_) x /= config_.temperature;
  // Candidates sorted most likely first. Only as many as the filters can keep are sorted:
  // top-k bounds them; top-p alone grows the sorted prefix until it holds enough mass.
  order_.resize(size_t(V));
  for (int32_t i = 0; i < V; ++i) order_[size_t(i)] = i;
  int64_t keep = config_.top_k > 0 ? std::min<int64_t>(config_.top_k, V) : V;
  const float max_logit = *std::max_element(work_.begin(), work_.end());
  MP_CHECK(std::isfinite(max_logit), "sampler: the largest logit is {}", max_logit);
  double total = 0;  // softmax normaliser over the kept candidates (before top-p/min-p)
  auto sorted_prefix = [&](int64_t m) {
    m = std::min(m, keep);
    std::partial_sort(order_.begin(), order_.begin() + m, order_.begin() + keep, better);
    return m;
  };
  if (keep < V) std::nth_element(order_.begin(), order_.begin() + keep, order_.end(), better);
  for (int64_t i = 0; i < keep; ++i) total += std::exp(double(work_[size_t(order_[size_t(i)])] - max_logit));

  int64_t sorted = sorted_prefix(std::min<int64_t>(keep, 256));
  // Top-p: the smallest prefix whose mass reaches top_p.
  int64_t cut = keep;
  if (config_.top_p < 1.0f) {
    while (true) {
      double mass = 0;
      int64_t i = 0;
      for (; i < sorted; ++i) {
        mass += std::exp(double(work_[size_t(order_[size_t(i)])] - max_logit)) / total;
        if (mass >= double(config_.top_p)) break;
      }
      if (i < sorted) {
        cut = i + 1;
        break;
      }
      if (sorted == keep) break;  // rounding: the whole set is kept
      sorted = sorted_prefix(sorted * 4);
    }
  }
  // Min-p: relative to the most likely token, whose weight is e^0 = 1 after the shift.
  if (config_.min_p > 0) {
    if (sorted < cut) sorted = sorted_prefix(cut);
    int64_t i = 1;
    while (i < cut && std::exp(double(work_[size_t(order_[size_t(i)])] - max_logit)) >= double(config_.min_p)) ++i;
    cut = i;
  }
  if (sorted < cut) sorted = sorted_prefix(cut);

  std::vector<TokenProb> out(static_cast<size_t>(cut));
  double kept = 0;
  for (int64_t i = 0; i < cut; ++i) kept += std::exp(double(work_[size_t(order_[size_t(i)])] - max_logit));
  for (int64_t i = 0; i < cut; ++i) {
    const int32_t id = order_[size_t(i)];
    out[size_t(i)] = {id, float(std::exp(double(work_[size_t(id)] - max_logit)) / kept)};
  }
  return out;
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> history) {
  const std::vector<TokenProb> d = distribution(logits, history);
  if (config_.temperature == 0.0f) return d[0].id;
  // 53 random bits -> u in [0, 1), portable; drawn even for a single candidate so that the
  // generator's position depends on the step count only.
  const double u = double(rng_() >> 11) * 0x1.0p-53;
  double acc = 0;
  for (const TokenProb& t : d) {
    acc += t.p;
    if (u < acc) return t.id;
  }
  return d.back().id;
}

}  // namespace multipole
