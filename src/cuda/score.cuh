#pragma once
// Cluster scoring for the whole GQA group: x[i][g] = scale log2(e) q_score_g . c_i for every
// centroid of an entry (sequence, KV head), plus per CTA and head the partial normaliser
// (max, sum_i n_i 2^(x - max)) over the first entry_normed[e] of them, which the selection
// kernel combines. kScoreChunk centroids per
// CTA; each centroid row is read once for the GC heads of the CTA, straight from global
// memory with 16-byte loads, all of a thread's rows in flight at once.
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

template <int D, int GC, class CT>
__global__ void __launch_bounds__(128) score_kernel(const ScoreArgs a) {
  constexpr int EPV = Storage<CT>::kPerVec;  // elements per 16-byte vector
  constexpr int DPL = (D == 128 && GC <= 4) ? 16 : 8;
  constexpr int L = D / DPL, NV = DPL / EPV, TPW = 32 / L, TPP = TPW * 4;
  constexpr int kPasses = kScoreChunk / TPP;  // rows per thread, all in flight at once
  static_assert(kPasses * TPP == kScoreChunk && GC * D % 4 == 0, "score chunk shape");
  __shared__ float s_red[4][GC][2];
  __shared__ __align__(16) float s_q[GC * D];  // [GC, D] scaled scoring queries

  pdl_trigger();  // the selection kernel may start its prologue (it waits for our writes)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int item = blockIdx.x, b = a.item_seq[item], ck = a.item_chunk[item];
  const int h = blockIdx.y / a.head_chunks, chunk = blockIdx.y % a.head_chunks;
  const int Hkv = a.num_kv_heads, G = a.group, g0 = chunk * GC, gcount = min(GC, G - g0);
  const int e = b * Hkv + h;
  const int cbegin = a.entry_begin[e], C = a.entry_count[e];
  const int Cn = a.entry_normed ? a.entry_normed[e] : C;
  const int l = lane % L, tok = warp * TPW + lane / L;

  // Every centroid row of the CTA first (one round trip), then the queries.
  const CT* keys = static_cast<const CT*>(a.key_centroids);
  uint4 u[kPasses][NV];
  int n[kPasses];
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int i = ck * kScoreChunk + k * TPP + tok;
    const bool valid = i < C;
    const uint4* row = reinterpret_cast<const uint4*>(keys + int64_t(cbegin + (valid ? i : 0)) * D);
#pragma unroll
    for (int j = 0; j < NV; ++j) u[k][j] = valid ? __ldg(row + l + j * L) : make_uint4(0, 0, 0, 0);
    n[k] = valid ? __ldg(a.sizes + cbegin + i) : 0;
  }
  // The chunk's scaled queries through shared memory, loaded as float4 by all threads: each
  // thread needs 16-32 scattered floats, which straight from global memory cost more load
  // sectors than the centroids themselves.
  {
    const float4* qg = reinterpret_cast<const float4*>(a.q_score + (int64_t(b) * Hkv * G + h * G + g0) * D);
#pragma unroll 1
    for (int x = tid; x < GC * D / 4; x += 128) {
      float4 v = x < gcount * D / 4 ? __ldg(qg + x) : make_float4(0.f, 0.f, 0.f, 0.f);
      v.x *= a.qscale, v.y *= a.qscale, v.z *= a.qscale, v.w *= a.qscale;
      reinterpret_cast<float4*>(s_q)[x] = v;
    }
  }
  __syncthreads();
  float qr[GC][NV * EPV];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < EPV; ++c) qr[g][j * EPV + c] = s_q[g * D + (l + j * L) * EPV + c];
  float m[GC], z[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = neg_inf();
    z[g] = 0.0f;
  }

#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    float acc[GC];
#pragma unroll
    for (int g = 0; g < GC; ++g) acc[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float kf[EPV];
      Storage<CT>::to_float(u[k][j], kf);
#pragma unroll
      for (int g = 0; g < GC; ++g)
#pragma unroll
        for (int c = 0; c < EPV; ++c) acc[g] = fmaf(qr[g][j * EPV + c], kf[c], acc[g]);
    }
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
    const int i = ck * kScoreChunk + k * TPP + tok;
    if (l == 0 && i < C) {
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        if (g < gcount) a.scores[int64_t(cbegin + i) * G + g0 + g] = acc[g];
        if (n[k] > 0 && i < Cn) {
          const float mn = fmaxf(m[g], acc[g]);
          z[g] = z[g] * fast_exp2(m[g] - mn) + float(n[k]) * fast_exp2(acc[g] - mn);
          m[g] = mn;
        }
      }
    }
  }
  // CTA-wide (max, sum) per head.
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    const float mx = warp_max(m[g]);
    const float zs = warp_sum(m[g] == neg_inf() ? 0.0f : z[g] * fast_exp2(m[g] - mx));
    if (lane == 0) {
      s_red[warp][g][0] = mx;
      s_red[warp][g][1] = zs;
    }
  }
  __syncthreads();
  if (tid < gcount) {
    float mx = neg_inf(), zs = 0.0f;
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, s_red[w][tid][0]);
    for (int w = 0; w < 4; ++w)
      if (s_red[w][tid][0] != neg_inf()) zs += s_red[w][tid][1] * fast_exp2(s_red[w][tid][0] - mx);
    float* out = a.part + ((int64_t(item) * Hkv + h) * G + g0 + tid) * 2;
    out[0] = mx;
    out[1] = zs;
  }
}

}  // namespace multipole::cuda::detail
