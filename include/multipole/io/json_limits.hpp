#pragma once
// Untrusted JSON (safetensors headers and indexes, tokenizer.json, config.json, trace
// metadata) is checked for nesting depth before nlohmann::json sees it: its parser copes,
// but dump() (used in error messages) recurses once per level and overflows the stack on a
// document nested a few hundred thousand deep, which a fuzzer finds at once.
#include <string_view>

namespace multipole {

// Deeper than any real file of these formats (a tokenizer.json nests about 6 levels).
inline constexpr int kMaxJsonDepth = 128;

// Throws multipole::Error naming `what` when arrays/objects nest deeper than max_depth
// (brackets inside strings do not count). Says nothing about other syntax errors: the parser
// reports those.
void check_json_depth(std::string_view text, std::string_view what, int max_depth = kMaxJsonDepth);

}  // namespace multipole
