#pragma once
// Integers read from untrusted JSON (config.json, tokenizer.json, results files). nlohmann's
// get<int>() on a float too large for an int is undefined behaviour, and get<int32_t>() on
// 2^32 + 3 silently gives 3, so readers take the value as int64 here and range-check it.
#include <cstdint>
#include <optional>

#include <nlohmann/json.hpp>

namespace multipole {

// `v` as int64 when it is a JSON integer that fits; nullopt for anything else (floats,
// strings, unsigned values above INT64_MAX).
inline std::optional<int64_t> json_int64(const nlohmann::json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    return u <= uint64_t(INT64_MAX) ? std::optional<int64_t>(int64_t(u)) : std::nullopt;
  }
  return v.is_number_integer() ? std::optional<int64_t>(v.get<int64_t>()) : std::nullopt;
}

}  // namespace multipole
