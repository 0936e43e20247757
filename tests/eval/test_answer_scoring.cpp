// Answer extraction and comparison on hand-written model outputs, and the Wilson interval
// against published values and an independent (quadratic-root) computation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace {

using multipole::eval::answers_equal;
using multipole::eval::extract_answer;
using multipole::eval::passkey_found;
using multipole::eval::wilson_interval;

struct ExtractCase {
  const char* text;
  std::optional<std::string> expected;
};

TEST(ExtractAnswer, HandWrittenOutputs) {
  const ExtractCase cases[] = {
      {"So the total is \\boxed{42}.", "42"},
      {"First \\boxed{3}, on reflection \\boxed{5}.", "5"},
      {"\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"},
      {"\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"},
      {"nested: \\boxed{{12}}", "12"},
      {"\\boxed{\\text{204}}.", "204"},
      {"$\\boxed{1,000}$", "1000"},
      {"$\\boxed{-7}$", "-7"},
      {"\\boxed{x = 5}", "5"},
      {"\\boxed{50^\\circ}", "50"},
      {"\\boxed {9}", "9"},
      {"\\fbox{8}", "8"},
      {"The answer is \\boxed{204.}", "204"},
      // The instruction echoed after the answer: the empty box is not an answer.
      {"\\boxed{3} as asked, put the final answer in \\boxed{}.", "3"},
      // Thinking is ignored once it is finished...
      {"<think>maybe \\boxed{5}?</think> The answer is \\boxed{7}.", "7"},
      {"<think>it is \\boxed{5}</think> I cannot tell.", std::nullopt},
      {"<think>the answer is 5</think>\nThe answer is 6", "6"},
      // ...but an unfinished thought is all the model wrote, so it is read.
      {"<think>so it must be \\boxed{11}", "11"},
      // An unclosed box is no answer; fall back to the phrase.
      {"The answer is 17. \\boxed{12", "17"},
      {"\\boxed{12", std::nullopt},
      {"The answer is 17.", "17"},
      {"**Answer:** $-5$", "-5"},
      {"Final answer: 1,234 apples", "1234"},
      {"The answer is 3/4.", "3/4"},
      {"the answer is 12, and later the answer is 13", "13"},
      {"The answer is 9. Is the answer is unclear? no", "9"},
      {"The answer is x.", std::nullopt},
      {"I think it is 12.", std::nullopt},
      {"", std::nullopt},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    EXPECT_EQ(extract_answer(c.text), c.expected);
  }
}

TEST(AnswersEqual, NumbersAreComparedExactly) {
  const std::pair<const char*, const char*> equal[] = {
      {"204", "204"},     {"204.0", "204"},        {"0204", "204"},  {"$204$", "204"},     {"\\text{204}", "204"},
      {" 204 ", "204"},   {"1,000", "1000"},       {"-12", "-12"},   {"\xe2\x88\x92" "12", "-12"},
      {"3/4", "\\frac{3}{4}"}, {"0.75", "3/4"},    {"6/8", "3/4"},   {"\\frac34", "0.75"}, {"-\\frac{1}{2}", "-0.5"},
      {"204.", "204"},    {"1,234,567", "1234567"}, {"abc", "abc"},  {"070", "70"},        {"+5", "5"},
  };
  for (const auto& [a, b] : equal) {
    EXPECT_TRUE(answers_equal(a, b)) << a << " vs " << b;
    EXPECT_TRUE(answers_equal(b, a)) << b << " vs " << a;
  }
  const std::pair<const char*, const char*> different[] = {
      {"2,04", "204"}, {"204.5", "204"}, {"-12", "12"},   {"1/3", "0.333"}, {"", "0"},         {"abc", "abd"},
      {"12", "12a"},   {"1,00", "100"},  {"12,3456", "123456"}, {"0", "-1"}, {"10000000000000000000001", "1"},
  };
  for (const auto& [a, b] : different) {
    EXPECT_FALSE(answers_equal(a, b)) << a << " vs " << b;
    EXPECT_FALSE(answers_equal(b, a)) << b << " vs " << a;
  }
}

// Random soup of the pieces the parsers look for: no crash, no throw, no empty answer, and
// equality is symmetric.
TEST(AnswerScoring, SurvivesRandomText) {
  const char* pieces[] = {"\\boxed{", "\\boxed", "{", "}", "$", "1", "23", ",", ".", "/", "\\frac", "answer is",
                          "Answer:", "</think>", "<think>", " ", "-", "=", "\\text{", "\\", "0", "\\fbox{", "x"};
  uint64_t state = 12345;
  auto next = [&] {  // a small LCG: any sequence will do
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 33;
  };
  for (int i = 0; i < 20000; ++i) {
    std::string a, b;
    for (uint64_t n = next() % 12; n > 0; --n) a += pieces[next() % std::size(pieces)];
    for (uint64_t n = next() % 6; n > 0; --n) b += pieces[next() % std::size(pieces)];
    SCOPED_TRACE(a + " | " + b);
    std::optional<std::string> answer;
    ASSERT_NO_THROW(answer = extract_answer(a));
    if (answer) {
      EXPECT_FALSE(answer->empty());
    }
    bool ab = false, ba = false;
    ASSERT_NO_THROW(ab = answers_equal(a, b));
    ASSERT_NO_THROW(ba = answers_equal(b, a));
    EXPECT_EQ(ab, ba);
  }
}

TEST(PasskeyFound, WholeNumbersOnly) {
  EXPECT_TRUE(passkey_found("The pass key is 12345.", "12345"));
  EXPECT_TRUE(passkey_found("key:12345", "12345"));
  EXPECT_TRUE(passkey_found("a12345b", "12345"));
  EXPECT_TRUE(passkey_found("not 123456 but 12345", "12345"));
  EXPECT_FALSE(passkey_found("123456", "12345"));
  EXPECT_FALSE(passkey_found("012345", "12345"));
  EXPECT_FALSE(passkey_found("1234", "12345"));
  EXPECT_FALSE(passkey_found("", "12345"));
  EXPECT_FALSE(passkey_found("12345", ""));
}

// The Wilson bounds are the roots p of (phat - p)^2 = z^2 p (1 - p) / n.
std::pair<double, double> quadratic_roots(int64_t s, int64_t n, double z) {
  const double phat = double(s) / double(n), k = z * z / double(n);
  const double a = 1 + k, b = -(2 * phat + k), c = phat * phat;
  const double root = std::sqrt(b * b - 4 * a * c);
  return {(-b - root) / (2 * a), (-b + root) / (2 * a)};
}

TEST(WilsonInterval, PublishedValues) {
  // 0 of 10 at 95%: [0, 0.2775]; 10 of 10: [0.7225, 1]; 5 of 10: [0.2366, 0.7634].
  auto r = wilson_interval(0, 10);
  EXPECT_EQ(r.low, 0.0);
  EXPECT_NEAR(r.high, 0.2775, 1e-4);
  r = wilson_interval(10, 10);
  EXPECT_NEAR(r.low, 0.7225, 1e-4);
  EXPECT_EQ(r.high, 1.0);
  r = wilson_interval(5, 10);
  EXPECT_NEAR(r.low, 0.2366, 1e-4);
  EXPECT_NEAR(r.high, 0.7634, 1e-4);
  r = wilson_interval(0, 0);
  EXPECT_EQ(r.low, 0.0);
  EXPECT_EQ(r.high, 1.0);
}

TEST(WilsonInterval, MatchesTheQuadraticRoots) {
  for (int64_t n : {1, 2, 7, 30, 100, 1000})
    for (int64_t s = 0; s <= n; s += std::max<int64_t>(1, n / 13))
      for (double z : {1.0, 1.96, 2.576}) {
        const auto r = wilson_interval(s, n, z);
        const auto [low, high] = quadratic_roots(s, n, z);
        EXPECT_NEAR(r.low, std::max(0.0, low), 1e-9) << s << "/" << n << " z=" << z;
        EXPECT_NEAR(r.high, std::min(1.0, high), 1e-9) << s << "/" << n << " z=" << z;
        EXPECT_LE(r.low, double(s) / double(n));
        EXPECT_GE(r.high, double(s) / double(n));
      }
}

TEST(WilsonInterval, RejectsImpossibleCounts) {
  EXPECT_THROW(wilson_interval(3, 2), multipole::Error);
  EXPECT_THROW(wilson_interval(-1, 2), multipole::Error);
  EXPECT_THROW(wilson_interval(0, -1), multipole::Error);
  EXPECT_THROW(wilson_interval(1, 2, 0.0), multipole::Error);
}

}  // namespace
