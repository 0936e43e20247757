// `multipole generate --model PATH --prompt TEXT`: streams a generation to stdout, then a
// summary (tokens, prefill and decode tok/s, share of time in attention) to stderr, or
// everything as one JSON object with --json. With --chat the reply is also split into its
// thinking and its answer (tokens of each in the summary, texts in the JSON). Without the
// tokenizer layer only --prompt-ids works (token ids in, token ids out).
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "generation_options.hpp"
#include "multipole/core/error.hpp"
#include "multipole/engine/engine.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/model/model.hpp"
#include "multipole/model/trace_capture.hpp"
#ifdef MULTIPOLE_HAVE_TOKENIZER
#include "multipole/tokenizer/chat_template.hpp"
#include "multipole/tokenizer/checkpoint.hpp"
#include "multipole/tokenizer/tokenizer.hpp"
#endif

namespace multipole::cli {

namespace {

using json = nlohmann::json;

struct GenerateArgs : GenerationOptions {
  std::string model;
  std::string prompt;
  std::string file;
  std::string prompt_ids;
  std::string system;
  bool chat = false;
  bool no_think = false;
  bool json = false;
  std::string dump_trace;
  std::string trace_layers;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MP_CHECK(f, "{}: cannot open", path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<int32_t> parse_id_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::string word;
  std::istringstream in(text);
  while (std::getline(in, word, ',')) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MP_CHECK(used > 0 && v >= 0 && v <= INT32_MAX, "--prompt-ids: not a token id: '{}'", word);
    ids.push_back(int32_t(v));
  }
  MP_CHECK(!ids.empty(), "--prompt-ids: no ids given");
  return ids;
}


void run_generate(const GenerateArgs& a) {
  const int given = int(!a.prompt.empty()) + int(!a.file.empty()) + int(!a.prompt_ids.empty());
  MP_CHECK(given == 1, "generate: give exactly one of --prompt, --file, --prompt-ids");
  std::unique_ptr<Model> model = Model::load(a.model);
  const ModelConfig& mc = model->config();

  const int threads = thread_count(a);
  ThreadPool pool(threads);
  Engine engine(*model, engine_options(a), pool);
  std::optional<TraceCapture> capture;
  if (!a.dump_trace.empty()) {
    capture.emplace(*model, parse_trace_layers(a.trace_layers, mc.num_layers));
    model->set_observer(&*capture);
  } else {
    MP_CHECK(a.trace_layers.empty(), "generate: --layers needs --dump-trace");
  }

  GenerationConfig gc = generation_config(a);

  std::vector<int32_t> prompt;
  TextHooks hooks;
  const TextHooks* hooks_ptr = nullptr;
  std::string chat_style;
#ifdef MULTIPOLE_HAVE_TOKENIZER
  std::optional<Tokenizer> tok;
  std::optional<StreamDecoder> stream;
  std::optional<ReplySplit> reply;  // --chat: thinking and answer
#endif
  if (!a.prompt_ids.empty()) {
    MP_CHECK(!a.chat, "generate: --chat needs a text prompt, not --prompt-ids");
    MP_CHECK(a.stops.empty(), "generate: --stop needs a text prompt, not --prompt-ids");
    prompt = parse_id_list(a.prompt_ids);
  } else {
#ifdef MULTIPOLE_HAVE_TOKENIZER
    tok.emplace(checkpoint_tokenizer(model->path(), model->gguf()));
    const std::string text = a.prompt.empty() ? read_file(a.file) : a.prompt;
    if (a.chat) {
      const ChatTemplate tmpl = ChatTemplate::detect(checkpoint_chat_template(model->path(), model->gguf()), mc.architecture);
      chat_style = std::string(tmpl.style_name());
      std::vector<ChatMessage> messages;
      if (!a.system.empty()) messages.push_back({"system", a.system});
      messages.push_back({"user", text});
      const std::string rendered = tmpl.render(messages, true, !a.no_think);
      prompt = tok->encode(rendered, {.add_special = false, .parse_special = true});
      add_end_markers(*tok, tmpl.end_of_turn(), gc);
      reply.emplace(prompt_opens_thinking(rendered));
    } else {
      MP_CHECK(a.system.empty(), "generate: --system needs --chat");
      prompt = tok->encode(text, {.add_special = true, .parse_special = true});
      add_end_markers(*tok, "", gc);  // the models' end markers
    }
    stream.emplace(*tok, DecodeOptions{.skip_special = false});
    hooks.push = [&](int32_t id) {
      if (reply) reply->token();
      return stream->push(id);
    };
    hooks.flush = [&] { return stream->flush(); };
    hooks_ptr = &hooks;
#else
    fail("generate: this build has no tokenizer (PCRE2/utf8proc missing); use --prompt-ids");
#endif
  }
  MP_CHECK(!prompt.empty(), "generate: the prompt is empty");

  StreamFn on_text = [&](std::string_view text, int32_t id) {
#ifdef MULTIPOLE_HAVE_TOKENIZER
    if (reply) reply->push(text);
#endif
    if (a.json) return true;
    if (hooks_ptr)
      std::fwrite(text.data(), 1, text.size(), stdout);
    else
      std::fprintf(stdout, "%d ", id);
    std::fflush(stdout);
    return true;
  };
  const GenerationResult r = engine.generate(prompt, gc, hooks_ptr, on_text);
  const GenerationStats& s = r.stats;
  std::string reply_summary;
#ifdef MULTIPOLE_HAVE_TOKENIZER
  const auto generated = int64_t(r.tokens.size());
  if (reply) {
    reply->finish(generated);
    reply_summary = fmt::format("; thinking {} tokens, answer {}", reply->thinking_tokens, reply->answer_tokens(generated));
  }
#endif
  const std::vector<std::string> traces = capture ? capture->write(a.dump_trace) : std::vector<std::string>{};
  if (a.json) {
    json j;
    j["model"] = model->path();
    j["architecture"] = mc.architecture;
    j["attention"] = a.attention;
    j["device"] = a.device;
    if (a.attention != "dense") j["budget"] = a.budget;
    j["threads"] = threads;
    if (!chat_style.empty()) j["chat_template"] = chat_style;
    if (hooks_ptr) j["text"] = r.text;
    j["tokens"] = r.tokens;
    j["finish_reason"] = finish_reason_name(r.finish);
    if (!r.stop_string.empty()) j["stop_string"] = r.stop_string;
#ifdef MULTIPOLE_HAVE_TOKENIZER
    if (reply) reply->add_json(j, generated);
#endif
    add_stats_json(j, s);
    if (capture) j["traces"] = traces;
    std::string out = j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
    return;
  }
  std::fputc('\n', stdout);
  std::fflush(stdout);
  std::fprintf(stderr,
               "[%s, %s attention%s, %d thread(s)] prompt %lld tokens, generated %lld (%s); prefill %.1f tok/s, "
               "decode %.1f tok/s; attention %.1f%% of the time%s\n",
               mc.architecture.c_str(), a.attention.c_str(), a.device == "cpu" ? "" : (" on " + a.device).c_str(), threads, (long long)s.prompt_tokens,
               (long long)s.generated_tokens, std::string(finish_reason_name(r.finish)).c_str(),
               s.prefill_tokens_per_second(), s.decode_tokens_per_second(), 100.0 * s.attention_share(),
               reply_summary.c_str());
  for (const std::string& t : traces) std::fprintf(stderr, "wrote trace %s\n", t.c_str());
  if (r.finish == FinishReason::ContextLimit)
    std::fprintf(stderr, "note: stopped at the context limit of %lld tokens\n", (long long)engine.context_length());
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text with a model (GGUF file or Hugging Face folder)");
  cmd->add_option("--model,-m", args->model, "GGUF file or folder with config.json + *.safetensors")->required();
  cmd->add_option("--prompt,-p", args->prompt, "Prompt text");
  cmd->add_option("--file,-f", args->file, "Read the prompt from this file");
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt as comma-separated token ids (no tokenizer needed)");
  cmd->add_flag("--chat", args->chat, "Wrap the prompt as a user turn in the model's chat template");
  cmd->add_option("--system", args->system, "System message (with --chat)");
  cmd->add_flag("--no-think", args->no_think, "Chat: switch thinking off (enable_thinking=false: Qwen3, DeepSeek-R1-Distill)");
  add_generation_options(*cmd, *args);
  cmd->add_flag("--json", args->json, "Print one JSON object (text, tokens, speeds; with --chat thinking and answer) instead of streaming");
  cmd->add_option("--dump-trace", args->dump_trace,
                  "Write the pre-RoPE q, k, v of the --layers as attention traces for `multipole attn`, one file per "
                  "layer: FILE.L<layer>.safetensors (a trailing .safetensors of FILE is dropped); k, v for every "
                  "position, q for the generated tokens fed back (all but the last); RoPE incl. rope_scaling in "
                  "the metadata");
  cmd->add_option("--layers", args->trace_layers,
                  "Layers for --dump-trace: comma-separated, negative from the end (-1 the last), or all "
                  "(default: the first and the last)");
  cmd->callback([args] { run_generate(*args); });
}

}  // namespace multipole::cli
