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

// Length of the UTF-8 encoded Unicode whitespace character (Python's str.isspace(), which
// Jinja's trim filter uses) that starts at s[i] / ends right before s[end]; 0 if none.
size_t space_at(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return k < s.size() ? uint8_t(s[k]) : 0u; };
  const uint8_t c = b(i);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  if (c == 0xC2 && (b(i + 1) == 0x85 || b(i + 1) == 0xA0)) return 2;
  if (c == 0xE1 && b(i + 1) == 0x9A && b(i + 2) == 0x80) return 3;  // U+1680
  if (c == 0xE2 && b(i + 1) == 0x80) {
    const uint8_t d = b(i + 2);
    if ((d >= 0x80 && d <= 0x8A) || d == 0xA8 || d == 0xA9 || d == 0xAF) return 3;  // U+2000..200A, 2028, 2029, 202F
  }
  if (c == 0xE2 && b(i + 1) == 0x81 && b(i + 2) == 0x9F) return 3;  // U+205F
  if (c == 0xE3 && b(i + 1) == 0x80 && b(i + 2) == 0x80) return 3;  // U+3000
  return 0;
}
size_t space_before(std::string_view s, size_t end) {
  for (size_t len = 1; len <= 3 && len <= end; ++len)
    if (space_at(s, end - len) == len) return len;
  return 0;
}

// Jinja's `trim` (Python str.strip()).
std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    const size_t n = space_at(s, b);
    if (n == 0) break;
    b += n;
  }
  while (e > b) {
    const size_t n = space_before(s, e);
    if (n == 0) break;
    e -= n;
  }
  return std::string(s.substr(b, e - b));
}

// Python's lstrip('\n') / rstrip('\n').
std::string_view lstrip_nl(std::string_view s) {
  while (!s.empty() && s.front() == '\n') s.remove_prefix(1);
  return s;
}
std::string_view rstrip_nl(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}

// s.split(sep)[-1] and s.split(sep)[0] in Python.
std::string_view after_last(std::string_view s, std::string_view sep) {
  const size_t at = s.rfind(sep);
  return at == std::string_view::npos ? s : s.substr(at + sep.size());
}
std::string_view before_first(std::string_view s, std::string_view sep) { return s.substr(0, s.find(sep)); }

constexpr std::string_view kR1Bos = "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";  // <｜begin▁of▁sentence｜>
constexpr std::string_view kR1Eos = "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";      // <｜end▁of▁sentence｜>
constexpr std::string_view kR1User = "<\xEF\xBD\x9CUser\xEF\xBD\x9C>";                                          // <｜User｜>
constexpr std::string_view kR1Assistant = "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>";                              // <｜Assistant｜>

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
  } else if (jinja.find(kR1User) != std::string_view::npos && jinja.find(kR1Assistant) != std::string_view::npos) {
    t.style_ = ChatStyle::DeepSeekR1;
  } else {
    fail("chat: the checkpoint's chat template is not supported by the minimal renderer (unrecognised style; "
         "supported: ChatML, Qwen3, Llama 3, DeepSeek-R1-Distill)");
  }
  return t;
}

std::string_view ChatTemplate::style_name() const {
  switch (style_) {
    case ChatStyle::ChatML: return "chatml";
    case ChatStyle::Qwen3: return "qwen3";
    case ChatStyle::Llama3: return "llama3";
    case ChatStyle::DeepSeekR1: return "deepseek-r1";
  }
  return "?";
}

std::string_view ChatTemplate::end_of_turn() const {
  switch (style_) {
    case ChatStyle::Llama3: return "<|eot_id|>";
    case ChatStyle::DeepSeekR1: return kR1Eos;
    default: return "<|im_end|>";
  }
}

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
  if (style_ == ChatStyle::DeepSeekR1) {
    // The last system message goes right after BOS; system messages add nothing in place.
    std::string_view system;
    for (const ChatMessage& m : messages)
      if (m.role == "system") system = m.content;
    out += kR1Bos;
    out += system;
    for (const ChatMessage& m : messages) {
      if (m.role == "user") {
        out += kR1User;
        out += m.content;
      } else if (m.role == "assistant") {
        out += kR1Assistant;
        out += after_last(m.content, "</think>");
        out += kR1Eos;
      }
    }
    if (add_generation_prompt) {
      out += kR1Assistant;
      out += enable_thinking ? "<think>\n" : "<think>\n</think>";
    }
    return out;
  }
  if (style_ == ChatStyle::Qwen3) return render_qwen3(messages, add_generation_prompt, enable_thinking);
  // ChatML: the template's default system prompt before the first message when that one is
  // not a system message (no messages: nothing, as SmolLM2's template does).
  if (!default_system_.empty() && !messages.empty() && messages[0].role != "system")
    out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
  for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string ChatTemplate::render_qwen3(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                       bool enable_thinking) const {
  // The last user turn that is not a tool response wrapped in <tool_response> tags; assistant
  // turns after it keep their reasoning.
  const auto n = std::ptrdiff_t(messages.size());
  std::ptrdiff_t last_query = n - 1;
  for (std::ptrdiff_t i = n - 1; i >= 0; --i) {
    const std::string& c = messages[size_t(i)].content;
    if (messages[size_t(i)].role == "user" && !(c.starts_with("<tool_response>") && c.ends_with("</tool_response>"))) {
      last_query = i;
      break;
    }
  }
  std::string out;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const ChatMessage& m = messages[size_t(i)];
    if (m.role != "assistant") {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      continue;
    }
    std::string_view content = m.content, reasoning;
    if (m.content.find("</think>") != std::string::npos) {
      content = lstrip_nl(after_last(m.content, "</think>"));
      reasoning = lstrip_nl(after_last(rstrip_nl(before_first(m.content, "</think>")), "<think>"));
    }
    out += "<|im_start|>assistant\n";
    if (i > last_query && (i == n - 1 || !reasoning.empty())) {
      out += "<think>\n";
      out += lstrip_nl(rstrip_nl(reasoning));
      out += "\n</think>\n\n";
      out += lstrip_nl(content);
    } else {
      out += content;
    }
    out += "<|im_end|>\n";
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (!enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

}  // namespace multipole
