// libFuzzer target: a tokenizer.json either loads (and then encodes and decodes text
// without fault) or throws multipole::Error. Any other exception, crash or sanitizer report
// is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "multipole/core/error.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace multipole;
  try {
    const Tokenizer tok = Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.json");
    const auto ids = tok.encode("abc <x> ab\n  12345 caf\xC3\xA9 \xF0\x9F\x98\x80 <|im_start|>");
    (void)tok.decode(ids);
    StreamDecoder stream(tok);
    for (int32_t id : ids) (void)stream.push(id);
    (void)stream.flush();
    for (size_t id = 0; id < tok.vocab_size() && id < 512; ++id) (void)tok.piece(int32_t(id));
  } catch (const Error&) {
  }
  return 0;
}
