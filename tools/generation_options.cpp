// Options and outputs shared by `multipole generate` and `multipole chat`.
#include "generation_options.hpp"

#include <algorithm>
#include <thread>

namespace multipole::cli {

void add_generation_options(CLI::App& cmd, GenerationOptions& o) {
  cmd.add_option("--attention", o.attention, "Decode attention: dense, multipole, squeezed, quest, oracle-topk")
      ->capture_default_str();
  cmd.add_option("--device", o.device,
                 "Where decode attention runs: cpu, or cuda (GPU builds: the model stays on the CPU, the policy "
                 "mirrors the KV cache on the GPU; a correctness path, every layer-step copies and waits)")
      ->capture_default_str();
  cmd.add_option("--budget", o.budget, "Tokens per KV head selected beyond sinks + window")->capture_default_str();
  cmd.add_option("--tokens-per-centroid", o.tokens_per_centroid,
                 "Tokens per centroid of each cluster level, finest first, comma separated (multipole, squeezed)")
      ->delimiter(',')
      ->capture_default_str();
  cmd.add_option("--coarse-budget", o.coarse_budget,
                 "Tokens under the coarse clusters whose children are scored, with two levels (0: 16 x the budget)")
      ->capture_default_str();
  cmd.add_option("--rerank-tokens", o.rerank_tokens,
                 "Multipole, squeezed: candidate clusters worth this many tokens are re-ranked by their members' "
                 "exact logits before the budget is filled (0: off; else above --budget; with --device cuda: in the one-launch "
                 "step where it holds (up to 512), else the three-kernel step and one launch more)")
      ->capture_default_str();
  cmd.add_option("--window", o.window, "Local window / update interval W")->capture_default_str();
  cmd.add_option("--sinks", o.sinks, "Attention sink tokens")->capture_default_str();
  cmd.add_option("--max-tokens,-n", o.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd.add_option("--temperature,-t", o.temperature, "Sampling temperature (0: greedy)")->capture_default_str();
  cmd.add_option("--top-k", o.top_k, "Keep the k most likely tokens (0: off)")->capture_default_str();
  cmd.add_option("--top-p", o.top_p, "Nucleus sampling mass (1: off)")->capture_default_str();
  cmd.add_option("--min-p", o.min_p, "Drop tokens below min_p x the top probability (0: off)")->capture_default_str();
  cmd.add_option("--repeat-penalty", o.repeat_penalty, "Repetition penalty (1: off)")->capture_default_str();
  cmd.add_option("--repeat-last-n", o.repeat_last_n, "History the penalty looks at (-1: all)")->capture_default_str();
  cmd.add_option("--seed", o.seed, "Sampling and k-means seed")->capture_default_str();
  cmd.add_option("--threads", o.threads, "Threads (0: all hardware threads)")->capture_default_str();
  cmd.add_option("--ctx", o.ctx, "Context limit in tokens (0: the model's)")->capture_default_str();
  cmd.add_option("--kv-dtype", o.kv_dtype, "KV cache storage: f16, bf16, f32")->capture_default_str();
  cmd.add_option("--stop", o.stops, "Stop string (repeatable)");
  cmd.add_flag("--ignore-eos", o.ignore_eos, "Do not stop at end-of-sequence tokens");
}

int thread_count(const GenerationOptions& o) {
  return o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));
}

EngineOptions engine_options(const GenerationOptions& o) {
  EngineOptions eo;
  eo.attention = o.attention;
  eo.attention_device = o.device;
  eo.attention_config.budget = o.budget;
  eo.attention_config.coarse_budget = o.coarse_budget;
  eo.attention_config.rerank_tokens = o.rerank_tokens;
  eo.attention_config.cluster.tokens_per_centroid = o.tokens_per_centroid;
  eo.attention_config.cluster.window = o.window;
  eo.attention_config.cluster.sinks = o.sinks;
  eo.attention_config.cluster.seed = o.seed;
  eo.context_length = o.ctx;
  eo.kv_dtype = parse_dtype(o.kv_dtype, "--kv-dtype");
  return eo;
}

GenerationConfig generation_config(const GenerationOptions& o) {
  GenerationConfig gc;
  gc.max_tokens = o.max_tokens;
  gc.sampler.temperature = o.temperature;
  gc.sampler.top_k = o.top_k;
  gc.sampler.top_p = o.top_p;
  gc.sampler.min_p = o.min_p;
  gc.sampler.repetition_penalty = o.repeat_penalty;
  gc.sampler.repeat_last_n = o.repeat_last_n;
  gc.sampler.seed = o.seed;
  gc.stop_at_eos = !o.ignore_eos;
  gc.stop_strings = o.stops;
  return gc;
}

void add_stats_json(nlohmann::json& j, const GenerationStats& s) {
  j["prompt_tokens"] = s.prompt_tokens;
  j["generated_tokens"] = s.generated_tokens;
  j["prefill_seconds"] = s.prefill_seconds;
  j["decode_seconds"] = s.decode_seconds;
  j["prefill_tokens_per_second"] = s.prefill_tokens_per_second();
  j["decode_tokens_per_second"] = s.decode_tokens_per_second();
  j["attention_share"] = s.attention_share();
  j["policy"] = {{"exact_tokens", s.policy.exact_tokens},
                 {"selected_tokens", s.policy.selected_tokens},
                 {"centroids_scored", s.policy.centroids_scored},
                 {"pseudo_tokens", s.policy.pseudo_tokens},
                 {"bytes_read", s.policy.bytes_read}};
}

#ifdef MULTIPOLE_HAVE_TOKENIZER
void add_end_markers(const Tokenizer& tok, std::string_view end_of_turn, GenerationConfig& gc) {
  if (!end_of_turn.empty())
    if (auto id = tok.token_id(end_of_turn)) gc.extra_eos.push_back(*id);
  for (std::string_view end : {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"})
    if (auto id = tok.token_id(end); id && tok.is_special(*id)) gc.extra_eos.push_back(*id);
}

void ReplySplit::push(std::string_view text) {
  const bool was_closed = splitter.closed_thinking();
  splitter.push(text);
  if (!was_closed && splitter.closed_thinking()) thinking_tokens = tokens_seen;
}

void ReplySplit::finish(int64_t generated_tokens) {
  splitter.flush();
  if (thinking_tokens < 0) thinking_tokens = splitter.saw_thinking() ? generated_tokens : 0;
}

void ReplySplit::add_json(nlohmann::json& j, int64_t generated_tokens) const {
  j["thinking"] = splitter.thinking();
  j["answer"] = splitter.answer();
  j["thinking_tokens"] = thinking_tokens;
  j["answer_tokens"] = answer_tokens(generated_tokens);
}
#endif

}  // namespace multipole::cli
