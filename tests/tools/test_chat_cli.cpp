// `multipole chat` run as the built binary on the real SmolLM2-135M GGUF with a piped
// conversation, greedy: the JSON lines are well formed, the second turn continues the first
// turn's sequence (only the new suffix of the rendered conversation is fed) and produces what
// a fresh `multipole generate` on the whole conversation produces; /reset and /exit work.
#include <gtest/gtest.h>

#ifdef MULTIPOLE_HAVE_TOKENIZER

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_run.hpp"
#include "io/temp_dir.hpp"
#include "real_models.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/tokenizer/chat_template.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

using namespace multipole;
using multipole::test_util::TempDir;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using Result = multipole::test::CliResult;
using multipole::test::slurp;

Result run_cli(const TempDir& dir, const std::string& args, const std::string& input) {
  return multipole::test::run_cli(dir.path.string(), args, input);
}

std::string quote(const std::string& s) { return multipole::test::shell_quote(s); }

std::string smollm2_path() { return multipole::test::smollm2_file(); }

// One JSON object per line.
std::vector<json> json_lines(const std::string& out) {
  std::vector<json> lines;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "not a JSON line: " << line;
    if (!j.is_discarded()) lines.push_back(j);
  }
  return lines;
}

// The tokens the sequence holds after a turn: its prompt and replies, but not the last token
// sampled, unless that was the end of turn (which is sampled but never fed either).
int64_t fed_after(const json& t) {
  return t["reused_tokens"].get<int64_t>() + t["prompt_tokens"].get<int64_t>() + int64_t(t["tokens"].size()) -
         (t["finish_reason"] == "eos" ? 0 : 1);
}

class ChatCli : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = smollm2_path();
    if (!fs::exists(model_)) GTEST_SKIP() << model_ << " absent (run scripts/fetch-models.sh smollm2-135m)";
  }
  std::string model_;
};

TEST_F(ChatCli, SecondTurnContinuesTheSequence) {
  TempDir dir;
  const std::string q1 = "What is the capital of France?", q2 = "And of Italy?";
  const std::string opts = " -n 6 -t 0 --threads 2 --ctx 512";
  const Result r = run_cli(dir, "chat --model " + model_ + opts + " --json", q1 + "\n" + q2 + "\n");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::vector<json> turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 2u) << r.out;
  for (const json& t : turns) {
    for (const char* key : {"turn", "text", "thinking", "answer", "thinking_tokens", "answer_tokens", "tokens",
                            "finish_reason", "reused_tokens", "reprefilled", "sequence_tokens", "prompt_tokens",
                            "generated_tokens", "prefill_tokens_per_second", "decode_tokens_per_second"})
      EXPECT_TRUE(t.contains(key)) << key << " missing in " << t.dump();
    EXPECT_GE(t["tokens"].size(), 1u);
    EXPECT_LE(t["tokens"].size(), 6u);
    // SmolLM2 does not think: the reply is all answer.
    EXPECT_EQ(t["thinking"], "");
    EXPECT_EQ(t["answer"], t["text"]);
    EXPECT_EQ(t["thinking_tokens"], 0);
    EXPECT_EQ(t["answer_tokens"], t["tokens"].size());
    EXPECT_EQ(t["sequence_tokens"].get<int64_t>(), fed_after(t)) << t.dump();
  }
  EXPECT_EQ(turns[0]["turn"], 1);
  EXPECT_EQ(turns[1]["turn"], 2);
  EXPECT_EQ(turns[0]["reused_tokens"], 0);

  // What each turn's prompt must be: the conversation rendered with the GGUF's template.
  GGUFFile gguf(model_);
  const Tokenizer tok = Tokenizer::from_gguf(gguf);
  const ChatTemplate tmpl = ChatTemplate::detect(gguf.get_string("tokenizer.chat_template"), "llama");
  std::vector<ChatMessage> conv = {{"user", q1}};
  const auto encode = [&](const std::vector<ChatMessage>& m) {
    return tok.encode(tmpl.render(m, true), {.add_special = false, .parse_special = true});
  };
  EXPECT_EQ(turns[0]["prompt_tokens"].get<size_t>(), encode(conv).size());
  conv.push_back({"assistant", turns[0]["text"].get<std::string>()});
  conv.push_back({"user", q2});
  const std::vector<int32_t> second = encode(conv);

  // The second turn fed only what the sequence lacked.
  EXPECT_EQ(turns[1]["reprefilled"], false);
  EXPECT_EQ(turns[1]["reused_tokens"].get<int64_t>(), turns[0]["sequence_tokens"].get<int64_t>());
  EXPECT_GT(turns[1]["reused_tokens"].get<int64_t>(), turns[0]["prompt_tokens"].get<int64_t>());
  EXPECT_EQ(turns[1]["reused_tokens"].get<size_t>() + turns[1]["prompt_tokens"].get<size_t>(), second.size());

  // Continuing the sequence gives the reply a fresh run on the whole conversation gives.
  std::string ids;
  for (int32_t id : second) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const Result g = run_cli(dir, "generate --model " + model_ + opts + " --json --prompt-ids " + ids, "");
  ASSERT_EQ(g.code, 0) << g.err;
  const json fresh = json::parse(g.out);
  EXPECT_EQ(fresh["tokens"], turns[1]["tokens"]) << "fresh: " << fresh["tokens"] << " chat: " << turns[1]["tokens"];
}

// A stop string that ends on the second reply token leaves the first one fed but the reply
// text empty, so the next rendering does not begin with what the sequence holds: the chat
// must prefill the conversation again, and then reply as a fresh run does.
TEST_F(ChatCli, PrefillsAgainWhenTheRenderingChanged) {
  TempDir dir;
  const std::string q1 = "Name a colour.", q2 = "Another one?";
  const std::string opts = " -n 6 -t 0 --threads 2 --ctx 512";
  // The greedy reply's first two tokens, to cut the reply right after them.
  const Result probe = run_cli(dir, "chat --model " + model_ + opts + " --json", q1 + "\n");
  ASSERT_EQ(probe.code, 0) << probe.err;
  const std::vector<json> first = json_lines(probe.out);
  ASSERT_EQ(first.size(), 1u);
  const std::vector<int32_t> reply = first[0]["tokens"].get<std::vector<int32_t>>();
  ASSERT_GE(reply.size(), 3u) << first[0].dump();
  GGUFFile gguf(model_);
  const Tokenizer tok = Tokenizer::from_gguf(gguf);
  const std::string stop = tok.decode(std::vector<int32_t>{reply[0], reply[1]});
  ASSERT_FALSE(tok.decode(std::vector<int32_t>{reply[0]}).empty());

  const Result r = run_cli(dir, "chat --model " + model_ + opts + " --json --stop " + quote(stop), q1 + "\n" + q2 + "\n");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::vector<json> turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 2u) << r.out;
  EXPECT_EQ(turns[0]["finish_reason"], "stop") << turns[0].dump();
  EXPECT_EQ(turns[0]["text"], "");
  EXPECT_EQ(turns[0]["sequence_tokens"], turns[0]["prompt_tokens"].get<int64_t>() + 1);  // the first reply token
  EXPECT_EQ(turns[1]["reprefilled"], true);
  EXPECT_EQ(turns[1]["reused_tokens"], 0);
  const ChatTemplate tmpl = ChatTemplate::detect(gguf.get_string("tokenizer.chat_template"), "llama");
  const std::vector<ChatMessage> conv = {{"user", q1}, {"assistant", ""}, {"user", q2}};
  const std::vector<int32_t> ids = tok.encode(tmpl.render(conv, true), {.add_special = false, .parse_special = true});
  EXPECT_EQ(turns[1]["prompt_tokens"].get<size_t>(), ids.size());
  EXPECT_EQ(turns[1]["sequence_tokens"].get<int64_t>(), fed_after(turns[1]));

  std::string list;
  for (int32_t id : ids) list += (list.empty() ? "" : ",") + std::to_string(id);
  // The fresh run has no stop string (not with --prompt-ids): it may go on further.
  const Result g = run_cli(dir, "generate --model " + model_ + opts + " --json --prompt-ids " + list, "");
  ASSERT_EQ(g.code, 0) << g.err;
  const std::vector<int32_t> fresh = json::parse(g.out)["tokens"].get<std::vector<int32_t>>();
  const std::vector<int32_t> chat = turns[1]["tokens"].get<std::vector<int32_t>>();
  ASSERT_LE(chat.size(), fresh.size());
  EXPECT_EQ(std::vector<int32_t>(fresh.begin(), fresh.begin() + chat.size()), chat);
}

TEST_F(ChatCli, ResetStartsOverAndExitEnds) {
  TempDir dir;
  const Result r = run_cli(dir, "chat --model " + model_ + " -n 4 -t 0 --threads 2 --ctx 512 --json",
                           "Hello!\n/reset\n\nHello!\n/exit\nnot read\n");
  ASSERT_EQ(r.code, 0) << r.err;
  const std::vector<json> turns = json_lines(r.out);
  ASSERT_EQ(turns.size(), 2u) << r.out;  // the empty line is no turn, nothing after /exit
  EXPECT_EQ(turns[1]["turn"], 1);
  EXPECT_EQ(turns[1]["reused_tokens"], 0);
  EXPECT_EQ(turns[1]["prompt_tokens"], turns[0]["prompt_tokens"]);
  EXPECT_EQ(turns[1]["tokens"], turns[0]["tokens"]);  // greedy on the same prompt
}

TEST_F(ChatCli, StreamsRepliesAndPrintsTurnStats) {
  TempDir dir;
  const Result r = run_cli(dir, "chat --model " + model_ + " -n 4 -t 0 --threads 2 --ctx 512", "Hi\nBye\n");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("[turn 1] prompt"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("[turn 2] prompt"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("reused"), std::string::npos) << r.err;
  EXPECT_GE(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;  // each reply ends its line
}

TEST_F(ChatCli, TurnPastTheContextLimitFailsCleanly) {
  TempDir dir;
  std::string long_line;
  for (int i = 0; i < 40; ++i) long_line += "many words ";
  const Result r =
      run_cli(dir, "chat --model " + model_ + " -n 4 -t 0 --threads 2 --ctx 64 --json", "Hi\n" + long_line + "\n");
  EXPECT_GT(r.code, 0);
  EXPECT_EQ(json_lines(r.out).size(), 1u) << r.out;  // the first turn fit
  EXPECT_NE(r.err.find("context limit of 64"), std::string::npos) << r.err;
}

TEST(ChatCliErrors, MissingModelFailsCleanly) {
  TempDir dir;
  const Result r = run_cli(dir, "chat --model /nonexistent/model.gguf", "hi\n");
  EXPECT_GT(r.code, 0);
  EXPECT_NE(r.err.find("/nonexistent/model.gguf"), std::string::npos) << r.err;
}

}  // namespace

#endif  // MULTIPOLE_HAVE_TOKENIZER
