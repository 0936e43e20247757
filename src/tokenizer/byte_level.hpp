#pragma once
// GPT-2's byte-to-unicode map: byte-level BPE vocabularies spell every byte as one printable
// character (printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100..).
#include <array>
#include <string>
#include <string_view>

namespace multipole::byte_level {

// UTF-8 of the character that stands for each byte.
const std::array<std::string, 256>& byte_to_char();

// Turns a vocabulary token's characters back into the bytes they stand for. Returns false
// (leaving `out` unspecified) when a character is not in the map; callers then use the
// text itself, as Hugging Face's ByteLevel decoder does.
bool decode(std::string_view token, std::string& out);

}  // namespace multipole::byte_level
