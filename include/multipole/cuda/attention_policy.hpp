#pragma once
// The GPU decoders behind the CPU's AttentionPolicy interface, so that the engine,
// `generate`, `chat` and `eval` can decode with them (`--device cuda`). The model still
// runs on the CPU and writes the host PagedKVCache; the policy mirrors that cache on the
// device (the prompt's pages at a sequence's first update(), then the pages of new tokens),
// builds the cluster index with the GPU k-means (prefill build, then the online update
// every W tokens, as the CPU policy does) and decodes one layer per call: q up, one decoder
// step, out down, and a wait. It is the path that checks the CUDA kernels on real models,
// not the fast path: every call copies and synchronises. last_stats() counts exact,
// selected and far-field tokens and the K/V bytes of the exact part; centroid scoring is not
// counted (centroids_scored stays 0).
//
// The cluster index and the quest page bounds describe one batch of sequences: when
// update() is called with another list of sequences than before, they are rebuilt from the
// device cache for the new list (prefill clustering of everything cached; a sequence's
// online-update history is not kept across such a change).
#include <memory>
#include <string_view>

#include "multipole/attention/policy.hpp"

namespace multipole::cuda {

// "dense", "multipole", "squeezed", "quest", "oracle-topk" on the GPU. Throws when no CUDA
// device is usable, for an unknown name, for head dims other than 64 and 128, for dense,
// multipole and squeezed with score_real_positions, coarse_radius_weight or select_by_exact_mass (CudaDecoder refuses
// them) and, at the first update(), for a KV cache
// stored in f32 (the kernels read bf16 or f16).
std::unique_ptr<AttentionPolicy> make_cuda_attention_policy(std::string_view name, const AttentionConfig& config);

// Registers make_cuda_attention_policy as attention device "cuda".
void register_cuda_attention();

}  // namespace multipole::cuda
