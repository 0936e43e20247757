#pragma once
// The attention config the policy tests start from: G query heads per KV head, head dim d.
#include "multipole/attention/config.hpp"

namespace multipole::test {

inline AttentionConfig attention_config(int G, int d, int kv_heads = 2) {
  AttentionConfig c;
  c.num_kv_heads = kv_heads;
  c.num_q_heads = G * kv_heads;
  c.head_dim = d;
  c.rope.head_dim = d;
  return c;
}

}  // namespace multipole::test
