// `multipole tokenize --tokenizer FILE`: text on stdin -> token ids on stdout, or the reverse
// with --decode. FILE is a tokenizer.json, a GGUF file or a model folder.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "multipole/core/error.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

namespace multipole::cli {

namespace {

using json = nlohmann::json;

struct TokenizeArgs {
  std::string tokenizer;
  std::optional<std::string> text;
  bool decode = false;
  bool json = false;
  bool add_special = false;
  bool no_parse_special = false;
  bool skip_special = false;
};

std::string read_stdin() {
  std::string data;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), stdin)) > 0) data.append(buf, n);
  if (std::ferror(stdin)) fail("cannot read standard input");
  return data;
}

void write_stdout(std::string_view s) {
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size()) fail("cannot write standard output");
}

// Ids as whitespace/comma separated integers, or (with --json) a JSON array or {"ids": [...]}.
std::vector<int32_t> parse_ids(const std::string& input, bool as_json) {
  std::vector<int32_t> ids;
  if (as_json) {
    json j;
    try {
      j = json::parse(input);
      const json& arr = j.is_object() ? j.at("ids") : j;
      ids = arr.get<std::vector<int32_t>>();
    } catch (const json::exception& e) {
      fail("--decode --json wants a JSON array of ids or {{\"ids\": [...]}}: {}", e.what());
    }
    return ids;
  }
  size_t pos = 0;
  while (pos < input.size()) {
    const size_t begin = input.find_first_not_of(" \t\r\n,", pos);
    if (begin == std::string::npos) break;
    size_t end = input.find_first_of(" \t\r\n,", begin);
    if (end == std::string::npos) end = input.size();
    const std::string word = input.substr(begin, end - begin);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != word.size() || v < INT32_MIN || v > INT32_MAX)
      fail("not a token id: '{}' (at byte {} of the input)", word, begin);
    ids.push_back(int32_t(v));
    pos = end;
  }
  return ids;
}

void run_tokenize(const TokenizeArgs& args) {
  const Tokenizer tok = Tokenizer::load(args.tokenizer);
  if (args.decode) {
    const auto ids = parse_ids(args.text ? *args.text : read_stdin(), args.json);
    const std::string text = tok.decode(ids, {.skip_special = args.skip_special});
    if (args.json) {
      // Ids that end inside a character give invalid UTF-8; JSON shows those bytes as U+FFFD.
      write_stdout(json{{"text", text}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n");
    } else {
      write_stdout(text);
    }
    return;
  }
  const std::string text = args.text ? *args.text : read_stdin();
  const auto ids = tok.encode(text, {.add_special = args.add_special, .parse_special = !args.no_parse_special});
  if (args.json) {
    write_stdout(json{{"ids", ids}, {"n_tokens", ids.size()}, {"n_bytes", text.size()}}.dump() + "\n");
  } else {
    write_stdout(fmt::format("{}\n", fmt::join(ids, " ")));
  }
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  auto* cmd = app.add_subcommand(
      "tokenize",
      "Text on stdin -> token ids (space separated, or JSON with --json); --decode: ids -> text. "
      "The text is taken byte for byte (printf, not echo, to leave out a trailing newline).");
  cmd->add_option("--tokenizer", args->tokenizer, "tokenizer.json, GGUF file, or a folder holding tokenizer.json")
      ->required();
  cmd->add_option("--text", args->text, "Use this text (or these ids) instead of reading stdin");
  cmd->add_flag("--decode", args->decode, "Read token ids (whitespace or comma separated) and print their text");
  cmd->add_flag("--json", args->json,
                "JSON output ({\"ids\": [...]} or {\"text\": ...}); with --decode also JSON input");
  cmd->add_flag("--add-special", args->add_special, "Add the tokens the model puts around a text (e.g. BOS)");
  cmd->add_flag("--no-parse-special", args->no_parse_special,
                "Tokenize special tokens such as <|im_start|> as plain text");
  cmd->add_flag("--skip-special", args->skip_special, "With --decode: leave special tokens out");
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace multipole::cli
