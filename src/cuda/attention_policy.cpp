// AttentionPolicy adapters over the GPU decoders (see the header for what is mirrored when).
#include "multipole/cuda/attention_policy.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "multipole/attention/rope.hpp"
#include "multipole/core/error.hpp"
#include "multipole/cuda/decode.hpp"
#include "multipole/cuda/kmeans.hpp"
#include "multipole/cuda/kv_cache.hpp"
#include "multipole/cuda/runtime.hpp"
#include "multipole/cuda/sparse_baselines.hpp"

namespace multipole::cuda {
namespace {

enum class Kind { Dense, Multipole, Quest, OracleTopk };

class CudaPolicy final : public AttentionPolicy {
 public:
  CudaPolicy(std::string_view name, Kind kind, const AttentionConfig& config)
      : AttentionPolicy(config), name_(name), kind_(kind), rope_(config.rope) {
    if (kind_ == Kind::Dense || kind_ == Kind::Multipole) {
      decoder_ = std::make_unique<CudaDecoder>(config_);
      decoder_->set_record_far_sizes(true);  // (stats_.pseudo_tokens)
    } else {
      sparse_ = std::make_unique<CudaSparseDecoder>(
          config_, kind_ == Kind::Quest ? SparseBaseline::Quest : SparseBaseline::OracleTopk);
    }
  }

  std::string_view name() const override { return name_; }

  void update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool&) override {
    mirror(cache);
    MP_CHECK(layer >= 0 && layer < cache.config().num_layers, "{} (cuda): layer {} outside [0, {})", name_, layer,
             cache.config().num_layers);
    for (SeqId seq : seqs) {
      MP_CHECK(seq >= 0 && seq < mirror_->max_sequences(), "{} (cuda): sequence id {} outside [0, {})", name_, seq,
               mirror_->max_sequences());
      int64_t& done = uploaded_[size_t(layer)][size_t(seq)];
      const int64_t len = cache.length(seq);
      MP_CHECK(len >= done, "{} (cuda): sequence {} shrank from {} to {} tokens without forget()", name_, seq, done,
               len);
      // The page of the first new token may hold tokens already there: whole pages travel.
      mirror_->upload_tokens(cache, layer, seq, done, len);
      done = len;
    }
    mirror_->sync_tables(cache);
    if (kind_ == Kind::Multipole) update_index(layer, seqs);
    if (kind_ == Kind::Quest && metadata_ok_[size_t(layer)] && same_batch(planned_, seqs))
      sparse_->update_metadata(*mirror_, layer, nullptr);
  }

  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool&) override {
    MP_CHECK(mirror_ && host_ == &cache, "{} (cuda): decode() before update() on this cache", name_);
    const int64_t B = int64_t(seqs.size());
    const size_t n = size_t(B) * size_t(config_.num_q_heads) * size_t(config_.head_dim);
    q_.reserve(n * sizeof(float));
    out_.reserve(n * sizeof(float));
    q_.upload(q, n * sizeof(float));
    int64_t total = 0;
    MP_CHECK(layer >= 0 && layer < cache.config().num_layers, "{} (cuda): layer {} outside [0, {})", name_, layer,
             cache.config().num_layers);
    for (SeqId seq : seqs) {
      MP_CHECK(seq >= 0 && seq < mirror_->max_sequences(), "{} (cuda): sequence id {} outside [0, {})", name_, seq,
               mirror_->max_sequences());
      MP_CHECK(uploaded_[size_t(layer)][size_t(seq)] == cache.length(seq),
               "{} (cuda): sequence {} has {} tokens but {} were mirrored: call update() first", name_, seq,
               cache.length(seq), uploaded_[size_t(layer)][size_t(seq)]);
      total += cache.length(seq);
    }
    stats_ = DecodeStats{};
    switch (kind_) {
      case Kind::Dense:
        decoder_->plan(*mirror_, seqs);
        decoder_->dense(*mirror_, layer, q_.as<float>(), out_.as<float>(), nullptr);
        stats_.exact_tokens = total * config_.num_kv_heads;
        break;
      case Kind::Multipole: {
        MP_CHECK(same_batch(batch_[size_t(layer)], seqs),
                 "{} (cuda): decode() of another batch than the last update() of layer {}", name_, layer);
        DeviceKMeans& km = *kmeans_[size_t(layer)];
        km.sync_index();
        decoder_->plan(*mirror_, seqs, &km.index());
        // The scoring query: each query moved from its position (length - 1) to score_position.
        qs_host_.assign(q, q + n);
        const int64_t row = config_.head_dim;
        for (int64_t b = 0; b < B; ++b)
          for (int h = 0; h < config_.num_q_heads; ++h)
            rope_.rotate_by(qs_host_.data() + (b * config_.num_q_heads + h) * row,
                            config_.score_position - double(cache.length(seqs[size_t(b)]) - 1));
        qs_.reserve(n * sizeof(float));
        qs_.upload(qs_host_.data(), n * sizeof(float));
        decoder_->multipole(*mirror_, layer, km.index(), q_.as<float>(), qs_.as<float>(), out_.as<float>(), nullptr);
        const uint32_t flags = decoder_->error_flags();
        MP_CHECK(flags == 0,
                 "{} (cuda): the GPU decoder flagged an error ({:#x}; bit 0: an exact set overflowed, bit 2: the "
                 "one-launch step found more candidates than its plan allowed)",
                 name_, flags);
        for (int32_t c : decoder_->exact_counts()) stats_.exact_tokens += c;
        stats_.selected_tokens = stats_.exact_tokens - fixed_tokens(cache, seqs);
        if (config_.multipole_far_field)
          for (int32_t size : decoder_->far_sizes()) stats_.pseudo_tokens += size > 0;
        break;
      }
      case Kind::Quest:
      case Kind::OracleTopk: {
        int64_t longest = 0;
        for (SeqId seq : seqs) longest = std::max(longest, cache.length(seq));
        if (!same_batch(planned_, seqs) || longest > planned_length_) {
          // Room to grow, so that a plan (and the quest bounds) lasts many steps.
          planned_length_ = std::min<int64_t>(std::max<int64_t>(2 * longest, 4096), cache.config().max_tokens);
          sparse_->plan(*mirror_, seqs, planned_length_);
          planned_.assign(seqs.begin(), seqs.end());
          std::fill(metadata_ok_.begin(), metadata_ok_.end(), false);
        }
        if (kind_ == Kind::Quest && !metadata_ok_[size_t(layer)]) {
          sparse_->build_metadata(*mirror_, layer, nullptr);
          metadata_ok_[size_t(layer)] = true;
        }
        sparse_->decode(*mirror_, layer, q_.as<float>(), out_.as<float>(), nullptr);
        for (const auto& list : sparse_->exact_positions()) stats_.exact_tokens += int64_t(list.size());
        stats_.selected_tokens = stats_.exact_tokens - fixed_tokens(cache, seqs);
        break;
      }
    }
    out_.download(out, n * sizeof(float));  // synchronous: waits for the step
    stats_.bytes_read = stats_.exact_tokens * 2 * int64_t(config_.head_dim) * int64_t(dtype_size(cache.config().dtype));
  }

  void forget(SeqId seq) override {
    if (!mirror_ || seq < 0 || seq >= mirror_->max_sequences()) return;
    for (auto& layer : uploaded_) layer[size_t(seq)] = 0;
    // Indexes and plans that include the sequence are rebuilt by the next update()/decode().
    for (auto& batch : batch_)
      if (std::find(batch.begin(), batch.end(), seq) != batch.end()) batch.clear();
    if (std::find(planned_.begin(), planned_.end(), seq) != planned_.end()) planned_.clear();
  }

 private:
  static bool same_batch(const std::vector<SeqId>& a, std::span<const SeqId> b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }

  // Creates the device mirror at the first call; later calls must pass the same cache.
  void mirror(const PagedKVCache& cache) {
    if (mirror_) {
      MP_CHECK(host_ == &cache, "{} (cuda): one policy object mirrors one KV cache", name_);
      return;
    }
    const KVCacheConfig& kc = cache.config();
    MP_CHECK(kc.dtype == DType::BF16 || kc.dtype == DType::F16,
             "{} (cuda): the KV cache stores {}; the GPU kernels read bf16 or f16 (choose --kv-dtype bf16 or f16)",
             name_, dtype_name(kc.dtype));
    MP_CHECK(kc.num_kv_heads == config_.num_kv_heads && kc.head_dim == config_.head_dim,
             "{} (cuda): cache has {} KV heads of dim {}, the attention config {} of dim {}", name_, kc.num_kv_heads,
             kc.head_dim, config_.num_kv_heads, config_.head_dim);
    mirror_ = std::make_unique<DeviceKVCache>(kc);
    host_ = &cache;
    uploaded_.assign(size_t(kc.num_layers), std::vector<int64_t>(size_t(mirror_->max_sequences()), 0));
    batch_.assign(size_t(kc.num_layers), {});
    kmeans_.resize(size_t(kc.num_layers));
    clustered_.assign(size_t(kc.num_layers), {});
    metadata_ok_.assign(size_t(kc.num_layers), false);
  }

  // Sinks and local window of every (sequence, KV head): the exact tokens no policy chooses.
  int64_t fixed_tokens(const PagedKVCache& cache, std::span<const SeqId> seqs) const {
    int64_t n = 0;
    for (SeqId seq : seqs) {
      const int64_t len = cache.length(seq);
      n += std::min<int64_t>(config_.cluster.sinks, len) + len - config_.middle_end(len);
    }
    return n * config_.num_kv_heads;
  }

  // Prefill clustering of a new batch, or the online update of the same batch.
  void update_index(int layer, std::span<const SeqId> seqs) {
    ends_.resize(seqs.size());
    for (size_t b = 0; b < seqs.size(); ++b) ends_[b] = config_.clustered_end(mirror_->host_length(seqs[b]));
    auto& km = kmeans_[size_t(layer)];
    if (km && same_batch(batch_[size_t(layer)], seqs)) {
      if (ends_ != clustered_[size_t(layer)]) km->append(*mirror_, ends_, config_, nullptr);
    } else {
      if (!km) km = std::make_unique<DeviceKMeans>();
      // Room for every sequence to grow to the whole cache, so that append() never runs out.
      km->build(*mirror_, layer, seqs, ends_, config_, rope_, DType::F32, nullptr, host_->config().max_tokens);
      batch_[size_t(layer)].assign(seqs.begin(), seqs.end());
    }
    clustered_[size_t(layer)] = ends_;
  }

  std::string name_;
  Kind kind_;
  Rope rope_;
  const PagedKVCache* host_ = nullptr;
  std::unique_ptr<DeviceKVCache> mirror_;
  std::vector<std::vector<int64_t>> uploaded_;  // [layer][seq] tokens on the device
  // Multipole and squeezed.
  std::unique_ptr<CudaDecoder> decoder_;
  std::vector<std::unique_ptr<DeviceKMeans>> kmeans_;  // [layer]
  std::vector<std::vector<SeqId>> batch_;             // [layer] the sequences of its index, in order
  std::vector<std::vector<int64_t>> clustered_;       // [layer] their clustered ends
  std::vector<float> qs_host_;
  std::vector<int64_t> ends_;  // update_index's clustered ends, kept to avoid an allocation per call
  // Quest and oracle-topk.
  std::unique_ptr<CudaSparseDecoder> sparse_;
  std::vector<SeqId> planned_;
  int64_t planned_length_ = 0;
  std::vector<bool> metadata_ok_;  // [layer] quest page bounds built for the current plan
  DeviceBuffer q_, qs_, out_;
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_cuda_attention_policy(std::string_view name, const AttentionConfig& config) {
  MP_CHECK(device_count() > 0, "attention device cuda: no usable CUDA device (no GPU or no driver)");
  if (name == "dense") return std::make_unique<CudaPolicy>(name, Kind::Dense, config);
  if (name == "multipole") return std::make_unique<CudaPolicy>(name, Kind::Multipole, config);
  if (name == "squeezed") {
    AttentionConfig c = config;
    c.multipole_far_field = false;
    return std::make_unique<CudaPolicy>(name, Kind::Multipole, c);
  }
  if (name == "quest") return std::make_unique<CudaPolicy>(name, Kind::Quest, config);
  if (name == "oracle-topk") return std::make_unique<CudaPolicy>(name, Kind::OracleTopk, config);
  fail("unknown attention policy '{}' (known: dense, multipole, squeezed, quest, oracle-topk)", name);
}

void register_cuda_attention() { register_attention_device("cuda", &make_cuda_attention_policy); }

}  // namespace multipole::cuda
