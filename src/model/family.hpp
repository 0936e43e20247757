#pragma once
// What distinguishes one architecture family from another, llama.cpp style: a small
// description per family (llama.cpp, qwen2.cpp, qwen3.cpp in this folder) on top of one
// shared transformer forward (transformer.cpp). Adding a family means adding a file here
// and a line to families().
#include <span>
#include <string_view>

#include "multipole/model/config.hpp"

namespace multipole::model {

struct FamilySpec {
  ModelFamily family;
  std::string_view name;                          // "llama"
  std::span<const std::string_view> gguf_archs;   // general.architecture values
  std::span<const std::string_view> hf_types;     // config.json model_type values
  bool qkv_bias;          // q/k/v projections always have a bias
  bool qk_norm;           // per-head RMSNorm of q and k before RoPE
  // llama.cpp's converter permutes the Q/K rows of this family so that GGML's interleaved
  // RoPE applies; our forward (rotate-half) undoes the permutation on q and k.
  bool gguf_permuted_qk;
  // HF config.json: the key that switches the q/k/v bias on (Llama's "attention_bias"),
  // or empty when the family fixes it.
  std::string_view hf_bias_key;
  double default_rope_theta;  // transformers' default when config.json omits rope_theta
  bool default_tied;          // transformers' default of tie_word_embeddings
};

const FamilySpec& llama_family();  // llama.cpp
const FamilySpec& qwen2_family();  // qwen2.cpp
const FamilySpec& qwen3_family();  // qwen3.cpp

std::span<const FamilySpec* const> families();
const FamilySpec& family_spec(ModelFamily f);
// nullptr when unknown.
const FamilySpec* find_family_gguf(std::string_view arch);
const FamilySpec* find_family_hf(std::string_view model_type);
// "llama, qwen2, qwen3" for messages.
std::string known_families(bool gguf);

}  // namespace multipole::model
