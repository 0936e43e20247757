// `multipole attn` and `multipole trace`, run as the built binary.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "multipole/attention/synthetic.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/io/trace.hpp"
#include "cli_run.hpp"
#include "io/temp_dir.hpp"

using namespace multipole;
using multipole::test_util::TempDir;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using Result = multipole::test::CliResult;
using multipole::test::slurp;

Result run_cli(const TempDir& dir, const std::string& args) { return multipole::test::run_cli(dir.path.string(), args); }

// A failure must be an orderly exit with a message, never a signal or a sanitizer report.
void expect_clean_failure(const Result& r, const std::string& expect, const std::string& what) {
  EXPECT_GT(r.code, 0) << what << ": exit code " << r.code << "\n" << r.err;
  EXPECT_NE(r.err.find(expect), std::string::npos) << what << ": stderr lacks '" << expect << "':\n" << r.err;
  EXPECT_EQ(r.err.find("Sanitizer"), std::string::npos) << what << r.err;
  EXPECT_EQ(r.err.find("runtime error"), std::string::npos) << what << r.err;
}

// Rotate-half RoPE in float64 over the first `rotary` channels, frequencies theta^(-2i/rotary)
// divided by `linear_factor`; independent of the library's Rope.
void rope64(double* x, int rotary, double pos, double theta, double linear_factor = 1) {
  const int half = rotary / 2;
  for (int i = 0; i < half; ++i) {
    double a = pos * std::pow(theta, -2.0 * i / rotary) / linear_factor;
    double x0 = x[i], x1 = x[i + half];
    x[i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
  }
}

// Causal attention with RoPE, naive float64: o [T, Hq, d].
std::vector<double> naive_attention(const Trace& t, double linear_factor = 1) {
  const int d = t.head_dim, group = t.num_q_heads / t.num_kv_heads;
  const int rotary = t.rope.rotary_dim ? t.rope.rotary_dim : d;
  const int64_t n = t.tokens;
  std::vector<double> k(t.k.begin(), t.k.end());
  for (int64_t j = 0; j < n; ++j)
    for (int h = 0; h < t.num_kv_heads; ++h)
      rope64(&k[(j * t.num_kv_heads + h) * d], rotary, double(j), t.rope.theta, linear_factor);
  std::vector<double> out(t.q.size());
  for (int64_t s = 0; s < t.generated; ++s) {
    const int64_t pos = t.prompt_tokens() + s;
    for (int g = 0; g < t.num_q_heads; ++g) {
      std::vector<double> q(t.q.begin() + (s * t.num_q_heads + g) * d, t.q.begin() + (s * t.num_q_heads + g + 1) * d);
      rope64(q.data(), rotary, double(pos), t.rope.theta, linear_factor);
      const int h = g / group;
      std::vector<double> w(pos + 1);
      double m = -1e300;
      for (int64_t j = 0; j <= pos; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += q[c] * k[(j * t.num_kv_heads + h) * d + c];
        w[j] = dot / std::sqrt(double(d));
        m = std::max(m, w[j]);
      }
      double z = 0;
      for (double& x : w) z += x = std::exp(x - m);
      double* o = &out[(s * t.num_q_heads + g) * d];
      for (int64_t j = 0; j <= pos; ++j)
        for (int c = 0; c < d; ++c) o[c] += w[j] / z * t.v[(j * t.num_kv_heads + h) * d + c];
    }
  }
  return out;
}

double max_rel_diff(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num = std::max(num, std::abs(got[i] - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / den;
}

const char* kSmallConfig = "--sinks 4 --window 16 --block-size 64 --tokens-per-centroid 4,16 --budget 32 --threads 2";

}  // namespace

TEST(AttnCli, SynthTraceThenAttnWritesOutputsAndJson) {
  TempDir dir;
  const std::string trace = dir.file("t.safetensors"), out = dir.file("o.safetensors");
  Result r = run_cli(dir, "trace synth " + trace +
                              " --tokens 300 --generated 40 --q-heads 4 --kv-heads 2 --head-dim 32 --clusters 8 "
                              "--seed 3 --rope-theta 10000");
  ASSERT_EQ(r.code, 0) << r.err;
  r = run_cli(dir, "trace info " + trace);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("tokens N = 300 (260 prompt + 40 generated)"), std::string::npos) << r.out;

  r = run_cli(dir, "attn " + trace + " " + kSmallConfig + " --json --out " + out);
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);  // throws (fails the test) if not JSON
  EXPECT_EQ(doc["tokens"], 300);
  EXPECT_EQ(doc["generated"], 40);
  EXPECT_EQ(doc["config"]["budget"], 32);
  EXPECT_EQ(doc["config"]["tokens_per_centroid"], json::array({4, 16}));
  ASSERT_GE(doc["policies"].size(), 1u);
  EXPECT_EQ(doc["policies"][0]["name"], "dense");
  EXPECT_EQ(doc["policies"][0]["rel_l2"], 0.0);

  SafetensorsFile f(out);
  for (const auto& p : doc["policies"]) {
    const auto& o = f.tensor("o_" + p["name"].get<std::string>());
    EXPECT_EQ(o.dtype, SafetensorsDType::F32);
    EXPECT_EQ(o.shape, (std::vector<int64_t>{40, 4, 32}));
    // Every policy's error is measured against the dense output in the same file.
    if (p["name"] == "dense") continue;
    auto a = o.to_f32(), ref = f.tensor("o_dense").to_f32();
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (a[i] - ref[i]) * double(a[i] - ref[i]);
      den += double(ref[i]) * ref[i];
    }
    EXPECT_NEAR(p["rel_l2"].get<double>(), std::sqrt(num / den), 1e-6 + 1e-6 * std::sqrt(num / den)) << p["name"];
  }
  EXPECT_EQ(f.tensors().size(), doc["policies"].size());

  // The table form names every policy.
  r = run_cli(dir, "attn " + trace + " " + kSmallConfig + " --policies dense");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("dense"), std::string::npos);
  EXPECT_NE(r.out.find("rel_l2"), std::string::npos);
}

// The dense policy's output equals causal attention with RoPE computed here in float64.
TEST(AttnCli, DenseMatchesNaiveFloat64) {
  TempDir dir;
  struct Case {
    const char* what;
    int rotary_dim;
    double linear_factor;
    const char* kv_dtype;
    double tol;
  };
  for (const Case& c : {Case{"plain f32", 0, 1, "f32", 2e-5}, Case{"partial rotary, linear x2", 16, 2, "f32", 2e-5},
                        Case{"bf16 cache", 0, 1, "bf16", 2e-2}}) {
    SyntheticTraceParams p{.tokens = 200, .generated = 17, .num_q_heads = 6, .num_kv_heads = 2, .head_dim = 32,
                           .clusters = 6, .seed = 11};
    Trace t = make_synthetic_trace(p);
    t.rope.rotary_dim = c.rotary_dim;
    if (c.linear_factor != 1) {
      t.rope.scaling = RopeConfig::Scaling::Linear;
      t.rope.factor = c.linear_factor;
    }
    const std::string trace = dir.file("t.safetensors"), out = dir.file("o.safetensors");
    write_trace(trace, t);
    Result r = run_cli(dir, "attn " + trace + " --policies dense --threads 2 --kv-dtype " + c.kv_dtype + " --out " + out);
    ASSERT_EQ(r.code, 0) << c.what << ": " << r.err;
    auto got = SafetensorsFile(out).tensor("o_dense").to_f32();
    const double err = max_rel_diff(got, naive_attention(t, c.linear_factor));
    EXPECT_LT(err, c.tol) << c.what;
    if (c.tol < 1e-3) {
      EXPECT_GT(err, 0.0);  // sanity: not comparing a thing with itself
    }
  }
}

TEST(AttnCli, DumpIndexMatchesTheTrace) {
  TempDir dir;
  const std::string trace = dir.file("t.safetensors"), idx = dir.file("i.safetensors");
  SyntheticTraceParams p{.tokens = 400, .generated = 40, .num_q_heads = 4, .num_kv_heads = 2, .head_dim = 32,
                         .clusters = 8, .seed = 5};
  const Trace t = make_synthetic_trace(p);
  write_trace(trace, t);
  Result r = run_cli(dir, "attn " + trace + " --policies multipole " + kSmallConfig + " --dump-index " + idx);
  ASSERT_EQ(r.code, 0) << r.err;
  SafetensorsFile f(idx);
  for (int h = 0; h < 2; ++h) {
    const std::string pre = "layer0.head" + std::to_string(h);
    const int64_t begin = std::stoll(std::string(*f.metadata(pre + ".clustered_begin")));
    const int64_t end = std::stoll(std::string(*f.metadata(pre + ".clustered_end")));
    EXPECT_EQ(begin, 4);  // sinks
    EXPECT_GT(end, 300);
    const auto& labels_t = f.tensor(pre + ".labels");
    ASSERT_EQ(labels_t.numel(), end - begin);
    std::vector<int32_t> labels(static_cast<size_t>(end - begin));
    std::memcpy(labels.data(), labels_t.bytes.data(), labels.size() * 4);
    const auto keys = f.tensor(pre + ".level0.key_centroids").to_f32();
    const auto values = f.tensor(pre + ".level0.value_centroids").to_f32();
    const auto& sizes_t = f.tensor(pre + ".level0.sizes");
    const int64_t clusters = sizes_t.numel();
    ASSERT_GT(clusters, 0);
    std::vector<int32_t> sizes(static_cast<size_t>(clusters));
    std::memcpy(sizes.data(), sizes_t.bytes.data(), sizes.size() * 4);
    // Centroids are means of their members' pre-RoPE keys and of their values.
    std::vector<double> ksum(size_t(clusters) * 32), vsum(ksum.size());
    std::vector<int32_t> count(static_cast<size_t>(clusters));
    for (int64_t i = 0; i < end - begin; ++i) {
      const int32_t c = labels[size_t(i)];
      ASSERT_TRUE(c >= 0 && c < clusters) << c;
      ++count[c];
      for (int j = 0; j < 32; ++j) {
        ksum[c * 32 + j] += t.k[((begin + i) * 2 + h) * 32 + j];
        vsum[c * 32 + j] += t.v[((begin + i) * 2 + h) * 32 + j];
      }
    }
    for (int64_t c = 0; c < clusters; ++c) {
      ASSERT_EQ(count[c], sizes[c]) << "cluster " << c;
      if (count[c] == 0) continue;
      for (int j = 0; j < 32; ++j) {
        EXPECT_NEAR(keys[c * 32 + j], ksum[c * 32 + j] / count[c], 1e-3) << "head " << h << " cluster " << c;
        EXPECT_NEAR(values[c * 32 + j], vsum[c * 32 + j] / count[c], 1e-4) << "head " << h << " cluster " << c;
      }
    }
    EXPECT_NE(f.find(pre + ".level1.key_centroids"), nullptr);
  }
}

// Invariants of the method (docs/multipole-attention.md), through the whole command: a budget
// covering every token gives dense for every policy; singleton clusters scored at their real
// positions give dense for multipole at any budget, while dropping keys does not.
TEST(AttnCli, InvariantsHoldEndToEnd) {
  TempDir dir;
  const std::string trace = dir.file("t.safetensors");
  Result r = run_cli(dir, "trace synth " + trace + " --tokens 600 --generated 40 --head-dim 32 --clusters 8");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string common = " --sinks 4 --window 16 --block-size 64 --threads 2 --json";
  r = run_cli(dir, "attn " + trace + common + " --budget 100000 --coarse-budget 100000 --tokens-per-centroid 4,16");
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);
  EXPECT_EQ(doc["policies"].size(), 5u);
  for (const auto& p : doc["policies"]) EXPECT_LT(p["rel_l2"].get<double>(), 1e-5) << p["name"];
  // So does re-ranking candidates that cover every token.
  r = run_cli(dir, "attn " + trace + common +
                       " --policies multipole --budget 100000 --coarse-budget 100000 --rerank-tokens 200000");
  ASSERT_EQ(r.code, 0) << r.err;
  doc = json::parse(r.out);
  for (const auto& p : doc["policies"]) EXPECT_LT(p["rel_l2"].get<double>(), 1e-5) << p["name"];

  r = run_cli(dir, "attn " + trace + common + " --budget 0 --tokens-per-centroid 1 --real-positions");
  ASSERT_EQ(r.code, 0) << r.err;
  doc = json::parse(r.out);
  for (const auto& p : doc["policies"]) {
    if (p["name"] == "multipole" || p["name"] == "dense") {
      EXPECT_LT(p["rel_l2"].get<double>(), 1e-5) << p["name"];
    } else {
      EXPECT_GT(p["rel_l2"].get<double>(), 0.1) << p["name"];  // budget 0: middle keys are dropped
    }
  }
}

// Queries that align with single earlier tokens (the synthetic trace's focus) are what a
// centroid blurs: re-ranking the candidates by their members' exact logits lowers the error of
// both clustered policies against dense.
TEST(AttnCli, RerankLowersTheErrorOnFocusedQueries) {
  TempDir dir;
  const std::string trace = dir.file("t.safetensors");
  Result r = run_cli(dir, "trace synth " + trace + " --tokens 4096 --generated 32 --q-heads 8 --kv-heads 2 --head-dim 64");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string common = " --policies multipole,squeezed --budget 64 --threads 2 --json";
  std::map<std::string, double> err[2];
  for (int rerank : {0, 1}) {
    r = run_cli(dir, "attn " + trace + common + (rerank ? " --rerank-tokens 512" : ""));
    ASSERT_EQ(r.code, 0) << r.err;
    const json doc = json::parse(r.out);
    for (const auto& p : doc["policies"]) err[rerank][p["name"].get<std::string>()] = p["rel_l2"].get<double>();
  }
  for (const char* name : {"multipole", "squeezed"}) {
    std::printf("[ info ] %s rel_l2: centroid ranking %.4f, re-ranked %.4f\n", name, err[0][name], err[1][name]);
    EXPECT_LT(err[1][name], 0.9 * err[0][name]) << name;
  }
}

TEST(AttnCli, BadInputFailsCleanly) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors");
  SyntheticTraceParams p{.tokens = 64, .generated = 8, .num_q_heads = 4, .num_kv_heads = 2, .head_dim = 16,
                         .clusters = 4};
  Trace t = make_synthetic_trace(p);
  write_trace(good, t);

  expect_clean_failure(run_cli(dir, "attn " + dir.file("missing.safetensors")), "cannot open", "missing file");
  {
    std::ifstream in(good, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (size_t cut : {size_t(4), size_t(40), bytes.size() / 2, bytes.size() - 1}) {
      std::ofstream(dir.file("cut.safetensors"), std::ios::binary).write(bytes.data(), std::streamsize(cut));
      expect_clean_failure(run_cli(dir, "attn " + dir.file("cut.safetensors")), "cut.safetensors",
                           "truncated to " + std::to_string(cut));
    }
  }
  // Shape and value problems, written with the plain safetensors writer.
  auto raw = [&](const std::vector<int64_t>& qs, const std::vector<int64_t>& ks, const std::vector<int64_t>& vs,
                 bool theta, float poison) {
    auto numel = [](const std::vector<int64_t>& s) {
      int64_t n = 1;
      for (auto x : s) n *= x;
      return size_t(n);
    };
    std::vector<float> q(numel(qs), 0.5f), k(numel(ks), 0.25f), v(numel(vs), 1.0f);
    if (poison != 0) q[7] = poison;
    SafetensorsWriter w;
    w.add("q", qs, q.data());
    w.add("k", ks, k.data());
    w.add("v", vs, v.data());
    if (theta) w.set_metadata("rope_theta", "10000");
    const std::string path = dir.file("raw.safetensors");
    w.write(path);
    return path;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  expect_clean_failure(run_cli(dir, "attn " + raw({2, 4, 16}, {10, 2, 16}, {9, 2, 16}, true, 0)),
                       "k has shape [10, 2, 16] but v has shape [9, 2, 16]", "k/v mismatch");
  expect_clean_failure(run_cli(dir, "attn " + raw({12, 4, 16}, {10, 2, 16}, {10, 2, 16}, true, 0)),
                       "q has 12 tokens", "T > N");
  expect_clean_failure(run_cli(dir, "attn " + raw({2, 3, 16}, {10, 2, 16}, {10, 2, 16}, true, 0)),
                       "not a multiple", "Hq % Hkv");
  expect_clean_failure(run_cli(dir, "attn " + raw({2, 4, 16}, {10, 2, 16}, {10, 2, 16}, true, nan)),
                       "q[0, 0, 7] is nan", "NaN in q");
  expect_clean_failure(run_cli(dir, "attn " + raw({2, 4, 16}, {10, 2, 16}, {10, 2, 16}, false, 0)),
                       "missing metadata 'rope_theta'", "no rope_theta");
  expect_clean_failure(run_cli(dir, "attn " + raw({2, 4, 24}, {10, 2, 24}, {10, 2, 24}, true, 0)),
                       "head_dim 24 must be a multiple of 16", "head dim 24");

  // Bad options.
  expect_clean_failure(run_cli(dir, "attn " + good + " --budget -1"), "--budget", "budget -1");
  expect_clean_failure(run_cli(dir, "attn " + good + " --budget -1"), "must be >= 0", "budget -1");
  expect_clean_failure(run_cli(dir, "attn " + good + " --policies dense,nope"), "unknown policy 'nope'",
                       "unknown policy");
  expect_clean_failure(run_cli(dir, "attn " + good + " --tokens-per-centroid 0"), "--tokens-per-centroid",
                       "tokens per centroid 0");
  expect_clean_failure(run_cli(dir, "attn " + good + " --tokens-per-centroid 16,8"), "tokens_per_centroid[1] = 8",
                       "levels not increasing");
  expect_clean_failure(run_cli(dir, "attn " + good + " --budget 64 --rerank-tokens 64"),
                       "rerank_tokens 64 must be 0 (off) or above the budget 64", "rerank at the budget");
  expect_clean_failure(run_cli(dir, "attn " + good + " --rerank-tokens -5"), "--rerank-tokens", "rerank -5");
  expect_clean_failure(run_cli(dir, "attn " + good + " --window 0"), "--window", "window 0");
  expect_clean_failure(run_cli(dir, "attn " + good + " --block-size 8"), "block_size 8 must be >= window",
                       "block < window");
  expect_clean_failure(run_cli(dir, "attn " + good + " --kv-dtype f8"), "unknown dtype 'f8'", "kv dtype");
  expect_clean_failure(run_cli(dir, "attn " + good + " --score-position nan"), "--score-position", "nan position");
  expect_clean_failure(run_cli(dir, "attn " + good + " --threads x"), "--threads", "threads x");
  expect_clean_failure(run_cli(dir, "attn " + good + " --out " + dir.file("no/such/o.safetensors")),
                       "does not exist", "out folder");
  expect_clean_failure(run_cli(dir, "attn"), "trace", "no trace");
  expect_clean_failure(run_cli(dir, "trace synth " + dir.file("s") + " --tokens 10 --generated 20"),
                       "generated 20 must be in [1, tokens=10]", "synth T > N");
  expect_clean_failure(run_cli(dir, "trace synth " + dir.file("s") + " --q-heads 3 --kv-heads 2"), "multiple",
                       "synth heads");
  expect_clean_failure(run_cli(dir, "trace synth " + dir.file("s") + " --dtype int8"), "unknown dtype", "synth dtype");
  expect_clean_failure(run_cli(dir, "trace info " + raw({2, 4, 16}, {10, 2, 16}, {10, 2, 16}, true, nan)), "is nan",
                       "info NaN");
}

TEST(AttnCli, HelpDescribesTheOptions) {
  TempDir dir;
  Result r = run_cli(dir, "attn --help");
  EXPECT_EQ(r.code, 0);
  for (const char* opt : {"--budget", "--coarse-budget", "--tokens-per-centroid", "--block-size", "--sinks", "--window",
                          "--prefill-iterations", "--update-iterations", "--seed", "--score-position",
                          "--real-positions", "--rerank-tokens", "--kv-dtype", "--threads", "--policies", "--out",
                          "--dump-index", "--json"})
    EXPECT_NE(r.out.find(opt), std::string::npos) << opt;
  r = run_cli(dir, "trace synth --help");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("--tokens"), std::string::npos);
}
