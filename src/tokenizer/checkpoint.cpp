#include "multipole/tokenizer/checkpoint.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"

namespace multipole {

namespace {

namespace fs = std::filesystem;

fs::path checkpoint_dir(const std::string& model_path) {
  return fs::is_directory(model_path) ? fs::path(model_path) : fs::path(model_path).parent_path();
}

}  // namespace

Tokenizer checkpoint_tokenizer(const std::string& model_path, const GGUFFile* gguf) {
  if (gguf) {
    MP_CHECK(gguf->has("tokenizer.ggml.tokens"), "{}: missing tokenizer: the GGUF file has no tokenizer.ggml.tokens",
             model_path);
    return Tokenizer::from_gguf(*gguf);
  }
  const fs::path dir = checkpoint_dir(model_path);
  MP_CHECK(fs::exists(dir / "tokenizer.json"), "{}: missing tokenizer: no tokenizer.json in {}", model_path,
           dir.string());
  return Tokenizer::load(dir.string());
}

std::string checkpoint_chat_template(const std::string& model_path, const GGUFFile* gguf) {
  if (gguf) return std::string(gguf->get_string("tokenizer.chat_template", ""));
  const fs::path cfg = checkpoint_dir(model_path) / "tokenizer_config.json";
  if (!fs::exists(cfg)) return {};
  std::ifstream f(cfg);
  std::ostringstream s;
  s << f.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(s.str(), nullptr, false);
  if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string())
    return j["chat_template"].get<std::string>();
  return {};
}

}  // namespace multipole
