// Prefill k-means on the GPU (include/multipole/cuda/kmeans.hpp): gather + unrotation of the
// clustering keys, per-block initialisation by the CPU's Rng, Lloyd iterations (f16 mma on centred data
// distances fused with the argmin; counts, re-seeding and member lists in one CTA per block;
// f64 centroid sums over the members), and the write-out into a DeviceClusterIndex.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "cuda/check.hpp"
#include "cuda/common.cuh"
#include "cuda/kmeans_assign.cuh"
#include "cuda/kmeans_launch.hpp"

namespace multipole::cuda::detail {

namespace {

constexpr int kCountThreads = 1024;

// Cache row of token `pos` of a sequence, its page id given or looked up.
__device__ __forceinline__ int64_t page_row(const KvRead& kv, int page, int head, int pos) {
  return (int64_t(page) * kv.num_kv_heads + head) * kv.page_size + pos % kv.page_size;
}
__device__ __forceinline__ int64_t cache_row(const KvRead& kv, int seq, int head, int pos) {
  return page_row(kv, kv.tables[kv.table_offset[seq] + pos / kv.page_size], head, pos);
}

// A cache element's 16 bits (f16 or bf16) -> float. Both conversions and a select: a branch
// here gets loops unswitched on f16 (two copies of each loop's code).
__device__ __forceinline__ float half_or_bf16(uint16_t raw, bool f16) {
  const float h = MmaType<__half>::lo(raw), b = MmaType<__nv_bfloat16>::lo(raw);
  return f16 ? h : b;
}

// V consecutive 16-bit elements of a cache row as they are stored (one 4- or 8-byte access).
template <int V>
using Raw16 = std::conditional_t<V == 4, uint2, uint32_t>;
template <int V>
__device__ __forceinline__ Raw16<V> load_raw16(const std::byte* base, int64_t elem) {
  return *reinterpret_cast<const Raw16<V>*>(reinterpret_cast<const uint16_t*>(base) + elem);
}

// V consecutive 16-bit elements of a cache row -> floats.
template <int V>
__device__ __forceinline__ void load16(const std::byte* base, int64_t elem, bool f16, float (&out)[V]) {
  const Raw16<V> u = load_raw16<V>(base, elem);
  uint16_t raw[V];
  memcpy(raw, &u, sizeof(u));
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = half_or_bf16(raw[i], f16);
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

// ---- kernels --------------------------------------------------------------------------------

// Rotates a warp's cached key of token `pos` back to position 0, as the CPU's
// unrotate_consecutive: pairs (i, i + half), angle -pos * inv_freq[i] (reduced_angle, then
// sin/cos in f32). x: the lane's V = D / 32 consecutive elements, in and out; row: the warp's
// [D] floats of shared memory.
template <int D>
__device__ __forceinline__ void warp_unrotate(int pos, const double* inv_freq, int half, float* row,
                                              float (&x)[D / 32]) {
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < V; ++i) row[lane * V + i] = x[i];
  __syncwarp();
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int j = lane * V + i;
    if (j < 2 * half) {
      const int f = j < half ? j : j - half;
      float sf, cf;
      sincosf(reduced_angle(double(pos), inv_freq[f]), &sf, &cf);
      sf = -sf;  // angle -pos * f
      const float a = row[f], b = row[f + half];
      x[i] = j < half ? a * cf - b * sf : b * cf + a * sf;
    }
  }
  __syncwarp();  // the row may be reused
}

// Clustering key of token `pos` (its cached key rotated back to position 0) into x, by one
// warp (see warp_unrotate).
template <int D>
__device__ __forceinline__ void warp_k0(const KvRead& kv, int seq, int head, int pos, const double* inv_freq, int half,
                                        float* row, float (&x)[D / 32]) {
  load16<D / 32>(kv.keys, cache_row(kv, seq, head, pos) * D + (threadIdx.x & 31) * (D / 32), kv.f16 != 0, x);
  warp_unrotate<D>(pos, inv_freq, half, row, x);
}

// Clustering keys of every clustered token, f32. grid (ceil(max count / 8), entries), 8
// warps, one token per warp.
template <int D>
__global__ void __launch_bounds__(256) gather_kernel(KvRead kv, const KmEntry* entries, const double* inv_freq,
                                                     int half, int sinks, float* points) {
  constexpr int V = D / 32;
  __shared__ float row[8][D];
  const KmEntry e = entries[blockIdx.y];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * 8 + warp;
  if (t >= e.count) return;
  float x[V];
  warp_k0<D>(kv, e.seq, e.head, sinks + t, inv_freq, half, row[warp], x);
  store_f32<V>(points + (e.point_begin + int64_t(t)) * D + lane * V, x);
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
    int run = warp_inclusive_sum(s) - s;
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

// f64 sums of weight x point (and with kFinal weight x value: level 0 the members' cached
// values, level 1 the children's value centroids) over members [m0, m1) of a block's lists,
// in ascending order; ids, weights and value rows of 32 members are fetched one per lane,
// then U rows are in flight at a time (the sums do not depend on U). One warp.
template <int D, int U, bool kFinal>
__device__ __forceinline__ void sum_members(const KmBlock& blk, const KvRead& kv, const float* points,
                                            const int32_t* weights, const float* point_values,
                                            const int32_t* members, int m0, int m1,
                                            double (&sk)[D / 32], double (&sv)[D / 32], int64_t& wsum) {
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31;
  const bool cache_values = kFinal && !point_values;
  for (int base = m0; base < m1; base += 32) {
    const int cnt = min(32, m1 - base);
    const int my_i = lane < cnt ? members[blk.point_begin + base + lane] : 0;
    const int my_w = lane < cnt ? (weights ? weights[int64_t(blk.point_begin) + my_i] : 1) : 0;
    const int64_t my_v = cache_values && lane < cnt ? cache_row(kv, blk.seq, blk.head, blk.token_begin + my_i) : 0;
    for (int t0 = 0; t0 < cnt; t0 += U) {
      float x[U][V], v[kFinal ? U : 1][V];
      int w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = min(t0 + u, cnt - 1);
        const int i = __shfl_sync(0xffffffffu, my_i, t);
        w[u] = __shfl_sync(0xffffffffu, my_w, t);
        if (t0 + u >= cnt) w[u] = 0;
        const int64_t vr = __shfl_sync(0xffffffffu, my_v, t);
        const int64_t p = int64_t(blk.point_begin) + i;
        load_f32<V>(points + p * D + lane * V, x[u]);
        if constexpr (kFinal) {
          if (point_values) {
            load_f32<V>(point_values + p * D + lane * V, v[u]);
          } else {
            load16<V>(kv.values, vr * D + lane * V, kv.f16 != 0, v[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (w[u] <= 0) continue;
        wsum += w[u];
#pragma unroll
        for (int j = 0; j < V; ++j) sk[j] += double(w[u]) * x[u][j];
        if constexpr (kFinal) {
#pragma unroll
          for (int j = 0; j < V; ++j) sv[j] += double(w[u]) * v[u][j];
        }
      }
    }
  }
}

// The Lloyd passes before the last read only the points: 8 rows in flight (the final pass
// also reads values, 4 keep it within the registers of 4 CTAs per SM).
template <int D>
__device__ __forceinline__ void sum_members_pass(const KmBlock& blk, const KvRead& kv, const float* points,
                                                 const int32_t* weights, const float* point_values,
                                                 const int32_t* members, int m0, int m1, bool final_pass,
                                                 double (&sk)[D / 32], double (&sv)[D / 32], int64_t& wsum) {
  if (final_pass)
    sum_members<D, 4, true>(blk, kv, points, weights, point_values, members, m0, m1, sk, sv, wsum);
  else
    sum_members<D, 8, false>(blk, kv, points, weights, point_values, members, m0, m1, sk, sv, wsum);
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
  sum_members_pass<D>(blk, kv, points, weights, point_values, members, m0, m1, final_pass != 0, sk, sv, wsum);
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
    sum_members_pass<D>(blk, kv, points, weights, point_values, members, m0 + len * warp / 8,
                        m0 + len * (warp + 1) / 8, final_pass != 0, sk, sv, wsum);
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

// Element i of a key and a value centroid of the index, converted (key_kind 0 f32, 1 bf16,
// 2 f16; values bf16 or f16).
__device__ __forceinline__ void put_centroid(const DeviceClusterTarget& out, int64_t i, float k, float v, int key_kind,
                                             int value_f16) {
  if (key_kind == 0)
    static_cast<float*>(out.key_centroids)[i] = k;
  else if (key_kind == 1)
    static_cast<__nv_bfloat16*>(out.key_centroids)[i] = __float2bfloat16_rn(k);
  else
    static_cast<__half*>(out.key_centroids)[i] = __float2half_rn(k);
  if (value_f16)
    static_cast<__half*>(out.value_centroids)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(out.value_centroids)[i] = __float2bfloat16_rn(v);
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
  for (int j = lane; j < D; j += 32) put_centroid(out, dc * D + j, cent[g * D + j], values[g * D + j], key_kind, value_f16);
  if (lane == 0) {
    out.sizes[dc] = sizes[g];
    out.member_begin[dc] = blk.dev_member + m0;
  }
  for (int m = m0 + lane; m < m1; m += 32) {
    const int i = members[blk.point_begin + m];
    out.members[blk.dev_member + m] = level == 0 ? blk.token_begin + i : blk.fine_local + i;
  }
}

// ---- online update -------------------------------------------------------------------------

// 16 warps: the update is one CTA per entry, and its per-cluster phases (statistics, token
// lists, coarse recompute) gained 20-40% over 8 warps (gpu-notes item 31).
constexpr int kOnlineThreads = 512;
constexpr int kBatch = 4;  // independent global loads issued together in the latency-bound loops

// In-place exclusive prefix sum of a[0, n) in shared memory by the whole CTA; returns the
// total. tmp: [kOnlineThreads / 32 + 1] ints of shared memory.
__device__ int block_exclusive_scan(int* a, int n, int* tmp) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (n + kOnlineThreads - 1) / kOnlineThreads, lo = min(n, tid * per), hi = min(n, lo + per);
  int mine = 0;
  for (int i = lo; i < hi; ++i) mine += a[i];
  const int incl = warp_inclusive_sum(mine);
  if (lane == 31) tmp[warp] = incl;
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int w = 0; w < kOnlineThreads / 32; ++w) {
      const int x = tmp[w];
      tmp[w] = run;
      run += x;
    }
    tmp[kOnlineThreads / 32] = run;
  }
  __syncthreads();
  int at = tmp[warp] + incl - mine;
  for (int i = lo; i < hi; ++i) {
    const int x = a[i];
    a[i] = at;
    at += x;
  }
  const int total = tmp[kOnlineThreads / 32];
  __syncthreads();
  return total;
}

// The f32 centroid the index holds for a fine cluster of `size` tokens with f64 sum `sum`
// (the CPU's float(sum * (1.0 / size)); 0 when empty).
__device__ __forceinline__ float mean_of(double sum, int size) {
  return size > 0 ? float(sum * (1.0 / double(size))) : 0.0f;
}

// Entry-local ids -> index ids / member slots.
struct OnlineEntry {
  KmOpen o;
  __device__ int64_t fine(int f) const { return int64_t(o.cluster_base) + o.coarse_cap + f; }
  __device__ int64_t coarse(int p) const { return int64_t(o.cluster_base) + p; }
  __device__ int64_t token_lists(int sinks) const { return int64_t(o.member_base) + o.child_cap + (o.begin - sinks); }
};

template <int D>
__device__ void online_norms(const float* cent, float* cnorm, const int* cols, int n);

// Open-block state from the index (after a build or an upload). One CTA per entry.
template <int D>
__global__ void __launch_bounds__(kOnlineThreads) online_init_kernel(KvRead kv, const double* inv_freq, int half,
                                                                      KmOnlineDims dims, KmOnlineBuffers buf,
                                                                      DeviceClusterTarget out, int key_kind,
                                                                      int value_f16) {
  constexpr int V = D / 32, W = kOnlineThreads / 32;
  __shared__ float row[W][D];
  const int e = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const OnlineEntry en{buf.open[e]};
  const KmOpen& o = en.o;
  // Placeholders: coarse slots past the used ones (their lists start where the used end).
  for (int p = o.last1 + tid; p < o.coarse_cap; p += kOnlineThreads) {
    out.sizes[en.coarse(p)] = 0;
    out.member_begin[en.coarse(p)] = o.member_base + o.last0;
  }
  for (int64_t x = int64_t(o.last1) * D + tid; x < int64_t(o.coarse_cap) * D; x += kOnlineThreads)
    put_centroid(out, en.coarse(0) * D + x, 0.0f, 0.0f, key_kind, value_f16);
  if (!o.has_block) return;
  const int k = o.last0 - o.first0;
  double* ks = buf.key_sums + int64_t(e) * dims.ko * D;
  double* vs = buf.value_sums + int64_t(e) * dims.ko * D;
  int32_t* parents = buf.parents + int64_t(e) * dims.ko;
  float* cent = buf.cent + int64_t(e) * dims.ko * D;
  // f64 sums of the open fine clusters over their members (ascending); cent / cnorm: the
  // stored f32 means the update starts from.
  for (int c = warp; c < k; c += W) {
    const int64_t f = en.fine(o.first0 + c);
    const int mb = out.member_begin[f], n = out.sizes[f];
    double sk[V] = {}, sv[V] = {};
    for (int m = 0; m < n; ++m) {
      const int t = out.members[mb + m];
      float x[V], v[V];
      warp_k0<D>(kv, o.seq, o.head, t, inv_freq, half, row[warp], x);
      load16<V>(kv.values, cache_row(kv, o.seq, o.head, t) * D + lane * V, kv.f16 != 0, v);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sk[i] += x[i];
        sv[i] += v[i];
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      ks[int64_t(c) * D + lane * V + i] = sk[i];
      vs[int64_t(c) * D + lane * V + i] = sv[i];
      cent[int64_t(c) * D + lane * V + i] = mean_of(sk[i], n);
    }
  }
  __syncthreads();
  online_norms<D>(cent, buf.cnorm + int64_t(e) * dims.ko, nullptr, k);
  if (o.coarse_cap == 0) return;
  // Parents from the open coarse clusters' child lists.
  for (int p = o.first1 + tid; p < o.last1; p += kOnlineThreads) {
    const int b0 = out.member_begin[en.coarse(p)];
    const int b1 = p + 1 < o.last1 ? out.member_begin[en.coarse(p + 1)] : o.member_base + o.last0;
    for (int m = b0; m < b1; ++m) parents[out.members[m] - o.first0] = p - o.first1;
  }
  __syncthreads();
  // f32 coarse keys as recompute_from_children gives them (size-weighted f32 child means).
  float* ck = buf.coarse_keys + int64_t(e) * dims.ko1 * D;
  for (int p = warp; p < o.last1 - o.first1; p += W) {
    double acc[V] = {};
    int64_t size = 0;
    for (int c = 0; c < k; ++c) {
      if (parents[c] != p) continue;
      const int n = out.sizes[en.fine(o.first0 + c)];
      if (n == 0) continue;
      size += n;
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += double(n) * mean_of(ks[int64_t(c) * D + lane * V + i], n);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) ck[int64_t(p) * D + lane * V + i] = size > 0 ? float(acc[i] * (1.0 / double(size))) : 0.0f;
  }
}

// Row stride (floats) of the chunk's keys and of the centroid tile in shared memory: the
// distances' float2 fragment loads (lane (g, t) at row g, column 2 t) hit banks 8 g + 2 t,
// distinct within each half warp; a tile's two bf16 planes of D / 2 + 4 words per row fill
// the same 64 rows.
__host__ __device__ constexpr int online_row(int d) { return d + 8; }

// Shared memory of the update kernel, carved from one dynamic allocation.
struct OnlineSmem {
  float* X;      // [window, D + 8] clustering keys of the chunk (padded rows: see online_row)
  uint16_t* Vs;  // [window, D] values of the chunk, the cache's 16-bit bits
  float* T;      // [64, D + 8] a tile of centroids (or its bf16 planes: CentroidTile)
  float* xnorm;  // [window] ||x||^2
  float* dist2;  // [window] squared distance to the own centroid
  int *lab, *used, *items, *seeds, *tl, *rk;                  // [window]
  int *cnt, *moved_at, *moved, *osize, *st, *noff, *oo, *par;  // [ko]
  int *ccnt, *coff, *tch;                                      // [ko1]
  int* tmp;                                                    // [kOnlineThreads / 32 + 1]

  __host__ __device__ static size_t bytes(int d, const KmOnlineDims& m) {
    return (size_t(m.window + 64) * online_row(d) + size_t(m.window) * d / 2 + 8 * size_t(m.window) +
            8 * size_t(m.ko) + 3 * size_t(m.ko1) + kOnlineThreads / 32 + 1) *
           4;
  }
  __device__ OnlineSmem(void* raw, int d, const KmOnlineDims& m) {
    float* f = static_cast<float*>(raw);
    X = f, f += m.window * online_row(d);
    Vs = reinterpret_cast<uint16_t*>(f), f += m.window * d / 2;  // (d / 2 % 4 == 0: T stays 16-byte aligned)
    T = f, f += 64 * online_row(d);
    xnorm = f, f += m.window;
    dist2 = f, f += m.window;
    int* p = reinterpret_cast<int*>(f);
    for (int** a : {&lab, &used, &items, &seeds, &tl, &rk}) *a = p, p += m.window;
    for (int** a : {&cnt, &moved_at, &moved, &osize, &st, &noff, &oo, &par}) *a = p, p += m.ko;
    for (int** a : {&ccnt, &coff, &tch}) *a = p, p += m.ko1;
    tmp = p;
  }
};

// Rows c0 .. c0 + 63 of the centroids cent [*, D] (row cols[c] for column c when cols is
// given; zeros from column n on), in a shared tile of rows padded to online_row(D): fetched
// into registers by coalesced float4 loads (all of a thread's issued together), then stored
// to sm.T, or with kSplit as x = hi + lo in bf16 (rounded to nearest), two planes of D / 2 + 4
// words per row (bf16 pairs): hi from sm.T on, lo after 64 rows of it. Store between barriers.
template <int D>
struct CentroidTile {
  static constexpr int Q = D / 4, PER = 64 * Q / kOnlineThreads;  // float4 per row, per thread
  static_assert(64 * Q % kOnlineThreads == 0, "a tile is whole float4s per thread");
  float4 r[PER];

  __device__ void fetch(const float* cent, const int* cols, int c0, int n) {
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int x = threadIdx.x + u * kOnlineThreads, c = c0 + x / Q;
      r[u] = c < n ? reinterpret_cast<const float4*>(cent)[int64_t(cols ? cols[c] : c) * Q + x % Q]
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  template <bool kSplit>
  __device__ void store(const OnlineSmem& sm) const {
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int x = threadIdx.x + u * kOnlineThreads;
      if constexpr (kSplit) {
        constexpr int TW = D / 2 + 4;  // words per row of a plane
        uint32_t* hi = reinterpret_cast<uint32_t*>(sm.T) + (x / Q) * TW + 2 * (x % Q);
        float a = r[u].x, b = r[u].y, c = r[u].z, d = r[u].w;
        const uint32_t h0 = peel_part<__nv_bfloat16>(a, b), h1 = peel_part<__nv_bfloat16>(c, d);
        *reinterpret_cast<uint2*>(hi) = make_uint2(h0, h1);
        *reinterpret_cast<uint2*>(hi + 64 * TW) =
            make_uint2(peel_part<__nv_bfloat16>(a, b), peel_part<__nv_bfloat16>(c, d));
      } else {
        *reinterpret_cast<float4*>(sm.T + (x / Q) * online_row(D) + 4 * (x % Q)) = r[u];
      }
    }
  }
};

// dist[i * ko + c] = ||c||^2 - 2 x_i.c for the chunk's tokens i and the columns cols[0, n)
// (all of [0, n) when cols is null). x.c on tensor cores, 3xBF16: with x = hi + lo (bf16,
// rounded), hi * hi + hi * lo + lo * hi in f32 accumulators leaves ~2^-16 of |x| |c| (hi * hi
// alone: 2^-8); 3xTF32 (~2^-21) took 75-77 us of a dearest update's distances against 58 us
// (gpu-notes item 40). The CPU sums in f32, in dimension order: labels agree but for
// near-ties. Per 64-column tile (split once as it is loaded), warp w holds the m16 tile of
// tokens 16 (w % 8) .. and the four n8 tiles of columns 32 (w / 8) ..; A fragments are split
// from the keys' f32 rows, B fragments read from the tile's planes (words 4 g + t of a row
// group: conflict-free). Tiles first_tile, first_tile + tile_step, ...: the CTAs of a
// cluster share them.
template <int D>
__device__ void online_distances(const OnlineSmem& sm, int count, const float* cent, const float* cnorm,
                                 const int* cols, int n, float* dist, int ko, int first_tile, int tile_step) {
  constexpr int DP = online_row(D), TW = D / 2 + 4;
  using M = MmaType<__nv_bfloat16>;
  static_assert(kOnlineThreads == 512, "16 warps: 8 token tiles x 2 column halves (window <= 128)");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = (warp & 7) * 16, nb = (warp >> 3) * 32;  // the warp's tokens, its columns in a tile
  for (int c0 = 64 * first_tile; c0 < n; c0 += 64 * tile_step) {
    CentroidTile<D> tile;
    tile.fetch(cent, cols, c0, n);
    __syncthreads();  // the tile is free
    tile.store<true>(sm);
    __syncthreads();
    if (m0 >= count || c0 + nb >= n) continue;
    // The norms of the lane's columns, loaded now: ready when the products are.
    float cn[4][2];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = c0 + nb + 8 * q + 2 * t + h;
        cn[q][h] = c < n ? cnorm[cols ? cols[c] : c] : 0.0f;
      }
    float acc[4][4] = {};
    const float* xa = sm.X + (m0 + g) * DP + 2 * t;  // (rows past count: garbage in rows never stored)
    const uint32_t* bh = reinterpret_cast<const uint32_t*>(sm.T) + (nb + g) * TW + t;
    const uint32_t* bl = bh + 64 * TW;
#pragma unroll 2
    for (int j = 0; j < D; j += 16) {
      uint32_t ah[4], al[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // a0..a3: (g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)
        float2 x = *reinterpret_cast<const float2*>(xa + (r & 1) * 8 * DP + j + (r >> 1) * 8);
        ah[r] = peel_part<__nv_bfloat16>(x.x, x.y);
        al[r] = peel_part<__nv_bfloat16>(x.x, x.y);
      }
      uint32_t b[2][4][2];  // [hi, lo][n8 tile][k half]
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          b[0][q][h] = bh[q * 8 * TW + j / 2 + 4 * h];
          b[1][q][h] = bl[q * 8 * TW + j / 2 + 4 * h];
        }
      // Term by term over the four n8 tiles, so that consecutive mmas are independent.
#pragma unroll
      for (int q = 0; q < 4; ++q) M::mma16816(acc[q], al, b[0][q][0], b[0][q][1]);  // the small terms first
#pragma unroll
      for (int q = 0; q < 4; ++q) M::mma16816(acc[q], ah, b[1][q][0], b[1][q][1]);
#pragma unroll
      for (int q = 0; q < 4; ++q) M::mma16816(acc[q], ah, b[0][q][0], b[0][q][1]);
    }
    // Accumulator e of n8 tile q: token m0 + g + 8 (e / 2), column c0 + nb + 8 q + 2 t + e % 2.
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + g + 8 * (e >> 1), c = c0 + nb + 8 * q + 2 * t + (e & 1);
        if (i < count && c < n) dist[int64_t(i) * ko + (cols ? cols[c] : c)] = fmaf(-2.0f, acc[q][e], cn[q][e & 1]);
      }
  }
  __syncthreads();
}

// Minimum of (value, index) over each group of kWidth consecutive lanes, the lowest index on
// ties; every lane of the group gets it.
template <int kWidth = 32>
__device__ __forceinline__ void warp_argmin(float& bv, int& bi) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int ob = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov < bv || (ov == bv && ob < bi)) bv = ov, bi = ob;
  }
}

// Stable counting sort by one warp (32 items at a time): item i of [0, n) with key key(i)
// (in [0, keys)) goes to out[cursor[key] ++]; cursor: [keys] shared, the keys' start
// offsets on entry, their ends on exit. place(i, position) is called for every item.
template <class Key, class Place>
__device__ void warp_counting_sort(int n, int* cursor, Key key, Place place) {
  const int lane = threadIdx.x & 31;
  for (int i0 = 0; i0 < n; i0 += 32) {
    const int i = i0 + lane;
    const int c = i < n ? key(i) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, c), below = peers & ((1u << lane) - 1);
    if (i < n) place(i, cursor[c] + __popc(below));
    __syncwarp();
    if (i < n && below == 0) cursor[c] += __popc(peers);
    __syncwarp();
  }
}

// Nearest of the k columns of each token's distance row (lowest index on ties). The rows are
// in global memory (L2): four lanes a token (a warp 8 tokens, the CTA the whole window at
// once), each lane's float4 loads kU at a time (one warp a token, two tokens at a time, took
// 17.8 us of the dearest update, this 15.5: gpu-notes item 41).
__device__ void online_argmin(const OnlineSmem& sm, const float* dist, int ko, int k, int count) {
  constexpr int L = 4, kU = 8;  // lanes a token, loads in flight a lane
  const int sub = threadIdx.x % L, nq = (k + 3) / 4;
  for (int i0 = (threadIdx.x >> 5) * (32 / L); i0 < count; i0 += kOnlineThreads / L) {
    const int i = i0 + threadIdx.x % 32 / L;  // the warp's 8 tokens from i0 (all lanes stay for the shuffles)
    const float4* row = reinterpret_cast<const float4*>(dist + int64_t(min(i, count - 1)) * ko);  // ko % 4 == 0
    float bv = __int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int q0 = sub; q0 < nq; q0 += L * kU) {  // columns ascending per lane: strict < keeps the lowest
      float4 v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) v[u] = q0 + L * u < nq ? row[q0 + L * u] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int q = q0 + L * u;
        const float w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int t = 0; t < 4; ++t)
          if (q < nq && 4 * q + t < k && w[t] < bv) bv = w[t], bi = 4 * q + t;
      }
    }
    warp_argmin<L>(bv, bi);
    if (sub == 0 && i < count) {
      sm.lab[i] = bi;
      sm.dist2[i] = fmaxf(0.0f, sm.xnorm[i] + bv);
    }
  }
  __syncthreads();
}

// ||c||^2 of the listed centroids (all of [0, n) when cols is null), one warp per centroid.
template <int D>
__device__ void online_norms(const float* cent, float* cnorm, const int* cols, int n) {  // declared above
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int U = 4;  // centroids per warp at a time, their loads first
  for (int m0 = warp * U; m0 < n; m0 += U * (kOnlineThreads / 32)) {
    float x[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int m = m0 + u, c = m < n ? (cols ? cols[m] : m) : 0;
#pragma unroll
      for (int i = 0; i < V; ++i) x[u][i] = m < n ? cent[int64_t(c) * D + lane * V + i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < V; ++i) s = fmaf(x[u][i], x[u][i], s);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && m0 + u < n) cnorm[cols ? cols[m0 + u] : m0 + u] = s;
    }
  }
  __syncthreads();
}

// Phase-clock slots of online_update_kernel (KmOnlineBuffers::prof).
enum : int {
  kUpdLoad = 0, kUpdFirstRound = 1, kUpdRounds = 2, kUpdLists = 3, kUpdStats = 4, kUpdTokenLists = 5,
  kUpdParents = 6, kUpdChildLists = 7, kUpdCoarse = 8, kUpdNorms = 9, kUpdDistances = 10, kUpdArgmin = 11
};

// One online update chunk of one entry (ClusterIndex::append_chunk): the chunk's tokens join
// the open block. One thread-block cluster per entry: one CTA, or 2 or 4 where the device holds
// all the batch's clusters at once (DeviceKMeans::append). The cluster's first CTA does the
// update; the others load the chunk's keys as it does and then only compute the distance tiles
// it hands them (on one SM the tensor-core distances were the largest phase: gpu-notes items
// 40-42). kSpread = false: the one-CTA kernel, without the others' path (whose code made it
// spill 212 bytes, not 44). Chunk count 0: nothing to do.
template <int D, bool kSpread>
__global__ void __launch_bounds__(kOnlineThreads) online_update_kernel(KvRead kv, const double* inv_freq, int half,
                                                                        KmOnlineDims dims, KmOnlineBuffers buf,
                                                                        const KmChunk* chunks, DeviceClusterTarget out,
                                                                        int key_kind, int value_f16) {
  constexpr int V = D / 32, NW = kOnlineThreads / 32, DP = online_row(D), T = kOnlineThreads;
  extern __shared__ __align__(16) unsigned char online_smem[];
  __shared__ KmOpen so;
  __shared__ int s_nmoved, s_add1;
  __shared__ uint64_t s_rng[4];
  __shared__ int s_cmd[2];  // the first CTA's order to the others: columns (-1: stop), listed (sm.moved) or not
  namespace cg = cooperative_groups;
  const int split = kSpread ? int(cg::this_cluster().num_blocks()) : 1;
  const int rank = kSpread ? int(cg::this_cluster().block_rank()) : 0;
  const int e = blockIdx.x / split, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const KmChunk ch = chunks[e];
  if (ch.count <= 0) return;  // (the whole cluster)
  PhaseClock pc(rank == 0 ? buf.prof : nullptr);
  const OnlineSmem sm(online_smem, D, dims);
  if (tid == 0) {
    so = buf.open[e];
    if (!so.has_block || so.end - so.begin >= dims.block_size) {  // freeze the open block, start a new one
      so.has_block = 1;
      so.begin = so.end;
      so.first0 = so.last0;
      so.first1 = so.last1;
    }
  }
  __syncthreads();
  const OnlineEntry en{so};
  const KmOpen& o = en.o;
  const int count = ch.count, a = ch.a;
  const int n0 = o.end - o.begin, n1 = n0 + count, t0 = dims.t0;
  const int k_old = o.last0 - o.first0;
  const int k_add = min(count, (n1 + t0 - 1) / t0 - (n0 + t0 - 1) / t0);
  const int k = k_old + k_add;
  double* ks = buf.key_sums + int64_t(e) * dims.ko * D;
  double* vs = buf.value_sums + int64_t(e) * dims.ko * D;
  int32_t* parents = buf.parents + int64_t(e) * dims.ko;
  float* ck = buf.coarse_keys + int64_t(e) * dims.ko1 * D;
  float* cent = buf.cent + int64_t(e) * dims.ko * D;
  float* cnorm = buf.cnorm + int64_t(e) * dims.ko;
  float* dist = buf.dist + int64_t(e) * dims.window * dims.ko;
  int32_t* scratch = buf.scratch + int64_t(e) * dims.to;

  // 1. The chunk's clustering keys, values and norms; seeds drawn by the CPU's Rng. All page
  // ids are looked up first (tl: free until the lists), then each warp has the rows of U
  // tokens in flight (one token at a time was a chain of dependent loads per token); the
  // keys are un-rotated in place afterwards (one copy of that code: sincosf is long).
  for (int i = tid; i < count; i += T) sm.tl[i] = kv.tables[kv.table_offset[o.seq] + (a + i) / kv.page_size];
  __syncthreads();
  constexpr int U = 4;
  for (int i0 = warp; i0 < count; i0 += U * NW) {
    float x[U][V];
    Raw16<V> y[U];  // a lane's V values, kept as the cache's bits
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = min(i0 + u * NW, count - 1);  // (past the end: a repeat load, unused)
      const int64_t r = page_row(kv, sm.tl[i], o.head, a + i) * D + lane * V;
      load16<V>(kv.keys, r, kv.f16 != 0, x[u]);
      y[u] = load_raw16<V>(kv.values, r);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * NW;
      if (i >= count) break;
      store_f32<V>(sm.X + i * DP + lane * V, x[u]);
      *reinterpret_cast<Raw16<V>*>(sm.Vs + i * D + lane * V) = y[u];
    }
  }
  __syncwarp();
#pragma unroll 1
  for (int i = warp; i < count; i += NW) {
    float x[V];
    load_f32<V>(sm.X + i * DP + lane * V, x);
    warp_unrotate<D>(a + i, inv_freq, half, sm.X + i * DP, x);
    store_f32<V>(sm.X + i * DP + lane * V, x);
    double q = 0;
#pragma unroll
    for (int v = 0; v < V; ++v) q += double(x[v]) * x[v];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) q += __shfl_xor_sync(0xffffffffu, q, m);
    if (lane == 0) sm.xnorm[i] = float(q);
  }
  if (tid == 0) {
    DevRng rng;
    uint64_t seed = ch.seed;
    for (auto& x : rng.s) x = splitmix64(seed);
    for (int i = 0; i < count; ++i) sm.items[i] = i;
    for (int i = 0; i < k_add; ++i) {
      const int j = i + int(rng.below(uint64_t(count - i)));
      const int x = sm.items[i];
      sm.items[i] = sm.items[j];
      sm.items[j] = x;
      sm.seeds[i] = sm.items[i];
    }
    for (int i = 0; i < 4; ++i) s_rng[i] = rng.s[i];
  }
  for (int c = tid; c < k; c += T) {
    sm.osize[c] = c < k_old ? out.sizes[en.fine(o.first0 + c)] : 0;
    sm.moved_at[c] = -1;
  }
  __syncthreads();
  pc.mark(kUpdLoad);
  if (kSpread && rank > 0) {  // distance tiles r, r + split, ... of each spread call (distances() below) until told to stop
    const cg::cluster_group cl = cg::this_cluster();
    const int* cmd = cl.map_shared_rank(s_cmd, 0);
    const int* cols = cl.map_shared_rank(sm.moved, 0);
    for (;;) {
      cl.sync();  // the order is set; the centroids and norms are written
      const int n = cmd[0], listed = cmd[1];
      if (n < 0) {
        cl.sync();  // the first CTA goes on (and may exit) once its order is read
        return;
      }
      for (int i = tid; listed && i < n; i += T) sm.moved[i] = cols[i];
      __syncthreads();
      online_distances<D>(sm, count, cent, cnorm, listed ? sm.moved : nullptr, n, dist, dims.ko, rank, split);
      cl.sync();  // the distances are written
    }
  }
  // Distances of the chunk's tokens to the columns (cols, or all of [0, n)), spread over the
  // cluster where there is more than one tile of them.
  auto distances = [&](const int* cols, int n) {
    const bool spread = kSpread && n > 64;
    if (spread) {
      if (tid == 0) s_cmd[0] = n, s_cmd[1] = cols != nullptr;
      cg::this_cluster().sync();
    }
    online_distances<D>(sm, count, cent, cnorm, cols, n, dist, dims.ko, 0, spread ? split : 1);
    if (spread) cg::this_cluster().sync();
  };
  // 2. Centroids: cent / cnorm hold the stored means of the old clusters (kept so by every
  // update and by the init); the new ones start at their seeds' keys.
  for (int x = tid; x < k_add * D; x += T) {
    const int c = k_old + x / D, j = x % D;
    cent[int64_t(c) * D + j] = sm.X[sm.seeds[c - k_old] * DP + j];
    ks[int64_t(c) * D + j] = 0.0;
    vs[int64_t(c) * D + j] = 0.0;
  }
  for (int c = tid; c < k_add; c += T) sm.moved[c] = k_old + c;
  __syncthreads();
  pc.mark(kUpdFirstRound);
  online_norms<D>(cent, cnorm, sm.moved, k_add);
  pc.mark(kUpdNorms);
  distances(nullptr, k);
  pc.mark(kUpdDistances);
  online_argmin(sm, dist, dims.ko, k, count);
  pc.mark(kUpdArgmin);
  for (int j = tid; j < k_add; j += T) {
    sm.lab[sm.seeds[j]] = k_old + j;
    sm.dist2[sm.seeds[j]] = 0.0f;
  }
  for (int i = tid; i < count; i += T) sm.used[i] = -1;
  __syncthreads();
  pc.mark(kUpdFirstRound);

  // Counts of the labels; an empty new cluster takes the token farthest from its centroid
  // among clusters that keep a member (ties: lowest token), as the CPU (warp 0, in order).
  auto count_and_reseed = [&]() {
    for (int c = tid; c < k; c += T) sm.cnt[c] = 0;
    __syncthreads();
    for (int i = tid; i < count; i += T) atomicAdd(&sm.cnt[sm.lab[i]], 1);
    __syncthreads();
    if (warp == 0) {
      for (int c = k_old; c < k; ++c) {
        if (sm.cnt[c] > 0) continue;
        float bv = -1.0f;
        int bi = -1;
        for (int i = lane; i < count; i += 32) {
          const int l = sm.lab[i];
          const float v = sm.dist2[i];
          if (sm.osize[l] + sm.cnt[l] >= 2 && v > 0.0f && v > bv) bv = v, bi = i;
        }
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
          const int ob = __shfl_xor_sync(0xffffffffu, bi, m);
          if (ob >= 0 && (bi < 0 || ov > bv || (ov == bv && ob < bi))) bv = ov, bi = ob;
        }
        if (bi < 0) break;  // only duplicates left
        __syncwarp();
        if (lane == 0) {
          --sm.cnt[sm.lab[bi]];
          sm.lab[bi] = c;
          sm.cnt[c] = 1;
          sm.dist2[bi] = 0.0f;
        }
        __syncwarp();
      }
    }
    __syncthreads();
  };
  // The chunk's tokens of each cluster, ascending: tl[st[c], st[c] + cnt[c]); rk: rank.
  auto build_lists = [&]() {
    for (int c = tid; c < k; c += T) sm.st[c] = sm.cnt[c];
    __syncthreads();
    block_exclusive_scan(sm.st, k, sm.tmp);
    if (warp == 0) {
      for (int c = lane; c < k; c += 32) sm.noff[c] = sm.st[c];  // cursors
      __syncwarp();
      warp_counting_sort(count, sm.noff, [&](int i) { return sm.lab[i]; }, [&](int i, int at) {
        sm.tl[at] = i;
        sm.rk[i] = at - sm.st[sm.lab[i]];
      });
    }
    __syncthreads();
  };

  // 3. Lloyd rounds that move only the chunk's tokens.
  for (int it = 1; it <= dims.iterations; ++it) {
    count_and_reseed();
    if (tid == 0) s_nmoved = 0;
    for (int i = tid; i < count; i += T)
      if (sm.lab[i] != sm.used[i]) {
        sm.moved_at[sm.lab[i]] = it;
        if (sm.used[i] >= 0) sm.moved_at[sm.used[i]] = it;
      }
    __syncthreads();
    for (int c = tid; c < k; c += T)
      if (sm.moved_at[c] == it) sm.moved[atomicAdd(&s_nmoved, 1)] = c;
    __syncthreads();
    const int nmoved = s_nmoved;
    if (nmoved == 0) break;
    build_lists();
    // Moved clusters go to (old sum + new sum) / size; one without new members back to its
    // stored mean (a new one keeps its last centroid).
    for (int m0 = tid / D; m0 < nmoved; m0 += kBatch * (T / D)) {
      const int j = tid % D;
      double old[kBatch];  // the old sums' loads first (latency)
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int m = m0 + u * (T / D), c = m < nmoved ? sm.moved[m] : k;
        old[u] = c < k_old ? ks[int64_t(c) * D + j] : 0.0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int m = m0 + u * (T / D);
        if (m >= nmoved) break;
        const int c = sm.moved[m], n = sm.cnt[c];
        if (n > 0) {
          double s = 0;
#pragma unroll 1  // (unrolled in each of the kBatch copies it was ~15 KB of code to fetch: gpu-notes item 39)
          for (int p = sm.st[c]; p < sm.st[c] + n; ++p) s += sm.X[sm.tl[p] * DP + j];
          cent[int64_t(c) * D + j] = float((old[u] + s) * (1.0 / double(sm.osize[c] + n)));
        } else if (c < k_old) {
          cent[int64_t(c) * D + j] = mean_of(old[u], sm.osize[c]);
        }
      }
    }
    for (int i = tid; i < count; i += T) sm.used[i] = sm.lab[i];
    __syncthreads();
    pc.mark(kUpdRounds);
    online_norms<D>(cent, cnorm, sm.moved, nmoved);
    pc.mark(kUpdNorms);
    distances(sm.moved, nmoved);
    pc.mark(kUpdDistances);
    online_argmin(sm, dist, dims.ko, k, count);
    pc.mark(kUpdArgmin);
  }
  if constexpr (kSpread) {  // the other CTAs are done; they read this order from its shared memory before it goes on
    if (tid == 0) s_cmd[0] = -1;
    cg::this_cluster().sync();
    cg::this_cluster().sync();
  }
  pc.mark(kUpdRounds);
  count_and_reseed();
  build_lists();
  pc.mark(kUpdLists);

  // 4. Final statistics: clusters with new members get old sums + the new members' sums
  // (f64, as the CPU); cent / cnorm of every cluster that is new or moved go back to the
  // stored means (the next update starts from them).
  if (tid == 0) s_nmoved = 0;
  __syncthreads();
  for (int c = tid; c < k; c += T)
    if (c >= k_old || sm.cnt[c] > 0 || sm.moved_at[c] >= 1) sm.moved[atomicAdd(&s_nmoved, 1)] = c;
  __syncthreads();
  const int nfin = s_nmoved;
  for (int m0 = tid / D; m0 < nfin; m0 += kBatch * (T / D)) {
    const int j = tid % D;
    double ok[kBatch], ov[kBatch];  // the old sums' loads first (latency)
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int m = m0 + u * (T / D), c = m < nfin ? sm.moved[m] : k;
      ok[u] = c < k_old ? ks[int64_t(c) * D + j] : 0.0;
      ov[u] = c < k_old && sm.cnt[c] > 0 ? vs[int64_t(c) * D + j] : 0.0;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int m = m0 + u * (T / D);
      if (m >= nfin) break;
      const int c = sm.moved[m], n = sm.cnt[c], size = sm.osize[c] + n;
      const int64_t x = int64_t(c) * D + j, f = en.fine(o.first0 + c);
      if (n > 0) {
        double sk = 0, sv = 0;
#pragma unroll 1  // (~49 KB of code unrolled)
        for (int p = sm.st[c]; p < sm.st[c] + n; ++p) {
          int vf16 = kv.f16;
          asm("" : "+r"(vf16));  // opaque: loops unswitched on it were 80 KB more code
          sk += sm.X[sm.tl[p] * DP + j];
          sv += half_or_bf16(sm.Vs[sm.tl[p] * D + j], vf16 != 0);
        }
        ok[u] += sk;
        ov[u] += sv;
        ks[x] = ok[u];
        vs[x] = ov[u];
      }
      const float key = mean_of(ok[u], size);
      cent[x] = key;
      if (n > 0 || c >= k_old) {  // (a new cluster left empty: duplicates only)
        put_centroid(out, f * D + j, key, mean_of(ov[u], size), key_kind, value_f16);
        if (j == 0) out.sizes[f] = size;
      }
    }
  }
  __syncthreads();
  online_norms<D>(cent, cnorm, sm.moved, nfin);
  pc.mark(kUpdStats);

  // 5. The open block's token lists: old lists moved to the new offsets (a position's old
  // cluster found by binary search of the old offsets), new tokens appended.
  const int64_t mbase = en.token_lists(dims.sinks);
  for (int c = tid; c < k; c += T) {
    sm.noff[c] = sm.osize[c] + sm.cnt[c];
    sm.oo[c] = c < k_old ? int(out.member_begin[en.fine(o.first0 + c)] - mbase) : n0;
  }
  for (int p0 = tid; p0 < n0; p0 += kBatch * T) {
    int t[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) t[u] = p0 + u * T < n0 ? out.members[mbase + p0 + u * T] : 0;
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (p0 + u * T < n0) scratch[p0 + u * T] = t[u];
  }
  __syncthreads();
  block_exclusive_scan(sm.noff, k, sm.tmp);
  for (int p0 = tid; p0 < n0; p0 += kBatch * T) {
    int t[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) t[u] = p0 + u * T < n0 ? scratch[p0 + u * T] : 0;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = p0 + u * T;
      if (p >= n0) break;
      int lo = 0, hi = k_old - 1;  // the last cluster whose old list starts at or before p
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (sm.oo[mid] <= p) lo = mid; else hi = mid - 1;
      }
      out.members[mbase + sm.noff[lo] + (p - sm.oo[lo])] = t[u];
    }
  }
  for (int i = tid; i < count; i += T) {
    const int c = sm.lab[i];
    out.members[mbase + sm.noff[c] + sm.osize[c] + sm.rk[i]] = a + i;
  }
  for (int c = tid; c < k; c += T) out.member_begin[en.fine(o.first0 + c)] = int32_t(mbase + sm.noff[c]);
  __syncthreads();
  pc.mark(kUpdTokenLists);

  // 6. Coarse level: new children get parents (new coarse clusters seeded from random
  // non-empty new children at the level's rate, the others to the nearest coarse centroid of
  // the block); coarse clusters whose children changed are recomputed from them.
  int k1 = o.last1 - o.first1;
  if (o.coarse_cap > 0) {
    const int k1_old = k1, t1 = dims.t1;
    if (tid == 0) {
      int m = 0;
      for (int c = k_old; c < k; ++c)
        if (sm.cnt[c] > 0) sm.items[m++] = c;
      int add = min((n1 + t1 - 1) / t1 - (n0 + t1 - 1) / t1, m);
      if (k1_old == 0 && add == 0 && k_add > 0) add = 1;  // a fresh block needs a parent
      DevRng rng;
      for (int i = 0; i < 4; ++i) rng.s[i] = s_rng[i];
      if (m >= add) {
        for (int i = 0; i < add; ++i) {
          const int j = i + int(rng.below(uint64_t(m - i)));
          const int x = sm.items[i];
          sm.items[i] = sm.items[j];
          sm.items[j] = x;
          sm.seeds[i] = sm.items[i];
        }
      } else {
        for (int i = 0; i < add; ++i) sm.seeds[i] = k_old + i;
      }
      s_add1 = add;
    }
    __syncthreads();
    const int add = s_add1;
    k1 = k1_old + add;
    auto fine_key = [&](int c, int j) { return mean_of(ks[int64_t(c) * D + j], sm.osize[c] + sm.cnt[c]); };
    for (int x = tid; x < add * D; x += T) ck[int64_t(k1_old + x / D) * D + x % D] = fine_key(sm.seeds[x / D], x % D);
    for (int x = tid; x < k_add * D; x += T) sm.X[(x / D) * DP + x % D] = fine_key(k_old + x / D, x % D);
    __syncthreads();
    // The block's coarse centroids pass through the shared tile 64 rows at a time, loaded
    // coalesced (a lane reading whole rows of its own from global memory is a long uncoalesced
    // chain); lane l takes rows l and l + 32 of each tile, so its rows ascend (strict < keeps
    // the lowest).
    for (int q0 = 0; q0 < k_add; q0 += NW) {
      const int q = q0 + warp;
      float bv = __int_as_float(0x7f800000);
      int bi = 0x7fffffff;
      for (int p0 = 0; p0 < k1; p0 += 64) {
        CentroidTile<D> tile;
        tile.fetch(ck, nullptr, p0, k1);
        __syncthreads();  // the tile is free
        tile.store<false>(sm);
        __syncthreads();
        if (q >= k_add) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int p = p0 + lane + 32 * h;
          if (p >= k1) break;
          float dot = 0.0f, nn = 0.0f;
#pragma unroll 8
          for (int j4 = 0; j4 < D / 4; ++j4) {
            const float4 v = *reinterpret_cast<const float4*>(sm.T + (p - p0) * DP + 4 * j4);
            const float cj[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              dot = fmaf(sm.X[q * DP + 4 * j4 + t], cj[t], dot);
              nn = fmaf(cj[t], cj[t], nn);
            }
          }
          const float dd = fmaf(-2.0f, dot, nn);
          if (dd < bv) bv = dd, bi = p;
        }
      }
      if (q < k_add) {
        warp_argmin(bv, bi);
        if (lane == 0) parents[k_old + q] = bi;
      }
    }
    __syncthreads();
    if (tid == 0)
      for (int q = 0; q < add; ++q) parents[sm.seeds[q]] = k1_old + q;
    __syncthreads();
    pc.mark(kUpdParents);
    for (int c = tid; c < k; c += T) sm.par[c] = parents[c];
    for (int p = tid; p < k1; p += T) sm.tch[p] = sm.ccnt[p] = 0;
    __syncthreads();
    for (int c = tid; c < k; c += T) {
      if (c >= k_old || sm.cnt[c] > 0) sm.tch[sm.par[c]] = 1;
      atomicAdd(&sm.ccnt[sm.par[c]], 1);
    }
    __syncthreads();
    for (int p = tid; p < k1; p += T) sm.coff[p] = sm.ccnt[p];
    __syncthreads();
    block_exclusive_scan(sm.coff, k1, sm.tmp);
    // Children grouped by coarse cluster, ascending (clist = oo, free now; ccnt becomes the
    // groups' ends); the child lists (entry-local fine ids) of the block's coarse clusters
    // are the block's slice [first0, first0 + k) of the child lists, placeholders past it.
    int* clist = sm.oo;
    if (warp == 0) {
      for (int p = lane; p < k1; p += 32) sm.ccnt[p] = sm.coff[p];
      __syncwarp();
      warp_counting_sort(k, sm.ccnt, [&](int c) { return sm.par[c]; }, [&](int c, int at) { clist[at] = c; });
    }
    __syncthreads();
    const int64_t cbase = int64_t(o.member_base) + o.first0;
    for (int i = tid; i < k; i += T) out.members[cbase + i] = o.first0 + clist[i];
    for (int p = tid; p < k1; p += T) out.member_begin[en.coarse(o.first1 + p)] = int32_t(cbase + sm.coff[p]);
    for (int p = o.first1 + k1 + tid; p < o.coarse_cap; p += T)
      out.member_begin[en.coarse(p)] = o.member_base + o.first0 + k;
    pc.mark(kUpdChildLists);
    // Recompute of the touched coarse clusters: size-weighted f32 child means in f64, children
    // ascending. New children go to the nearest coarse centroid, so a few coarse clusters
    // gather hundreds while most keep a handful: one warp per cluster was a chain of round
    // trips the other warps waited for, and the whole CTA per large cluster cost two barriers
    // each (gpu-notes item 40). So the touched clusters' children, laid end to end, are cut
    // into NW equal ranges, one per warp, read kBatch at a time across cluster boundaries.
    // A warp emits the clusters that start and end in its range; for one that runs past its
    // range it keeps its part, and the warps the cluster runs into leave theirs in a slot
    // (the free tile), which it adds in range order after one barrier.
    for (int p = tid; p < k1; p += T) sm.tch[p] = sm.tch[p] ? sm.ccnt[p] - sm.coff[p] : 0;
    const int total = block_exclusive_scan(sm.tch, k1, sm.tmp);  // tch: first position of each
    const int* at = sm.tch;
    auto at_end = [&](int p) { return p + 1 < k1 ? at[p + 1] : total; };  // touched iff > at[p]
    double* part = reinterpret_cast<double*>(sm.T);  // [NW][2][D]: fits 64 rows of D + 8 floats
    auto emit = [&](int p, const double (&ak)[V], const double (&av)[V], int size) {
      const double inv = size > 0 ? 1.0 / double(size) : 0.0;
      const int64_t g = en.coarse(o.first1 + p);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int j = lane * V + i;
        const float kk = float(ak[i] * inv);
        ck[int64_t(p) * D + j] = kk;
        put_centroid(out, g * D + j, kk, float(av[i] * inv), key_kind, value_f16);
      }
      if (lane == 0) out.sizes[g] = int32_t(size);
    };
    const int per = (total + NW - 1) / NW, lo = min(total, warp * per), hi = min(total, lo + per);
    double ak[V] = {}, av[V] = {};
    int size = 0, cur = -1, cur_from = 0;  // the cluster being summed, from this position
    int p = 0;                             // cursor: the cluster holding position pos
    {
      int l = 0, r = k1 - 1;  // the last cluster starting at or before lo
      while (l < r) {
        const int m = (l + r + 1) / 2;
        if (at[m] <= lo) l = m; else r = m - 1;
      }
      p = l;
    }
    // The cluster's sums so far, cut at position `upto`: emitted when whole, else left in the
    // warp's slot (it began before this range) or kept for after the barrier (it runs on).
    bool carry = false;
    auto close = [&](int upto) {
      if (cur < 0) return;
      if (cur_from > at[cur]) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          part[(warp * 2) * D + lane * V + i] = ak[i];
          part[(warp * 2 + 1) * D + lane * V + i] = av[i];
        }
        if (lane == 0) sm.tmp[warp] = size;
      } else if (upto < at_end(cur)) {
        carry = true;
        return;
      } else {
        emit(cur, ak, av, size);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) ak[i] = av[i] = 0.0;
      size = 0;
    };
    for (int pos = lo; pos < hi; pos += kBatch) {
      int ch[kBatch], cp[kBatch];  // children, their coarse clusters
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (pos + u < hi) {
          while (at_end(p) <= pos + u) ++p;
          cp[u] = p;
          ch[u] = clist[sm.coff[p] + pos + u - at[p]];
        } else {
          cp[u] = -1, ch[u] = 0;
        }
      }
      double kx[kBatch][V], vx[kBatch][V];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int64_t x = int64_t(ch[u]) * D + lane * V + i;
          kx[u][i] = cp[u] >= 0 ? ks[x] : 0.0;
          vx[u][i] = cp[u] >= 0 ? vs[x] : 0.0;
        }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (cp[u] < 0) break;
        if (cp[u] != cur) {
          close(pos + u);
          cur = cp[u], cur_from = pos + u;
        }
        const int n = sm.osize[ch[u]] + sm.cnt[ch[u]];
        if (n == 0) continue;  // an emptied child adds nothing
        size += n;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          ak[i] += double(n) * mean_of(kx[u][i], n);
          av[i] += double(n) * mean_of(vx[u][i], n);
        }
      }
    }
    close(hi);
    __syncthreads();
    if (carry) {
      for (int w = warp + 1; w < NW && w * per < at_end(cur); ++w) {
        size += sm.tmp[w];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          ak[i] += part[(w * 2) * D + lane * V + i];
          av[i] += part[(w * 2 + 1) * D + lane * V + i];
        }
      }
      emit(cur, ak, av, size);
    }
  }
  __syncthreads();
  if (tid == 0) {
    KmOpen n = o;
    n.end = a + count;
    n.last0 = o.first0 + k;
    n.last1 = o.first1 + k1;
    buf.open[e] = n;
    out.entry_count[e] = o.coarse_cap + n.last0;
    out.entry_end[e] = n.end;
  }
  pc.mark(kUpdCoarse);
  pc.finish();
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

// The assignment's shared memory is fixed by D, so its limit is raised once per instantiation,
// not at each of a prefill's ~20 launches a layer.
template <int D>
static void launch_assign(int tiles, const KmAssign& a, Stream s) {
  constexpr size_t kSmem = assign_kernel_smem_bytes<D>();
  static const bool configured = [] {
    MP_CUDA_CHECK(cudaFuncSetAttribute(assign_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
    return true;
  }();
  (void)configured;
  assign_kernel<D><<<tiles, 128, kSmem, s>>>(a);
  MP_CUDA_CHECK(cudaGetLastError());
}

void km_assign(int d, int tiles, const KmBlock* b, const KmTile* t, const void* xb, const float* xnorm,
               const void* centb, const float* cnorm, int32_t* labels, float* dist2, Stream s) {
  const KmAssign a{b, t, static_cast<const __half*>(xb), xnorm, static_cast<const __half*>(centb), cnorm, labels, dist2};
  if (d == 64)
    launch_assign<64>(tiles, a, s);
  else
    launch_assign<128>(tiles, a, s);
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

void km_online_init(int d, int entries, const KvRead& kv, const double* inv_freq, int half, const KmOnlineDims& dims,
                    const KmOnlineBuffers& buf, const DeviceClusterTarget& out, int key_kind, bool value_f16,
                    Stream s) {
  auto* kern = d == 64 ? online_init_kernel<64> : online_init_kernel<128>;
  kern<<<entries, kOnlineThreads, 0, s>>>(kv, inv_freq, half, dims, buf, out, key_kind, value_f16 ? 1 : 0);
  MP_CUDA_CHECK(cudaGetLastError());
}

size_t km_online_smem(int d, const KmOnlineDims& dims) { return OnlineSmem::bytes(d, dims); }

// The update kernel for head dim d and `split` CTAs per entry with its dynamic shared memory
// allowed, and that size.
static auto online_update_for(int d, int split, const KmOnlineDims& dims) {
  auto* kern = split > 1 ? (d == 64 ? online_update_kernel<64, true> : online_update_kernel<128, true>)
                         : (d == 64 ? online_update_kernel<64, false> : online_update_kernel<128, false>);
  const size_t smem = OnlineSmem::bytes(d, dims);
  MP_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  return std::pair{kern, smem};
}

int km_online_max_clusters(int d, const KmOnlineDims& dims, int split) {
  const auto [kern, smem] = online_update_for(d, split, dims);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch_config(attr, 1, split, kOnlineThreads, nullptr, smem);
  int n = 0;
  MP_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kern, &cfg));
  return n;
}

void km_online_update(int d, int entries, int split, const KvRead& kv, const double* inv_freq, int half,
                      const KmOnlineDims& dims, const KmOnlineBuffers& buf, const KmChunk* chunks,
                      const DeviceClusterTarget& out, int key_kind, bool value_f16, Stream s) {
  const auto [kern, smem] = online_update_for(d, split, dims);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch_config(attr, entries, split, kOnlineThreads, s, smem);
  MP_CUDA_CHECK(
      cudaLaunchKernelEx(&cfg, kern, kv, inv_freq, half, dims, buf, chunks, out, key_kind, value_f16 ? 1 : 0));
}

}  // namespace multipole::cuda::detail
