#pragma once
// The message of the multipole::Error a call throws ("no error" when it throws none), for
// tests that check what an error names.
#include <string>

#include "multipole/core/error.hpp"

namespace multipole::test {

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

// JSON arrays nested `depth` levels deep: "[[...]]".
inline std::string nested_json(int depth) {
  return std::string(size_t(depth), '[') + std::string(size_t(depth), ']');
}

}  // namespace multipole::test
