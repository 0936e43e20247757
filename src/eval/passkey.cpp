// Passkey retrieval prompts: a number stated once inside generated filler of a given length.
//
// The filler is a stream of short generated sentences without digits (so the needle is the
// only number in the prompt). The number of filler sentences is found by a bracketed binary
// search on the token count of the whole prompt, so count_tokens (a real tokenizer, slow on
// long text) runs O(log n) times; the prompt is the longest one that fits the target.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "eval/prng.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace multipole::eval {

namespace {

constexpr std::string_view kIntro =
    "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it; you will be asked for "
    "it at the end.\n\n";
constexpr std::string_view kQuestion = "\n\nWhat is the pass key?";

constexpr std::array<std::string_view, 18> kNouns = {"grass", "sky",   "sun",    "river", "mountain", "forest",
                                                     "cloud", "wind",  "garden", "road",  "bird",     "tree",
                                                     "lake",  "field", "stone",  "moon",  "sea",      "path"};
constexpr std::array<std::string_view, 14> kAdjectives = {"green", "blue", "yellow", "quiet", "calm", "bright", "old",
                                                          "tall",  "wide", "soft",   "warm",  "cold", "still",  "gentle"};
constexpr std::array<std::string_view, 8> kVerbs = {"rests", "waits", "sways", "drifts", "shines", "glows", "sleeps",
                                                    "hums"};
constexpr std::array<std::string_view, 8> kPlaces = {"village", "shore",    "valley",  "bridge",
                                                     "meadow",  "old mill", "harbour", "station"};
constexpr std::array<std::string_view, 4> kFixed = {"Here we go.", "There and back again.",
                                                    "Nothing happens for a while.", "The day goes on."};

template <size_t N>
std::string_view pick(SplitMix64& rng, const std::array<std::string_view, N>& words) {
  return words[static_cast<size_t>(rng.uniform(0, int64_t(N) - 1))];
}

std::string filler_sentence(SplitMix64& rng) {
  switch (rng.uniform(0, 4)) {
    case 0:
      return fmt::format("The {} is {}.", pick(rng, kNouns), pick(rng, kAdjectives));
    case 1:
      return fmt::format("The {} near the {} {}.", pick(rng, kNouns), pick(rng, kPlaces), pick(rng, kVerbs));
    case 2: {
      const auto adjective = pick(rng, kAdjectives);
      const auto noun = pick(rng, kNouns);
      return fmt::format("A {} {} {} by the {}.", adjective, noun, pick(rng, kVerbs), pick(rng, kPlaces));
    }
    case 3:
      return fmt::format("Everyone agrees that the {} is {} today.", pick(rng, kNouns), pick(rng, kAdjectives));
    default:
      return std::string(pick(rng, kFixed));
  }
}

// The filler sentences, generated on demand; the first n never change as more are asked for.
class Filler {
 public:
  explicit Filler(uint64_t seed) : rng_(SplitMix64::from({seed, 0x66696c6c6572ULL /* "filler" */})) {}
  const std::vector<std::string>& first(int64_t n) {
    while (int64_t(sentences_.size()) < n) sentences_.push_back(filler_sentence(rng_));
    return sentences_;
  }

 private:
  SplitMix64 rng_;
  std::vector<std::string> sentences_;
};

// The prompt with n filler sentences and the needle on the sentence boundary nearest to
// `depth` of the filler's characters.
std::string build_prompt(Filler& filler, int64_t n, double depth, const std::string& needle) {
  const auto& sentences = filler.first(n);
  size_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += sentences[size_t(i)].size() + 1;
  const double want = depth * double(total);
  int64_t boundary = 0;
  size_t before = 0;  // filler characters before `boundary`
  double best = want;
  for (int64_t i = 0; i < n; ++i) {
    before += sentences[size_t(i)].size() + 1;
    if (std::abs(double(before) - want) < best) {
      best = std::abs(double(before) - want);
      boundary = i + 1;
    }
  }
  std::string text(kIntro);
  text.reserve(total + needle.size() + kIntro.size() + kQuestion.size() + 2);
  for (int64_t i = 0; i <= n; ++i) {
    if (i == boundary) {
      if (text.size() > kIntro.size()) text += ' ';
      text += needle;
    }
    if (i < n) {
      if (text.size() > kIntro.size()) text += ' ';
      text += sentences[size_t(i)];
    }
  }
  text += kQuestion;
  return text;
}

}  // namespace

PasskeyCase make_passkey_case(const std::function<int64_t(std::string_view)>& count_tokens, int64_t target_tokens,
                              double depth, uint64_t seed) {
  MP_CHECK(count_tokens, "passkey: no count_tokens function");
  MP_CHECK(std::isfinite(depth) && depth >= 0 && depth <= 1, "passkey: depth {} must be in [0, 1]", depth);
  MP_CHECK(target_tokens >= 1, "passkey: target length {} tokens must be >= 1", target_tokens);

  PasskeyCase c;
  c.id = fmt::format("passkey-L{}-D{:.2f}-{}", target_tokens, depth, seed);
  c.target_tokens = target_tokens;
  c.depth = depth;
  // The key depends on the whole case, so that the cells of a length x depth grid run with
  // the same seeds do not all ask for the same numbers; the filler depends on the seed only.
  uint64_t depth_bits = 0;
  static_assert(sizeof(depth_bits) == sizeof(depth));
  std::memcpy(&depth_bits, &depth, sizeof(depth));
  SplitMix64 rng = SplitMix64::from({seed, uint64_t(target_tokens), depth_bits, 0x706173736b6579ULL /* "passkey" */});
  const int64_t digits = rng.uniform(5, 7);
  c.passkey = std::to_string(rng.uniform(1, 9));
  for (int64_t i = 1; i < digits; ++i) c.passkey += char('0' + rng.uniform(0, 9));
  const std::string needle = fmt::format("The pass key is {0}. Remember it. {0} is the pass key.", c.passkey);

  Filler filler(seed);
  // [lo, hi): lo sentences fit the target (count <= target), hi do not (hi < 0: none known yet).
  int64_t lo = 0, hi = -1;
  const int64_t bare = count_tokens(build_prompt(filler, 0, depth, needle));
  MP_CHECK(bare <= target_tokens, "passkey: target length {} tokens is below the {} tokens of the needle and question",
           target_tokens, bare);
  auto probe = [&](int64_t n) {
    const int64_t tokens = count_tokens(build_prompt(filler, n, depth, needle));
    if (tokens <= target_tokens) {
      lo = std::max(lo, n);
    } else if (hi < 0 || n < hi) {
      hi = n;
    }
    return tokens;
  };
  // Estimate the tokens per sentence from a short probe, then bracket the estimate tightly.
  constexpr int64_t kProbe = 64;
  const double per_sentence = std::max(1e-3, double(probe(kProbe) - bare) / double(kProbe));
  const int64_t estimate = int64_t(double(target_tokens - bare) / per_sentence);
  int64_t step = std::max<int64_t>(2, estimate / 64);
  for (int64_t guess : {estimate - step, estimate + step})
    if (guess > lo && (hi < 0 || guess < hi)) probe(guess);
  // A sentence is at least one token, so more than target_tokens sentences never fit.
  const int64_t limit = 2 * target_tokens + kProbe;
  while (hi < 0) {
    MP_CHECK(lo < limit, "passkey: {} filler sentences still count at most {} tokens; count_tokens does not grow", lo,
             target_tokens);
    probe(std::min(limit, lo + step));
    step *= 2;
  }
  while (hi - lo > 1) probe(lo + (hi - lo) / 2);

  c.prompt = build_prompt(filler, lo, depth, needle);
  return c;
}

}  // namespace multipole::eval
