#pragma once
// The parts a tokenizer is made of, shared by the tokenizer.json and GGUF loaders.
#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "multipole/tokenizer/tokenizer.hpp"
#include "tokenizer/bpe.hpp"
#include "tokenizer/regex.hpp"

namespace multipole {

enum class NormForm : uint8_t { NFC, NFD, NFKC, NFKD };

// One pre-tokenizer step, applied to every piece the previous steps produced.
struct PreStep {
  enum Kind : uint8_t {
    SplitIsolated,  // matches and the text between them become pieces
    SplitRemoved,   // the text between matches becomes pieces, matches are dropped
    PrefixSpace,    // prepend ' ' unless the piece starts with one (ByteLevel add_prefix_space)
  } kind = SplitIsolated;
  std::shared_ptr<const Regex> regex;
};

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false;
  bool normalized = false;  // matched in the normalized text rather than the raw one
};

// Leftmost-longest search for added tokens (a byte trie).
class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin, end;  // the bytes the token consumes (with lstrip/rstrip whitespace)
    int32_t id;
  };
  // Takes the tokens whose `normalized` flag equals `normalized`.
  void build(const std::vector<AddedToken>& tokens, bool normalized);
  bool empty() const { return tokens_.empty(); }
  // The leftmost-longest match starting at or after `from` (special tokens only when
  // parse_special), or nullopt.
  std::optional<Match> find(std::string_view text, size_t from, bool parse_special) const;

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;  // sorted by byte
    int32_t token = -1;                                   // index into tokens_
  };
  int32_t child(int32_t node, unsigned char b) const;
  std::vector<Node> nodes_;
  std::vector<AddedToken> tokens_;
  std::array<bool, 256> first_{};
};

// What a loader gathers. Views must stay valid until build_tokenizer returns.
struct TokenizerParts {
  std::string source;    // file path, for messages
  std::string pre_name;  // "qwen2", "tokenizer.json", ...
  std::vector<NormForm> normalizers;
  std::vector<PreStep> pre_steps;
  std::vector<std::pair<std::string_view, int32_t>> vocab;  // byte-level spelling, id
  std::vector<std::pair<std::string_view, std::string_view>> merges;  // by rank
  bool ignore_merges = false;
  std::vector<AddedToken> added;
  std::optional<int32_t> bos, eos;
  std::vector<int32_t> prefix, suffix;  // put around the text when add_special
  std::string add_special_problem;      // non-empty: add_special cannot be honoured, says why
};

struct Tokenizer::Impl {
  std::string source;
  std::string pre_name;
  std::vector<NormForm> normalizers;
  std::vector<PreStep> pre_steps;
  std::unique_ptr<BpeModel> bpe;
  AddedTokenMatcher raw_matcher, normalized_matcher;
  std::unordered_map<std::string, int32_t> added_by_content;
  std::vector<std::string> pieces;  // bytes of each id
  std::vector<TokenKind> kinds;
  std::vector<bool> present;        // ids that name a token (gaps are possible)
  std::optional<int32_t> bos, eos;
  std::vector<int32_t> prefix, suffix;
  std::string add_special_problem;

  void check_id(int32_t id) const;
  std::optional<int32_t> find_token(std::string_view text) const;  // see Tokenizer::token_id
  // Normalize, pre-tokenize and merge one stretch of text without raw added tokens.
  void encode_fragment(std::string_view fragment, bool parse_special, std::vector<int32_t>& out) const;
  void encode_normalized(std::string_view text, std::vector<int32_t>& out) const;
};

std::shared_ptr<Tokenizer::Impl> build_tokenizer(TokenizerParts& parts);

// Pre-tokenizer regexes of the families we support, as in their tokenizer.json files.
namespace pre_regex {
inline constexpr std::string_view kGpt2 =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
}  // namespace pre_regex

// A shared compiled regex (the families reuse a handful of patterns).
std::shared_ptr<const Regex> compiled_regex(std::string_view pattern);

}  // namespace multipole
