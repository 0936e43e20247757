#pragma once
// Attention traces: the pre-RoPE queries, keys and values of one attention layer of one
// sequence of N tokens whose last T tokens were generated, with the model's RoPE. Stored as
// a safetensors file (docs/trace-format.md):
//   tensors:  q [T, Hq, d], k [N, Hkv, d], v [N, Hkv, d]    F32, F16 or BF16
//   metadata: rope_theta    (required) decimal number, e.g. "1000000"
//             rope_scaling  (optional) Hugging Face config JSON, e.g.
//                           {"rope_type": "llama3", "factor": 8.0, ...}
//             rotary_dim    (optional) channels rotated, default d
//             format        "multipole-trace/1" (written; checked when present)
// Key j sits at position j. Query t belongs to token N - T + t, sits at that position and
// attends to keys [0, N - T + t]; keys [0, N - T) are the prompt.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/attention/rope.hpp"
#include "multipole/core/dtype.hpp"
#include "multipole/io/safetensors.hpp"

namespace multipole {

struct Trace {
  int64_t tokens = 0;     // N
  int64_t generated = 0;  // T
  int num_q_heads = 0;    // Hq
  int num_kv_heads = 0;   // Hkv
  int head_dim = 0;       // d
  std::vector<float> q;   // [T, Hq, d] before RoPE
  std::vector<float> k;   // [N, Hkv, d] before RoPE
  std::vector<float> v;   // [N, Hkv, d]
  RopeConfig rope;        // rope.head_dim == head_dim
  StringMap metadata;     // every other metadata entry, kept as is

  int64_t prompt_tokens() const { return tokens - generated; }
  // Throws multipole::Error naming `what`, the field, value and limit: shapes (T in [1, N],
  // Hq a multiple of Hkv, d even), vector sizes, finite values, a valid RoPE.
  void validate(std::string_view what = "trace") const;
};

// Reads and validates a trace; values of any stored type come back as f32. Errors name the
// file and the tensor, index or metadata entry at fault.
Trace read_trace(const std::string& path);
// Validates, then writes atomically with q/k/v stored as `dtype`.
void write_trace(const std::string& path, const Trace& trace, DType dtype = DType::F32);

// Applies a Hugging Face rope_scaling object (JSON text) to `rope`: rope_type (or type)
// "default", "linear", "llama3" or "yarn" with their HF fields (factor, low_freq_factor,
// high_freq_factor, original_max_position_embeddings, beta_fast, beta_slow,
// attention_factor). Unknown types or fields are errors naming `what`.
void apply_rope_scaling(std::string_view json_text, RopeConfig& rope, std::string_view what);
// The inverse: the rope_scaling JSON of `rope`, or "" when it has no scaling.
std::string rope_scaling_json(const RopeConfig& rope);

}  // namespace multipole
