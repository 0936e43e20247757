// Prefill k-means on the GPU (include/multipole/cuda/kmeans.hpp): gather + unrotation of the
// clustering keys, per-block initialisation by the CPU's Rng, Lloyd iterations (f16 mma on centred data
// distances fused with the argmin; counts, re-seeding and member lists in one CTA per block;
// f64 centroid sums over the members), and the write-out into a DeviceClusterIndex.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "cuda/check.hpp"
#include "cuda/kmeans_launch.hpp"

namespace multipole::cuda::detail {

namespace {

constexpr int kTileCents = 64;    // centroids per shared-memory stage
constexpr int kCountThreads = 1024;

__device__ __forceinline__ int64_t cache_row(const KvRead& kv, int seq, int head, int pos) {
  const int page = kv.tables[kv.table_offset[seq] + pos / kv.page_size];
  return (int64_t(page) * kv.num_kv_heads + head) * kv.page_size + pos % kv.page_size;
}

// V consecutive 16-bit elements of a cache row -> floats.
template <int V>
__device__ __forceinline__ void load16(const std::byte* base, int64_t elem, bool f16, float (&out)[V]) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(base) + elem;
  uint16_t raw[V];
  if constexpr (V == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    memcpy(raw, &u, 8);
  } else {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
    memcpy(raw, &u, 4);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (f16) {
      __half h;
      memcpy(&h, &raw[i], 2);
      out[i] = __half2float(h);
    } else {
      out[i] = __uint_as_float(uint32_t(raw[i]) << 16);
    }
  }
}

// V consecutive floats (V = 2 or 4: one 8- or 16-byte access).
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[V]) {
  if constexpr (V == 4) {
    const float4 u = *reinterpret_cast<const float4*>(p);
    out[0] = u.x, out[1] = u.y, out[2] = u.z, out[3] = u.w;
  } else {
    const float2 u = *reinterpret_cast<const float2*>(p);
    out[0] = u.x, out[1] = u.y;
  }
}
template <int V>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[V]) {
  if constexpr (V == 4)
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  else
    *reinterpret_cast<float2*>(p) = make_float2(in[0], in[1]);
}

// ---- the CPU's random numbers (src/attention/kmeans.cpp), bit for bit ----------------------

__device__ __forceinline__ uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
struct DevRng {
  uint64_t s[4];
  __device__ uint64_t next() {
    const uint64_t result = rotl64(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
  }
  __device__ uint64_t below(uint64_t n) {
    for (;;) {
      const uint64_t r = next();
      const uint64_t low = r * n, high = __umul64hi(r, n);
      if (low >= n || low >= (0 - n) % n) return high;
    }
  }
};

// ---- tensor-core helpers --------------------------------------------------------------------

// f16 operands (11-bit significands, on data centred per block) keep the distance error ~8x
// below bf16's at the same rate; f32 accumulation.
__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void cp16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}

// ---- kernels --------------------------------------------------------------------------------

// Clustering keys: the cached key of each token rotated back to position 0 (as the CPU's
// unrotate_consecutive: pairs (i, i + half), angle -pos * inv_freq[i]; the angle is reduced
// modulo 2 pi in f64, then sin/cos in f32), in f32. grid (ceil(max count / 8), entries),
// 8 warps, one token per warp.
template <int D>
__global__ void __launch_bounds__(256) gather_kernel(KvRead kv, const KmEntry* entries, const double* inv_freq,
                                                     int half, int sinks, float* points) {
  constexpr int V = D / 32;
  __shared__ float row[8][D];
  const KmEntry e = entries[blockIdx.y];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * 8 + warp;
  if (t >= e.count) return;
  const int pos = sinks + t;
  float x[V];
  load16<V>(kv.keys, cache_row(kv, e.seq, e.head, pos) * D + lane * V, kv.f16 != 0, x);
#pragma unroll
  for (int i = 0; i < V; ++i) row[warp][lane * V + i] = x[i];
  __syncwarp();
  const int64_t p = e.point_begin + t;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int j = lane * V + i;
    float o = row[warp][j];
    if (j < 2 * half) {
      const int f = j < half ? j : j - half;
      const double ang = double(pos) * inv_freq[f];
      const double red = ang - 6.283185307179586 * rint(ang * 0.15915494309189535);
      float sf, cf;
      sincosf(float(red), &sf, &cf);
      sf = -sf;  // angle -pos * f
      const float a = row[warp][f], b = row[warp][f + half];
      o = j < half ? a * cf - b * sf : b * cf + a * sf;
    }
    x[i] = o;
  }
  store_f32<V>(points + p * D + lane * V, x);
}

// Per-block origin of the f16 copies: the mean of up to 1024 evenly spaced points of the
// block (any origin gives the same distances; a central one the smallest rounding). One CTA
// per block, 1024 threads = 1024 / D point groups x D channels, f64 sums in a fixed order.
template <int D>
__global__ void __launch_bounds__(1024) mean_kernel(const KmBlock* blocks, const float* points, float* mean) {
  constexpr int G = 1024 / D;
  __shared__ double part[G][D];
  const KmBlock blk = blocks[blockIdx.x];
  const int g = threadIdx.x / D, j = threadIdx.x % D;
  const int S = min(blk.n, 1024);
  double s = 0;
  for (int q = g; q < S; q += G) {
    const int i = int(int64_t(q) * blk.n / S);
    s += points[(int64_t(blk.point_begin) + i) * D + j];
  }
  part[g][j] = s;
  __syncthreads();
  if (g == 0) {
    for (int k = 1; k < G; ++k) s += part[k][j];
    mean[int64_t(blockIdx.x) * D + j] = S > 0 ? float(s / S) : 0.0f;
  }
}

// Initial centroids: k distinct random points of the block (level 1: among the points of
// positive weight, in ascending order), drawn as kmeans::init_random does. Level 0 seeds
// the Rng and leaves its state for level 1. One CTA per block.
__global__ void init_kernel(const KmBlock* blocks, int level, int d, const float* points, const int32_t* weights,
                            int max_k, uint64_t* rng_state, float* cent, int32_t* k_active) {
  extern __shared__ int32_t picked[];  // [max_k] picks, then [n] the items being shuffled
  __shared__ int kk_s;
  const KmBlock blk = blocks[blockIdx.x];
  int32_t* it = picked + max_k;
  if (level == 0)
    for (int i = threadIdx.x; i < blk.n; i += blockDim.x) it[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) {
    int m = blk.n;
    if (level > 0) {
      m = 0;
      for (int i = 0; i < blk.n; ++i)
        if (weights[blk.point_begin + i] > 0) it[m++] = i;
    }
    DevRng rng;
    uint64_t* st = rng_state + 4 * int64_t(blockIdx.x);
    if (level == 0) {
      uint64_t seed = blk.seed;
      for (auto& x : rng.s) x = splitmix64(seed);
    } else {
      for (int i = 0; i < 4; ++i) rng.s[i] = st[i];
    }
    const int kk = min(blk.k, m);
    for (int i = 0; i < kk; ++i) {
      const int j = i + int(rng.below(uint64_t(m - i)));
      const int32_t tmp = it[i];
      it[i] = it[j];
      it[j] = tmp;
      picked[i] = it[i];
    }
    for (int i = 0; i < 4; ++i) st[i] = rng.s[i];
    kk_s = kk;
    k_active[blockIdx.x] = kk;
  }
  __syncthreads();
  const int kk = kk_s;
  for (int64_t x = threadIdx.x; x < int64_t(blk.k) * d; x += blockDim.x) {
    const int c = int(x / d), j = int(x % d);
    cent[(int64_t(blk.cluster_begin) + c) * d + j] = c < kk ? points[(int64_t(blk.point_begin) + picked[c]) * d + j] : 0.0f;
  }
}

// f32 rows minus the block's mean -> f16 rows and their squared norms; rows at or past
// k_active of their block get an infinite norm (never nearest). grid (ceil(max rows / 8),
// blocks), one row per warp. by_points: the rows are the block's points, not its clusters.
template <int D>
__global__ void __launch_bounds__(256) prep_kernel(const KmBlock* blocks, const int32_t* k_active, bool by_points,
                                                   const float* src, const float* mean, __half* dst, float* norm) {
  constexpr int V = D / 32;
  const KmBlock blk = blocks[blockIdx.y];
  const int r = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  const int rows = by_points ? blk.n : blk.k;
  if (r >= rows) return;
  const int64_t g = (by_points ? blk.point_begin : blk.cluster_begin) + int64_t(r);
  float x[V], m[V];
  load_f32<V>(src + g * D + lane * V, x);
  load_f32<V>(mean + int64_t(blockIdx.y) * D + lane * V, m);
  float sq = 0;
  __half h[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    x[i] -= m[i];
    h[i] = __float2half_rn(x[i]);
    sq = fmaf(x[i], x[i], sq);
  }
  if constexpr (V == 4) {
    uint2 u;
    memcpy(&u, h, 8);
    *reinterpret_cast<uint2*>(dst + g * D + lane * V) = u;
  } else {
    uint32_t u;
    memcpy(&u, h, 4);
    *reinterpret_cast<uint32_t*>(dst + g * D + lane * V) = u;
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, m);
  if (lane == 0) norm[g] = (!by_points && r >= k_active[blockIdx.y]) ? __int_as_float(0x7f800000) : sq;
}

// Nearest centroid of every point: ||c||^2 - 2 x.c on the centred f16 copies by mma (f32
// accumulation), argmin with the lowest index on ties; dist2 = max(0, ||x||^2 + min). One CTA per 128 points of a
// block, 4 warps of 32 points (two m16 tiles, A fragments in registers); centroids stream
// through shared memory 64 at a time (double-buffered cp.async).
template <int D>
__global__ void __launch_bounds__(128) assign_kernel(const KmBlock* blocks, const KmTile* tiles,
                                                     const __half* xb, const float* xnorm,
                                                     const __half* centb, const float* cnorm, int32_t* labels,
                                                     float* dist2) {
  constexpr int RS = D * 2 + 16;  // padded row (bytes): ldmatrix without bank conflicts
  constexpr int KS = D / 16;      // k steps
  __shared__ __align__(16) unsigned char tile[2][kTileCents * RS];
  __shared__ float snorm[2][kTileCents];
  const KmTile tl = tiles[blockIdx.x];
  const KmBlock blk = blocks[tl.block];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const int p0 = tl.start + warp * 32;  // the warp's first point (block-local)

  // A fragments: rows p0 + mt*16 + grp (+8), columns ks*16 + tig*2 (+8).
  uint32_t a[2][KS][4];
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(xb);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = p0 + mt * 16 + grp + h * 8;
      const bool ok = r < blk.n;
      const int64_t base = (int64_t(blk.point_begin) + (ok ? r : 0)) * (D / 2);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        a[mt][ks][h] = ok ? xw[base + ks * 8 + tig] : 0u;
        a[mt][ks][h + 2] = ok ? xw[base + ks * 8 + 4 + tig] : 0u;
      }
    }

  auto load_stage = [&](int st, int buf) {
    const int c0 = st * kTileCents;
    constexpr int kPieces = D / 8;  // 16-byte pieces per row
    for (int x = threadIdx.x; x < kTileCents * kPieces; x += 128) {
      const int r = x / kPieces, pc = x % kPieces;
      const bool ok = c0 + r < blk.k;
      const __half* src = centb + (int64_t(blk.cluster_begin) + (ok ? c0 + r : 0)) * D + pc * 8;
      cp16(&tile[buf][r * RS + pc * 16], src, ok);
    }
    if (threadIdx.x < kTileCents) {
      const int c = c0 + threadIdx.x;
      snorm[buf][threadIdx.x] = c < blk.k ? cnorm[blk.cluster_begin + c] : __int_as_float(0x7f800000);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };

  float best_v[2][2];
  int best_i[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best_v[mt][h] = __int_as_float(0x7f800000);
      best_i[mt][h] = 0x7fffffff;
    }
  const int stages = (blk.k + kTileCents - 1) / kTileCents;
  load_stage(0, 0);
  for (int st = 0; st < stages; ++st) {
    const int buf = st & 1;
    if (st + 1 < stages) {
      load_stage(st + 1, buf ^ 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const unsigned char* t = tile[buf];
#pragma unroll 2
    for (int nt = 0; nt < kTileCents / 8; ++nt) {
      float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk) {
        uint32_t b[4];
        ldsm_x4(b, t + (nt * 8 + (lane & 7)) * RS + (kk * 32 + (lane >> 3) * 8) * 2);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_f16(acc[mt], a[mt][2 * kk][0], a[mt][2 * kk][1], a[mt][2 * kk][2], a[mt][2 * kk][3], b[0], b[1]);
          mma_f16(acc[mt], a[mt][2 * kk + 1][0], a[mt][2 * kk + 1][1], a[mt][2 * kk + 1][2],
                   a[mt][2 * kk + 1][3], b[2], b[3]);
        }
      }
      const int cl = nt * 8 + tig * 2;
      const float n0 = snorm[buf][cl], n1 = snorm[buf][cl + 1];
      const int c = st * kTileCents + cl;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float d0 = fmaf(-2.0f, acc[mt][2 * h], n0), d1 = fmaf(-2.0f, acc[mt][2 * h + 1], n1);
          if (d0 < best_v[mt][h]) {
            best_v[mt][h] = d0;
            best_i[mt][h] = c;
          }
          if (d1 < best_v[mt][h]) {
            best_v[mt][h] = d1;
            best_i[mt][h] = c + 1;
          }
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = best_v[mt][h];
      int i = best_i[mt][h];
#pragma unroll
      for (int m = 1; m <= 2; m <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, m);
        const int oi = __shfl_xor_sync(0xffffffffu, i, m);
        if (ov < v || (ov == v && oi < i)) {
          v = ov;
          i = oi;
        }
      }
      const int r = p0 + mt * 16 + grp + h * 8;
      if (tig == 0 && r < blk.n) {
        const int64_t g = int64_t(blk.point_begin) + r;
        labels[g] = i == 0x7fffffff ? 0 : i;
        dist2[g] = fmaxf(0.0f, xnorm[g] + v);
      }
    }
}

template <class T>
__device__ T block_sum(T x, T* scratch) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T r = 0;
  for (int w = 0; w < nw; ++w) r += scratch[w];  // same order in every thread
  return r;
}

// Counts, inertia, re-seeding of empty clusters (the farthest point of a cluster that keeps
// >= 2 members, farthest first, ties to the lower index, as the CPU's lloyd) and the member
// lists of the block's clusters (stable counting sort: ascending point ids per cluster; level
// 1 points of weight 0 join cluster 0's list without counting). One CTA per block.
//   inertia: [blocks, 2] (first, last); counts: valid members; offsets: block-local starts
__global__ void __launch_bounds__(kCountThreads) count_kernel(const KmBlock* blocks, const int32_t* k_active,
                                                              const int32_t* weights, int32_t* labels, float* dist2,
                                                              int32_t* counts, int32_t* offsets, int32_t* members,
                                                              double* inertia, int first_iteration) {
  extern __shared__ int32_t sm[];
  __shared__ double dscratch[32];
  __shared__ float fbest[32];
  __shared__ int ibest[32];
  const KmBlock blk = blocks[blockIdx.x];
  const int n = blk.n, ka = k_active[blockIdx.x];
  int32_t* lab = sm;           // [n] label, -1: weight 0
  int32_t* cnt = sm + n;       // [k]
  int32_t* cur = cnt + blk.k;  // [k] list starts, then [warps][k] per-warp counts/cursors
  int32_t* glab = labels + blk.point_begin;
  float* gd = dist2 + blk.point_begin;
  for (int c = threadIdx.x; c < blk.k; c += blockDim.x) cnt[c] = 0;
  __syncthreads();
  double in = 0;
  int invalid = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int w = weights ? weights[blk.point_begin + i] : 1;
    const int l = glab[i];
    lab[i] = w > 0 ? l : -1;
    if (w > 0) {
      atomicAdd(&cnt[l], 1);
      in += double(w) * gd[i];
    } else {
      ++invalid;
    }
  }
  in = block_sum(in, dscratch);
  const int invalid_total = int(block_sum(double(invalid), dscratch));
  if (threadIdx.x == 0) {
    if (first_iteration) inertia[2 * blockIdx.x] = in;
    inertia[2 * blockIdx.x + 1] = in;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int c = 0; c < ka; ++c) {
    if (cnt[c] != 0) continue;  // uniform: cnt changes only below, between barriers
    float bv = 0.0f;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int l = lab[i];
      if (l < 0 || cnt[l] < 2) continue;
      const float v = gd[i];
      if (v > bv || (v == bv && v > 0.0f && i < bi)) {
        bv = v;
        bi = i;
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      fbest[warp] = bv;
      ibest[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < int(blockDim.x >> 5); ++w)
        if (fbest[w] > fbest[0] || (fbest[w] == fbest[0] && ibest[w] < ibest[0])) {
          fbest[0] = fbest[w];
          ibest[0] = ibest[w];
        }
      const int p = ibest[0];
      if (fbest[0] > 0.0f && p != 0x7fffffff) {
        --cnt[lab[p]];
        lab[p] = c;
        glab[p] = c;
        gd[p] = 0.0f;
        cnt[c] = 1;
      } else {
        ibest[0] = -1;  // only duplicates left
      }
    }
    __syncthreads();
    const bool stop = ibest[0] < 0;
    __syncthreads();
    if (stop) break;
  }
  // Exclusive scan of the list lengths (cluster 0 also lists the weight-0 points) by warp 0.
  if (warp == 0) {
    const int per = (blk.k + 31) / 32, c0 = lane * per, c1 = min(blk.k, c0 + per);
    int s = 0;
    for (int c = c0; c < c1; ++c) s += cnt[c] + (c == 0 ? invalid_total : 0);
    int incl = s;
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, incl, m);
      if (lane >= m) incl += o;
    }
    int run = incl - s;
    for (int c = c0; c < c1; ++c) {
      cur[c] = run;
      offsets[blk.cluster_begin + c] = run;
      counts[blk.cluster_begin + c] = cnt[c];
      run += cnt[c] + (c == 0 ? invalid_total : 0);
    }
  }
  __syncthreads();
  // Stable scatter by all warps: warp w takes the w-th contiguous chunk of points; its
  // per-cluster counts give each warp its own starting slots (ascending order kept).
  const int nw = int(blockDim.x >> 5), chunk = (n + nw - 1) / nw;
  const int a0 = min(n, warp * chunk), a1 = min(n, a0 + chunk);
  int32_t* wrow = cur + blk.k * (1 + warp);  // [k] this warp's counts, then its cursors
  for (int c = lane; c < blk.k; c += 32) wrow[c] = 0;
  __syncwarp();
  for (int i0 = a0; i0 < a1; i0 += 32) {
    const int i = i0 + lane;
    const int l = i < a1 ? max(lab[i], 0) : -1;
    const unsigned mask = __match_any_sync(0xffffffffu, l);
    if (i < a1 && lane == __ffs(mask) - 1) wrow[l] += __popc(mask);
    __syncwarp();
  }
  __syncthreads();
  for (int c = threadIdx.x; c < blk.k; c += blockDim.x) {
    int run = cur[c];
    for (int w = 0; w < nw; ++w) {
      int32_t* x = cur + blk.k * (1 + w) + c;
      const int t = *x;
      *x = run;
      run += t;
    }
  }
  __syncthreads();
  for (int i0 = a0; i0 < a1; i0 += 32) {
    const int i = i0 + lane;
    const int l = i < a1 ? max(lab[i], 0) : -1;
    const unsigned mask = __match_any_sync(0xffffffffu, l);
    if (i < a1) members[blk.point_begin + wrow[l] + __popc(mask & ((1u << lane) - 1))] = i;
    __syncwarp();
    if (i < a1 && lane == __ffs(mask) - 1) wrow[l] += __popc(mask);
    __syncwarp();
  }
}

constexpr int kBigCluster = 128;  // longer member lists go to big_update_kernel (8 warps each)

// f64 sums of weight x point (and with final_pass weight x value: level 0 the members' cached
// values, level 1 the children's value centroids) over members [m0, m1) of a block's lists,
// in ascending order; ids, weights and value rows of 32 members are fetched one per lane,
// then 4 rows are in flight at a time. One warp.
template <int D>
__device__ __forceinline__ void sum_members(const KmBlock& blk, const KvRead& kv, const float* points,
                                            const int32_t* weights, const float* point_values,
                                            const int32_t* members, int m0, int m1, bool final_pass,
                                            double (&sk)[D / 32], double (&sv)[D / 32], int64_t& wsum) {
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31;
  const bool cache_values = final_pass && !point_values;
  for (int base = m0; base < m1; base += 32) {
    const int cnt = min(32, m1 - base);
    const int my_i = lane < cnt ? members[blk.point_begin + base + lane] : 0;
    const int my_w = lane < cnt ? (weights ? weights[int64_t(blk.point_begin) + my_i] : 1) : 0;
    const int64_t my_v = cache_values && lane < cnt ? cache_row(kv, blk.seq, blk.head, blk.token_begin + my_i) : 0;
    for (int t0 = 0; t0 < cnt; t0 += 4) {
      float x[4][V], v[4][V];
      int w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int t = min(t0 + u, cnt - 1);
        const int i = __shfl_sync(0xffffffffu, my_i, t);
        w[u] = __shfl_sync(0xffffffffu, my_w, t);
        if (t0 + u >= cnt) w[u] = 0;
        const int64_t vr = __shfl_sync(0xffffffffu, my_v, t);
        const int64_t p = int64_t(blk.point_begin) + i;
        load_f32<V>(points + p * D + lane * V, x[u]);
        if (final_pass) {
          if (point_values) {
            load_f32<V>(point_values + p * D + lane * V, v[u]);
          } else {
            load16<V>(kv.values, vr * D + lane * V, kv.f16 != 0, v[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (w[u] <= 0) continue;
        wsum += w[u];
#pragma unroll
        for (int j = 0; j < V; ++j) sk[j] += double(w[u]) * x[u][j];
        if (final_pass) {
#pragma unroll
          for (int j = 0; j < V; ++j) sv[j] += double(w[u]) * v[u][j];
        }
      }
    }
  }
}

// New centroids: the weighted mean of each cluster's members (f64 sums); a cluster without
// members keeps its centroid. With `final`, also the value centroids and sizes, and empty
// clusters get zeros (as the CPU). grid (ceil(max k / 8), blocks), one cluster per warp;
// clusters of more than kBigCluster members are listed in big / big_n for big_update_kernel
// (load balance: k-means on some data leaves a few very large clusters). The row gathers are
// latency-bound: 4 CTAs (32 warps) per SM at least.
template <int D>
__global__ void __launch_bounds__(256, 4) update_kernel(const KmBlock* blocks, KvRead kv, const float* points,
                                                     const int32_t* weights, const float* point_values,
                                                     const int32_t* counts, const int32_t* offsets,
                                                     const int32_t* members, float* cent, float* values,
                                                     int32_t* sizes, int final_pass, int2* big, int32_t* big_n) {
  constexpr int V = D / 32;
  const KmBlock blk = blocks[blockIdx.y];
  const int c = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (c >= blk.k) return;
  const int64_t g = int64_t(blk.cluster_begin) + c;
  if (!final_pass && counts[g] == 0) return;
  const int m0 = offsets[g], m1 = c + 1 < blk.k ? offsets[g + 1] : blk.n;
  if (m1 - m0 > kBigCluster) {
    if (lane == 0) big[atomicAdd(big_n, 1)] = make_int2(int(blockIdx.y), c);
    return;
  }
  double sk[V], sv[V];
#pragma unroll
  for (int i = 0; i < V; ++i) sk[i] = sv[i] = 0.0;
  int64_t wsum = 0;
  sum_members<D>(blk, kv, points, weights, point_values, members, m0, m1, final_pass != 0, sk, sv, wsum);
  const double inv = wsum > 0 ? 1.0 / double(wsum) : 0.0;
  float ck[V], cv[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    ck[j] = float(sk[j] * inv);
    cv[j] = float(sv[j] * inv);
  }
  store_f32<V>(cent + g * D + lane * V, ck);
  if (final_pass) {
    store_f32<V>(values + g * D + lane * V, cv);
    if (lane == 0) sizes[g] = int32_t(wsum);
  }
}

// The listed large clusters, one CTA each (grid-stride): warp w sums the w-th eighth of the
// member list, the eight partial sums are added in warp order (a fixed order: the result
// does not depend on which CTA takes the cluster).
template <int D>
__global__ void __launch_bounds__(256, 4) big_update_kernel(const KmBlock* blocks, KvRead kv, const float* points,
                                                         const int32_t* weights, const float* point_values,
                                                         const int32_t* offsets, const int32_t* members, float* cent,
                                                         float* values, int32_t* sizes, int final_pass,
                                                         const int2* big, const int32_t* big_n) {
  constexpr int V = D / 32;
  __shared__ double pk[8][D], pv[8][D];
  __shared__ int64_t pw[8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int total = *big_n;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int2 bc = big[t];
    const KmBlock blk = blocks[bc.x];
    const int c = bc.y;
    const int64_t g = int64_t(blk.cluster_begin) + c;
    const int m0 = offsets[g], m1 = c + 1 < blk.k ? offsets[g + 1] : blk.n, len = m1 - m0;
    double sk[V], sv[V];
#pragma unroll
    for (int i = 0; i < V; ++i) sk[i] = sv[i] = 0.0;
    int64_t wsum = 0;
    sum_members<D>(blk, kv, points, weights, point_values, members, m0 + len * warp / 8, m0 + len * (warp + 1) / 8,
                   final_pass != 0, sk, sv, wsum);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      pk[warp][lane * V + j] = sk[j];
      pv[warp][lane * V + j] = sv[j];
    }
    if (lane == 0) pw[warp] = wsum;
    __syncthreads();
    if (threadIdx.x < D) {
      const int j = threadIdx.x;
      double k = 0, v = 0;
      int64_t w = 0;
      for (int q = 0; q < 8; ++q) {
        k += pk[q][j];
        v += pv[q][j];
        w += pw[q];
      }
      const double inv = w > 0 ? 1.0 / double(w) : 0.0;
      cent[g * D + j] = float(k * inv);
      if (final_pass) {
        values[g * D + j] = float(v * inv);
        if (j == 0) sizes[g] = int32_t(w);
      }
    }
    __syncthreads();
  }
}

// The final statistics into the index: centroids converted, sizes, member lists (level 0:
// token positions; level 1: entry-local fine ids). One cluster per warp.
template <int D>
__global__ void __launch_bounds__(256) emit_kernel(const KmBlock* blocks, int level, const float* cent,
                                                   const float* values, const int32_t* sizes, const int32_t* offsets,
                                                   const int32_t* members, DeviceClusterTarget out, int key_kind,
                                                   int value_f16) {
  const KmBlock blk = blocks[blockIdx.y];
  const int c = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (c >= blk.k) return;
  const int64_t g = int64_t(blk.cluster_begin) + c, dc = int64_t(blk.dev_cluster) + c;
  const int m0 = offsets[g], m1 = c + 1 < blk.k ? offsets[g + 1] : blk.n;
  for (int j = lane; j < D; j += 32) {
    const float k = cent[g * D + j], v = values[g * D + j];
    if (key_kind == 0)
      static_cast<float*>(out.key_centroids)[dc * D + j] = k;
    else if (key_kind == 1)
      static_cast<__nv_bfloat16*>(out.key_centroids)[dc * D + j] = __float2bfloat16_rn(k);
    else
      static_cast<__half*>(out.key_centroids)[dc * D + j] = __float2half_rn(k);
    if (value_f16)
      static_cast<__half*>(out.value_centroids)[dc * D + j] = __float2half_rn(v);
    else
      static_cast<__nv_bfloat16*>(out.value_centroids)[dc * D + j] = __float2bfloat16_rn(v);
  }
  if (lane == 0) {
    out.sizes[dc] = sizes[g];
    out.member_begin[dc] = blk.dev_member + m0;
  }
  for (int m = m0 + lane; m < m1; m += 32) {
    const int i = members[blk.point_begin + m];
    out.members[blk.dev_member + m] = level == 0 ? blk.token_begin + i : blk.fine_local + i;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void km_gather(int d, const KvRead& kv, const KmEntry* entries, int num_entries, int max_count,
               const double* inv_freq, int half, int sinks, float* points, Stream s) {
  const dim3 grid(unsigned(cdiv(max_count, 8)), unsigned(num_entries));
  auto* kern = d == 64 ? gather_kernel<64> : gather_kernel<128>;
  kern<<<grid, 256, 0, s>>>(kv, entries, inv_freq, half, sinks, points);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_mean(int d, int blocks, const KmBlock* b, const float* points, float* mean, Stream s) {
  auto* kern = d == 64 ? mean_kernel<64> : mean_kernel<128>;
  kern<<<blocks, 1024, 0, s>>>(b, points, mean);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_init(int blocks, int max_n, int max_k, const KmBlock* b, int level, int d, const float* points,
             const int32_t* weights, uint64_t* rng, float* cent, int32_t* k_active, Stream s) {
  const size_t smem = (size_t(max_n) + size_t(max_k)) * 4;
  MP_CUDA_CHECK(cudaFuncSetAttribute(init_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  init_kernel<<<blocks, 256, smem, s>>>(b, level, d, points, weights, max_k, rng, cent, k_active);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_prep(int d, int blocks, int max_rows, const KmBlock* b, const int32_t* k_active, bool by_points,
             const float* src, const float* mean, void* dst, float* norm, Stream s) {
  const dim3 grid(unsigned(cdiv(max_rows, 8)), unsigned(blocks));
  auto* kern = d == 64 ? prep_kernel<64> : prep_kernel<128>;
  kern<<<grid, 256, 0, s>>>(b, k_active, by_points, src, mean, static_cast<__half*>(dst), norm);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_assign(int d, int tiles, const KmBlock* b, const KmTile* t, const void* xb, const float* xnorm,
               const void* centb, const float* cnorm, int32_t* labels, float* dist2, Stream s) {
  auto* kern = d == 64 ? assign_kernel<64> : assign_kernel<128>;
  kern<<<tiles, 128, 0, s>>>(b, t, static_cast<const __half*>(xb), xnorm, static_cast<const __half*>(centb), cnorm,
                             labels, dist2);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_count(int blocks, int max_n, int max_k, const KmBlock* b, const int32_t* k_active, const int32_t* weights,
              int32_t* labels, float* dist2, int32_t* counts, int32_t* offsets, int32_t* members, double* inertia,
              bool first_iteration, Stream s) {
  const size_t smem = (size_t(max_n) + (2 + kCountThreads / 32) * size_t(max_k)) * 4;
  MP_CUDA_CHECK(cudaFuncSetAttribute(count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  count_kernel<<<blocks, kCountThreads, smem, s>>>(b, k_active, weights, labels, dist2, counts, offsets, members,
                                                   inertia, first_iteration ? 1 : 0);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_update(int d, int blocks, int max_k, const KmBlock* b, const KvRead& kv, const float* points,
               const int32_t* weights, const float* point_values, const int32_t* counts, const int32_t* offsets,
               const int32_t* members, float* cent, float* values, int32_t* sizes, bool final_pass, void* big,
               int32_t* big_n, int sms, Stream s) {
  MP_CUDA_CHECK(cudaMemsetAsync(big_n, 0, 4, s));
  const dim3 grid(unsigned(cdiv(max_k, 8)), unsigned(blocks));
  auto* kern = d == 64 ? update_kernel<64> : update_kernel<128>;
  kern<<<grid, 256, 0, s>>>(b, kv, points, weights, point_values, counts, offsets, members, cent, values, sizes,
                            final_pass ? 1 : 0, static_cast<int2*>(big), big_n);
  MP_CUDA_CHECK(cudaGetLastError());
  auto* big_kern = d == 64 ? big_update_kernel<64> : big_update_kernel<128>;
  // Enough CTAs to fill every SM (the row gathers are latency-bound); grid-stride beyond.
  big_kern<<<8 * sms, 256, 0, s>>>(b, kv, points, weights, point_values, offsets, members, cent, values, sizes,
                                   final_pass ? 1 : 0, static_cast<const int2*>(big), big_n);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_emit(int d, int blocks, int max_k, const KmBlock* b, int level, const float* cent, const float* values,
             const int32_t* sizes, const int32_t* offsets, const int32_t* members, const DeviceClusterTarget& out,
             int key_kind, bool value_f16, Stream s) {
  const dim3 grid(unsigned(cdiv(max_k, 8)), unsigned(blocks));
  auto* kern = d == 64 ? emit_kernel<64> : emit_kernel<128>;
  kern<<<grid, 256, 0, s>>>(b, level, cent, values, sizes, offsets, members, out, key_kind, value_f16 ? 1 : 0);
  MP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace multipole::cuda::detail
