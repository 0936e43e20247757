#pragma once
// Attention policies behind one interface: dense, multipole, squeezed, quest, oracle-topk.
// A policy owns whatever per-(sequence, layer, KV head) state it needs (cluster index, page
// bounds); the KV cache owns keys and values. Prefill attention is always dense causal
// attention and is not part of this interface; policies differ in decode.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole {

// What the last decode() call did, summed over the batch and all KV heads.
struct DecodeStats {
  int64_t exact_tokens = 0;      // keys attended exactly (sinks + window + selected)
  int64_t selected_tokens = 0;   // of which chosen by the policy (clusters, pages, top-k)
  int64_t centroids_scored = 0;  // cluster/page summaries scored
  int64_t pseudo_tokens = 0;     // far-field centroids attended (multipole part)
  int64_t bytes_read = 0;        // K/V, centroid and summary bytes read
};

class AttentionPolicy {
 public:
  virtual ~AttentionPolicy() = default;
  virtual std::string_view name() const = 0;
  const AttentionConfig& config() const { return config_; }

  // Brings the policy's state for `layer` of each sequence up to date with the cache. The
  // first call for a sequence indexes everything cached so far (the prompt: prefill
  // clustering); later calls absorb appended tokens (the online update, every W tokens).
  // Call after writing the cache and before decode().
  virtual void update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) = 0;

  // One decode step of one layer. Sequence b's query attends to all its cached positions
  // [0, length(seqs[b])), the newest one included.
  //   q:   [B, num_q_heads, head_dim] f32, rotated to position length(seqs[b]) - 1
  //   out: [B, num_q_heads, head_dim] f32
  // Query head g uses KV head g / group_size(). Does not allocate once warmed up.
  virtual void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
                      ThreadPool& pool) = 0;

  // Drops all state of a sequence (call when the cache frees it).
  virtual void forget(SeqId seq) = 0;

  const DecodeStats& last_stats() const { return stats_; }

 protected:
  explicit AttentionPolicy(const AttentionConfig& config) : config_(config) { config_.validate(); }
  AttentionConfig config_;
  DecodeStats stats_;
};

// "dense", "multipole", "squeezed", "quest", "oracle-topk". Throws naming the known ones.
std::unique_ptr<AttentionPolicy> make_attention_policy(std::string_view name, const AttentionConfig& config);
std::span<const std::string_view> attention_policy_names();

// Policies that decode on another device: the backend registers a factory under the
// device's name (the CUDA backend: cuda::register_cuda_attention(), called by the CLI).
// The policies keep this interface: the host cache stays the one the model writes, and the
// backend mirrors it. "cpu" is always there.
using AttentionPolicyFactory = std::unique_ptr<AttentionPolicy> (*)(std::string_view name,
                                                                     const AttentionConfig& config);
void register_attention_device(std::string_view device, AttentionPolicyFactory factory);
// Throws naming the devices of this build when `device` is not one of them.
std::unique_ptr<AttentionPolicy> make_attention_policy(std::string_view name, const AttentionConfig& config,
                                                       std::string_view device);
std::vector<std::string> attention_devices();

}  // namespace multipole
