// `multipole tokenize` run as a process on the real Qwen3 tokenizer.json and a GGUF vocab;
// expected ids come from the Hugging Face golden file and llama.cpp's vectors.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_run.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kAssets = std::string(MULTIPOLE_SHARED_DIR) + "/assets";
const std::string kQwen3Dir = kAssets + "/qwen3-tokenizer";

struct CliRun {
  int status = -1;
  std::string out, err;
};

using multipole::test::slurp;
std::string quote(const std::string& s) { return multipole::test::shell_quote(s); }

// Runs the CLI with `input` on stdin.
CliRun run_cli(const std::vector<std::string>& args, const std::string& input) {
  const fs::path dir = fs::temp_directory_path() / ("mp_tokcli_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string in = (dir / "in").string(), err = (dir / "err").string();
  std::ofstream(in, std::ios::binary) << input;
  std::string cmd = quote(MULTIPOLE_CLI_PATH) + " tokenize";
  for (const auto& a : args) {
    cmd += ' ';
    cmd += quote(a);
  }
  cmd += " < " + quote(in) + " 2> " + quote(err);
  CliRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.err = slurp(err);
  fs::remove_all(dir);
  return r;
}

json golden_case(const std::string& text) {
  const json doc = json::parse(slurp(std::string(MULTIPOLE_SOURCE_DIR) + "/tests/tokenizer/data/qwen3_golden.json"));
  for (const json& c : doc.at("cases"))
    if (c.at("text") == text) return c;
  ADD_FAILURE() << "no golden case for " << text;
  return json::object();
}

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t k = 0; k < ids.size(); ++k) {
    if (k) s += ' ';
    s += std::to_string(ids[k]);
  }
  return s;
}

}  // namespace

TEST(TokenizeCli, EncodesAndDecodesWithTokenizerJson) {
  const std::string text = "<think>\nLet me think about this.\n</think>\n\nThe answer is 42.";
  const json c = golden_case(text);
  const auto want = c.at("ids").get<std::vector<int32_t>>();

  CliRun r = run_cli({"--tokenizer", kQwen3Dir + "/tokenizer.json"}, text);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, join_ids(want) + "\n");

  r = run_cli({"--tokenizer", kQwen3Dir, "--json"}, text);  // the folder form
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j.at("ids").get<std::vector<int32_t>>(), want);
  EXPECT_EQ(j.at("n_tokens"), want.size());

  r = run_cli({"--tokenizer", kQwen3Dir, "--decode"}, join_ids(want) + "\n");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, text);

  r = run_cli({"--tokenizer", kQwen3Dir, "--decode", "--json"}, json(want).dump());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).at("text"), text);

  // Commas work as separators too, and --text replaces stdin.
  r = run_cli({"--tokenizer", kQwen3Dir, "--decode", "--text", "9707,1879"}, "");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "Hello world");

  // Special tokens: skipped on request, or read as plain text.
  r = run_cli({"--tokenizer", kQwen3Dir, "--decode", "--skip-special"}, "151644 9707 151645");
  EXPECT_EQ(r.out, "Hello");
  r = run_cli({"--tokenizer", kQwen3Dir, "--no-parse-special"}, "<|im_start|>");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.find("151644"), std::string::npos) << r.out;
}

TEST(TokenizeCli, ReadsGgufVocab) {
  // llama.cpp's vector for " Hello world" with the Llama 3 vocabulary, plus BOS on request.
  const std::string gguf = kAssets + "/vocab-tests/ggml-vocab-llama-bpe.gguf";
  CliRun r = run_cli({"--tokenizer", gguf}, " Hello world");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "22691 1917\n");
  r = run_cli({"--tokenizer", gguf, "--add-special"}, " Hello world");
  EXPECT_EQ(r.out, "128000 22691 1917\n");
}

TEST(TokenizeCli, ClearErrors) {
  CliRun r = run_cli({"--tokenizer", "/nonexistent/tok.json"}, "x");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("/nonexistent/tok.json: no such file"), std::string::npos) << r.err;

  const std::string not_json = kAssets + "/vocab-tests/ggml-vocab-qwen2.gguf.inp";
  r = run_cli({"--tokenizer", not_json}, "x");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("invalid JSON"), std::string::npos) << r.err;

  r = run_cli({"--tokenizer", kAssets}, "x");  // a folder without tokenizer.json
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("no tokenizer.json"), std::string::npos) << r.err;

  r = run_cli({"--tokenizer", kQwen3Dir, "--decode"}, "12 abc");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("not a token id: 'abc'"), std::string::npos) << r.err;

  r = run_cli({"--tokenizer", kQwen3Dir, "--decode"}, "12 99999999");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("token id 99999999"), std::string::npos) << r.err;

  r = run_cli({"--tokenizer", kQwen3Dir}, std::string("bad \xFF byte"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("not valid UTF-8 at byte 4"), std::string::npos) << r.err;

  r = run_cli({}, "x");  // --tokenizer is required
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("--tokenizer"), std::string::npos) << r.err;
}
