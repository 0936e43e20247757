// libFuzzer target: a safetensors file either opens (and then every tensor reads in bounds)
// or throws multipole::Error. Any other exception, crash or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_input.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace multipole;
  try {
    SafetensorsFile file(fuzz::as_file(data, size));
    for (const auto& [key, value] : file.metadata()) (void)file.metadata(key);
    std::vector<float> buf;
    for (const SafetensorsTensor& t : file.tensors()) {
      (void)t.shape_string();
      if (file.find(t.name) != &t) __builtin_trap();  // lookup must find the listed tensor
      if (!to_core_dtype(t.dtype) || t.numel() > (1 << 16)) continue;
      buf.resize(size_t(t.numel()));
      t.to_f32(buf.data());  // touches every byte of the tensor's data
      try {
        (void)t.view();
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  return 0;
}
