// Reading a model's final answer and comparing it with the expected one.
//
// Equality is numeric where both sides are numbers: integers, decimals and fractions are
// compared exactly as rationals, so "204" == "204.0" == "0204" (AIME answers are often
// written with three digits, "070") and "3/4" == "\frac{3}{4}" == "0.75". Thousands
// separators are accepted only in groups of three ("1,000" is 1000; "2,04" is not a number).
// Anything that is not a number is compared as text after the same clean-up.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace multipole::eval {

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
}

// The index one past the '}' matching the '{' at `open`, or npos when it is never closed.
size_t matching_brace(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;  // an escaped brace is text, not nesting
    } else if (s[i] == '{') {
      ++depth;
    } else if (s[i] == '}' && --depth == 0) {
      return i + 1;
    }
  }
  return std::string_view::npos;
}

// "\text{12}" -> "12" for the given wrapper commands (the braces' content is kept).
void unwrap_commands(std::string& s) {
  for (std::string_view command : {"\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\boxed"}) {
    for (size_t at = s.find(command); at != std::string::npos; at = s.find(command, at)) {
      size_t open = at + command.size();
      if (open >= s.size() || s[open] != '{') {  // a longer command such as \textit: not ours
        at = open;
        continue;
      }
      const size_t close = matching_brace(s, open);
      if (close == std::string::npos) break;
      s = s.substr(0, at) + s.substr(open + 1, close - open - 2) + s.substr(close);
    }
  }
}

// Removes the wrapping an answer tends to carry: math delimiters, \text{}, LaTeX spacing,
// a leading "x =", a trailing full stop, and thousands separators in groups of three.
std::string clean(std::string_view raw) {
  std::string s(trim(raw));
  replace_all(s, "\xe2\x88\x92", "-");  // U+2212 minus sign
  for (std::string_view drop : {"$", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,", "\\;", "\\ ", "\\left", "\\right"})
    replace_all(s, drop, "");
  replace_all(s, "{,}", ",");
  replace_all(s, "\\dfrac", "\\frac");
  replace_all(s, "\\tfrac", "\\frac");
  for (std::string_view degrees : {"^{\\circ}", "^\\circ"}) replace_all(s, degrees, "");
  unwrap_commands(s);
  // "{12}" -> "12": braces around the whole answer group nothing.
  while (s.size() >= 2 && s.front() == '{' && matching_brace(s, 0) == s.size()) s = std::string(trim(s.substr(1, s.size() - 2)));
  // "x = 5" or "n=5": the value is what follows the last '=' (but not in "<=" / ">=").
  if (size_t eq = s.rfind('='); eq != std::string::npos && eq + 1 < s.size() && (eq == 0 || (s[eq - 1] != '<' && s[eq - 1] != '>')))
    s = s.substr(eq + 1);
  std::string_view t = trim(s);
  while (!t.empty() && t.back() == '.') t = trim(t.substr(0, t.size() - 1));
  s = std::string(t);
  // "1,234,567" -> "1234567": only when every group after the first has exactly three digits.
  if (s.find(',') != std::string::npos) {
    const size_t start = !s.empty() && s[0] == '-' ? 1 : 0;
    size_t end = s.find('.');
    if (end == std::string::npos) end = s.size();
    bool grouped = start < end && is_digit(s[start]);
    size_t digits_in_group = 0, groups = 0;
    for (size_t i = start; i < end && grouped; ++i) {
      if (is_digit(s[i])) {
        ++digits_in_group;
      } else if (s[i] == ',') {
        grouped = (groups == 0 ? digits_in_group >= 1 && digits_in_group <= 3 : digits_in_group == 3);
        ++groups;
        digits_in_group = 0;
      } else {
        grouped = false;
      }
    }
    grouped = grouped && groups > 0 && digits_in_group == 3;
    for (size_t i = end; i < s.size() && grouped; ++i) grouped = is_digit(s[i]) || (i == end && s[i] == '.');
    if (grouped) s.erase(std::remove(s.begin(), s.end(), ','), s.end());
  }
  return s;
}

// An exact rational with a positive denominator, in lowest terms.
struct Rational {
  __int128 num = 0, den = 1;
};

constexpr int kMaxDigits = 30;  // 10^30 < 2^127 / 10: parsing cannot overflow

// "-12", "0204", "204.50", ".5": nullopt for anything else or for more than kMaxDigits digits.
std::optional<Rational> parse_decimal(std::string_view s) {
  bool negative = false;
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) {
    negative = s[0] == '-';
    s.remove_prefix(1);
  }
  Rational r;
  int digits = 0, fraction_digits = 0;
  bool dot = false;
  for (char c : s) {
    if (c == '.' && !dot) {
      dot = true;
    } else if (is_digit(c)) {
      if (++digits > kMaxDigits) return std::nullopt;
      r.num = r.num * 10 + (c - '0');
      if (dot) {
        r.den *= 10;
        ++fraction_digits;
      }
    } else {
      return std::nullopt;
    }
  }
  if (digits == 0) return std::nullopt;
  if (negative) r.num = -r.num;
  return r;
}

__int128 gcd128(__int128 a, __int128 b) {
  if (a < 0) a = -a;
  while (b != 0) {
    const __int128 t = a % b;
    a = b;
    b = t;
  }
  return a < 0 ? -a : a;
}

std::optional<Rational> divide(Rational a, Rational b) {
  if (b.num == 0) return std::nullopt;
  // (a.num / a.den) / (b.num / b.den); the factors are at most 10^30 each, so reduce first.
  const __int128 g1 = gcd128(a.num, b.num), g2 = gcd128(b.den, a.den);
  a.num /= g1;
  b.num /= g1;
  b.den /= g2;
  a.den /= g2;
  constexpr __int128 kLimit = __int128(1) << 62;
  auto small = [&](__int128 x) { return x > -kLimit && x < kLimit; };
  if (!small(a.num) || !small(b.den) || !small(a.den) || !small(b.num)) return std::nullopt;
  Rational r{a.num * b.den, a.den * b.num};
  if (r.den < 0) {
    r.num = -r.num;
    r.den = -r.den;
  }
  return r;
}

Rational reduce(Rational r) {
  const __int128 g = gcd128(r.num, r.den);
  if (g > 1) {
    r.num /= g;
    r.den /= g;
  }
  return r;
}

// A number written as a decimal, "a/b", "\frac{a}{b}" or "\frac ab" (single digits).
std::optional<Rational> parse_number(std::string_view s) {
  s = trim(s);
  bool negative = false;
  if (s.size() > 1 && s[0] == '-' && s.substr(1).starts_with("\\frac")) {
    negative = true;
    s.remove_prefix(1);
  }
  std::optional<Rational> r;
  if (s.starts_with("\\frac")) {
    std::string_view rest = trim(s.substr(5));
    std::string_view top, bottom;
    if (!rest.empty() && rest[0] == '{') {
      const size_t close = matching_brace(rest, 0);
      if (close == std::string_view::npos) return std::nullopt;
      top = rest.substr(1, close - 2);
      std::string_view after = trim(rest.substr(close));
      if (after.empty() || after[0] != '{' || matching_brace(after, 0) != after.size()) return std::nullopt;
      bottom = after.substr(1, after.size() - 2);
    } else if (rest.size() == 2 && is_digit(rest[0]) && is_digit(rest[1])) {
      top = rest.substr(0, 1);
      bottom = rest.substr(1, 1);
    } else {
      return std::nullopt;
    }
    const auto a = parse_decimal(trim(top)), b = parse_decimal(trim(bottom));
    if (!a || !b) return std::nullopt;
    r = divide(*a, *b);
  } else if (const size_t slash = s.find('/'); slash != std::string_view::npos) {
    const auto a = parse_decimal(trim(s.substr(0, slash))), b = parse_decimal(trim(s.substr(slash + 1)));
    if (!a || !b) return std::nullopt;
    r = divide(*a, *b);
  } else {
    r = parse_decimal(s);
  }
  if (!r) return std::nullopt;
  if (negative) r->num = -r->num;
  return reduce(*r);
}

bool starts_with_icase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[i])) != std::tolower(static_cast<unsigned char>(prefix[i])))
      return false;
  return true;
}

// The number right after position `at` (skipping spaces, '*', ':', '$', '\boxed{'), e.g.
// after "answer is" in "The answer is **$1,234$**.".
std::optional<std::string> number_after(std::string_view text, size_t at) {
  while (at < text.size() && (is_space(text[at]) || text[at] == '*' || text[at] == ':' || text[at] == '$' ||
                              text[at] == '{' || text[at] == '('))
    ++at;
  size_t end = at;
  if (end < text.size() && text[end] == '-') ++end;
  const size_t first_digit = end;
  // Digits with separators inside: commas, a decimal point, a fraction slash.
  while (end < text.size() &&
         (is_digit(text[end]) ||
          ((text[end] == ',' || text[end] == '.' || text[end] == '/') && end + 1 < text.size() && is_digit(text[end + 1]) &&
           end > first_digit)))
    ++end;
  if (end == first_digit) return std::nullopt;
  return clean(text.substr(at, end - at));
}

}  // namespace

std::optional<std::string> extract_answer(std::string_view text) {
  // With a finished thought the answer is what follows it; an unfinished thought (no
  // </think>) is kept, since it is all the model wrote.
  if (const size_t end_think = text.rfind("</think>"); end_think != std::string_view::npos)
    text = text.substr(end_think + 8);

  // The last non-empty \boxed{...} (or \fbox{...}); "\boxed{}" echoing the instruction is skipped.
  size_t best_at = std::string_view::npos;
  std::string best;
  for (std::string_view command : {"\\boxed", "\\fbox"}) {
    for (size_t at = text.find(command); at != std::string_view::npos; at = text.find(command, at + 1)) {
      size_t open = at + command.size();
      while (open < text.size() && text[open] == ' ') ++open;
      if (open >= text.size() || text[open] != '{') continue;
      const size_t close = matching_brace(text, open);
      if (close == std::string_view::npos) continue;
      std::string content = clean(text.substr(open + 1, close - open - 2));
      if (content.empty()) continue;
      if (best_at == std::string_view::npos || at > best_at) {
        best_at = at;
        best = std::move(content);
      }
    }
  }
  if (best_at != std::string_view::npos) return best;

  // Else the number after the last "answer is" / "answer:" that has one.
  std::optional<std::string> found;
  size_t found_at = 0;
  for (std::string_view phrase : {"answer is", "answer:"}) {
    for (size_t at = 0; at + phrase.size() <= text.size(); ++at) {
      if (!starts_with_icase(text.substr(at), phrase)) continue;
      if (auto number = number_after(text, at + phrase.size()); number && (!found || at >= found_at)) {
        found = std::move(number);
        found_at = at;
      }
    }
  }
  return found;
}

bool answers_equal(std::string_view given, std::string_view expected) {
  const std::string a = clean(given), b = clean(expected);
  if (a.empty() || b.empty()) return false;
  const auto x = parse_number(a), y = parse_number(b);
  if (x && y) return x->num == y->num && x->den == y->den;
  if (x || y) return false;
  // Text: equal up to whitespace.
  auto squeeze = [](const std::string& s) {
    std::string out;
    for (char c : s)
      if (!is_space(c)) out += c;
    return out;
  };
  return squeeze(a) == squeeze(b);
}

bool passkey_found(std::string_view text, std::string_view passkey) {
  if (passkey.empty()) return false;
  for (size_t at = text.find(passkey); at != std::string_view::npos; at = text.find(passkey, at + 1)) {
    const bool digit_before = at > 0 && is_digit(text[at - 1]);
    const size_t end = at + passkey.size();
    const bool digit_after = end < text.size() && is_digit(text[end]);
    if (!digit_before && !digit_after) return true;
  }
  return false;
}

Interval wilson_interval(int64_t successes, int64_t trials, double z) {
  MP_CHECK(trials >= 0, "wilson_interval: {} trials; must be >= 0", trials);
  MP_CHECK(successes >= 0 && successes <= trials, "wilson_interval: {} successes out of {} trials", successes, trials);
  MP_CHECK(std::isfinite(z) && z > 0, "wilson_interval: z = {}; must be positive and finite", z);
  if (trials == 0) return {0.0, 1.0};  // nothing observed: any rate is possible
  const double n = double(trials), p = double(successes) / n, z2 = z * z;
  const double denominator = 1 + z2 / n;
  const double centre = (p + z2 / (2 * n)) / denominator;
  const double half = z * std::sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator;
  Interval r{std::max(0.0, centre - half), std::min(1.0, centre + half)};
  if (successes == 0) r.low = 0;  // exact bounds, free of rounding
  if (successes == trials) r.high = 1;
  return r;
}

}  // namespace multipole::eval
