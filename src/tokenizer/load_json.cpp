// Hugging Face tokenizer.json (the `tokenizers` serialization) for byte-level BPE models.
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/json_integer.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/json_limits.hpp"
#include "tokenizer/tokenizer_impl.hpp"

namespace multipole {

namespace {

using json = nlohmann::json;

std::string type_of(const json& j) {
  if (!j.is_object()) return std::string("(not an object)");
  auto it = j.find("type");
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string("(no type)");
}

bool flag(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return it->get<bool>();
}

// Escapes a literal for PCRE2 (Split with a "String" pattern).
std::string regex_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u)) out += '\\';
    out += c;
  }
  return out;
}

struct Loader {
  const std::string& src;
  TokenizerParts& parts;
  bool byte_level = false;

  void normalizer(const json& j) {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      for (const json& n : j.at("normalizers")) normalizer(n);
    } else if (t == "NFC") {
      parts.normalizers.push_back(NormForm::NFC);
    } else if (t == "NFD") {
      parts.normalizers.push_back(NormForm::NFD);
    } else if (t == "NFKC") {
      parts.normalizers.push_back(NormForm::NFKC);
    } else if (t == "NFKD") {
      parts.normalizers.push_back(NormForm::NFKD);
    } else {
      fail("{}: normalizer type '{}' is not supported (NFC, NFD, NFKC, NFKD, Sequence)", src, t);
    }
  }

  void split(std::string pattern, PreStep::Kind kind) {
    parts.pre_steps.push_back({kind, compiled_regex(pattern)});
  }

  void pre_tokenizer(const json& j) {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      for (const json& p : j.at("pretokenizers")) pre_tokenizer(p);
    } else if (t == "ByteLevel") {
      byte_level = true;
      if (flag(j, "add_prefix_space", true)) parts.pre_steps.push_back({PreStep::PrefixSpace, nullptr});
      if (flag(j, "use_regex", true)) split(std::string(pre_regex::kGpt2), PreStep::SplitIsolated);
    } else if (t == "Split") {
      const json& pat = j.at("pattern");
      std::string pattern;
      if (pat.contains("Regex")) {
        pattern = pat.at("Regex").get<std::string>();
      } else if (pat.contains("String")) {
        pattern = regex_escape(pat.at("String").get<std::string>());
      } else {
        fail("{}: Split pre-tokenizer pattern has neither \"Regex\" nor \"String\"", src);
      }
      if (flag(j, "invert", false)) fail("{}: Split pre-tokenizer with invert=true is not supported", src);
      const std::string behavior = j.value("behavior", std::string("Isolated"));
      if (behavior == "Isolated") {
        split(pattern, PreStep::SplitIsolated);
      } else if (behavior == "Removed") {
        split(pattern, PreStep::SplitRemoved);
      } else {
        fail("{}: Split pre-tokenizer behavior '{}' is not supported (Isolated, Removed)", src, behavior);
      }
    } else if (t == "Digits") {
      split(flag(j, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", PreStep::SplitIsolated);
    } else {
      fail("{}: pre-tokenizer type '{}' is not supported (ByteLevel, Split, Digits, Sequence)", src, t);
    }
  }

  void decoder(const json& j) {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      for (const json& d : j.at("decoders")) decoder(d);
    } else if (t != "ByteLevel") {
      fail("{}: decoder type '{}' is not supported (byte-level BPE decodes with ByteLevel)", src, t);
    }
  }

  // A token id must be an integer in [0, INT32_MAX]. `where` is only formatted on failure.
  template <typename Where>
  int32_t token_id(const json& v, Where&& where) const {
    const std::optional<int64_t> id = json_int64(v);
    if (!id || *id < 0 || *id > INT32_MAX)
      fail("{}: {} = {} is not a valid token id (an integer in 0..{})", src, where(), v.dump(), INT32_MAX);
    return int32_t(*id);
  }

  // Ids of a post-processor's special token, by its name in "special_tokens".
  std::vector<int32_t> template_ids(const json& p, const std::string& name) {
    const json& ids = p.at("special_tokens").at(name).at("ids");
    if (!ids.is_array()) fail("{}: post_processor.special_tokens['{}'].ids is not an array", src, name);
    std::vector<int32_t> out;
    for (const json& v : ids) out.push_back(token_id(v, [&] { return fmt::format("post_processor.special_tokens['{}'].ids", name); }));
    return out;
  }

  void post_processor(const json& j) {
    if (j.is_null()) return;
    const std::string t = type_of(j);
    if (t == "Sequence") {
      for (const json& p : j.at("processors")) post_processor(p);
    } else if (t == "ByteLevel") {
      // Only adjusts offsets.
    } else if (t == "TemplateProcessing") {
      bool after = false;
      for (const json& item : j.at("single")) {
        if (item.contains("Sequence")) {
          after = true;
        } else if (item.contains("SpecialToken")) {
          auto ids = template_ids(j, item.at("SpecialToken").at("id").get<std::string>());
          auto& dst = after ? parts.suffix : parts.prefix;
          dst.insert(dst.end(), ids.begin(), ids.end());
        }
      }
    } else if (t == "RobertaProcessing" || t == "BertProcessing") {
      parts.prefix.push_back(token_id(j.at("cls").at(1), [] { return "post_processor.cls[1]"; }));
      parts.suffix.push_back(token_id(j.at("sep").at(1), [] { return "post_processor.sep[1]"; }));
    } else {
      parts.add_special_problem = fmt::format("post_processor type '{}' is not supported", t);
    }
  }

  void model(const json& m) {
    if (m.contains("type") && m.at("type") != "BPE")
      fail("{}: model type '{}' is not supported (only byte-level BPE)", src, m.at("type").dump());
    if (flag(m, "byte_fallback", false))
      fail("{}: BPE with byte_fallback (SentencePiece style) is not supported, only byte-level BPE", src);
    if (m.contains("dropout") && !m.at("dropout").is_null() && m.at("dropout").get<double>() != 0.0)
      fail("{}: BPE dropout {} is not supported (it makes encoding random)", src, m.at("dropout").dump());
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(key) && !m.at(key).is_null() && !m.at(key).get_ref<const std::string&>().empty())
        fail("{}: BPE {} '{}' is not supported", src, key, m.at(key).get<std::string>());
    parts.ignore_merges = flag(m, "ignore_merges", false);
    const json& vocab = m.at("vocab");
    if (!vocab.is_object()) fail("{}: model.vocab is not an object", src);
    parts.vocab.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      parts.vocab.emplace_back(it.key(), token_id(it.value(), [&] { return fmt::format("model.vocab['{}']", it.key()); }));
    }
    const json& merges = m.at("merges");
    if (!merges.is_array()) fail("{}: model.merges is not an array", src);
    parts.merges.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      const json& e = merges[r];
      if (e.is_string()) {
        // Legacy form "a b": byte-level tokens never contain a plain space.
        const std::string& s = e.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail("{}: merge #{} '{}' is not two tokens separated by one space", src, r, s);
        std::string_view v(s);
        parts.merges.emplace_back(v.substr(0, sp), v.substr(sp + 1));
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        parts.merges.emplace_back(e[0].get_ref<const std::string&>(), e[1].get_ref<const std::string&>());
      } else {
        fail("{}: merge #{} is neither \"a b\" nor [\"a\", \"b\"]: {}", src, r, e.dump());
      }
    }
  }

  void added_tokens(const json& list) {
    if (list.is_null()) return;
    for (const json& a : list) {
      AddedToken t;
      t.id = token_id(a.at("id"), [] { return "added_tokens[].id"; });
      t.content = a.at("content").get<std::string>();
      t.special = flag(a, "special", false);
      t.lstrip = flag(a, "lstrip", false);
      t.rstrip = flag(a, "rstrip", false);
      t.single_word = flag(a, "single_word", false);
      t.normalized = flag(a, "normalized", !t.special);
      parts.added.push_back(std::move(t));
    }
  }
};

// bos_token / eos_token of tokenizer_config.json: a string or {"content": ...}.
std::optional<std::string> config_token(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content")) return it->at("content").get<std::string>();
  return std::nullopt;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("{}: cannot open", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Parses and builds; from_json_file adds tokenizer_config.json's BOS/EOS before sharing it.
std::shared_ptr<Tokenizer::Impl> impl_from_json(std::string_view text, const std::string& src) {
  json doc;
  check_json_depth(text, src);
  try {
    doc = json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", src, e.what());
  }
  TokenizerParts parts;
  parts.source = src;
  parts.pre_name = "tokenizer.json";
  try {
    if (!doc.is_object()) fail("{}: not a tokenizer.json (the top level is not an object)", src);
    if (!doc.contains("model")) fail("{}: not a tokenizer.json (no \"model\")", src);
    Loader loader{src, parts};
    loader.model(doc.at("model"));
    loader.added_tokens(doc.value("added_tokens", json()));
    loader.normalizer(doc.value("normalizer", json()));
    loader.pre_tokenizer(doc.value("pre_tokenizer", json()));
    loader.decoder(doc.value("decoder", json()));
    loader.post_processor(doc.value("post_processor", json()));
    if (!loader.byte_level)
      fail("{}: not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer); only byte-level BPE is supported", src);
    return build_tokenizer(parts);
  } catch (const json::exception& e) {
    fail("{}: unexpected tokenizer.json content: {}", src, e.what());
  }
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view text, std::string_view source) {
  return Tokenizer(impl_from_json(text, std::string(source)));
}

Tokenizer Tokenizer::from_json_file(const std::string& path) {
  auto impl = impl_from_json(read_file(path), path);
  // BOS/EOS live in tokenizer_config.json next to it, when there is one.
  const std::string cfg_path = (std::filesystem::path(path).parent_path() / "tokenizer_config.json").string();
  std::error_code ec;
  if (!std::filesystem::exists(cfg_path, ec)) return Tokenizer(impl);
  try {
    const std::string cfg_text = read_file(cfg_path);
    check_json_depth(cfg_text, cfg_path);
    const json cfg = json::parse(cfg_text);
    for (auto [key, dst] : {std::pair{"bos_token", &impl->bos}, std::pair{"eos_token", &impl->eos}}) {
      if (auto content = config_token(cfg, key)) {
        auto id = impl->find_token(*content);
        if (!id) fail("{}: {} '{}' is not a token of {}", cfg_path, key, *content, path);
        *dst = *id;
      }
    }
  } catch (const json::exception& e) {
    fail("{}: invalid tokenizer_config.json: {}", cfg_path, e.what());
  }
  return Tokenizer(impl);
}

}  // namespace multipole
