#pragma once
// Next-token sampling from logits: repetition penalty, then temperature, top-k, top-p and
// min-p (in that order, as Hugging Face and llama.cpp apply them), then a draw from the
// renormalised distribution with an explicitly seeded generator. temperature == 0 is greedy
// (the argmax of the penalised logits). Same seed, same logits, same history: same token, on
// every platform (the generator and the uniform draw are spelled out, not std::*_distribution).
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace multipole {

struct SamplerConfig {
  float temperature = 0.0f;        // 0: greedy
  int top_k = 0;                   // keep the k most likely; 0: all
  float top_p = 1.0f;              // keep the smallest most-likely set with mass >= top_p; 1: all
  float min_p = 0.0f;              // keep tokens with p >= min_p * p_max; 0: all
  float repetition_penalty = 1.0f; // > 1 discourages tokens in the recent history (HF rule)
  int repeat_last_n = 64;          // how much history the penalty looks at; -1: all of it
  uint64_t seed = 0;

  // Throws naming the field and its allowed range.
  void validate() const;
};

struct TokenProb {
  int32_t id;
  float p;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& config);
  const SamplerConfig& config() const { return config_; }

  // The distribution the next draw is made from: the kept tokens with their renormalised
  // probabilities, most likely first (ties by lower id). Greedy: the argmax alone, p = 1.
  //   logits: [vocab] (not modified); history: tokens so far (for the repetition penalty)
  std::vector<TokenProb> distribution(std::span<const float> logits, std::span<const int32_t> history);
  // Draws the next token (advances the generator once unless greedy).
  int32_t sample(std::span<const float> logits, std::span<const int32_t> history);
  // Restarts the generator from `seed`.
  void reseed(uint64_t seed);

 private:
  SamplerConfig config_;
  std::mt19937_64 rng_;
  std::vector<float> work_;        // penalised, scaled logits
  std::vector<int32_t> order_;     // candidate ids
};

}  // namespace multipole
