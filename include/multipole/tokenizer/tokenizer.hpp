#pragma once
// Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/Qwen3, SmolLM2, DeepSeek-R1-Distill-Qwen)
// loaded from a Hugging Face tokenizer.json or from GGUF metadata (tokenizer.ggml.*).
//
// encode(text):
//   1. added tokens (special and not) are split out of the raw text first, leftmost-longest;
//   2. the text between them is normalized (NFC etc., when tokenizer.json asks for it);
//   3. the family's pre-tokenizer regexes (PCRE2) cut it into pre-tokens;
//   4. each pre-token's bytes go through ranked BPE merges.
// decode(ids) gives back the bytes; StreamDecoder hands out text one token at a time without
// ever splitting a UTF-8 character.
//
// Only available when the library was built with PCRE2 and utf8proc
// (MULTIPOLE_HAVE_TOKENIZER).
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace multipole {

class GGUFFile;

struct EncodeOptions {
  // Add the tokens the tokenizer puts around every text (BOS for Llama 3, none for Qwen):
  // tokenizer.json's post_processor, or GGUF's add_bos_token/add_eos_token.
  bool add_special = false;
  // Split special tokens (<|im_start|>, <|endoftext|>, ...) out of the text. When false they
  // are tokenized as ordinary text; non-special added tokens (<think>) are always split out.
  bool parse_special = true;
};

struct DecodeOptions {
  bool skip_special = false;  // leave special tokens out of the text
};

enum class TokenKind : uint8_t {
  Normal,   // a vocabulary token produced by the BPE merges
  Special,  // a special added token (tokenizer.json "special": true; GGUF control/unknown)
  Added,    // a non-special added token (GGUF user-defined), e.g. Qwen3's <think>
};

class Tokenizer {
 public:
  // A tokenizer.json, a GGUF file, or a folder holding tokenizer.json (and optionally
  // tokenizer_config.json, for the BOS/EOS tokens). Throws multipole::Error naming the file
  // and the field at fault.
  static Tokenizer load(const std::string& path);
  static Tokenizer from_json_file(const std::string& path);
  // `source` names the text in messages.
  static Tokenizer from_json(std::string_view json_text, std::string_view source = "<tokenizer.json>");
  static Tokenizer from_gguf(const GGUFFile& file);

  // Throws if `text` is not valid UTF-8 (naming the byte offset).
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& options = {}) const;
  // The bytes of the tokens, concatenated: may end inside a UTF-8 character, or be invalid
  // UTF-8 for an arbitrary id sequence. Throws on ids outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids, const DecodeOptions& options = {}) const;

  size_t vocab_size() const;
  // The bytes one token stands for (an added token's content as written).
  std::string_view piece(int32_t id) const;
  TokenKind kind(int32_t id) const;
  bool is_special(int32_t id) const { return kind(id) == TokenKind::Special; }
  // The id of an added token with exactly this content, else of the vocabulary token with
  // exactly these bytes.
  std::optional<int32_t> token_id(std::string_view text) const;

  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // Where it came from and which pre-tokenizer it uses (e.g. "qwen2", "tokenizer.json").
  const std::string& source() const;
  const std::string& pre_tokenizer() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  friend class StreamDecoder;
  std::shared_ptr<const Impl> impl_;
};

// Incremental decoding for generation: push() returns the text completed by each new token
// (possibly empty), always whole UTF-8 characters; bytes that can never form a character are
// replaced by U+FFFD (one per maximal invalid sequence). flush() ends the stream.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, DecodeOptions options = {});
  std::string push(int32_t id);
  std::string flush();  // the held bytes of an unfinished character, as U+FFFD

 private:
  std::shared_ptr<const Tokenizer::Impl> impl_;
  DecodeOptions options_;
  std::string pending_;
};

}  // namespace multipole
