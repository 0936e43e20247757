#pragma once
// Cluster scoring for the whole GQA group: x[i][g] = scale log2(e) q_score_g . c_i for every
// centroid of an entry (sequence, KV head), plus per CTA and head the partial normaliser
// (max, sum_i n_i 2^(x - max)) over the first entry_normed[e] of them, which the selection
// kernel combines. A work item is kScoreChunk centroids x GC heads; each centroid row is read
// once for the GC heads of its item. bf16 / f16 centroids are scored on tensor cores with q
// split into three 16-bit parts (the FMA version issued ~4x the instructions of its FMAs and
// was bound by issue, not by DRAM: gpu-notes item 25); f32 centroids with FMAs.
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

// Shared memory of one pipeline stage: the chunk's centroid rows, the group's scoring
// queries (unscaled f32) and the rows' sizes.
template <int D, int GC, class CT>
struct ScoreStage {
  static constexpr int kRowBytes = D * int(sizeof(CT));
  static constexpr int kRowsBytes = kScoreChunk * kRowBytes;
  static constexpr int kQBytes = GC * D * 4;
  static constexpr int kBytes = kRowsBytes + kQBytes + kScoreChunk * 4;
  static constexpr int kMaxStages = 3;  // two chunks in flight while one is scored
  // Copy layout (also the f32 FMA reader's): a row is read by L lanes, DPL channels each
  // (NV 16-byte vectors), TPW rows per warp and pass, kPasses passes per chunk.
  static constexpr int kEPV = Storage<CT>::kPerVec;  // elements per 16-byte vector
  static constexpr int kDPL = (D == 128 && GC <= 4) ? 16 : 8;
  static constexpr int kL = D / kDPL, kNV = kDPL / kEPV, kTPW = 32 / kL, kTPP = kTPW * 4;
  static constexpr int kPasses = kScoreChunk / kTPP;
  static_assert(kPasses * kTPP == kScoreChunk && GC * D % 4 == 0, "score chunk shape");
  __device__ static const float* queries(const unsigned char* stage) {
    return reinterpret_cast<const float*>(stage + kRowsBytes);
  }
  __device__ static const int32_t* sizes(const unsigned char* stage) {
    return reinterpret_cast<const int32_t*>(stage + kRowsBytes + kQBytes);
  }
};

// One work item: centroid chunk ck of entry (b, h), heads g0 .. g0 + gcount - 1 of the group.
struct ScoreItem {
  int b, ck, h, g0, gcount, cbegin, C, Cn;
};
// Work item w = y * items + x: score item x (a chunk of sequence b) for head chunk y.
template <int GC>
__device__ __forceinline__ ScoreItem score_item(const ScoreArgs& a, int items, int w) {
  ScoreItem it;
  const int x = w % items, y = w / items;
  it.b = a.item_seq[x];
  it.ck = a.item_chunk[x];
  it.h = y / a.head_chunks;
  it.g0 = (y % a.head_chunks) * GC;
  it.gcount = min(GC, a.group - it.g0);
  const int e = it.b * a.num_kv_heads + it.h;
  it.cbegin = a.entry_begin[e];
  it.C = a.entry_count[e];
  it.Cn = a.entry_normed ? a.entry_normed[e] : it.C;
  return it;
}

// Folds score x of a cluster of n tokens into the running (max m, sum z of n 2^(x - m)).
__device__ __forceinline__ void normaliser_add(float& m, float& z, float x, int n) {
  const float mn = fmaxf(m, x);
  z = z * fast_exp2(m - mn) + float(n) * fast_exp2(x - mn);
  m = mn;
}

// f32 centroids: lanes l of a row each take DPL channels of it for the GC heads (FMA), and
// the partial dot products meet by shuffles. Rows sit in the stage at swizzled_offset.
template <int D, int GC, class CT>
__device__ __forceinline__ void score_rows_fma(const ScoreArgs& a, const ScoreItem& it,
                                               const unsigned char* base, float (&s_red)[4][GC][2]) {
  using Stage = ScoreStage<D, GC, CT>;
  const float* s_q = Stage::queries(base);
  const int32_t* s_n = Stage::sizes(base);
  constexpr int EPV = Stage::kEPV, L = Stage::kL, NV = Stage::kNV, TPW = Stage::kTPW, TPP = Stage::kTPP;
  constexpr int kPasses = Stage::kPasses;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, l = lane % L, tok = warp * TPW + lane / L;
  float m[GC], z[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    m[g] = neg_inf();
    z[g] = 0.0f;
  }
  float qr[GC][NV * EPV];
#pragma unroll
  for (int g = 0; g < GC; ++g)
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int c = 0; c < EPV; ++c) qr[g][j * EPV + c] = s_q[g * D + (l + j * L) * EPV + c] * a.qscale;
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int r = k * TPP + tok;
    float acc[GC];
#pragma unroll
    for (int g = 0; g < GC; ++g) acc[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float kf[EPV];
      Storage<CT>::to_float(*reinterpret_cast<const uint4*>(base + swizzled_offset(r, l + j * L, Stage::kRowBytes)), kf);
#pragma unroll
      for (int g = 0; g < GC; ++g)
#pragma unroll
        for (int c = 0; c < EPV; ++c) acc[g] = fmaf(qr[g][j * EPV + c], kf[c], acc[g]);
    }
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1)
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
    const int i = it.ck * kScoreChunk + r, n = s_n[r];
    if (l == 0 && i < it.C) {
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        if (g < it.gcount) a.scores[int64_t(it.cbegin + i) * a.group + it.g0 + g] = acc[g];
        if (n > 0 && i < it.Cn) normaliser_add(m[g], z[g], acc[g], n);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    const float mx = warp_max(m[g]);
    const float zs = warp_sum(m[g] == neg_inf() ? 0.0f : z[g] * fast_exp2(m[g] - mx));
    if (lane == 0) {
      s_red[warp][g][0] = mx;
      s_red[warp][g][1] = zs;
    }
  }
}

// bf16 / f16 centroids on tensor cores: warp w takes rows 16w..16w+15 as the A operand
// (ldmatrix from the swizzled stage), the GC <= 8 heads are the n = 8 columns of B. q is
// split into kParts rounded 16-bit parts (24 mantissa bits for bf16: f32-class scores).
// Lane (gid, tig) ends with rows gid and gid + 8 of heads 2 tig and 2 tig + 1.
template <int D, int GC, class CT>
__device__ __forceinline__ void score_rows_mma(const ScoreArgs& a, const ScoreItem& it,
                                               const unsigned char* base, float (&s_red)[4][GC][2]) {
  using Stage = ScoreStage<D, GC, CT>;
  const float* s_q = Stage::queries(base);
  const int32_t* s_n = Stage::sizes(base);
  static_assert(kScoreChunk == 64 && GC <= 8, "four warps of 16 rows, at most 8 heads");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;  // the lane's ldmatrix row
  mma_rows_three_part<D, CT>(
      d, GC,
      [&](int g, int k) {
        const float2 v = *reinterpret_cast<const float2*>(s_q + g * D + k);
        return make_float2(v.x * a.qscale, v.y * a.qscale);
      },
      [&](int ks) { return base + swizzled_offset(r, ks * 2 + (lane >> 4), Stage::kRowBytes); });
  float m[2] = {neg_inf(), neg_inf()}, z[2] = {0.0f, 0.0f};  // heads 2 tig, 2 tig + 1
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + gid + rr * 8, i = it.ck * kScoreChunk + r, n = s_n[r];
    if (i >= it.C) continue;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int g = tig * 2 + hh;
      if (g < it.gcount) a.scores[int64_t(it.cbegin + i) * a.group + it.g0 + g] = d[rr * 2 + hh];
      if (n > 0 && i < it.Cn) normaliser_add(m[hh], z[hh], d[rr * 2 + hh], n);
    }
  }
  // Across the 8 row groups (lanes of one tig).
#pragma unroll
  for (int off = 4; off < 32; off <<= 1)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[hh], off), zo = __shfl_xor_sync(0xffffffffu, z[hh], off);
      const float mn = fmaxf(m[hh], mo);
      if (mn != neg_inf()) {
        z[hh] = (m[hh] == neg_inf() ? 0.0f : z[hh] * fast_exp2(m[hh] - mn)) + (mo == neg_inf() ? 0.0f : zo * fast_exp2(mo - mn));
        m[hh] = mn;
      }
    }
  if (gid == 0)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      if (tig * 2 + hh < GC) {
        s_red[warp][tig * 2 + hh][0] = m[hh];
        s_red[warp][tig * 2 + hh][1] = z[hh];
      }
}

// Persistent: CTA c scores work items c, c + gridDim.x, ... (item = w % items, head chunk
// y = w / items), each staged through a ring of `stages` (<= kMaxStages) cp.async stages so
// that the next chunks' rows stream in while one is scored. A CTA with one item takes one
// stage: its small shared memory then leaves room for the selection kernel's CTAs, which
// start early (programmatic launch). Thread t copies exactly the row slices it later reads;
// the queries and sizes are shared, hence the barrier per item.
template <int D, int GC, class CT>
__global__ void __launch_bounds__(128, 4) score_kernel(const ScoreArgs a, int items, int work, int stages) {
  using Stage = ScoreStage<D, GC, CT>;
  constexpr int L = Stage::kL, NV = Stage::kNV, TPW = Stage::kTPW, TPP = Stage::kTPP, kPasses = Stage::kPasses;
  const int S = stages;  // 1 .. kMaxStages
  __shared__ float s_red[4][GC][2];
  extern __shared__ __align__(16) unsigned char s_ring[];

  pdl_trigger();  // the selection kernel may start its prologue (it waits for our writes)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Hkv = a.num_kv_heads, G = a.group;
  const int l = lane % L, tok = warp * TPW + lane / L;
  const CT* keys = static_cast<const CT*>(a.key_centroids);

  // Issues the copies of work item w into stage st (nothing past the last item).
  auto issue = [&](int w, int st) {
    if (w >= work) return;
    const ScoreItem it = score_item<GC>(a, items, w);
    unsigned char* base = s_ring + st * Stage::kBytes;
#pragma unroll
    for (int k = 0; k < kPasses; ++k) {
      const int r = k * TPP + tok, i = it.ck * kScoreChunk + r;
      const bool valid = i < it.C;
      const uint4* row = reinterpret_cast<const uint4*>(keys + int64_t(it.cbegin + (valid ? i : 0)) * D);
#pragma unroll
      for (int j = 0; j < NV; ++j)
        cp_async16(base + swizzled_offset(r, l + j * L, Stage::kRowBytes), valid ? row + l + j * L : row, valid);
    }
    const float4* qg = reinterpret_cast<const float4*>(a.q_score + (int64_t(it.b) * Hkv * G + it.h * G + it.g0) * D);
    for (int x = tid; x < GC * D / 4; x += 128) {
      const bool valid = x < it.gcount * D / 4;
      cp_async16(base + Stage::kRowsBytes + x * 16, valid ? qg + x : qg, valid);
    }
    if (tid < kScoreChunk) {
      const int i = it.ck * kScoreChunk + tid;
      cp_async4(base + Stage::kRowsBytes + Stage::kQBytes + tid * 4, a.sizes + it.cbegin + (i < it.C ? i : 0),
                i < it.C);
    }
  };

  for (int s = 0; s < S - 1; ++s) {
    issue(blockIdx.x + s * gridDim.x, s);
    cp_async_commit();
  }
  int st = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < work; w += gridDim.x) {
    issue(w + (S - 1) * gridDim.x, (st + S - 1) % S);  // into the stage scored one item ago
    cp_async_commit();
    if (S == 3)
      cp_async_wait<2>();
    else if (S == 2)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    __syncthreads();  // every thread's copies of item w have landed

    const ScoreItem it = score_item<GC>(a, items, w);
    const unsigned char* base = s_ring + st * Stage::kBytes;
    if constexpr (sizeof(CT) == 2)
      score_rows_mma<D, GC, CT>(a, it, base, s_red);
    else
      score_rows_fma<D, GC, CT>(a, it, base, s_red);
    __syncthreads();
    if (tid < it.gcount) {
      float mx = neg_inf(), zs = 0.0f;
      for (int wp = 0; wp < 4; ++wp) mx = fmaxf(mx, s_red[wp][tid][0]);
      for (int wp = 0; wp < 4; ++wp)
        if (s_red[wp][tid][0] != neg_inf()) zs += s_red[wp][tid][1] * fast_exp2(s_red[wp][tid][0] - mx);
      float* out = a.part + ((int64_t(w % items) * Hkv + it.h) * G + it.g0 + tid) * 2;
      out[0] = mx;
      out[1] = zs;
    }
    __syncthreads();  // stage st and s_red are free for the next item
    st = st + 1 == S ? 0 : st + 1;
  }
  cp_async_wait<0>();  // no copy may outlive the CTA
}

}  // namespace multipole::cuda::detail
