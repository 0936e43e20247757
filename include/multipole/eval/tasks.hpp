#pragma once
// What the evaluation suites ask and how answers are scored, independent of any model:
// passkey prompts hidden in generated filler, multi-step arithmetic word problems with exact
// answers (GSM-Infinite style), AIME 2025 loading, answer extraction and comparison, and
// binomial confidence intervals. The runner (eval/runner.hpp) feeds these to a model.
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace multipole::eval {

// A question with one exact answer (AIME or generated arithmetic).
struct Problem {
  std::string id;        // "aime2025-I-1", "arith-s8-d2-17", ...
  std::string question;  // the user message, ending with the instruction to box the answer
  std::string answer;    // canonical integer text ("-12", "204")
  int steps = 0;         // reasoning steps the generator used (0 for AIME)
};

// Reads aime2025.jsonl (one object per line: id, problem, answer). Ids become
// "<file stem>-<id>" ("aime2025-0"), answers canonical integers ("070" -> "70"); a problem
// without "\boxed" gets the box instruction appended. Throws naming the file, line and field.
std::vector<Problem> load_aime(const std::string& path);

// Generated word problems: `steps` chained quantity updates over named entities (buy, give,
// lose, double, split evenly, ...) whose answer the generator tracks exactly in integers;
// `difficulty` 1..3 widens the number range and the kinds of operation; distractor sentences
// (irrelevant facts) pad the text. Same (spec, index): same problem on every platform.
struct ArithmeticSpec {
  int steps = 4;          // >= 1
  int difficulty = 1;     // 1..3
  int distractors = 0;    // irrelevant sentences mixed in
  uint64_t seed = 0;
};
Problem make_arithmetic_problem(const ArithmeticSpec& spec, int index);

// A passkey (a random 5-to-7 digit number) stated once in filler text of about
// `target_tokens` tokens, at relative depth `depth` (0 = start, 1 = end), followed by the
// question. count_tokens measures text in the model's tokens, so lengths are the model's; the
// prompt is the longest that counts at most target_tokens (O(log n) calls of count_tokens).
// The filler depends on the seed only, the key on (seed, target_tokens, depth).
struct PasskeyCase {
  std::string id;      // "passkey-L4096-D0.50-3"
  std::string prompt;  // filler + needle + question (a user message)
  std::string passkey;
  int64_t target_tokens = 0;
  double depth = 0;
};
PasskeyCase make_passkey_case(const std::function<int64_t(std::string_view)>& count_tokens, int64_t target_tokens,
                              double depth, uint64_t seed);

// The answer a model gave: the last non-empty \boxed{...} if any, else the number after the
// last "answer is"/"Answer:", else nullopt; cleaned of $, \text{}, "x =", a final ".", and
// thousands commas. Only the text after the last </think> is read; an unfinished thought
// (no </think>) is read whole, since it is all the model wrote.
std::optional<std::string> extract_answer(std::string_view text);
// Numeric equality after normalising ("204", "204.0", "$204$", "2,04" is not 204): numbers
// (integers, decimals, a/b, \frac{a}{b}) compare exactly as rationals, so "0204" == "204"
// and "3/4" == "0.75"; anything else compares as text, ignoring whitespace.
bool answers_equal(std::string_view given, std::string_view expected);
// Whether the passkey's digits appear as a whole number in the text.
bool passkey_found(std::string_view text, std::string_view passkey);

// Wilson score interval of a success rate (z = 1.96: 95%).
struct Interval {
  double low = 0, high = 0;
};
Interval wilson_interval(int64_t successes, int64_t trials, double z = 1.96);

}  // namespace multipole::eval
