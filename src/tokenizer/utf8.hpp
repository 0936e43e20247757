#pragma once
// Strict UTF-8 scanning (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace multipole::utf8 {

// What starts at text[pos]: a whole character (`length` bytes), the valid beginning of one
// that the text cuts off (`incomplete`), or an invalid sequence whose maximal valid prefix
// has `length` bytes (at least 1; the Unicode "maximal subpart" rule for U+FFFD).
struct Scan {
  enum Kind { Char, Incomplete, Invalid } kind;
  size_t length;
  uint32_t cp;  // the code point when kind == Char
};

inline Scan scan(std::string_view text, size_t pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  const size_t left = text.size() - pos;
  const unsigned c = s[0];
  if (c < 0x80) return {Scan::Char, 1, c};
  size_t need;
  uint32_t cp;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3, cp = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4, cp = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return {Scan::Invalid, 1, 0};
  }
  for (size_t k = 1; k < need; ++k) {
    if (k >= left) return {Scan::Incomplete, k, 0};
    const unsigned b = s[k];
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {Scan::Invalid, k, 0};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {Scan::Char, need, cp};
}

// Byte offset of the first byte that is not part of a whole valid character, or npos.
inline size_t first_invalid(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    // ASCII runs dominate most text: skip 8 bytes at a time.
    while (pos + 8 <= text.size()) {
      uint64_t w;
      __builtin_memcpy(&w, text.data() + pos, 8);
      if (w & 0x8080808080808080ull) break;
      pos += 8;
    }
    if (pos >= text.size()) break;
    Scan sc = scan(text, pos);
    if (sc.kind != Scan::Char) return pos;
    pos += sc.length;
  }
  return std::string_view::npos;
}

inline bool is_ascii(std::string_view text) {
  for (char c : text)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

inline void append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace multipole::utf8
