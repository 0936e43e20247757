#pragma once
// Pieces of a one-launch decode step run by one 16-CTA thread-block cluster per (sequence, KV
// head) (fused_step.cuh, and the kernel labs of gpu-notes items 33-35): a CTA's slice of
// centroid rows staged in shared memory, scored for the group's heads and pushed into every
// CTA of the cluster; per-head maxima and normalisers over a block; the far field over a
// staged slice; a CTA's softmax state joined from its warps and far field; the merge of the
// cluster's states through distributed shared memory. Heads are held four to a float4 (kG);
// rows are d = 128 elements of a 16-bit type CT (bf16 or f16; bf16 unless named, as in the
// labs). Logits are in the log2 domain.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cluster_greedy.cuh"
#include "cuda/common.cuh"

namespace multipole::cuda::detail::cluster_step {

constexpr int kD = 128, kCtas = 16;
constexpr int kRowStride = 272;  // bytes per centroid row staged in shared memory (256 + 16: no bank conflicts)

// Distributed shared memory by 32-bit shared::cluster addresses: the address of `p` (in this
// CTA's shared memory) in CTA `rank`, and loads and stores through such addresses. Fewer
// instructions than cooperative groups' generic pointers (64-bit arithmetic, generic loads).
__device__ __forceinline__ uint32_t cluster_addr(const void* p, int rank) {
  uint32_t a;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(uint32_t(__cvta_generic_to_shared(p))), "r"(rank));
  return a;
}
__device__ __forceinline__ float ld_cluster(uint32_t a) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ void st_cluster(uint32_t a, float4 v) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(a), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}
__device__ __forceinline__ void st_cluster(uint32_t a, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(a), "f"(v) : "memory");
}
__device__ __forceinline__ void st_cluster(uint32_t a, float2 v) {
  asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" ::"r"(a), "f"(v.x), "f"(v.y) : "memory");
}

// Four 16-bit elements (a lane's slice of a row) -> floats.
template <class CT>
__device__ __forceinline__ void to_float4(const uint2 u, float* f) {
  f[0] = MmaType<CT>::lo(u.x), f[1] = MmaType<CT>::hi(u.x);
  f[2] = MmaType<CT>::lo(u.y), f[3] = MmaType<CT>::hi(u.y);
}

// A warp holds a row across its lanes, dims [4 lane, 4 lane + 4) each: the lane's dims of the
// kG queries q ([kG][kD], shared memory) into qr, and the kG dot products of a row whose lane
// dims are k4 (every lane gets them).
__device__ __forceinline__ void lane_queries(const float (*q)[kD], float (&qr)[kG][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int t = 0; t < 4; ++t) qr[g][t] = q[g][lane * 4 + t];
}
// The four sums go through one transposed butterfly (lanes 8g..8g+7 end with head g's: 6
// shuffles), then are broadcast (4): half the shuffles and adds of four butterflies. A one-launch
// step fetches its code from DRAM after every flush, so its size is time (gpu-notes item 39).
__device__ __forceinline__ void warp_dots(const float (&qr)[kG][4], const float (&k4)[4], float (&x)[kG]) {
  static_assert(kG == 4, "the transposed butterfly is for four heads");
  float p[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) p[g] = qr[g][0] * k4[0] + qr[g][1] * k4[1] + qr[g][2] * k4[2] + qr[g][3] * k4[3];
  const int lane = threadIdx.x & 31;
  const bool up16 = lane & 16, up8 = lane & 8;
  // Lanes with bit 4 keep heads 2 and 3 and give 0 and 1 to their partner; then bit 3 picks one of the pair.
  float a = up16 ? p[2] : p[0], b = up16 ? p[3] : p[1];
  a += __shfl_xor_sync(0xffffffffu, up16 ? p[0] : p[2], 16);
  b += __shfl_xor_sync(0xffffffffu, up16 ? p[1] : p[3], 16);
  float c = up8 ? b : a;
  c += __shfl_xor_sync(0xffffffffu, up8 ? a : b, 8);
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
#pragma unroll
  for (int g = 0; g < kG; ++g) x[g] = __shfl_sync(0xffffffffu, c, 8 * g);
}

// The far field at real positions: the kG dots (as warp_dots) of a key centroid `row` (kD elements
// of CT, position-0 space) rotated to its members' mean position `sum` / n, against the lane's
// query dims qr. RoPE pairs (i, i + 64) over all kD dims: lane l holds dims [4 l, 4 l + 4), so
// lanes l and l ^ 16 hold a pair's halves. The rule of mean_positions.cuh (hardware sincos of
// the reduced angle); the mean by a reciprocal (no division in these kernels).
template <class CT>
__device__ __forceinline__ void dots_at_mean_position(const CT* row, long long sum, int n, const double* inv_freq,
                                                      const float (&qr)[kG][4], float (&x)[kG]) {
  static_assert(kD == 128, "RoPE pairs (i, i + 64) across lanes l and l ^ 16");
  const int lane = threadIdx.x & 31;
  float k4[4], other[4];
  to_float4<CT>(*reinterpret_cast<const uint2*>(row + lane * 4), k4);
  const double mean = double(sum) * __drcp_rn(double(n));
#pragma unroll
  for (int t = 0; t < 4; ++t) other[t] = __shfl_xor_sync(0xffffffffu, k4[t], 16);
  const bool high = lane & 16;  // the pair's second half: y' = y cos + x sin; first: x' = x cos - y sin
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    float s, c;
    __sincosf(reduced_angle(mean, inv_freq[4 * (lane & 15) + t]), &s, &c);
    k4[t] = high ? k4[t] * c + other[t] * s : k4[t] * c - other[t] * s;
  }
  warp_dots(qr, k4, x);
}

// (m, z): a maximum and the sum of 2^(x - m) of the terms under it; (m2, z2) merged in.
__device__ __forceinline__ void merge_max_sum(float& m, float& z, float m2, float z2) {
  const float mx = fmaxf(m, m2);
  z = (m == -INFINITY ? 0.0f : z * fast_exp2(m - mx)) + (m2 == -INFINITY ? 0.0f : z2 * fast_exp2(m2 - mx));
  m = mx;
}

// The (max, sum) merge of N parts, part(r) = (m_r, z_r), in two passes: the maximum, then the
// sum, whose exponentials are independent (merge_max_sum in a loop chains them: one MUFU and a
// few dependent instructions a part). Parts with m_r = -inf add nothing.
template <int N, class Part>
__device__ __forceinline__ void merge_parts(const Part& part, float& mm, float& zz) {
  float2 p[N];
#pragma unroll
  for (int r = 0; r < N; ++r) p[r] = part(r);
  mm = -INFINITY;
#pragma unroll
  for (int r = 0; r < N; ++r) mm = fmaxf(mm, p[r].x);
  zz = 0;
#pragma unroll
  for (int r = 0; r < N; ++r) zz += p[r].x == -INFINITY ? 0.0f : p[r].y * fast_exp2(p[r].x - mm);
}

// Head g's merged maximum mm and sum zz as the selections read them: gmax[g] (0 for none) and
// gzinv[g] = 1 / zz (0 for g >= heads, the padded heads, or an empty sum).
__device__ __forceinline__ void set_normaliser(int g, float mm, float zz, float* gmax, float* gzinv, int heads) {
  gmax[g] = mm == -INFINITY ? 0.0f : mm, gzinv[g] = g < heads && zz > 0 ? 1.0f / zz : 0.0f;
}

// Every thread's (m[g], z[g]) per head merged over the block: threads g < kG write gmax[g] and
// gzinv[g] = 1 / sum (0 for g >= heads, the padded heads, or an empty sum), visible to all on
// return; kRaw: the maximum (-inf for none) and the sum themselves. red, red_z: [kWarps][kG] scratch.
template <bool kRaw = false>
__device__ __forceinline__ void block_max_sum(float (&m)[kG], float (&z)[kG], float (*red)[kG], float (*red_z)[kG],
                                              float* gmax, float* gzinv, int heads = kG) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The transposed butterfly of warp_dots over (max, sum) pairs: lanes 8g..8g+7 end with head g's.
  static_assert(kG == 4, "the transposed butterfly is for four heads");
  const bool up16 = lane & 16, up8 = lane & 8;
  float ma = up16 ? m[2] : m[0], za = up16 ? z[2] : z[0], mb = up16 ? m[3] : m[1], zb = up16 ? z[3] : z[1];
  merge_max_sum(ma, za, __shfl_xor_sync(0xffffffffu, up16 ? m[0] : m[2], 16),
                __shfl_xor_sync(0xffffffffu, up16 ? z[0] : z[2], 16));
  merge_max_sum(mb, zb, __shfl_xor_sync(0xffffffffu, up16 ? m[1] : m[3], 16),
                __shfl_xor_sync(0xffffffffu, up16 ? z[1] : z[3], 16));
  float mc = up8 ? mb : ma, zc = up8 ? zb : za;
  merge_max_sum(mc, zc, __shfl_xor_sync(0xffffffffu, up8 ? ma : mb, 8), __shfl_xor_sync(0xffffffffu, up8 ? za : zb, 8));
#pragma unroll
  for (int o = 4; o > 0; o >>= 1)
    merge_max_sum(mc, zc, __shfl_xor_sync(0xffffffffu, mc, o), __shfl_xor_sync(0xffffffffu, zc, o));
  if ((lane & 7) == 0) red[warp][lane >> 3] = mc, red_z[warp][lane >> 3] = zc;
  __syncthreads();
  if (tid < kG) {
    float mm, zz;
    merge_parts<kWarps>([&](int w) { return make_float2(red[w][tid], red_z[w][tid]); }, mm, zz);
    if constexpr (kRaw) gmax[tid] = mm, gzinv[tid] = zz;
    else set_normaliser(tid, mm, zz, gmax, gzinv, heads);
  }
  __syncthreads();
}

// The per-head normalisers of a cluster's rows from each CTA's (max, sum) over its slice of them
// (part: [kCtas][kG] (max, sum) pairs, every CTA's): threads g < kG write gmax[g] and gzinv[g] as
// block_max_sum does, visible to all on return.
__device__ __forceinline__ void merge_slice_norms(const float2 (*part)[kG], float* gmax, float* gzinv, int heads) {
  const int tid = threadIdx.x;
  if (tid < kG) {
    float mm, zz;
    merge_parts<kCtas>([&](int r) { return part[r][tid]; }, mm, zz);
    set_normaliser(tid, mm, zz, gmax, gzinv, heads);
  }
  __syncthreads();
}

// One CTA's softmax state (base-2 logits): max, sum, unnormalised output.
struct State {
  float m[kG], l[kG], o[kG][kD];
};

// q_g . centroid row j staged in shared memory (rows kRowStride bytes apart); qg: [kD].
template <class CT = __nv_bfloat16>
__device__ __forceinline__ float staged_dot(const uint8_t* staged, int j, const float* qg) {
  const uint4* row = reinterpret_cast<const uint4*>(staged + size_t(j) * kRowStride);
  float acc[4] = {};
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    float k8[8];
    Storage<CT>::to_float(row[c], k8);
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[t & 3] += qg[c * 8 + t] * k8[t];
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The thread's maximum m[g] of its values x[r] with n[r] > 0 (-inf for none) and their sum
// z[g] = sum_r n[r] 2^(x[r]_g - m[g]), per head, for block_max_sum. (An empty cluster's logit
// stays out of the maximum too: its centroid may be anything, and a large one would leave
// every term of the sum 0.)
template <int Owned>
__device__ __forceinline__ void own_max_sum(const float4 (&x)[Owned], const int (&n)[Owned], float (&m)[kG],
                                            float (&z)[kG]) {
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY, z[g] = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if (n[r] > 0) m[g] = fmaxf(m[g], reinterpret_cast<const float*>(&x[r])[g]);
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if (n[r] > 0) z[g] += float(n[r]) * fast_exp2(reinterpret_cast<const float*>(&x[r])[g] - m[g]);
  }
}

// The far-field weights n 2^(x_g - gmax_g) of a cluster's logits x (0 when selected).
__device__ __forceinline__ float4 far_weights(float4 x, int n, bool selected, const float* gmax) {
  float* xs = reinterpret_cast<float*>(&x);
#pragma unroll
  for (int g = 0; g < kG; ++g) xs[g] = selected || n <= 0 ? 0.0f : float(n) * fast_exp2(xs[g] - gmax[g]);
  return x;
}

// n rows of kD 16-bit elements from src (contiguous, 16-byte aligned) into staged rows
// kRowStride bytes apart, as one cp.async group.
__device__ __forceinline__ void stage_rows(uint8_t* staged, const void* src, int n) {
  const uint8_t* s = static_cast<const uint8_t*>(src);
  for (int i = threadIdx.x; i < n * 16; i += blockDim.x)
    cp_async16(staged + size_t(i / 16) * kRowStride + (i % 16) * 16, s + size_t(i) * 16, true);
  cp_async_commit();
}

// The scoring queries [kG][kD] in three 16-bit parts of CT (f32-class logits on tensor cores),
// split once per CTA rather than by every warp at every k-step: w[p][g][i] = part p of the pair
// (q_g[2 i], q_g[2 i + 1]) as an mma B register; rows of 68 words, so that the 16 lanes of a
// fragment's load hit 16 banks.
struct QueryParts {
  static constexpr int kParts = 3;
  uint32_t w[kParts][kG][kD / 2 + 4];
};
// The parts of query g's pair (x0, x1) at elements d, d + 1 (d even).
template <class CT>
__device__ __forceinline__ void put_query_pair(QueryParts& qp, int g, int d, float x0, float x1) {
#pragma unroll
  for (int p = 0; p < QueryParts::kParts; ++p) qp.w[p][g][d / 2] = peel_part<CT>(x0, x1);
}

// Logits of n staged rows for the kG heads: x[j] = (q_0 . row j, ..., q_3 . row j), the queries
// as qp holds them. On tensor cores (mma_rows_by_parts, as score.cuh): warp w takes the 16-row
// tiles w, w + kWarps, ... (heads 4..7 of the n8 tile are padding). (One thread per row and head
// with FMAs: gpu-notes item 44.)
template <class CT = __nv_bfloat16>
__device__ __forceinline__ void score_staged(const uint8_t* staged, int n, const QueryParts& qp, float4* x) {
  constexpr int kParts = QueryParts::kParts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  for (int t = warp; 16 * t < n; t += kWarps) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // The lane's ldmatrix row; a tile's rows past n read row n - 1 (their logits are dropped).
    const int r = min(16 * t + (lane & 7) + ((lane >> 3) & 1) * 8, n - 1);
    mma_rows_by_parts<kD, CT, kParts>(
        d,
        [&](int ks, uint32_t (&qb)[2][kParts]) {
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int p = 0; p < kParts; ++p) qb[half][p] = gid < kG ? qp.w[p][gid][ks * 8 + half * 4 + tig] : 0u;
        },
        [&](int ks) { return staged + size_t(r) * kRowStride + (ks * 2 + (lane >> 4)) * 16; });
    if (tig < 2) {  // heads 2 tig, 2 tig + 1 of rows 16 t + gid and + 8
      const int r0 = 16 * t + gid;
      if (r0 < n) reinterpret_cast<float2*>(&x[r0])[tig] = make_float2(d[0], d[1]);
      if (r0 + 8 < n) reinterpret_cast<float2*>(&x[r0 + 8])[tig] = make_float2(d[2], d[3]);
    }
  }
}

// x[c0, c0 + n) of this CTA stored into every other CTA of the cluster at the same offsets.
__device__ __forceinline__ void push_to_cluster(const cooperative_groups::cluster_group& cluster, float4* x, int c0,
                                                int n) {
  const int rank = int(cluster.block_rank());
  for (int i = threadIdx.x; i < n * (kCtas - 1); i += blockDim.x) {
    const int j = i % n, r = (rank + 1 + i / n) % kCtas;
    st_cluster(cluster_addr(&x[c0 + j], r), x[c0 + j]);
  }
}

// The scoring step of a one-launch step: the key slice (n rows staged by stage_rows, in flight)
// scored into x[c0, c0 + n), the value slice `values` staged over it, and the logits pushed
// into every CTA of the cluster. The kernel must have arrived on the cluster barrier at entry
// (every CTA must have started before another stores into its shared memory).
template <class CT = __nv_bfloat16>
__device__ __forceinline__ void score_and_push_slice(const cooperative_groups::cluster_group& cluster,
                                                     uint8_t* staged, int n, const QueryParts& qp, float4* x,
                                                     int c0, const void* values) {
  cp_async_wait<0>();
  __syncthreads();
  score_staged<CT>(staged, n, qp, x + c0);
  __syncthreads();
  stage_rows(staged, values, n);  // (the keys are no longer read)
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  push_to_cluster(cluster, x, c0, n);
}

// The far field of n staged value rows with weights w[j] (float4: heads 0..3) into st.o
// ([kG][kD], for the reads of the join after its first barrier); warps g < kG also set st.m[g]
// (ref[g], the weights' reference relative to the rows' (0 when null), or -inf without weight)
// and st.l[g] = the weights' sum. Lane l of
// warp w sums dims 16 w + 2 (l / 4) + {0, 1} of the four heads over rows 8 t + 2 (l % 4) + {0, 1}:
// a 32-bit value load and a float4 weight load serve 8 products (one thread per dimension and
// head pair, loading 2 bytes and 2 weights a row, issued ~4x the loads by count: 2.0 us for 128
// rows against 1.6, gpu-notes item 44), and the four row phases' 8-word bank offsets keep the
// loads conflict-free.
template <class CT = __nv_bfloat16>
__device__ __forceinline__ void far_field_staged(const uint8_t* staged, const float4* w, int n, State& st,
                                                 const float* ref = nullptr) {
  static_assert(kWarps * 16 == kD && kG == 4, "a warp per 16 dimensions, four heads");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, phase = lane & 3;
  const int d = 16 * warp + 2 * (lane >> 2);
  float s[kG][2] = {};
  const uint8_t* vcol = staged + d * 2;
  for (int j = 2 * phase; j < n; j += 8) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      // (A selected or empty cluster weighs 0; its centroid is finite: DeviceClusterIndex
      // rejects others and zeroes the slots no producer writes. Rows at or past n are not this
      // CTA's: neither their weights nor their values are read.)
      const bool in = u == 0 || j + 1 < n;
      const uint32_t bits = in ? *reinterpret_cast<const uint32_t*>(vcol + size_t(j + u) * kRowStride) : 0u;
      const float4 wj = in ? w[j + u] : make_float4(0, 0, 0, 0);
      const float v0 = MmaType<CT>::lo(bits), v1 = MmaType<CT>::hi(bits);
      const float* ws = reinterpret_cast<const float*>(&wj);
#pragma unroll
      for (int g = 0; g < kG; ++g) s[g][0] += ws[g] * v0, s[g][1] += ws[g] * v1;
    }
  }
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      s[g][t] += __shfl_xor_sync(0xffffffffu, s[g][t], 1);
      s[g][t] += __shfl_xor_sync(0xffffffffu, s[g][t], 2);
    }
#pragma unroll
  for (int g = 0; g < kG; ++g)  // every lane of the four holds the sums: each stores one head's
    if (g == phase) *reinterpret_cast<float2*>(&st.o[g][d]) = make_float2(s[g][0], s[g][1]);
  if (warp < kG) {
    float l = 0;
    for (int j = lane; j < n; j += 32) l += reinterpret_cast<const float*>(&w[j])[warp];
    l = warp_sum(l);
    if (lane == 0) st.m[warp] = l > 0 ? (ref ? ref[warp] : 0.0f) : -INFINITY, st.l[warp] = l;
  }
}

// The far field of far_field_staged on tensor cores, bf16 values only (gpu-notes item 68): the
// weights of row j, as far_weight_parts left them in w[j], are the B operand (rows as k, heads
// as n), the staged values through ldmatrix.trans the A operand (warp w: dims [16 w, 16 w + 16)
// as m), each weight in two bf16 parts (hi + lo: 16 bits of mantissa, as attend.cuh's P); warp
// 0 also multiplies them by ones, so st.l is the sum of the weights as the products use them.
// (f16 values keep far_field_staged: f16 parts would lose weights under 2^-24.)
__device__ __forceinline__ uint32_t far_part_word(float w) {  // hi part in the low half, lo in the high
  using M = MmaType<__nv_bfloat16>;
  const uint32_t h = M::pack(w, w);
  return M::pack(w, w - M::lo(h));
}
__device__ __forceinline__ float4 far_weight_parts(float4 w) {
  const uint4 u{far_part_word(w.x), far_part_word(w.y), far_part_word(w.z), far_part_word(w.w)};
  return *reinterpret_cast<const float4*>(&u);
}
__device__ __forceinline__ void far_field_staged_mma(const uint8_t* staged, const float4* w, int n, State& st,
                                                     const float* ref = nullptr) {
  static_assert(kWarps * 16 == kD && kG == 4, "a warp per 16 dimensions, four heads");
  using M = MmaType<__nv_bfloat16>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w);  // row j, head g: words[4 j + g]
  float o[2][4] = {}, l[2][4] = {};                             // [hi, lo part][fragment]
  const int d0 = 16 * warp;
  const uint32_t ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  for (int k0 = 0; k0 < n; k0 += 16) {
    // A: dims d0.. x rows k0.. (rows past n read row n - 1: their weights are 0).
    const int ar = min(k0 + (lane & 7) + ((lane >> 4) << 3), n - 1);
    uint32_t a[4];
    ldmatrix_x4_trans(a, staged + size_t(ar) * kRowStride + (d0 + ((lane >> 3) & 1) * 8) * 2);
    // B: rows k0 + 2 tig + {0, 1, 8, 9} of head gid (heads 4..7 are padding).
    uint32_t r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = k0 + 2 * tig + (i & 1) + (i >> 1) * 8;
      r[i] = gid < kG && j < n ? words[4 * j + gid] : 0u;
    }
    const uint32_t hi0 = __byte_perm(r[0], r[1], 0x5410), hi1 = __byte_perm(r[2], r[3], 0x5410);
    const uint32_t lo0 = __byte_perm(r[0], r[1], 0x7632), lo1 = __byte_perm(r[2], r[3], 0x7632);
    M::mma16816(o[0], a, hi0, hi1);
    M::mma16816(o[1], a, lo0, lo1);
    if (warp == 0) M::mma16816(l[0], ones, hi0, hi1), M::mma16816(l[1], ones, lo0, lo1);
  }
  // Lane (gid, tig < 2): heads 2 tig, 2 tig + 1 at dims d0 + gid and d0 + gid + 8.
  if (tig < 2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) st.o[2 * tig + (i & 1)][d0 + gid + (i >> 1) * 8] = o[0][i] + o[1][i];
    if (warp == 0 && gid == 0)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int g = 2 * tig + i;
        const float lg = l[0][i] + l[1][i];
        st.m[g] = lg > 0 ? (ref ? ref[g] : 0.0f) : -INFINITY, st.l[g] = lg;
      }
  }
}

// The far field a step runs for values of type CT: on tensor cores for bf16, the FMA loop for f16.
// Each weight's producer stores far_weight_slot<CT>(w) in its slot (bf16: the parts the products
// read; f16: w as it is), then, after a barrier, far_field<CT> sums the slots as far_field_staged.
template <class CT>
constexpr bool kFarOnTensorCores = std::is_same_v<CT, __nv_bfloat16>;
template <class CT>
__device__ __forceinline__ float4 far_weight_slot(float4 w) {
  if constexpr (kFarOnTensorCores<CT>) return far_weight_parts(w);
  else return w;
}
template <class CT>
__device__ __forceinline__ void far_field(const uint8_t* staged, const float4* w, int n, State& st,
                                          const float* ref = nullptr) {
  if constexpr (kFarOnTensorCores<CT>) far_field_staged_mma(staged, w, n, st, ref);
  else far_field_staged<CT>(staged, w, n, st, ref);
}

// Thread g < kG: st's max and sum for head g after the warps' rows (wm, wl: [kWarps][kG]) join
// its far field; factor[0][g] rescales the far field's sums, factor[1 + w][g] warp w's (0 for
// a part without weight).
__device__ __forceinline__ void merge_factors(State& st, const float (*wm)[kG], const float (*wl)[kG],
                                              float (*factor)[kG], int g) {
  float mx = st.m[g];
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wl[w][g] > 0 ? wm[w][g] : -INFINITY);
  if (mx == -INFINITY) {  // no weight at all in this CTA
    for (int w = 0; w <= kWarps; ++w) factor[w][g] = 0;
    st.l[g] = 0;
    return;
  }
  factor[0][g] = st.l[g] > 0 ? fast_exp2(st.m[g] - mx) : 0.0f;
  float l = st.l[g] * factor[0][g];
  for (int w = 0; w < kWarps; ++w) {
    factor[w + 1][g] = wl[w][g] > 0 ? fast_exp2(wm[w][g] - mx) : 0.0f;
    l += wl[w][g] * factor[w + 1][g];
  }
  st.m[g] = mx, st.l[g] = l;
}

// Shared memory where a CTA joins its warps' row states to its far field.
struct StateScratch {
  float wm[kWarps][kG], wl[kWarps][kG], factor[kWarps + 1][kG];
};

// st.o, st.m, st.l of the CTA: the far field (as far_field_staged left them in st) joined with
// each warp's rows, this thread writing heads fg, fg + 1 at dimension fd
// (m, l, acc: the warp's max, sum and its lane's dims [4 lane, 4 lane + 4) of the weighted V
// sum). part: [kWarps][kG][kD] f32 that may alias the staged rows: written only after a barrier.
__device__ __forceinline__ void join_cta_state(State& st, const float (&m)[kG], const float (&l)[kG],
                                               const float (&acc)[kG][4], int fd, int fg, float (*part)[kG][kD],
                                               StateScratch& sc) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __syncthreads();  // the far field's reads of the staged values are done: part[] may overwrite them
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int t = 0; t < 4; ++t) part[warp][g][lane * 4 + t] = acc[g][t];
    if (lane == 0) sc.wm[warp][g] = m[g], sc.wl[warp][g] = l[g];
  }
  __syncthreads();
  if (tid < kG) merge_factors(st, sc.wm, sc.wl, sc.factor, tid);
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int g = fg + h;
    float o = st.o[g][fd] * sc.factor[0][g];  // (this thread's element alone: no barrier)
    for (int w = 0; w < kWarps; ++w) o += part[w][g][fd] * sc.factor[w + 1][g];
    st.o[g][fd] = o;
  }
}

// out [heads, kD] of one entry = the merge of the cluster's kCtas states, elements [lo, hi) of
// it (all by default); load(r, i) gives float i of CTA r's State (local or through DSMEM), or of
// a part that holds State's m and l and only o's elements from o_shift on (o element e at float
// offsetof(State, o) / 4 + e - o_shift). Run by every thread of one CTA. Every CTA's (l, m, o) is
// loaded before any is used: loads under the conditions they feed cost three or four DSMEM round
// trips in a row.
template <class Load>
__device__ void write_merged_states(const Load& load, float* out, int heads = kG, int lo = 0, int hi = -1,
                                    int o_shift = 0) {
  constexpr int kM = offsetof(State, m) / 4, kL = offsetof(State, l) / 4, kO = offsetof(State, o) / 4;
  if (hi < 0) hi = heads * kD;
  for (int i = lo + int(threadIdx.x); i < hi; i += blockDim.x) {
    const int g = i / kD, d = i % kD;
    float sl[kCtas], m[kCtas], so[kCtas], mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < kCtas; ++r)
      sl[r] = load(r, kL + g), m[r] = load(r, kM + g), so[r] = load(r, kO + g * kD + d - o_shift);
#pragma unroll
    for (int r = 0; r < kCtas; ++r) {
      m[r] = sl[r] > 0 ? m[r] : -INFINITY;
      mx = fmaxf(mx, m[r]);
    }
    float l = 0, o = 0;
#pragma unroll
    for (int r = 0; r < kCtas; ++r) {
      if (m[r] == -INFINITY) continue;
      const float f = fast_exp2(m[r] - mx);
      l += sl[r] * f, o += so[r] * f;
    }
    out[g * kD + d] = o / l;
  }
}

// The pull merge of a one-launch step: every CTA reads the cluster's states through DSMEM and
// writes its 1/kCtas of their merge (out: [heads, kD] of the entry), so that no CTA reads them
// all (CTA 0 doing the whole merge was the step's last CTA by ~1.5 us); `done` runs after it (a
// profile mark); the last barrier keeps every CTA's state alive until all have read it.
template <class Done>
__device__ void pull_merged_states(const cooperative_groups::cluster_group& cluster, State& st, float* out,
                                   const Done& done, int heads = kG) {
  cluster.sync();
  const int per = (heads * kD + kCtas - 1) / kCtas, lo = int(cluster.block_rank()) * per;
  write_merged_states([&](int r, int i) { return ld_cluster(cluster_addr(&st, r) + 4 * i); }, out, heads, lo,
                      min(heads * kD, lo + per));
  __syncthreads();
  done();
  cluster.sync();
}

// The push merge of a one-launch step: each CTA stores its m and l and each element of its o
// into the inbox of the CTA that writes that element of the output (elements [32 r, 32 r + 32) of
// [heads, kD] to CTA r: 1/16 of four heads), then one cluster barrier, and each CTA merges its
// inbox. The pull merge (above) needs a second barrier: every CTA's state must stay until all
// have read it. `inbox` must be shared memory of its own: a CTA may push into one that has not
// reached the merge yet. `done` runs after the CTA's share is written (a profile mark).
constexpr int kMergeShare = kG * kD / kCtas;  // output elements a CTA merges
struct MergePart {
  float m[kG], l[kG], o[kMergeShare];  // (m and l where State has them: write_merged_states reads both alike)
};
static_assert(offsetof(MergePart, m) == 0 && offsetof(MergePart, l) == offsetof(State, l) && offsetof(State, m) == 0 &&
                  offsetof(State, l) == kG * sizeof(float) &&
                  offsetof(MergePart, o) == offsetof(State, o) && kMergeShare == 32,
              "a part is a State cut to one CTA's share of o");
template <class Done>
__device__ void push_merged_states(const cooperative_groups::cluster_group& cluster, const State& st,
                                   MergePart (&inbox)[kCtas], float* out, const Done& done, int heads = kG) {
  const int rank = int(cluster.block_rank());
  __syncthreads();  // st.o complete (each thread wrote its own elements)
  for (int i = int(threadIdx.x); i < heads * kD; i += blockDim.x)
    st_cluster(cluster_addr(&inbox[rank].o[i % kMergeShare], i / kMergeShare), st.o[i / kD][i % kD]);
  if (const int t = int(threadIdx.x); t < kCtas * 2 * kG) {  // m then l: the first 2 kG floats of both
    const int w = t % (2 * kG);
    st_cluster(cluster_addr(reinterpret_cast<float*>(&inbox[rank]) + w, t / (2 * kG)),
               reinterpret_cast<const float*>(&st)[w]);
  }
  cluster.sync();
  const int lo = rank * kMergeShare;
  write_merged_states([&](int r, int i) { return reinterpret_cast<const float*>(&inbox[r])[i]; }, out, heads, lo,
                      min(heads * kD, lo + kMergeShare), lo);
  done();
}

}  // namespace multipole::cuda::detail::cluster_step
