#pragma once
// MULTIPOLE_TEST_SCALE=small (the sanitizer suite) asks tests for smaller problem sizes.
#include <cstdlib>
#include <string_view>

namespace multipole::test {

inline bool small_scale() {
  const char* s = std::getenv("MULTIPOLE_TEST_SCALE");
  return s != nullptr && std::string_view(s) == "small";
}

}  // namespace multipole::test
