#include "tokenizer/byte_level.hpp"

#include "tokenizer/utf8.hpp"

namespace multipole::byte_level {

namespace {

struct Tables {
  std::array<std::string, 256> to_char;
  std::array<int, 324> to_byte;  // code point -> byte, -1 if none (the map's image is < 324)

  Tables() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + extra++);
      utf8::append(to_char[b], cp);
      to_byte[cp] = b;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::array<std::string, 256>& byte_to_char() { return tables().to_char; }

bool decode(std::string_view token, std::string& out) {
  const Tables& t = tables();
  out.clear();
  size_t pos = 0;
  while (pos < token.size()) {
    utf8::Scan sc = utf8::scan(token, pos);
    if (sc.kind != utf8::Scan::Char || sc.cp >= t.to_byte.size() || t.to_byte[sc.cp] < 0) return false;
    out += char(t.to_byte[sc.cp]);
    pos += sc.length;
  }
  return true;
}

}  // namespace multipole::byte_level
