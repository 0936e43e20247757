// ChatTemplate::render against the real Jinja templates rendered by Python jinja2, live, the way
// Hugging Face transformers does (scripts/render-chat-template.py): the four templates in
// ../shared/assets/chat-templates and SmolLM2's, read from the real GGUF. Byte for byte, over
// conversations with and without a system message, multi-turn, <think> blocks, Unicode and
// empty content, each with and without the generation prompt and thinking on and off.
// The interpreter comes from MULTIPOLE_TEST_PYTHON (scripts/test.sh makes the venv).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_run.hpp"

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/tokenizer/chat_template.hpp"

using namespace multipole;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kTemplates = std::string(MULTIPOLE_SHARED_DIR) + "/assets/chat-templates";
constexpr const char* kR1Bos = "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";

using multipole::test::slurp;
std::string quote(const std::string& s) { return multipole::test::shell_quote(s); }

using Conversation = std::vector<ChatMessage>;

std::vector<Conversation> conversations() {
  const std::string think = "<think>\nLet me see: 2 + 2.\nThat is 4.\n</think>\n\nIt is 4.";
  return {
      {{"user", "Hello!"}},
      {{"system", "You are terse."}, {"user", "Why is the sky blue?"}},
      {{"system", "Be kind."}, {"user", "What is 2+2?"}, {"assistant", think}, {"user", "And 3+3?"}},
      // Ends on an assistant turn after the last user turn (Qwen3 keeps its reasoning).
      {{"user", "What is 2+2?"}, {"assistant", think}},
      {{"user", "Q1"}, {"assistant", "plain answer"}, {"user", "Q2"}, {"assistant", "second"}},
      {{"user", "Q1"}, {"assistant", "a1"}, {"assistant", "<think>r</think>a2"}},
      // R1 style: the output started inside the reasoning, so no opening tag.
      {{"user", "Solve x+1=2"}, {"assistant", "x is 1 because...\n</think>\n\nx = 1"}, {"user", "Sure?"}},
      {{"user", "a"}, {"assistant", "<think>one</think>mid</think>\n\nend"}, {"user", "b"}},
      {{"user", "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x98\x80 caf\xC3\xA9"},
       {"assistant", "\xE3\x80\x80\xE5\x9B\x9E\xE7\xAD\x94\xC2\xA0"},  // U+3000 ... U+00A0 around it
       {"user", "\xE2\x80\x83 em space, \xC2\x85 NEL \xE2\x80\xA8"}},
      {{"system", ""}, {"user", ""}, {"assistant", ""}, {"user", ""}},
      {{"user", "  \n\t padded \n  "}, {"assistant", "\n\nleading newlines\n"}, {"user", "x"}},
      {{"system", "First system."}, {"user", "u1"}, {"system", "A later system message."}, {"user", "u2"}},
      {{"user", "quotes ' \" {{ not jinja }} {% raw %} \\n backslash"}},
  };
}

struct Case {
  json context;
  std::vector<ChatMessage> messages;
  bool generation_prompt;
  bool thinking;
};

// Python renders every case of one template in one run.
std::vector<std::string> render_with_jinja(const std::string& python, const std::string& template_path,
                                           const std::vector<Case>& cases) {
  const fs::path dir = fs::temp_directory_path() / ("mp_jinja_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string in = (dir / "in.json").string(), out = (dir / "out.json").string(),
                    err = (dir / "err.txt").string();
  json contexts = json::array();
  for (const Case& c : cases) contexts.push_back(c.context);
  std::ofstream(in, std::ios::binary) << contexts.dump();
  const std::string cmd = quote(python) + " " + quote(std::string(MULTIPOLE_SOURCE_DIR) + "/scripts/render-chat-template.py") +
                          " " + quote(template_path) + " < " + quote(in) + " > " + quote(out) + " 2> " + quote(err);
  const int status = std::system(cmd.c_str());
  EXPECT_EQ(status, 0) << cmd << "\n" << slurp(err);
  std::vector<std::string> rendered;
  if (status == 0) rendered = json::parse(slurp(out)).get<std::vector<std::string>>();
  fs::remove_all(dir);
  return rendered;
}

struct TemplateCase {
  const char* name;
  const char* file;       // in kTemplates; nullptr: SmolLM2's, from the GGUF
  const char* bos_token;  // what transformers passes as bos_token (nullptr: None)
  ChatStyle style;
};

void PrintTo(const TemplateCase& c, std::ostream* os) { *os << c.name; }

class JinjaTemplate : public ::testing::TestWithParam<TemplateCase> {};

TEST_P(JinjaTemplate, RenderEqualsPythonJinja2) {
  const char* python = std::getenv("MULTIPOLE_TEST_PYTHON");
  if (!python || !*python)
    GTEST_SKIP() << "MULTIPOLE_TEST_PYTHON is not set: set it to a Python with jinja2 (scripts/test.sh makes "
                    ".venv-test: MULTIPOLE_TEST_PYTHON=$PWD/.venv-test/bin/python)";
  const TemplateCase& tc = GetParam();
  std::string path;
  std::string jinja;
  fs::path tmp;
  if (tc.file) {
    path = kTemplates + "/" + tc.file;
    jinja = slurp(path);
  } else {
    const char* cache = std::getenv("MULTIPOLE_MODEL_CACHE");
    const fs::path gguf_path = (cache ? fs::path(cache) : fs::path(MULTIPOLE_SOURCE_DIR) / ".cache" / "models") /
                               "SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!fs::exists(gguf_path)) GTEST_SKIP() << gguf_path << " absent (run scripts/fetch-models.sh smollm2-135m)";
    GGUFFile gguf(gguf_path.string());
    jinja = std::string(gguf.get_string("tokenizer.chat_template"));
    tmp = fs::temp_directory_path() / ("mp_smollm2_" + std::to_string(::getpid()) + ".jinja");
    std::ofstream(tmp, std::ios::binary) << jinja;
    path = tmp.string();
  }
  ASSERT_FALSE(jinja.empty()) << path;
  const ChatTemplate tmpl = ChatTemplate::detect(jinja, "");
  EXPECT_EQ(tmpl.style(), tc.style) << tmpl.style_name();

  std::vector<Case> cases;
  for (const Conversation& conv : conversations()) {
    for (bool gen : {true, false}) {
      for (bool thinking : {true, false}) {
        json messages = json::array();
        for (const ChatMessage& m : conv) messages.push_back({{"role", m.role}, {"content", m.content}});
        json ctx = {{"messages", messages}, {"add_generation_prompt", gen}, {"enable_thinking", thinking}};
        ctx["bos_token"] = tc.bos_token ? json(tc.bos_token) : json(nullptr);
        cases.push_back({ctx, conv, gen, thinking});
      }
    }
  }
  const std::vector<std::string> expected = render_with_jinja(python, path, cases);
  if (!tmp.empty()) fs::remove(tmp);
  ASSERT_EQ(expected.size(), cases.size());
  int mismatches = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string ours = tmpl.render(cases[i].messages, cases[i].generation_prompt, cases[i].thinking);
    EXPECT_EQ(ours, expected[i]) << "case " << i << ": " << cases[i].context.dump();
    mismatches += ours != expected[i];
  }
  EXPECT_EQ(mismatches, 0) << "of " << cases.size() << " renders";
}

INSTANTIATE_TEST_SUITE_P(
    Templates, JinjaTemplate,
    ::testing::Values(TemplateCase{"Qwen3", "Qwen-Qwen3-0.6B.jinja", nullptr, ChatStyle::Qwen3},
                      TemplateCase{"Qwen25", "Qwen-Qwen2.5-7B-Instruct.jinja", nullptr, ChatStyle::ChatML},
                      TemplateCase{"DeepSeekR1Distill", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", kR1Bos,
                                   ChatStyle::DeepSeekR1},
                      TemplateCase{"Llama31", "meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>",
                                   ChatStyle::Llama3},
                      TemplateCase{"SmolLM2", nullptr, "<|im_start|>", ChatStyle::ChatML}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(ChatTemplate, RefusesUnknownTemplatesNamingThem) {
  try {
    ChatTemplate::detect("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}", "llama");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not supported"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ChatTemplate::detect("", "gpt2"), Error);
}

TEST(ChatTemplate, EndOfTurnMarkers) {
  EXPECT_EQ(ChatTemplate::detect(slurp(kTemplates + "/Qwen-Qwen3-0.6B.jinja"), "").end_of_turn(), "<|im_end|>");
  EXPECT_EQ(ChatTemplate::detect(slurp(kTemplates + "/meta-llama-Llama-3.1-8B-Instruct.jinja"), "").end_of_turn(),
            "<|eot_id|>");
  EXPECT_EQ(ChatTemplate::detect(slurp(kTemplates + "/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"), "")
                .end_of_turn(),
            "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>");
}

}  // namespace
