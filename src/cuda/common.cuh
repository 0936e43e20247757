#pragma once
// Device helpers shared by the attention kernels: storage-type conversions, cp.async,
// fast exp2, warp reductions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "cuda/phase_clock.hpp"

namespace multipole::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Programmatic dependent launch (sm_90): a kernel launched with programmatic stream
// serialisation may start before the previous kernel of the stream ends; pdl_wait() blocks
// until that kernel has completed and its writes are visible (a no-op for a plain launch).
// pdl_trigger() lets the next such kernel start its independent prologue now.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;"); }

// Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream
// serialisation when pdl (the kernel must call pdl_wait() before reading what the previous
// kernel wrote). Capturable in a CUDA graph (a programmatic edge).
template <class... KArgs, class... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             bool pdl, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// A launch of `clusters` thread-block clusters of `cluster` CTAs of `threads` on `stream`.
// `attr` holds the cluster dimension and must outlive the config.
inline cudaLaunchConfig_t cluster_launch_config(cudaLaunchAttribute& attr, int clusters, int cluster, int threads,
                                                cudaStream_t stream, size_t smem = 0) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = unsigned(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(clusters * cluster));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// 2^x, relative error ~2^-22; 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One storage element <-> float (round to nearest even).
template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32(float x) { return x; }
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32(float x) { return __float2half_rn(x); }

// One 16-byte vector of storage elements -> floats (8 for 16-bit types, 4 for f32).
template <class T> struct Storage;
template <> struct Storage<__nv_bfloat16> {
  static constexpr int kPerVec = 8;
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <> struct Storage<__half> {
  static constexpr int kPerVec = 8;
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 v = __half22float2(h);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};
template <> struct Storage<float> {
  static constexpr int kPerVec = 4;
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

// 16-byte global -> shared copy; valid == false writes zeros and reads nothing. The L2 is asked
// to fetch the whole 128-byte line: with 256 bytes the dense stream made 1.57x the L2 sector
// requests of the data read, and ran slower (gpu-notes item 16).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
// Byte offset of 16-byte chunk c of row r in a shared-memory tile of rows row_bytes long (a
// multiple of 128), chunk c stored at c ^ (r & 7). A warp's cp.async of whole rows then fills
// aligned 128-byte lines with each chunk's offset in its line kept up to a permutation of
// 16-byte slots: 4 wavefronts per 512 bytes and no sector fetched twice. With rows padded by
// 16 bytes it took ~10 and moved 1.5x the bytes from L2 (gpu-notes item 16). The 8 rows an
// ldmatrix reads at one chunk still hit distinct banks. The tile must start 128-byte aligned.
__device__ __forceinline__ int swizzled_offset(int r, int c, int row_bytes) { return r * row_bytes + ((c ^ (r & 7)) << 4); }
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory into mma fragments (lane l gives the address of
// row l % 8 of matrix l / 8); _trans transposes each matrix.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Tensor-core operations on bf16 / f16 operands with f32 accumulators, and the packing of
// f32 pairs into them (a split into a rounded part and a remainder keeps f32-class accuracy).
template <class T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> {
  // Packs (lo, hi) floats into two 16-bit values, rounding to nearest.
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
  }
  __device__ __forceinline__ static float lo(uint32_t r) { return __uint_as_float(r << 16); }
  __device__ __forceinline__ static float hi(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }
  __device__ __forceinline__ static void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};
template <> struct MmaType<__half> {
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
  }
  __device__ __forceinline__ static float lo(uint32_t r) { return __half2float(__ushort_as_half(uint16_t(r & 0xffffu))); }
  __device__ __forceinline__ static float hi(uint32_t r) { return __half2float(__ushort_as_half(uint16_t(r >> 16))); }
  __device__ __forceinline__ static void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};

// One 16-bit part of the pair (a, b) for T's mma: packs them rounded to nearest and leaves
// the remainders in a and b, so that calling it again gives the next part (hi, lo, ...).
template <class T>
__device__ __forceinline__ uint32_t peel_part(float& a, float& b) {
  const uint32_t r = MmaType<T>::pack(a, b);
  a -= MmaType<T>::lo(r);
  b -= MmaType<T>::hi(r);
  return r;
}

// Logits of 16 rows of D 16-bit elements of type T in shared memory against at most 8 queries
// on tensor cores (m16n8k16, the rows as A), each query given as kParts 16-bit parts. Lane (gid
// = lane / 4, tig = lane % 4) ends with d = the logits of rows gid and gid + 8 against queries
// 2 tig and 2 tig + 1 (d[0], d[1]; d[2], d[3]). query_parts(ks, qb): the lane's B fragments of
// k-step ks, qb[half][p] = part p of query gid's elements ks * 16 + half * 8 + 2 tig, + 1 (0 for
// a padded query); row_chunk(ks): the lane's ldmatrix address for k-step ks.
template <int D, class T, int kParts, class PartsOf, class RowChunk>
__device__ __forceinline__ void mma_rows_by_parts(float (&d)[4], const PartsOf& query_parts,
                                                  const RowChunk& row_chunk) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qb[2][kParts];
    query_parts(ks, qb);
    uint32_t af[4];
    ldmatrix_x4(af, row_chunk(ks));
#pragma unroll
    for (int p = kParts - 1; p >= 0; --p) MmaType<T>::mma16816(d, af, qb[0][p], qb[1][p]);
  }
}

// mma_rows_by_parts against at most 8 f32 queries, each split here into three 16-bit parts
// (f32-class logits). query_pair(g, k): query g's elements k, k + 1 as float2, asked for g <
// heads only (others 0).
template <int D, class T, class QueryPair, class RowChunk>
__device__ __forceinline__ void mma_rows_three_part(float (&d)[4], int heads, const QueryPair& query_pair,
                                                    const RowChunk& row_chunk) {
  constexpr int kParts = 3;
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  mma_rows_by_parts<D, T, kParts>(
      d,
      [&](int ks, uint32_t (&qb)[2][kParts]) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float x0 = 0.0f, x1 = 0.0f;
          if (gid < heads) {
            const float2 v = query_pair(gid, ks * 16 + half * 8 + tig * 2);
            x0 = v.x, x1 = v.y;
          }
#pragma unroll
          for (int p = 0; p < kParts; ++p) qb[half][p] = peel_part<T>(x0, x1);
        }
      },
      row_chunk);
}

// Asks the L2 for the 128-byte line holding p (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// The RoPE angle pos * inv_freq reduced to [-pi, pi] in double (exact to ~1e-11 rad at 10^5 rad),
// as a float for a float sincos (accurate on that range; positions past 100K keep their phase).
__device__ __forceinline__ float reduced_angle(double pos, double inv_freq) {
  const double t = pos * inv_freq;
  return float(t - 6.283185307179586 * rint(t * 0.15915494309189535));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Inclusive prefix sum over the lanes of a full warp (lane order).
__device__ __forceinline__ int warp_inclusive_sum(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Per-phase cycle counts of a kernel (diagnostics): thread 0 of each CTA adds the clock64
// cycles since its previous mark to out[slot]; finish() adds its globaltimer ns to slot
// kPhaseClockNs and 1 to kPhaseClockCtas (phase_clock.hpp). A null `out` turns every call
// into nothing.
struct PhaseClock {
  unsigned long long* out;
  long long t = 0;
  unsigned long long t_ns = 0;
  // cta_stride > 0: CTA b adds to its own slots p + b * cta_stride (a buffer per CTA).
  __device__ explicit PhaseClock(unsigned long long* p, int cta_stride = 0)
      : out(threadIdx.x == 0 && p ? p + int64_t(blockIdx.x) * cta_stride : nullptr) {
    if (out) {
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_ns));
      t = clock64();
    }
  }
  __device__ void mark(int slot) {
    if (out) {
      const long long n = clock64();
      atomicAdd(out + slot, static_cast<unsigned long long>(n - t));
      t = n;
    }
  }
  __device__ void add(int slot, int v) {
    if (out) atomicAdd(out + slot, static_cast<unsigned long long>(v));
  }
  __device__ void finish() {
    if (out) {
      unsigned long long n;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(n));
      atomicAdd(out + kPhaseClockNs, n - t_ns);
      atomicAdd(out + kPhaseClockCtas, 1ull);
    }
  }
  // After finish(): this CTA's SM, start and end into its own slots, and its start and end
  // into the launch's span slots (span: the first CTA's; phase_clock.hpp).
  __device__ void record_span(unsigned long long* span) {
    if (out) {
      unsigned long long n;
      unsigned sm;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(n));
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      out[kCtaSm] = sm, out[kCtaStart] = t_ns, out[kCtaEnd] = n;
      atomicMin(span + kSpanFirstStart, t_ns), atomicMax(span + kSpanLastStart, t_ns);
      atomicMin(span + kSpanFirstEnd, n), atomicMax(span + kSpanLastEnd, n);
    }
  }
};

}  // namespace multipole::cuda::detail
