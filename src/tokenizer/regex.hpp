#pragma once
// Pre-tokenizer regexes, compiled with PCRE2 (UTF + UCP, JIT when available).
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace multipole {

class Regex {
 public:
  // Throws multipole::Error naming `what` and PCRE2's message and offset. With UCP, \s is
  // Unicode whitespace including U+0085, as in Hugging Face's (Oniguruma) regexes.
  Regex(std::string_view pattern, std::string_view what);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  const std::string& pattern() const { return pattern_; }

  // Appends to `out` the [begin, end) byte ranges of the non-empty, non-overlapping matches
  // in `text` (valid UTF-8), left to right, offsets relative to text.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  std::string pattern_;
  std::string what_;
  void* code_ = nullptr;  // pcre2_code_8
  bool jit_ = false;
};

}  // namespace multipole
