#pragma once
// The bound weights of a Model and the scratch of its forward pass (model.cpp loads,
// transformer.cpp runs).
#include <memory>
#include <vector>

#include "attention/decode_kernels.hpp"
#include "model/family.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/model/model.hpp"

namespace multipole {

struct LayerWeights {
  Weight wq, wk, wv, wo;        // [heads*head_dim, hidden], [kv*head_dim, hidden] x2, [hidden, heads*head_dim]
  Weight gate, up, down;        // [inter, hidden] x2, [hidden, inter]
  std::vector<float> attn_norm, ffn_norm;  // [hidden]
  std::vector<float> bq, bk, bv;           // [heads*head_dim], [kv*head_dim] x2; empty without bias
  std::vector<float> q_norm, k_norm;       // [head_dim]; empty without q/k norm
};

// Buffers of one forward, grown on demand and reused (decode does not allocate once warm).
struct ForwardScratch {
  std::vector<float> x, h, q, k, v, att, gate, up, out;  // [rows, width]
  std::vector<float> cos, sin;                          // [rows, rotary_dim/2]
  std::vector<int64_t> pos;                             // [rows]
  Q8Activations act;
  std::vector<kernels::OwnedState> states;              // per pool thread (prefill attention)
};

struct Model::Impl {
  std::unique_ptr<GGUFFile> gguf;
  std::unique_ptr<SafetensorsCheckpoint> safetensors;
  const model::FamilySpec* spec = nullptr;
  bool permuted_qk = false;  // GGUF Llama: Q/K rows in GGML's interleaved RoPE order
  Weight embed;              // [vocab, hidden]
  Weight output;             // [vocab, hidden] (the embedding when tied)
  std::vector<float> output_norm;
  std::vector<LayerWeights> layers;
  Rope rope;
  int prefill_chunk = 256;
  Model::PrefillProgress prefill_progress;
  ForwardObserver* observer = nullptr;
  ActivationPrecision activations = ActivationPrecision::Int8;
  ForwardScratch scratch;

  // Rows r of the batch are tokens[r] at position pos[r] of sequence row_seq[r]. Decode:
  // one row per sequence, attention through the policy; prefill: the rows are consecutive
  // positions of one sequence, attention dense and causal; update_policy: call
  // policy.update() per layer (decode always does).
  //   logits: [rows, vocab] for every row (all_rows) or [vocab] of the last row; may be null
  void forward(const ModelConfig& c, PagedKVCache& cache, std::span<const SeqId> row_seq, int64_t first_pos,
               std::span<const int32_t> tokens, bool decode, bool update_policy, AttentionPolicy& policy,
               ThreadPool& pool, float* logits, bool all_rows, ForwardStats& stats);
};

}  // namespace multipole
