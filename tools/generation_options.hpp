#pragma once
// What `multipole generate` and `multipole chat` share: the engine and sampler options, the
// run's numbers as JSON, and (with the tokenizer) a chat reply split into thinking and answer.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "multipole/engine/engine.hpp"
#ifdef MULTIPOLE_HAVE_TOKENIZER
#include "multipole/tokenizer/reasoning_split.hpp"
#include "multipole/tokenizer/tokenizer.hpp"
#endif

namespace multipole::cli {

struct GenerationOptions {
  std::string attention = "dense";
  std::string device = "cpu";
  int budget = 128;
  int coarse_budget = 0;
  int rerank_tokens = 0;
  std::vector<int> tokens_per_centroid = ClusterConfig{}.tokens_per_centroid;
  int window = 128;
  int sinks = 10;
  int max_tokens = 256;
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.0f;
  int repeat_last_n = 64;
  uint64_t seed = 0;
  int threads = 0;
  int64_t ctx = 0;
  std::string kv_dtype = "f16";
  std::vector<std::string> stops;
  bool ignore_eos = false;
};

// --attention, --budget, ..., --stop, --ignore-eos.
void add_generation_options(CLI::App& cmd, GenerationOptions& o);
int thread_count(const GenerationOptions& o);  // --threads, 0: all hardware threads
EngineOptions engine_options(const GenerationOptions& o);
GenerationConfig generation_config(const GenerationOptions& o);
// prompt_tokens, generated_tokens, speeds, attention_share and the policy's counters.
void add_stats_json(nlohmann::json& j, const GenerationStats& s);

#ifdef MULTIPOLE_HAVE_TOKENIZER
// Stop at the template's end-of-turn marker and at the models' end markers where the
// vocabulary has them as special tokens.
void add_end_markers(const Tokenizer& tok, std::string_view end_of_turn, GenerationConfig& gc);

// A chat reply split into thinking and answer as it streams, and how many generated tokens
// the thinking took (up to the one that completed "</think>"; all of them if it never closed).
struct ReplySplit {
  explicit ReplySplit(bool starts_in_thinking) : splitter(starts_in_thinking) {}
  void token() { ++tokens_seen; }  // call for each generated token (TextHooks::push)
  void push(std::string_view text);  // the streamed text
  void finish(int64_t generated_tokens);
  int64_t answer_tokens(int64_t generated_tokens) const { return generated_tokens - thinking_tokens; }
  void add_json(nlohmann::json& j, int64_t generated_tokens) const;

  ReasoningSplitter splitter;
  int64_t tokens_seen = 0;
  int64_t thinking_tokens = -1;
};
#endif

}  // namespace multipole::cli
