// The engine layer: the sampler against naive float64 definitions of each filter, seeds,
// stop strings, and generation on a tiny random model (greedy = the naive forward's argmax
// chain, EOS, stop strings, max tokens, the context limit, several sequences, a copied
// prefill), plus the `generate` command's errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>

#include "model/tiny_model.hpp"
#include "multipole/core/error.hpp"
#include "multipole/engine/engine.hpp"

namespace multipole {
namespace {

namespace fs = std::filesystem;

std::vector<float> random_logits(int n, uint64_t seed, double spread = 3.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0, spread);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = float(d(rng));
  return v;
}

// The kept set of a sampler config, by the definitions: softmax(l / T) over all tokens;
// top-k keeps the k largest; top-p the smallest most-likely prefix (of the top-k set,
// renormalised) with mass >= p; min-p those with p >= min_p * p_max; renormalise.
std::vector<std::pair<int32_t, double>> naive_distribution(const std::vector<float>& logits, const SamplerConfig& c) {
  const int n = int(logits.size());
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = c.top_k > 0 ? std::min<size_t>(size_t(c.top_k), size_t(n)) : size_t(n);
  std::vector<double> w(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += w[i] = std::exp((double(logits[ids[i]]) - logits[ids[0]]) / c.temperature);
  size_t cut = keep;
  if (c.top_p < 1) {
    double mass = 0;
    for (size_t i = 0; i < keep; ++i) {
      mass += w[i] / total;
      if (mass >= c.top_p) {
        cut = i + 1;
        break;
      }
    }
  }
  size_t cut2 = 1;
  while (cut2 < cut && w[cut2] >= c.min_p * w[0]) ++cut2;
  cut = cut2;
  double kept = 0;
  for (size_t i = 0; i < cut; ++i) kept += w[i];
  std::vector<std::pair<int32_t, double>> out;
  for (size_t i = 0; i < cut; ++i) out.push_back({ids[i], w[i] / kept});
  return out;
}

TEST(Sampler, GreedyIsArgmaxWithLowestIdOnTies) {
  Sampler s(SamplerConfig{});
  for (int trial = 0; trial < 50; ++trial) {
    auto l = random_logits(1000, 100 + trial);
    const int32_t want = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    EXPECT_EQ(s.sample(l, {}), want);
  }
  std::vector<float> tie = {0, 5, 1, 5, 5};
  EXPECT_EQ(s.sample(tie, {}), 1);
}

TEST(Sampler, FiltersKeepTheSetsTheirDefinitionsSay) {
  struct Case {
    float t;
    int k;
    float p, min_p;
  };
  const Case cases[] = {{1.0f, 0, 1.0f, 0.0f},  {0.7f, 40, 1.0f, 0.0f}, {1.0f, 0, 0.9f, 0.0f}, {1.3f, 0, 0.5f, 0.0f},
                        {1.0f, 0, 1.0f, 0.05f}, {0.8f, 40, 0.95f, 0.05f}, {2.0f, 5, 0.999f, 0.0f},
                        {0.5f, 0, 0.3f, 0.2f}, {1.0f, 1, 1.0f, 0.0f}, {1.0f, 0, 0.9999f, 0.0f}};
  int trial = 0;
  for (const Case& cs : cases)
    for (int vocab : {7, 300, 5000}) {
      SamplerConfig c;
      c.temperature = cs.t, c.top_k = cs.k, c.top_p = cs.p, c.min_p = cs.min_p;
      Sampler s(c);
      auto l = random_logits(vocab, 500 + trial++, vocab > 1000 ? 1.0 : 3.0);  // flat: top-p needs many
      const auto got = s.distribution(l, {});
      const auto want = naive_distribution(l, c);
      ASSERT_EQ(got.size(), want.size()) << "t " << cs.t << " k " << cs.k << " p " << cs.p << " min_p " << cs.min_p;
      double sum = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].id, want[i].first);
        EXPECT_NEAR(got[i].p, want[i].second, 1e-5);
        sum += got[i].p;
      }
      EXPECT_NEAR(sum, 1.0, 1e-4);
      if (cs.k > 0) {
        EXPECT_LE(got.size(), size_t(cs.k));
      }
    }
}

TEST(Sampler, RepetitionPenaltyFollowsTheHFRule) {
  SamplerConfig c;
  c.repetition_penalty = 2.0f;
  Sampler s(c);
  std::vector<float> l = {2.0f, 1.5f, -1.0f, -0.6f};
  EXPECT_EQ(s.sample(l, std::vector<int32_t>{0}), 1);  // 2.0 / 2 = 1.0 < 1.5
  std::vector<float> neg = {-0.5f, -0.8f};
  EXPECT_EQ(s.sample(neg, std::vector<int32_t>{0, 0}), 1);  // -0.5 * 2 = -1.0 < -0.8
  c.repeat_last_n = 1;
  Sampler recent(c);
  EXPECT_EQ(recent.sample(l, std::vector<int32_t>{0, 3}), 0);  // token 0 is outside the last 1
}

TEST(Sampler, SeedsAreDeterministicAndDrawsFollowTheDistribution) {
  SamplerConfig c;
  c.temperature = 1.0f;
  c.seed = 42;
  const std::vector<float> l = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};  // p = k / 10
  Sampler a(c), b(c);
  std::vector<int32_t> da, db;
  for (int i = 0; i < 300; ++i) da.push_back(a.sample(l, {})), db.push_back(b.sample(l, {}));
  EXPECT_EQ(da, db);
  c.seed = 43;
  Sampler other(c);
  std::vector<int32_t> dc;
  for (int i = 0; i < 300; ++i) dc.push_back(other.sample(l, {}));
  EXPECT_NE(da, dc);
  a.reseed(42);
  EXPECT_EQ(a.sample(l, {}), da[0]);
  // Frequencies within 5 standard deviations of n p.
  const int n = 20000;
  std::vector<int> count(4, 0);
  for (int i = 0; i < n; ++i) ++count[size_t(b.sample(l, {}))];
  for (int k = 0; k < 4; ++k) {
    const double p = (k + 1) / 10.0;
    EXPECT_NEAR(count[size_t(k)], n * p, 5 * std::sqrt(n * p * (1 - p))) << k;
  }
}

TEST(Sampler, RejectsBadConfigAndLogits) {
  auto bad = [](auto set) {
    SamplerConfig c;
    set(c);
    EXPECT_THROW(Sampler{c}, Error);
  };
  bad([](SamplerConfig& c) { c.temperature = -1; });
  bad([](SamplerConfig& c) { c.top_p = 0; });
  bad([](SamplerConfig& c) { c.top_p = 1.5f; });
  bad([](SamplerConfig& c) { c.min_p = 2; });
  bad([](SamplerConfig& c) { c.top_k = -3; });
  bad([](SamplerConfig& c) { c.repetition_penalty = 0; });
  Sampler s(SamplerConfig{});
  std::vector<float> nan = {0, std::nanf("")};
  EXPECT_THROW(s.sample(nan, {}), Error);
  EXPECT_THROW(s.sample(std::vector<float>{}, {}), Error);
}

TEST(StopMatcher, HoldsBackPossibleStartsAndCutsAtTheMatch) {
  StopMatcher m({"</s>", "STOP"});
  EXPECT_EQ(m.push("hello <"), "hello ");
  EXPECT_EQ(m.push("/"), "");
  EXPECT_EQ(m.push("x"), "</x");
  EXPECT_EQ(m.push(" ST"), " ");
  EXPECT_FALSE(m.matched());
  EXPECT_EQ(m.push("OP and more"), "");
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(m.match(), "STOP");
  StopMatcher e({"ab", "b"});
  EXPECT_EQ(e.push("xab"), "x");  // earliest match wins
  EXPECT_EQ(e.match(), "ab");
  StopMatcher f({"zz"});
  EXPECT_EQ(f.push("az"), "a");
  EXPECT_EQ(f.flush(), "z");
  EXPECT_THROW(StopMatcher({""}), Error);
}

// ------------------------------------------------------------------------- generation

class TinyEngine : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = tiny::family_config("qwen2");
    cfg_.context = 64;
    w_ = tiny::random_weights(cfg_, 77);
    dir_ = tiny::temp_dir("engine");
    tiny::write_safetensors(w_, dir_ + "/hf");
    model_ = Model::load(dir_ + "/hf");
  }
  void TearDown() override { fs::remove_all(dir_); }

  EngineOptions options(int64_t ctx = 0) {
    EngineOptions o;
    o.context_length = ctx;
    o.kv_dtype = DType::F32;
    o.max_sequences = 3;
    return o;
  }
  // `o` with a policy small enough for the tiny model: window 8, blocks of 32, 4 tokens per
  // centroid, budget 8.
  static EngineOptions policy_options(EngineOptions o, const char* policy, int sinks) {
    o.attention = policy;
    o.attention_config.cluster.sinks = sinks;
    o.attention_config.cluster.window = 8;
    o.attention_config.cluster.block_size = 32;
    o.attention_config.cluster.tokens_per_centroid = {4};
    o.attention_config.budget = 8;
    return o;
  }
  // The greedy chain of the naive forward; margins of the top two at each step.
  std::vector<int32_t> reference_greedy(std::vector<int32_t> tokens, int n, std::vector<double>* margins) {
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i) {
      auto l = tiny::reference_logits(w_, tokens).back();
      std::vector<int32_t> ids(l.size());
      std::iota(ids.begin(), ids.end(), 0);
      std::partial_sort(ids.begin(), ids.begin() + 2, ids.end(), [&](int a, int b) { return l[a] > l[b]; });
      margins->push_back(l[ids[0]] - l[ids[1]]);
      out.push_back(ids[0]);
      tokens.push_back(ids[0]);
    }
    return out;
  }

  tiny::Config cfg_;
  tiny::Weights w_;
  std::string dir_;
  std::unique_ptr<Model> model_;
};

const std::vector<int32_t> kPrompt = {5, 17, 33, 8, 91, 4, 60, 12, 3, 44};

TEST_F(TinyEngine, GreedyGenerationFollowsTheNaiveForward) {
  ThreadPool pool(2);
  Engine e(*model_, options(), pool);
  GenerationConfig g;
  g.max_tokens = 12;
  g.stop_at_eos = false;
  GenerationResult r = e.generate(kPrompt, g);
  std::vector<double> margins;
  auto want = reference_greedy(kPrompt, 12, &margins);
  ASSERT_EQ(r.tokens.size(), 12u);
  EXPECT_EQ(r.finish, FinishReason::MaxTokens);
  for (size_t i = 0; i < want.size(); ++i) {
    if (margins[i] < 1e-3) break;  // a near tie: f32 may pick either, and the chains part
    EXPECT_EQ(r.tokens[i], want[i]) << "step " << i;
  }
  EXPECT_EQ(r.stats.prompt_tokens, int64_t(kPrompt.size()));
  EXPECT_EQ(r.stats.generated_tokens, 12);
  EXPECT_EQ(r.stats.decode_steps, 11);
  EXPECT_GT(r.stats.attention_seconds, 0.0);
  EXPECT_LE(r.stats.attention_share(), 1.0);
  // The sequence was freed.
  EXPECT_EQ(e.cache().free_pages(), e.cache().num_pages());
}

TEST_F(TinyEngine, StopsAtEosStopStringsAndTheContextLimit) {
  ThreadPool pool(1);
  Engine e(*model_, options(), pool);
  GenerationConfig g;
  g.max_tokens = 8;
  g.stop_at_eos = false;
  const auto free_run = e.generate(kPrompt, g).tokens;
  ASSERT_EQ(free_run.size(), 8u);

  // EOS: the third generated token ends it (not included).
  g.stop_at_eos = true;
  g.extra_eos = {free_run[2]};
  size_t first = std::find(free_run.begin(), free_run.end(), free_run[2]) - free_run.begin();
  auto r = e.generate(kPrompt, g);
  EXPECT_EQ(r.finish, FinishReason::Eos);
  EXPECT_EQ(r.tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + first));

  // Stop strings over text pieces "<id>".
  g.extra_eos.clear();
  g.stop_at_eos = false;
  TextHooks hooks;
  hooks.push = [](int32_t id) { return "<" + std::to_string(id) + ">"; };
  g.stop_strings = {"<" + std::to_string(free_run[4]) + ">"};
  std::string streamed;
  r = e.generate(kPrompt, g, &hooks, [&](std::string_view t, int32_t) {
    streamed += t;
    return true;
  });
  EXPECT_EQ(r.finish, FinishReason::StopString);
  EXPECT_EQ(r.stop_string, g.stop_strings[0]);
  std::string want;
  for (int32_t t : free_run) {
    if ("<" + std::to_string(t) + ">" == g.stop_strings[0]) break;
    want += "<" + std::to_string(t) + ">";
  }
  EXPECT_EQ(r.text, want);
  EXPECT_EQ(streamed, want);
  EXPECT_THROW(e.generate(kPrompt, g), Error);  // stop strings without text hooks

  // Cancelling from the stream callback.
  g.stop_strings.clear();
  r = e.generate(kPrompt, g, &hooks, [](std::string_view, int32_t) { return false; });
  EXPECT_EQ(r.finish, FinishReason::Cancelled);
  EXPECT_EQ(r.tokens.size(), 1u);
}

TEST_F(TinyEngine, ContextLimitIsAClearErrorForPromptsAndAStopForGeneration) {
  ThreadPool pool(1);
  Engine e(*model_, options(16), pool);
  EXPECT_EQ(e.context_length(), 16);
  std::vector<int32_t> long_prompt(17, 5);
  try {
    e.generate(long_prompt, GenerationConfig{});
    ADD_FAILURE() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("would pass the context limit of 16 tokens"), std::string::npos)
        << err.what();
  }
  EXPECT_EQ(e.cache().free_pages(), e.cache().num_pages());  // nothing leaked
  GenerationConfig g;
  g.max_tokens = 100;
  g.stop_at_eos = false;
  auto r = e.generate(kPrompt, g);
  EXPECT_EQ(r.finish, FinishReason::ContextLimit);
  EXPECT_EQ(r.tokens.size(), size_t(16 - kPrompt.size() + 1));
  // The model's own limit (64) applies when none is given.
  Engine f(*model_, options(), pool);
  EXPECT_EQ(f.context_length(), 64);
  EXPECT_THROW(f.generate(std::vector<int32_t>(65, 1), g), Error);
  // Token ids outside the vocabulary.
  EXPECT_THROW(f.generate(std::vector<int32_t>{1, cfg_.vocab}, g), Error);
}

TEST_F(TinyEngine, SequencesKeepTheirOwnPagesAndConversationsContinue) {
  ThreadPool pool(1);
  Engine e(*model_, options(), pool);
  GenerationConfig g;
  g.max_tokens = 6;
  g.stop_at_eos = false;
  const auto alone = e.generate(kPrompt, g).tokens;
  // Two live sequences, interleaved: the second does not disturb the first.
  const SeqId a = e.add_sequence(), b = e.add_sequence();
  e.prefill(b, std::vector<int32_t>{9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9});
  auto ra = e.generate(a, kPrompt, g);
  EXPECT_EQ(ra.tokens, alone);
  // Continue sequence a: feeding the last sampled token and more gives what one long
  // prompt gives.
  std::vector<int32_t> more = {ra.tokens.back(), 7, 8};
  auto rc = e.generate(a, more, g);
  std::vector<int32_t> whole = kPrompt;
  whole.insert(whole.end(), ra.tokens.begin(), ra.tokens.end());
  whole.push_back(7), whole.push_back(8);
  EXPECT_EQ(e.generate(whole, g).tokens, rc.tokens);
  e.remove_sequence(a);
  e.remove_sequence(b);
  EXPECT_EQ(e.cache().free_pages(), e.cache().num_pages());
}

TEST_F(TinyEngine, EveryPolicyRunsAndSeededSamplingRepeats) {
  ThreadPool pool(2);
  GenerationConfig g;
  g.max_tokens = 30;
  g.stop_at_eos = false;
  g.sampler.temperature = 0.9f;
  g.sampler.top_k = 20;
  g.sampler.seed = 5;
  for (const char* p : {"dense", "multipole", "squeezed", "quest", "oracle-topk"}) {
    SCOPED_TRACE(p);
    Engine e(*model_, policy_options(options(), p, 2), pool);
    auto r1 = e.generate(kPrompt, g);
    auto r2 = e.generate(kPrompt, g);
    EXPECT_EQ(r1.tokens.size(), 30u);
    EXPECT_EQ(r1.tokens, r2.tokens);
    if (std::string(p) != "dense") {
      EXPECT_GT(r1.stats.policy.exact_tokens, 0);
    }
  }
}

// A policy engine continuing a copy of a dense engine's prefill generates what it generates
// from the whole prompt itself: the copy is indexed at its first prefill, over everything.
TEST_F(TinyEngine, CopiedPrefillGeneratesWhatAFullPrefillDoes) {
  ThreadPool pool(2);
  std::vector<int32_t> prompt(97);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t((i * 37 + 11) % size_t(cfg_.vocab));
  const std::span<const int32_t> head = std::span(prompt).first(96), last = std::span(prompt).last(1);
  GenerationConfig g;
  g.max_tokens = 20;
  g.stop_at_eos = false;
  EngineOptions base = options(160);
  base.prefill_chunk = 16;  // 96 = 6 whole chunks, so both ways group the rows alike
  Engine dense(*model_, base, pool);
  const SeqId shared = dense.add_sequence();
  dense.prefill(shared, head);
  for (const char* p : {"dense", "multipole", "quest"}) {
    SCOPED_TRACE(p);
    // One sink: the clustered part ends at 81 after 96 tokens and at 89 after 97, so an index
    // built at the copy would differ from the one a full prefill builds.
    Engine e(*model_, policy_options(base, p, 1), pool);
    const auto full = e.generate(prompt, g);
    const SeqId copy = e.add_copy(dense, shared, int64_t(head.size()));
    EXPECT_EQ(e.length(copy), int64_t(head.size()));
    const auto continued = e.generate(copy, last, g);
    EXPECT_EQ(continued.tokens, full.tokens);
    EXPECT_EQ(continued.stats.policy.exact_tokens, full.stats.policy.exact_tokens);
    e.remove_sequence(copy);
    EXPECT_EQ(e.cache().free_pages(), e.cache().num_pages());
  }
  EXPECT_EQ(dense.length(shared), int64_t(head.size()));
  EngineOptions other = base;
  other.kv_dtype = DType::BF16;
  Engine wrong(*model_, other, pool);
  EXPECT_THROW(wrong.add_copy(dense, shared, 8), Error);
}

// ------------------------------------------------------------------------ the command

struct Output {
  int code;
  std::string text;
};
Output run(const std::string& args) {
  std::string cmd = std::string(MULTIPOLE_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  Output o{-1, {}};
  if (!p) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.text.append(buf, n);
  int status = pclose(p);
  o.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return o;
}

TEST_F(TinyEngine, GenerateCommandRunsIdsAndNamesWhatIsWrong) {
  if (!fs::exists(MULTIPOLE_CLI_PATH)) GTEST_SKIP() << "CLI not built";
  const std::string m = dir_ + "/hf";
  Output ok = run("generate --model " + m + " --prompt-ids 5,17,33,8 -n 5 -t 0 --ignore-eos --json");
  ASSERT_EQ(ok.code, 0) << ok.text;
  EXPECT_NE(ok.text.find("\"finish_reason\": \"length\""), std::string::npos) << ok.text;
  EXPECT_NE(ok.text.find("\"generated_tokens\": 5"), std::string::npos) << ok.text;
#ifdef MULTIPOLE_HAVE_TOKENIZER
  Output tok = run("generate --model " + m + " --prompt hello");
  EXPECT_EQ(tok.code, 1);
  EXPECT_NE(tok.text.find("missing tokenizer"), std::string::npos) << tok.text;
#endif
  Output ctx = run("generate --model " + m + " --prompt-ids 1,2,3,4,5,6 --ctx 4");
  EXPECT_EQ(ctx.code, 1);
  EXPECT_NE(ctx.text.find("context limit of 4 tokens"), std::string::npos) << ctx.text;
  Output pol = run("generate --model " + m + " --prompt-ids 1,2 --attention sparse");
  EXPECT_EQ(pol.code, 1);
  EXPECT_NE(pol.text.find("unknown attention policy 'sparse'"), std::string::npos) << pol.text;
  Output insp = run("inspect " + m + " --json");
  ASSERT_EQ(insp.code, 0) << insp.text;
  EXPECT_NE(insp.text.find("\"architecture\": \"qwen2\""), std::string::npos);
  EXPECT_NE(insp.text.find("\"runnable\": true"), std::string::npos);
  EXPECT_NE(insp.text.find("model.layers.1.mlp.down_proj.weight"), std::string::npos);
}

}  // namespace
}  // namespace multipole
