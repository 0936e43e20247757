#pragma once
// Constructors of the concrete policies; make_attention_policy() picks one by name.
#include <memory>

#include "multipole/attention/policy.hpp"

namespace multipole {

std::unique_ptr<AttentionPolicy> make_dense_policy(const AttentionConfig& config);        // dense_policy.cpp
std::unique_ptr<AttentionPolicy> make_multipole_policy(const AttentionConfig& config);    // multipole_policy.cpp
std::unique_ptr<AttentionPolicy> make_quest_policy(const AttentionConfig& config);        // quest_policy.cpp
std::unique_ptr<AttentionPolicy> make_oracle_topk_policy(const AttentionConfig& config);  // oracle_topk_policy.cpp

}  // namespace multipole
