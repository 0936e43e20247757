#pragma once
// Helpers of the eval tests: a tiny random-weight model folder with a byte-level tokenizer
// (so every suite can run end to end in seconds), the real SmolLM2 when it was fetched, and
// running `multipole eval` as a process.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <sys/wait.h>

#include <nlohmann/json.hpp>

#include "cli_run.hpp"
#include "model/tiny_model.hpp"
#include "real_models.hpp"

namespace eval_test {

namespace fs = std::filesystem;

// The GPT-2 byte-to-character map (byte-level BPE vocabularies spell bytes this way).
inline std::string byte_char(int b) {
  static std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int extra = 0;
    for (int i = 0; i < 256; ++i) {
      const bool printable = (i >= 0x21 && i <= 0x7E) || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE && i <= 0xFF);
      const uint32_t cp = printable ? uint32_t(i) : uint32_t(256 + extra++);
      std::string s;
      if (cp < 0x80) {
        s += char(cp);
      } else {
        s += char(0xC0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3F));
      }
      t[size_t(i)] = s;
    }
    return t;
  }();
  return table[size_t(b)];
}

// A Qwen2-family tiny model (ChatML template by architecture) whose vocabulary is the 256
// bytes plus <|im_start|> 256, <|im_end|> 257, <|endoftext|> 258: every text tokenizes.
inline std::string write_tiny_chat_model(const std::string& name, int context = 1024, int head_dim = 16) {
  tiny::Config c = tiny::family_config("qwen2");
  c.head_dim = head_dim;
  c.hidden = std::max(c.hidden, c.heads * head_dim);
  c.vocab = 259;
  c.context = context;
  c.eos = 258;
  const std::string dir = tiny::temp_dir(name);
  tiny::write_safetensors(tiny::random_weights(c, 11), dir);
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  nlohmann::json added = nlohmann::json::array();
  const char* specials[] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"};
  for (int i = 0; i < 3; ++i) added.push_back({{"id", 256 + i}, {"content", specials[i]}, {"special", true}});
  nlohmann::json tok = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
      {"added_tokens", added},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  std::ofstream(dir + "/tokenizer.json") << tok.dump();
  return dir;
}

// The real default model fetched by scripts/fetch-models.sh, or "" when absent.
inline std::string smollm2_path() {
  const std::string p = multipole::test::smollm2_file();
  return fs::exists(p) ? p : std::string();
}

using CliRun = multipole::test::CliResult;
using multipole::test::slurp;

// Runs `multipole eval ARGS` (after `env`, e.g. "PATH=/x "), capturing stdout and stderr.
inline CliRun run_eval_cli(const std::string& args, const std::string& scratch, const std::string& env = "") {
  return multipole::test::run_cli(scratch, "eval " + args, "", env);
}

inline std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace eval_test
