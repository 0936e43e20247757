#pragma once
// Split-KV decode attention for the G query heads of one GQA group (GC of them per CTA),
// over a "virtual sequence" of one (sequence, KV head):
//   dense:     virtual position v = cache position v, v in [0, length)
//   multipole: v in [0, exact_cap) = the exact set (rows listed by the selection kernel:
//              sinks, tokens of selected clusters, window), v in [exact_cap, exact_cap + C)
//              = the clusters as pseudo-tokens (logit from the scoring pass + log2 n,
//              value = value centroid); selected and empty clusters carry n = 0 (skipped).
// Each CTA takes one split of the virtual range. Its 4 warps work independently: each
// streams its own 8-token tiles (interleaved over the split) through a private cp.async
// ring of shared-memory stages (16-byte copies, 3 tiles in flight) and keeps its own f32
// online-softmax state, so the only CTA barriers are at the end, where the warps' states
// are merged. Every K/V row is loaded once for the GC heads. The last CTA of a (sequence,
// head, chunk) to finish merges the splits (counter in global memory), so a decode step
// is one launch. Logits are in the log2 domain (q pre-scaled by scale * log2 e).
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

template <int D, int GC>
struct AttendShape {
  static constexpr int kThreads = 128, kWarps = 4, kTile = 8, kStages = 4;  // kTile: tokens per warp tile
  static constexpr int kDimsPerLane = (D == 128 && GC <= 4) ? 16 : 8;  // keeps q and o at <= 64 registers each
  static constexpr int kLanes = D / kDimsPerLane;                       // lanes per token: 8 or 16
  static constexpr int kVecs = kDimsPerLane / 8;                        // 16-byte vectors per lane per row
  static constexpr int kTokPerPass = 32 / kLanes;
  static constexpr int kPasses = kTile / kTokPerPass;
  static constexpr int kRowBytes = D * 2;
  static constexpr int kPieces = D / 8;                       // 16-byte pieces per row
  static constexpr int kRowsPerStep = 32 / kPieces;           // rows one warp-wide copy step covers
  static constexpr int kLoadSteps = kTile / kRowsPerStep;     // rows per lane per tile
  static constexpr int kStageBytes = 2 * kTile * kRowBytes;   // K tile then V tile
  static constexpr int kWarpRing = kStages * kStageBytes;
  static constexpr int kRingBytes = kWarps * kWarpRing;
  // Multipole staging after the rings, per warp: pseudo scores [stages][tile][GC] f32,
  // sizes and kinds [stages][tile] i32.
  static constexpr int kWarpExtra = kStages * kTile * (GC + 2);  // in 4-byte words
  static constexpr int kExtraBytes = kWarps * kWarpExtra * 4;
  static constexpr int kSmem = kRingBytes + kExtraBytes;
  static_assert(kPasses * kTokPerPass == kTile && kLoadSteps * kRowsPerStep == kTile, "tile shape");
  static_assert(kMaxSplits * GC * 4 <= kSmem && kWarps * GC * (D + 2) * 4 <= kSmem, "merge scratch must fit");
};

// Row codes: >= 0 pool row of an exact token, -1 nothing (zeros), <= -2 pseudo-token of
// cluster -2 - code (global cluster index).
template <int D, int GC, class T, bool MP>
__global__ void __launch_bounds__(128, 3) attend_kernel(const AttendArgs a) {
  using S = AttendShape<D, GC>;
  constexpr int L = S::kLanes, NV = S::kVecs, TILE = S::kTile, W = S::kWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_m[GC], s_l[GC];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned char* ring = smem + warp * S::kWarpRing;
  float* s_pscore = reinterpret_cast<float*>(smem + S::kRingBytes) + warp * S::kWarpExtra;  // [stages][tile][GC]
  int* s_psize = reinterpret_cast<int*>(s_pscore + S::kStages * TILE * GC);                 // [stages][tile]
  int* s_kind = s_psize + S::kStages * TILE;                                                 // [stages][tile]

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
  // Warp tiles t = 0, 1, ... cover [vbegin + (t W + warp) TILE, + TILE).
  const int all_tiles = vend > vbegin ? (vend - vbegin + TILE - 1) / TILE : 0;
  const int ntiles = all_tiles > warp ? (all_tiles - warp + W - 1) / W : 0;
  auto tile_v0 = [&](int t) { return vbegin + (t * W + warp) * TILE; };

  // Raw row codes are loaded one tile ahead and only used when the tile is issued, so the
  // loads (page table, exact list) never stall the warp: dense keeps the page id (or -1),
  // multipole the final code.
  const int pshift = a.page_shift;
  auto resolve = [&](int v) -> int {
    if (v >= vend) return -1;
    if constexpr (MP) {
      if (v < a.exact_cap) return v < exact_n ? __ldg(a.exact_rows + int64_t(e) * a.exact_cap + v) : -1;
      return -2 - (ebegin + (v - a.exact_cap));
    } else {
      return __ldg(table + (pshift >= 0 ? v >> pshift : v / P));
    }
  };
  auto final_row = [&](int raw, int v) -> int {
    if constexpr (MP) {
      return raw;
    } else {
      return raw < 0 ? -1 : (raw * Hkv + h) * P + (pshift >= 0 ? v & (P - 1) : v % P);
    }
  };

  const int piece = lane % S::kPieces, r0 = lane / S::kPieces;
  auto issue = [&](int buf, int t, const int (&raw)[S::kLoadSteps]) {
    unsigned char* kt = ring + buf * S::kStageBytes;
    unsigned char* vt = kt + TILE * S::kRowBytes;
#pragma unroll
    for (int s = 0; s < S::kLoadSteps; ++s) {
      const int r = r0 + s * S::kRowsPerStep, row = final_row(raw[s], tile_v0(t) + r);
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
  auto resolve_tile = [&](int t, int (&rows)[S::kLoadSteps]) {
#pragma unroll
    for (int s = 0; s < S::kLoadSteps; ++s) rows[s] = t < ntiles ? resolve(tile_v0(t) + r0 + s * S::kRowsPerStep) : -1;
  };

  // Queries of this chunk's heads, pre-scaled; lane l holds dims (l + j L) * 8 + [0, 8).
  const int l = lane % L, grp = lane / L;
  float qr[GC][NV * 8], o[GC][NV * 8], m[GC], lsum[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = neg_inf();
    lsum[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const int dim = (l + j * L) * 8 + c;
        qr[g][j * 8 + c] = g < gcount ? a.q[(int64_t(b) * Hkv * G + h * G + g0 + g) * D + dim] * a.qscale : 0.0f;
        o[g][j * 8 + c] = 0.0f;
      }
  }

  // Prologue: stages-1 tiles in flight, rows of the next one resolved.
  int rows[S::kLoadSteps];
#pragma unroll
  for (int t = 0; t < S::kStages - 1; ++t) {
    resolve_tile(t, rows);
    if (t < ntiles) issue(t, t, rows);
    cp_async_commit();
  }
  resolve_tile(S::kStages - 1, rows);

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<S::kStages - 2>();
    __syncwarp();  // tile t landed for every lane; every lane is done with tile t-1's buffer
    {
      const int tt = t + S::kStages - 1;
      if (tt < ntiles) issue(tt % S::kStages, tt, rows);
      cp_async_commit();
      resolve_tile(tt + 1, rows);
    }
    const int buf = t % S::kStages;
    const int v0 = tile_v0(t);
    const unsigned char* kt = ring + buf * S::kStageBytes;
    const unsigned char* vt = kt + TILE * S::kRowBytes;

    // Logits of the tile; every lane of a token's group ends with the full dot.
    float x[S::kPasses][GC];
    const bool any_exact = MP ? v0 < a.exact_cap : true;
#pragma unroll
    for (int p = 0; p < S::kPasses; ++p) {
      const int tok = p * S::kTokPerPass + grp;
      float acc[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g] = 0.0f;
      if (any_exact) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const uint4 u = *reinterpret_cast<const uint4*>(kt + tok * S::kRowBytes + (l + j * L) * 16);
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
      if constexpr (MP) {
        const int kind = s_kind[buf * TILE + tok];
        const int n = kind == 2 ? s_psize[buf * TILE + tok] : 0;
        const float bias = n > 0 ? __log2f(float(n)) : 0.0f;
#pragma unroll
        for (int g = 0; g < GC; ++g)
          x[p][g] = kind == 1 ? acc[g] : (n > 0 ? s_pscore[(buf * TILE + tok) * GC + g] + bias : neg_inf());
      } else {
        const bool valid = v0 + tok < vend;
#pragma unroll
        for (int g = 0; g < GC; ++g) x[p][g] = valid ? acc[g] : neg_inf();
      }
    }

    // Online softmax of the warp: one max per head over the tile, shared by all lanes.
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      float mx = x[0][g];
#pragma unroll
      for (int p = 1; p < S::kPasses; ++p) mx = fmaxf(mx, x[p][g]);
#pragma unroll
      for (int off = L; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      if (mx > m[g]) {  // warp-uniform
        const float alpha = fast_exp2(m[g] - mx);  // 0 when m was -inf
#pragma unroll
        for (int c = 0; c < NV * 8; ++c) o[g][c] *= alpha;
        lsum[g] *= alpha;
        m[g] = mx;
      }
    }

    // o += P V.
#pragma unroll
    for (int p = 0; p < S::kPasses; ++p) {
      const int tok = p * S::kTokPerPass + grp;
      float pr[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        pr[g] = m[g] == neg_inf() ? 0.0f : fast_exp2(x[p][g] - m[g]);
        lsum[g] += pr[g];
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const uint4 u = *reinterpret_cast<const uint4*>(vt + tok * S::kRowBytes + (l + j * L) * 16);
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

  // Sum the token groups of the warp (same max), then merge the warps.
#pragma unroll
  for (int off = L; off < 32; off <<= 1)
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      lsum[g] += __shfl_xor_sync(0xffffffffu, lsum[g], off);
#pragma unroll
      for (int c = 0; c < NV * 8; ++c) o[g][c] += __shfl_xor_sync(0xffffffffu, o[g][c], off);
    }
  __syncthreads();  // every warp is done with its ring: reuse it as scratch
  float* red_o = reinterpret_cast<float*>(smem);  // [W][GC][D]
  float* red_ml = red_o + W * GC * D;             // [W][GC][2]
  if (grp == 0) {
#pragma unroll
    for (int g = 0; g < GC; ++g)
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float4* dst = reinterpret_cast<float4*>(red_o + (warp * GC + g) * D + (l + j * L) * 8);
        dst[0] = make_float4(o[g][j * 8 + 0], o[g][j * 8 + 1], o[g][j * 8 + 2], o[g][j * 8 + 3]);
        dst[1] = make_float4(o[g][j * 8 + 4], o[g][j * 8 + 5], o[g][j * 8 + 6], o[g][j * 8 + 7]);
      }
    if (lane == 0)
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        red_ml[(warp * GC + g) * 2] = m[g];
        red_ml[(warp * GC + g) * 2 + 1] = lsum[g];
      }
  }
  __syncthreads();
  if (tid < GC) {
    float mx = neg_inf(), ls = 0.0f;
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, red_ml[(w * GC + tid) * 2]);
    for (int w = 0; w < W; ++w) {
      const float mw = red_ml[(w * GC + tid) * 2];
      if (mw != neg_inf()) ls += red_ml[(w * GC + tid) * 2 + 1] * fast_exp2(mw - mx);
    }
    s_m[tid] = mx;
    s_l[tid] = ls;
  }
  __syncthreads();
  constexpr int kOut = GC * D, kPer = (kOut + 127) / 128;
  float fin[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int idx = tid + r * 128, g = idx / D;
    float sum = 0.0f;
    if (idx < kOut) {
      const float mx = s_m[g];
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float mw = red_ml[(w * GC + g) * 2];
        if (mw != neg_inf()) sum += red_o[w * kOut + idx] * fast_exp2(mw - mx);
      }
    }
    fin[r] = sum;
  }
  __syncthreads();  // scratch reads done before the merge below reuses it

  const int64_t out_row0 = int64_t(b) * Hkv * G + h * G + g0;  // output row of head g0
  if (nsplit == 1) {
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int idx = tid + r * 128, g = idx / D;
      if (idx < kOut && g < gcount) {
        const float ls = s_l[g];
        a.out[(out_row0 + g) * D + idx % D] = ls > 0.0f ? fin[r] / ls : 0.0f;
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
    float tot = 0.0f;
    for (int s = lane; s < nsplit; s += 32) {
      const float* ml = a.part_ml + ((int64_t(base + s) * Hkv + h) * G + g0 + g) * 2;
      const float ms = __ldcg(ml);
      const float ws = ms == neg_inf() ? 0.0f : fast_exp2(ms - mx);
      tot += ws * __ldcg(ml + 1);
      w[s * GC + g] = ws;
    }
    tot = warp_sum(tot);
    const float inv = tot > 0.0f ? 1.0f / tot : 0.0f;
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
