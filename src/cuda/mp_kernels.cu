// Multipole scoring, selection and re-ranking launches, the far field at real positions (position sums, far
// logits), device-side cache append, benchmark fills.
#include <algorithm>

#include "cuda/check.hpp"
#include "cuda/host_setup.hpp"
#include "cuda/mean_positions.cuh"
#include "cuda/rerank.cuh"
#include "cuda/score.cuh"
#include "cuda/select.cuh"
#include "multipole/cuda/kv_cache.hpp"

namespace multipole::cuda::detail {

namespace {

// The kernel's shared memory at its deepest ring, set once per instantiation; returns the
// CTAs that fit on the device with it.
template <int D, int GC, class CT>
int score_resident() {
  using Stage = ScoreStage<D, GC, CT>;
  static const int resident = [] {
    constexpr int kMaxSmem = Stage::kMaxStages * Stage::kBytes;
    MP_CUDA_CHECK(cudaFuncSetAttribute(score_kernel<D, GC, CT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    int per_sm = 0;
    MP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, score_kernel<D, GC, CT>, 128, kMaxSmem));
    return std::max(1, per_sm) * current_sm_count();
  }();
  return resident;
}

// The ring only as deep as a CTA's items: one stage for one item.
template <int D, int GC, class CT>
void launch_score_one(const ScoreArgs& a, int items, int ctas, Stream stream) {
  using Stage = ScoreStage<D, GC, CT>;
  const int work = items * a.num_kv_heads * a.head_chunks;
  const int grid = std::max(1, std::min({ctas, work, score_resident<D, GC, CT>()}));
  const int stages = std::min(Stage::kMaxStages, (work + grid - 1) / grid);
  score_kernel<D, GC, CT><<<grid, 128, stages * Stage::kBytes, stream>>>(a, items, work, stages);
  MP_CUDA_CHECK(cudaGetLastError());
}

// Calls f.template operator()<D, GC, CT>() for the runtime shape.
template <class F>
void dispatch_score(int head_dim, int gc, DType key_dtype, F&& f) {
  auto by_gc = [&]<int D, class CT>() {
    switch (gc) {
      case 1: return f.template operator()<D, 1, CT>();
      case 2: return f.template operator()<D, 2, CT>();
      case 4: return f.template operator()<D, 4, CT>();
      default: return f.template operator()<D, 8, CT>();
    }
  };
  auto by_d = [&]<class CT>() {
    if (head_dim == 64)
      by_gc.template operator()<64, CT>();
    else
      by_gc.template operator()<128, CT>();
  };
  switch (key_dtype) {
    case DType::F32: return by_d.template operator()<float>();
    case DType::BF16: return by_d.template operator()<__nv_bfloat16>();
    case DType::F16: return by_d.template operator()<__half>();
  }
}

// rows: [batch, Hkv, D] f32 -> the pool slot of position lengths[seq] - 1.
template <class T>
__global__ void append_kernel(const DeviceKVLayer kv, T* kpool, T* vpool, const int32_t* seqs, const float* keys,
                              const float* values) {
  const int b = blockIdx.x, h = blockIdx.y, D = kv.head_dim, Hkv = kv.num_kv_heads, P = kv.page_size;
  const int seq = seqs[b];
  const int pos = kv.lengths[seq] - 1;
  if (pos < 0) return;
  const int page = kv.tables[kv.table_offset[seq] + pos / P];
  const int64_t row = (int64_t(page) * Hkv + h) * P + pos % P;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const int64_t src = (int64_t(b) * Hkv + h) * D + d;
    if constexpr (sizeof(T) == 2 && std::is_same_v<T, __half>) {
      kpool[row * D + d] = __float2half_rn(keys[src]);
      vpool[row * D + d] = __float2half_rn(values[src]);
    } else {
      kpool[row * D + d] = __float2bfloat16_rn(keys[src]);
      vpool[row * D + d] = __float2bfloat16_rn(values[src]);
    }
  }
}

__global__ void fill_random_kernel(void* out, int64_t n, int kind, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t x = (uint64_t(i) + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    const float f = float(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
    if (kind == 0)
      static_cast<float*>(out)[i] = f;
    else if (kind == 1)
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(f);
    else
      static_cast<__half*>(out)[i] = __float2half_rn(f);
  }
}

__global__ void read_flush_kernel(const uint4* data, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 v = data[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // practically never: keeps the loads alive
}

}  // namespace

void launch_read_flush(const void* data, size_t bytes, uint32_t* sink, Stream stream) {
  read_flush_kernel<<<1024, 256, 0, stream>>>(static_cast<const uint4*>(data), int64_t(bytes / 16), sink);
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_score(const ScoreArgs& a, int head_dim, int gc, DType key_dtype, int items, int ctas, Stream stream) {
  if (items <= 0) return;
  dispatch_score(head_dim, gc, key_dtype, [&]<int D, int GC, class CT>() { launch_score_one<D, GC, CT>(a, items, ctas, stream); });
}

int score_resident_ctas(int head_dim, int gc, DType key_dtype) {
  int n = 0;
  dispatch_score(head_dim, gc, key_dtype, [&]<int D, int GC, class CT>() { n = score_resident<D, GC, CT>(); });
  return n;
}

void launch_position_sums(const DeviceClusterView& index, int64_t* sums, int entries, int max_slots, Stream stream) {
  if (entries <= 0 || max_slots <= 0) return;
  position_sums_kernel<<<dim3((max_slots + 7) / 8, entries), 256, 0, stream>>>(index, sums);
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_far_logits_at_mean_positions(const FarLogitArgs& a, int head_dim, DType key_dtype, int entries,
                                         int max_far, Stream stream) {
  if (entries <= 0) return;
  const size_t smem = size_t(a.group) * head_dim * sizeof(float);  // (the plan checks it fits)
  // Enough CTAs an entry to spread a batch-1 step over the GPU; the warps stride past them.
  const dim3 grid(std::clamp((max_far + 7) / 8, 1, 256), entries);
  // (The scoring dispatch, its head-chunk width unused here.)
  dispatch_score(head_dim, 1, key_dtype, [&]<int D, int GC, class CT>() {
    MP_CUDA_CHECK(launch_maybe_pdl(far_logits_at_mean_positions_kernel<D, CT>, grid, dim3(256), smem, stream,
                                   a.pdl != 0, a));
  });
}

namespace {
// One CTA per entry; raises the kernel's dynamic shared-memory limit when needed.
void launch_select_kernel(void (*kernel)(SelectArgs), size_t smem, size_t& configured, const SelectArgs& a,
                          int entries, Stream stream) {
  if (smem > configured) {
    MP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = smem;
  }
  MP_CUDA_CHECK(launch_maybe_pdl(kernel, dim3(entries), dim3(kSelectThreads), smem, stream, a.pdl != 0, a));
}
}  // namespace

void launch_select(const SelectArgs& a, int entries, Stream stream) {
  static size_t configured = 0;
  launch_select_kernel(select_kernel, select_smem_bytes(a.smem_clusters), configured, a, entries, stream);
}

void launch_select_hier(const SelectArgs& a, int entries, Stream stream) {
  static size_t configured[6] = {};
  const size_t smem = select_hier_smem_bytes(a.smem_clusters, a.group, a.head_dim, a.cand_cache);
  const int p = a.prof ? 3 : 0;
  // [profiled][key type: f32, bf16, f16]
  void (*const kernels[6])(SelectArgs) = {
      select_hier_kernel<float, false>, select_hier_kernel<__nv_bfloat16, false>, select_hier_kernel<__half, false>,
      select_hier_kernel<float, true>,  select_hier_kernel<__nv_bfloat16, true>,  select_hier_kernel<__half, true>};
  const int k = p + (a.key_kind == 0 ? 0 : a.key_kind == 1 ? 1 : 2);
  launch_select_kernel(kernels[k], smem, configured[k], a, entries, stream);
}

void launch_rerank(const SelectArgs& a, DType kv_dtype, int entries, Stream stream) {
  static size_t configured[4] = {};
  // [head dim 64, 128][bf16, f16]
  const int k = (a.head_dim == 64 ? 0 : 2) + (kv_dtype == DType::F16 ? 1 : 0);
  void (*const kernels[4])(SelectArgs) = {rerank_kernel<64, __nv_bfloat16>, rerank_kernel<64, __half>,
                                          rerank_kernel<128, __nv_bfloat16>, rerank_kernel<128, __half>};
  launch_select_kernel(kernels[k], rerank_smem_bytes(a.rerank, a.group, a.head_dim), configured[k], a, entries, stream);
}

void launch_append(const DeviceKVLayer& layer, std::byte* key_pool, std::byte* value_pool, const int32_t* seqs,
                   int batch, const float* keys, const float* values, Stream stream) {
  const dim3 grid(batch, layer.num_kv_heads);
  if (layer.dtype == DType::F16)
    append_kernel<__half><<<grid, 128, 0, stream>>>(layer, reinterpret_cast<__half*>(key_pool),
                                                    reinterpret_cast<__half*>(value_pool), seqs, keys, values);
  else
    append_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(layer, reinterpret_cast<__nv_bfloat16*>(key_pool),
                                                           reinterpret_cast<__nv_bfloat16*>(value_pool), seqs, keys,
                                                           values);
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_fill_random(void* data, int64_t n, DType dtype, uint64_t seed, Stream stream) {
  if (n <= 0) return;
  fill_random_kernel<<<1024, 256, 0, stream>>>(data, n, dtype == DType::F32 ? 0 : dtype == DType::BF16 ? 1 : 2, seed);
  MP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace multipole::cuda::detail
