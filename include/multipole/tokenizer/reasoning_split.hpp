#pragma once
// Splits a reasoning model's streamed output into its thinking and its answer.
//
// The output is "<think>reasoning</think>answer" (Qwen3), or, when the prompt already opened
// the block (DeepSeek-R1-Distill's "<｜Assistant｜><think>\n"), "reasoning</think>answer".
// Only a <think> at the very start (after whitespace) opens the thinking; the first </think>
// closes it and everything after is answer, tags included. Newlines right inside the block
// and at the start of the answer are dropped, as the Qwen3 chat template does when it splits
// an assistant turn. Output without a think block is all answer (leading whitespace kept).
// Text is held back only while it could still be (the start of) a tag, so tags split across
// chunks are found; chunks must be whole UTF-8 characters (what StreamDecoder hands out).
#include <string>
#include <string_view>

namespace multipole {

struct ReasoningPieces {
  std::string thinking;
  std::string answer;
};

class ReasoningSplitter {
 public:
  // starts_in_thinking: the prompt opened the think block (see prompt_opens_thinking()).
  explicit ReasoningSplitter(bool starts_in_thinking = false);

  // Appends streamed text; returns the thinking and answer text that became final.
  ReasoningPieces push(std::string_view text);
  // Ends the stream: returns what was held back. An unclosed block is all thinking.
  ReasoningPieces flush();

  // Everything final so far.
  const std::string& thinking() const { return thinking_; }
  const std::string& answer() const { return answer_; }
  bool in_thinking() const { return state_ == State::Thinking || state_ == State::StartInThinking; }
  // Whether a think block was opened (by the prompt or the output) / was closed.
  bool saw_thinking() const { return saw_thinking_; }
  bool closed_thinking() const { return closed_; }

 private:
  enum class State { Start, StartInThinking, Thinking, Answer };
  void emit(ReasoningPieces& out, bool to_thinking, std::string_view text);
  State state_;
  std::string held_;
  bool strip_newlines_ = false;  // drop '\n' at the start of the current part
  bool saw_thinking_ = false;
  bool closed_ = false;
  std::string thinking_, answer_;
};

// Whether a rendered prompt ends inside an open think block (its last "<think>" has no
// "</think>" after it), so that generation starts in the reasoning.
bool prompt_opens_thinking(std::string_view prompt);

}  // namespace multipole
