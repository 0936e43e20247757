// ModelConfig from GGUF metadata and from Hugging Face config.json; the family registry.
#include "multipole/model/config.hpp"

#include <array>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "io/json_integer.hpp"
#include "model/family.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/io/json_limits.hpp"
#include "multipole/io/trace.hpp"

namespace multipole {

std::string_view model_family_name(ModelFamily f) { return model::family_spec(f).name; }

namespace model {

std::span<const FamilySpec* const> families() {
  static const std::array<const FamilySpec*, 3> all = {&llama_family(), &qwen2_family(), &qwen3_family()};
  return all;
}

const FamilySpec& family_spec(ModelFamily f) {
  for (const FamilySpec* s : families())
    if (s->family == f) return *s;
  fail("model: unknown family number {}", int(f));
}

const FamilySpec* find_family_gguf(std::string_view arch) {
  for (const FamilySpec* s : families())
    for (std::string_view a : s->gguf_archs)
      if (a == arch) return s;
  return nullptr;
}

const FamilySpec* find_family_hf(std::string_view model_type) {
  for (const FamilySpec* s : families())
    for (std::string_view t : s->hf_types)
      if (t == model_type) return s;
  return nullptr;
}

std::string known_families(bool gguf) {
  std::string out;
  for (const FamilySpec* s : families())
    for (std::string_view a : gguf ? s->gguf_archs : s->hf_types) {
      if (!out.empty()) out += ", ";
      out += a;
    }
  return out;
}

}  // namespace model

void ModelConfig::validate(std::string_view source) const {
  auto positive = [&](int64_t v, std::string_view field) {
    MP_CHECK(v > 0, "{}: {} = {} must be > 0", source, field, v);
  };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_layers, "num_layers");
  positive(num_heads, "num_heads");
  positive(num_kv_heads, "num_kv_heads");
  positive(head_dim, "head_dim");
  positive(vocab_size, "vocab_size");
  positive(context_length, "context_length");
  MP_CHECK(num_heads % num_kv_heads == 0, "{}: num_heads {} is not a multiple of num_kv_heads {}", source, num_heads,
           num_kv_heads);
  MP_CHECK(head_dim % 2 == 0, "{}: head_dim {} must be even (RoPE pairs channels)", source, head_dim);
  MP_CHECK(rope.head_dim == head_dim, "{}: rope head_dim {} differs from head_dim {}", source, rope.head_dim, head_dim);
  MP_CHECK(std::isfinite(rms_eps) && rms_eps > 0, "{}: rms_norm_eps {} must be finite and > 0", source, rms_eps);
  // Limits that keep every size computation far from overflow.
  MP_CHECK(hidden_size <= (1 << 16) && intermediate_size <= (1 << 18) && num_layers <= 1024 && num_heads <= 1024 &&
               head_dim <= 1024 && vocab_size <= (1 << 22),
           "{}: dimensions out of range (hidden {}, intermediate {}, layers {}, heads {}, head_dim {}, vocab {})",
           source, hidden_size, intermediate_size, num_layers, num_heads, head_dim, vocab_size);
  if (bos_id) MP_CHECK(*bos_id >= 0 && *bos_id < vocab_size, "{}: bos id {} outside the vocabulary [0, {})", source,
                       *bos_id, vocab_size);
  for (int32_t e : eos_ids)
    MP_CHECK(e >= 0 && e < vocab_size, "{}: eos id {} outside the vocabulary [0, {})", source, e, vocab_size);
  Rope check(rope);  // validates theta, rotary_dim and the scaling parameters
  (void)check;
}

namespace {

int to_int(uint64_t v, std::string_view source, std::string_view key) {
  MP_CHECK(v <= uint64_t(1) << 30, "{}: {} = {} is out of range", source, key, v);
  return int(v);
}

void add_eos(ModelConfig& c, int64_t id) {
  if (id < 0 || id > INT32_MAX) return;
  for (int32_t e : c.eos_ids)
    if (e == id) return;
  c.eos_ids.push_back(int32_t(id));
}

// llama.cpp stores Llama 3.x rope scaling as a tensor of per-frequency divisors
// (rope_freqs.weight) instead of metadata. Find the llama3 parameters that reproduce it
// (the published 3.1/3.2 checkpoints use factor 8 or 32, low 1, high 4, original 8192).
void rope_from_freq_tensor(const GGUFFile& file, const GGUFTensor& t, RopeConfig& rope) {
  const int half = (rope.rotary_dim ? rope.rotary_dim : rope.head_dim) / 2;
  MP_CHECK(t.type == GGMLType::F32 && t.numel() == uint64_t(half),
           "{}: rope_freqs.weight must be F32 [{}], found {} {}", file.path(), half, ggml_type_name(t.type),
           t.dims_string());
  std::vector<float> divisors(half);
  std::memcpy(divisors.data(), t.data.data(), size_t(half) * 4);
  RopeConfig plain = rope;
  plain.scaling = RopeConfig::Scaling::None;
  const Rope base(plain);
  for (double factor : {8.0, 16.0, 32.0, 4.0, 2.0}) {
    RopeConfig c = rope;
    c.scaling = RopeConfig::Scaling::Llama3;
    c.factor = factor;
    c.low_freq_factor = 1.0;
    c.high_freq_factor = 4.0;
    c.original_max_position = 8192;
    const Rope r(c);
    bool ok = true;
    for (int i = 0; i < half && ok; ++i) {
      double want = base.inv_freq()[i] / divisors[i];
      ok = std::abs(r.inv_freq()[i] - want) <= 1e-5 * want;
    }
    if (ok) {
      rope = c;
      return;
    }
  }
  fail("{}: rope_freqs.weight does not match llama3 rope scaling with factor 2..32, low 1, high 4, original 8192; "
       "these per-frequency factors are not supported",
       file.path());
}

}  // namespace

ModelConfig model_config_from_gguf(const GGUFFile& file) {
  const std::string src = file.path();
  const std::string arch(file.get_string("general.architecture"));
  const model::FamilySpec* spec = model::find_family_gguf(arch);
  MP_CHECK(spec, "{}: unknown architecture '{}' (supported: {})", src, arch, model::known_families(true));
  auto key = [&](std::string_view k) { return arch + "." + std::string(k); };
  auto get_int = [&](std::string_view k) { return to_int(file.get_uint(key(k)), src, key(k)); };
  auto get_int_or = [&](std::string_view k, uint64_t fallback) {
    return to_int(file.get_uint(key(k), fallback), src, key(k));
  };

  ModelConfig c;
  c.family = spec->family;
  c.architecture = arch;
  c.name = std::string(file.get_string("general.name", ""));
  c.hidden_size = get_int("embedding_length");
  c.intermediate_size = get_int("feed_forward_length");
  c.num_layers = get_int("block_count");
  c.num_heads = get_int("attention.head_count");
  c.num_kv_heads = get_int_or("attention.head_count_kv", uint64_t(c.num_heads));
  MP_CHECK(c.num_heads > 0, "{}: {} = 0", src, key("attention.head_count"));
  c.head_dim = get_int_or("attention.key_length", uint64_t(c.hidden_size / c.num_heads));
  if (file.has(key("attention.value_length")))
    MP_CHECK(get_int("attention.value_length") == c.head_dim, "{}: {} = {} differs from the key length {}", src,
             key("attention.value_length"), get_int("attention.value_length"), c.head_dim);
  c.context_length = get_int("context_length");
  c.rms_eps = float(file.get_float(key("attention.layer_norm_rms_epsilon")));

  if (file.has(key("vocab_size"))) {
    c.vocab_size = get_int("vocab_size");
  } else if (const GGUFTensor* t = file.find_tensor("token_embd.weight"); t && t->dims.size() == 2) {
    c.vocab_size = to_int(t->dims[1], src, "token_embd.weight dims[1]");
  } else if (file.has("tokenizer.ggml.tokens")) {
    c.vocab_size = to_int(file.get_array_size("tokenizer.ggml.tokens"), src, "tokenizer.ggml.tokens");
  }

  c.rope.head_dim = c.head_dim;
  c.rope.rotary_dim = get_int_or("rope.dimension_count", uint64_t(c.head_dim));
  c.rope.theta = file.get_float(key("rope.freq_base"), 10000.0);
  const std::string scaling(file.get_string(key("rope.scaling.type"), "none"));
  if (scaling == "linear" || scaling == "yarn") {
    c.rope.scaling = scaling == "linear" ? RopeConfig::Scaling::Linear : RopeConfig::Scaling::Yarn;
    c.rope.factor = file.get_float(key("rope.scaling.factor"));
    c.rope.original_max_position =
        file.get_float(key("rope.scaling.original_context_length"), double(c.context_length));
    c.rope.beta_fast = file.get_float(key("rope.scaling.yarn_beta_fast"), 32.0);
    c.rope.beta_slow = file.get_float(key("rope.scaling.yarn_beta_slow"), 1.0);
  } else {
    MP_CHECK(scaling == "none", "{}: {} = '{}' is not supported (none, linear, yarn)", src, key("rope.scaling.type"),
             scaling);
  }
  if (const GGUFTensor* t = file.find_tensor("rope_freqs.weight")) rope_from_freq_tensor(file, *t, c.rope);

  c.tied_embeddings = file.find_tensor("output.weight") == nullptr;
  c.qkv_bias = spec->qkv_bias || file.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.qk_norm = spec->qk_norm;
  if (file.has("tokenizer.ggml.bos_token_id"))
    c.bos_id = int32_t(to_int(file.get_uint("tokenizer.ggml.bos_token_id"), src, "tokenizer.ggml.bos_token_id"));
  for (std::string_view k : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (file.has(k)) add_eos(c, int64_t(file.get_uint(k)));
  c.validate(src);
  return c;
}

ModelConfig model_config_from_hf_json(std::string_view json_text, std::string_view source) {
  using nlohmann::json;
  json j;
  check_json_depth(json_text, source);
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", source, e.what());
  }
  MP_CHECK(j.is_object(), "{}: config.json must be a JSON object", source);
  auto str = [&](const char* k) -> std::string {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return {};
    MP_CHECK(it->is_string(), "{}: field '{}' must be a string", source, k);
    return it->get<std::string>();
  };
  std::string type = str("model_type");
  MP_CHECK(!type.empty(), "{}: missing 'model_type' (supported: {})", source, model::known_families(false));
  const model::FamilySpec* spec = model::find_family_hf(type);
  MP_CHECK(spec, "{}: unknown model_type '{}' (supported: {})", source, type, model::known_families(false));

  auto number = [&](const json& obj, const char* k, std::string_view where) -> std::optional<double> {
    auto it = obj.find(k);
    if (it == obj.end() || it->is_null()) return std::nullopt;
    MP_CHECK(it->is_number(), "{}: field '{}{}' must be a number", source, where, k);
    return it->get<double>();
  };
  auto integer = [&](const char* k, std::optional<int64_t> fallback) -> int64_t {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) {
      MP_CHECK(fallback.has_value(), "{}: missing field '{}'", source, k);
      return *fallback;
    }
    MP_CHECK(it->is_number_integer(), "{}: field '{}' must be an integer", source, k);
    int64_t v = it->get<int64_t>();
    MP_CHECK(v >= 0 && v <= (int64_t(1) << 30), "{}: field '{}' = {} is out of range", source, k, v);
    return v;
  };
  auto boolean = [&](const char* k, bool fallback) {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return fallback;
    MP_CHECK(it->is_boolean(), "{}: field '{}' must be true or false", source, k);
    return it->get<bool>();
  };

  ModelConfig c;
  c.family = spec->family;
  c.architecture = type;
  c.hidden_size = int(integer("hidden_size", std::nullopt));
  c.intermediate_size = int(integer("intermediate_size", std::nullopt));
  c.num_layers = int(integer("num_hidden_layers", std::nullopt));
  c.num_heads = int(integer("num_attention_heads", std::nullopt));
  MP_CHECK(c.num_heads > 0, "{}: num_attention_heads = 0", source);
  c.num_kv_heads = int(integer("num_key_value_heads", c.num_heads));
  c.head_dim = int(integer("head_dim", c.hidden_size / c.num_heads));
  c.vocab_size = int(integer("vocab_size", std::nullopt));
  c.context_length = integer("max_position_embeddings", 2048);
  c.rms_eps = float(number(j, "rms_norm_eps", "").value_or(1e-6));
  c.tied_embeddings = boolean("tie_word_embeddings", spec->default_tied);
  c.qkv_bias = spec->qkv_bias || (!spec->hf_bias_key.empty() && boolean(std::string(spec->hf_bias_key).c_str(), false));
  c.qk_norm = spec->qk_norm;
  MP_CHECK(!boolean("mlp_bias", false), "{}: mlp_bias = true is not supported", source);
  MP_CHECK(!boolean("use_sliding_window", false), "{}: use_sliding_window = true is not supported", source);
  if (auto it = j.find("hidden_act"); it != j.end() && it->is_string())
    MP_CHECK(it->get<std::string>() == "silu", "{}: hidden_act '{}' is not supported (silu)", source,
             it->get<std::string>());

  c.rope.head_dim = c.head_dim;
  c.rope.theta = number(j, "rope_theta", "").value_or(spec->default_rope_theta);
  // transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters holding both.
  json scaling;
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    MP_CHECK(it->is_object(), "{}: field 'rope_parameters' must be an object", source);
    scaling = *it;
    if (auto theta = number(scaling, "rope_theta", "rope_parameters.")) c.rope.theta = *theta;
    scaling.erase("rope_theta");
    scaling.erase("partial_rotary_factor");
  } else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && !it2->is_null()) {
    MP_CHECK(it2->is_object(), "{}: field 'rope_scaling' must be an object or null", source);
    scaling = *it2;
  }
  // Unknown scaling types or fields are errors (a silently ignored one gives wrong logits).
  if (scaling.is_object() && !scaling.empty())
    apply_rope_scaling(scaling.dump(), c.rope, fmt::format("{}: rope scaling", source));

  if (auto it = j.find("bos_token_id"); it != j.end() && it->is_number_integer()) {
    const std::optional<int64_t> id = json_int64(*it);
    MP_CHECK(id && *id >= 0 && *id <= INT32_MAX, "{}: field 'bos_token_id' = {} is not a valid token id (0..{})", source,
             it->dump(), INT32_MAX);
    c.bos_id = int32_t(*id);
  }
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (auto id = json_int64(*it)) add_eos(c, *id);
    if (it->is_array())
      for (const json& e : *it)
        if (auto id = json_int64(e)) add_eos(c, *id);
  }
  c.validate(source);
  return c;
}

}  // namespace multipole
