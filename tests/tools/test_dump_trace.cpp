// `multipole generate --dump-trace`: the traces of a tiny random-weight model's generation
// hold the right pre-RoPE q, k, v (layer 0 recomputed here from the weights in float64; the
// last layer's keys, rotated with the trace's own RoPE, equal what the model's KV cache
// holds), and `multipole attn` replays them: its dense output equals attention over the
// model's cache, and a budget covering everything gives dense.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_run.hpp"
#include "io/temp_dir.hpp"
#include "model/tiny_model.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/core/error.hpp"
#include "multipole/engine/engine.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/io/trace.hpp"
#include "multipole/model/model.hpp"
#include "multipole/model/trace_capture.hpp"

using namespace multipole;
using multipole::test_util::TempDir;
using json = nlohmann::json;

namespace {

using Result = multipole::test::CliResult;
using multipole::test::slurp;

Result run_cli(const TempDir& dir, const std::string& args) { return multipole::test::run_cli(dir.path.string(), args); }

struct Case {
  std::string family;
  bool gguf = false;           // GGUF Llama stores Q/K rows permuted: the dump must undo it
  bool llama3_scaling = false;  // rope_scaling must travel in the trace's metadata
};

// Writes the tiny model; returns the path to pass to --model.
std::string write_model(const tiny::Weights& w, const Case& c, const TempDir& dir) {
  if (c.gguf) {
    const std::string path = dir.file("tiny.gguf");
    tiny::gguf_builder(w, 0).write(path);
    return path;
  }
  const std::string folder = dir.file("tiny");
  tiny::write_safetensors(w, folder);
  if (c.llama3_scaling) {
    std::string cfg = slurp(folder + "/config.json");
    const std::string from = "\"rope_scaling\": null";
    const size_t at = cfg.find(from);
    EXPECT_NE(at, std::string::npos);
    cfg.replace(at, from.size(),
                R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, )"
                R"("high_freq_factor": 4.0, "original_max_position_embeddings": 64})");
    std::ofstream(folder + "/config.json", std::ios::trunc) << cfg;
  }
  return folder;
}

// Layer 0's pre-RoPE q, k, v of one token straight from the weights (the embedding is the
// layer's input), in float64: RMSNorm, projections, bias, per-head q/k RMSNorm.
struct QKV {
  std::vector<double> q, k, v;
};
QKV layer0_qkv(const tiny::Weights& w, int32_t token) {
  const tiny::Config& c = w.c;
  const tiny::Layer& L = w.layers[0];
  const int H = c.hidden, hd = c.head_dim;
  std::vector<double> x(size_t(H), 0.0);
  double ss = 0;
  for (int i = 0; i < H; ++i) ss += double(w.embed[size_t(token) * H + i]) * w.embed[size_t(token) * H + i];
  const double inv = 1.0 / std::sqrt(ss / H + c.eps);
  for (int i = 0; i < H; ++i) x[size_t(i)] = w.embed[size_t(token) * H + i] * inv * L.attn_norm[size_t(i)];
  auto project = [&](const std::vector<float>& W, const std::vector<float>& b, int heads,
                     const std::vector<float>& norm) {
    std::vector<double> y(size_t(heads) * hd, 0.0);
    for (size_t r = 0; r < y.size(); ++r) {
      for (int i = 0; i < H; ++i) y[r] += double(W[r * H + size_t(i)]) * x[size_t(i)];
      if (!b.empty()) y[r] += b[r];
    }
    if (!norm.empty())
      for (int h = 0; h < heads; ++h) {
        double s = 0;
        for (int i = 0; i < hd; ++i) s += y[size_t(h * hd + i)] * y[size_t(h * hd + i)];
        const double n = 1.0 / std::sqrt(s / hd + c.eps);
        for (int i = 0; i < hd; ++i) y[size_t(h * hd + i)] *= n * norm[size_t(i)];
      }
    return y;
  };
  return {project(L.wq, L.bq, c.heads, L.q_norm), project(L.wk, L.bk, c.kv_heads, L.k_norm),
          project(L.wv, L.bv, c.kv_heads, {})};
}

// max |a - b| / max(1, max |b|) over a row.
double row_error(const float* a, const double* b, size_t n) {
  double err = 0, scale = 1;
  for (size_t i = 0; i < n; ++i) {
    err = std::max(err, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return err / scale;
}

// The last layer's trace against the model's own KV cache (f32) after the same prefill and
// decode steps as the CLI ran: the trace's keys rotated with the trace's RoPE to their
// positions, values as they are; then `multipole attn` on the trace: dense error 0 by
// definition, a budget covering every token gives dense, and its dense output is attention
// over the cache.
void check_against_cache(const TempDir& dir, const std::string& model, const std::string& trace_path,
                         const std::vector<int32_t>& fed, int64_t P, RopeConfig::Scaling scaling) {
  const Trace tl = read_trace(trace_path);
  const int64_t N = int64_t(fed.size()), T = N - P;
  ASSERT_EQ(tl.tokens, N);
  ASSERT_EQ(tl.generated, T);
  EXPECT_EQ(tl.rope.scaling, scaling);
  std::unique_ptr<Model> m = Model::load(model);
  const ModelConfig& mc = m->config();
  ASSERT_EQ(tl.num_q_heads, mc.num_heads);
  ASSERT_EQ(tl.num_kv_heads, mc.num_kv_heads);
  ASSERT_EQ(tl.head_dim, mc.head_dim);
  EXPECT_EQ(tl.metadata.at("layer"), std::to_string(mc.num_layers - 1));
  const int hq = mc.num_heads, hkv = mc.num_kv_heads, d = mc.head_dim, last_layer = mc.num_layers - 1;
  ThreadPool pool(2);
  EngineOptions eo;
  eo.kv_dtype = DType::F32;
  eo.context_length = N + 8;
  Engine engine(*m, eo, pool);
  const SeqId seq = engine.add_sequence();
  engine.prefill(seq, std::span<const int32_t>(fed).first(size_t(P)));
  for (int64_t p = P; p < N; ++p) engine.decode(seq, fed[size_t(p)]);
  const Rope rope(tl.rope);
  std::vector<float> cached_k(size_t(N) * d), cached_v(size_t(N) * d), kr(static_cast<size_t>(d));
  double k_err = 0, v_err = 0, unrotated_err = 0;
  std::vector<std::vector<float>> keys(static_cast<size_t>(hkv)), values(static_cast<size_t>(hkv));  // [head][N * d]
  for (int h = 0; h < hkv; ++h) {
    engine.cache().read_keys(seq, last_layer, h, 0, N, cached_k.data());
    engine.cache().read_values(seq, last_layer, h, 0, N, cached_v.data());
    keys[size_t(h)] = cached_k;
    values[size_t(h)] = cached_v;
    for (int64_t p = 0; p < N; ++p) {
      const float* k = &tl.k[(size_t(p) * hkv + size_t(h)) * d];
      const float* v = &tl.v[(size_t(p) * hkv + size_t(h)) * d];
      std::copy(k, k + d, kr.begin());
      rope.apply(kr.data(), double(p));
      for (int i = 0; i < d; ++i) {
        const float ck = cached_k[size_t(p) * d + i];
        k_err = std::max(k_err, double(std::fabs(kr[size_t(i)] - ck)) / std::max(1.0f, std::fabs(ck)));
        unrotated_err = std::max(unrotated_err, double(std::fabs(k[i] - ck)));
        v_err = std::max(v_err, double(std::fabs(v[i] - cached_v[size_t(p) * d + i])));
      }
    }
  }
  EXPECT_LT(k_err, 1e-4) << "rotated trace keys differ from the KV cache";
  EXPECT_LT(v_err, 1e-4) << "trace values differ from the KV cache";
  EXPECT_GT(unrotated_err, 1e-2) << "the trace's keys look rotated already (they must be pre-RoPE)";

  const std::string out = dir.file("o.safetensors");
  const Result a = run_cli(dir, "attn " + trace_path +
                                    " --policies dense,multipole --budget 100000 --kv-dtype f32 --threads 2 --json --out " +
                                    out);
  ASSERT_EQ(a.code, 0) << a.err;
  const json aj = json::parse(a.out);
  EXPECT_EQ(aj.at("tokens"), N);
  EXPECT_EQ(aj.at("generated"), T);
  EXPECT_EQ(aj.at("prompt_tokens"), P);
  for (const json& p : aj.at("policies")) EXPECT_LT(p.at("rel_l2").get<double>(), 1e-5) << p.dump();
  const SafetensorsFile of(out);
  const std::vector<float> o = of.tensor("o_dense").to_f32();
  ASSERT_EQ(o.size(), size_t(T) * hq * d);
  const int G = hq / hkv;
  double o_err = 0;
  std::vector<float> qr(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = P + t;
    for (int qh = 0; qh < hq; ++qh) {
      const std::vector<float>& K = keys[size_t(qh / G)];
      const std::vector<float>& V = values[size_t(qh / G)];
      const float* q = &tl.q[(size_t(t) * hq + size_t(qh)) * d];
      std::copy(q, q + d, qr.begin());
      rope.apply(qr.data(), double(pos));
      std::vector<double> s(size_t(pos) + 1);
      double mx = -1e300;
      for (int64_t p = 0; p <= pos; ++p) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += double(qr[size_t(i)]) * K[size_t(p) * d + i];
        s[size_t(p)] = dot / std::sqrt(double(d));
        mx = std::max(mx, s[size_t(p)]);
      }
      double z = 0;
      std::vector<double> ref(size_t(d), 0.0);
      for (int64_t p = 0; p <= pos; ++p) {
        const double e = std::exp(s[size_t(p)] - mx);
        z += e;
        for (int i = 0; i < d; ++i) ref[size_t(i)] += e * V[size_t(p) * d + i];
      }
      for (double& x : ref) x /= z;
      o_err = std::max(o_err, row_error(&o[(size_t(t) * hq + size_t(qh)) * d], ref.data(), ref.size()));
    }
  }
  EXPECT_LT(o_err, 1e-4) << "attn's dense output differs from attention over the model's cache";
}

void check_case(const Case& cs) {
  SCOPED_TRACE(cs.family + (cs.gguf ? " gguf" : " safetensors") + (cs.llama3_scaling ? " llama3 rope" : ""));
  TempDir dir;
  const tiny::Weights w = tiny::random_weights(tiny::family_config(cs.family), 42);
  const tiny::Config& c = w.c;
  const std::string model = write_model(w, cs, dir);
  const std::vector<int32_t> prompt = {5, 17, 33, 8, 9, 40, 71};
  const int n_gen = 6;

  const std::string base = dir.file("run.safetensors");
  const Result g = run_cli(dir, "generate --model " + model + " --prompt-ids 5,17,33,8,9,40,71 -n " +
                                    std::to_string(n_gen) + " -t 0 --ignore-eos --kv-dtype f32 --threads 2 --json" +
                                    " --dump-trace " + base + " --layers 0,-1");
  ASSERT_EQ(g.code, 0) << g.err;
  const json j = json::parse(g.out);
  const auto generated = j.at("tokens").get<std::vector<int32_t>>();
  ASSERT_EQ(generated.size(), size_t(n_gen));
  const std::vector<std::string> paths = j.at("traces").get<std::vector<std::string>>();
  const std::string last = std::to_string(c.layers - 1);
  ASSERT_EQ(paths, (std::vector<std::string>{dir.file("run.L0.safetensors"), dir.file("run.L" + last + ".safetensors")}));

  // Every generated token but the last was fed back: those are the trace's queries.
  std::vector<int32_t> fed = prompt;
  fed.insert(fed.end(), generated.begin(), generated.end() - 1);
  const int64_t N = int64_t(fed.size()), T = n_gen - 1, P = int64_t(prompt.size());
  const int hq = c.heads, hkv = c.kv_heads, d = c.head_dim;

  // Layer 0 against the weights.
  const Trace t0 = read_trace(paths[0]);
  ASSERT_EQ(t0.tokens, N);
  ASSERT_EQ(t0.generated, T);
  ASSERT_EQ(t0.prompt_tokens(), P);
  ASSERT_EQ(t0.num_q_heads, hq);
  ASSERT_EQ(t0.num_kv_heads, hkv);
  ASSERT_EQ(t0.head_dim, d);
  EXPECT_EQ(t0.rope.theta, c.theta);
  EXPECT_EQ(t0.metadata.at("layer"), "0");
  double worst = 0;
  for (int64_t p = 0; p < N; ++p) {
    const QKV r = layer0_qkv(w, fed[size_t(p)]);
    worst = std::max(worst, row_error(&t0.k[size_t(p) * hkv * d], r.k.data(), r.k.size()));
    worst = std::max(worst, row_error(&t0.v[size_t(p) * hkv * d], r.v.data(), r.v.size()));
    if (p >= P) worst = std::max(worst, row_error(&t0.q[size_t(p - P) * hq * d], r.q.data(), r.q.size()));
  }
  EXPECT_LT(worst, 1e-4) << "layer 0 q/k/v differ from the weights' float64 values";

  check_against_cache(dir, model, paths[1], fed, P,
                      cs.llama3_scaling ? RopeConfig::Scaling::Llama3 : RopeConfig::Scaling::None);
}

}  // namespace

TEST(DumpTrace, Qwen3SafetensorsQKNorm) { check_case({"qwen3", false, false}); }
TEST(DumpTrace, Qwen2SafetensorsBias) { check_case({"qwen2", false, false}); }
TEST(DumpTrace, LlamaGGUFPermutedQK) { check_case({"llama", true, false}); }
TEST(DumpTrace, LlamaSafetensorsLlama3RopeScaling) { check_case({"llama", false, true}); }

// The real SmolLM2-135M (Q4_1 GGUF, Llama with permuted Q/K rows, 30 layers) as fetched by
// scripts/fetch-models.sh: the last layer's trace against the cache, and attn on it.
TEST(DumpTrace, RealSmolLM2) {
  const char* cache = std::getenv("MULTIPOLE_MODEL_CACHE");
  const std::string model = (cache ? std::string(cache) : std::string(MULTIPOLE_SOURCE_DIR) + "/.cache/models") +
                            "/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(model)) GTEST_SKIP() << model << " absent (run scripts/fetch-models.sh)";
  TempDir dir;
  const std::vector<int32_t> prompt = {1, 504, 3458, 314, 253, 1183, 28, 1597, 314, 260, 7405, 30, 378};
  const Result g = run_cli(dir, "generate --model " + model +
                                    " --prompt-ids 1,504,3458,314,253,1183,28,1597,314,260,7405,30,378 -n 12 -t 0"
                                    " --ignore-eos --kv-dtype f32 --threads 2 --json --dump-trace " +
                                    dir.file("smol") + " --layers -1");
  ASSERT_EQ(g.code, 0) << g.err;
  const json j = json::parse(g.out);
  const auto generated = j.at("tokens").get<std::vector<int32_t>>();
  ASSERT_EQ(generated.size(), 12u);
  ASSERT_EQ(j.at("traces"), json::array({dir.file("smol.L29.safetensors")}));
  std::vector<int32_t> fed = prompt;
  fed.insert(fed.end(), generated.begin(), generated.end() - 1);
  check_against_cache(dir, model, dir.file("smol.L29.safetensors"), fed, int64_t(prompt.size()),
                      RopeConfig::Scaling::None);
}

TEST(DumpTrace, LayerListsAndPaths) {
  EXPECT_EQ(parse_trace_layers("", 30), (std::vector<int>{0, 29}));
  EXPECT_EQ(parse_trace_layers("", 1), (std::vector<int>{0}));
  EXPECT_EQ(parse_trace_layers("all", 3), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(parse_trace_layers("3,-1,3", 8), (std::vector<int>{3, 7}));
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([] { parse_trace_layers("8", 8); }).find("layer 8 is outside the model's 8 layers"),
            std::string::npos);
  EXPECT_NE(message([] { parse_trace_layers("1,x", 8); }).find("'x' is not a layer index"), std::string::npos);
  EXPECT_NE(message([] { parse_trace_layers("1,", 8); }).find("'' is not a layer index"), std::string::npos);
  EXPECT_EQ(trace_layer_path("out/run.safetensors", 3), "out/run.L3.safetensors");
  EXPECT_EQ(trace_layer_path("run", 0), "run.L0.safetensors");
}

TEST(DumpTrace, CliErrors) {
  TempDir dir;
  const tiny::Weights w = tiny::random_weights(tiny::family_config("llama"), 7);
  const std::string model = dir.file("tiny");
  tiny::write_safetensors(w, model);
  // One generated token is never fed back, so there is no query to write.
  Result r = run_cli(dir, "generate --model " + model + " --prompt-ids 5,6 -n 1 -t 0 --ignore-eos --dump-trace " +
                              dir.file("x"));
  EXPECT_GT(r.code, 0);
  EXPECT_NE(r.err.find("no decode step was captured"), std::string::npos) << r.err;
  r = run_cli(dir, "generate --model " + model + " --prompt-ids 5,6 -n 3 --dump-trace " + dir.file("x") +
                       " --layers 2");
  EXPECT_GT(r.code, 0);
  EXPECT_NE(r.err.find("layer 2 is outside the model's 2 layers"), std::string::npos) << r.err;
  r = run_cli(dir, "generate --model " + model + " --prompt-ids 5,6 -n 3 --layers 1");
  EXPECT_GT(r.code, 0);
  EXPECT_NE(r.err.find("--layers needs --dump-trace"), std::string::npos) << r.err;
}
