// Host driver of the GPU prefill k-means (include/multipole/cuda/kmeans.hpp): block layout
// as ClusterIndex::build, descriptors, the launch sequence, downloads for tests.
#include "multipole/cuda/kmeans.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <utility>

#include "attention/kmeans.hpp"
#include "cuda/check.hpp"
#include "cuda/host_setup.hpp"
#include "cuda/kmeans_launch.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

using namespace detail;

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CTAs per entry of the online update, from `source` ("update split ", "MULTIPOLE_UPDATE_SPLIT="):
// a portable thread-block cluster holds at most 8; 0 asks for the default.
void check_update_split(int ctas, const char* source) {
  MP_CHECK(ctas >= 0 && ctas <= 8, "device k-means: {}{} must be in [1, 8] CTAs per entry, or 0 for the default",
           source, ctas);
}

KvRead kv_read(const DeviceKVCache& cache, int layer) {
  KvRead kv{};
  const DeviceKVLayer lay = cache.layer(layer);
  kv.keys = lay.keys;
  kv.values = lay.values;
  kv.tables = lay.tables;
  kv.table_offset = lay.table_offset;
  kv.page_size = lay.page_size;
  kv.num_kv_heads = lay.num_kv_heads;
  kv.f16 = lay.dtype == DType::F16;
  return kv;
}

// Capacity for `reserve` more tokens from online updates: a chunk adds the difference of
// ceil(block tokens / t) before and after it, so over the chunks at most reserve / t + 1 per
// chunk; append() counts coarse additions as at least 1 per chunk (the device may add
// fewer), and one placeholder coarse slot stays free.
void set_capacity(DeviceEntryShape& sh, const ClusterConfig& cc, int levels, int64_t reserve) {
  const int64_t chunks = ceil_div(reserve, cc.window) + 1;
  sh.token_capacity = sh.tokens + reserve;
  sh.fine_capacity = int(sh.fine + ceil_div(reserve, cc.tokens_per_centroid[0]) + chunks);
  sh.coarse_capacity =
      levels == 2 ? int(sh.coarse + ceil_div(reserve, cc.tokens_per_centroid[1]) + 2 * chunks + 2) : 0;
}

int key_kind_of(DType t) { return t == DType::F32 ? 0 : t == DType::BF16 ? 1 : 2; }

}  // namespace

// Host staging of an append's chunk descriptors: pinned, two slots used in turn, so an append
// neither waits for the stream (the previous kernel may still run) nor rewrites descriptors
// that a queued copy has yet to read. Kept by the DeviceKMeans across builds (pinned
// allocations cost ~1 ms).
struct DeviceKMeans::Staging {
  Staging() = default;
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {
    for (int s = 0; s < 2; ++s) {
      if (done_[s]) cudaEventSynchronize(done_[s]);  // a queued copy may still read the slot
      if (host_[s]) cudaFreeHost(host_[s]);
      if (done_[s]) cudaEventDestroy(done_[s]);
    }
  }
  // Copies v into dst (device; grown when too small) on the stream, in stream order.
  void upload(const std::vector<KmChunk>& v, DeviceBuffer& dst, Stream stream) {
    const int s = next_;
    next_ ^= 1;
    const size_t bytes = v.size() * sizeof(KmChunk);
    if (!done_[s]) MP_CUDA_CHECK(cudaEventCreateWithFlags(&done_[s], cudaEventDisableTiming));
    MP_CUDA_CHECK(cudaEventSynchronize(done_[s]));  // the copy that last read this slot
    if (cap_[s] < v.size()) {
      if (host_[s]) MP_CUDA_CHECK(cudaFreeHost(host_[s]));
      host_[s] = nullptr;
      MP_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_[s]), bytes));
      cap_[s] = v.size();
    }
    std::memcpy(host_[s], v.data(), bytes);
    if (dst.size() < bytes) {
      stream_synchronize(stream);  // a queued kernel may still read the old buffer
      dst.reserve(bytes);
    }
    MP_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host_[s], bytes, cudaMemcpyHostToDevice, stream));
    MP_CUDA_CHECK(cudaEventRecord(done_[s], stream));
  }

 private:
  KmChunk* host_[2] = {nullptr, nullptr};
  size_t cap_[2] = {0, 0};
  cudaEvent_t done_[2] = {nullptr, nullptr};
  int next_ = 0;
};

// Online update state: the open blocks (host mirror: exact token and fine counts, an upper
// bound of the coarse slots in use; the device copy is authoritative), capacities, buffers.
struct DeviceKMeans::Online {
  KmOnlineDims dims{};
  std::vector<KmOpen> open;        // host mirror, last1 = upper bound of the coarse slots in use
  std::vector<DeviceEntryShape> cap;  // capacities per entry
  int half = 0, d = 0;
  int default_split = 0;  // CTAs per entry of the update unless forced (0: not chosen yet)
  DeviceBuffer d_open, key_sums, value_sums, parents, coarse_keys, cent, cnorm, dist, scratch, chunks;
  unsigned long long* prof = nullptr;  // the update kernel's phase clock (diagnostics) or null

  Online(DeviceKMeans& km, const DeviceKVCache& cache, const AttentionConfig& config, const Rope& rope,
         int64_t reserve, std::vector<KmOpen> states)
      : open(std::move(states)) {
    const auto& cc = config.cluster;
    const int E = int(open.size());
    d = cache.config().head_dim;
    MP_CHECK(cc.window >= 1 && cc.window <= 128, "device online update: window {} must be in [1, 128]", cc.window);
    MP_CHECK(cc.update_iterations >= 0, "device online update: update_iterations {} must be >= 0",
             cc.update_iterations);
    dims.window = cc.window;
    dims.block_size = cc.block_size;
    dims.t0 = cc.tokens_per_centroid[0];
    dims.levels = int(cc.tokens_per_centroid.size());
    dims.t1 = dims.levels == 2 ? cc.tokens_per_centroid[1] : dims.t0;
    dims.iterations = cc.update_iterations;
    dims.sinks = cc.sinks;
    dims.to = cc.block_size * 3 / 2 + cc.window;
    dims.ko = int((ceil_div(dims.to, dims.t0) + 1 + 3) / 4 * 4);  // distance rows of whole float4
    dims.ko1 = int(ceil_div(dims.to, dims.t1) + 2);
    const int64_t smem = int64_t(km_online_smem(d, dims));
    if (km.sms_ == 0) {
      const DeviceInfo info = device_info();
      km.sms_ = info.sm_count;
      km.smem_optin_ = info.smem_per_block_optin;
    }
    MP_CHECK(smem <= km.smem_optin_,
             "device online update: block_size {} with tokens_per_centroid[0] {} needs {} bytes of shared memory, the "
             "device has {} per block",
             cc.block_size, dims.t0, smem, km.smem_optin_);
    const DeviceClusterIndex& idx = *km.index_;
    for (int e = 0; e < E; ++e) {
      KmOpen& o = open[size_t(e)];
      o.cluster_base = int32_t(idx.entry_first_cluster(e));
      o.coarse_cap = idx.entry_coarse(e);
      o.member_base = int32_t(idx.member_base(e));
      o.child_cap = o.coarse_cap > 0 ? idx.entry_capacity(e) - o.coarse_cap : 0;
      DeviceEntryShape c;
      c.fine_capacity = idx.entry_capacity(e) - o.coarse_cap;
      c.coarse_capacity = o.coarse_cap;
      c.token_capacity = o.end - cc.sinks + reserve;
      cap.push_back(c);
    }
    std::vector<double> f(rope.inv_freq().begin(), rope.inv_freq().end());
    half = int(f.size());
    upload_vector(km.inv_freq_, f);
    upload_vector(d_open, open);
    const size_t n = size_t(E), D = size_t(d);
    key_sums.reserve(n * dims.ko * D * 8);
    value_sums.reserve(n * dims.ko * D * 8);
    parents.reserve(n * dims.ko * 4);
    coarse_keys.reserve(n * dims.ko1 * D * 4);
    cent.reserve(n * dims.ko * D * 4);
    cnorm.reserve(n * dims.ko * 4);
    dist.reserve(n * dims.window * dims.ko * 4);
    scratch.reserve(n * dims.to * 4);
    chunks.reserve(n * sizeof(KmChunk));  // one window per append: never regrown in a decode loop
  }

  KmOnlineBuffers buffers() const {
    return {d_open.as<KmOpen>(),    key_sums.as<double>(), value_sums.as<double>(), parents.as<int32_t>(),
            coarse_keys.as<float>(), cent.as<float>(),      cnorm.as<float>(),      dist.as<float>(),
            scratch.as<int32_t>(),  prof};
  }

  void init(DeviceKMeans& km, const DeviceKVCache& cache, Stream stream) {
    km_online_init(d, int(open.size()), kv_read(cache, km.layer_), km.inv_freq_.as<double>(), half, dims, buffers(),
                   km.index_->target(), key_kind_of(km.index_->key_dtype()), cache.config().dtype == DType::F16,
                   stream);
  }
};

DeviceKMeans::DeviceKMeans() = default;
DeviceKMeans::DeviceKMeans(DeviceKMeans&&) noexcept = default;
DeviceKMeans& DeviceKMeans::operator=(DeviceKMeans&&) noexcept = default;

DeviceKMeans::~DeviceKMeans() {
  for (auto& m : marks_) cudaEventDestroy(static_cast<cudaEvent_t>(m.second));
}

void DeviceKMeans::mark(const char* stage, Stream stream) {
  if (!profile_) return;
  cudaEvent_t e;
  MP_CUDA_CHECK(cudaEventCreate(&e));
  MP_CUDA_CHECK(cudaEventRecord(e, stream));
  marks_.push_back({stage, e});
}

std::vector<std::pair<std::string, double>> DeviceKMeans::stage_ms() const {
  synchronize();
  std::vector<std::pair<std::string, double>> out;
  std::map<std::string, size_t> at;
  for (size_t i = 1; i < marks_.size(); ++i) {
    float ms = 0;
    MP_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(marks_[i - 1].second),
                                       static_cast<cudaEvent_t>(marks_[i].second)));
    auto [it, fresh] = at.try_emplace(marks_[i].first, out.size());
    if (fresh) out.push_back({marks_[i].first, 0.0});
    out[it->second].second += ms;
  }
  return out;
}

void DeviceKMeans::build(const DeviceKVCache& cache, int layer, std::span<const SeqId> seqs,
                         std::span<const int64_t> ends, const AttentionConfig& config, const Rope& rope,
                         DType key_dtype, Stream stream, int64_t reserve_tokens) {
  const auto& kc = cache.config();
  const auto& cc = config.cluster;
  const int d = kc.head_dim, Hkv = kc.num_kv_heads;
  MP_CHECK(is_kernel_head_dim(d), "device k-means: head_dim {} must be 64 or 128", d);
  MP_CHECK(config.head_dim == d && config.num_kv_heads == Hkv,
           "device k-means: config (head_dim {}, kv heads {}) differs from the cache's ({}, {})", config.head_dim,
           config.num_kv_heads, d, Hkv);
  MP_CHECK(cc.tokens_per_centroid.size() == 1 || cc.tokens_per_centroid.size() == 2,
           "device k-means: {} levels (tokens_per_centroid); the device index takes 1 or 2",
           cc.tokens_per_centroid.size());
  MP_CHECK(cc.prefill_iterations >= 1, "device k-means: prefill_iterations {} must be >= 1", cc.prefill_iterations);
  MP_CHECK(seqs.size() == ends.size() && !seqs.empty(), "device k-means: {} sequences but {} ends", seqs.size(),
           ends.size());
  MP_CHECK(layer >= 0 && layer < kc.num_layers, "device k-means: layer {} outside [0, {})", layer, kc.num_layers);
  MP_CHECK(int64_t(cc.block_size) * 3 / 2 < (1 << 16), "device k-means: block_size {} too large (limit 43690)",
           cc.block_size);
  // The work buffers and descriptors are reused: the previous build's kernels must be done.
  stream_synchronize(stream);
  MP_CHECK(reserve_tokens >= 0, "device k-means: reserve_tokens {} must be >= 0", reserve_tokens);
  levels_ = int(cc.tokens_per_centroid.size());
  layer_ = layer;
  head_dim_ = d;
  num_kv_heads_ = Hkv;
  launches_ = 0;
  for (auto& m : marks_) cudaEventDestroy(static_cast<cudaEvent_t>(m.second));
  marks_.clear();
  mark("start", stream);
  const int64_t sinks = cc.sinks, bs = cc.block_size;

  // Blocks of every entry, as ClusterIndex::build splits them.
  std::vector<KmEntry> entries;
  std::vector<KmBlock> b0, b1;
  std::vector<DeviceEntryShape> shapes;
  entry_seq_.clear();
  block_entry_.clear();
  block_index_.clear();
  int64_t points = 0, clusters0 = 0, clusters1 = 0, dev_clusters = 0, dev_members = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    MP_CHECK(ends[b] >= 0 && (ends[b] <= cache.host_length(seqs[b]) || ends[b] <= sinks),
             "device k-means: end {} outside sequence {} of length {}", ends[b], seqs[b], cache.host_length(seqs[b]));
    for (int h = 0; h < Hkv; ++h) {
      const int e = int(b) * Hkv + h;
      const int64_t n = std::max<int64_t>(0, ends[b] - sinks);
      entry_seq_.push_back(int32_t(seqs[b]));
      entries.push_back({int32_t(seqs[b]), h, int32_t(points), int32_t(n)});
      int64_t full = n / bs, rest = n % bs;
      if (full > 0 && rest > 0 && rest < bs / 2) {
        rest += bs;
        --full;
      }
      const int64_t nblocks = full + (rest > 0 ? 1 : 0);
      // Entry totals first (the index layout needs the coarse count before the fine ids).
      int64_t fine = 0, coarse = 0;
      std::vector<std::pair<int64_t, int64_t>> spans;  // (begin, length)
      for (int64_t k = 0, pos = sinks; k < nblocks; ++k) {
        const int64_t len = k < full ? bs : rest;
        spans.push_back({pos, len});
        pos += len;
        const int64_t k0 = ceil_div(len, cc.tokens_per_centroid[0]);
        fine += k0;
        if (levels_ == 2) coarse += std::min(ceil_div(len, cc.tokens_per_centroid[1]), k0);
      }
      DeviceEntryShape sh;
      sh.clustered_end = n > 0 ? ends[b] : sinks;  // as the CPU index: end() == begin() == sinks
      sh.tokens = n;
      sh.fine = int(fine);
      sh.coarse = int(coarse);
      if (reserve_tokens > 0) set_capacity(sh, cc, levels_, reserve_tokens);
      shapes.push_back(sh);
      // Slots and list room of the entry (capacity included): coarse slots, fine slots; child
      // lists, token lists.
      const int64_t coarse_slots = std::max<int64_t>(coarse, sh.coarse_capacity);
      const int64_t fine_slots = std::max<int64_t>(fine, sh.fine_capacity);
      const int64_t child_room = coarse_slots > 0 ? fine_slots : 0;
      const int64_t entry_cluster = dev_clusters, entry_member = dev_members;
      int64_t fine_local = 0, coarse_local = 0;
      for (int64_t k = 0; k < nblocks; ++k) {
        const auto [pos, len] = spans[size_t(k)];
        KmBlock blk{};
        blk.point_begin = int32_t(points + (pos - sinks));
        blk.n = int32_t(len);
        blk.cluster_begin = int32_t(clusters0);
        blk.k = int32_t(ceil_div(len, cc.tokens_per_centroid[0]));
        blk.seq = int32_t(seqs[b]);
        blk.head = h;
        blk.token_begin = int32_t(pos);
        blk.dev_cluster = int32_t(entry_cluster + coarse_slots + fine_local);
        blk.dev_member = int32_t(entry_member + child_room + (pos - sinks));
        blk.fine_local = int32_t(fine_local);
        blk.seed = kmeans::mix_seed(cc.seed, {0, uint64_t(uint32_t(seqs[b])), uint64_t(layer), uint64_t(h),
                                              uint64_t(k)});
        b0.push_back(blk);
        if (levels_ == 2) {
          KmBlock c{};
          c.point_begin = blk.cluster_begin;
          c.n = blk.k;
          c.cluster_begin = int32_t(clusters1);
          c.k = int32_t(std::min<int64_t>(ceil_div(len, cc.tokens_per_centroid[1]), blk.k));
          c.seq = blk.seq;
          c.head = h;
          c.token_begin = blk.token_begin;
          c.dev_cluster = int32_t(entry_cluster + coarse_local);
          c.dev_member = int32_t(entry_member + fine_local);
          c.fine_local = int32_t(fine_local);
          b1.push_back(c);
          clusters1 += c.k;
          coarse_local += c.k;
        }
        block_entry_.push_back(e);
        block_index_.push_back(int32_t(k));
        clusters0 += blk.k;
        fine_local += blk.k;
      }
      points += n;
      dev_clusters += fine_slots + coarse_slots;
      dev_members += std::max(n, sh.token_capacity) + child_room;
    }
  }
  MP_CHECK(points < (int64_t(1) << 31), "device k-means: {} clustered tokens exceed the 2^31 limit", points);
  num_blocks_ = int(b0.size());
  {
    // The per-block kernels keep a block's labels and per-warp cluster counts in shared
    // memory (count: n + 34 k words; init: n + k words).
    int64_t max_n = 0, max_k = 0;
    for (const auto& b : b0) {
      max_n = std::max<int64_t>(max_n, b.n);
      max_k = std::max<int64_t>(max_k, b.k);
    }
    if (sms_ == 0) {  // device queries are slow: once per object
      const DeviceInfo info = device_info();
      sms_ = info.sm_count;
      smem_optin_ = info.smem_per_block_optin;
    }
    const int64_t need = (max_n + 34 * max_k) * 4, have = smem_optin_;
    MP_CHECK(num_blocks_ == 0 || need <= have,
             "device k-means: blocks of up to {} tokens with {} clusters need {} bytes of shared memory, the device "
             "has {} per block (lower block_size or raise tokens_per_centroid[0])",
             max_n, max_k, need, have);
  }
  // A rebuild of the same shapes (e.g. the next layer) rewrites the index in place.
  auto same = [&]() {
    if (!index_ || index_->head_dim() != d || index_->num_kv_heads() != Hkv || index_->key_dtype() != key_dtype ||
        index_->value_dtype() != kc.dtype || shapes.size() != shapes_.size())
      return false;
    for (size_t e = 0; e < shapes.size(); ++e)
      if (shapes[e].clustered_end != shapes_[e].clustered_end || shapes[e].tokens != shapes_[e].tokens ||
          shapes[e].fine != shapes_[e].fine || shapes[e].coarse != shapes_[e].coarse ||
          shapes[e].token_capacity != shapes_[e].token_capacity ||
          shapes[e].fine_capacity != shapes_[e].fine_capacity || shapes[e].coarse_capacity != shapes_[e].coarse_capacity)
        return false;
    return true;
  };
  if (!same()) index_ = std::make_unique<DeviceClusterIndex>(d, Hkv, key_dtype, kc.dtype, shapes);
  shapes_ = shapes;

  // Work buffers (kept between builds; grown as needed).
  const size_t P = size_t(points), C0 = size_t(clusters0), C1 = size_t(clusters1), D = size_t(d);
  points_.reserve(std::max<size_t>(P * D * 4, 16));
  rng_.reserve(std::max<size_t>(size_t(num_blocks_) * 32, 16));
  upload_vector(entry_desc_, entries);
  std::vector<double> f(rope.inv_freq().begin(), rope.inv_freq().end());
  upload_vector(inv_freq_, f);
  for (int l = 0; l < levels_; ++l) {
    Level& L = lv_[l];
    const auto& blocks = l == 0 ? b0 : b1;
    L.points = l == 0 ? int64_t(P) : int64_t(C0);
    L.clusters = l == 0 ? int64_t(C0) : int64_t(C1);
    L.max_n = L.max_k = 0;
    std::vector<KmTile> tiles;
    for (size_t i = 0; i < blocks.size(); ++i) {
      L.max_n = std::max(L.max_n, blocks[i].n);
      L.max_k = std::max(L.max_k, blocks[i].k);
      for (int s = 0; s < blocks[i].n; s += kKmTilePoints) tiles.push_back({int32_t(i), s});
    }
    L.num_tiles = int(tiles.size());
    upload_vector(L.blocks, blocks);
    upload_vector(L.tiles, tiles);
    const size_t np = std::max<size_t>(size_t(L.points), 1), nc = std::max<size_t>(size_t(L.clusters), 1);
    L.xb.reserve(np * D * 2);
    L.xnorm.reserve(np * 4);
    L.labels.reserve(np * 4);
    L.dist2.reserve(np * 4);
    L.members.reserve(np * 4);
    L.k_active.reserve(std::max<size_t>(blocks.size() * 4, 16));  // k_active per block
    L.cent.reserve(nc * D * 4);
    L.centb.reserve(nc * D * 2);
    L.cnorm.reserve(nc * 4);
    L.counts.reserve(nc * 4);
    L.offsets.reserve(nc * 4);
    L.values.reserve(nc * D * 4);
    L.sizes.reserve(nc * 4);
    L.inertia.reserve(std::max<size_t>(blocks.size() * 16, 16));
    L.mean.reserve(std::max<size_t>(blocks.size() * D * 4, 16));
    L.big.reserve(nc * 8);
    L.big_n.reserve(16);
  }
  online_.reset();
  if (reserve_tokens > 0) {
    // The open block of every entry is its last block (or none).
    std::vector<KmOpen> open(entries.size());
    for (size_t e = 0; e < entries.size(); ++e) {
      KmOpen& o = open[e];
      o.seq = entries[e].seq;
      o.head = entries[e].head;
      o.begin = o.end = int32_t(shapes[e].clustered_end);
      o.last0 = shapes[e].fine;
      o.last1 = shapes[e].coarse;
      o.first0 = o.last0;
      o.first1 = o.last1;
    }
    for (size_t i = 0; i < b0.size(); ++i) {
      KmOpen& o = open[size_t(block_entry_[i])];
      o.has_block = 1;
      o.begin = b0[i].token_begin;
      o.end = b0[i].token_begin + b0[i].n;
      o.first0 = b0[i].fine_local;
      if (levels_ == 2) o.first1 = b1[i].dev_cluster - index_->entry_first_cluster(block_entry_[i]);
    }
    online_ = std::make_unique<Online>(*this, cache, config, rope, reserve_tokens, std::move(open));
  }
  if (num_blocks_ == 0) {  // nothing clustered yet (a short prompt): the updates will fill the index
    finish_build(cache, config, stream);
    return;
  }

  const KvRead kv = kv_read(cache, layer);

  int max_count = 0;
  for (const auto& e : entries) max_count = std::max(max_count, e.count);
  km_gather(d, kv, entry_desc_.as<KmEntry>(), int(entries.size()), max_count, inv_freq_.as<double>(), int(f.size()),
            int(sinks), points_.as<float>(), stream);
  ++launches_;
  mark("host setup + gather", stream);
  const int iters = cc.prefill_iterations;
  for (int l = 0; l < levels_; ++l) {
    Level& L = lv_[l];
    const int nb = num_blocks_;  // one level-1 block per level-0 block
    const float* pts = l == 0 ? points_.as<float>() : lv_[0].cent.as<float>();
    const int32_t* w = l == 0 ? nullptr : lv_[0].sizes.as<int32_t>();
    const KmBlock* blocks = L.blocks.as<KmBlock>();
    int32_t* kact = L.k_active.as<int32_t>();
    // Centred f16 copies of the points and their norms (level 1: of the level-0 centroids).
    km_mean(d, nb, blocks, pts, L.mean.as<float>(), stream);
    km_prep(d, nb, L.max_n, blocks, kact, true, pts, L.mean.as<float>(), L.xb.data(), L.xnorm.as<float>(), stream);
    launches_ += 2;
    mark(l == 0 ? "L0 mean+prep" : "L1 mean+prep", stream);
    km_init(nb, L.max_n, L.max_k, blocks, l, d, pts, w, rng_.as<uint64_t>(), L.cent.as<float>(), kact, stream);
    ++launches_;
    mark(l == 0 ? "L0 init" : "L1 init", stream);
    for (int it = 0; it < iters; ++it) {
      km_prep(d, nb, L.max_k, blocks, kact, false, L.cent.as<float>(), L.mean.as<float>(), L.centb.data(),
              L.cnorm.as<float>(), stream);
      mark(l == 0 ? "L0 prep" : "L1 prep", stream);
      km_assign(d, L.num_tiles, blocks, L.tiles.as<KmTile>(), L.xb.data(), L.xnorm.as<float>(), L.centb.data(),
                L.cnorm.as<float>(), L.labels.as<int32_t>(), L.dist2.as<float>(), stream);
      mark(l == 0 ? "L0 assign" : "L1 assign", stream);
      km_count(nb, L.max_n, L.max_k, blocks, kact, w, L.labels.as<int32_t>(), L.dist2.as<float>(),
               L.counts.as<int32_t>(), L.offsets.as<int32_t>(), L.members.as<int32_t>(), L.inertia.as<double>(),
               it == 0, stream);
      mark(l == 0 ? "L0 count+lists" : "L1 count+lists", stream);
      km_update(d, nb, L.max_k, blocks, kv, pts, w, l == 0 ? nullptr : lv_[0].values.as<float>(),
                L.counts.as<int32_t>(), L.offsets.as<int32_t>(), L.members.as<int32_t>(), L.cent.as<float>(),
                L.values.as<float>(), L.sizes.as<int32_t>(), it + 1 == iters, L.big.data(), L.big_n.as<int32_t>(),
                sms_, stream);
      launches_ += 6;
      mark(l == 0 ? "L0 update" : "L1 update", stream);
    }
  }
  const int key_kind = key_kind_of(key_dtype);
  const DeviceClusterTarget target = index_->target();
  for (int l = 0; l < levels_; ++l) {
    Level& L = lv_[l];
    km_emit(d, num_blocks_, L.max_k, L.blocks.as<KmBlock>(), l, L.cent.as<float>(), L.values.as<float>(),
            L.sizes.as<int32_t>(), L.offsets.as<int32_t>(), L.members.as<int32_t>(), target, key_kind,
            kc.dtype == DType::F16, stream);
    ++launches_;
    mark("emit", stream);
  }
  finish_build(cache, config, stream);
}

void DeviceKMeans::finish_build(const DeviceKVCache& cache, const AttentionConfig& config, Stream stream) {
  if (online_) {
    online_->init(*this, cache, stream);
    ++launches_;
    mark("online init", stream);
  }
  // The index's position sums (one launch over every slot) only for the far field that reads them.
  if (config.far_field_at_real_positions()) {
    index_->refresh_position_sums(stream);
    ++launches_;
    mark("position sums", stream);
  }
}

void DeviceKMeans::load(const DeviceKVCache& cache, int layer, std::span<const SeqId> seqs,
                        std::span<const ClusterIndex* const> cpu, const AttentionConfig& config, const Rope& rope,
                        DType key_dtype, int64_t reserve_tokens) {
  const auto& kc = cache.config();
  const auto& cc = config.cluster;
  const int Hkv = kc.num_kv_heads;
  MP_CHECK(is_kernel_head_dim(kc.head_dim), "device k-means: head_dim {} must be 64 or 128", kc.head_dim);
  MP_CHECK(cpu.size() == seqs.size() * size_t(Hkv) && !seqs.empty(),
           "device k-means: {} CPU indexes for {} sequences x {} KV heads", cpu.size(), seqs.size(), Hkv);
  MP_CHECK(reserve_tokens > 0, "device k-means: load needs reserve_tokens > 0, got {}", reserve_tokens);
  synchronize();
  levels_ = int(cc.tokens_per_centroid.size());
  layer_ = layer;
  head_dim_ = kc.head_dim;
  num_kv_heads_ = Hkv;
  num_blocks_ = 0;
  entry_seq_.clear();
  block_entry_.clear();
  block_index_.clear();
  std::vector<HostClusterLevel> host;
  std::vector<DeviceEntryShape> caps;
  std::vector<KmOpen> open(cpu.size());
  for (size_t e = 0; e < cpu.size(); ++e) {
    const ClusterIndex& x = *cpu[e];
    MP_CHECK(x.num_levels() == levels_, "device k-means: CPU index {} has {} levels, the config {}", e,
             x.num_levels(), levels_);
    host.push_back(host_cluster_level(x));
    DeviceEntryShape sh;
    sh.tokens = x.end() - x.begin();
    sh.fine = host.back().num_clusters();
    sh.coarse = host.back().num_coarse();
    set_capacity(sh, cc, levels_, reserve_tokens);
    caps.push_back(sh);
    KmOpen& o = open[e];
    o.seq = int32_t(seqs[e / size_t(Hkv)]);
    o.head = int(e % size_t(Hkv));
    entry_seq_.push_back(o.seq);
    o.begin = o.end = int32_t(x.end());
    o.first0 = o.last0 = sh.fine;
    o.first1 = o.last1 = sh.coarse;
    if (!x.blocks().empty()) {
      const ClusterBlock& blk = x.blocks().back();
      o.has_block = 1;
      o.begin = int32_t(blk.begin);
      o.first0 = blk.first[0];
      o.first1 = levels_ == 2 ? blk.first[1] : 0;
    }
  }
  index_ = std::make_unique<DeviceClusterIndex>(kc.head_dim, Hkv, key_dtype, kc.dtype, host, caps);
  shapes_.clear();
  online_ = std::make_unique<Online>(*this, cache, config, rope, reserve_tokens, std::move(open));
  online_->init(*this, cache, nullptr);
  if (config.far_field_at_real_positions()) index_->refresh_position_sums(nullptr);
  synchronize();
}

void DeviceKMeans::append(const DeviceKVCache& cache, std::span<const int64_t> new_ends, const AttentionConfig& config,
                          Stream stream) {
  MP_CHECK(online_ != nullptr, "device k-means: append() needs build(..., reserve_tokens > 0) or load() first");
  Online& on = *online_;
  const auto& cc = config.cluster;
  const int E = int(on.open.size()), Hkv = num_kv_heads_;
  MP_CHECK(new_ends.size() * size_t(Hkv) == size_t(E), "device k-means: {} new ends for {} entries of {} KV heads",
           new_ends.size(), E, Hkv);
  MP_CHECK(cc.window == on.dims.window && cc.block_size == on.dims.block_size &&
               cc.tokens_per_centroid[0] == on.dims.t0 && int(cc.tokens_per_centroid.size()) == on.dims.levels,
           "device k-means: append with another cluster config than the build's");
  const int64_t t0 = on.dims.t0, t1 = on.dims.t1, W = on.dims.window;
  std::vector<KmChunk> all;
  for (;;) {
    std::vector<KmChunk> row(size_t(E), KmChunk{0, 0, 0});
    bool any = false;
    for (int e = 0; e < E; ++e) {
      KmOpen& o = on.open[size_t(e)];
      const int64_t target = new_ends[size_t(e / Hkv)];
      MP_CHECK(target >= o.end && target <= cache.host_length(o.seq),
               "device k-means: new end {} of sequence {} outside [{}, length {}]", target, o.seq, o.end,
               cache.host_length(o.seq));
      if (o.end == target) continue;
      const int64_t count = std::min<int64_t>(W, target - o.end);
      if (!o.has_block || o.end - o.begin >= cc.block_size) {
        o.has_block = 1;
        o.begin = o.end;
        o.first0 = o.last0;
      }
      const int64_t n0 = o.end - o.begin, n1 = n0 + count;
      const int64_t add0 = std::min(count, ceil_div(n1, t0) - ceil_div(n0, t0));
      const int64_t add1 = on.dims.levels == 2 ? std::max<int64_t>(1, ceil_div(n1, t1) - ceil_div(n0, t1)) : 0;
      const DeviceEntryShape& cap = on.cap[size_t(e)];
      MP_CHECK(o.last0 + add0 <= cap.fine_capacity && (add1 == 0 || o.last1 + add1 < cap.coarse_capacity) &&
                   o.end + count - cc.sinks <= cap.token_capacity,
               "device k-means: entry {} would hold {} fine / up to {} coarse clusters and {} tokens, beyond its "
               "capacity {} / {} (one placeholder) / {}; build with a larger reserve_tokens",
               e, o.last0 + add0, o.last1 + add1, o.end + count - cc.sinks, cap.fine_capacity, cap.coarse_capacity,
               cap.token_capacity);
      row[size_t(e)] = {o.end, int32_t(count),
                        kmeans::mix_seed(cc.seed, {1, uint64_t(uint32_t(o.seq)), uint64_t(layer_), uint64_t(o.head),
                                                   uint64_t(o.end)})};
      o.end += int32_t(count);
      o.last0 += int32_t(add0);
      o.last1 += int32_t(add1);
      any = true;
    }
    if (!any) break;
    all.insert(all.end(), row.begin(), row.end());
  }
  update_launches_ = 0;
  if (all.empty()) return;
  on.prof = update_profile_;
  if (!staging_) staging_ = std::make_unique<Staging>();
  staging_->upload(all, on.chunks, stream);
  const KvRead kv = kv_read(cache, layer_);
  const DeviceClusterTarget target = index_->target();
  const int key_kind = key_kind_of(index_->key_dtype());
  // Clusters of 4 or 2 CTAs per entry (the extra CTAs share the distance tiles) where the
  // device holds all the batch's clusters at once, else one CTA per entry; chosen once per
  // build (the entries and shapes are fixed until the next).
  if (on.default_split == 0) {
    const char* env = std::getenv("MULTIPOLE_UPDATE_SPLIT");
    const int forced = env ? std::atoi(env) : 0;
    check_update_split(forced, "MULTIPOLE_UPDATE_SPLIT=");
    if (forced > 0) on.default_split = forced;
    else if (E <= km_online_max_clusters(on.d, on.dims, 4)) on.default_split = 4;
    else if (E <= km_online_max_clusters(on.d, on.dims, 2)) on.default_split = 2;
    else on.default_split = 1;
  }
  const int split = update_split_ > 0 ? update_split_ : on.default_split;
  update_split_used_ = split;
  for (size_t c = 0; c * size_t(E) < all.size(); ++c) {
    km_online_update(on.d, E, split, kv, inv_freq_.as<double>(), on.half, on.dims, on.buffers(),
                     on.chunks.as<KmChunk>() + c * size_t(E), target, key_kind, cache.config().dtype == DType::F16,
                     stream);
    ++update_launches_;
  }
  if (config.far_field_at_real_positions()) {
    index_->refresh_position_sums(stream);
    ++update_launches_;
  }
}

void DeviceKMeans::set_update_split(int ctas) {
  check_update_split(ctas, "update split ");
  update_split_ = ctas;
}

HostClusterLevel DeviceKMeans::download_index(int entry) const {
  MP_CHECK(online_ != nullptr && entry >= 0 && entry < int(online_->open.size()),
           "device k-means: download_index({}) needs an online-ready index", entry);
  synchronize();
  KmOpen o;
  online_->d_open.download(&o, sizeof(o), size_t(entry) * sizeof(o));
  const int d = head_dim_;
  const DeviceClusterView v = index_->view();
  const int64_t nclusters = int64_t(o.coarse_cap) + o.last0;
  std::vector<int32_t> sizes(static_cast<size_t>(nclusters)), mb(static_cast<size_t>(nclusters));
  std::vector<std::byte> keys(size_t(nclusters) * d * dtype_size(v.key_dtype)),
      values(size_t(nclusters) * d * dtype_size(v.value_dtype));
  auto get = [](void* dst, const void* src, size_t bytes) {
    if (bytes) MP_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  };
  get(sizes.data(), v.sizes + o.cluster_base, sizes.size() * 4);
  get(mb.data(), v.member_begin + o.cluster_base, mb.size() * 4);
  get(keys.data(), static_cast<const std::byte*>(v.key_centroids) + size_t(o.cluster_base) * d * dtype_size(v.key_dtype),
      keys.size());
  get(values.data(),
      static_cast<const std::byte*>(v.value_centroids) + size_t(o.cluster_base) * d * dtype_size(v.value_dtype),
      values.size());
  // Child lists, then the token lists of the clustered positions [sinks, end).
  std::vector<int32_t> mem(size_t(o.child_cap) + size_t(std::max(0, o.end - online_->dims.sinks)));
  get(mem.data(), v.members + o.member_base, mem.size() * 4);
  std::vector<float> kf(keys.size() / dtype_size(v.key_dtype)), vf(values.size() / dtype_size(v.value_dtype));
  convert_to_f32(keys.data(), v.key_dtype, kf.data(), kf.size());
  convert_to_f32(values.data(), v.value_dtype, vf.data(), vf.size());
  HostClusterLevel h;
  h.clustered_end = o.end;
  h.member_offsets = {0};
  for (int f = 0; f < o.last0; ++f) {
    const size_t g = size_t(o.coarse_cap + f);
    h.key_centroids.insert(h.key_centroids.end(), kf.begin() + g * d, kf.begin() + (g + 1) * d);
    h.value_centroids.insert(h.value_centroids.end(), vf.begin() + g * d, vf.begin() + (g + 1) * d);
    h.sizes.push_back(sizes[g]);
    const size_t m0 = size_t(mb[g] - o.member_base);
    h.members.insert(h.members.end(), mem.begin() + m0, mem.begin() + m0 + size_t(sizes[g]));
    h.member_offsets.push_back(int32_t(h.members.size()));
  }
  if (o.coarse_cap > 0) {
    h.coarse_child_offsets = {0};
    for (int p = 0; p < o.last1; ++p) {
      const size_t g = size_t(p);
      h.coarse_key_centroids.insert(h.coarse_key_centroids.end(), kf.begin() + g * d, kf.begin() + (g + 1) * d);
      h.coarse_value_centroids.insert(h.coarse_value_centroids.end(), vf.begin() + g * d, vf.begin() + (g + 1) * d);
      h.coarse_sizes.push_back(sizes[g]);
      const int32_t b0 = mb[g] - o.member_base, b1 = p + 1 < o.last1 ? mb[g + 1] - o.member_base : o.last0;
      h.coarse_children.insert(h.coarse_children.end(), mem.begin() + b0, mem.begin() + b1);
      h.coarse_child_offsets.push_back(int32_t(h.coarse_children.size()));
    }
  }
  return h;
}

HostClusterLevel DeviceKMeans::download(int entry) const {
  MP_CHECK(entry >= 0 && entry < entries(), "device k-means: entry {} outside [0, {})", entry, entries());
  synchronize();
  const int d = head_dim_;
  HostClusterLevel h;
  h.clustered_end = index_->entry_clustered_end(entry);
  h.member_offsets = {0};
  for (int l = 0; l < levels_; ++l) {
    const Level& L = lv_[l];
    const size_t nb = l == 0 ? size_t(num_blocks_) : size_t(num_blocks_);
    std::vector<KmBlock> blocks(nb);
    if (nb) L.blocks.download(blocks.data(), nb * sizeof(KmBlock));
    std::vector<float> cent(size_t(L.clusters) * d), values(cent.size());
    std::vector<int32_t> sizes(size_t(L.clusters)), offsets(sizes.size()), members(size_t(L.points));
    if (L.clusters) {
      L.cent.download(cent.data(), cent.size() * 4);
      L.values.download(values.data(), values.size() * 4);
      L.sizes.download(sizes.data(), sizes.size() * 4);
      L.offsets.download(offsets.data(), offsets.size() * 4);
    }
    if (L.points) L.members.download(members.data(), members.size() * 4);
    auto& keys = l == 0 ? h.key_centroids : h.coarse_key_centroids;
    auto& vals = l == 0 ? h.value_centroids : h.coarse_value_centroids;
    auto& sz = l == 0 ? h.sizes : h.coarse_sizes;
    auto& offs = l == 0 ? h.member_offsets : h.coarse_child_offsets;
    auto& mem = l == 0 ? h.members : h.coarse_children;
    if (l == 1) offs = {0};
    for (size_t i = 0; i < nb; ++i) {
      if (block_entry_[i] != entry) continue;
      const KmBlock& b = blocks[i];
      for (int c = 0; c < b.k; ++c) {
        const size_t g = size_t(b.cluster_begin) + size_t(c);
        keys.insert(keys.end(), cent.begin() + g * d, cent.begin() + (g + 1) * d);
        vals.insert(vals.end(), values.begin() + g * d, values.begin() + (g + 1) * d);
        sz.push_back(sizes[g]);
        const int m0 = offsets[g], m1 = c + 1 < b.k ? offsets[g + 1] : b.n;
        for (int m = m0; m < m1; ++m)
          mem.push_back(l == 0 ? b.token_begin + members[size_t(b.point_begin + m)]
                               : b.fine_local + members[size_t(b.point_begin + m)]);
        offs.push_back(int32_t(mem.size()));
      }
    }
  }
  return h;
}

std::vector<KMeansBlockStats> DeviceKMeans::block_stats() const {
  synchronize();
  std::vector<KMeansBlockStats> out;
  for (int l = 0; l < levels_; ++l) {
    std::vector<double> in(size_t(num_blocks_) * 2);
    if (num_blocks_) lv_[l].inertia.download(in.data(), in.size() * 8);
    for (int i = 0; i < num_blocks_; ++i)
      out.push_back({block_entry_[size_t(i)], block_index_[size_t(i)], l, in[2 * size_t(i)], in[2 * size_t(i) + 1]});
  }
  return out;
}

int64_t DeviceKMeans::scratch_bytes() const {
  int64_t b = int64_t(points_.size() + rng_.size());
  for (const auto& L : lv_)
    for (const DeviceBuffer* x : {&L.xb, &L.xnorm, &L.labels, &L.dist2, &L.members, &L.cent, &L.centb, &L.cnorm,
                                  &L.counts, &L.offsets, &L.values, &L.sizes})
      b += int64_t(x->size());
  return b;
}

}  // namespace multipole::cuda
