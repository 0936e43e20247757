// Byte-level BPE from GGUF metadata (tokenizer.ggml.model = "gpt2"), as llama.cpp reads it.
#include <string>
#include <string_view>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "tokenizer/tokenizer_impl.hpp"

namespace multipole {

namespace {

// llama.cpp's token types (tokenizer.ggml.token_type).
enum : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct PreTokenizer {
  std::vector<std::string_view> names;  // values of tokenizer.ggml.pre
  std::vector<std::string_view> regexes;
  bool ignore_merges = false;
  bool add_bos = false;  // default of tokenizer.ggml.add_bos_token
};

// Pre-tokenizers by tokenizer.ggml.pre, following llama.cpp's table but with each family's
// own tokenizer.json regex (the Hugging Face behaviour the test vectors come from).
const std::vector<PreTokenizer>& pre_tokenizers() {
  using namespace pre_regex;
  static const std::vector<PreTokenizer> table = {
      {{"gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "jina-v1-en", "jina-v2-code", "jina-es", "jina-de",
        "jina-v2-es", "jina-v2-de", "gigachat", "exaone4", "mellum", "modern-bert", "trillion", "granite-docling"},
       {kGpt2}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}, {kLlama3}, true, true},
      {{"dbrx", "smaug-bpe", "chatglm-bpe", "glm4"}, {kLlama3}},
      {{"qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "solar-open"}, {kQwen2}},
      {{"qwen35"},
       {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}, {R"(\p{N})", kGpt2}},
      {{"deepseek-v3"},
       {R"(\p{N}{1,3})", "[一-龥぀-ゟ゠-ヿ]+",
        R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"gpt-4o", "llama4"},
       {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"tekken"},
       {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"},
       true, true},
      {{"falcon"},
       {R"([\p{P}\$\+<=>\^~\|`]+)", R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))",
        "[0-9][0-9][0-9]"}},
      // llama.cpp's fallback for files without tokenizer.ggml.pre (older conversions).
      {{"default"},
       {R"([\p{P}\$\+<=>\^~\|]+)", R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))",
        R"(\p{N}+)", "[0-9][0-9][0-9]"}},
  };
  return table;
}

const PreTokenizer& find_pre_tokenizer(const std::string& path, std::string_view name) {
  std::string known;
  for (const PreTokenizer& p : pre_tokenizers()) {
    for (std::string_view n : p.names) {
      if (n == name) return p;
      known += known.empty() ? "" : ", ";
      known += n;
    }
  }
  fail("{}: tokenizer.ggml.pre '{}' is not supported (known: {})", path, name, known);
}

}  // namespace

Tokenizer Tokenizer::from_gguf(const GGUFFile& f) {
  const std::string& path = f.path();
  const std::string_view model = f.get_string("tokenizer.ggml.model");
  if (model != "gpt2")
    fail("{}: tokenizer.ggml.model '{}' is not supported (only byte-level BPE, 'gpt2')", path, model);
  const std::string_view pre_name = f.get_string("tokenizer.ggml.pre", "default");
  const PreTokenizer& pre = find_pre_tokenizer(path, pre_name);

  TokenizerParts parts;
  parts.source = path;
  parts.pre_name = std::string(pre_name);
  for (std::string_view r : pre.regexes) parts.pre_steps.push_back({PreStep::SplitIsolated, compiled_regex(r)});
  parts.ignore_merges = pre.ignore_merges;

  const auto tokens = f.get_string_array("tokenizer.ggml.tokens");
  std::vector<int64_t> types;
  if (f.has("tokenizer.ggml.token_type")) {
    types = f.get_int_array("tokenizer.ggml.token_type");
    if (types.size() != tokens.size())
      fail("{}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}", path, types.size(),
           tokens.size());
  }
  if (tokens.size() > size_t(INT32_MAX)) fail("{}: {} tokens is too many", path, tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t type = types.empty() ? kNormal : types[i];
    if (tokens[i].empty()) continue;  // llama.cpp renames these; nothing can produce them
    if (type == kControl || type == kUnknown || type == kUserDefined) {
      // Stored as written (not in the byte-level spelling), as llama.cpp's converter does.
      AddedToken t;
      t.id = int32_t(i);
      t.content = std::string(tokens[i]);
      t.special = type != kUserDefined;
      parts.added.push_back(std::move(t));
    } else {
      parts.vocab.emplace_back(tokens[i], int32_t(i));
    }
  }
  const auto merges = f.get_string_array("tokenizer.ggml.merges");
  parts.merges.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string_view m = merges[r];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string_view::npos || sp + 1 >= m.size())
      fail("{}: tokenizer.ggml.merges[{}] = '{}' is not two tokens separated by a space", path, r, m);
    parts.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
  }

  auto token_key = [&](const char* key) -> std::optional<int32_t> {
    if (!f.has(key)) return std::nullopt;
    const uint64_t id = f.get_uint(key);
    if (id >= tokens.size()) fail("{}: {} = {} is not a token id (the vocabulary has {})", path, key, id, tokens.size());
    return int32_t(id);
  };
  parts.bos = token_key("tokenizer.ggml.bos_token_id");
  parts.eos = token_key("tokenizer.ggml.eos_token_id");
  const bool add_bos = f.get_bool("tokenizer.ggml.add_bos_token", pre.add_bos);
  const bool add_eos = f.get_bool("tokenizer.ggml.add_eos_token", false);
  if (add_bos) {
    if (parts.bos) parts.prefix.push_back(*parts.bos);
    else parts.add_special_problem = "tokenizer.ggml.add_bos_token is set but there is no bos_token_id";
  }
  if (add_eos) {
    if (parts.eos) parts.suffix.push_back(*parts.eos);
    else parts.add_special_problem = "tokenizer.ggml.add_eos_token is set but there is no eos_token_id";
  }
  return Tokenizer(build_tokenizer(parts));
}

}  // namespace multipole
