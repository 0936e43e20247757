// Llama 2/3 and SmolLM2: pre-norm RMSNorm, GQA, SwiGLU, RoPE (optionally llama3-scaled).
// llama.cpp's converter permutes Q/K rows for the interleaved GGML RoPE; a bias on q/k/v is
// optional (HF "attention_bias").
#include "model/family.hpp"

namespace multipole::model {

namespace {
constexpr std::string_view kGguf[] = {"llama"};
constexpr std::string_view kHf[] = {"llama"};
}  // namespace

const FamilySpec& llama_family() {
  static const FamilySpec spec{ModelFamily::Llama, "llama", kGguf, kHf,
                               /*qkv_bias=*/false, /*qk_norm=*/false, /*gguf_permuted_qk=*/true,
                               /*hf_bias_key=*/"attention_bias", /*default_rope_theta=*/10000.0,
                               /*default_tied=*/false};
  return spec;
}

}  // namespace multipole::model
