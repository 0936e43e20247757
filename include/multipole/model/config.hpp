#pragma once
// What a decoder-only transformer checkpoint is: family, dimensions, RoPE, special tokens.
// Read from GGUF metadata (<arch>.* keys) or from a Hugging Face config.json; everything a
// forward pass needs, validated once so that the forward never meets a surprise.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/attention/rope.hpp"

namespace multipole {

class GGUFFile;

// The architecture families we run. Each has its own small description in src/model/.
enum class ModelFamily : uint8_t {
  Llama,  // Llama 2/3, SmolLM2: RMSNorm, GQA, SwiGLU, optional attention bias
  Qwen2,  // Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen: as Llama with q/k/v bias
  Qwen3,  // Qwen3: as Llama with per-head RMSNorm of q and k before RoPE, no bias
};
std::string_view model_family_name(ModelFamily f);  // "llama", "qwen2", "qwen3"

struct ModelConfig {
  ModelFamily family = ModelFamily::Llama;
  std::string architecture;  // as the file names it: GGUF general.architecture or HF model_type
  std::string name;          // human-readable (general.name, or the folder), may be empty
  int hidden_size = 0;       // d_model
  int intermediate_size = 0; // SwiGLU inner width
  int num_layers = 0;
  int num_heads = 0;         // query heads
  int num_kv_heads = 0;      // key/value heads (GQA), divides num_heads
  int head_dim = 0;          // per head; q is num_heads * head_dim wide (may differ from hidden)
  int vocab_size = 0;
  float rms_eps = 1e-6f;
  RopeConfig rope;           // rope.head_dim == head_dim
  bool tied_embeddings = false;  // the output projection is the token embedding
  bool qkv_bias = false;         // q/k/v projections have a bias
  bool qk_norm = false;          // per-head RMSNorm of q and k (weights [head_dim]) before RoPE
  int64_t context_length = 0;    // positions the model was trained for
  std::optional<int32_t> bos_id;
  std::vector<int32_t> eos_ids;  // any of these ends generation (EOS, end-of-turn)

  // Throws multipole::Error naming `source`, the first invalid field, its value and limit.
  void validate(std::string_view source) const;
};

// From GGUF metadata. Architectures: llama, qwen2, qwen3. Throws naming the file and key.
ModelConfig model_config_from_gguf(const GGUFFile& file);
// From the text of a Hugging Face config.json (model_type llama, qwen2, qwen3); `source`
// names it in messages. Fields the JSON omits take the transformers defaults of the family.
ModelConfig model_config_from_hf_json(std::string_view json_text, std::string_view source);

}  // namespace multipole
