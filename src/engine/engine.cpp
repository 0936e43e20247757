#include "multipole/engine/engine.hpp"

#include <algorithm>
#include <chrono>

#include "multipole/core/error.hpp"

namespace multipole {

std::string_view finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Eos: return "eos";
    case FinishReason::StopString: return "stop";
    case FinishReason::MaxTokens: return "length";
    case FinishReason::ContextLimit: return "context";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "?";
}

// ----------------------------------------------------------------------------- StopMatcher

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) MP_CHECK(!s.empty(), "stop strings must not be empty");
}

const std::string& StopMatcher::match() const {
  MP_CHECK(matched_ >= 0, "StopMatcher: no stop string matched");
  return stops_[size_t(matched_)];
}

std::string StopMatcher::push(std::string_view text) {
  if (matched_ >= 0) return {};
  held_.append(text);
  // The earliest match wins (then the longest at that place).
  size_t best = std::string::npos;
  for (size_t i = 0; i < stops_.size(); ++i) {
    size_t at = held_.find(stops_[i]);
    if (at != std::string::npos &&
        (best == std::string::npos || at < best || (at == best && stops_[i].size() > stops_[size_t(matched_)].size()))) {
      best = at;
      matched_ = int(i);
    }
  }
  if (matched_ >= 0) {
    std::string out = held_.substr(0, best);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  std::string out;
  out.swap(held_);
  return out;
}

// ----------------------------------------------------------------------------------- Engine

Engine::Engine(Model& model, const EngineOptions& options, ThreadPool& pool)
    : model_(model), options_(options), pool_(pool) {
  const ModelConfig& c = model.config();
  MP_CHECK(options.max_sequences >= 1 && options.max_sequences <= 4096, "engine: max_sequences {} must be in [1, 4096]",
           options.max_sequences);
  MP_CHECK(options.context_length >= 0, "engine: context_length {} must be >= 0 (0: the model's {})",
           options.context_length, c.context_length);
  context_ = options.context_length > 0 ? options.context_length : c.context_length;
  MP_CHECK(context_ <= int64_t(1) << 24, "engine: context length {} exceeds the limit {}", context_, int64_t(1) << 24);
  model.set_prefill_chunk(options.prefill_chunk);

  AttentionConfig ac = options.attention_config;
  const AttentionConfig shape = model.attention_config();
  ac.num_q_heads = shape.num_q_heads;
  ac.num_kv_heads = shape.num_kv_heads;
  ac.head_dim = shape.head_dim;
  ac.rope = shape.rope;
  policy_ = make_attention_policy(options.attention, ac, options.attention_device);
  cache_ = std::make_unique<PagedKVCache>(
      model.kv_cache_config(context_ * options.max_sequences, options.kv_dtype, options.page_size));
  logits_.resize(size_t(c.vocab_size));
}

Engine::~Engine() = default;

SeqId Engine::add_sequence() { return cache_->add_sequence(); }

SeqId Engine::add_copy(const Engine& from, SeqId seq, int64_t n) {
  MP_CHECK(&from.model_ == &model_, "engine: cannot copy a sequence from an engine of another model");
  MP_CHECK(n <= context_, "engine: a copy of {} positions would pass the context limit of {} tokens", n, context_);
  return cache_->add_copy(*from.cache_, seq, n);
}

void Engine::remove_sequence(SeqId seq) {
  policy_->forget(seq);
  cache_->free_sequence(seq);
}

void Engine::check_room(SeqId seq, int64_t add, std::string_view what) const {
  const int64_t have = cache_->length(seq);
  MP_CHECK(have + add <= context_,
           "{} of {} token(s) on a sequence holding {} would pass the context limit of {} tokens{}", what, add, have,
           context_,
           context_ == model_.config().context_length ? " (the model's context_length)" : " (--ctx / context_length)");
}

std::span<const float> Engine::prefill(SeqId seq, std::span<const int32_t> tokens) {
  MP_CHECK(!tokens.empty(), "engine: prefill of no tokens");
  check_room(seq, int64_t(tokens.size()), "a prompt");
  model_.prefill(*cache_, seq, tokens, *policy_, pool_, logits_.data());
  return logits_;
}

std::span<const float> Engine::decode(SeqId seq, int32_t token) {
  check_room(seq, 1, "decoding");
  const SeqId seqs[1] = {seq};
  const int32_t toks[1] = {token};
  model_.decode(*cache_, seqs, toks, *policy_, pool_, logits_.data());
  return logits_;
}

GenerationResult Engine::generate(std::span<const int32_t> prompt, const GenerationConfig& config,
                                  const TextHooks* hooks, const StreamFn& on_text) {
  const SeqId seq = add_sequence();
  try {
    GenerationResult r = generate(seq, prompt, config, hooks, on_text);
    remove_sequence(seq);
    return r;
  } catch (...) {
    remove_sequence(seq);
    throw;
  }
}

GenerationResult Engine::generate(SeqId seq, std::span<const int32_t> tokens, const GenerationConfig& config,
                                  const TextHooks* hooks, const StreamFn& on_text) {
  using Clock = std::chrono::steady_clock;
  MP_CHECK(config.max_tokens >= 1, "generate: max_tokens {} must be >= 1", config.max_tokens);
  MP_CHECK(config.stop_strings.empty() || (hooks && hooks->push),
           "generate: stop strings need a way to turn tokens into text (no tokenizer)");
  Sampler sampler(config.sampler);
  StopMatcher stops(config.stop_strings);
  std::vector<int32_t> eos;
  if (config.stop_at_eos) {
    eos = model_.config().eos_ids;
    eos.insert(eos.end(), config.extra_eos.begin(), config.extra_eos.end());
  }
  // The penalty's history: what the sequence saw in this call and what it generates.
  std::vector<int32_t> history(tokens.begin(), tokens.end());

  GenerationResult r;
  const ForwardStats before = model_.stats();
  auto t0 = Clock::now();
  std::span<const float> logits = prefill(seq, tokens);
  r.stats.prompt_tokens = int64_t(tokens.size());

  bool cancelled = false;
  auto emit = [&](std::string_view text, int32_t token) {
    if (text.empty()) return;
    r.text.append(text);
    if (on_text && !on_text(text, token)) cancelled = true;
  };
  bool first = true;
  while (true) {
    const int32_t t = sampler.sample(logits, history);
    if (first) {
      r.stats.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      t0 = Clock::now();
      first = false;
    }
    ++r.stats.generated_tokens;
    if (std::find(eos.begin(), eos.end(), t) != eos.end()) {
      r.finish = FinishReason::Eos;
      break;
    }
    r.tokens.push_back(t);
    history.push_back(t);
    if (hooks && hooks->push) {
      std::string piece = hooks->push(t);
      emit(config.stop_strings.empty() ? piece : stops.push(piece), t);
      if (stops.matched()) {
        r.finish = FinishReason::StopString;
        r.stop_string = stops.match();
        break;
      }
    } else if (on_text) {
      if (!on_text({}, t)) cancelled = true;
    }
    if (cancelled) {
      r.finish = FinishReason::Cancelled;
      break;
    }
    if (int64_t(r.tokens.size()) >= config.max_tokens) {
      r.finish = FinishReason::MaxTokens;
      break;
    }
    if (length(seq) >= context_) {
      r.finish = FinishReason::ContextLimit;
      break;
    }
    logits = decode(seq, t);
    ++r.stats.decode_steps;
  }
  if (r.stats.decode_steps > 0 || !first)
    r.stats.decode_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (hooks && r.finish != FinishReason::StopString && r.finish != FinishReason::Cancelled) {
    std::string tail = hooks->flush ? hooks->flush() : std::string();
    if (!config.stop_strings.empty()) {
      tail = stops.push(tail);
      if (stops.matched()) {
        r.finish = FinishReason::StopString;
        r.stop_string = stops.match();
      } else {
        tail += stops.flush();
      }
    }
    emit(tail, -1);
  }
  const ForwardStats& after = model_.stats();
  r.stats.attention_seconds = after.attention_seconds - before.attention_seconds;
  r.stats.policy.exact_tokens = after.policy.exact_tokens - before.policy.exact_tokens;
  r.stats.policy.selected_tokens = after.policy.selected_tokens - before.policy.selected_tokens;
  r.stats.policy.centroids_scored = after.policy.centroids_scored - before.policy.centroids_scored;
  r.stats.policy.pseudo_tokens = after.policy.pseudo_tokens - before.policy.pseudo_tokens;
  r.stats.policy.bytes_read = after.policy.bytes_read - before.policy.bytes_read;
  return r;
}

}  // namespace multipole
