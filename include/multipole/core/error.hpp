#pragma once
// Errors: one exception type whose message names the file/field/value/limit at fault.
#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace multipole {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace multipole

// MP_CHECK(cond, "format", args...): throws multipole::Error with the formatted message.
#define MP_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) ::multipole::fail(__VA_ARGS__); \
  } while (0)
