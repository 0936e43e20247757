// Generated multi-step arithmetic word problems (in the style of GSM-Infinite).
//
// A problem is a cast of people who each hold some of one item, `steps` sentences that each
// change how many the asked-about person (the target) holds, distractor sentences about
// other things, and the question. The generator tracks every count exactly in integers:
// counts never go negative, a division is only written when it is exact, and every count
// stays below a per-difficulty cap. The sentences follow a small fixed grammar (one form per
// operation), so a test can re-derive the answer from the text alone.
//
// Difficulty 1: buy / sell / lose / give / receive small amounts. Difficulty 2 adds
// multiplying, splitting into equal piles, packs, and "as many as <someone> has now".
// Difficulty 3 adds "k times as many as <someone> has now" and giving away a half, a third
// or a quarter, with wider number ranges.
#include <algorithm>
#include <array>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "eval/prng.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace multipole::eval {

namespace {

constexpr std::array<std::string_view, 20> kNames = {"Alice", "Ben",  "Carla", "David", "Emma", "Farid", "Grace",
                                                     "Hiro",  "Ines", "Kemi",  "Liam",  "Maya", "Nora",  "Omar",
                                                     "Priya", "Quinn", "Rosa", "Sam",   "Tara", "Victor"};
constexpr std::array<std::string_view, 14> kItems = {"apples",  "marbles", "stickers", "pencils", "cookies",
                                                     "stamps",  "shells",  "coins",    "buttons", "cards",
                                                     "beads",   "crayons", "erasers",  "lemons"};
constexpr std::array<std::string_view, 8> kShops = {"bakery", "toy store",  "corner shop", "market",
                                                    "book fair", "craft store", "flea market", "school fair"};

struct Level {
  int cast;                // people holding the item
  int64_t initial_lo, initial_hi;
  int64_t amount_lo, amount_hi;  // amounts bought, lost, given (>= 2: items are plural)
  int64_t factor_hi;       // largest multiplier / divisor (0: none at this level)
  int64_t pack_hi;         // most items per pack
  int64_t cap;             // no count ever exceeds this
};
constexpr std::array<Level, 3> kLevels = {{
    {2, 5, 30, 2, 10, 0, 0, 100},
    {3, 10, 80, 2, 30, 3, 12, 1000},
    {4, 20, 300, 5, 120, 5, 24, 100000},
}};

enum class Op { Buy, Sell, Lose, Give, Receive, Multiply, Split, AsManyAs, Packs, TimesAsManyAs, GiveFraction };
struct OpKind {
  Op op;
  int difficulty;  // the lowest difficulty that uses it
};
constexpr std::array<OpKind, 11> kOps = {{{Op::Buy, 1},
                                          {Op::Sell, 1},
                                          {Op::Lose, 1},
                                          {Op::Give, 1},
                                          {Op::Receive, 1},
                                          {Op::Multiply, 2},
                                          {Op::Split, 2},
                                          {Op::AsManyAs, 2},
                                          {Op::Packs, 2},
                                          {Op::TimesAsManyAs, 3},
                                          {Op::GiveFraction, 3}}};

template <class T, size_t N>
const T& pick(SplitMix64& rng, const std::array<T, N>& options) {
  return options[static_cast<size_t>(rng.uniform(0, int64_t(N) - 1))];
}

class Generator {
 public:
  Generator(const ArithmeticSpec& spec, int index)
      : level_(kLevels[size_t(spec.difficulty - 1)]),
        difficulty_(spec.difficulty),
        rng_(SplitMix64::from({spec.seed, uint64_t(spec.steps), uint64_t(spec.difficulty),
                               uint64_t(spec.distractors), uint64_t(index)})) {
    item_ = pick(rng_, kItems);
    // The cast: distinct names, the first is the target.
    std::vector<std::string_view> names(kNames.begin(), kNames.end());
    for (int i = 0; i < level_.cast; ++i) {
      const size_t j = size_t(rng_.uniform(i, int64_t(names.size()) - 1));
      std::swap(names[size_t(i)], names[j]);
      cast_.push_back(names[size_t(i)]);
      count_.push_back(rng_.uniform(level_.initial_lo, level_.initial_hi));
    }
  }

  Problem run(const ArithmeticSpec& spec, int index) {
    std::vector<std::string> sentences;
    for (size_t i = 0; i < cast_.size(); ++i)
      sentences.push_back(fmt::format("{} has {} {}.", cast_[i], count_[i], item_));
    for (int s = 0; s < spec.steps; ++s) sentences.push_back(step());
    // Distractors go anywhere after the first sentence, before the question.
    for (int d = 0; d < spec.distractors; ++d) {
      const auto at = rng_.uniform(1, int64_t(sentences.size()));
      sentences.insert(sentences.begin() + at, distractor());
    }
    Problem p;
    p.id = fmt::format("arith-s{}-d{}-{}", spec.steps, spec.difficulty, index);
    for (const auto& sentence : sentences) p.question += (p.question.empty() ? "" : " ") + sentence;
    p.question += fmt::format("\n\nHow many {} does {} have now? Reason step by step and put the final answer in "
                              "\\boxed{{}}.",
                              item_, cast_[0]);
    p.answer = std::to_string(count_[0]);
    p.steps = spec.steps;
    return p;
  }

 private:
  // One sentence that changes the target's count.
  std::string step() {
    for (int attempt = 0; attempt < 256; ++attempt) {
      const OpKind& kind = pick(rng_, kOps);
      if (kind.difficulty > difficulty_) continue;
      const size_t other = size_t(rng_.uniform(1, int64_t(cast_.size()) - 1));
      if (auto sentence = try_op(kind.op, other); !sentence.empty()) return sentence;
    }
    // Not reached in practice (some buy or loss is always possible); kept exact anyway.
    if (count_[0] + 2 <= level_.cap) {
      count_[0] += 2;
      return fmt::format("{} buys {} {} at the {}.", cast_[0], 2, item_, pick(rng_, kShops));
    }
    count_[0] -= 2;
    return fmt::format("{} loses {} {}.", cast_[0], 2, item_);
  }

  // An amount in [lo, hi], or 0 when the range is empty.
  int64_t amount(int64_t lo, int64_t hi) { return hi < lo ? 0 : rng_.uniform(lo, hi); }

  // The sentence for `op` with cast member `other`, or "" when it would break a rule
  // (negative count, inexact division, a count over the cap).
  std::string try_op(Op op, size_t other) {
    int64_t& t = count_[0];
    int64_t& q = count_[other];
    const auto target = cast_[0], name = cast_[other];
    const int64_t cap = level_.cap;
    switch (op) {
      case Op::Buy: {
        const int64_t n = amount(level_.amount_lo, std::min(level_.amount_hi, cap - t));
        if (n == 0) return {};
        t += n;
        return fmt::format("{} buys {} {} at the {}.", target, n, item_, pick(rng_, kShops));
      }
      case Op::Sell:
      case Op::Lose: {
        const int64_t n = amount(level_.amount_lo, std::min(level_.amount_hi, t - 1));
        if (n == 0) return {};
        t -= n;
        if (op == Op::Sell) return fmt::format("{} sells {} {} at the {}.", target, n, item_, pick(rng_, kShops));
        return fmt::format("{} loses {} {}.", target, n, item_);
      }
      case Op::Give: {
        const int64_t n = amount(level_.amount_lo, std::min({level_.amount_hi, t - 1, cap - q}));
        if (n == 0) return {};
        t -= n;
        q += n;
        return fmt::format("{} gives {} {} to {}.", target, n, item_, name);
      }
      case Op::Receive: {
        const int64_t n = amount(level_.amount_lo, std::min({level_.amount_hi, q, cap - t}));
        if (n == 0) return {};
        t += n;
        q -= n;
        return fmt::format("{} gives {} {} to {}.", name, n, item_, target);
      }
      case Op::Multiply: {
        const int64_t k = amount(2, level_.factor_hi);
        if (k == 0 || t < 1 || t * k > cap) return {};
        t *= k;
        return fmt::format("After a trade, {} has {} times as many {} as before.", target, k, item_);
      }
      case Op::Split: {
        std::vector<int64_t> divisors;
        for (int64_t k = 2; k <= level_.factor_hi; ++k)
          if (t >= k && t % k == 0) divisors.push_back(k);
        if (divisors.empty()) return {};
        const int64_t k = divisors[size_t(rng_.uniform(0, int64_t(divisors.size()) - 1))];
        t /= k;
        return fmt::format("{} divides {}'s {} into {} equal piles and keeps only one pile.", target, target, item_,
                           k);
      }
      case Op::AsManyAs: {
        if (q < 1 || t + q > cap) return {};
        t += q;
        return fmt::format("{} buys as many {} at the {} as {} has now.", target, item_, pick(rng_, kShops), name);
      }
      case Op::Packs: {
        const int64_t packs = rng_.uniform(2, difficulty_ == 2 ? 5 : 9);
        const int64_t each = rng_.uniform(3, level_.pack_hi);
        if (t + packs * each > cap) return {};
        t += packs * each;
        return fmt::format("{} buys {} packs of {} at the {}, with {} {} in each pack.", target, packs, item_,
                           pick(rng_, kShops), each, item_);
      }
      case Op::TimesAsManyAs: {
        const int64_t k = rng_.uniform(2, level_.factor_hi);
        if (q < 1 || t + k * q > cap) return {};
        t += k * q;
        return fmt::format("{} buys {} times as many {} at the {} as {} has now.", target, k, item_,
                           pick(rng_, kShops), name);
      }
      case Op::GiveFraction: {
        static constexpr std::array<std::string_view, 5> kFractions = {"", "", "half", "a third", "a quarter"};
        const int64_t d = rng_.uniform(2, 4);
        if (t < d || t % d != 0 || q + t / d > cap) return {};
        const int64_t n = t / d;
        t -= n;
        q += n;
        return fmt::format("{} gives {} of {}'s {} to {}.", target, kFractions[size_t(d)], target, item_, name);
      }
    }
    return {};
  }

  // A sentence with a number that does not bear on the question.
  std::string distractor() {
    const std::string_view person = pick(rng_, kNames);
    std::string_view other_item = item_;
    while (other_item == item_) other_item = pick(rng_, kItems);
    switch (rng_.uniform(0, 4)) {
      case 0:
        return fmt::format("{} has {} {}.", person, rng_.uniform(2, 60), other_item);
      case 1:
        return fmt::format("{} buys {} {} at the {}.", person, rng_.uniform(2, 40), other_item, pick(rng_, kShops));
      case 2:
        return fmt::format("The {} is {} blocks from {}'s house.", pick(rng_, kShops), rng_.uniform(2, 30), person);
      case 3:
        return fmt::format("{} is {} years old.", person, rng_.uniform(6, 70));
      default:
        return fmt::format("The {} opens at {} o'clock.", pick(rng_, kShops), rng_.uniform(6, 11));
    }
  }

  const Level& level_;
  const int difficulty_;
  SplitMix64 rng_;
  std::string_view item_;
  std::vector<std::string_view> cast_;  // cast_[0] is the target
  std::vector<int64_t> count_;          // how many of item_ each holds
};

}  // namespace

Problem make_arithmetic_problem(const ArithmeticSpec& spec, int index) {
  MP_CHECK(spec.steps >= 1 && spec.steps <= 10000, "arithmetic problem: steps {} must be in [1, 10000]", spec.steps);
  MP_CHECK(spec.difficulty >= 1 && spec.difficulty <= 3, "arithmetic problem: difficulty {} must be in [1, 3]",
           spec.difficulty);
  MP_CHECK(spec.distractors >= 0 && spec.distractors <= 10000, "arithmetic problem: distractors {} must be in [0, 10000]",
           spec.distractors);
  MP_CHECK(index >= 0, "arithmetic problem: index {} must be >= 0", index);
  return Generator(spec, index).run(spec, index);
}

}  // namespace multipole::eval
