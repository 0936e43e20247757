#include <array>

#include "attention/policies.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace {
constexpr std::array<std::string_view, 5> kNames = {"dense", "multipole", "squeezed", "quest", "oracle-topk"};
}

std::span<const std::string_view> attention_policy_names() { return kNames; }

// Each policy's line is enabled when its file lands.
std::unique_ptr<AttentionPolicy> make_attention_policy(std::string_view name, const AttentionConfig& config) {
  if (name == "dense") return make_dense_policy(config);
  if (name == "multipole") return make_multipole_policy(config);
  if (name == "squeezed") { auto c = config; c.multipole_far_field = false; return make_multipole_policy(c); }
  if (name == "quest") return make_quest_policy(config);
  if (name == "oracle-topk") return make_oracle_topk_policy(config);
  fail("unknown attention policy '{}' (known: dense, multipole, squeezed, quest, oracle-topk)", name);
}

}  // namespace multipole
