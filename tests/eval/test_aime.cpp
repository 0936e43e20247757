// Loading AIME problems: the real 2025 file, and malformed files that must be rejected with
// the file, line and field named.
#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "io/temp_dir.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace {

using multipole::eval::load_aime;
using multipole::eval::Problem;
using multipole::test_util::TempDir;

const std::string kAime = std::string(MULTIPOLE_SHARED_DIR) + "/assets/aime2025/aime2025.jsonl";

std::string write(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.file(name);
  std::ofstream(path) << text;
  return path;
}

// The message of the multipole::Error that `f` throws ("" if it throws none).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const multipole::Error& e) {
    return e.what();
  }
  return "";
}

TEST(Aime, Loads2025) {
  ASSERT_TRUE(std::filesystem::exists(kAime)) << kAime;
  const std::vector<Problem> problems = load_aime(kAime);
  ASSERT_EQ(problems.size(), 30u);
  std::set<std::string> ids;
  for (const Problem& p : problems) {
    ids.insert(p.id);
    EXPECT_EQ(p.steps, 0);
    // AIME answers are integers 0..999, in canonical form.
    ASSERT_FALSE(p.answer.empty());
    EXPECT_EQ(p.answer.find_first_not_of("0123456789"), std::string::npos) << p.answer;
    EXPECT_TRUE(p.answer == "0" || p.answer[0] != '0') << p.answer;
    EXPECT_LE(std::stoi(p.answer), 999);
    EXPECT_NE(p.question.find("\\boxed{}"), std::string::npos) << p.id;
    EXPECT_FALSE(std::isspace(static_cast<unsigned char>(p.question.front())));
    EXPECT_FALSE(std::isspace(static_cast<unsigned char>(p.question.back())));
  }
  EXPECT_EQ(ids.size(), 30u);
  // The first line of the file: id 0, answer "70".
  EXPECT_EQ(problems[0].id, "aime2025-0");
  EXPECT_EQ(problems[0].answer, "70");
  EXPECT_TRUE(problems[0].question.starts_with("Find the sum of all integer bases")) << problems[0].question;
  EXPECT_EQ(problems[29].id, "aime2025-29");
}

TEST(Aime, AcceptsVariants) {
  TempDir dir;
  const std::string path = write(dir, "mini.jsonl",
                                 "{\"id\": \"I-1\", \"problem\": \"  What is 1+1?\\n\", \"answer\": \"002\"}\n"
                                 "\n"
                                 "{\"id\": 7, \"problem\": \"Box it: \\\\boxed{}\", \"answer\": 5}\n");
  const auto problems = load_aime(path);
  ASSERT_EQ(problems.size(), 2u);
  EXPECT_EQ(problems[0].id, "mini-I-1");
  EXPECT_EQ(problems[0].answer, "2");
  // No box instruction in the problem: one is added.
  EXPECT_TRUE(problems[0].question.starts_with("What is 1+1?\n"));
  EXPECT_NE(problems[0].question.find("\\boxed{}"), std::string::npos);
  EXPECT_EQ(problems[1].id, "mini-7");
  EXPECT_EQ(problems[1].answer, "5");
  EXPECT_EQ(problems[1].question, "Box it: \\boxed{}");
}

TEST(Aime, RejectsMalformedFiles) {
  TempDir dir;
  const std::string good = "{\"id\": 1, \"problem\": \"p\", \"answer\": \"3\"}\n";
  struct Bad {
    const char* name;
    std::string text;
    std::string must_mention;  // besides the path
  };
  const Bad bad[] = {
      {"json.jsonl", good + "{\"id\": 2, \"problem\": \"p\", \n", "line 2"},
      {"array.jsonl", "[1, 2]\n", "line 1"},
      {"no-answer.jsonl", good + "{\"id\": 2, \"problem\": \"p\"}\n", "'answer'"},
      {"no-problem.jsonl", "{\"id\": 2, \"answer\": \"1\"}\n", "'problem'"},
      {"no-id.jsonl", "{\"problem\": \"p\", \"answer\": \"1\"}\n", "'id'"},
      {"fraction.jsonl", "{\"id\": 2, \"problem\": \"p\", \"answer\": \"3/4\"}\n", "'answer'"},
      {"float.jsonl", "{\"id\": 2, \"problem\": \"p\", \"answer\": 2.5}\n", "'answer'"},
      {"empty-problem.jsonl", "{\"id\": 2, \"problem\": \"  \", \"answer\": \"1\"}\n", "'problem'"},
      {"repeat.jsonl", good + good, "line 2"},
      {"empty.jsonl", "\n\n", "no problems"},
  };
  for (const auto& b : bad) {
    SCOPED_TRACE(b.name);
    const std::string path = write(dir, b.name, b.text);
    const std::string message = error_of([&] { load_aime(path); });
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(b.must_mention), std::string::npos) << message;
  }
  EXPECT_NE(error_of([&] { load_aime(dir.file("absent.jsonl")); }).find("absent.jsonl"), std::string::npos);
}

}  // namespace
