// Kernel lab: how the shared-memory layout of a cp.async ring changes the L2 traffic and the
// bandwidth of a decode-attention-like stream (gpu-notes item 16).
//
// Each warp streams its own 8-row tiles of K and V (rows of 256 bytes, as bf16 d = 128)
// through a 4-stage cp.async ring, as attend_kernel does, and reads each tile back with the
// ldmatrix pattern of its q.K^T and P.V products. Variants differ only in where the 16-byte
// chunk c of tile row r lands in shared memory and in the cp.async form:
//   0: rows padded to 272 bytes (attend_kernel up to session H13), zero-fill form
//   1: rows of 256 bytes, chunk c at c (ldmatrix reads 8 rows in one bank group)
//   2: rows of 256 bytes, chunk c at c ^ (r & 7), zero-fill form
//   3: as 2 without the source-size operand
//   4: as 0 without the source-size operand
// Every variant reads the same bytes into the same lanes, so the checksum (an order-sensitive
// hash per thread of what ldmatrix returned, weighted by thread) must agree.
// Usage: lab_cp_async_layouts [MiB per K and V, default 1024] [variant, default all]; then ncu
// for the L2 counters.
// H200, 2 GiB each, 264 CTAs (session H13): 0: 4330 GB/s, 10.5 copy wavefronts and 10.5 L2
// requests per 512-byte copy, 1.5x the sectors; 1: 3826 GB/s (8-way ldmatrix conflicts);
// 2 and 3: 4527 GB/s, 4 wavefronts, 4 requests, 1.0x the sectors; 4: as 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/common.cuh"
#include "lab_util.cuh"

namespace {

constexpr int kRowBytes = 256, kTile = 8, kStages = 4, kWarps = 4, kChunks = kRowBytes / 16;

template <int V> struct Layout {
  static constexpr int kStride = (V == 0 || V == 4) ? kRowBytes + 16 : kRowBytes;
  __device__ static int offset(int r, int c) {
    if constexpr (V == 2 || V == 3) return multipole::cuda::detail::swizzled_offset(r, c, kStride);  // the library's
    return r * kStride + (c << 4);
  }
  static constexpr int kStageBytes = 2 * kTile * kStride;
};

template <int V> __device__ __forceinline__ void copy16(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (V == 3 || V == 4)
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(s), "l"(src));
  else
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(16));
}

// keys, values: [rows, 256 bytes]; sink: [grid * 128] hash of each thread's ldmatrix results.
template <int V>
__global__ void __launch_bounds__(128, 2) stream_kernel(const uint8_t* keys, const uint8_t* values, int64_t rows,
                                                         uint32_t* sink) {
  using L = Layout<V>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint8_t* ring = smem + warp * kStages * L::kStageBytes;
  const int64_t tiles = rows / kTile, per_cta = tiles / gridDim.x;
  const int64_t t0 = blockIdx.x * per_cta;
  const int ntiles = int((per_cta - warp + kWarps - 1) / kWarps);
  const int piece = lane % kChunks, r0 = lane / kChunks;
  auto issue = [&](int t) {
    if (t < ntiles) {
      const int64_t row0 = (t0 + int64_t(t) * kWarps + warp) * kTile;
      uint8_t* kt = ring + (t % kStages) * L::kStageBytes;
      uint8_t* vt = kt + kTile * L::kStride;
      for (int s = 0; s < kTile / 2; ++s) {
        const int r = r0 + 2 * s;
        copy16<V>(kt + L::offset(r, piece), keys + (row0 + r) * kRowBytes + piece * 16);
        copy16<V>(vt + L::offset(r, piece), values + (row0 + r) * kRowBytes + piece * 16);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int t = 0; t < kStages - 1; ++t) issue(t);
  uint32_t acc = 0;
  for (int t = 0; t < ntiles; ++t) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
    __syncwarp();
    issue(t + kStages - 1);
    const uint8_t* kt = ring + (t % kStages) * L::kStageBytes;
    const uint8_t* vt = kt + kTile * L::kStride;
    for (int kk = 0; kk < kChunks / 4; ++kk) {
      uint32_t a[4], b[4];
      multipole::cuda::detail::ldmatrix_x4(a, kt + L::offset(lane & 7, kk * 4 + (lane >> 3)));
      multipole::cuda::detail::ldmatrix_x4_trans(b, vt + L::offset(lane & 7, kk * 4 + (lane >> 3)));
      for (const uint32_t x : {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]}) acc = acc * 1000003u + x;  // order-sensitive
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  sink[blockIdx.x * 128 + threadIdx.x] = acc;
}

template <int V>
void run(const uint8_t* k, const uint8_t* v, int64_t rows, uint32_t* sink, int grid, void* flush, size_t flush_bytes) {
  const int smem = kWarps * kStages * Layout<V>::kStageBytes;
  LAB_CHECK(cudaFuncSetAttribute(stream_kernel<V>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaEvent_t e0, e1;
  LAB_CHECK(cudaEventCreate(&e0));
  LAB_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    LAB_CHECK(cudaMemsetAsync(flush, i, flush_bytes));
    LAB_CHECK(cudaEventRecord(e0));
    stream_kernel<V><<<grid, 128, smem>>>(k, v, rows, sink);
    LAB_CHECK(cudaEventRecord(e1));
    LAB_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    LAB_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  std::vector<uint32_t> h(size_t(grid) * 128);
  LAB_CHECK(cudaMemcpy(h.data(), sink, h.size() * 4, cudaMemcpyDeviceToHost));
  uint32_t x = 0;
  for (size_t i = 0; i < h.size(); ++i) x += h[i] * uint32_t(2 * i + 1);
  const double bytes = 2.0 * double(rows) * kRowBytes, t = ms[ms.size() / 2] * 1e-3;
  std::printf("variant %d  smem/CTA %6d  %8.1f us  %7.0f GB/s  checksum %08x\n", V, smem, t * 1e6, bytes / t / 1e9, x);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 1024;
  const int only = argc > 2 ? std::atoi(argv[2]) : -1;
  int sms = 0;
  LAB_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int grid = 2 * sms;
  const int64_t rows = (mib << 20) / kRowBytes / (int64_t(grid) * kWarps * kTile) * (int64_t(grid) * kWarps * kTile);
  uint8_t *k, *v;
  uint32_t* sink;
  void* flush;
  const size_t flush_bytes = size_t(256) << 20;
  LAB_CHECK(cudaMalloc(&k, rows * kRowBytes));
  LAB_CHECK(cudaMalloc(&v, rows * kRowBytes));
  LAB_CHECK(cudaMalloc(&sink, size_t(grid) * 128 * 4));
  LAB_CHECK(cudaMalloc(&flush, flush_bytes));
  std::vector<uint8_t> h(rows * kRowBytes);
  for (size_t i = 0; i < h.size(); ++i) h[i] = uint8_t((i * 2654435761u) >> 13);
  LAB_CHECK(cudaMemcpy(k, h.data(), h.size(), cudaMemcpyHostToDevice));
  for (size_t i = 0; i < h.size(); ++i) h[i] = uint8_t((i * 40503u + 7) >> 5);
  LAB_CHECK(cudaMemcpy(v, h.data(), h.size(), cudaMemcpyHostToDevice));
  std::printf("# %lld rows of %d bytes each for K and V, %d CTAs x 128 threads\n", (long long)rows, kRowBytes, grid);
  if (only < 0 || only == 0) run<0>(k, v, rows, sink, grid, flush, flush_bytes);
  if (only < 0 || only == 1) run<1>(k, v, rows, sink, grid, flush, flush_bytes);
  if (only < 0 || only == 2) run<2>(k, v, rows, sink, grid, flush, flush_bytes);
  if (only < 0 || only == 3) run<3>(k, v, rows, sink, grid, flush, flush_bytes);
  if (only < 0 || only == 4) run<4>(k, v, rows, sink, grid, flush, flush_bytes);
  return 0;
}
