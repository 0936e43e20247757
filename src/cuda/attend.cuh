#pragma once
// Split-KV decode attention for the G query heads of one GQA group (GC of them per CTA),
// over a "virtual sequence" of one (sequence, KV head):
//   dense:     virtual position v = cache position v, v in [0, length)
//   multipole: v in [0, exact_cap) = the exact set (rows listed by the selection kernel:
//              sinks, tokens of selected clusters, window), v in [exact_cap, exact_cap + C)
//              = the clusters as pseudo-tokens (logit from the scoring pass + log2 n,
//              value = value centroid); selected and empty clusters carry n = 0 (skipped).
// Each CTA takes one split of the virtual range, streams K/V rows through a cp.async ring
// of shared-memory tiles (16-byte copies, several tiles in flight) and keeps an f32 online
// softmax state; every K/V row is loaded once for the GC heads. The last CTA of a
// (sequence, head, chunk) to finish merges the splits (counter in global memory), so a
// decode step is one launch. Logits are in the log2 domain (q pre-scaled by scale*log2 e).
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

template <int D, int GC>
struct AttendShape {
  static constexpr int kThreads = 128, kWarps = 4, kTile = 32, kStages = 4;
  static constexpr int kDimsPerLane = (D == 128 && GC <= 4) ? 16 : 8;  // keeps q and o at <= 64 registers each
  static constexpr int kLanes = D / kDimsPerLane;                       // lanes per token: 8 or 16
  static constexpr int kVecs = kDimsPerLane / 8;                        // 16-byte vectors per lane per row
  static constexpr int kTokPerWarp = 32 / kLanes;
  static constexpr int kTokPerPass = kTokPerWarp * kWarps;
  static constexpr int kPasses = kTile / kTokPerPass;
  static constexpr int kRowBytes = D * 2;
  static constexpr int kPieces = D / 8;                       // 16-byte pieces per row
  static constexpr int kRowsPerStep = kThreads / kPieces;     // rows covered by one copy step
  static constexpr int kLoadSteps = kTile / kRowsPerStep;     // rows per thread per tile
  static constexpr int kStageBytes = 2 * kTile * kRowBytes;   // K tile then V tile
  static constexpr int kRingBytes = kStages * kStageBytes;
  // Multipole staging after the ring: pseudo scores [stages][tile][GC] f32, sizes and kinds
  // [stages][tile] i32.
  static constexpr int kExtraBytes = kStages * kTile * (GC + 2) * 4;
  static constexpr int kReduceBytes = kTokPerPass * GC * D * 4;
  static constexpr int kSmem = (kRingBytes + kExtraBytes > kReduceBytes ? kRingBytes + kExtraBytes : kReduceBytes);
  static_assert(kTile == 32, "phase B maps one token per lane");
  static_assert(kPasses * kTokPerPass == kTile && kLoadSteps * kRowsPerStep == kTile, "tile shape");
  static_assert(kMaxSplits * GC * 4 <= kSmem, "merge weights must fit in shared memory");
};

// Row codes: >= 0 pool row of an exact token, -1 nothing (zeros), <= -2 pseudo-token of
// cluster -2 - code (global cluster index).
template <int D, int GC, class T, bool MP>
__global__ void __launch_bounds__(128) attend_kernel(const AttendArgs a) {
  using S = AttendShape<D, GC>;
  constexpr int L = S::kLanes, NV = S::kVecs, TILE = S::kTile;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_p[TILE][GC];  // logits, then probabilities, of the current tile
  __shared__ float s_m[GC], s_l[GC], s_alpha[GC];
  __shared__ int s_last;
  float* s_pscore = reinterpret_cast<float*>(smem + S::kRingBytes);                  // [stages][tile][GC]
  int* s_psize = reinterpret_cast<int*>(s_pscore + S::kStages * TILE * GC);           // [stages][tile]
  int* s_kind = s_psize + S::kStages * TILE;                                          // [stages][tile]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int item = blockIdx.x;
  const int b = a.item_seq[item], split = a.item_split[item];
  const int h = blockIdx.y / a.head_chunks, chunk = blockIdx.y % a.head_chunks;
  const int Hkv = a.num_kv_heads, G = a.group, g0 = chunk * GC;
  const int gcount = min(GC, G - g0);
  const int e = b * Hkv + h;
  const int seq = a.seq_ids[b];
  const int nsplit = a.seq_splits[b];
  const int P = a.page_size;
  const int32_t* table = a.tables + a.table_offset[seq];

  int vlen, ebegin = 0, exact_n = 0;
  if constexpr (MP) {
    ebegin = a.entry_begin[e];
    exact_n = min(a.exact_n[e], a.exact_cap);
    vlen = a.exact_cap + (a.far_field ? a.entry_count[e] : 0);
  } else {
    vlen = a.lengths[seq];
  }
  const int vbegin = split * a.chunk;
  // The last split runs to the end, so a sequence that grew since planning is still covered.
  const int vend = split == nsplit - 1 ? vlen : min(vlen, vbegin + a.chunk);
  const int ntiles = vend > vbegin ? (vend - vbegin + TILE - 1) / TILE : 0;

  auto resolve = [&](int v) -> int {
    if (v >= vend) return -1;
    if constexpr (MP) {
      if (v < a.exact_cap) return v < exact_n ? __ldg(a.exact_rows + int64_t(e) * a.exact_cap + v) : -1;
      return -2 - (ebegin + (v - a.exact_cap));
    } else {
      const int page = __ldg(table + v / P);
      return (page * Hkv + h) * P + v % P;
    }
  };

  const int piece = tid % S::kPieces, r0 = tid / S::kPieces;
  auto issue = [&](int buf, const int (&rows)[S::kLoadSteps]) {
    unsigned char* kt = smem + buf * S::kStageBytes;
    unsigned char* vt = kt + TILE * S::kRowBytes;
#pragma unroll
    for (int s = 0; s < S::kLoadSteps; ++s) {
      const int r = r0 + s * S::kRowsPerStep, row = rows[s];
      const bool exact = row >= 0, pseudo = row <= -2;
      const std::byte* ksrc = exact ? a.keys + (int64_t(row) * D + piece * 8) * 2 : a.keys;
      cp_async16(kt + r * S::kRowBytes + piece * 16, ksrc, exact);
      const std::byte* vsrc = a.values;
      if (exact) vsrc = a.values + (int64_t(row) * D + piece * 8) * 2;
      if constexpr (MP) {
        if (pseudo) vsrc = a.value_centroids + (int64_t(-2 - row) * D + piece * 8) * 2;
      }
      cp_async16(vt + r * S::kRowBytes + piece * 16, vsrc, exact || pseudo);
      if constexpr (MP) {
        if (piece == 0) s_kind[buf * TILE + r] = exact ? 1 : (pseudo ? 2 : 0);
        if (pseudo) {
          const int64_t c = -2 - row;
          for (int j = piece; j <= GC; j += S::kPieces) {
            if (j == 0)
              cp_async4(s_psize + buf * TILE + r, a.far_size + c, true);
            else
              cp_async4(s_pscore + (buf * TILE + r) * GC + (j - 1), a.scores + c * G + g0 + (j - 1), j - 1 < gcount);
          }
        }
      }
    }
  };

  // Queries of this chunk's heads, pre-scaled; lane l holds dims (l + j L) * 8 + [0, 8).
  const int l = lane % L, tok = warp * S::kTokPerWarp + lane / L;
  float qr[GC][NV * 8], o[GC][NV * 8];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const int dim = (l + j * L) * 8 + c;
        qr[g][j * 8 + c] = g < gcount ? a.q[(int64_t(b) * Hkv * G + h * G + g0 + g) * D + dim] * a.qscale : 0.0f;
        o[g][j * 8 + c] = 0.0f;
      }
  if (tid < GC) {
    s_m[tid] = neg_inf();
    s_l[tid] = 0.0f;
  }

  // Prologue: stages-1 tiles in flight, rows of the next one resolved.
  int rows[S::kLoadSteps];
#pragma unroll
  for (int t = 0; t < S::kStages - 1; ++t) {
#pragma unroll
    for (int s = 0; s < S::kLoadSteps; ++s) rows[s] = t < ntiles ? resolve(vbegin + t * TILE + r0 + s * S::kRowsPerStep) : -1;
    if (t < ntiles) issue(t, rows);
    cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < S::kLoadSteps; ++s)
    rows[s] = S::kStages - 1 < ntiles ? resolve(vbegin + (S::kStages - 1) * TILE + r0 + s * S::kRowsPerStep) : -1;
  __syncthreads();

  for (int k = 0; k < ntiles; ++k) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // tile k landed; everyone is done with tile k-1 (its buffer is reused now)
    {
      const int kk = k + S::kStages - 1;
      if (kk < ntiles) issue(kk % S::kStages, rows);
      cp_async_commit();
#pragma unroll
      for (int s = 0; s < S::kLoadSteps; ++s) rows[s] = kk + 1 < ntiles ? resolve(vbegin + (kk + 1) * TILE + r0 + s * S::kRowsPerStep) : -1;
    }
    const int buf = k % S::kStages;
    const int tile_v0 = vbegin + k * TILE;
    const unsigned char* kt = smem + buf * S::kStageBytes;
    const unsigned char* vt = kt + TILE * S::kRowBytes;

    // Phase A: logits of the tile.
    const bool any_exact = MP ? tile_v0 < a.exact_cap : true;
#pragma unroll
    for (int p = 0; p < S::kPasses; ++p) {
      const int tt = p * S::kTokPerPass + tok;
      float acc[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g] = 0.0f;
      if (any_exact) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const uint4 u = *reinterpret_cast<const uint4*>(kt + tt * S::kRowBytes + (l + j * L) * 16);
          float kf[8];
          Storage<T>::to_float(u, kf);
#pragma unroll
          for (int g = 0; g < GC; ++g)
#pragma unroll
            for (int c = 0; c < 8; ++c) acc[g] = fmaf(qr[g][j * 8 + c], kf[c], acc[g]);
        }
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1)
#pragma unroll
          for (int g = 0; g < GC; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
      }
      if (l == 0) {
        if constexpr (MP) {
          const int kind = s_kind[buf * TILE + tt];
          if (kind == 2) {
            const int n = s_psize[buf * TILE + tt];
            const float bias = n > 0 ? __log2f(float(n)) : 0.0f;
#pragma unroll
            for (int g = 0; g < GC; ++g) s_p[tt][g] = n > 0 ? s_pscore[(buf * TILE + tt) * GC + g] + bias : neg_inf();
          } else {
#pragma unroll
            for (int g = 0; g < GC; ++g) s_p[tt][g] = kind == 1 ? acc[g] : neg_inf();
          }
        } else {
          const bool valid = tile_v0 + tt < vend;
#pragma unroll
          for (int g = 0; g < GC; ++g) s_p[tt][g] = valid ? acc[g] : neg_inf();
        }
      }
    }
    __syncthreads();

    // Phase B: online softmax update, one warp per head, one token per lane.
    for (int g = warp; g < GC; g += S::kWarps) {
      const float m_old = s_m[g];
      const float x = s_p[lane][g];
      const float m_new = fmaxf(m_old, warp_max(x));
      const float p = m_new == neg_inf() ? 0.0f : fast_exp2(x - m_new);
      s_p[lane][g] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float alpha = m_new == neg_inf() ? 1.0f : fast_exp2(m_old - m_new);
        s_alpha[g] = alpha;
        s_l[g] = s_l[g] * alpha + sum;
        s_m[g] = m_new;
      }
    }
    __syncthreads();

    // Phase C: o = o * alpha + P V.
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      const float al = s_alpha[g];
#pragma unroll
      for (int c = 0; c < NV * 8; ++c) o[g][c] *= al;
    }
#pragma unroll
    for (int p = 0; p < S::kPasses; ++p) {
      const int tt = p * S::kTokPerPass + tok;
      float pr[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) pr[g] = s_p[tt][g];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const uint4 u = *reinterpret_cast<const uint4*>(vt + tt * S::kRowBytes + (l + j * L) * 16);
        float vf[8];
        Storage<T>::to_float(u, vf);
#pragma unroll
        for (int g = 0; g < GC; ++g)
#pragma unroll
          for (int c = 0; c < 8; ++c) o[g][j * 8 + c] = fmaf(pr[g], vf[c], o[g][j * 8 + c]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Sum the per-token-slot partial outputs.
  float* red = reinterpret_cast<float*>(smem);  // [tok_per_pass][GC][D]
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float4* dst = reinterpret_cast<float4*>(red + (tok * GC + g) * D + (l + j * L) * 8);
      dst[0] = make_float4(o[g][j * 8 + 0], o[g][j * 8 + 1], o[g][j * 8 + 2], o[g][j * 8 + 3]);
      dst[1] = make_float4(o[g][j * 8 + 4], o[g][j * 8 + 5], o[g][j * 8 + 6], o[g][j * 8 + 7]);
    }
  __syncthreads();
  constexpr int kOut = GC * D, kPer = (kOut + 127) / 128;
  float fin[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int idx = tid + r * 128;
    float sum = 0.0f;
    if (idx < kOut)
#pragma unroll 4
      for (int sl = 0; sl < S::kTokPerPass; ++sl) sum += red[sl * kOut + idx];
    fin[r] = sum;
  }

  const int64_t out_row0 = int64_t(b) * Hkv * G + h * G + g0;  // output row of head g0
  if (nsplit == 1) {
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int idx = tid + r * 128, g = idx / D;
      if (idx < kOut && g < gcount) {
        const float lsum = s_l[g];
        a.out[(out_row0 + g) * D + idx % D] = lsum > 0.0f ? fin[r] / lsum : 0.0f;
      }
    }
    return;
  }

  const int64_t part_row0 = (int64_t(item) * Hkv + h) * G + g0;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int idx = tid + r * 128, g = idx / D;
    if (idx < kOut && g < gcount) a.part_o[(part_row0 + g) * D + idx % D] = fin[r];
  }
  if (tid < gcount) {
    a.part_ml[(part_row0 + tid) * 2 + 0] = s_m[tid];
    a.part_ml[(part_row0 + tid) * 2 + 1] = s_l[tid];
  }
  __threadfence();
  __syncthreads();
  int32_t* counter = a.counters + int64_t(e) * a.head_chunks + chunk;
  if (tid == 0) s_last = atomicAdd(counter, 1) == nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // Last CTA: merge the splits. w[s][g] = 2^(m_s - M) / L.
  const int base = a.seq_item_base[b];
  float* w = reinterpret_cast<float*>(smem);  // [nsplit][GC]
  for (int g = warp; g < gcount; g += S::kWarps) {
    float mx = neg_inf();
    for (int s = lane; s < nsplit; s += 32) mx = fmaxf(mx, __ldcg(a.part_ml + ((int64_t(base + s) * Hkv + h) * G + g0 + g) * 2));
    mx = warp_max(mx);
    float lsum = 0.0f;
    for (int s = lane; s < nsplit; s += 32) {
      const float* ml = a.part_ml + ((int64_t(base + s) * Hkv + h) * G + g0 + g) * 2;
      const float ms = __ldcg(ml);
      const float ws = ms == neg_inf() ? 0.0f : fast_exp2(ms - mx);
      lsum += ws * __ldcg(ml + 1);
      w[s * GC + g] = ws;
    }
    lsum = warp_sum(lsum);
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int s = lane; s < nsplit; s += 32) w[s * GC + g] *= inv;
  }
  __syncthreads();
  for (int o4 = tid; o4 < GC * D / 4; o4 += 128) {
    const int g = o4 / (D / 4), d4 = o4 % (D / 4);
    if (g >= gcount) continue;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = 0; s < nsplit; ++s) {
      const float ws = w[s * GC + g];
      if (ws != 0.0f) {
        const float4 v = __ldcg(reinterpret_cast<const float4*>(a.part_o + ((int64_t(base + s) * Hkv + h) * G + g0 + g) * D) + d4);
        acc.x = fmaf(ws, v.x, acc.x);
        acc.y = fmaf(ws, v.y, acc.y);
        acc.z = fmaf(ws, v.z, acc.z);
        acc.w = fmaf(ws, v.w, acc.w);
      }
    }
    reinterpret_cast<float4*>(a.out + (out_row0 + g) * D)[d4] = acc;
  }
  if (tid == 0) *counter = 0;  // ready for the next launch (or graph replay)
}

template <int D, int GC, class T, bool MP>
void launch_attend_one(const AttendArgs& a, int items, Stream stream);

}  // namespace multipole::cuda::detail
