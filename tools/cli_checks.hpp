#pragma once
// Option validators with plain messages ("--budget: -1 must be >= 0"); CLI11's own range
// checks print DBL_MAX as the upper bound. NaN fails every bound.
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace multipole::cli {

template <class T>
CLI::Validator at_least(T min) {
  return CLI::Validator(
      [min](std::string& text) -> std::string {
        T value{};
        if (!CLI::detail::lexical_cast(text, value)) return fmt::format("'{}' is not a number", text);
        if (!(value >= min)) return fmt::format("{} must be >= {}", text, min);
        return {};
      },
      fmt::format(">={}", min));
}

template <class T>
CLI::Validator in_range(T min, T max) {
  return CLI::Validator(
      [min, max](std::string& text) -> std::string {
        T value{};
        if (!CLI::detail::lexical_cast(text, value)) return fmt::format("'{}' is not a number", text);
        if (!(value >= min && value <= max)) return fmt::format("{} must be in [{}, {}]", text, min, max);
        return {};
      },
      fmt::format("in [{}, {}]", min, max));
}

}  // namespace multipole::cli
