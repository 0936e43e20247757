#include <array>

#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace {
constexpr std::array<std::string_view, 5> kNames = {"dense", "multipole", "squeezed", "quest", "oracle-topk"};
}

std::span<const std::string_view> attention_policy_names() { return kNames; }

std::unique_ptr<AttentionPolicy> make_attention_policy(std::string_view name, const AttentionConfig& config) {
  fail("attention policy '{}' is not available (known: dense, multipole, squeezed, quest, oracle-topk)", name);
}

}  // namespace multipole
