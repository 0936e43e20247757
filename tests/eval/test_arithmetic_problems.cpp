// Generated arithmetic problems, checked by re-deriving every answer from the problem TEXT
// with an independent reader of the sentence grammar (not from the generator's bookkeeping).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace {

using multipole::eval::ArithmeticSpec;
using multipole::eval::make_arithmetic_problem;
using multipole::eval::Problem;

// What the reader found in one problem.
struct Reading {
  std::string item, person;        // the question: how many `item` does `person` have
  std::optional<int64_t> answer;   // nullopt: the question's count was never stated
  int introductions = 0;           // "<P> has <n> <item>." for the asked item
  int steps = 0;                   // sentences that change a count of the asked item
  int distractors = 0;             // every other sentence
  int64_t largest = 0;             // the largest count of the asked item ever reached
  std::set<std::string> forms;     // which sentence forms appeared
  std::vector<std::string> errors; // rule breaks: unknown sentence, negative count, inexact division
};

std::vector<std::string> split_sentences(const std::string& body) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t at = body.find(". ", start); at != std::string::npos; at = body.find(". ", start)) {
    out.push_back(body.substr(start, at - start));
    start = at + 2;
  }
  std::string last = body.substr(start);
  if (!last.empty() && last.back() == '.') last.pop_back();
  out.push_back(last);
  return out;
}

Reading read_problem(const std::string& text) {
  Reading r;
  const size_t gap = text.find("\n\n");
  if (gap == std::string::npos) {
    r.errors.push_back("no blank line before the question");
    return r;
  }
  std::smatch m;
  const std::string question = text.substr(gap + 2);
  static const std::regex kQuestion(
      R"(^How many (\w+) does (\w+) have now\? Reason step by step and put the final answer in \\boxed\{\}\.$)");
  if (!std::regex_match(question, m, kQuestion)) {
    r.errors.push_back("question not understood: " + question);
    return r;
  }
  r.item = m[1];
  r.person = m[2];

  // Counts per (person, item); a count changed before it was stated is unknown.
  std::map<std::pair<std::string, std::string>, int64_t> count;
  std::set<std::pair<std::string, std::string>> unknown;
  auto known = [&](const std::string& p, const std::string& i) {
    return count.count({p, i}) > 0 && unknown.count({p, i}) == 0;
  };
  auto value = [&](const std::string& p, const std::string& i) -> int64_t {
    if (!known(p, i)) {
      unknown.insert({p, i});
      return 0;
    }
    return count[{p, i}];
  };
  auto set = [&](const std::string& p, const std::string& i, int64_t v, const std::string& sentence) {
    if (v < 0) r.errors.push_back("negative count after: " + sentence);
    count[{p, i}] = v;
    if (i == r.item) r.largest = std::max(r.largest, v);
  };

  static const std::regex kHas(R"(^(\w+) has (\d+) (\w+)$)");
  static const std::regex kBuy(R"(^(\w+) buys (\d+) (\w+) at the ([a-z ]+)$)");
  static const std::regex kSell(R"(^(\w+) sells (\d+) (\w+) at the ([a-z ]+)$)");
  static const std::regex kLose(R"(^(\w+) loses (\d+) (\w+)$)");
  static const std::regex kGive(R"(^(\w+) gives (\d+) (\w+) to (\w+)$)");
  static const std::regex kMultiply(R"(^After a trade, (\w+) has (\d+) times as many (\w+) as before$)");
  static const std::regex kSplit(R"(^(\w+) divides (\w+)'s (\w+) into (\d+) equal piles and keeps only one pile$)");
  static const std::regex kAsMany(R"(^(\w+) buys as many (\w+) at the ([a-z ]+) as (\w+) has now$)");
  static const std::regex kPacks(R"(^(\w+) buys (\d+) packs of (\w+) at the ([a-z ]+), with (\d+) (\w+) in each pack$)");
  static const std::regex kTimes(R"(^(\w+) buys (\d+) times as many (\w+) at the ([a-z ]+) as (\w+) has now$)");
  static const std::regex kFraction(R"(^(\w+) gives (half|a third|a quarter) of (\w+)'s (\w+) to (\w+)$)");
  static const std::regex kBlocks(R"(^The ([a-z ]+) is (\d+) blocks from (\w+)'s house$)");
  static const std::regex kAge(R"(^(\w+) is (\d+) years old$)");
  static const std::regex kOpens(R"(^The ([a-z ]+) opens at (\d+) o'clock$)");

  for (const std::string& s : split_sentences(text.substr(0, gap))) {
    int matched = 0;
    std::string item;     // the item the sentence is about ("" for no item)
    bool is_step = false;  // changes a count (as opposed to stating one)
    auto try_form = [&](const char* name, const std::regex& form) {
      if (!std::regex_match(s, m, form)) return false;
      ++matched;
      r.forms.insert(name);
      return true;
    };
    auto num = [&](int g) { return std::stoll(m[g].str()); };
    if (try_form("has", kHas)) {
      item = m[3];
      set(m[1], item, num(2), s);
    }
    if (try_form("buy", kBuy)) {
      item = m[3];
      is_step = true;
      set(m[1], item, value(m[1], item) + num(2), s);
    }
    if (try_form("sell", kSell) || try_form("lose", kLose)) {
      item = m[3];
      is_step = true;
      set(m[1], item, value(m[1], item) - num(2), s);
    }
    if (try_form("give", kGive)) {
      item = m[3];
      is_step = true;
      const std::string from = m[1], to = m[4];
      const int64_t n = num(2);
      set(from, item, value(from, item) - n, s);
      set(to, item, value(to, item) + n, s);
    }
    if (try_form("multiply", kMultiply)) {
      item = m[3];
      is_step = true;
      set(m[1], item, value(m[1], item) * num(2), s);
    }
    if (try_form("split", kSplit)) {
      item = m[3];
      is_step = true;
      if (m[1] != m[2]) r.errors.push_back("divides someone else's items: " + s);
      const int64_t v = value(m[1], item), k = num(4);
      if (k < 2 || v % k != 0) r.errors.push_back("inexact division: " + s);
      set(m[1], item, v / k, s);
    }
    if (try_form("as-many", kAsMany)) {
      item = m[2];
      is_step = true;
      set(m[1], item, value(m[1], item) + value(m[4], item), s);
    }
    if (try_form("packs", kPacks)) {
      item = m[3];
      is_step = true;
      if (m[6] != m[3]) r.errors.push_back("packs of one item hold another: " + s);
      set(m[1], item, value(m[1], item) + num(2) * num(5), s);
    }
    if (try_form("times", kTimes)) {
      item = m[3];
      is_step = true;
      set(m[1], item, value(m[1], item) + num(2) * value(m[5], item), s);
    }
    if (try_form("fraction", kFraction)) {
      item = m[4];
      is_step = true;
      if (m[1] != m[3]) r.errors.push_back("gives someone else's items: " + s);
      const int64_t d = m[2] == "half" ? 2 : m[2] == "a third" ? 3 : 4;
      const std::string from = m[1], to = m[5];
      const int64_t v = value(from, item);
      if (v % d != 0) r.errors.push_back("inexact fraction: " + s);
      set(from, item, v - v / d, s);
      set(to, item, value(to, item) + v / d, s);
    }
    try_form("blocks", kBlocks);
    try_form("age", kAge);
    try_form("opens", kOpens);

    if (matched != 1) {
      r.errors.push_back((matched == 0 ? "no form matches: " : "several forms match: ") + s);
      continue;
    }
    if (item != r.item) {
      ++r.distractors;
    } else if (is_step) {
      ++r.steps;
    } else {
      ++r.introductions;
    }
  }
  if (known(r.person, r.item)) r.answer = count[{r.person, r.item}];
  return r;
}

// Every step changes the asked person's count: re-read the text one sentence at a time.
bool every_step_changes_the_answer(const Problem& p) {
  const size_t gap = p.question.find("\n\n");
  const std::string question = p.question.substr(gap);
  std::optional<Reading> previous;
  std::string prefix;
  for (const std::string& s : split_sentences(p.question.substr(0, gap))) {
    prefix += (prefix.empty() ? "" : " ") + s + ".";
    Reading r = read_problem(prefix + question);
    if (previous && r.steps > previous->steps &&
        !(r.answer && previous->answer && *r.answer != *previous->answer))
      return false;
    previous = std::move(r);
  }
  return true;
}

constexpr int64_t kCap[4] = {0, 100, 1000, 100000};

TEST(ArithmeticProblems, AnswersMatchAnIndependentReadingOfTheText) {
  static const std::regex kOneOf(R"((^|[^0-9])1 [a-z])");
  int checked = 0;
  for (int difficulty = 1; difficulty <= 3; ++difficulty) {
    for (int steps : {1, 2, 3, 5, 8, 16}) {
      for (int distractors : {0, 1, 4}) {
        for (uint64_t seed : {0ULL, 12345ULL}) {
          const ArithmeticSpec spec{steps, difficulty, distractors, seed};
          for (int index = 0; index < 6; ++index) {
            const Problem p = make_arithmetic_problem(spec, index);
            SCOPED_TRACE(p.question);
            const Reading r = read_problem(p.question);
            EXPECT_TRUE(r.errors.empty()) << r.errors.front();
            ASSERT_TRUE(r.answer.has_value());
            EXPECT_EQ(std::to_string(*r.answer), p.answer);
            EXPECT_EQ(r.steps, steps);
            EXPECT_EQ(p.steps, steps);
            EXPECT_EQ(r.distractors, distractors);
            EXPECT_EQ(r.introductions, difficulty + 1);  // the cast: 2, 3 or 4 people
            EXPECT_LE(r.largest, kCap[difficulty]);
            EXPECT_EQ(p.id, "arith-s" + std::to_string(steps) + "-d" + std::to_string(difficulty) + "-" +
                                std::to_string(index));
            EXPECT_NE(p.question.find("\\boxed{}"), std::string::npos);
            // Items are named in the plural, so no amount is one ("1 apples").
            EXPECT_FALSE(std::regex_search(p.question, kOneOf));
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 3 * 6 * 3 * 2 * 6);
}

TEST(ArithmeticProblems, EveryStepChangesTheAskedCount) {
  for (int difficulty = 1; difficulty <= 3; ++difficulty)
    for (int index = 0; index < 40; ++index) {
      const Problem p = make_arithmetic_problem({6, difficulty, 3, 7}, index);
      EXPECT_TRUE(every_step_changes_the_answer(p)) << p.question;
    }
}

TEST(ArithmeticProblems, DifficultyWidensOperationsAndNumbers) {
  std::set<std::string> forms[4];
  int64_t largest[4] = {0, 0, 0, 0};
  for (int difficulty = 1; difficulty <= 3; ++difficulty)
    for (int index = 0; index < 200; ++index) {
      const Reading r = read_problem(make_arithmetic_problem({8, difficulty, 2, 99}, index).question);
      ASSERT_TRUE(r.errors.empty()) << r.errors.front();
      forms[difficulty].insert(r.forms.begin(), r.forms.end());
      largest[difficulty] = std::max(largest[difficulty], r.largest);
    }
  const std::set<std::string> basic = {"has", "buy", "sell", "lose", "give", "blocks", "age", "opens"};
  EXPECT_EQ(forms[1], basic);
  std::set<std::string> medium = basic;
  medium.insert({"multiply", "split", "as-many", "packs"});
  EXPECT_EQ(forms[2], medium);
  std::set<std::string> hard = medium;
  hard.insert({"times", "fraction"});
  EXPECT_EQ(forms[3], hard);
  EXPECT_LT(largest[1], largest[2]);
  EXPECT_LT(largest[2], largest[3]);
}

TEST(ArithmeticProblems, DeterministicAndVaried) {
  const ArithmeticSpec spec{5, 2, 2, 42};
  std::set<std::string> texts;
  for (int index = 0; index < 50; ++index) {
    const Problem a = make_arithmetic_problem(spec, index), b = make_arithmetic_problem(spec, index);
    EXPECT_EQ(a.question, b.question);
    EXPECT_EQ(a.answer, b.answer);
    texts.insert(a.question);
  }
  EXPECT_EQ(texts.size(), 50u);
  EXPECT_NE(make_arithmetic_problem({5, 2, 2, 42}, 0).question, make_arithmetic_problem({5, 2, 2, 43}, 0).question);
}

// The text is the specification: a change to the generator that changes problems must
// change this pin too (and so every earlier result is no longer comparable).
TEST(ArithmeticProblems, PinnedText) {
  const Problem p = make_arithmetic_problem({4, 2, 2, 2026}, 3);
  // Worked by hand: 20, + 65 (Ben's) = 85, x 3 = 255, + 4 = 259, - 30 = 229.
  EXPECT_EQ(p.question,
            "Nora has 20 cards. Ben has 65 cards. Omar has 73 cards. Nora buys as many cards at the toy store as "
            "Ben has now. The book fair opens at 8 o'clock. Liam has 51 beads. After a trade, Nora has 3 times as "
            "many cards as before. Nora buys 4 cards at the bakery. Nora gives 30 cards to Ben.\n\nHow many cards "
            "does Nora have now? Reason step by step and put the final answer in \\boxed{}.");
  EXPECT_EQ(p.answer, "229");
}

TEST(ArithmeticProblems, RejectsBadSpecs) {
  EXPECT_THROW(make_arithmetic_problem({0, 1, 0, 0}, 0), multipole::Error);
  EXPECT_THROW(make_arithmetic_problem({3, 0, 0, 0}, 0), multipole::Error);
  EXPECT_THROW(make_arithmetic_problem({3, 4, 0, 0}, 0), multipole::Error);
  EXPECT_THROW(make_arithmetic_problem({3, 1, -1, 0}, 0), multipole::Error);
  EXPECT_THROW(make_arithmetic_problem({3, 1, 0, 0}, -1), multipole::Error);
}

}  // namespace
