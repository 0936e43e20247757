#pragma once
// Split-KV decode attention for the G <= 16 query heads of one GQA group, over a "virtual
// sequence" of one (sequence, KV head):
//   dense:     virtual position v = cache position v, v in [0, length)
//   multipole: v in [0, exact_cap) = the exact set (rows listed by the selection kernel:
//              sinks, tokens of selected clusters, window), v in [exact_cap, exact_cap + C)
//              = the clusters as pseudo-tokens (logit from the scoring pass + log2 n,
//              value = value centroid); selected and empty clusters carry n = 0 (skipped).
//              With a two-level index the far field is the selection's compact list
//              [exact_cap, exact_cap + far_n): unselected coarse + unselected candidates.
// Each CTA takes one split of the virtual range. Its 4 warps work independently: each
// streams its own 8-token tiles (interleaved over the split) through a private cp.async
// ring of shared-memory stages (16-byte copies, 4 tiles in flight) and keeps its own f32
// online-softmax state; the CTA synchronises only at the end, to merge its warps. The
// per-tile math runs on tensor cores with the group's heads as the M rows (ROWS = 8 or 16):
// S = Q K^T by mma m16n8k16 (K fragments by ldmatrix), O += P V by mma m16n8k8 (V fragments
// by ldmatrix.trans; S's accumulator layout is P's A-fragment layout). Q and P are split into
// a 16-bit high part and a 16-bit remainder (two mma each; one with <= 8 heads, whose padding
// rows carry the remainders), which keeps ~16 mantissa bits:
// f32-class results from bf16/f16 tensor-core inputs, with f32 accumulators and softmax
// state. The last CTA of a (sequence, head) to finish merges the splits (counter in global
// memory), so a decode step is one launch. Logits are in the log2 domain (q pre-scaled by
// scale * log2 e).
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

template <int D, int ROWS, bool MP>
struct AttendShape {
  // Dense: 4 stages (as fast as 5) and no multipole staging.
  static constexpr int kThreads = 128, kWarps = 4, kTile = 8, kStages = MP ? 5 : 4;  // kTile: tokens per warp tile
  static constexpr int GC = ROWS;                             // heads per CTA (rows >= G are padding)
  static constexpr int kRowStride = D * 2;  // unpadded, chunks swizzled (swizzled_offset)
  __device__ __forceinline__ static int chunk_offset(int r, int c) { return swizzled_offset(r, c, kRowStride); }
  static constexpr int kPieces = D / 8;                       // 16-byte pieces per row
  static constexpr int kRowsPerStep = 32 / kPieces;           // rows one warp-wide copy step covers
  static constexpr int kLoadSteps = kTile / kRowsPerStep;     // rows per lane per tile
  static constexpr int kStageBytes = 2 * kTile * kRowStride;  // K tile then V tile
  static constexpr int kWarpRing = kStages * kStageBytes;
  static constexpr int kRingBytes = kWarps * kWarpRing;
  // Multipole staging after the rings, per warp: pseudo scores [stages][tile][GC] f32,
  // sizes and kinds [stages][tile] i32.
  static constexpr int kWarpExtra = MP ? kStages * kTile * (GC + 2) : 0;  // in 4-byte words
  static constexpr int kExtraBytes = kWarps * kWarpExtra * 4;
  static constexpr int kScratch = kRingBytes + kExtraBytes;  // also the merge scratch
  // The merge's (max, sum) per head and the last-CTA flag sit after it, in dynamic shared
  // memory too: a static __shared__ array would shift the dynamic base off the 128-byte
  // alignment the ring layout needs (80 bytes measured: 13 copy wavefronts per 512 bytes).
  static constexpr int kSmem = kScratch + (2 * GC + 1) * 4;
  static_assert(kLoadSteps * kRowsPerStep == kTile, "tile shape");
  static_assert(kMaxSplits * GC * 4 <= kScratch && kWarps * GC * (D + 2) * 4 <= kScratch, "merge scratch must fit");
};

// Row codes: >= 0 pool row of an exact token, -1 nothing (zeros), <= -2 pseudo-token of
// cluster -2 - code (global cluster index).
template <int D, int ROWS, class T, bool MP>
__global__ void __launch_bounds__(128, 2) attend_kernel(const AttendArgs a) {
  using S = AttendShape<D, ROWS, MP>;
  using M = MmaType<T>;
  constexpr int TILE = S::kTile, W = S::kWarps, GC = S::GC, RS = S::kRowStride;
  constexpr int KS = D / 16;  // k-steps of q.K^T
  constexpr int NT = D / 8;   // n-tiles of P.V
  constexpr bool TALL = ROWS > 8;  // rows 8..15 in use
  // With <= 8 heads the high parts (rows 0..7) and the remainders (rows 8..15) of Q and P are
  // stacked in one A fragment, so each product is one mma instead of two; the two halves of
  // S and O (rows g and g + 8) are summed in f32.
  constexpr bool STACK = !TALL;
  extern __shared__ __align__(128) unsigned char smem[];
  float* s_m = reinterpret_cast<float*>(smem + S::kScratch);  // [GC]
  float* s_l = s_m + GC;                                      // [GC]
  int& s_last = *reinterpret_cast<int*>(s_l + GC);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = lane >> 2, tig = lane & 3;  // mma fragment coordinates
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
  // An entry the one-launch step finished (this kernel starts after the selection kernel, which
  // follows that step with a plain launch: the flags are final).
  if (MP && a.fallback && __ldcg(a.fallback + e) == 0) return;
  const int seq = a.seq_ids[b];
  const int nsplit = a.seq_splits[b];
  const int P = a.page_size;
  const int32_t* table = a.tables + a.table_offset[seq];

  // Q as A fragments (rows = heads, pre-scaled), split into a high part and the remainder:
  // qa[k][0] = (row grp, dims 16k + 2 tig + {0,1}), [1] = row grp + 8, [2] = dims + 8, [3] both.
  uint32_t qhi[KS][4], qlo[KS][4];
  {
    auto qv = [&](int g, int d) -> float {
      return g < gcount ? a.q[(int64_t(b) * Hkv * G + h * G + g0 + g) * D + d] * a.qscale : 0.0f;
    };
#pragma unroll
    for (int k = 0; k < KS; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int g = grp + (STACK ? 0 : (r & 1) * 8), d = 16 * k + 2 * tig + (r >> 1) * 8;
        if (!TALL && !STACK && (r & 1)) {
          qhi[k][r] = qlo[k][r] = 0u;
          continue;
        }
        float x0 = qv(g, d), x1 = qv(g, d + 1);
        qhi[k][r] = peel_part<T>(x0, x1);
        qlo[k][r] = peel_part<T>(x0, x1);
        if (STACK && (r & 1)) qhi[k][r] = qlo[k][r];  // rows 8..15: the remainders
      }
  }
  int vlen, ebegin = 0, exact_n = 0;
  if constexpr (MP) {
    pdl_wait();  // above: inputs only; below: the selection kernel's lists
    ebegin = a.entry_begin[e];
    exact_n = min(a.exact_n[e], a.exact_cap);
    vlen = a.exact_cap + (a.far_field ? (a.far_ids ? min(a.far_n[e], a.far_cap) : a.entry_count[e]) : 0);
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

  // Raw row codes are loaded ahead of the tile that uses them (one tile ahead, or 32 for
  // multipole and one-page dense below), so the loads (page table, exact list, far list)
  // never stall the warp: dense keeps the page id (or -1), multipole the final code.
  const int pshift = a.page_shift;
  auto resolve = [&](int v) -> int {
    if (v >= vend) return -1;
    if constexpr (MP) {
      if (v < a.exact_cap) return v < exact_n ? __ldg(a.exact_rows + int64_t(e) * a.exact_cap + v) : -1;
      const int j = v - a.exact_cap;
      return -2 - (ebegin + (a.far_ids ? __ldg(a.far_ids + int64_t(e) * a.far_cap + j) : j));
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

  // Dense with power-of-two pages of >= 8 tokens: a warp tile lies in one page, so one page
  // id per tile and consecutive rows.
  const bool one_page = !MP && pshift >= 3;
  const int piece = lane % S::kPieces, r0 = lane / S::kPieces;
  auto issue = [&](int buf, int t, const int (&raw)[S::kLoadSteps]) {
    unsigned char* kt = ring + buf * S::kStageBytes;
    unsigned char* vt = kt + TILE * RS;
    if (one_page) {
      const int v0 = tile_v0(t);
      const int base = raw[0] < 0 ? -1 : (raw[0] * Hkv + h) * P + (v0 & (P - 1));
      const std::byte* kb = a.keys + (int64_t(base) * D + piece * 8) * 2;
      const std::byte* vb = a.values + (int64_t(base) * D + piece * 8) * 2;
#pragma unroll
      for (int s = 0; s < S::kLoadSteps; ++s) {
        const int r = r0 + s * S::kRowsPerStep;
        const bool valid = base >= 0 && v0 + r < vend;
        cp_async16(kt + S::chunk_offset(r, piece), valid ? kb + r * D * 2 : a.keys, valid);
        cp_async16(vt + S::chunk_offset(r, piece), valid ? vb + r * D * 2 : a.values, valid);
      }
      return;
    }
#pragma unroll
    for (int s = 0; s < S::kLoadSteps; ++s) {
      const int r = r0 + s * S::kRowsPerStep, row = final_row(raw[s], tile_v0(t) + r);
      const bool exact = row >= 0, pseudo = row <= -2;
      const std::byte* ksrc = exact ? a.keys + (int64_t(row) * D + piece * 8) * 2 : a.keys;
      cp_async16(kt + S::chunk_offset(r, piece), ksrc, exact);
      const std::byte* vsrc = a.values;
      if (exact) vsrc = a.values + (int64_t(row) * D + piece * 8) * 2;
      if constexpr (MP) {
        if (pseudo) vsrc = a.value_centroids + (int64_t(-2 - row) * D + piece * 8) * 2;
      }
      cp_async16(vt + S::chunk_offset(r, piece), vsrc, exact || pseudo);
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
  // One page: lane j holds the page id of tile ahead_base + j (pg_cur) and of the 32 tiles after
  // (pg_next), so the page-table load is issued 32 tiles before its use instead of one, and
  // never stalls the warp under a loaded memory system. resolve_tile runs on t = 0, 1, 2, ...
  auto load_pages = [&](int tb) -> int {
    const int t = tb + lane;
    return t < ntiles ? __ldg(table + (tile_v0(t) >> pshift)) : -1;
  };
  int ahead_base = 0, pg_cur = -1, pg_next = -1;
  if (one_page) {
    pg_cur = load_pages(0);
    pg_next = load_pages(32);
  }
  // Multipole the same way: lane j holds the TILE row codes of tile ahead_base + j (cd_cur) and
  // of the 32 tiles after (cd_next). Resolved one tile ahead, each far-field tile (V rows
  // only, little math) waited for its list loads: ~1.2 us per tile and warp (gpu-notes
  // items 13b and 21).
  constexpr int NC = MP ? TILE : 1;
  int cd_cur[NC], cd_next[NC];
  auto load_codes = [&](int tb, int (&c)[NC]) {
    const int t = tb + lane;
#pragma unroll
    for (int r = 0; r < NC; ++r) c[r] = t < ntiles ? resolve(tile_v0(t) + r) : -1;
  };
  if constexpr (MP) {
    load_codes(0, cd_cur);
    load_codes(32, cd_next);
  }
  auto resolve_tile = [&](int t, int (&rows)[S::kLoadSteps]) {
    if constexpr (MP) {
      if (t == ahead_base + 32) {
        ahead_base = t;
#pragma unroll
        for (int r = 0; r < NC; ++r) cd_cur[r] = cd_next[r];
        load_codes(t + 32, cd_next);
      }
      // This lane's rows are r0 + s kRowsPerStep.
#pragma unroll
      for (int r = 0; r < NC; ++r) {
        const int code = __shfl_sync(0xffffffffu, cd_cur[r], t & 31);
        if (r % S::kRowsPerStep == r0) rows[r / S::kRowsPerStep] = code;
      }
    } else if (one_page) {
      if (t == ahead_base + 32) {
        ahead_base = t;
        pg_cur = pg_next;
        pg_next = load_pages(t + 32);
      }
      rows[0] = __shfl_sync(0xffffffffu, pg_cur, t & 31);
    } else {
#pragma unroll
      for (int s = 0; s < S::kLoadSteps; ++s)
        rows[s] = t < ntiles ? resolve(tile_v0(t) + r0 + s * S::kRowsPerStep) : -1;
    }
  };

  // O as NT accumulator fragments: o[j] = (row grp: dims 8j + 2 tig + {0,1}; row grp + 8: same).
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, lsum[2] = {0.0f, 0.0f};  // rows grp and grp + 8

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
    const unsigned char* vt = kt + TILE * RS;

    // S = Q K^T: s[0..1] = (row grp, tokens 2 tig + {0,1}), s[2..3] = row grp + 8.
    // The products go to CH independent accumulators (even/odd k-step when stacked; dense
    // unstacked also hi/lo), which shortens the dependent mma chain per tile.
    constexpr int CH = STACK ? 2 : (MP ? 1 : 4);
    float sc[CH][4] = {};
    const bool any_exact = MP ? v0 < a.exact_cap : true;
    if (any_exact) {
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk) {
        uint32_t kb[4];  // dims 32 kk + 8 m + ..., token rows 0..7
        ldmatrix_x4(kb, kt + S::chunk_offset(lane & 7, kk * 4 + (lane >> 3)));
        M::mma16816(sc[0], qhi[2 * kk], kb[0], kb[1]);
        if constexpr (STACK) {
          M::mma16816(sc[1], qhi[2 * kk + 1], kb[2], kb[3]);
        } else {
          M::mma16816(sc[1 % CH], qlo[2 * kk], kb[0], kb[1]);
          M::mma16816(sc[2 % CH], qhi[2 * kk + 1], kb[2], kb[3]);
          M::mma16816(sc[3 % CH], qlo[2 * kk + 1], kb[2], kb[3]);
        }
      }
    }
    float s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[i] = sc[0][i];
#pragma unroll
      for (int c = 1; c < CH; ++c) s[i] += sc[c][i];
    }
    if constexpr (STACK) {  // row grp = high part + remainder (row grp + 8); no second row
      s[0] += s[2];
      s[1] += s[3];
      s[2] = s[3] = neg_inf();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = 2 * tig + (i & 1), row = grp + (i >> 1) * 8;
      if constexpr (MP) {
        const int kind = s_kind[buf * TILE + tok];
        if (kind == 2) {
          const int n = s_psize[buf * TILE + tok];
          s[i] = n > 0 && row < GC ? s_pscore[(buf * TILE + tok) * GC + row] + __log2f(float(n)) : neg_inf();
        } else if (kind != 1) {
          s[i] = neg_inf();
        }
      } else {
        if (v0 + tok >= vend) s[i] = neg_inf();
      }
    }

    // Online softmax per row: the max over the tile's 8 tokens lives in the 4 lanes of a quad.
    uint32_t phi[2], plo[2];
#pragma unroll
    for (int r = 0; r < (STACK ? 1 : 2); ++r) {
      float mx = fmaxf(s[2 * r], s[2 * r + 1]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      if (mx > m[r]) {
        const float alpha = fast_exp2(m[r] - mx);  // 0 when m was -inf
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          o[j][2 * r] *= alpha;
          o[j][2 * r + 1] *= alpha;
          if constexpr (STACK) {  // rows grp + 8: the same head's remainder part
            o[j][2] *= alpha;
            o[j][3] *= alpha;
          }
        }
        lsum[r] *= alpha;
        m[r] = mx;
      }
      float p0 = m[r] == neg_inf() ? 0.0f : fast_exp2(s[2 * r] - m[r]);
      float p1 = m[r] == neg_inf() ? 0.0f : fast_exp2(s[2 * r + 1] - m[r]);
      lsum[r] += p0 + p1;
      phi[r] = peel_part<T>(p0, p1);
      plo[r] = peel_part<T>(p0, p1);
    }

    // O += P V.
#pragma unroll
    for (int nn = 0; nn < D / 32; ++nn) {
      uint32_t vb[4];  // n-tiles 4 nn + m: (tokens 2 tig + {0,1}, dim 8 (4 nn + m) + grp)
      ldmatrix_x4_trans(vb, vt + S::chunk_offset(lane & 7, nn * 4 + (lane >> 3)));
#pragma unroll
      for (int mm = 0; mm < 4; ++mm) {
        if constexpr (STACK) {
          M::mma1688(o[4 * nn + mm], phi[0], plo[0], vb[mm]);
        } else {
          M::mma1688(o[4 * nn + mm], phi[0], phi[1], vb[mm]);
          M::mma1688(o[4 * nn + mm], plo[0], plo[1], vb[mm]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Row sums over the quad, then merge the warps.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 1);
    lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 2);
  }
  if constexpr (STACK) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      o[j][0] += o[j][2];
      o[j][1] += o[j][3];
    }
  }
  __syncthreads();  // every warp is done with its ring: reuse it as scratch
  float* red_o = reinterpret_cast<float*>(smem);  // [W][GC][D]
  float* red_ml = red_o + W * GC * D;             // [W][GC][2]
#pragma unroll
  for (int r = 0; r < (TALL ? 2 : 1); ++r) {
    const int row = grp + r * 8;
#pragma unroll
    for (int j = 0; j < NT; ++j)
      *reinterpret_cast<float2*>(red_o + (warp * GC + row) * D + 8 * j + 2 * tig) = make_float2(o[j][2 * r], o[j][2 * r + 1]);
    if (tig == 0) {
      red_ml[(warp * GC + row) * 2] = m[r];
      red_ml[(warp * GC + row) * 2 + 1] = lsum[r];
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

  // Last CTA: merge the splits. w[s][g] = 2^(m_s - M) / L. The merge is the step's tail
  // (every other CTA is done), so its L2 reads are batched: one (max, sum) pair per lane and
  // split, then the partial outputs of kBatch splits x kO4 outputs in flight per thread
  // (they were one dependent read per split: batching took 4.4 us off a 32K batch-1 step).
  const int base = a.seq_item_base[b];
  float* w = reinterpret_cast<float*>(smem);  // [nsplit][GC]
  auto ml_of = [&](int s, int g) {
    return __ldcg(reinterpret_cast<const float2*>(a.part_ml) + (int64_t(base + s) * Hkv + h) * G + g0 + g);
  };
  for (int g = warp; g < gcount; g += S::kWarps) {
    const float2 first = lane < nsplit ? ml_of(lane, g) : make_float2(neg_inf(), 0.0f);
    float mx = first.x;
    for (int s = lane + 32; s < nsplit; s += 32) mx = fmaxf(mx, ml_of(s, g).x);
    mx = warp_max(mx);
    float tot = 0.0f;
    for (int s = lane; s < nsplit; s += 32) {
      const float2 ml = s == lane ? first : ml_of(s, g);
      const float ws = ml.x == neg_inf() ? 0.0f : fast_exp2(ml.x - mx);
      tot += ws * ml.y;
      w[s * GC + g] = ws;
    }
    tot = warp_sum(tot);
    const float inv = tot > 0.0f ? 1.0f / tot : 0.0f;
    for (int s = lane; s < nsplit; s += 32) w[s * GC + g] *= inv;
  }
  __syncthreads();
  constexpr int kO4 = GC * D / 4 / 128, kBatch = 16 / kO4;  // float4 outputs per thread, splits per batch
  static_assert(kO4 * 128 == GC * D / 4, "the CTA's 128 threads cover the outputs exactly");
  float4 acc[kO4];
#pragma unroll
  for (int i = 0; i < kO4; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < nsplit; s0 += kBatch) {
    float4 v[kBatch][kO4];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
#pragma unroll
      for (int i = 0; i < kO4; ++i) {
        const int o4 = tid + i * 128, g = o4 / (D / 4), d4 = o4 % (D / 4), s = s0 + j;
        v[j][i] = s < nsplit && g < gcount
                      ? __ldcg(reinterpret_cast<const float4*>(a.part_o + ((int64_t(base + s) * Hkv + h) * G + g0 + g) * D) + d4)
                      : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
#pragma unroll
      for (int i = 0; i < kO4; ++i) {
        const int o4 = tid + i * 128, g = o4 / (D / 4), s = s0 + j;
        const float ws = s < nsplit && g < gcount ? w[s * GC + g] : 0.0f;
        if (ws != 0.0f) {  // splits with nothing in them add nothing, not 0 x their partials
          acc[i].x = fmaf(ws, v[j][i].x, acc[i].x);
          acc[i].y = fmaf(ws, v[j][i].y, acc[i].y);
          acc[i].z = fmaf(ws, v[j][i].z, acc[i].z);
          acc[i].w = fmaf(ws, v[j][i].w, acc[i].w);
        }
      }
  }
#pragma unroll
  for (int i = 0; i < kO4; ++i) {
    const int o4 = tid + i * 128, g = o4 / (D / 4), d4 = o4 % (D / 4);
    if (g < gcount) reinterpret_cast<float4*>(a.out + (out_row0 + g) * D)[d4] = acc[i];
  }
  if (tid == 0) *counter = 0;  // ready for the next launch (or graph replay)
}


}  // namespace multipole::cuda::detail
