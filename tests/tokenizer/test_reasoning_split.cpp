// ReasoningSplitter: hand-written expected splits, and the same result however the text is cut
// into chunks (every split into up to three pieces at character boundaries, and byte by byte).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "multipole/tokenizer/reasoning_split.hpp"

using namespace multipole;

namespace {

struct Split {
  std::string thinking, answer;
  bool saw = false, closed = false;
};

Split run(bool starts_in_thinking, const std::vector<std::string>& chunks) {
  ReasoningSplitter s(starts_in_thinking);
  Split r;
  for (const std::string& c : chunks) {
    ReasoningPieces p = s.push(c);
    r.thinking += p.thinking;
    r.answer += p.answer;
  }
  ReasoningPieces p = s.flush();
  r.thinking += p.thinking;
  r.answer += p.answer;
  EXPECT_EQ(s.thinking(), r.thinking);  // the running totals are what was handed out
  EXPECT_EQ(s.answer(), r.answer);
  r.saw = s.saw_thinking();
  r.closed = s.closed_thinking();
  return r;
}

bool boundary(const std::string& s, size_t i) { return i == s.size() || (uint8_t(s[i]) & 0xC0) != 0x80; }

struct Case {
  bool starts_in_thinking;
  std::string text;
  std::string thinking, answer;
  bool saw, closed;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {false, "<think>\nabc\n</think>\n\nAnswer.", "abc", "Answer.", true, true},
      {true, "abc\n</think>\n\nx", "abc", "x", true, true},
      {true, "<think>\nabc</think>x", "abc", "x", true, true},  // R1 sometimes repeats the tag
      {false, "Hello <think> there </think> x", "", "Hello <think> there </think> x", false, false},
      {false, "  Hi\n", "", "  Hi\n", false, false},
      {false, "\n<think>\nstill thinking\n", "still thinking", "", true, false},
      {false, "<think>a</think>b</think>c", "a", "b</think>c", true, true},
      {false, "<think>a </thinking> b<</think>c", "a </thinking> b<", "c", true, true},
      {false, "<thin", "", "<thin", false, false},
      {false, "<think>\xE6\x97\xA5\xE6\x9C\xAC\n</think>\xF0\x9F\x98\x80", "\xE6\x97\xA5\xE6\x9C\xAC",
       "\xF0\x9F\x98\x80", true, true},
      {false, "<think>\na\n\nb\n</think>\nc\n", "a\n\nb", "c\n", true, true},
      {false, "<think>\n\n</think>\n\nAnswer", "", "Answer", true, true},
      {true, "", "", "", true, false},
      {false, "", "", "", false, false},
      {true, "\n\nonly reasoning, cut off", "only reasoning, cut off", "", true, false},
      {false, "<think>x</think>\n\n", "x", "", true, true},
  };
  return c;
}

TEST(ReasoningSplitter, SplitsWholeText) {
  for (const Case& c : cases()) {
    const Split r = run(c.starts_in_thinking, {c.text});
    EXPECT_EQ(r.thinking, c.thinking) << c.text;
    EXPECT_EQ(r.answer, c.answer) << c.text;
    EXPECT_EQ(r.saw, c.saw) << c.text;
    EXPECT_EQ(r.closed, c.closed) << c.text;
  }
}

TEST(ReasoningSplitter, SameSplitHoweverTheTextIsChunked) {
  for (const Case& c : cases()) {
    const std::string& t = c.text;
    for (size_t i = 0; i <= t.size(); ++i) {
      if (!boundary(t, i)) continue;
      for (size_t j = i; j <= t.size(); ++j) {
        if (!boundary(t, j)) continue;
        const Split r = run(c.starts_in_thinking, {t.substr(0, i), t.substr(i, j - i), t.substr(j)});
        ASSERT_EQ(r.thinking, c.thinking) << t << " cut at " << i << ", " << j;
        ASSERT_EQ(r.answer, c.answer) << t << " cut at " << i << ", " << j;
        ASSERT_EQ(r.closed, c.closed) << t << " cut at " << i << ", " << j;
      }
    }
    // One character at a time, as a tokenizer may hand it out.
    std::vector<std::string> chars;
    for (size_t i = 0; i < t.size();) {
      size_t n = 1;
      while (!boundary(t, i + n)) ++n;
      chars.push_back(t.substr(i, n));
      i += n;
    }
    const Split r = run(c.starts_in_thinking, chars);
    EXPECT_EQ(r.thinking, c.thinking) << t;
    EXPECT_EQ(r.answer, c.answer) << t;
  }
}

TEST(ReasoningSplitter, StreamsWithoutWaitingForTheEnd) {
  // Text is released as soon as it cannot be a tag: the answer streams before flush().
  ReasoningSplitter s;
  EXPECT_EQ(s.push("<th").thinking, "");
  EXPECT_TRUE(s.push("ink>\nstep one").thinking == "step one");
  EXPECT_TRUE(s.in_thinking());
  EXPECT_EQ(s.push(" and two\n</th").thinking, " and two");  // the newline and "</th" held
  ReasoningPieces p = s.push("ink>\n\nThe answer");
  EXPECT_EQ(p.thinking, "");
  EXPECT_EQ(p.answer, "The answer");
  EXPECT_FALSE(s.in_thinking());
  EXPECT_EQ(s.push(" is 4.").answer, " is 4.");
  EXPECT_EQ(s.thinking(), "step one and two");
}

TEST(ReasoningSplitter, PromptOpensThinking) {
  const std::string r1_gen = "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C><think>\n";
  EXPECT_TRUE(prompt_opens_thinking("<\xEF\xBD\x9CUser\xEF\xBD\x9C>hi" + r1_gen));
  EXPECT_FALSE(prompt_opens_thinking(r1_gen + "</think>"));  // enable_thinking=false
  EXPECT_FALSE(prompt_opens_thinking("<|im_start|>assistant\n"));
  EXPECT_FALSE(prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
  EXPECT_TRUE(prompt_opens_thinking("x</think>y<think>"));
}

}  // namespace
