#pragma once
// The Multipole decode step over a two-level index in one launch (gpu-notes items 35, 36, 44): one
// 16-CTA thread-block cluster per (sequence, KV head) runs the rule of score -> select_hier ->
// attend, so a step costs one launch and no round trip through global memory:
//   1. each CTA stages its slice of the coarse key centroids (from the plan's counts at entry,
//      again where the entry's count changed since), scores it for the group's heads
//      and pushes the logits and the slice's per-head (max, sum) into every CTA of the
//      cluster, then stages its value centroids;
//   2. every CTA runs the same coarse selection under coarse_budget (per-head normalisers
//      merged from the slices' parts, importances, the greedy rule of cluster_greedy.cuh) and
//      lists the same candidates: the children of the selected coarse clusters, in ascending
//      fine id (a bitmap);
//   3. each warp scores its share of the candidates from global memory, keeps their value rows
//      in registers and pushes their logits into every CTA;
//   4. every CTA normalises over the frontier (unselected coarse clusters and all candidates)
//      and runs the same fine selection under budget;
//   5. the exact rows (sinks, the selected clusters' members, the tokens past the clustered
//      region), the far field (the CTA's unselected coarse centroids, staged, and its warps'
//      unselected candidates as pseudo-rows with a log2-size lift), and the merge of the 16
//      states, each CTA pushing them through distributed shared memory to the CTAs that write
//      1/16 of the output each (gpu-notes item 61).
// Over an index of one level (kHier = false; at most kMaxCoarse clusters an entry, 32K tokens at
// 16 a cluster) its clusters take the coarse clusters' place in 1 and in 2's selection, under
// `budget`; 3 and 4 drop out, and 5 takes their members as the selected rows, with no pseudo-rows.
// The plan (decoder.cpp) takes this path only where it holds: head dim 128, G <= 4 (heads
// padded to 4), 16-bit keys in the cache's type, pages of a power-of-two size, at most
// kMaxCoarse coarse clusters and kMaxFineIds fine ones per entry, at most kMaxCand candidates
// (a bound computed from the index, or any number with a fallback: an entry that lists more
// stops after its coarse selection, writes its coarse logits and normalisers, marks itself in
// FusedStepArgs::fallback and is finished by the selection and attention kernels launched
// behind this one), at most kSlots * 128 exact rows, budget <= kMaxPicks. Without a fallback, a
// step that finds more candidates (an index changed since the plan) sets error bit 2.
// Code size is time (gpu-notes item 39): after an L2 flush, as between a model's layers, each
// CTA fetches the ~120 KB it runs from DRAM, at ~0.1-0.2 us per KB. So no exp2f (fast_exp2),
// no division, warp reductions of the four heads transposed, loops over heads unrolled only
// where the registers need it.
#include <cooperative_groups.h>

#include "cuda/cluster_greedy.cuh"
#include "cuda/cluster_rerank.cuh"
#include "cuda/cluster_step.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail::cluster_step {

constexpr int kMaxCoarse = 2048;                         // coarse clusters per entry (128 a CTA)
constexpr int kOwned = kMaxCoarse / kThreads;             // coarse clusters per thread in the selection
constexpr int kRun = kMaxCoarse / kThreads;               // consecutive coarse clusters per thread when listing
constexpr int kMaxCand = 512;                            // candidates per entry
constexpr int kOwnedCand = kMaxCand / kThreads;          // candidates per thread in the fine selection
constexpr int kCandSlots = kMaxCand / (kCtas * kWarps);  // candidates per warp
constexpr int kSlots = 4;                                // exact rows per warp (512 an entry)
constexpr int kMaxFineIds = 16384;                       // fine clusters per entry (the candidate bitmap)
constexpr int kFineWords = kMaxFineIds / 32;
static_assert(kD == FusedStepLimits::kHeadDim && kG == FusedStepLimits::kGroup &&
              kMaxPicks == FusedStepLimits::kMaxBudget && kSlots * kCtas * kWarps == FusedStepLimits::kExactRows &&
              kMaxCoarse == FusedStepLimits::kMaxCoarse && kMaxFineIds == FusedStepLimits::kMaxFine &&
              kMaxCand == FusedStepLimits::kMaxCand && kCtas == FusedStepLimits::kCtasPerEntry &&
              kMaxRerank == FusedStepLimits::kMaxRerank && kMaxRerank == kMaxCand,
              "the plan's limits (launch.hpp) are the kernel's");

// Dynamic shared memory: [per_max] staged rows (coarse keys, then values, then the warps'
// partial sums), [kMaxCoarse] float4 coarse logits, [kMaxCand] float4 candidate logits (one level
// with re-ranking: the picks' rows' logits), two levels with re-ranking [kMaxRerank] float4 those.
inline size_t fused_step_smem_bytes(int max_coarse, bool rerank_two_levels = false) {
  const size_t per_max = size_t(max_coarse + kCtas - 1) / kCtas;
  const size_t staged = per_max * kRowStride, part = size_t(kWarps) * kG * kD * sizeof(float);
  return (staged > part ? staged : part) + size_t(kMaxCoarse + kMaxCand + (rerank_two_levels ? kMaxRerank : 0)) * sizeof(float4);
}

// The lane's dims [4 lane, 4 lane + 4) of K and V at token `pos` of the entry's sequence, on
// page `page_id` (read from the sequence's table; load_kv_lane reads it). (Pages of a power-of-two
// size only, a limit of the plan: no division. Rows in 32 bits, which DeviceKVCache allows, saved
// 2 KB of code but made the kernel spill.)
__device__ __forceinline__ void load_kv_page(const FusedStepArgs& a, int page_id, int h, int pos, uint2& k, uint2& v) {
  const size_t off = kv_lane_offset(a, page_id, h, pos);
  k = *reinterpret_cast<const uint2*>(a.keys + off);
  v = *reinterpret_cast<const uint2*>(a.values + off);
}
__device__ __forceinline__ void load_kv_lane(const FusedStepArgs& a, const int32_t* table, int h, int pos, uint2& k,
                                             uint2& v) {
  load_kv_page(a, table[pos >> a.page_shift], h, pos, k, v);
}

// CTA `rank`'s slice [c0, c0 + n) of an entry's C clusters scored first: ceil(C / kCtas) a CTA.
struct Slice {
  int c0, n;
};
__device__ __forceinline__ Slice slice_of(int C, int rank) {
  const int per = (C + kCtas - 1) / kCtas;
  return {rank * per, max(0, min(per, C - rank * per))};
}

// Phases of the profiled variant (kProf; FusedStepArgs::prof): the clock64 cycles of each, per
// CTA, into slots [0, kFusedPhases); the names are the bench's (bench.cpp, MULTIPOLE_STEP_PROFILE).
// Then per selection (coarse, fine): its picks, those taken at once by the radix passes, and the
// cycles of the walk's rounds after them; then per selection the cycles of its radix passes and of
// the listing of the picks they take at once.
constexpr int kFusedPhases = 14;

// kHier = false: an index of one level (at most kMaxCoarse clusters an entry). Its clusters take
// the coarse clusters' place in parts 1-3 below, selected under `budget` with their member
// offsets as payloads, and their members are the exact rows: parts 4-6 drop out (gpu-notes item 44).
// kFarReal: the far field at real positions (FusedStepArgs::position_sums): the far clusters'
// logits (the unselected coarse ones in 8, the unselected candidates in 9) from the exact query
// against their key centroids rotated to their mean positions, read again from L2.
// kRerank: the finest selection under FusedStepArgs::rerank tokens, its picks re-ranked by their
// members' exact logits (cluster_rerank.cuh) into the exact rows under budget.
template <class CT, bool kProf, bool kHier, bool kFarReal = false, bool kRerank = false>
__global__ void __launch_bounds__(kThreads, 2) fused_step_kernel(const FusedStepArgs a) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), e = blockIdx.x / kCtas;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Hkv = a.num_kv_heads, G = a.group, b = e / Hkv, h = e % Hkv;
  // C: the clusters scored first (coarse, or the one level's), F: the fine ones under them.
  const int cb = a.entry_begin[e], C = kHier ? a.entry_coarse[e] : a.entry_count[e], F = kHier ? a.entry_count[e] - C : 0;
  const int fb = cb + C;
  const int seq = a.seq_ids[b], len = a.lengths[seq], end = a.entry_end[e];
  const int nsink = min(a.sinks, end), ntail = len - end, nfixed = nsink + ntail;
  const int32_t* table = a.tables + a.table_offset[seq];
  // The group's queries, elements tid and tid + kThreads of [kG][kD] (padded heads zero), loaded
  // while the look-ups above are out: they go into shared memory at the end of the prologue.
  static_assert(kG * kD == 2 * kThreads, "two query elements a thread");
  const size_t qrow = (size_t(b) * Hkv + size_t(h)) * size_t(G) * kD;  // [B, Hkv * G, D]: head h * G + g
  float q_in[2][2];  // [element][scoring, exact]
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int i = tid + k * kThreads;
    const bool real = i / kD < G;
    q_in[k][0] = real ? a.q_score[qrow + i] : 0.0f;
    q_in[k][1] = real ? a.q[qrow + i] : 0.0f;
  }
  PhaseClock pc(kProf ? a.prof : nullptr, kPhaseClockSlots);
  if constexpr (kProf)
    if (a.prof_return) return;  // (no atomics: their wait would count)
  // Every CTA of the cluster must have started before another stores into its shared memory.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  extern __shared__ __align__(16) uint8_t smem[];
  const int per_max = (a.max_coarse + kCtas - 1) / kCtas;
  uint8_t* staged = smem;
  const CT* keys = static_cast<const CT*>(a.key_centroids);
  // 1a. The CTA's key slice as the plan saw the entry (FusedStepArgs::planned_begin), copied now:
  //     cb and C are a DRAM round trip away, and the scoring waits for these rows.
  const bool ahead = e < a.planned_entries;
  const int pcb = ahead ? a.planned_begin[e] : 0, pC = ahead ? a.planned_count[e] : 0;
  if (ahead) {
    const Slice p = slice_of(pC, rank);
    stage_rows(staged, keys + size_t(pcb + p.c0) * kD, min(p.n, per_max));
  }
  const auto [c0, n_local] = slice_of(C, rank);
  const size_t part_bytes = size_t(kWarps) * kG * kD * sizeof(float);
  const size_t staged_bytes = size_t(per_max) * kRowStride;
  float4* xall = reinterpret_cast<float4*>(smem + (staged_bytes > part_bytes ? staged_bytes : part_bytes));
  float4* xcand = xall + kMaxCoarse;
  float(*part)[kG][kD] = reinterpret_cast<float(*)[kG][kD]>(smem);  // after the far field
  __shared__ float qs[kG][kD], qx[kG][kD];                           // scoring and exact queries
  __shared__ State st;
  __shared__ float red[kWarps][kG], red_z[kWarps][kG], gmax[kG], gzinv[kG], own_m[kG], own_z[kG];
  __shared__ float2 slice_norm[kCtas][kG];  // each CTA's (max, sum) over its slice of the first-stage clusters
  // (With re-ranking the finest selection lists picks worth up to kMaxRerank tokens.)
  __shared__ Greedy<kMaxCoarse, kRerank && !kHier ? kMaxRerank : kMaxPicks> coarse_sel;
  __shared__ Greedy<kMaxCand, kRerank && kHier ? kMaxRerank : kMaxPicks> fine_sel;
  __shared__ int cand_fine[kMaxCand], cand_size[kMaxCand], warp_total[kWarps];
  __shared__ int row_member[kMaxPicks];  // the selected rows' offsets in the member lists
  __shared__ uint32_t is_cand[kFineWords];
  __shared__ StateScratch sc;

  const CT* values = static_cast<const CT*>(a.value_centroids);
  const int fine_budget = kRerank ? a.rerank : a.budget;  // the finest selection's
  const int first_budget = kHier ? a.coarse_budget : fine_budget;
  const int first_cap = first_budget + 1;  // a larger cluster never fits: its key size is capped here

  // 1. Only what is one round trip away: the coarse key slice staged, this thread's coarse
  //    clusters of the selection (j = tid + 256 r) and the child-list starts of those of the
  //    listing (j = 8 tid + i, i <= 8: one more for the last list's end), the queries (padded
  //    heads zero, loaded above). The fixed rows' page ids, two round trips away, are read after
  //    the scoring. The key slice only where 1a did not stage it (or staged another).
  if (!ahead || pcb != cb || pC != C) {
    cp_async_wait<0>();  // 1a's copies land before these overwrite them
    stage_rows(staged, keys + size_t(cb + c0) * kD, n_local);
  }
  // own_first: the member offsets the selection lists its rows by (one level; the coarse
  // selection lists none). Sizes stay as loaded (>= 0 by DeviceClusterIndex's checks) and are
  // clamped only where a negative one would count: a clamp as they arrived stalled the prologue
  // for their round trip.
  int own_n[kOwned], own_first[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = tid + r * kThreads;
    own_n[r] = j < C ? a.sizes[cb + j] : 0;
    own_first[r] = !kHier && j < C ? a.member_begin[cb + j] : 0;
  }
  int run_child[kRun + 1];  // (cb + C is the first fine cluster when F > 0; without one nothing is selected)
  if constexpr (kHier) {
#pragma unroll
    for (int i = 0; i <= kRun; ++i)
      run_child[i] = kRun * tid + i < C || (kRun * tid + i == C && F > 0) ? a.member_begin[cb + kRun * tid + i] : 0;
  }
  const int local_n = tid < n_local ? a.sizes[cb + c0 + tid] : 0;  // (as own_n)
  const int local_first = !kHier && tid < n_local ? a.member_begin[cb + c0 + tid] : 0;
  if (tid < kMaxCoarse / 32) coarse_sel.selected_bits[tid] = 0;
  if constexpr (kHier) {
    if (tid < kMaxCand / 32) fine_sel.selected_bits[tid] = 0;
    for (int w = tid; w < kFineWords; w += kThreads) is_cand[w] = 0;
  }
  // The scoring queries also in parts for the tensor cores, in xcand's room: no CTA stores into
  // it before the first cluster barrier, and this CTA's scoring is done before it arrives there.
  static_assert(sizeof(QueryParts) <= kMaxCand * sizeof(float4), "the query parts live in xcand");
  QueryParts& qparts = *reinterpret_cast<QueryParts*>(xcand);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int i = tid + k * kThreads, g = i / kD, d = i % kD;
    const float x = q_in[k][0] * a.qscale, next = __shfl_down_sync(0xffffffffu, x, 1);
    if constexpr (kHier) qs[g][d] = x;  // (read only by the candidates' scoring)
    qx[g][d] = q_in[k][1] * a.qscale;
    if (d % 2 == 0) put_query_pair<CT>(qparts, g, d, x, next);
  }
  // The warp's rows: slots [0, kSlots) exact rows (row j of the entry's list, sinks, the
  // tokens past the clustered region, then the selected clusters' members in pick order, goes
  // to CTA j % 16, warp (j / 16) % 8, slot j / 128); slots [kSlots, +kCandSlots) candidates
  // (candidate k likewise), pseudo-rows of the far field unless selected.
  constexpr int kAll = kSlots + kCandSlots;
  uint2 kr[kSlots], vr[kAll];
  bool has_row[kAll];
  float lift[kCandSlots];
#pragma unroll
  for (int i = 0; i < kCandSlots; ++i) lift[i] = -INFINITY;
#pragma unroll
  for (int i = 0; i < kAll; ++i) has_row[i] = false;

  // Every fine cluster's size and member offset into L2 (32 ints a 128-byte line): the
  // candidates' are read after the listing.
  if (const int gt = rank * kThreads + tid; kHier && gt < (F + 31) / 32)
    prefetch_l2(a.sizes + fb + 32 * gt), prefetch_l2(a.member_begin + fb + 32 * gt);

  pc.mark(0);
  // 2. Coarse logits of the local slice, pushed to every other CTA; the value slice staged.
  __syncthreads();  // the query parts (and qs) complete
  score_and_push_slice<CT>(cluster, staged, n_local, qparts, xall, c0, values + size_t(cb + c0) * kD);
  {
    // The slice's normaliser part (per head: max, sum of n 2^(x - max)), pushed into every CTA:
    // after the barrier the normalisers are a merge of 16 parts, not a pass over every cluster.
    const float4 x = tid < n_local ? xall[c0 + tid] : make_float4(0, 0, 0, 0);
    float m[kG], z[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g)
      m[g] = local_n > 0 ? reinterpret_cast<const float*>(&x)[g] : -INFINITY, z[g] = local_n > 0 ? float(local_n) : 0.0f;
    block_max_sum<true>(m, z, red, red_z, own_m, own_z);
    if (const int g = tid % kG; tid < kCtas * kG)
      st_cluster(cluster_addr(&slice_norm[rank][g], tid / kG), make_float2(own_m[g], own_z[g]));
  }
  // The fixed rows' page ids (two round trips from the start: in the prologue the warps stalled
  // on them before the scoring could start) and the page table into L2 (its lines spread over
  // the cluster: the selected rows look it up); the fixed rows are issued with the selected ones.
  // (With re-ranking they are read after it: their registers would spill there.)
  int fixed_page[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int j = rank + kCtas * (warp + kWarps * i);
    fixed_page[i] = !kRerank && j < nfixed ? table[(j < nsink ? j : end + (j - nsink)) >> a.page_shift] : 0;
  }
  if (const int line = tid * kCtas + rank; line * 32 < ((len - 1) >> a.page_shift) + 1) prefetch_l2(table + 32 * line);
  pc.mark(1);
  cluster.sync();
  pc.mark(2);
  // This thread's child lists into L2 while the coarse selection runs (their ids are read after
  // it); one level: the member list's head of each cluster of the CTA's slice (its rows').
  if constexpr (kHier) {
    if (kRun * tid < C)
      for (int at = run_child[0] & ~31; at < run_child[kRun]; at += 32) prefetch_l2(a.members + at);
  } else if (tid < n_local && local_n > 0) {
    prefetch_l2(a.members + local_first);
  }

  // The greedy rule (cluster_greedy.cuh) of selection `which` (0 coarse or one level, 1 fine); the
  // profiled variant adds the cycles of its walk's rounds, of its radix passes and of the listing of
  // the picks they take at once into the slots after the phases.
  const auto select_timed = [&](auto& key, const auto& payload, int budget, auto& sel, int which) {
    if constexpr (kProf) {
      const long long begin = clock64();
      long long radix = 0, walk = 0;
      greedy_select<true>(key, payload, budget, 255, sel, [&] { radix = clock64(); }, [&] { walk = clock64(); });
      pc.add(kFusedPhases + 3 * which + 2, int(clock64() - walk)), pc.add(kFusedPhases + 6 + 2 * which, int(radix - begin)),
          pc.add(kFusedPhases + 7 + 2 * which, int(walk - radix));
    } else {
      greedy_select<true>(key, payload, budget, 255, sel, [] {}, [] {});
    }
  };
  // 3. Coarse normalisers Z_g = sum_j n_j 2^(x_gj - M_g) (the CTAs' slice parts merged),
  //    importances, the greedy rule under the coarse budget (one level: the normalisers over
  //    every cluster, the rule under budget).
  const auto coarse_x = [&](int r) {
    const int j = tid + r * kThreads;
    return j < C ? xall[j] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
  };
  merge_slice_norms(slice_norm, gmax, gzinv, G);
  pc.mark(3);
  {
    unsigned long long key[kOwned];
#pragma unroll
    for (int r = 0; r < kOwned; ++r) {  // (importance of every slot, then a select: no branch a key)
      const float imp = importance(coarse_x(r), gmax, gzinv);
      key[r] = own_n[r] > 0 ? pick_key(imp, tid + r * kThreads, min(own_n[r], first_cap)) : 0ull;
    }
    select_timed(key, own_first, first_budget, coarse_sel, 0);
  }
  pc.mark(4);
  if constexpr (kProf) pc.add(kFusedPhases, coarse_sel.all_picks), pc.add(kFusedPhases + 1, coarse_sel.all_prefix_picks);

  int n_cand = 0;  // (two levels)
  if constexpr (kHier) {
    // 4. Candidates: the children of the selected coarse clusters, marked in a bitmap of fine ids
    //    and listed in ascending id, the order of the three-kernel path. (Empty children stay:
    //    they carry no weight and leave the others' order as it is.) Thread t's selected coarse
    //    clusters of [8 t, 8 t + 8) and their child counts are scanned over the block into a
    //    list of child ranges; then every thread reads the ids of at most two children, so the
    //    listing costs one round trip however the selected clusters fall on the threads. An
    //    entry without a coarse level (too short for one) has every fine cluster as a candidate.
    {
      static_assert(kRun == 8, "a thread's run is one byte of the selection's bits");
      const unsigned run_sel = (coarse_sel.selected_bits[tid / 4] >> (8 * (tid % 4))) & 0xffu;
      int mine = 0;  // (children << 16) + selected clusters of this thread's run
#pragma unroll
      for (int i = 0; i < kRun; ++i)
        if ((run_sel >> i) & 1u) mine += ((run_child[i + 1] - run_child[i]) << 16) + 1;
      const int inc = warp_inclusive_sum(mine);
      if (lane == 31) warp_total[warp] = inc;
      __syncthreads();
      int at = inc - mine, total = 0;
      for (int w = 0; w < kWarps; ++w) at += w < warp ? warp_total[w] : 0, total += warp_total[w];
      // Each selected cluster has a child, so under the plan's bound lists <= children <= kMaxCand.
      int* list_first = cand_fine;  // [lists] first flattened child of each list (free until the compaction)
      int* list_begin = cand_size;  // [lists] its start in members
      int k = at & 0xffff, first = at >> 16;
#pragma unroll
      for (int i = 0; i < kRun; ++i)
        if ((run_sel >> i) & 1u) {
          if (k < kMaxCand) list_first[k] = first, list_begin[k] = run_child[i];
          ++k, first += run_child[i + 1] - run_child[i];
        }
      const int lists = min(total & 0xffff, kMaxCand), children = total >> 16;
      // More candidates than the kernel holds (every CTA of the cluster sees the same count):
      // with a fallback the entry is left to the selection and attention kernels launched after this one.
      const bool over = (C > 0 ? children : a.entry_count[e]) > kMaxCand;  // (C = 0: F, read again)
      if (tid == 0 && rank == 0) {
        if (a.fallback) a.fallback[e] = over ? 1 : 0;
        else if (over) atomicOr(a.error_flags, 4u);
      }
      if (over && a.fallback) {
        for (int i = tid; i < n_local * G; i += kThreads)
          a.scores[size_t(cb + c0 + i / G) * G + i % G] = reinterpret_cast<const float*>(&xall[c0 + i / G])[i % G];
        if (rank == 0) {
          const int sb = a.seq_score_base[b], nch = a.seq_score_chunks[b];
          for (int i = tid; i < nch * G; i += kThreads) {
            float* p = a.part + ((size_t(sb + i / G) * Hkv + h) * G + i % G) * 2;
            const bool whole = i < G;
            p[0] = whole ? gmax[i] : -INFINITY;
            p[1] = whole && gzinv[i] > 0 ? 1.0f / gzinv[i] : 0.0f;
          }
        }
        cp_async_wait<0>();  // the value slice's copies must not outlive the CTA
        return;
      }
      __syncthreads();
#pragma unroll 1
      for (int x = tid; x < min(children, kMaxCand); x += kThreads) {
        int lo = 0, hi = lists;  // the last list with list_first[lo] <= x
        while (hi - lo > 1) {
          const int mid = (lo + hi) / 2;
          if (list_first[mid] <= x) lo = mid;
          else hi = mid;
        }
        const int f = a.members[list_begin[lo] + (x - list_first[lo])];
        atomicOr(&is_cand[f / 32], 1u << (f % 32));
      }
#pragma unroll 1
      for (int f = tid; C == 0 && f < F; f += kThreads) atomicOr(&is_cand[f / 32], 1u << (f % 32));
    }
    __syncthreads();
    {
      constexpr int kWordsPer = kFineWords / kThreads;  // consecutive words per thread
      const int words = (F + 31) / 32;
      int count = 0;
#pragma unroll
      for (int i = 0; i < kWordsPer; ++i) count += kWordsPer * tid + i < words ? __popc(is_cand[kWordsPer * tid + i]) : 0;
      const int inc = warp_inclusive_sum(count);
      if (lane == 31) warp_total[warp] = inc;
      __syncthreads();
      int k = inc - count;
      for (int w = 0; w < kWarps; ++w) k += w < warp ? warp_total[w] : 0, n_cand += warp_total[w];
#pragma unroll
      for (int i = 0; i < kWordsPer; ++i) {
        const int w = kWordsPer * tid + i;
        if (w >= words) continue;
        for (uint32_t bits = is_cand[w]; bits; bits &= bits - 1, ++k)
          if (k < kMaxCand) cand_fine[k] = 32 * w + __ffs(int(bits)) - 1;
      }
      n_cand = min(n_cand, kMaxCand);  // (more only if over, flagged above)
      __syncthreads();
    }
    // (Copying these into shared memory by cp.async while the candidates are scored, to free
    // the registers, made the step ~1 us slower: the copies were awaited before the barrier.)
    int cand_n[kOwnedCand], cand_off[kOwnedCand];
#pragma unroll
    for (int r = 0; r < kOwnedCand; ++r) {
      const int k = tid + r * kThreads;
      cand_n[r] = k < n_cand ? a.sizes[fb + cand_fine[k]] : 0;  // (unclamped, as own_n)
      cand_off[r] = k < n_cand ? a.member_begin[fb + cand_fine[k]] : 0;
    }

    pc.mark(5);
    // 5. This warp's candidates: logits pushed into every CTA (lane r < 16 stores into CTA r),
    //    value rows and log2 sizes kept for the far field. Every load is issued before any is
    //    used: a size used as it came cost a round trip a slot.
    {
      float qr[kG][4];
      lane_queries(qs, qr);
      uint2 ck[kCandSlots];
      int ck_n[kCandSlots];
#pragma unroll
      for (int i = 0; i < kCandSlots; ++i) {
        const int k = rank + kCtas * (warp + kWarps * i);
        ck_n[i] = 0;
        if (k >= n_cand) continue;
        const size_t row = size_t(fb + cand_fine[k]) * kD + lane * 4;
        ck[i] = *reinterpret_cast<const uint2*>(keys + row);
        if constexpr (!kRerank) vr[kSlots + i] = *reinterpret_cast<const uint2*>(values + row);  // (else after it)
        ck_n[i] = a.sizes[fb + cand_fine[k]];
      }
#pragma unroll
      for (int r = 0; r < kOwnedCand; ++r) {
        const int k = tid + r * kThreads;
        if (k < n_cand) cand_size[k] = max(cand_n[r], 0);  // (read by the far sizes, after the selection's barriers)
        // The candidates' member lists into L2: the selected ones' are read for the exact rows.
        if (cand_n[r] > 0) prefetch_l2(a.members + cand_off[r]);
      }
#pragma unroll
      for (int i = 0; i < kCandSlots; ++i) {
        const int k = rank + kCtas * (warp + kWarps * i);
        if (k >= n_cand) continue;
        if constexpr (!kRerank)  // (else after it, from cand_size)
          lift[i] = ck_n[i] > 0 ? __log2f(float(ck_n[i])) : -INFINITY;  // an empty candidate is no pseudo-row
        float k4[4], x[kG];
        to_float4<CT>(ck[i], k4);
        warp_dots(qr, k4, x);
        if (lane < kCtas) st_cluster(cluster_addr(&xcand[k], lane), make_float4(x[0], x[1], x[2], x[3]));
      }
    }
    pc.mark(6);
    cluster.sync();
    pc.mark(7);

    // 6. Normalisers over the frontier: the unselected coarse clusters and every candidate, then
    //    the candidates' importances and the greedy rule under the budget.
    float4 cand_x[kOwnedCand];
    {
      float4 own_x[kOwned];
      float m[kG], z[kG];
#pragma unroll
      for (int r = 0; r < kOwnedCand; ++r) {
        const int k = tid + r * kThreads;
        cand_x[r] = k < n_cand ? xcand[k] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
      int unselected_n[kOwned];
#pragma unroll
      for (int r = 0; r < kOwned; ++r)
        own_x[r] = coarse_x(r), unselected_n[r] = coarse_sel.selected(tid + r * kThreads) ? 0 : own_n[r];
      own_max_sum(own_x, unselected_n, m, z);
      float cm[kG], cz[kG];
      own_max_sum(cand_x, cand_n, cm, cz);
#pragma unroll
      for (int g = 0; g < kG; ++g) merge_max_sum(m[g], z[g], cm[g], cz[g]);
      block_max_sum(m, z, red, red_z, gmax, gzinv, G);  // gmax: the frontier's maximum, every weight's reference from here
    }
    pc.mark(8);
    {
      unsigned long long key[kOwnedCand];
#pragma unroll
      for (int r = 0; r < kOwnedCand; ++r) {
        key[r] = cand_n[r] > 0
                     ? pick_key(importance(cand_x[r], gmax, gzinv), tid + r * kThreads, min(cand_n[r], fine_budget + 1))
                     : 0ull;
      }
      select_timed(key, cand_off, fine_budget, fine_sel, 1);
    }
    pc.mark(9);
    if constexpr (kProf) pc.add(kFusedPhases + 3, fine_sel.all_picks), pc.add(kFusedPhases + 4, fine_sel.all_prefix_picks);
  }

  // 7. This warp's fixed rows, then its selected rows (member list, page table, then K and V);
  //    its candidates that were not selected stay as pseudo-rows. The rows' member offsets are
  //    found once, one binary search a row by the first sel_rows (<= budget <= kMaxPicks)
  //    threads, rather than in turn for each slot by every warp.
  //    With re-ranking the fixed rows are issued after it (their registers would spill there),
  //    and the warp's slot numbers derive from one value pinned here (an empty asm): ptxas kept
  //    them from 5 across it, and they spilled.
  int slot0 = rank + kCtas * warp;
  if constexpr (kRerank) asm volatile("" : "+r"(slot0));
  const auto slot = [&](int i) {  // (without re-ranking as in 5, which the default kernels' SASS keeps)
    if constexpr (kRerank) return slot0 + kCtas * kWarps * i;
    else return rank + kCtas * (warp + kWarps * i);
  };
  const auto load_fixed_rows = [&] {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int j = slot(i);
      if (j < nfixed) {
        const int pos = j < nsink ? j : end + (j - nsink);
        load_kv_page(a, kRerank ? table[pos >> a.page_shift] : fixed_page[i], h, pos, kr[i], vr[i]);
        has_row[i] = true;
      }
    }
  };
  if constexpr (!kRerank) load_fixed_rows();
  auto& finest = *[&] {
    if constexpr (kHier) return &fine_sel;
    else return &coarse_sel;
  }();
  auto& row_sel = *[&] {  // the selection whose picks are the exact rows
    if constexpr (kRerank)
      return &rerank_picks<CT, !kHier>(cluster, a, rank, h, table, finest, kHier ? xcand : xall,
                                       kHier ? xcand + kMaxCand : xcand, qx, gmax, gzinv, red, red_z);
    else return &finest;
  }();
  if constexpr (kRerank) {
    load_fixed_rows();
    if constexpr (kHier)  // the candidates' value rows and lifts (in 5 without re-ranking; from L2 now)
#pragma unroll
      for (int i = 0; i < kCandSlots; ++i)
        if (const int k = slot(i); k < n_cand) {
          vr[kSlots + i] = *reinterpret_cast<const uint2*>(values + size_t(fb + cand_fine[k]) * kD + lane * 4);
          lift[i] = cand_size[k] > 0 ? __log2f(float(cand_size[k])) : -INFINITY;
        }
  }
  const int sel_rows = row_sel.pick_row[row_sel.n_picks];
  if (tid < sel_rows) row_member[tid] = row_sel.member_offset(tid);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int t = slot(i) - nfixed;
    const int pos = t >= 0 && t < sel_rows ? a.members[row_member[t]] : -1;
    if (pos >= 0) {
      load_kv_lane(a, table, h, pos, kr[i], vr[i]);
      has_row[i] = true;
    }
  }
  if constexpr (kHier) {
#pragma unroll
    for (int i = 0; i < kCandSlots; ++i) {
      const int k = slot(i);
      has_row[kSlots + i] = a.far_field && k < n_cand && !fine_sel.selected(k) && lift[i] != -INFINITY;
    }
  }
  // Inspection: the far sizes of every cluster of the entry (n if in the far field, else 0),
  // and the exact rows' count.
  if (a.far_size) {
    if (tid < n_local) a.far_size[cb + c0 + tid] = coarse_sel.selected(c0 + tid) ? 0 : max(local_n, 0);
#pragma unroll 1
    for (int f = rank * kThreads + tid; kHier && f < F; f += kCtas * kThreads) {
      const uint32_t bits = is_cand[f / 32];
      int n = 0;
      if ((bits >> (f % 32)) & 1u) {
        // f's place in cand_fine (ascending; inspection only, so a search). (select.cuh's
        // last_at_or_below here made ptxas lay out the two-level kernels anew: +0.2-0.3 us, item 64.)
        int k = 0, hi = n_cand;
        while (k < hi) {
          const int mid = (k + hi) / 2;
          if (cand_fine[mid] < f) k = mid + 1;
          else hi = mid;
        }
        if (k < n_cand && !fine_sel.selected(k)) n = cand_size[k];
      }
      a.far_size[fb + f] = n;
    }
  }
  if (rank == 0 && tid == 0) {
    const int rows = nfixed + sel_rows;
    if (rows > kSlots * kCtas * kWarps) atomicOr(a.error_flags, 1u);  // a sequence grew past the plan
    a.exact_n[e] = min(rows, kSlots * kCtas * kWarps);
  }

  pc.mark(10);
  // 8. Far field over the unselected local coarse clusters: weights n 2^(x - M) in xall's slice.
  //    At real positions their logits are replaced first (one warp a row), and M is their CTA
  //    maximum rather than gmax, which they may exceed; the state's reference then moves with it.
  __shared__ float far_rel[kG];  // (kFarReal) M - gmax: the far field's reference in the rows' frame
  if constexpr (kFarReal) {
    float qr[kG][4], x[kG];
    lane_queries(qx, qr);
    for (int j = warp; a.far_field && j < n_local; j += kWarps) {
      const int64_t c = int64_t(cb) + c0 + j;
      const int n = a.sizes[c];
      if (n <= 0 || coarse_sel.selected(c0 + j)) continue;  // (warp-uniform)
      dots_at_mean_position<CT>(keys + c * kD, a.position_sums[c], n, a.inv_freq, qr, x);
      if (lane == 0) xall[c0 + j] = make_float4(x[0], x[1], x[2], x[3]);
    }
    __syncthreads();
    float m[kG], z[kG];
    const bool far = a.far_field && tid < n_local && local_n > 0 && !coarse_sel.selected(c0 + tid);
#pragma unroll
    for (int g = 0; g < kG; ++g) m[g] = far ? reinterpret_cast<const float*>(&xall[c0 + tid])[g] : -INFINITY, z[g] = 0;
    block_max_sum<true>(m, z, red, red_z, own_m, own_z);  // own_m: M per head (-inf: no far cluster here)
    if (tid < kG) far_rel[tid] = own_m[tid] - gmax[tid];
  }
  if (tid < n_local)
    xall[c0 + tid] = far_weight_slot<CT>(far_weights(xall[c0 + tid], a.far_field ? local_n : 0,
                                                     coarse_sel.selected(c0 + tid), kFarReal ? own_m : gmax));
  cp_async_wait<0>();
  __syncthreads();
  far_field<CT>(staged, xall + c0, n_local, st, kFarReal ? far_rel : nullptr);
  pc.mark(11);

  // 9. The exact rows (logits of qx) and the candidates' pseudo-rows (their pushed logits plus
  //    the lift) per warp, relative to gmax, then the CTA's state; the cluster merges its
  //    states, each CTA 1/16 of the output.
  {
    float qr[kG][4];
    lane_queries(qx, qr);
    constexpr int kRows = kHier ? kAll : kSlots;  // (one level: no pseudo-rows)
    float s[kRows][kG], m[kG], l[kG], acc[kG][4];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      m[g] = -INFINITY, l[g] = 0;
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[g][t] = 0;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (!has_row[i]) continue;
      if (i < kSlots) {
        float k4[4], x[kG];
        to_float4<CT>(kr[i], k4);
        warp_dots(qr, k4, x);
#pragma unroll
        for (int g = 0; g < kG; ++g) s[i][g] = x[g] - gmax[g];
      } else {
        const int k = slot(i - kSlots);
        float4 x = xcand[k];
        if constexpr (kFarReal) {
          const int64_t f = int64_t(fb) + cand_fine[k];
          dots_at_mean_position<CT>(keys + f * kD, a.position_sums[f], cand_size[k], a.inv_freq, qr,
                                    *reinterpret_cast<float(*)[kG]>(&x));
        }
        const float* xs = reinterpret_cast<const float*>(&x);
#pragma unroll
        for (int g = 0; g < kG; ++g) s[i][g] = xs[g] + lift[i - kSlots] - gmax[g];
      }
#pragma unroll
      for (int g = 0; g < kG; ++g) m[g] = fmaxf(m[g], s[i][g]);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (!has_row[i]) continue;
      float v4[4];
      to_float4<CT>(vr[i], v4);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float p = fast_exp2(s[i][g] - m[g]);
        l[g] += p;
#pragma unroll
        for (int t = 0; t < 4; ++t) acc[g][t] += p * v4[t];
      }
    }
    const int fd = tid % kD, fg = 2 * (tid / kD);  // one thread per (head pair, dimension)
    join_cta_state(st, m, l, acc, fd, fg, part, sc);
  }
  pc.mark(12);
  const auto done = [&] {
    pc.mark(13), pc.finish();
    if constexpr (kProf) pc.record_span(a.prof);
  };
  __shared__ MergePart inbox[kCtas];  // (2.5 KB: the two-level re-ranking kernel keeps two CTAs an SM by ~0.9 KB)
  push_merged_states(cluster, st, inbox, a.out + qrow, done, G);
}

}  // namespace multipole::cuda::detail::cluster_step
