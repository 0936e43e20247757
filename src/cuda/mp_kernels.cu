// Multipole scoring and selection launches, device-side cache append, benchmark fills.
#include "cuda/check.hpp"
#include "cuda/score.cuh"
#include "cuda/select.cuh"
#include "multipole/cuda/kv_cache.hpp"

namespace multipole::cuda::detail {

namespace {

template <int D, int GC, class CT>
void launch_score_one(const ScoreArgs& a, int items, Stream stream) {
  const dim3 grid(items, a.num_kv_heads * a.head_chunks);
  score_kernel<D, GC, CT><<<grid, 128, 0, stream>>>(a);
  MP_CUDA_CHECK(cudaGetLastError());
}

template <int D, class CT>
void launch_score_d(const ScoreArgs& a, int gc, int items, Stream stream) {
  switch (gc) {
    case 1: return launch_score_one<D, 1, CT>(a, items, stream);
    case 2: return launch_score_one<D, 2, CT>(a, items, stream);
    case 4: return launch_score_one<D, 4, CT>(a, items, stream);
    default: return launch_score_one<D, 8, CT>(a, items, stream);
  }
}

template <class CT>
void launch_score_t(const ScoreArgs& a, int head_dim, int gc, int items, Stream stream) {
  if (head_dim == 64)
    launch_score_d<64, CT>(a, gc, items, stream);
  else
    launch_score_d<128, CT>(a, gc, items, stream);
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

void launch_score(const ScoreArgs& a, int head_dim, int gc, DType key_dtype, int items, Stream stream) {
  if (items <= 0) return;
  switch (key_dtype) {
    case DType::F32: return launch_score_t<float>(a, head_dim, gc, items, stream);
    case DType::BF16: return launch_score_t<__nv_bfloat16>(a, head_dim, gc, items, stream);
    case DType::F16: return launch_score_t<__half>(a, head_dim, gc, items, stream);
  }
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
