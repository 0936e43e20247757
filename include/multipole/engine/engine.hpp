#pragma once
// Generation on the CPU: sequences with their own KV pages, prefill then decode, sampling,
// stop conditions (EOS tokens, stop strings, max tokens, the context limit), streaming, and
// what it cost. The engine does not know tokenizers: text comes through TextHooks (e.g. a
// StreamDecoder), so stop strings work whenever the caller can turn tokens into text.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/attention/policy.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/engine/sampler.hpp"
#include "multipole/kv/paged_kv_cache.hpp"
#include "multipole/model/model.hpp"

namespace multipole {

struct EngineOptions {
  std::string attention = "dense";  // dense, multipole, squeezed, quest, oracle-topk
  std::string attention_device = "cpu";  // or a registered device ("cuda": cuda::register_cuda_attention())
  // The policy's knobs (budget, window, clusters, ...). Heads, head_dim and RoPE are
  // overwritten with the model's.
  AttentionConfig attention_config;
  int64_t context_length = 0;  // positions per sequence; 0: the model's context_length
  int max_sequences = 1;       // live sequences at once (the cache holds all of them)
  DType kv_dtype = DType::F16;
  int page_size = 16;
  int prefill_chunk = 256;     // prompt tokens per batched forward
};

struct GenerationConfig {
  int max_tokens = 256;          // tokens to generate at most (>= 1)
  SamplerConfig sampler;
  bool stop_at_eos = true;       // the model's eos_ids (plus extra_eos) end generation
  std::vector<int32_t> extra_eos;
  std::vector<std::string> stop_strings;  // generation ends before the first match (needs TextHooks)
};

enum class FinishReason { Eos, StopString, MaxTokens, ContextLimit, Cancelled };
std::string_view finish_reason_name(FinishReason r);  // "eos", "stop", "length", "context", "cancelled"

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;   // sampled tokens, the EOS included
  double prefill_seconds = 0;     // prompt forward + first sample
  double decode_seconds = 0;      // the decode loop (forwards + sampling)
  int64_t decode_steps = 0;       // decode forwards
  double attention_seconds = 0;   // of both phases: prefill attention, policy update and decode
  DecodeStats policy;             // summed over decode steps and layers
  double prefill_tokens_per_second() const { return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0; }
  double decode_tokens_per_second() const { return decode_seconds > 0 ? decode_steps / decode_seconds : 0; }
  double attention_share() const {
    double t = prefill_seconds + decode_seconds;
    return t > 0 ? attention_seconds / t : 0;
  }
};

struct GenerationResult {
  std::vector<int32_t> tokens;   // generated ids (an ending EOS is not included)
  std::string text;              // with TextHooks: the streamed text (stop string excluded)
  FinishReason finish = FinishReason::MaxTokens;
  std::string stop_string;       // the one that matched, for FinishReason::StopString
  GenerationStats stats;
};

// Turns tokens into text for streaming and stop strings.
struct TextHooks {
  std::function<std::string(int32_t)> push;  // text completed by this token (may be empty)
  std::function<std::string()> flush;        // text still held at the end (may be null)
};

// Called with each piece of text as it becomes final (held back while it could still be the
// start of a stop string) and the token that completed it (-1 for the final flush). Return
// false to stop generation (FinishReason::Cancelled).
using StreamFn = std::function<bool(std::string_view text, int32_t token)>;

// Holds back streamed text that might begin a stop string; reports the first full match.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Appends text; returns what is safe to emit now. After a match, matched() is set and the
  // returned text ends right before the stop string.
  std::string push(std::string_view text);
  std::string flush();  // the held-back text (call when generation ends without a match)
  bool matched() const { return matched_ >= 0; }
  const std::string& match() const;

 private:
  std::vector<std::string> stops_;
  std::string held_;
  int matched_ = -1;
};

class Engine {
 public:
  // Builds the KV cache (max_sequences x context_length positions) and the attention policy.
  // Throws naming the option at fault.
  Engine(Model& model, const EngineOptions& options, ThreadPool& pool);
  ~Engine();

  Model& model() { return model_; }
  AttentionPolicy& policy() { return *policy_; }
  PagedKVCache& cache() { return *cache_; }
  const EngineOptions& options() const { return options_; }
  int64_t context_length() const { return context_; }

  SeqId add_sequence();
  void remove_sequence(SeqId seq);  // frees its pages and the policy's state
  // A new sequence holding the first n positions of `from`'s sequence `seq` (an engine of the
  // same model and KV dtype / page size, e.g. a dense one that prefilled a shared prompt).
  // This engine's policy has not seen it: its next prefill or decode indexes the copy as a
  // fresh prompt, so copy + prefill of the rest builds the index a full prefill builds.
  SeqId add_copy(const Engine& from, SeqId seq, int64_t n);
  int64_t length(SeqId seq) const { return cache_->length(seq); }

  // Appends tokens to `seq` (batched prefill) and returns the logits after the last one,
  // [vocab], valid until the next call. Throws, changing nothing, when the sequence would
  // pass the context limit.
  std::span<const float> prefill(SeqId seq, std::span<const int32_t> tokens);
  // Appends one token and returns the next logits. Throws at the context limit.
  std::span<const float> decode(SeqId seq, int32_t token);

  // Prefills `tokens` onto `seq`, then samples and decodes until a stop condition. The
  // sequence keeps everything it saw except the last sampled token (which was never fed),
  // so a conversation can continue on it.
  GenerationResult generate(SeqId seq, std::span<const int32_t> tokens, const GenerationConfig& config,
                            const TextHooks* hooks = nullptr, const StreamFn& on_text = {});
  // The same on a fresh sequence that is freed afterwards.
  GenerationResult generate(std::span<const int32_t> prompt, const GenerationConfig& config,
                            const TextHooks* hooks = nullptr, const StreamFn& on_text = {});

 private:
  void check_room(SeqId seq, int64_t add, std::string_view what) const;
  Model& model_;
  EngineOptions options_;
  ThreadPool& pool_;
  int64_t context_ = 0;
  std::unique_ptr<PagedKVCache> cache_;
  std::unique_ptr<AttentionPolicy> policy_;
  std::vector<float> logits_;
};

}  // namespace multipole
