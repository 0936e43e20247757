#pragma once
// Minimal chat prompt rendering for the families we run, chosen from the checkpoint's own
// Jinja template string (or, when a file has none, from its architecture). This is NOT a
// Jinja interpreter: it recognises the template's style and renders plain conversations
// (system/user/assistant text, no tools) the way that template does:
//   ChatML  (SmolLM2, Qwen2.5): <|im_start|>role\ncontent<|im_end|>\n ..., plus the template's
//           default system prompt when the conversation has none;
//   Qwen3   ChatML without a default system prompt; assistant turns before the last user
//           turn lose their <think>...</think> block, later ones get it rewritten as
//           "<think>\nreasoning\n</think>\n\n"; enable_thinking=false appends an empty think
//           block to the generation prompt;
//   Llama 3 <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
//           (content trimmed of Unicode whitespace, as Jinja's trim does), with 3.1's
//           "Cutting Knowledge Date" system header when the template has it;
//   DeepSeek-R1-Distill  <｜begin▁of▁sentence｜>{last system text}<｜User｜>...<｜Assistant｜>
//           answer<｜end▁of▁sentence｜> (assistant turns lose everything up to </think>); the
//           generation prompt "<｜Assistant｜><think>\n" opens the reasoning, and
//           enable_thinking=false closes it at once ("</think>").
// Other templates are refused with a message naming them.
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace multipole {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

enum class ChatStyle { ChatML, Qwen3, Llama3, DeepSeekR1 };

class ChatTemplate {
 public:
  // jinja: the checkpoint's template (GGUF tokenizer.chat_template, tokenizer_config.json's
  // chat_template), may be empty; architecture: "llama", "qwen2", "qwen3" for files without one.
  static ChatTemplate detect(std::string_view jinja, std::string_view architecture);

  ChatStyle style() const { return style_; }
  std::string_view style_name() const;
  const std::string& default_system() const { return default_system_; }

  // The prompt text (special tokens written as text: encode it with special tokens parsed).
  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt = true,
                     bool enable_thinking = true) const;
  // The end-of-turn marker of the style ("<|im_end|>", "<|eot_id|>", "<｜end▁of▁sentence｜>").
  std::string_view end_of_turn() const;

 private:
  std::string render_qwen3(std::span<const ChatMessage> messages, bool add_generation_prompt,
                           bool enable_thinking) const;
  ChatStyle style_ = ChatStyle::ChatML;
  std::string default_system_;
  bool llama31_header_ = false;
};

}  // namespace multipole
