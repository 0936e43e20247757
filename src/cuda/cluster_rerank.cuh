#pragma once
// Re-ranking in the one-launch step (fused_step.cuh with kRerank; AttentionConfig::rerank_tokens;
// the CPU rule is MultipolePolicy::rerank, the three-kernel path's rerank.cuh; gpu-notes item 55).
// The finest selection has run under rerank_tokens (<= kMaxRerank) and listed every pick; then
//   1. each CTA scores its share of the picks' rows (rows t = rank + 16 m: member list -> page
//      table -> key row; the real queries' logits, log2 domain) and pushes them into every CTA;
//   2. every CTA alike: per head the normaliser (M, Z) raised to the largest exact logit M', each
//      pick's centroid mass n 2^(x - M') in Z replaced by its exact mass e = sum 2^(l - M'), the
//      importances sum_g e_g / Z'_g / n and the greedy rule under `budget`, whose picks are the
//      exact rows;
//   3. the finest selection's bits rebuilt from the chosen picks; each pick's centroid logits
//      were rewritten to log2(e) + M' - log2(n), so an unchosen one's far-field weight
//      n 2^(x - ref) (one level) or pseudo-row x + log2(n) (two levels) is its exact mass.
// Ties in the exact importance go to the pick found first by the finest selection (the CPU's
// rule: the lower cluster id); only exact ties differ.
#include <cooperative_groups.h>

#include "cuda/cluster_greedy.cuh"
#include "cuda/cluster_step.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail::cluster_step {

constexpr int kMaxRerank = 512;                      // rerank_tokens in one launch: the picks' rows
constexpr int kRerankRows = kMaxRerank / kCtas;      // a CTA's share: 32, 4 a warp
constexpr int kRerankOwned = kMaxRerank / kThreads;  // picks a thread owns (sizes >= 1: picks <= rows)

// Byte offset of the lane's 4 elements of K or V at token `pos` on page `page_id`, KV head h
// (pages of a power-of-two size, a limit of the plan: no division).
__device__ __forceinline__ size_t kv_lane_offset(const FusedStepArgs& a, int page_id, int h, int pos) {
  const int slot = pos & ((1 << a.page_shift) - 1);
  const int64_t row = ((int64_t(page_id) * a.num_kv_heads + h) << a.page_shift) + slot;
  return size_t(row) * (kD * 2) + (threadIdx.x & 31) * 8;
}

struct RerankShared {
  Greedy<kMaxRerank> sel;                    // the rule under budget over the picks (index: the first's pick order)
  int pos[kRerankRows], page[kRerankRows];  // the CTA's rows: token position (-1: none), page id
  float top[kG], dz[kG], zinv[kG], scratch[kG];
};

// first: the finest selection, every pick listed; x: [Keys] float4 its centroid logits by index
// (this CTA's copy; the unchosen picks' are rewritten); logit: [kMaxRerank] float4, at the same
// offset in every CTA; qx: [kG][kD] the real queries times qscale; gmax, gzinv: [kG] the finest
// selection's normaliser (maximum, 1 / sum); red, red_z: [kWarps][kG] scratch. Every thread of
// every CTA of the cluster calls it; returns the selection whose picks are the exact rows.
// kRadix: the rule's radix passes before its walk (one level); without them (two levels) the
// rule walks every pick in turn, ~1.4 us dearer in rounds but 7 KB less code in a kernel whose
// instruction fetch sets its pace (gpu-notes item 57).
template <class CT, bool kRadix, int Keys>
__device__ Greedy<kMaxRerank>& rerank_picks(const cooperative_groups::cluster_group& cluster, const FusedStepArgs& a,
                                            int rank, int h, const int32_t* table, Greedy<Keys, kMaxRerank>& first,
                                            float4* x, float4* logit, const float (*qx)[kD], const float* gmax,
                                            const float* gzinv, float (*red)[kG], float (*red_z)[kG]) {
  __shared__ RerankShared rr;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int np = first.n_picks, T = first.pick_row[np];
  if (tid < kMaxRerank / 32) rr.sel.selected_bits[tid] = 0;

  // 1. The CTA's rows' positions and pages (two dependent loads, from L2: the member lists and
  //    the page table were prefetched), then each warp's four key rows at once and their logits.
  if (tid < kRerankRows) {
    const int t = rank + kCtas * tid;
    int pos = -1, page = 0;
    if (t < T) pos = a.members[first.member_offset(t)], page = table[pos >> a.page_shift];
    rr.pos[tid] = pos, rr.page[tid] = page;
  }
  __syncthreads();
  {
    constexpr int kPer = kRerankRows / kWarps;
    float qr[kG][4];
    lane_queries(qx, qr);
    uint2 kk[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (const int m = warp + kWarps * i; rr.pos[m] >= 0)
        kk[i] = *reinterpret_cast<const uint2*>(a.keys + kv_lane_offset(a, rr.page[m], h, rr.pos[m]));
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int m = warp + kWarps * i;
      if (rr.pos[m] < 0) continue;
      float k4[4], l[kG];
      to_float4<CT>(kk[i], k4);
      warp_dots(qr, k4, l);
      if (lane < kCtas) st_cluster(cluster_addr(&logit[rank + kCtas * m], lane), make_float4(l[0], l[1], l[2], l[3]));
    }
  }
  cluster.sync();

  // 2. M' per head, then each owned pick's exact masses and its part of Z' - Z 2^(M - M'),
  //    e - n 2^(x - M'); Z' and the importances; the greedy rule.
  float M[kG], d[kG];
  {
#pragma unroll
    for (int g = 0; g < kG; ++g) M[g] = -INFINITY, d[g] = 0;
#pragma unroll
    for (int i = 0; i < kMaxRerank / kThreads; ++i) {  // (a fixed trip: ptxas unrolled the open loop)
      if (const int t = tid + kThreads * i; t < T) {
        const float* l = reinterpret_cast<const float*>(&logit[t]);
#pragma unroll
        for (int g = 0; g < kG; ++g) M[g] = fmaxf(M[g], l[g]);
      }
    }
    block_max_sum<true>(M, d, red, red_z, rr.top, rr.scratch);
  }
#pragma unroll
  for (int g = 0; g < kG; ++g) M[g] = fmaxf(gmax[g], rr.top[g]), d[g] = 0;
  float e[kRerankOwned][kG];
#pragma unroll
  for (int r = 0; r < kRerankOwned; ++r) {
    const int p = tid + kThreads * r;
#pragma unroll
    for (int g = 0; g < kG; ++g) e[r][g] = 0;
    if (p >= np) continue;
    const int t0 = first.pick_row[p], t1 = first.pick_row[p + 1];
#pragma unroll 1  // (unrolled, this loop was 13 KB of the kernel's code, fetched every step)
    for (int t = t0; t < t1; ++t) {
      const float* l = reinterpret_cast<const float*>(&logit[t]);
#pragma unroll
      for (int g = 0; g < kG; ++g) e[r][g] += fast_exp2(l[g] - M[g]);
    }
    const float* xc = reinterpret_cast<const float*>(&x[first.pick_j[p]]);
#pragma unroll
    for (int g = 0; g < kG; ++g) d[g] += e[r][g] - float(t1 - t0) * fast_exp2(xc[g] - M[g]);
  }
  {
    float m[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) m[g] = M[g];
    block_max_sum<true>(m, d, red, red_z, rr.scratch, rr.dz);  // (one maximum: the sums add)
  }
  if (tid < kG) {  // (M[tid] would put M in local memory)
    const float mt = fmaxf(gmax[tid], rr.top[tid]);
    const float z = (gzinv[tid] > 0 ? fast_exp2(gmax[tid] - mt) * (1.0f / gzinv[tid]) : 0.0f) + rr.dz[tid];
    rr.zinv[tid] = gzinv[tid] > 0 && z > 0 ? 1.0f / z : 0.0f;
  }
  __syncthreads();
  // Each pick's logits become log2(e) + M' - log2(n), which only an unchosen pick's far field
  // reads: written before the rule, so that the masses' registers are free during it.
  unsigned long long key[kRerankOwned];
  int payload[kRerankOwned];
#pragma unroll
  for (int r = 0; r < kRerankOwned; ++r) {
    const int p = tid + kThreads * r;
    key[r] = 0, payload[r] = 0;
    if (p >= np) continue;
    const int n = first.pick_row[p + 1] - first.pick_row[p];
    const float lift = __log2f(float(n));
    float imp = 0;
    float4 w;
    float* wf = reinterpret_cast<float*>(&w);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      imp += e[r][g] * rr.zinv[g];
      wf[g] = e[r][g] > 0 ? __log2f(e[r][g]) + M[g] - lift : -INFINITY;
    }
    x[first.pick_j[p]] = w;
    key[r] = pick_key(imp * (1.0f / float(n)), p, n), payload[r] = first.pick_first[p];
  }
  greedy_select<kRadix>(key, payload, a.budget, 255, rr.sel, [] {}, [] {});

  // 3. The finest selection's bits: the chosen picks only.
  for (int w = tid; w < Keys / 32; w += kThreads) first.selected_bits[w] = 0;
  __syncthreads();
  for (int p = tid; p < np; p += kThreads)
    if (rr.sel.selected(p)) atomicOr(&first.selected_bits[first.pick_j[p] / 32], 1u << (first.pick_j[p] % 32));
  __syncthreads();
  return rr.sel;
}

}  // namespace multipole::cuda::detail::cluster_step
