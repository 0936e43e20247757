// Passkey prompts: length against the target with simple token counters, the needle's depth
// and sentence-boundary placement, the number of count_tokens calls, determinism.
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

namespace {

using multipole::eval::make_passkey_case;
using multipole::eval::passkey_found;
using multipole::eval::PasskeyCase;

int64_t count_words(std::string_view text) {
  int64_t words = 0;
  bool in_word = false;
  for (char c : text) {
    const bool space = std::isspace(static_cast<unsigned char>(c)) != 0;
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return words;
}

// About four characters a token, as a rough stand-in for a BPE tokenizer.
int64_t count_quarter_chars(std::string_view text) { return int64_t(text.size() + 3) / 4; }

const std::string kNeedleStart = "The pass key is ";
const std::string kQuestion = "\n\nWhat is the pass key?";

// Where the needle sits within the filler, from 0 (before all of it) to 1 (after all of it).
double measured_depth(const PasskeyCase& c) {
  const size_t filler_start = c.prompt.find("\n\n") + 2;
  const size_t needle_at = c.prompt.find(kNeedleStart);
  const std::string needle = "The pass key is " + c.passkey + ". Remember it. " + c.passkey + " is the pass key.";
  const size_t needle_end = needle_at + needle.size();
  const size_t question_at = c.prompt.rfind(kQuestion);
  const double before = double(needle_at - filler_start), after = double(question_at - needle_end);
  return before + after <= 0 ? 0.0 : before / (before + after);
}

TEST(Passkey, LengthDepthAndPlacement) {
  for (int64_t target : {200, 1000, 4000, 20000}) {
    for (double depth : {0.0, 0.1, 0.5, 0.9, 1.0}) {
      for (int counter = 0; counter < 2; ++counter) {
        SCOPED_TRACE("target " + std::to_string(target) + " depth " + std::to_string(depth) + " counter " +
                     std::to_string(counter));
        int calls = 0;
        auto count = [&](std::string_view text) {
          ++calls;
          return counter == 0 ? count_words(text) : count_quarter_chars(text);
        };
        const PasskeyCase c = make_passkey_case(count, target, depth, uint64_t(target) + 7);
        const int64_t length = counter == 0 ? count_words(c.prompt) : count_quarter_chars(c.prompt);
        // At most the target, and short of it by less than 3% (or one sentence for short prompts).
        EXPECT_LE(length, target);
        EXPECT_GE(length, target - std::max<int64_t>(int64_t(0.03 * double(target)), 12));
        // O(log n) calls: n is at most target sentences.
        EXPECT_LE(calls, 2 * int(std::log2(double(target))) + 8);

        // The passkey: 5 to 7 digits, no leading zero, stated exactly twice (in the needle),
        // and the only digits in the prompt.
        ASSERT_GE(c.passkey.size(), 5u);
        ASSERT_LE(c.passkey.size(), 7u);
        EXPECT_NE(c.passkey[0], '0');
        int digits = 0;
        for (char ch : c.prompt) digits += std::isdigit(static_cast<unsigned char>(ch)) != 0;
        EXPECT_EQ(digits, int(2 * c.passkey.size()));
        EXPECT_TRUE(passkey_found(c.prompt, c.passkey));

        const std::string needle =
            "The pass key is " + c.passkey + ". Remember it. " + c.passkey + " is the pass key.";
        const size_t at = c.prompt.find(needle);
        ASSERT_NE(at, std::string::npos);
        EXPECT_EQ(c.prompt.find(kNeedleStart, at + 1), std::string::npos);
        // On a sentence boundary: after ". " or at the filler's start; before " " or the question.
        const std::string_view before = std::string_view(c.prompt).substr(0, at);
        EXPECT_TRUE(before.ends_with(". ") || before.ends_with("\n\n")) << before.substr(before.size() - 20);
        const std::string_view after = std::string_view(c.prompt).substr(at + needle.size());
        EXPECT_TRUE(after.starts_with(" ") || after.starts_with(kQuestion)) << after.substr(0, 20);
        EXPECT_TRUE(c.prompt.ends_with(kQuestion));

        // Depth within one sentence (at most ~60 characters) of the filler.
        const size_t filler_chars = c.prompt.size() - needle.size() - kQuestion.size() - (c.prompt.find("\n\n") + 2);
        EXPECT_NEAR(measured_depth(c), depth, 60.0 / double(filler_chars) + 1e-9);

        EXPECT_EQ(c.target_tokens, target);
        EXPECT_EQ(c.depth, depth);
      }
    }
  }
}

TEST(Passkey, FillerVariesAndCasesAreDeterministic) {
  const PasskeyCase a = make_passkey_case(count_words, 3000, 0.5, 11);
  const PasskeyCase b = make_passkey_case(count_words, 3000, 0.5, 11);
  EXPECT_EQ(a.prompt, b.prompt);
  EXPECT_EQ(a.passkey, b.passkey);
  EXPECT_EQ(a.id, "passkey-L3000-D0.50-11");
  // Different seeds: different keys and filler.
  std::set<std::string> keys;
  for (uint64_t seed = 0; seed < 20; ++seed) keys.insert(make_passkey_case(count_words, 300, 0.5, seed).passkey);
  EXPECT_GE(keys.size(), 19u);
  EXPECT_NE(make_passkey_case(count_words, 3000, 0.5, 12).prompt.substr(0, 2000), a.prompt.substr(0, 2000));
  // The filler is varied: many distinct sentences.
  std::set<std::string> sentences;
  const size_t start = a.prompt.find("\n\n") + 2;
  for (size_t at = start, next; (next = a.prompt.find(". ", at)) != std::string::npos; at = next + 2)
    sentences.insert(a.prompt.substr(at, next - at));
  EXPECT_GE(sentences.size(), 100u);
}

// A real BPE tokenizer (Qwen3's): token counts are not additive over sentences, yet the
// search still lands just under the target with few calls.
TEST(Passkey, QwenTokenizerLengths) {
  const std::string path = std::string(MULTIPOLE_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json";
  const auto tokenizer = multipole::Tokenizer::load(path);
  for (int64_t target : {512, 4096, 32768}) {
    int calls = 0;
    auto count = [&](std::string_view text) {
      ++calls;
      return int64_t(tokenizer.encode(text).size());
    };
    const PasskeyCase c = make_passkey_case(count, target, 0.3, 5);
    const int64_t length = int64_t(tokenizer.encode(c.prompt).size());
    EXPECT_LE(length, target);
    EXPECT_GE(length, target - std::max<int64_t>(target / 50, 12)) << "target " << target;
    EXPECT_LE(calls, 2 * int(std::log2(double(target))) + 8) << "target " << target;
    EXPECT_NEAR(measured_depth(c), 0.3, 0.01);
  }
}

// The prompt is the specification: pinned so that a change to the generator is noticed.
// (Read by hand: seven sentences before the needle and seven after it, at depth 0.5.)
TEST(Passkey, PinnedPrompt) {
  const PasskeyCase c = make_passkey_case(count_words, 120, 0.5, 11);
  EXPECT_EQ(c.passkey, "85837");
  EXPECT_EQ(c.prompt,
            "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it; you will be asked "
            "for it at the end.\n\nHere we go. Nothing happens for a while. The field is old. A blue stone waits by "
            "the meadow. The sky is cold. A still lake waits by the shore. The forest is calm. The pass key is 85837. "
            "Remember it. 85837 is the pass key. A calm bird hums by the valley. Everyone agrees that the cloud is "
            "blue today. A wide road waits by the shore. Here we go. The sky is soft. The day goes on. The grass "
            "near the shore sleeps.\n\nWhat is the pass key?");
  EXPECT_EQ(count_words(c.prompt), 116);  // counted by hand: 26 + 34 + 12 + 39 + 5
}

TEST(Passkey, RejectsImpossibleRequests) {
  EXPECT_THROW(make_passkey_case(count_words, 1000, -0.1, 0), multipole::Error);
  EXPECT_THROW(make_passkey_case(count_words, 1000, 1.5, 0), multipole::Error);
  EXPECT_THROW(make_passkey_case(count_words, 1000, std::nan(""), 0), multipole::Error);
  EXPECT_THROW(make_passkey_case(count_words, 10, 0.5, 0), multipole::Error);  // needle + question alone are longer
  EXPECT_THROW(make_passkey_case(count_words, 0, 0.5, 0), multipole::Error);
  EXPECT_THROW(make_passkey_case([](std::string_view) { return int64_t(0); }, 1000, 0.5, 0), multipole::Error);
  EXPECT_THROW(make_passkey_case(nullptr, 1000, 0.5, 0), multipole::Error);
}

}  // namespace
