// Qwen2, Qwen2.5 and DeepSeek-R1-Distill-Qwen: the Llama block with a bias on the q, k and
// v projections. GGUF files keep the rotate-half (NEOX) layout: no Q/K permutation.
#include "model/family.hpp"

namespace multipole::model {

namespace {
constexpr std::string_view kGguf[] = {"qwen2"};
constexpr std::string_view kHf[] = {"qwen2"};
}  // namespace

const FamilySpec& qwen2_family() {
  static const FamilySpec spec{ModelFamily::Qwen2, "qwen2", kGguf, kHf,
                               /*qkv_bias=*/true, /*qk_norm=*/false, /*gguf_permuted_qk=*/false,
                               /*hf_bias_key=*/"", /*default_rope_theta=*/10000.0,
                               /*default_tied=*/false};
  return spec;
}

}  // namespace multipole::model
