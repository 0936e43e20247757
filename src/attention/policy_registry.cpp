#include <array>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <fmt/ranges.h>

#include "attention/policies.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace {
constexpr std::array<std::string_view, 5> kNames = {"dense", "multipole", "squeezed", "quest", "oracle-topk"};

struct Devices {
  std::mutex mutex;
  std::vector<std::pair<std::string, AttentionPolicyFactory>> factories;
};
Devices& devices() {
  static Devices d;
  return d;
}
// The registered factory of `device`, or nullptr; the caller holds the mutex.
AttentionPolicyFactory* find_factory(Devices& d, std::string_view device) {
  for (auto& [name, f] : d.factories)
    if (name == device) return &f;
  return nullptr;
}
}  // namespace

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

void register_attention_device(std::string_view device, AttentionPolicyFactory factory) {
  MP_CHECK(device != "cpu" && !device.empty() && factory, "register_attention_device: invalid device '{}'", device);
  Devices& d = devices();
  std::lock_guard lock(d.mutex);
  if (AttentionPolicyFactory* f = find_factory(d, device))
    *f = factory;
  else
    d.factories.emplace_back(std::string(device), factory);
}

std::vector<std::string> attention_devices() {
  Devices& d = devices();
  std::lock_guard lock(d.mutex);
  std::vector<std::string> names = {"cpu"};
  for (const auto& [name, f] : d.factories) names.push_back(name);
  return names;
}

std::unique_ptr<AttentionPolicy> make_attention_policy(std::string_view name, const AttentionConfig& config,
                                                       std::string_view device) {
  if (device == "cpu") return make_attention_policy(name, config);
  AttentionPolicyFactory factory = nullptr;
  {
    Devices& d = devices();
    std::lock_guard lock(d.mutex);
    if (const AttentionPolicyFactory* f = find_factory(d, device)) factory = *f;
  }
  if (!factory)
    fail("attention device '{}' is not available in this build (available: {})", device,
         fmt::join(attention_devices(), ", "));
  return factory(name, config);
}

}  // namespace multipole
