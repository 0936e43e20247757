#pragma once
// A loaded checkpoint and its CPU forward pass.
//
// Weights stay in the memory-mapped file in their stored type (GGUF quantised blocks, f16,
// bf16 or f32); matrix products run straight on them (core/quant.hpp), so the model is never
// dequantised or copied whole. Only small vectors (norm weights, biases) are converted to f32
// at load.
//
// Forward, per layer: x += Wo attn(rope(q), rope(k), v) of RMSNorm(x); x += SwiGLU of
// RMSNorm(x). Keys (after RoPE) and values go to a PagedKVCache in the Hugging Face
// rotate-half layout whatever the file's layout (GGUF Llama files store Q/K rows permuted for
// GGML's interleaved RoPE; the forward undoes that on q and k). Prefill is batched (GEMM over
// the prompt's tokens in chunks) with dense causal attention; decode runs one token per
// sequence and its attention through the AttentionPolicy chosen at run time.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "multipole/attention/policy.hpp"
#include "multipole/core/quant.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/kv/paged_kv_cache.hpp"
#include "multipole/model/config.hpp"

namespace multipole {

// A weight tensor inside the mapped file. Matrices are W [rows, cols] stored row by row
// (GGUF dims [cols, rows]; safetensors shape [rows, cols]); vectors have rows == 1.
struct Weight {
  std::string name;  // as stored in the file
  QuantType type = QuantType::F32;
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;

  QuantMatrix matrix() const { return {type, data, rows, cols}; }
  int64_t bytes() const;
};

// One tensor of a checkpoint as `inspect` lists it (any stored type, also ones we cannot run).
struct TensorInfo {
  std::string name;
  std::string dtype;           // "Q4_K", "BF16", ...
  std::vector<int64_t> shape;  // outermost first (row-major order, as PyTorch prints it)
  int64_t bytes = 0;
};

// The q, k, v of one layer for the rows of one forward, before RoPE: after the projections,
// the q/k/v bias (Qwen2) and the per-head q/k RMSNorm (Qwen3), in the Hugging Face
// rotate-half channel order (GGUF Llama rows already un-permuted).
struct QKVRows {
  int layer = 0;
  bool decode = false;              // a decode step (one row per sequence) or a prefill chunk
  std::span<const SeqId> seqs;      // decode: [rows], row r's sequence; prefill: [1], every row's
  std::span<const int64_t> positions;  // [rows] cache position of each row
  const float* q = nullptr;         // [rows, num_heads, head_dim]
  const float* k = nullptr;         // [rows, num_kv_heads, head_dim]
  const float* v = nullptr;         // [rows, num_kv_heads, head_dim]

  int64_t rows() const { return int64_t(positions.size()); }
  SeqId seq(int64_t row) const { return seqs.size() == 1 ? seqs[0] : seqs[size_t(row)]; }
};

// Sees every layer's pre-RoPE q, k, v during forwards (e.g. to dump attention traces). Called
// on the forward's thread; the pointers are valid only during the call.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual void on_qkv(const QKVRows& rows) = 0;
};

struct ModelLoadOptions {
  // Reading the config alone is enough for `inspect`: weights are then not bound.
  bool bind_weights = true;
};

// Time spent in a model's forward passes since the last reset.
struct ForwardStats {
  double prefill_seconds = 0, decode_seconds = 0;
  double attention_seconds = 0;  // prefill attention, policy update and policy decode
  int64_t prefill_tokens = 0, decode_tokens = 0;
  DecodeStats policy;            // summed over decode steps and layers
};

class Model {
 public:
  // path: a .gguf file, a folder with config.json + *.safetensors (single or sharded), or
  // a .safetensors file / *.index.json whose folder holds config.json. Throws naming the
  // file, tensor or field at fault (missing, wrong shape, unsupported dtype).
  static std::unique_ptr<Model> load(const std::string& path, const ModelLoadOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const std::string& path() const { return path_; }
  std::string_view format() const { return format_; }  // "gguf" or "safetensors"
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The GGUF file when the model came from one (for its tokenizer), else nullptr.
  const GGUFFile* gguf() const;
  // Bytes of the weights the forward reads (what a decode step streams).
  int64_t weight_bytes() const;

  // The attention config of this model (heads, head_dim, RoPE); callers then set the
  // policy's knobs (budget, window, ...).
  AttentionConfig attention_config() const;
  // A cache shaped for this model: num_layers, num_kv_heads, head_dim from the config.
  KVCacheConfig kv_cache_config(int64_t max_tokens, DType dtype = DType::F16, int page_size = 16) const;

  // Runs `tokens` through the model as the next positions of `seq`: extends the cache by
  // tokens.size() positions, writes their K/V in every layer. Attention is dense and causal
  // over everything cached for `seq`. policy.update() runs per layer once, in the forward
  // of the last chunk, so a fresh sequence's index is built over the whole prompt
  // (multipole's blocked prefill clustering), not over the first chunk and then grown by
  // online updates chunk by chunk.
  //   logits: [vocab] of the last token, or nullptr
  //   all_logits: [tokens.size(), vocab] of every token, or nullptr (tests, scoring)
  // One forward at a time per Model (it keeps scratch buffers).
  void prefill(PagedKVCache& cache, SeqId seq, std::span<const int32_t> tokens, AttentionPolicy& policy,
               ThreadPool& pool, float* logits, float* all_logits = nullptr);

  // One token per sequence: tokens[b] is appended to seqs[b] and attends through `policy`.
  //   logits: [seqs.size(), vocab]
  void decode(PagedKVCache& cache, std::span<const SeqId> seqs, std::span<const int32_t> tokens,
              AttentionPolicy& policy, ThreadPool& pool, float* logits);

  const ForwardStats& stats() const { return stats_; }
  void reset_stats() { stats_ = ForwardStats{}; }

  // Tokens per prefill chunk (bounds the scratch memory of long prompts).
  void set_prefill_chunk(int tokens);
  // Called after each prefill chunk with the tokens done and the prefill's total (a long
  // prompt's progress; empty: none). Not owned by a prefill: clear it when its captures die.
  using PrefillProgress = std::function<void(int64_t done, int64_t total)>;
  void set_prefill_progress(PrefillProgress progress);

  // Observer of the pre-RoPE q, k, v (not owned; nullptr: none, the forward pays nothing).
  void set_observer(ForwardObserver* observer);
  // Activations of the products with quantised weights: int8 (default, fast) or f32
  // (no activation rounding; evaluation uses it so that tiny attention differences are not
  // amplified into rounding flips). See core/quant.hpp.
  void set_activation_precision(ActivationPrecision precision);

  struct Impl;

 private:
  Model();
  ModelConfig config_;
  std::string path_;
  std::string format_;
  std::vector<TensorInfo> tensors_;
  ForwardStats stats_;
  std::unique_ptr<Impl> impl_;
};

// True when `path` names something Model::load would try as a GGUF file (by content).
bool is_gguf_file(const std::string& path);

}  // namespace multipole
