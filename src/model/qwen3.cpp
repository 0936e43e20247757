// Qwen3 (dense): the Llama block without biases, with an RMSNorm over each head of q and k
// (weights [head_dim]) before RoPE; head_dim is explicit (128) and need not be
// hidden / heads. GGUF files keep the rotate-half layout.
#include "model/family.hpp"

namespace multipole::model {

namespace {
constexpr std::string_view kGguf[] = {"qwen3"};
constexpr std::string_view kHf[] = {"qwen3"};
}  // namespace

const FamilySpec& qwen3_family() {
  static const FamilySpec spec{ModelFamily::Qwen3, "qwen3", kGguf, kHf,
                               /*qkv_bias=*/false, /*qk_norm=*/true, /*gguf_permuted_qk=*/false,
                               /*hf_bias_key=*/"attention_bias", /*default_rope_theta=*/10000.0,
                               /*default_tied=*/true};
  return spec;
}

}  // namespace multipole::model
