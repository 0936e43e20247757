// `multipole generate --model PATH --prompt TEXT`: streams a generation to stdout, then a
// summary (tokens, prefill and decode tok/s, share of time in attention) to stderr, or
// everything as one JSON object with --json. Without the tokenizer layer only --prompt-ids
// works (token ids in, token ids out).
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "multipole/core/error.hpp"
#include "multipole/engine/engine.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/model/model.hpp"
#include "multipole/model/trace_capture.hpp"
#ifdef MULTIPOLE_HAVE_TOKENIZER
#include <filesystem>

#include "multipole/tokenizer/chat_template.hpp"
#include "multipole/tokenizer/tokenizer.hpp"
#endif

namespace multipole::cli {

namespace {

using json = nlohmann::json;

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string file;
  std::string prompt_ids;
  std::string system;
  bool chat = false;
  bool no_think = false;
  std::string attention = "dense";
  int budget = 128;
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

#ifdef MULTIPOLE_HAVE_TOKENIZER
Tokenizer load_tokenizer(const Model& model) {
  if (model.gguf()) {
    MP_CHECK(model.gguf()->has("tokenizer.ggml.tokens"), "{}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)",
             model.path());
    return Tokenizer::from_gguf(*model.gguf());
  }
  namespace fs = std::filesystem;
  fs::path dir = fs::is_directory(model.path()) ? fs::path(model.path()) : fs::path(model.path()).parent_path();
  MP_CHECK(fs::exists(dir / "tokenizer.json"), "{}: missing tokenizer: no tokenizer.json in {}", model.path(),
           dir.string());
  return Tokenizer::load(dir.string());
}

// The checkpoint's own chat template: GGUF metadata or tokenizer_config.json.
std::string chat_template_source(const Model& model) {
  if (model.gguf()) return std::string(model.gguf()->get_string("tokenizer.chat_template", ""));
  namespace fs = std::filesystem;
  fs::path dir = fs::is_directory(model.path()) ? fs::path(model.path()) : fs::path(model.path()).parent_path();
  if (!fs::exists(dir / "tokenizer_config.json")) return {};
  json j = json::parse(read_file((dir / "tokenizer_config.json").string()), nullptr, false);
  if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string())
    return j["chat_template"].get<std::string>();
  return {};
}
#endif

void run_generate(const GenerateArgs& a) {
  const int given = int(!a.prompt.empty()) + int(!a.file.empty()) + int(!a.prompt_ids.empty());
  MP_CHECK(given == 1, "generate: give exactly one of --prompt, --file, --prompt-ids");
  std::unique_ptr<Model> model = Model::load(a.model);
  const ModelConfig& mc = model->config();

  EngineOptions eo;
  eo.attention = a.attention;
  eo.attention_config.budget = a.budget;
  eo.attention_config.cluster.window = a.window;
  eo.attention_config.cluster.sinks = a.sinks;
  eo.attention_config.cluster.seed = a.seed;
  eo.context_length = a.ctx;
  eo.kv_dtype = parse_dtype(a.kv_dtype, "--kv-dtype");
  const int threads = a.threads > 0 ? a.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  ThreadPool pool(threads);
  Engine engine(*model, eo, pool);
  std::optional<TraceCapture> capture;
  if (!a.dump_trace.empty()) {
    capture.emplace(*model, parse_trace_layers(a.trace_layers, mc.num_layers));
    model->set_observer(&*capture);
  } else {
    MP_CHECK(a.trace_layers.empty(), "generate: --layers needs --dump-trace");
  }

  GenerationConfig gc;
  gc.max_tokens = a.max_tokens;
  gc.sampler.temperature = a.temperature;
  gc.sampler.top_k = a.top_k;
  gc.sampler.top_p = a.top_p;
  gc.sampler.min_p = a.min_p;
  gc.sampler.repetition_penalty = a.repeat_penalty;
  gc.sampler.repeat_last_n = a.repeat_last_n;
  gc.sampler.seed = a.seed;
  gc.stop_at_eos = !a.ignore_eos;
  gc.stop_strings = a.stops;

  std::vector<int32_t> prompt;
  TextHooks hooks;
  const TextHooks* hooks_ptr = nullptr;
  std::string chat_style;
#ifdef MULTIPOLE_HAVE_TOKENIZER
  std::optional<Tokenizer> tok;
  std::optional<StreamDecoder> stream;
#endif
  if (!a.prompt_ids.empty()) {
    MP_CHECK(!a.chat, "generate: --chat needs a text prompt, not --prompt-ids");
    MP_CHECK(a.stops.empty(), "generate: --stop needs a text prompt, not --prompt-ids");
    prompt = parse_id_list(a.prompt_ids);
  } else {
#ifdef MULTIPOLE_HAVE_TOKENIZER
    tok.emplace(load_tokenizer(*model));
    const std::string text = a.prompt.empty() ? read_file(a.file) : a.prompt;
    if (a.chat) {
      const ChatTemplate tmpl = ChatTemplate::detect(chat_template_source(*model), mc.architecture);
      chat_style = std::string(tmpl.style_name());
      std::vector<ChatMessage> messages;
      if (!a.system.empty()) messages.push_back({"system", a.system});
      messages.push_back({"user", text});
      prompt = tok->encode(tmpl.render(messages, true, !a.no_think), {.add_special = false, .parse_special = true});
      if (auto id = tok->token_id(tmpl.end_of_turn())) gc.extra_eos.push_back(*id);
    } else {
      MP_CHECK(a.system.empty(), "generate: --system needs --chat");
      prompt = tok->encode(text, {.add_special = true, .parse_special = true});
    }
    // Models' end markers when the vocabulary has them as special tokens.
    for (std::string_view end : {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"})
      if (auto id = tok->token_id(end); id && tok->is_special(*id)) gc.extra_eos.push_back(*id);
    stream.emplace(*tok, DecodeOptions{.skip_special = false});
    hooks.push = [&](int32_t id) { return stream->push(id); };
    hooks.flush = [&] { return stream->flush(); };
    hooks_ptr = &hooks;
#else
    fail("generate: this build has no tokenizer (PCRE2/utf8proc missing); use --prompt-ids");
#endif
  }
  MP_CHECK(!prompt.empty(), "generate: the prompt is empty");

  StreamFn on_text;
  if (!a.json) {
    on_text = [&](std::string_view text, int32_t id) {
      if (hooks_ptr)
        std::fwrite(text.data(), 1, text.size(), stdout);
      else
        std::fprintf(stdout, "%d ", id);
      std::fflush(stdout);
      return true;
    };
  }
  const GenerationResult r = engine.generate(prompt, gc, hooks_ptr, on_text);
  const GenerationStats& s = r.stats;
  const std::vector<std::string> traces = capture ? capture->write(a.dump_trace) : std::vector<std::string>{};
  if (a.json) {
    json j;
    j["model"] = model->path();
    j["architecture"] = mc.architecture;
    j["attention"] = a.attention;
    if (a.attention != "dense") j["budget"] = a.budget;
    j["threads"] = threads;
    if (!chat_style.empty()) j["chat_template"] = chat_style;
    if (hooks_ptr) j["text"] = r.text;
    j["tokens"] = r.tokens;
    j["finish_reason"] = finish_reason_name(r.finish);
    if (!r.stop_string.empty()) j["stop_string"] = r.stop_string;
    j["prompt_tokens"] = s.prompt_tokens;
    j["generated_tokens"] = s.generated_tokens;
    j["prefill_seconds"] = s.prefill_seconds;
    j["decode_seconds"] = s.decode_seconds;
    j["prefill_tokens_per_second"] = s.prefill_tokens_per_second();
    j["decode_tokens_per_second"] = s.decode_tokens_per_second();
    j["attention_share"] = s.attention_share();
    if (capture) j["traces"] = traces;
    j["policy"] = {{"exact_tokens", s.policy.exact_tokens},
                   {"selected_tokens", s.policy.selected_tokens},
                   {"centroids_scored", s.policy.centroids_scored},
                   {"pseudo_tokens", s.policy.pseudo_tokens},
                   {"bytes_read", s.policy.bytes_read}};
    std::string out = j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
    return;
  }
  std::fputc('\n', stdout);
  std::fflush(stdout);
  std::fprintf(stderr,
               "[%s, %s attention, %d thread(s)] prompt %lld tokens, generated %lld (%s); prefill %.1f tok/s, "
               "decode %.1f tok/s; attention %.1f%% of the time\n",
               mc.architecture.c_str(), a.attention.c_str(), threads, (long long)s.prompt_tokens,
               (long long)s.generated_tokens, std::string(finish_reason_name(r.finish)).c_str(),
               s.prefill_tokens_per_second(), s.decode_tokens_per_second(), 100.0 * s.attention_share());
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
  cmd->add_flag("--no-think", args->no_think, "Qwen3 chat: switch thinking off (enable_thinking=false)");
  cmd->add_option("--attention", args->attention, "Decode attention: dense, multipole, squeezed, quest, oracle-topk")
      ->capture_default_str();
  cmd->add_option("--budget", args->budget, "Tokens per KV head selected beyond sinks + window")->capture_default_str();
  cmd->add_option("--window", args->window, "Local window / update interval W")->capture_default_str();
  cmd->add_option("--sinks", args->sinks, "Attention sink tokens")->capture_default_str();
  cmd->add_option("--max-tokens,-n", args->max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature,-t", args->temperature, "Sampling temperature (0: greedy)")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "Keep the k most likely tokens (0: off)")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "Nucleus sampling mass (1: off)")->capture_default_str();
  cmd->add_option("--min-p", args->min_p, "Drop tokens below min_p x the top probability (0: off)")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", args->repeat_penalty, "Repetition penalty (1: off)")->capture_default_str();
  cmd->add_option("--repeat-last-n", args->repeat_last_n, "History the penalty looks at (-1: all)")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Sampling and k-means seed")->capture_default_str();
  cmd->add_option("--threads", args->threads, "Threads (0: all hardware threads)")->capture_default_str();
  cmd->add_option("--ctx", args->ctx, "Context limit in tokens (0: the model's)")->capture_default_str();
  cmd->add_option("--kv-dtype", args->kv_dtype, "KV cache storage: f16, bf16, f32")->capture_default_str();
  cmd->add_option("--stop", args->stops, "Stop string (repeatable)");
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Do not stop at end-of-sequence tokens");
  cmd->add_flag("--json", args->json, "Print one JSON object (text, tokens, speeds) instead of streaming");
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
