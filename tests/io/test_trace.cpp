#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/io/trace.hpp"
#include "io/temp_dir.hpp"

using namespace multipole;
using multipole::test_util::TempDir;
namespace fs = std::filesystem;

namespace {

// Values i * 0.25 - 3 (exact in bf16 for small i) so round trips can be checked exactly.
std::vector<float> ramp(size_t n, float offset = 0) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = float(i % 64) * 0.25f - 3 + offset;
  return x;
}

Trace small_trace() {
  Trace t;
  t.tokens = 9;
  t.generated = 3;
  t.num_q_heads = 4;
  t.num_kv_heads = 2;
  t.head_dim = 8;
  t.q = ramp(3 * 4 * 8);
  t.k = ramp(9 * 2 * 8, 1);
  t.v = ramp(9 * 2 * 8, 2);
  t.rope.theta = 500000;
  t.rope.head_dim = 8;
  t.metadata["model"] = "test";
  return t;
}

// Writes raw tensors + metadata, bypassing write_trace's validation.
struct RawTrace {
  std::vector<int64_t> q_shape{3, 4, 8}, k_shape{9, 2, 8}, v_shape{9, 2, 8};
  StringMap metadata{{"rope_theta", "10000"}};
  float q_poison = 0;  // set at q[1, 2, 5] when nonzero
  DType dtype = DType::F32;
  bool skip_v = false;

  std::string write(const std::string& path) const {
    SafetensorsWriter w;
    auto numel = [](const std::vector<int64_t>& s) {
      int64_t n = 1;
      for (auto x : s) n *= x;
      return size_t(n);
    };
    auto q = ramp(numel(q_shape));
    if (q_poison != 0) q[(1 * 4 + 2) * 8 + 5] = q_poison;
    w.add("q", q_shape, q.data(), dtype);
    w.add("k", k_shape, ramp(numel(k_shape)).data(), dtype);
    if (!skip_v) w.add("v", v_shape, ramp(numel(v_shape)).data(), dtype);
    for (const auto& [k, v] : metadata) w.set_metadata(k, v);
    w.write(path);
    return path;
  }
};

std::string trace_error(const std::string& path) {
  try {
    read_trace(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Trace, RoundTripF32AndBF16) {
  TempDir dir;
  Trace t = small_trace();
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    const std::string path = dir.file("t.safetensors");
    write_trace(path, t, dt);
    Trace r = read_trace(path);
    EXPECT_EQ(r.tokens, 9);
    EXPECT_EQ(r.generated, 3);
    EXPECT_EQ(r.prompt_tokens(), 6);
    EXPECT_EQ(r.num_q_heads, 4);
    EXPECT_EQ(r.num_kv_heads, 2);
    EXPECT_EQ(r.head_dim, 8);
    EXPECT_EQ(r.q, t.q);  // exactly representable in every storage type
    EXPECT_EQ(r.k, t.k);
    EXPECT_EQ(r.v, t.v);
    EXPECT_EQ(r.rope.theta, 500000);
    EXPECT_EQ(r.rope.scaling, RopeConfig::Scaling::None);
    EXPECT_EQ(r.metadata.at("model"), "test");
    EXPECT_EQ(r.metadata.count("rope_theta"), 0u);  // parsed into rope
    SafetensorsFile f(path);
    EXPECT_EQ(f.metadata("format"), "multipole-trace/1");
    EXPECT_EQ(f.tensor("q").dtype, to_safetensors_dtype(dt));
  }
}

TEST(Trace, RopeScalingRoundTrip) {
  TempDir dir;
  Trace t = small_trace();
  t.rope.scaling = RopeConfig::Scaling::Llama3;
  t.rope.factor = 8;
  t.rope.low_freq_factor = 1;
  t.rope.high_freq_factor = 4;
  t.rope.original_max_position = 8192;
  t.rope.rotary_dim = 4;
  write_trace(dir.file("a"), t);
  Trace r = read_trace(dir.file("a"));
  EXPECT_EQ(r.rope.scaling, RopeConfig::Scaling::Llama3);
  EXPECT_EQ(r.rope.factor, 8);
  EXPECT_EQ(r.rope.high_freq_factor, 4);
  EXPECT_EQ(r.rope.original_max_position, 8192);
  EXPECT_EQ(r.rope.rotary_dim, 4);

  t.rope = RopeConfig{.theta = 1e6, .head_dim = 8, .scaling = RopeConfig::Scaling::Yarn, .factor = 4,
                      .original_max_position = 32768, .attention_factor = 1.5};
  write_trace(dir.file("b"), t);
  r = read_trace(dir.file("b"));
  EXPECT_EQ(r.rope.scaling, RopeConfig::Scaling::Yarn);
  EXPECT_EQ(r.rope.theta, 1e6);
  EXPECT_EQ(r.rope.factor, 4);
  EXPECT_EQ(r.rope.original_max_position, 32768);
  EXPECT_EQ(r.rope.attention_factor, 1.5);
}

TEST(Trace, ParsesHuggingFaceRopeScaling) {
  RopeConfig r;
  apply_rope_scaling(R"({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192, "rope_type": "llama3"})", r, "cfg");
  EXPECT_EQ(r.scaling, RopeConfig::Scaling::Llama3);
  EXPECT_EQ(r.factor, 8.0);
  RopeConfig y;
  apply_rope_scaling(R"({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})", y, "cfg");
  EXPECT_EQ(y.scaling, RopeConfig::Scaling::Yarn);
  EXPECT_EQ(y.original_max_position, 32768);
  RopeConfig l;
  apply_rope_scaling(R"({"rope_type": "linear", "factor": 2})", l, "cfg");
  EXPECT_EQ(l.scaling, RopeConfig::Scaling::Linear);
  RopeConfig n;
  apply_rope_scaling("null", n, "cfg");
  EXPECT_EQ(n.scaling, RopeConfig::Scaling::None);

  auto err = [](const char* text) -> std::string {
    RopeConfig c;
    try {
      apply_rope_scaling(text, c, "cfg");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(err(R"({"rope_type": "dynamic", "factor": 2})").find("unsupported rope_type 'dynamic'"), std::string::npos);
  EXPECT_NE(err(R"({"rope_type": "linear"})").find("needs field 'factor'"), std::string::npos);
  EXPECT_NE(err(R"({"rope_type": "linear", "factor": "2"})").find("expected a finite number"), std::string::npos);
  EXPECT_NE(err(R"({"rope_type": "linear", "factor": -2})").find("must be > 0"), std::string::npos);
  EXPECT_NE(err(R"({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "mscale": 1})")
                .find("field 'mscale' is not supported"),
            std::string::npos);
  EXPECT_NE(err(R"({"factor": 2})").find("missing string field 'rope_type'"), std::string::npos);
  EXPECT_NE(err("{oops").find("invalid JSON"), std::string::npos);
  EXPECT_NE(err("[1]").find("expected a JSON object"), std::string::npos);
}

TEST(Trace, BadTracesThrowNamingTheProblem) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  struct Case {
    const char* what;
    RawTrace raw;
    const char* expect;
  };
  auto with = [](auto edit) {
    RawTrace r;
    edit(r);
    return r;
  };
  std::vector<Case> cases = {
      {"k/v mismatch", with([](RawTrace& r) { r.v_shape = {8, 2, 8}; }), "k has shape [9, 2, 8] but v has shape [8, 2, 8]"},
      {"T > N", with([](RawTrace& r) { r.q_shape = {10, 4, 8}; }), "more than the 9 of k"},
      {"T = 0", with([](RawTrace& r) { r.q_shape = {0, 4, 8}; }), "no generated tokens"},
      {"Hq % Hkv", with([](RawTrace& r) { r.q_shape = {3, 3, 8}; }), "3 heads (shape [3, 3, 8]) are not a multiple"},
      {"head dims", with([](RawTrace& r) { r.q_shape = {3, 4, 16}; }), "head dim 16"},
      {"odd head dim", with([](RawTrace& r) { r.q_shape = {3, 4, 7}; r.k_shape = r.v_shape = {9, 2, 7}; }),
       "must be even"},
      {"q rank 2", with([](RawTrace& r) { r.q_shape = {3, 32}; }), "tensor 'q' has shape [3, 32], expected rank 3"},
      {"missing v", with([](RawTrace& r) { r.skip_v = true; }), "missing tensor 'v'"},
      {"NaN in q", with([](RawTrace& r) { r.q_poison = std::numeric_limits<float>::quiet_NaN(); }), "q[1, 2, 5] is nan"},
      {"Inf in q (bf16)",
       with([](RawTrace& r) { r.q_poison = std::numeric_limits<float>::infinity(); r.dtype = DType::BF16; }),
       "q[1, 2, 5] is inf"},
      {"missing rope_theta", with([](RawTrace& r) { r.metadata.clear(); }), "missing metadata 'rope_theta'"},
      {"bad rope_theta", with([](RawTrace& r) { r.metadata["rope_theta"] = "1e4x"; }), "rope_theta '1e4x' is not a number"},
      {"rope_theta <= 1", with([](RawTrace& r) { r.metadata["rope_theta"] = "0.5"; }), "rope_theta 0.5 must be"},
      {"bad rope_scaling", with([](RawTrace& r) { r.metadata["rope_scaling"] = "{\"rope_type\":\"longrope\"}"; }),
       "unsupported rope_type 'longrope'"},
      {"bad rotary_dim", with([](RawTrace& r) { r.metadata["rotary_dim"] = "3.5"; }), "rotary_dim 3.5"},
      {"wrong format", with([](RawTrace& r) { r.metadata["format"] = "other/2"; }), "format 'other/2'"},
  };
  for (const auto& c : cases) {
    std::string msg = trace_error(c.raw.write(path));
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": got '" << msg << "'";
    EXPECT_NE(msg.find(path), std::string::npos) << c.what << ": message does not name the file: " << msg;
  }
  // An integer tensor is refused by dtype.
  SafetensorsWriter w;
  std::vector<int32_t> ints(3 * 4 * 8);
  w.add_raw("q", SafetensorsDType::I32, {3, 4, 8}, std::as_bytes(std::span(ints)));
  w.add("k", {9, 2, 8}, ramp(144).data());
  w.add("v", {9, 2, 8}, ramp(144).data());
  w.set_metadata("rope_theta", "10000");
  w.write(path);
  EXPECT_NE(trace_error(path).find("tensor 'q' has dtype I32"), std::string::npos);
  EXPECT_NE(trace_error(dir.file("absent")).find("cannot open"), std::string::npos);
}

TEST(Trace, WriteValidates) {
  TempDir dir;
  Trace t = small_trace();
  t.k.pop_back();
  EXPECT_THROW(write_trace(dir.file("x"), t), Error);
  t = small_trace();
  t.v[5] = std::numeric_limits<float>::infinity();
  try {
    write_trace(dir.file("x"), t);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("v[0, 0, 5] is inf"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.file("x")));
}
