// Streaming thinking/answer split (see the header for the rules).
#include "multipole/tokenizer/reasoning_split.hpp"

#include <algorithm>

namespace multipole {

namespace {

constexpr std::string_view kOpen = "<think>";
constexpr std::string_view kClose = "</think>";

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// The longest proper suffix of `s` that is a prefix of `tag`: text that may become the tag.
size_t partial_tag(std::string_view s, std::string_view tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n)
    if (tag.starts_with(s.substr(s.size() - n))) return n;
  return 0;
}

std::string_view rstrip_newlines(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}

// Drops leading '\n' from `s`; false when nothing else is left yet.
bool lstrip_newlines(std::string& s) {
  const size_t n = s.find_first_not_of('\n');
  s.erase(0, n == std::string::npos ? s.size() : n);
  return !s.empty();
}

}  // namespace

ReasoningSplitter::ReasoningSplitter(bool starts_in_thinking)
    : state_(starts_in_thinking ? State::StartInThinking : State::Start),
      strip_newlines_(starts_in_thinking),
      saw_thinking_(starts_in_thinking) {}

void ReasoningSplitter::emit(ReasoningPieces& out, bool to_thinking, std::string_view text) {
  if (text.empty()) return;
  (to_thinking ? out.thinking : out.answer).append(text);
  (to_thinking ? thinking_ : answer_).append(text);
}

ReasoningPieces ReasoningSplitter::push(std::string_view text) {
  ReasoningPieces out;
  held_.append(text);
  while (true) {
    switch (state_) {
      case State::Start:
      case State::StartInThinking: {
        // An opening tag counts only at the start, after whitespace.
        size_t i = 0;
        while (i < held_.size() && is_space(held_[i])) ++i;
        const std::string_view rest = std::string_view(held_).substr(i);
        if (rest.size() < kOpen.size() && kOpen.starts_with(rest)) return out;  // may still become <think>
        if (rest.starts_with(kOpen)) {
          held_.erase(0, i + kOpen.size());
          state_ = State::Thinking;
          saw_thinking_ = true;
          strip_newlines_ = true;
        } else {
          state_ = state_ == State::StartInThinking ? State::Thinking : State::Answer;
        }
        break;
      }
      case State::Thinking: {
        if (strip_newlines_) {
          if (!lstrip_newlines(held_)) return out;
          strip_newlines_ = false;
        }
        if (const size_t at = held_.find(kClose); at != std::string::npos) {
          emit(out, true, rstrip_newlines(std::string_view(held_).substr(0, at)));
          held_.erase(0, at + kClose.size());
          state_ = State::Answer;
          closed_ = true;
          strip_newlines_ = true;
          break;
        }
        // Hold back what may start </think>, and the newlines before it (dropped if it is).
        size_t ready = held_.size() - partial_tag(held_, kClose);
        while (ready > 0 && held_[ready - 1] == '\n') --ready;
        emit(out, true, std::string_view(held_).substr(0, ready));
        held_.erase(0, ready);
        return out;
      }
      case State::Answer: {
        if (strip_newlines_) {
          if (!lstrip_newlines(held_)) return out;
          strip_newlines_ = false;
        }
        emit(out, false, held_);
        held_.clear();
        return out;
      }
    }
  }
}

ReasoningPieces ReasoningSplitter::flush() {
  ReasoningPieces out;
  if (strip_newlines_) lstrip_newlines(held_);
  switch (state_) {
    case State::Start: emit(out, false, held_); break;  // whitespace or an unfinished "<think"
    case State::StartInThinking:
    case State::Thinking: emit(out, true, rstrip_newlines(held_)); break;
    case State::Answer: emit(out, false, held_); break;
  }
  held_.clear();
  return out;
}

bool prompt_opens_thinking(std::string_view prompt) {
  const size_t open = prompt.rfind(kOpen);
  if (open == std::string_view::npos) return false;
  const size_t close = prompt.rfind(kClose);
  return close == std::string_view::npos || close < open;
}

}  // namespace multipole
