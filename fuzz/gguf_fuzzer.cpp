// libFuzzer target: a GGUF file either opens (and then every metadata getter and tensor
// read stays in bounds) or throws multipole::Error; the same for a tokenizer read from its
// metadata. Any other exception, crash or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>

#include "fuzz_input.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#ifdef MULTIPOLE_HAVE_TOKENIZER
#include "multipole/tokenizer/tokenizer.hpp"
#endif

namespace {

// Calls `f`, swallowing only the documented error type.
template <class F>
void expect_error_or_value(F&& f) {
  try {
    f();
  } catch (const multipole::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace multipole;
  try {
    GGUFFile file(fuzz::as_file(data, size));
    for (const auto& [key, v] : file.metadata()) {
      const std::string_view k = key;
      expect_error_or_value([&] { (void)file.get_string(k); });
      expect_error_or_value([&] { (void)file.get_uint(k); });
      expect_error_or_value([&] { (void)file.get_int(k); });
      expect_error_or_value([&] { (void)file.get_float(k); });
      expect_error_or_value([&] { (void)file.get_bool(k); });
      expect_error_or_value([&] { (void)file.get_string_array(k); });
      expect_error_or_value([&] { (void)file.get_int_array(k); });
      expect_error_or_value([&] { (void)file.get_float_array(k); });
      expect_error_or_value([&] { (void)file.get_array_size(k); });
    }
    unsigned sum = 0;
    for (const GGUFTensor& t : file.tensors()) {
      (void)t.dims_string();
      if (file.find_tensor(t.name) == nullptr) __builtin_trap();
      // The data span must lie inside the mapping: touch its first and last byte.
      if (!t.data.empty()) sum += unsigned(t.data.front()) + unsigned(t.data.back());
    }
    (void)sum;
#ifdef MULTIPOLE_HAVE_TOKENIZER
    expect_error_or_value([&] {
      Tokenizer tok = Tokenizer::from_gguf(file);
      tok.decode(tok.encode("Hello, world! 123 <|im_start|> \xE4\xBD\xA0\xE5\xA5\xBD"));
    });
#endif
  } catch (const Error&) {
  }
  return 0;
}
