#pragma once
// Fused selection + attention for small batches (CudaDecoder::set_fused): one cluster of
// `ctas` CTAs per entry (sequence, KV head), launched after the scoring kernel.
//   - CTA 0 of the cluster (the leader) runs the two-level selection (select_hier_entry)
//     and writes the exact rows and the far list exactly as the unfused path does;
//   - the other CTAs (workers) load their queries meanwhile, then wait at a cluster barrier
//     and share out the entry's virtual positions (exact rows, then the far list's
//     pseudo-tokens) 32 at a time per warp, one per lane: the lane stages its item's key and
//     value rows in shared memory and computes the item's logits for all heads alone (no
//     shuffles per item), the warp takes the softmax over its 32 items per head, then each
//     lane accumulates its D / 32 output dimensions over the 32 items (f32 online state);
//   - each worker merges its warps and stores the result into the leader's shared memory
//     (distributed shared memory), and the leader merges the workers and writes the output.
// Same semantics as attend_kernel<MP = true>: logits in the log2 domain (q pre-scaled by
// scale * log2 e), a pseudo-token's logit is its score + log2 n, values in f32; the dot
// products are plain f32 FMAs (no tensor cores: a few hundred rows per entry). What it saves
// at batch 1 is the attention launch, its split plan and its merge through global memory.
#include <cooperative_groups.h>

#include "cuda/select.cuh"

namespace multipole::cuda::detail {

// Warps of a worker CTA that attend (the rest of the CTA's warps idle: a warp takes 32 items
// at a time, and a batch-1 entry has ~700-1500 of them for 7-15 workers).
constexpr int kFusedWarps = 8;

// A worker's shared memory, in 4-byte words after the dynamic base: the scaled queries
// [G, D], per attending warp (max, sum) [warps, G] each, outputs [warps, G, D] and the 32
// items' probabilities [warps, 32, G], the CTA's partial (max, sum) [G] each and outputs
// [G, D], then per warp the staged rows of its 32 items [warps, 32, 2 (key, value), D] of the
// 16-bit storage type.
struct FusedLayout {
  int q, wm, wl, wo, wp, pm, pl, po, stage, words;
  __host__ __device__ constexpr FusedLayout(int G, int D)
      : q(0),
        wm(G * D),
        wl(wm + kFusedWarps * G),
        wo(wl + kFusedWarps * G),
        wp(wo + kFusedWarps * G * D),
        pm(wp + kFusedWarps * 32 * G),
        pl(pm + G),
        po(pl + G),
        stage((po + G * D + 3) / 4 * 4),
        words(stage + kFusedWarps * 32 * D) {}
};
// Most CTAs per cluster (sizes the leader's gather area).
constexpr int kFusedMaxCtas = 16;
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long x;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(x));
  return x;
}

// Four (or two, D = 64) consecutive 16-bit elements -> floats.
template <class T> __device__ __forceinline__ void to_float4(uint2 u, float (&f)[4]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
  } else {
    __half2 h0, h1;
    memcpy(&h0, &u.x, 4);
    memcpy(&h1, &u.y, 4);
    const float2 a = __half22float2(h0), b = __half22float2(h1);
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
}

// Lane `lane`'s elements (D / 32 consecutive ones) of a staged row of D 16-bit elements.
template <int VPL> __device__ __forceinline__ uint2 lane_elems(const unsigned char* row, int lane) {
  if constexpr (VPL == 4) return *reinterpret_cast<const uint2*>(row + lane * 8);
  return make_uint2(*reinterpret_cast<const unsigned*>(row + lane * 4), 0u);
}

// The worker part: warp gw of the cluster's NW attending warps takes entry e's items
// [gw 32, gw 32 + 32), then NW 32 further, and so on; the CTA's warps are merged into its
// partial state in shared memory. VPL = D / 32.
template <class T, int VPL>
__device__ __forceinline__ void fused_worker(const AttendArgs& t, int e, int D, int gw, int NW, float* sm) {
  constexpr int kMaxG = kFusedMaxGroup;
  constexpr int CPR = VPL * 4;  // 16-byte chunks per row (D / 8)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, G = t.group;
  const FusedLayout L(G, D);
  const float* s_q = sm + L.q;
  float* s_p = sm + L.wp + warp * 32 * G;  // [32 items, G]
  // Written by the leader in this launch: read through L2 (ld.global.cg), never the
  // non-coherent path.
  const int ebegin = t.entry_begin[e];
  const int exact_n = min(__ldcg(t.exact_n + e), t.exact_cap);
  const int far_n = t.far_field ? min(__ldcg(t.far_n + e), t.far_cap) : 0;
  const int nv = exact_n + far_n;
  const int32_t* rows = t.exact_rows + int64_t(e) * t.exact_cap;
  const int32_t* far_ids = t.far_ids + int64_t(e) * t.far_cap;
  unsigned char* stage = reinterpret_cast<unsigned char*>(sm + L.stage) + warp * 32 * 2 * D * 2;
  unsigned char* my_k = stage + lane * 2 * D * 2;  // this lane's item: key row, then value row

  float m[kMaxG], l[kMaxG], o[kMaxG][4];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    m[g] = neg_inf();
    l[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) o[g][j] = 0.0f;
  }
  for (int base = gw * 32; base < nv; base += NW * 32) {
    // This lane's item: code >= 0 exact row, <= -2 the pseudo-token of cluster -2 - code,
    // -1 none; its rows into the staging area, its logits (pseudo-tokens: score + log2 n).
    const int v = base + lane;
    int code = -1, n = 0;
    if (v < exact_n) {
      code = __ldcg(rows + v);
    } else if (v < nv) {
      const int c = ebegin + __ldcg(far_ids + (v - exact_n));
      n = __ldcg(t.far_size + c);
      code = n > 0 ? -2 - c : -1;
    }
    float s[kMaxG];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) s[g] = neg_inf();
    if (code <= -2) {
      const float lg = __log2f(float(n));
#pragma unroll
      for (int g = 0; g < kMaxG; ++g)
        if (g < G) s[g] = __ldcg(t.scores + int64_t(-2 - code) * G + g) + lg;
    }
    // The 32 items' rows into the staging area, one item per warp-wide copy (lane j < 2 CPR:
    // 16-byte chunk j % CPR of the key (j < CPR) or the value row; a pseudo-token has only a
    // value row): coalesced, where one row per lane took ~32 times the L1 requests.
    {
      const int half = lane / CPR, chunk = lane % CPR;
#pragma unroll 1
      for (int i = 0; i < 32; ++i) {
        const int ci = __shfl_sync(0xffffffffu, code, i);
        if (ci == -1 || half > 1 || (ci <= -2 && half == 0)) continue;
        const std::byte* src = ci >= 0 ? (half ? t.values : t.keys) + int64_t(ci) * D * 2
                                       : t.value_centroids + int64_t(-2 - ci) * D * 2;
        cp_async16(stage + (2 * i + half) * D * 2 + chunk * 16, src + chunk * 16, true);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    if (code >= 0) {
      // q . k for every head over the row's 16-byte chunks, started at chunk `lane` so that the
      // warp's loads spread over the banks.
      float acc[kMaxG];
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) acc[g] = 0.0f;
#pragma unroll 1
      for (int c0 = 0; c0 < CPR; ++c0) {
        const int c = (c0 + lane) % CPR;
        float ka[4], kb[4];
        const uint4 raw = *reinterpret_cast<const uint4*>(my_k + c * 16);
        to_float4<T>(make_uint2(raw.x, raw.y), ka);
        to_float4<T>(make_uint2(raw.z, raw.w), kb);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          if (g >= G) break;
          const float4 qa = *reinterpret_cast<const float4*>(s_q + g * D + c * 8);
          const float4 qb = *reinterpret_cast<const float4*>(s_q + g * D + c * 8 + 4);
          acc[g] = fmaf(qa.x, ka[0], fmaf(qa.y, ka[1], fmaf(qa.z, ka[2], fmaf(qa.w, ka[3], acc[g]))));
          acc[g] = fmaf(qb.x, kb[0], fmaf(qb.y, kb[1], fmaf(qb.z, kb[2], fmaf(qb.w, kb[3], acc[g]))));
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) s[g] = acc[g];
    }
    // Softmax over the 32 items per head, folded into the running state.
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= G) break;
      const float mn = fmaxf(m[g], warp_max(s[g]));
      if (mn == neg_inf()) {  // no item yet (warp-uniform)
        s_p[lane * G + g] = 0.0f;
        continue;
      }
      const float corr = fast_exp2(m[g] - mn), p = fast_exp2(s[g] - mn);
      l[g] = l[g] * corr + warp_sum(p);
#pragma unroll
      for (int j = 0; j < VPL; ++j) o[g][j] *= corr;
      m[g] = mn;
      s_p[lane * G + g] = p;
    }
    __syncwarp();
    // o += p V: each lane its D / 32 dimensions, over the warp's items.
    unsigned live = __ballot_sync(0xffffffffu, code != -1);
    while (live) {
      const int i = __ffs(live) - 1;
      live &= live - 1;
      float vv[4];
      to_float4<T>(lane_elems<VPL>(stage + (2 * i + 1) * D * 2, lane), vv);
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) {
        if (g >= G) break;
        const float p = s_p[i * G + g];
#pragma unroll
        for (int j = 0; j < VPL; ++j) o[g][j] = fmaf(p, vv[j], o[g][j]);
      }
    }
    __syncwarp();  // staging and probabilities are rewritten by the next 32 items
  }
  // The CTA's attending warps, merged in warp order.
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    if (g >= G) break;
    if (lane == 0) {
      sm[L.wm + warp * G + g] = m[g];
      sm[L.wl + warp * G + g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < VPL; ++j) sm[L.wo + (warp * G + g) * D + lane * VPL + j] = o[g][j];
  }
}

// The leader's gather area (its dynamic shared memory, free once its selection is written):
// per worker (max, sum) [workers, G] each and outputs [workers, G, D], in 4-byte words.
struct FusedGather {
  int m, l, o, words;
  __host__ __device__ constexpr FusedGather(int G, int D, int workers)
      : m(0), l(workers * G), o(2 * workers * G), words(2 * workers * G + workers * G * D) {}
};

// Merges the CTA's attending warps' states (written by fused_worker) into worker `w`'s slot
// of the leader's gather area (`gather`: the leader's shared memory, distributed), with
// plain stores that need no round trip.
__device__ __forceinline__ void fused_worker_merge(int G, int D, const float* sm, float* gather, int w, int workers) {
  const FusedLayout L(G, D);
  const FusedGather X(G, D, workers);
  for (int i = threadIdx.x; i < G * D; i += kSelectThreads) {
    const int g = i / D;
    float M = neg_inf();
    for (int k = 0; k < kFusedWarps; ++k) M = fmaxf(M, sm[L.wm + k * G + g]);
    float Ls = 0.0f, Os = 0.0f;
    if (M != neg_inf())
      for (int k = 0; k < kFusedWarps; ++k) {
        const float mk = sm[L.wm + k * G + g];
        if (mk == neg_inf()) continue;
        const float f = fast_exp2(mk - M);
        Ls += sm[L.wl + k * G + g] * f;
        Os += sm[L.wo + (k * G + g) * D + (i - g * D)] * f;
      }
    gather[X.o + w * G * D + i] = Os;
    if (i - g * D == 0) {
      gather[X.m + w * G + g] = M;
      gather[X.l + w * G + g] = Ls;
    }
  }
}

// grid: entries * ctas CTAs in clusters of `ctas` (launch attribute), kSelectThreads each;
// dynamic shared memory: max(the selection's, FusedLayout(G, D).words * 4).
template <class KT, class T>
__global__ void __launch_bounds__(kSelectThreads, 1) select_attend_kernel(const SelectArgs a, const AttendArgs t) {
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), ctas = int(cluster.num_blocks());
  const int e = int(blockIdx.x) / ctas, tid = threadIdx.x, G = t.group, D = a.head_dim;
  extern __shared__ __align__(16) unsigned char fused_smem[];
  float* sm = reinterpret_cast<float*>(fused_smem);
  const FusedLayout L(G, D);
  const bool prof = a.prof != nullptr && tid == 0 && rank <= 1;
  const unsigned long long t0 = prof ? global_ns() : 0;
  unsigned long long t1 = t0, t2 = t0, t3 = t0;

  if (rank == 0) {
    select_hier_entry<KT, false>(a, e);
    if (prof) t1 = global_ns();
  } else {
    const int b = e / t.num_kv_heads, h = e % t.num_kv_heads;
    for (int i = tid; i < G * D; i += kSelectThreads)
      sm[L.q + i] = t.q[(int64_t(b) * t.num_kv_heads * G + int64_t(h) * G) * D + i] * t.qscale;
    pdl_wait();  // the scoring kernel's logits (the far field's pseudo-token scores)
  }
  cluster.sync();  // the leader's exact rows and far list are written (release / acquire)
  if (prof) t2 = global_ns();
  if (rank != 0) {
    const int warp = tid >> 5, gw = (rank - 1) * kFusedWarps + warp, NW = (ctas - 1) * kFusedWarps;
    if (warp < kFusedWarps) {
      if (D == 64)
        fused_worker<T, 2>(t, e, D, gw, NW, sm);
      else
        fused_worker<T, 4>(t, e, D, gw, NW, sm);
    }
    __syncthreads();
    fused_worker_merge(G, D, sm, cluster.map_shared_rank(sm, 0), rank - 1, ctas - 1);
    if (prof) {
      atomicAdd(a.prof + kProfFusedWorkerWait, t2 - t0);
      atomicAdd(a.prof + kProfFusedAttend, global_ns() - t2);
    }
  }
  cluster.sync();  // the workers' partials are in the leader's shared memory
  if (prof) t3 = global_ns();
  if (rank == 0) {
    const int b = e / t.num_kv_heads, h = e % t.num_kv_heads, workers = ctas - 1;
    const FusedGather X(G, D, workers);
    for (int i = tid; i < G * D; i += kSelectThreads) {
      const int g = i / D;
      float M = neg_inf();
      for (int w = 0; w < workers; ++w) M = fmaxf(M, sm[X.m + w * G + g]);
      float Ls = 0.0f, Os = 0.0f;
      if (M != neg_inf())
        for (int w = 0; w < workers; ++w) {
          const float mw = sm[X.m + w * G + g];
          if (mw == neg_inf()) continue;
          const float f = fast_exp2(mw - M);
          Ls += sm[X.l + w * G + g] * f;
          Os += sm[X.o + w * G * D + i] * f;
        }
      t.out[(int64_t(b) * t.num_kv_heads * G + int64_t(h) * G) * D + i] = Ls > 0.0f ? Os / Ls : 0.0f;
    }
    if (prof) {
      atomicAdd(a.prof + kProfFusedSelect, t1 - t0);
      atomicAdd(a.prof + kProfFusedSync1, t2 - t1);
      atomicAdd(a.prof + kProfFusedSync2, t3 - t2);
      atomicAdd(a.prof + kProfFusedMerge, global_ns() - t3);
      atomicAdd(a.prof + kProfFusedLaunches, 1ull);
    }
  }
}

}  // namespace multipole::cuda::detail
