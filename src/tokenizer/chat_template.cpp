// Minimal chat rendering (see the header for what is and is not covered).
#include "multipole/tokenizer/chat_template.hpp"

#include "multipole/core/error.hpp"

namespace multipole {

namespace {

// Jinja string literals may spell a newline as "\n" (two characters) or as a real newline.
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && s[i + 1] == 'n') {
      out += '\n';
      ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

// The literal default system prompt of a ChatML template: the text written right after
// "<|im_start|>system\n" up to "<|im_end|>" when it is plain text (not message content).
std::string chatml_default_system(std::string_view jinja) {
  for (std::string_view head : {"<|im_start|>system\\n", "<|im_start|>system\n"}) {
    size_t at = 0;
    while ((at = jinja.find(head, at)) != std::string_view::npos) {
      at += head.size();
      size_t end = jinja.find("<|im_end|>", at);
      if (end == std::string_view::npos) break;
      std::string_view text = jinja.substr(at, end - at);
      if (!text.empty() && text.find_first_of("'\"{}+") == std::string_view::npos) return unescape(text);
    }
  }
  return {};
}

std::string trim(std::string_view s) {
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(ws) - b + 1));
}

}  // namespace

ChatTemplate ChatTemplate::detect(std::string_view jinja, std::string_view architecture) {
  ChatTemplate t;
  if (jinja.empty()) {
    if (architecture == "qwen3") {
      t.style_ = ChatStyle::Qwen3;
    } else if (architecture == "qwen2") {
      // Qwen2.5 files converted without their template; its default system prompt.
      t.default_system_ = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
    } else if (architecture == "llama") {
      t.style_ = ChatStyle::Llama3;
    } else {
      fail("chat: the checkpoint has no chat template and architecture '{}' has no default", architecture);
    }
    return t;
  }
  if (jinja.find("<|start_header_id|>") != std::string_view::npos) {
    t.style_ = ChatStyle::Llama3;
    t.llama31_header_ = jinja.find("Cutting Knowledge Date") != std::string_view::npos;
  } else if (jinja.find("<|im_start|>") != std::string_view::npos) {
    const bool thinking = jinja.find("enable_thinking") != std::string_view::npos;
    t.style_ = thinking ? ChatStyle::Qwen3 : ChatStyle::ChatML;
    if (!thinking) t.default_system_ = chatml_default_system(jinja);
  } else {
    const bool r1 = jinja.find("<\xEF\xBD\x9CUser\xEF\xBD\x9C>") != std::string_view::npos;  // <｜User｜>
    fail("chat: the checkpoint's chat template is not supported by the minimal renderer ({}; supported: ChatML, "
         "Qwen3, Llama 3)",
         r1 ? "DeepSeek-R1 style" : "unrecognised style");
  }
  return t;
}

std::string_view ChatTemplate::style_name() const {
  switch (style_) {
    case ChatStyle::ChatML: return "chatml";
    case ChatStyle::Qwen3: return "qwen3";
    case ChatStyle::Llama3: return "llama3";
  }
  return "?";
}

std::string_view ChatTemplate::end_of_turn() const { return style_ == ChatStyle::Llama3 ? "<|eot_id|>" : "<|im_end|>"; }

std::string ChatTemplate::render(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                 bool enable_thinking) const {
  for (const ChatMessage& m : messages)
    MP_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant",
             "chat: message role '{}' is not supported (system, user, assistant)", m.role);
  std::string out;
  if (style_ == ChatStyle::Llama3) {
    out += "<|begin_of_text|>";
    size_t first = 0;
    std::string system;
    if (!messages.empty() && messages[0].role == "system") {
      system = trim(messages[0].content);
      first = 1;
    }
    if (llama31_header_) {
      out += "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul "
             "2024\n\n" + system + "<|eot_id|>";
    } else if (first == 1) {
      out += "<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>";
    }
    for (size_t i = first; i < messages.size(); ++i)
      out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + trim(messages[i].content) +
             "<|eot_id|>";
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
    return out;
  }
  // ChatML and Qwen3.
  if (!default_system_.empty() && (messages.empty() || messages[0].role != "system"))
    out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
  for (const ChatMessage& m : messages) {
    std::string content = m.content;
    if (style_ == ChatStyle::Qwen3 && m.role == "assistant") {
      // Earlier turns are shown without their reasoning, as Qwen3's template does.
      if (size_t end = content.find("</think>"); end != std::string::npos) {
        content = content.substr(end + 8);
        content.erase(0, content.find_first_not_of('\n') == std::string::npos ? content.size()
                                                                             : content.find_first_not_of('\n'));
      }
    }
    out += "<|im_start|>" + m.role + "\n" + content + "<|im_end|>\n";
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (style_ == ChatStyle::Qwen3 && !enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

}  // namespace multipole
