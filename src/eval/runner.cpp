// The eval runner: loads the model with its tokenizer and chat template, opens the results
// log, runs one suite and renders the report.
#include "multipole/eval/runner.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include <fmt/ranges.h>

#include "eval/suite.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/report.hpp"
#include "multipole/tokenizer/checkpoint.hpp"

namespace multipole::eval {

namespace fs = std::filesystem;

namespace {
// The "activations" field of every record (records written before it existed are int8).
std::string activations_name(bool f32) { return f32 ? "f32" : "int8"; }
}  // namespace

// ----------------------------------------------------------------------------- variants

bool policy_uses_clusters(const std::string& policy) { return policy == "multipole" || policy == "squeezed"; }

std::string cluster_setting_text(const std::vector<int>& tokens_per_centroid) {
  return fmt::format("{}", fmt::join(tokens_per_centroid, "/"));
}

std::string Variant::cluster() const { return cluster_setting_text(tokens_per_centroid); }

std::string Variant::label() const {
  std::string s = fmt::format("{} b{}", policy, budget);
  if (!tokens_per_centroid.empty()) s += " c" + cluster();
  return s;
}

std::vector<Variant> make_variants(const std::vector<std::string>& policies, const std::vector<int>& budgets,
                                   const std::vector<std::vector<int>>& clusters) {
  MP_CHECK(!policies.empty(), "eval: no --policies given");
  MP_CHECK(!budgets.empty(), "eval: no --budgets given");
  MP_CHECK(!clusters.empty(), "eval: no --clusters given");
  std::vector<Variant> out;
  for (const std::string& p : policies) {
    MP_CHECK(p != "dense", "eval: --policies lists 'dense': it is always run, as the reference");
    const auto names = attention_policy_names();
    MP_CHECK(std::find(names.begin(), names.end(), p) != names.end(),
             "eval: unknown attention policy '{}' in --policies (known: multipole, squeezed, quest, oracle-topk)", p);
    for (int b : budgets) {
      MP_CHECK(b >= 0, "eval: --budgets: {} must be >= 0", b);
      if (policy_uses_clusters(p)) {
        for (const auto& c : clusters) out.push_back({p, b, c});
      } else {
        out.push_back({p, b, {}});
      }
    }
  }
  return out;
}

std::vector<int> parse_cluster_setting(const std::string& text) {
  std::vector<int> levels;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t end = std::min(text.find('/', at), text.size());
    const std::string part = text.substr(at, end - at);
    char* stop = nullptr;
    const long v = std::strtol(part.c_str(), &stop, 10);
    MP_CHECK(!part.empty() && stop && *stop == 0 && v >= 1 && v <= 1 << 20,
             "eval: --clusters '{}': '{}' is not a number of tokens per centroid (levels are separated by '/', "
             "e.g. 16/128)",
             text, part);
    MP_CHECK(levels.empty() || v > levels.back(), "eval: --clusters '{}': each level must be coarser than the one before",
             text);
    levels.push_back(int(v));
    at = end + 1;
  }
  MP_CHECK(levels.size() <= 4, "eval: --clusters '{}': {} levels, at most 4", text, levels.size());
  return levels;
}

// ------------------------------------------------------------------------ suite context

namespace {
// The attention settings of variant v (nullptr: dense) on `model` under the options.
AttentionConfig variant_attention_config(const EvalOptions& opt, const Model& model, const Variant* v) {
  AttentionConfig ac = model.attention_config();
  ac.cluster.sinks = opt.sinks;
  ac.cluster.window = opt.window;
  ac.coarse_budget = opt.coarse_budget;
  ac.coarse_radius_weight = opt.coarse_radius_weight;
  ac.cluster.seed = opt.seed;
  ac.cluster.block_size = std::max(ac.cluster.block_size, opt.window);
  ac.score_position = opt.score_position;
  ac.score_real_positions = opt.real_positions;
  ac.far_field_real_positions = opt.far_real_positions;
  ac.select_by_exact_mass = opt.select_by_mass;
  ac.mass_at_score_position = opt.mass_at_score_position;
  ac.score_with_spread = opt.score_with_spread;
  if (v) {  // dense, the reference, keeps the default budget and re-ranks nothing
    ac.budget = v->budget;
    ac.rerank_tokens = opt.rerank_tokens;
    if (!v->tokens_per_centroid.empty()) ac.cluster.tokens_per_centroid = v->tokens_per_centroid;
  }
  return ac;
}
}  // namespace

AttentionConfig SuiteContext::attention_config(const Variant* v) const {
  return variant_attention_config(opt, model, v);
}

EngineOptions SuiteContext::engine_options(const Variant* v) const {
  EngineOptions eo;
  eo.attention = v ? v->policy : "dense";
  eo.attention_device = v ? opt.device : "cpu";
  eo.attention_config = attention_config(v);
  eo.context_length = context;
  return eo;
}

std::vector<int32_t> SuiteContext::chat_prompt(const std::string& user) const {
  const std::vector<ChatMessage> messages = {{"user", user}};
  return tok.encode(chat.render(messages, true, opt.thinking), {.add_special = false, .parse_special = true});
}

Record SuiteContext::record(const std::string& suite, const std::string& case_id, const Variant* v) const {
  Record r;
  r.suite = suite;
  r.case_id = case_id;
  r.policy = v ? v->policy : "dense";
  r.budget = v ? v->budget : 0;
  r.cluster = v ? v->cluster() : "";
  r.str["model"] = fs::path(model.path()).filename().string();
  r.str["activations"] = activations_name(opt.f32_activations);
  r.str["settings"] = settings();
  return r;
}

std::string SuiteContext::settings() const {
  // Settings added later are named only away from their defaults, so that older runs still
  // resume.
  return fmt::format("activations={} sinks={} window={} seed={} context={} max_tokens={} prefix={} scoring={}{}{}{}{}{}{}{}{}",
                     activations_name(opt.f32_activations), opt.sinks, opt.window, opt.seed, context, opt.max_tokens,
                     opt.prefix, opt.real_positions ? "real" : fmt::format("{}", opt.score_position),
                     opt.score_with_spread ? "+spread" : "",
                     opt.coarse_budget == 0 ? "" : fmt::format(" coarse_budget={}", opt.coarse_budget),
                     opt.coarse_radius_weight == 0 ? "" : fmt::format(" coarse_radius_weight={}", opt.coarse_radius_weight),
                     opt.far_real_positions ? " far_field=real" : "",
                     !opt.select_by_mass           ? ""
                     : opt.mass_at_score_position ? " selection=mass-at-score-position"
                                                  : " selection=mass",
                     opt.rerank_tokens == 0 ? "" : fmt::format(" rerank_tokens={}", opt.rerank_tokens),
                     opt.dense_history ? " history=dense" : "",
                     opt.device == "cpu" ? "" : " device=" + opt.device);
}

Engine& Engines::get(const Variant* v) {
  const std::string key = v ? v->label() : "dense";
  auto& e = engines_[key];
  if (!e) e = std::make_unique<Engine>(sc_.model, sc_.engine_options(v), sc_.pool);
  return *e;
}

Generation generate_greedy(const SuiteContext& sc, Engine& engine, SeqId seq, std::span<const int32_t> tokens,
                           int max_tokens) {
  const int64_t held = engine.length(seq) + int64_t(tokens.size());
  MP_CHECK(held < engine.context_length(), "eval: a prompt of {} tokens leaves no room in the context of {} (--max-context)",
           held, engine.context_length());
  GenerationConfig gc;
  gc.max_tokens = int(std::min<int64_t>(max_tokens, engine.context_length() - held));
  gc.sampler.temperature = 0;
  gc.extra_eos = sc.stop_ids;
  const auto t0 = std::chrono::steady_clock::now();
  GenerationResult r = engine.generate(seq, tokens, gc);
  Generation g;
  g.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g.tokens = std::move(r.tokens);
  g.text = sc.tok.decode(g.tokens);
  g.finish = std::string(finish_reason_name(r.finish));
  // A full context ends as "length" when max_tokens was cut to fit it.
  if (held + int64_t(g.tokens.size()) >= engine.context_length() && g.finish == "length") g.finish = "context";
  return g;
}

Generation generate_greedy(const SuiteContext& sc, Engine& engine, std::span<const int32_t> prompt, int max_tokens) {
  const ScopedSequence seq(engine, engine.add_sequence());
  return generate_greedy(sc, engine, seq.id(), prompt, max_tokens);
}

SharedPrompt::SharedPrompt(Engines& engines, std::span<const int32_t> prompt)
    : engines_(engines), prompt_(prompt), dense_(engines.get(nullptr)), shared_(dense_, dense_.add_sequence()) {
  MP_CHECK(!prompt.empty(), "eval: an empty prompt");
  const auto t0 = std::chrono::steady_clock::now();
  if (prompt.size() > 1) dense_.prefill(shared_.id(), prompt.first(prompt.size() - 1));
  seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Generation SharedPrompt::generate(const SuiteContext& sc, const Variant* v, int max_tokens) {
  const std::span<const int32_t> last = prompt_.last(1);
  if (!v) return generate_greedy(sc, dense_, shared_.id(), last, max_tokens);
  Engine& engine = engines_.get(v);
  const ScopedSequence seq(engine, engine.add_copy(dense_, shared_.id(), int64_t(prompt_.size()) - 1));
  return generate_greedy(sc, engine, seq.id(), last, max_tokens);
}

std::string find_shared(const std::string& relative) {
  std::vector<fs::path> roots;
  if (const char* env = std::getenv("MULTIPOLE_SHARED_DIR")) roots.emplace_back(env);
  std::error_code ec;
  // ../shared beside any folder above the working folder or the executable (the source tree).
  for (fs::path p : {fs::current_path(ec), fs::read_symlink("/proc/self/exe", ec).parent_path()}) {
    for (; !p.empty() && p != p.parent_path(); p = p.parent_path()) roots.push_back(p / "shared");
  }
  for (const fs::path& root : roots)
    if (fs::exists(root / relative, ec)) return (root / relative).string();
  return {};
}

std::vector<DatasetProblem> load_problems(const SuiteContext& sc) {
  const EvalOptions& o = sc.opt;
  std::vector<Problem> arith, aime;
  for (const std::string& d : o.datasets) {
    if (d == "arith") {
      MP_CHECK(o.steps >= 1 && o.difficulty >= 1 && o.difficulty <= 3,
               "eval: --steps {} must be >= 1 and --difficulty {} in [1, 3]", o.steps, o.difficulty);
      ArithmeticSpec spec{.steps = o.steps, .difficulty = o.difficulty, .distractors = o.distractors, .seed = o.seed};
      for (int i = 0; i < o.problems; ++i) arith.push_back(make_arithmetic_problem(spec, i));
    } else if (d == "aime") {
      std::string path = o.aime.empty() ? find_shared("assets/aime2025/aime2025.jsonl") : o.aime;
      if (path.empty()) {
        std::fprintf(stderr, "note: AIME 2025 not found (../shared/assets/aime2025/aime2025.jsonl); pass --aime FILE\n");
        continue;
      }
      aime = load_aime(path);
    } else {
      fail("eval: unknown dataset '{}' in --datasets (known: arith, aime)", d);
    }
  }
  // Interleaved, so that a small --limit still samples both.
  std::vector<DatasetProblem> out;
  for (size_t i = 0; i < std::max(arith.size(), aime.size()); ++i) {
    if (i < arith.size()) out.push_back({arith[i], "arith"});
    if (i < aime.size()) out.push_back({aime[i], "aime"});
  }
  if (o.limit > 0 && int64_t(out.size()) > o.limit) out.resize(size_t(o.limit));
  MP_CHECK(!out.empty(), "eval: no problems to run (--datasets, --problems, --aime)");
  return out;
}

// ------------------------------------------------------------------------------- run

std::string run_eval(const EvalOptions& o) {
  static const char* kSuites[] = {"fidelity", "agreement", "passkey", "reasoning"};
  MP_CHECK(std::find_if(std::begin(kSuites), std::end(kSuites), [&](const char* s) { return o.suite == s; }) !=
               std::end(kSuites),
           "eval: unknown suite '{}' (known: fidelity, agreement, passkey, reasoning)", o.suite);
  MP_CHECK(o.limit >= 0, "eval: --limit {} must be >= 0 (0: all)", o.limit);
  MP_CHECK(o.max_tokens >= 0, "eval: --max-tokens {} must be >= 0 (0: the suite's default)", o.max_tokens);
  MP_CHECK(!o.dense_history || o.suite == "fidelity", "eval: --dense-history applies to --suite fidelity only, not {}",
           o.suite);
  // The GPU policies mirror the cache rows as they are appended; rows overwritten later would
  // not reach the mirror.
  MP_CHECK(!o.dense_history || o.device == "cpu", "eval: --dense-history needs --device cpu, not {}", o.device);
  MP_CHECK(!o.mass_at_score_position || o.select_by_mass, "eval: --mass-at-score-position needs --select-by-mass");
  MP_CHECK(!o.score_with_spread ||
               (!o.real_positions && !o.far_real_positions && !o.select_by_mass && o.coarse_radius_weight == 0),
           "eval: --score-with-spread adds to the fixed-position centroid scores: it does not combine with "
           "--real-positions, --far-real-positions, --select-by-mass or --coarse-radius-weight");
  std::vector<Variant> variants = make_variants(o.policies, o.budgets, o.clusters);
  const std::vector<std::string> devices = attention_devices();
  MP_CHECK(std::find(devices.begin(), devices.end(), o.device) != devices.end(),
           "eval: --device {} is not available in this build (available: {})", o.device, fmt::join(devices, ", "));

  std::unique_ptr<Model> model = Model::load(o.model);
  if (o.f32_activations) model->set_activation_precision(ActivationPrecision::F32);
  const ModelConfig& mc = model->config();
  // Fails now rather than after the dense cases when the device cannot run this model.
  for (const Variant& v : variants) make_attention_policy(v.policy, variant_attention_config(o, *model, &v), o.device);
  const Tokenizer tok = checkpoint_tokenizer(model->path(), model->gguf());
  const ChatTemplate chat = ChatTemplate::detect(checkpoint_chat_template(model->path(), model->gguf()), mc.architecture);
  MP_CHECK(o.max_context >= 0, "eval: --max-context {} must be >= 0", o.max_context);
  MP_CHECK(o.max_context <= mc.context_length, "eval: --max-context {} exceeds the model's context length {}",
           o.max_context, mc.context_length);
  const int64_t context = o.max_context > 0 ? o.max_context : std::min(mc.context_length, kDefaultContextCap);

  std::error_code ec;
  fs::create_directories(o.out, ec);
  MP_CHECK(fs::is_directory(o.out), "eval: --out {}: cannot create the folder ({})", o.out, ec.message());
  ResultsLog log((fs::path(o.out) / "results.jsonl").string(), o.resume, o.overwrite);
  if (log.resumed() > 0 && o.progress)
    std::fprintf(stderr, "resuming: %lld record(s) already in %s\n", (long long)log.resumed(), log.path().c_str());

  const int threads = o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  ThreadPool pool(threads);
  SuiteContext sc{o, *model, tok, chat, pool, log, context, std::move(variants), {}};
  // Records of one results file are comparable only if made with the same settings (records
  // older than the settings field are checked on their activations alone).
  const std::string settings = sc.settings(), activations = activations_name(o.f32_activations);
  for (const Record& r : log.records()) {
    auto it = r.str.find("settings");
    const std::string theirs_act = r.text("activations", activations_name(false));
    MP_CHECK(theirs_act == activations,
             "eval: {} holds results made with {} activations (case {}), this run uses {}; use another --out, "
             "--overwrite, or {} --f32-activations",
             log.path(), theirs_act, r.case_id, activations, o.f32_activations ? "drop" : "add");
    MP_CHECK(it == r.str.end() || it->second == settings,
             "eval: {} holds results made with other settings (case {}: {}); this run: {}; use another --out or "
             "--overwrite",
             log.path(), r.case_id, it->second, settings);
  }
  if (auto id = tok.token_id(chat.end_of_turn())) sc.stop_ids.push_back(*id);
  for (std::string_view end : {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"})
    if (auto id = tok.token_id(end); id && tok.is_special(*id)) sc.stop_ids.push_back(*id);

  Progress progress(o.suite, 0, o.progress);
  if (o.suite == "fidelity") run_fidelity(sc, progress);
  if (o.suite == "agreement") run_agreement(sc, progress);
  if (o.suite == "passkey") run_passkey(sc, progress);
  if (o.suite == "reasoning") run_reasoning(sc, progress);
  progress.finish();
  return render_report(o.out, log.records()).summary_json;
}

}  // namespace multipole::eval
