#include "multipole/io/trace.hpp"

#include <charconv>
#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/io/json_limits.hpp"

namespace multipole {

namespace {

using json = nlohmann::json;
constexpr std::string_view kFormat = "multipole-trace/1";
constexpr int64_t kMaxHeads = 1 << 12;
constexpr int64_t kMaxHeadDim = 1 << 12;

double parse_number(std::string_view text, std::string_view what) {
  double x = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), x);
  MP_CHECK(ec == std::errc() && end == text.data() + text.size() && !text.empty(), "{} '{}' is not a number", what,
           text);
  MP_CHECK(std::isfinite(x), "{} '{}' is not finite", what, text);
  return x;
}

// "q[3, 1, 17]" for flat index i of a [*, b, c] tensor.
std::string index_text(std::string_view name, size_t i, int64_t b, int64_t c) {
  return fmt::format("{}[{}, {}, {}]", name, int64_t(i) / (b * c), int64_t(i) / c % b, int64_t(i) % c);
}

void check_finite(const std::vector<float>& x, std::string_view what, std::string_view name, int64_t b, int64_t c) {
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) fail("{}: {} is {}; trace values must be finite", what, index_text(name, i, b, c), x[i]);
}

}  // namespace

void Trace::validate(std::string_view what) const {
  MP_CHECK(generated >= 1, "{}: {} generated tokens (q's first dimension); need at least 1", what, generated);
  MP_CHECK(tokens >= generated, "{}: {} generated tokens (q) exceed the {} tokens of k and v", what, generated, tokens);
  MP_CHECK(num_kv_heads >= 1 && num_kv_heads <= kMaxHeads, "{}: {} KV heads, must be in [1, {}]", what, num_kv_heads,
           kMaxHeads);
  MP_CHECK(num_q_heads >= 1 && num_q_heads <= kMaxHeads, "{}: {} query heads, must be in [1, {}]", what, num_q_heads,
           kMaxHeads);
  MP_CHECK(num_q_heads % num_kv_heads == 0, "{}: {} query heads are not a multiple of the {} KV heads", what,
           num_q_heads, num_kv_heads);
  MP_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kMaxHeadDim,
           "{}: head dim {} must be even and in [2, {}]", what, head_dim, kMaxHeadDim);
  MP_CHECK(q.size() == size_t(generated * num_q_heads * head_dim), "{}: q holds {} values, [{}, {}, {}] needs {}",
           what, q.size(), generated, num_q_heads, head_dim, generated * num_q_heads * head_dim);
  const size_t kv = size_t(tokens * num_kv_heads * head_dim);
  MP_CHECK(k.size() == kv, "{}: k holds {} values, [{}, {}, {}] needs {}", what, k.size(), tokens, num_kv_heads,
           head_dim, kv);
  MP_CHECK(v.size() == kv, "{}: v holds {} values, [{}, {}, {}] needs {}", what, v.size(), tokens, num_kv_heads,
           head_dim, kv);
  MP_CHECK(rope.head_dim == head_dim, "{}: rope head_dim {} differs from the head dim {}", what, rope.head_dim,
           head_dim);
  try {
    Rope check(rope);
  } catch (const Error& e) {
    fail("{}: {}", what, e.what());
  }
  check_finite(q, what, "q", num_q_heads, head_dim);
  check_finite(k, what, "k", num_kv_heads, head_dim);
  check_finite(v, what, "v", num_kv_heads, head_dim);
}

Trace read_trace(const std::string& path) {
  SafetensorsFile file(path);
  const std::string what = "trace " + path;
  auto get = [&](std::string_view name) -> const SafetensorsTensor& {
    const auto* t = file.find(name);
    MP_CHECK(t != nullptr, "{}: missing tensor '{}' (a trace holds q [T, Hq, d], k [N, Hkv, d], v [N, Hkv, d])",
             what, name);
    MP_CHECK(to_core_dtype(t->dtype).has_value(), "{}: tensor '{}' has dtype {}, expected F32, F16 or BF16", what,
             name, safetensors_dtype_name(t->dtype));
    MP_CHECK(t->rank() == 3, "{}: tensor '{}' has shape {}, expected rank 3 ([tokens, heads, head_dim])", what, name,
             t->shape_string());
    return *t;
  };
  const auto &tq = get("q"), &tk = get("k"), &tv = get("v");
  MP_CHECK(tk.shape == tv.shape, "{}: k has shape {} but v has shape {}; they must match", what, tk.shape_string(),
           tv.shape_string());
  MP_CHECK(tq.shape[2] == tk.shape[2], "{}: q's head dim {} (shape {}) differs from k's {} (shape {})", what,
           tq.shape[2], tq.shape_string(), tk.shape[2], tk.shape_string());
  MP_CHECK(tq.shape[1] <= kMaxHeads && tk.shape[1] <= kMaxHeads && tk.shape[2] <= kMaxHeadDim,
           "{}: q {} / k {} exceed the limits of {} heads and head dim {}", what, tq.shape_string(),
           tk.shape_string(), kMaxHeads, kMaxHeadDim);

  Trace t;
  t.generated = tq.shape[0];
  t.tokens = tk.shape[0];
  t.num_q_heads = int(tq.shape[1]);
  t.num_kv_heads = int(tk.shape[1]);
  t.head_dim = int(tk.shape[2]);
  // Cheap shape checks before converting (possibly large) tensors.
  MP_CHECK(t.generated >= 1, "{}: q has shape {}: no generated tokens", what, tq.shape_string());
  MP_CHECK(t.generated <= t.tokens, "{}: q has {} tokens (shape {}), more than the {} of k (shape {})", what,
           t.generated, tq.shape_string(), t.tokens, tk.shape_string());
  MP_CHECK(t.num_kv_heads >= 1 && t.num_q_heads % t.num_kv_heads == 0,
           "{}: q's {} heads (shape {}) are not a multiple of k's {} heads (shape {})", what, t.num_q_heads,
           tq.shape_string(), t.num_kv_heads, tk.shape_string());

  t.metadata = file.metadata();
  if (auto it = t.metadata.find("format"); it != t.metadata.end()) {
    MP_CHECK(it->second == kFormat, "{}: metadata format '{}' is not '{}'", what, it->second, kFormat);
    t.metadata.erase(it);
  }
  auto theta = t.metadata.find("rope_theta");
  MP_CHECK(theta != t.metadata.end(), "{}: missing metadata 'rope_theta' (the model's RoPE base, e.g. \"10000\")",
           what);
  t.rope.theta = parse_number(theta->second, what + ": metadata rope_theta");
  t.metadata.erase(theta);
  t.rope.head_dim = t.head_dim;
  if (auto it = t.metadata.find("rotary_dim"); it != t.metadata.end()) {
    double r = parse_number(it->second, what + ": metadata rotary_dim");
    MP_CHECK(r == std::floor(r) && r >= 2 && r <= t.head_dim, "{}: metadata rotary_dim {} must be an integer in [2, "
             "head dim {}]", what, it->second, t.head_dim);
    t.rope.rotary_dim = int(r);
    t.metadata.erase(it);
  }
  if (auto it = t.metadata.find("rope_scaling"); it != t.metadata.end()) {
    apply_rope_scaling(it->second, t.rope, what + ": metadata rope_scaling");
    t.metadata.erase(it);
  }

  t.q = tq.to_f32();
  t.k = tk.to_f32();
  t.v = tv.to_f32();
  t.validate(what);
  return t;
}

void write_trace(const std::string& path, const Trace& trace, DType dtype) {
  trace.validate("write_trace " + path);
  SafetensorsWriter w;
  w.add("q", {trace.generated, trace.num_q_heads, trace.head_dim}, trace.q.data(), dtype);
  w.add("k", {trace.tokens, trace.num_kv_heads, trace.head_dim}, trace.k.data(), dtype);
  w.add("v", {trace.tokens, trace.num_kv_heads, trace.head_dim}, trace.v.data(), dtype);
  for (const auto& [key, value] : trace.metadata) w.set_metadata(key, value);
  w.set_metadata("format", std::string(kFormat));
  w.set_metadata("rope_theta", fmt::format("{}", trace.rope.theta));  // shortest round-trip form
  if (trace.rope.rotary_dim != 0 && trace.rope.rotary_dim != trace.head_dim)
    w.set_metadata("rotary_dim", std::to_string(trace.rope.rotary_dim));
  if (auto s = rope_scaling_json(trace.rope); !s.empty()) w.set_metadata("rope_scaling", s);
  w.write(path);
}

void apply_rope_scaling(std::string_view json_text, RopeConfig& rope, std::string_view what) {
  json j;
  check_json_depth(json_text, what);
  try {
    j = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", what, e.what());
  }
  if (j.is_null()) return;  // HF writes "rope_scaling": null for no scaling
  MP_CHECK(j.is_object(), "{}: expected a JSON object, got {}", what, j.dump());
  auto type_it = j.find("rope_type");
  if (type_it == j.end()) type_it = j.find("type");
  MP_CHECK(type_it != j.end() && type_it->is_string(), "{}: missing string field 'rope_type'", what);
  const std::string type = type_it->get<std::string>();

  std::vector<std::string_view> allowed = {"rope_type", "type"};
  auto number = [&](const char* key, double& out, bool required) {
    allowed.push_back(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) {
      MP_CHECK(!required, "{}: rope_type '{}' needs field '{}'", what, type, key);
      return;
    }
    MP_CHECK(it->is_number() && std::isfinite(it->get<double>()), "{}: field '{}' is {}, expected a finite number",
             what, key, it->dump());
    out = it->get<double>();
  };
  if (type == "default") {
    rope.scaling = RopeConfig::Scaling::None;
  } else if (type == "linear") {
    rope.scaling = RopeConfig::Scaling::Linear;
    number("factor", rope.factor, true);
  } else if (type == "llama3") {
    rope.scaling = RopeConfig::Scaling::Llama3;
    number("factor", rope.factor, true);
    number("low_freq_factor", rope.low_freq_factor, true);
    number("high_freq_factor", rope.high_freq_factor, true);
    number("original_max_position_embeddings", rope.original_max_position, true);
  } else if (type == "yarn") {
    rope.scaling = RopeConfig::Scaling::Yarn;
    number("factor", rope.factor, true);
    number("original_max_position_embeddings", rope.original_max_position, true);
    number("beta_fast", rope.beta_fast, false);
    number("beta_slow", rope.beta_slow, false);
    number("attention_factor", rope.attention_factor, false);
  } else {
    fail("{}: unsupported rope_type '{}' (supported: default, linear, llama3, yarn)", what, type);
  }
  for (const auto& [key, _] : j.items()) {
    bool known = false;
    for (auto a : allowed) known |= key == a;
    MP_CHECK(known, "{}: field '{}' is not supported for rope_type '{}'", what, key, type);
  }
  MP_CHECK(rope.factor > 0, "{}: factor {} must be > 0", what, rope.factor);
  MP_CHECK(rope.original_max_position > 0, "{}: original_max_position_embeddings {} must be > 0", what,
           rope.original_max_position);
  MP_CHECK(rope.attention_factor >= 0, "{}: attention_factor {} must be >= 0", what, rope.attention_factor);
}

std::string rope_scaling_json(const RopeConfig& rope) {
  json j;
  switch (rope.scaling) {
    case RopeConfig::Scaling::None: return "";
    case RopeConfig::Scaling::Linear: j = {{"rope_type", "linear"}, {"factor", rope.factor}}; break;
    case RopeConfig::Scaling::Llama3:
      j = {{"rope_type", "llama3"},
           {"factor", rope.factor},
           {"low_freq_factor", rope.low_freq_factor},
           {"high_freq_factor", rope.high_freq_factor},
           {"original_max_position_embeddings", rope.original_max_position}};
      break;
    case RopeConfig::Scaling::Yarn:
      j = {{"rope_type", "yarn"},
           {"factor", rope.factor},
           {"original_max_position_embeddings", rope.original_max_position},
           {"beta_fast", rope.beta_fast},
           {"beta_slow", rope.beta_slow}};
      if (rope.attention_factor > 0) j["attention_factor"] = rope.attention_factor;
      break;
  }
  return j.dump();
}

}  // namespace multipole
