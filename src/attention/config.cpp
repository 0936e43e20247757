#include "multipole/attention/config.hpp"

#include <algorithm>
#include <cmath>

#include "multipole/core/error.hpp"

namespace multipole {

float AttentionConfig::softmax_scale() const { return scale > 0 ? scale : 1.0f / std::sqrt(float(head_dim)); }

int64_t AttentionConfig::middle_end(int64_t length) const {
  const int64_t s = cluster.sinks, w = cluster.window;
  if (length - s < w) return std::min<int64_t>(s, length);
  return s + (length - s - w) / w * w;
}

int64_t AttentionConfig::clustered_end(int64_t length) const {
  return std::max<int64_t>(middle_end(length), cluster.sinks);
}

void AttentionConfig::validate() const {
  MP_CHECK(head_dim > 0 && head_dim % 16 == 0 && head_dim <= 512,
           "attention: head_dim {} must be a multiple of 16 in [16, 512]", head_dim);
  MP_CHECK(num_kv_heads > 0, "attention: num_kv_heads {} must be > 0", num_kv_heads);
  MP_CHECK(num_q_heads > 0 && num_q_heads % num_kv_heads == 0,
           "attention: num_q_heads {} must be a positive multiple of num_kv_heads {}", num_q_heads, num_kv_heads);
  MP_CHECK(group_size() <= 16, "attention: GQA group size {} exceeds the limit 16", group_size());
  MP_CHECK(std::isfinite(scale) && scale >= 0, "attention: scale {} must be finite and >= 0 (0: 1/sqrt(d))", scale);
  MP_CHECK(rope.head_dim == head_dim, "attention: rope head_dim {} differs from head_dim {}", rope.head_dim, head_dim);
  MP_CHECK(budget >= 0, "attention: budget {} must be >= 0", budget);
  MP_CHECK(coarse_budget >= 0, "attention: coarse_budget {} must be >= 0", coarse_budget);
  MP_CHECK(std::isfinite(coarse_radius_weight) && coarse_radius_weight >= 0.0f,
           "attention: coarse_radius_weight {} must be finite and >= 0", coarse_radius_weight);
  MP_CHECK(!(select_by_exact_mass && coarse_radius_weight > 0),
           "attention: select_by_exact_mass and coarse_radius_weight {} are two rankings of the same clusters; set "
           "one", coarse_radius_weight);
  MP_CHECK(!mass_at_score_position || (select_by_exact_mass && !score_real_positions),
           "attention: mass_at_score_position needs select_by_exact_mass and the fixed-position scoring");
  MP_CHECK(!score_with_spread || (!score_real_positions && !far_field_real_positions && !select_by_exact_mass &&
                                   coarse_radius_weight == 0),
           "attention: score_with_spread needs the fixed-position centroid scores in the selection and the far field "
           "(not score_real_positions, far_field_real_positions, select_by_exact_mass or coarse_radius_weight)");
  MP_CHECK(rerank_tokens == 0 || rerank_tokens > budget,
           "attention: rerank_tokens {} must be 0 (off) or above the budget {}", rerank_tokens, budget);
  MP_CHECK(rerank_tokens == 0 || (!select_by_exact_mass && !score_with_spread),
           "attention: rerank_tokens re-ranks the centroid selection; it does not combine with the "
           "select_by_exact_mass or score_with_spread experiments");
  MP_CHECK(std::isfinite(score_position) && score_position >= 0,
           "attention: score_position {} must be finite and >= 0", score_position);
  MP_CHECK(quest_page_size > 0, "attention: quest_page_size {} must be > 0", quest_page_size);
  const auto& c = cluster;
  MP_CHECK(c.sinks >= 0, "attention: sinks {} must be >= 0", c.sinks);
  MP_CHECK(c.window > 0, "attention: window {} must be > 0", c.window);
  MP_CHECK(c.block_size >= c.window, "attention: block_size {} must be >= window {}", c.block_size, c.window);
  MP_CHECK(!c.tokens_per_centroid.empty() && c.tokens_per_centroid.size() <= 4,
           "attention: {} cluster levels given, expected 1 to 4", c.tokens_per_centroid.size());
  for (size_t i = 0; i < c.tokens_per_centroid.size(); ++i) {
    int t = c.tokens_per_centroid[i];
    MP_CHECK(t >= 1 && t <= c.block_size, "attention: tokens_per_centroid[{}] = {} must be in [1, block_size={}]", i, t,
             c.block_size);
    MP_CHECK(i == 0 || t > c.tokens_per_centroid[i - 1],
             "attention: tokens_per_centroid[{}] = {} must exceed the finer level's {}", i, t,
             c.tokens_per_centroid[i - 1]);
  }
  MP_CHECK(c.prefill_iterations >= 1, "attention: prefill_iterations {} must be >= 1", c.prefill_iterations);
  MP_CHECK(c.update_iterations >= 0, "attention: update_iterations {} must be >= 0", c.update_iterations);
}

}  // namespace multipole
