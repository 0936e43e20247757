// `multipole chat --model PATH`: a conversation on stdin/stdout. Each input line is a user
// turn; the whole conversation is rendered with the checkpoint's chat template and only the
// tokens past what the engine's sequence already holds are fed, so the sequence (its KV cache
// and the attention policy's state) carries over from turn to turn. When the new rendering
// does not start with what was fed (e.g. Qwen3 drops the reasoning of earlier turns) the
// conversation is prefilled again on a fresh sequence. Replies stream to stdout, per-turn
// numbers go to stderr; --json prints one JSON object per turn, one a line, instead.
// "/exit" or the end of input ends; "/reset" starts a new conversation.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "generation_options.hpp"
#include "multipole/core/error.hpp"
#include "multipole/engine/engine.hpp"
#include "multipole/model/model.hpp"
#include "multipole/tokenizer/chat_template.hpp"
#include "multipole/tokenizer/checkpoint.hpp"
#include "multipole/tokenizer/reasoning_split.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

namespace multipole::cli {

namespace {

using json = nlohmann::json;

struct ChatArgs : GenerationOptions {
  std::string model;
  std::string system;
  bool no_think = false;
  bool json = false;
};

void run_chat(const ChatArgs& a) {
  std::unique_ptr<Model> model = Model::load(a.model);
  const ModelConfig& mc = model->config();
  const Tokenizer tok = checkpoint_tokenizer(model->path(), model->gguf());
  const ChatTemplate tmpl =
      ChatTemplate::detect(checkpoint_chat_template(model->path(), model->gguf()), mc.architecture);
  const int threads = thread_count(a);
  ThreadPool pool(threads);
  Engine engine(*model, engine_options(a), pool);
  GenerationConfig gc = generation_config(a);
  add_end_markers(tok, tmpl.end_of_turn(), gc);

  std::vector<ChatMessage> messages;
  std::vector<int32_t> fed;  // the tokens the sequence holds
  SeqId seq = engine.add_sequence();
  int turn = 0;
  auto restart = [&](bool forget_messages) {
    engine.remove_sequence(seq);
    seq = engine.add_sequence();
    fed.clear();
    if (!forget_messages) return;
    messages.clear();
    if (!a.system.empty()) messages.push_back({"system", a.system});
    turn = 0;
  };
  if (!a.system.empty()) messages.push_back({"system", a.system});
  const bool interactive = ::isatty(0) && !a.json;
  if (interactive)
    std::fprintf(stderr, "[%s, %s chat template, %s attention%s] /exit ends, /reset starts over\n",
                 mc.architecture.c_str(), std::string(tmpl.style_name()).c_str(), a.attention.c_str(),
                 a.device == "cpu" ? "" : (" on " + a.device).c_str());

  std::string line;
  while (true) {
    if (interactive) {
      std::fputs("> ", stderr);
      std::fflush(stderr);
    }
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "/exit") break;
    if (line == "/reset") {
      restart(true);
      if (!a.json) std::fputs("[new conversation]\n", stderr);
      continue;
    }
    if (line.empty()) continue;
    ++turn;
    messages.push_back({"user", line});
    const std::string rendered = tmpl.render(messages, true, !a.no_think);
    const std::vector<int32_t> ids = tok.encode(rendered, {.add_special = false, .parse_special = true});
    // Continue the sequence when what it holds begins the new prompt; else start it again.
    const bool continues = fed.size() < ids.size() && std::equal(fed.begin(), fed.end(), ids.begin());
    const bool reprefill = !fed.empty() && !continues;
    if (reprefill) restart(false);
    const size_t reused = fed.size();

    StreamDecoder stream(tok, DecodeOptions{.skip_special = false});
    ReplySplit reply(prompt_opens_thinking(rendered));
    TextHooks hooks;
    hooks.push = [&](int32_t id) {
      reply.token();
      return stream.push(id);
    };
    hooks.flush = [&] { return stream.flush(); };
    StreamFn on_text = [&](std::string_view text, int32_t) {
      reply.push(text);
      if (!a.json) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      }
      return true;
    };
    GenerationResult r;
    try {
      r = engine.generate(seq, std::span<const int32_t>(ids).subspan(reused), gc, &hooks, on_text);
    } catch (const Error& e) {
      // At a terminal the conversation goes on without this turn, on a fresh sequence (the
      // next turn prefills it again); a script gets the error and a failed exit.
      if (!interactive) throw;
      std::fprintf(stderr, "error: %s\n", e.what());
      messages.pop_back();
      --turn;
      restart(false);
      continue;
    }
    // The sequence holds the prompt and the generated tokens but the last one sampled (never fed).
    fed = ids;
    fed.insert(fed.end(), r.tokens.begin(), r.tokens.end());
    fed.resize(size_t(engine.length(seq)));
    const auto generated = int64_t(r.tokens.size());
    reply.finish(generated);
    messages.push_back({"assistant", r.text});

    const GenerationStats& s = r.stats;
    if (a.json) {
      json j;
      j["turn"] = turn;
      j["text"] = r.text;
      reply.add_json(j, generated);
      j["tokens"] = r.tokens;
      j["finish_reason"] = finish_reason_name(r.finish);
      if (!r.stop_string.empty()) j["stop_string"] = r.stop_string;
      j["reused_tokens"] = reused;
      j["reprefilled"] = reprefill;
      j["sequence_tokens"] = engine.length(seq);
      add_stats_json(j, s);
      const std::string out = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
      std::fwrite(out.data(), 1, out.size(), stdout);
      std::fflush(stdout);
    } else {
      std::fputc('\n', stdout);
      std::fflush(stdout);
      std::fprintf(stderr,
                   "[turn %d] prompt %lld new tokens (%s), generated %lld (%s); prefill %.1f tok/s, decode %.1f "
                   "tok/s; attention %.1f%% of the time; thinking %lld tokens, answer %lld; sequence %lld tokens\n",
                   turn, (long long)s.prompt_tokens,
                   reprefill ? "conversation prefilled again" : fmt::format("{} reused", reused).c_str(),
                   (long long)s.generated_tokens, std::string(finish_reason_name(r.finish)).c_str(),
                   s.prefill_tokens_per_second(), s.decode_tokens_per_second(), 100.0 * s.attention_share(),
                   (long long)reply.thinking_tokens, (long long)reply.answer_tokens(generated),
                   (long long)engine.length(seq));
    }
    if (r.finish == FinishReason::ContextLimit) {
      std::fprintf(stderr, "note: the conversation reached the context limit of %lld tokens; /reset to go on\n",
                   (long long)engine.context_length());
    }
  }
  engine.remove_sequence(seq);
}

}  // namespace

void add_chat_command(CLI::App& app) {
  auto args = std::make_shared<ChatArgs>();
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model: user lines on stdin, replies on stdout; /reset starts over, /exit ends");
  cmd->add_option("--model,-m", args->model, "GGUF file or folder with config.json + *.safetensors")->required();
  cmd->add_option("--system", args->system, "System message");
  cmd->add_flag("--no-think", args->no_think, "Switch thinking off (enable_thinking=false: Qwen3, DeepSeek-R1-Distill)");
  add_generation_options(*cmd, *args);
  cmd->add_flag("--json", args->json,
                "One JSON object per turn (text, thinking, answer, tokens, speeds), one a line, instead of streaming");
  cmd->callback([args] { run_chat(*args); });
}

}  // namespace multipole::cli
