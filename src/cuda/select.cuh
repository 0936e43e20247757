#pragma once
// Cluster selection, one CTA per entry (sequence, KV head), all entries of a layer in one
// launch. Importance I_i = sum_g p_{g,i} with p_{g,i} = 2^(x_gi) / sum_j n_j 2^(x_gj); the
// greedy selection under the budget is greedy_select (greedy_select.cuh). Then writes
// far_size (n for far-field clusters, 0 for selected or empty ones) and the exact rows:
// sinks, members of selected clusters (cluster index order), window.
#include "cuda/greedy_select.cuh"

namespace multipole::cuda::detail {

// Per-phase cycle counts (diagnostics, SelectArgs::prof; PhaseClock in common.cuh). Slots:
// see kProf* below; 30: globaltimer ns, 31: CTAs.
enum : int {
  kProfPrologue = 0, kProfCoarseImp = 1, kProfCoarseRadix = 2, kProfCoarseTies = 3, kProfCoarseWalk = 4,
  kProfFarList = 5, kProfMark = 7, kProfCompact = 8, kProfScore = 9, kProfFrontier = 10,
  kProfFineImp = 11, kProfFineRadix = 12, kProfFineTies = 13, kProfFineWalk = 14, kProfFineFar = 15,
  kProfExact = 16, kProfScoreLoads = 17, kProfScoreMath = 18, kProfWalkItersCoarse = 20, kProfWalkItersFine = 21,
  kProfCandidates = 22, kProfCoarseClusters = 24
};

// Normalisers per head from the scoring CTAs' partials: s_M[g] (max) and s_Z[g] (sum of
// n 2^(x - max)) over the entry's scored clusters.
__device__ __forceinline__ void combine_partials(const SelectArgs& a, int b, int h, float* s_M, float* s_Z) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, Hkv = a.num_kv_heads, G = a.group;
  const int sb = a.seq_score_base[b], nch = a.seq_score_chunks[b];
  // Head g on warp (warps - 1 - g): the first warps look up the sink and window rows
  // (EntryRows) at the same time, so the two chains of dependent loads overlap.
  if (const int g = kSelectWarps - 1 - warp; g < G) {
    float mx = neg_inf();
    for (int c = lane; c < nch; c += 32) mx = fmaxf(mx, a.part[((int64_t(sb + c) * Hkv + h) * G + g) * 2]);
    mx = warp_max(mx);
    float zs = 0.0f;
    for (int c = lane; c < nch; c += 32) {
      const float* pm = a.part + ((int64_t(sb + c) * Hkv + h) * G + g) * 2;
      if (pm[0] != neg_inf()) zs += pm[1] * fast_exp2(pm[0] - mx);
    }
    zs = warp_sum(zs);
    if (lane == 0) {
      s_M[g] = mx;
      s_Z[g] = zs;
    }
  }
  __syncthreads();
}

// Sinks and window of entry e. Their rows do not depend on the selection: each thread
// looks its one up at construction so the loads overlap the selection (more only for very
// long windows).
struct EntryRows {
  const int32_t* table;
  int P, Hkv, h, nsink, nwin, end, early_row = -1, first = 0;
  __device__ EntryRows(const SelectArgs& a, int e) {
    const int b = e / a.num_kv_heads, seq = a.seq_ids[b], len = a.lengths[seq];
    table = a.tables + a.table_offset[seq];
    P = a.page_size;
    Hkv = a.num_kv_heads;
    h = e % Hkv;
    end = a.entry_end[e];
    nsink = min(a.sinks, end);
    nwin = max(len - end, 0);
  }
  // Thread tid looks up row tid - first0 of the sinks + window (the page-table load waits
  // only in those threads: first0 = 32 keeps warp 0 free).
  __device__ void fetch_early(int first0) {
    first = first0;
    const int t = int(threadIdx.x) - first;
    early_row = t >= 0 && t < nsink ? row_of(t) : (t >= nsink && t < nsink + nwin ? row_of(end + t - nsink) : -1);
  }
  __device__ int row_of(int pos) const { return (table[pos / P] * Hkv + h) * P + pos % P; }
};

// The largest k < n with off[k] <= x (off ascending, off[0] <= x): the list holding token x.
__device__ __forceinline__ int last_at_or_below(const int* off, int n, int x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Exact rows of entry e: sinks, members of the selected clusters (size[pad(i)] < 0, i < C,
// in i order; cluster_of(i) is its global id), window. scratch: [C] ints (overwritten),
// list_off: [C]. r: the entry's sinks and window (this thread's row looked up early).
template <class ClusterOf>
__device__ void write_exact_rows(const SelectArgs& a, int e, const int* size, int C, int* scratch, int* list_off,
                                 ClusterOf cluster_of, const EntryRows& r) {
  const int tid = threadIdx.x, cap = a.exact_cap;
  const int nsink = r.nsink, nwin = r.nwin, end = r.end;
  auto row_of = [&](int pos) { return r.row_of(pos); };
  int32_t* rows = a.exact_rows + int64_t(e) * cap;
  // Compact the selected clusters (index order) with their token offsets, then expand their
  // members with all threads (k-th cluster found by binary search over the offsets).
  const int per = (C + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(C, tid * per), hi = min(C, lo + per);
  int chosen = 0, nchosen = 0;
#pragma unroll 1
  for (int i = lo; i < hi; ++i) {
    const int n = size[pad(i)];
    if (n < 0) {
      chosen -= n;
      ++nchosen;
    }
  }
  int nsel, nclusters;
  int at = block_exclusive_scan(chosen, nsel);
  int k = block_exclusive_scan(nchosen, nclusters);
  int* list_mb = scratch;
  __syncthreads();  // all reads of the scratch done (the list overwrites it)
#pragma unroll 1
  for (int i = lo; i < hi; ++i) {
    const int n = size[pad(i)];
    if (n < 0) {
      list_mb[k] = a.member_begin[cluster_of(i)];
      list_off[k] = at;
      ++k;
      at -= n;
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int j = tid; j < nsel && nsink + j < cap; j += kSelectThreads) {
    const int lo_k = last_at_or_below(list_off, nclusters, j);
    rows[nsink + j] = row_of(a.members[list_mb[lo_k] + (j - list_off[lo_k])]);
  }
  const int mine = tid - r.first;  // the sink/window row this thread looked up early
#pragma unroll 1
  for (int t = mine >= 0 ? mine : mine + kSelectThreads; t < nsink + nwin; t += kSelectThreads) {
    const int at_t = t < nsink ? t : nsel + t;  // window rows follow the selected ones
    if (at_t < cap) rows[at_t] = t == mine ? r.early_row : (t < nsink ? row_of(t) : row_of(end + t - nsink));
  }
  if (tid == 0) {
    const int count = nsink + nsel + nwin;
    if (count > cap) atomicOr(a.error_flags, 1u);
    a.exact_n[e] = min(count, cap);
  }
}

// Re-ranking (SelectArgs::rerank): the selected clusters (size[pad(i)] < 0, i < C), their
// global ids cluster_of(i) in i order, to rerank_ids / rerank_n, for rerank_kernel.
template <class ClusterOf>
__device__ void write_picks(const SelectArgs& a, int e, const int* size, int C, ClusterOf cluster_of) {
  const int per = (C + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(C, int(threadIdx.x) * per), hi = min(C, lo + per);
  int mine = 0;
#pragma unroll 1
  for (int i = lo; i < hi; ++i) mine += size[pad(i)] < 0;
  int total;
  int at = block_exclusive_scan(mine, total);
  int32_t* ids = a.rerank_ids + int64_t(e) * a.rerank;
#pragma unroll 1
  for (int i = lo; i < hi; ++i)
    if (size[pad(i)] < 0 && at < a.rerank) ids[at++] = cluster_of(i);
  if (threadIdx.x == 0) a.rerank_n[e] = min(total, a.rerank);  // (at most `rerank` tokens: never more picks)
}

#define MP_SELECT_SHARED                                   \
  __shared__ __align__(8) unsigned int hist[4096];         \
  __shared__ unsigned long long s_tmp64[kSelectWarps];     \
  __shared__ int s_digit, s_above;                         \
  const SelectShared sh{hist, s_tmp64, &s_digit, &s_above}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  MP_SELECT_SHARED;
  __shared__ float s_M[16], s_invZ[16];

  const int tid = threadIdx.x;
  const int e = blockIdx.x, Hkv = a.num_kv_heads, G = a.group;
  const int b = e / Hkv, h = e % Hkv;
  const int cb = a.entry_begin[e], C = a.entry_count[e];
  const int cpad = pad(a.smem_clusters) + 1;
  uint32_t* key = reinterpret_cast<uint32_t*>(smem);  // [pad(C)] f32 bits of I
  int* size = reinterpret_cast<int*>(key + cpad);     // [pad(C)] n > 0 candidate, -n selected, 0 empty
  int* list_off = size + cpad;                        // [C] token offset of the k-th selected cluster

  pdl_trigger();  // the attention kernel may load its queries (it waits for our writes)
  EntryRows rows(a, e);
  rows.fetch_early(0);

  pdl_wait();  // the scoring kernel's logits and partials
  combine_partials(a, b, h, s_M, s_invZ);
  if (a.rerank && tid < G) {
    a.rerank_norms[(int64_t(e) * G + tid) * 2] = s_M[tid];
    a.rerank_norms[(int64_t(e) * G + tid) * 2 + 1] = s_invZ[tid];
  }
  if (tid < G) s_invZ[tid] = s_invZ[tid] > 0.0f ? 1.0f / s_invZ[tid] : 0.0f;
  __syncthreads();

  // Importance keys, kBatch clusters per thread in flight at a time.
  constexpr int kBatch = 8;
  int mine = 0;
  for (int i0 = tid; i0 < C; i0 += kBatch * kSelectThreads) {
    int n[kBatch];
    float imp[kBatch];
    if (G == 4) {
      float4 v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = i0 + k * kSelectThreads;
        n[k] = i < C ? a.sizes[cb + i] : 0;
        v[k] = i < C ? *reinterpret_cast<const float4*>(a.scores + int64_t(cb + i) * 4) : make_float4(0, 0, 0, 0);
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        imp[k] = fast_exp2(v[k].x - s_M[0]) * s_invZ[0] + fast_exp2(v[k].y - s_M[1]) * s_invZ[1] +
                 fast_exp2(v[k].z - s_M[2]) * s_invZ[2] + fast_exp2(v[k].w - s_M[3]) * s_invZ[3];
    } else {
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = i0 + k * kSelectThreads;
        n[k] = i < C ? a.sizes[cb + i] : 0;
        imp[k] = 0.0f;
        if (i < C)
          for (int g = 0; g < G; ++g) imp[k] += fast_exp2(a.scores[int64_t(cb + i) * G + g] - s_M[g]) * s_invZ[g];
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = i0 + k * kSelectThreads;
      if (i < C) {
        const int nk = max(n[k], 0);
        key[pad(i)] = __float_as_uint(nk > 0 ? imp[k] : 0.0f);  // I >= 0: the bits order like the values
        size[pad(i)] = nk;
        mine += nk;
      }
    }
  }
  int total = block_scan(mine).y;
  greedy_select(key, size, C, a.rerank ? a.rerank : a.budget, total, sh);

  // Outputs: far-field sizes and the exact rows (re-ranking: the picks, for rerank_kernel).
  for (int i = tid; i < C; i += kSelectThreads) a.far_size[cb + i] = max(size[pad(i)], 0);
  if (a.rerank)
    write_picks(a, e, size, C, [&](int i) { return cb + i; });
  else
    write_exact_rows(a, e, size, C, reinterpret_cast<int*>(key), list_off, [&](int i) { return cb + i; }, rows);
}

// Two-level selection, one CTA per entry (after the scoring kernel scored the coarse level):
//   1. coarse importance, greedy selection under coarse_budget; unselected coarse clusters
//      go to the far field and to the frontier sum (their n 2^x);
//   2. the children of the selected coarse clusters (ascending fine id, non-empty) are
//      scored here (tensor-core tiles of 16; f32 key centroids one warp per candidate; or
//      gathered, when the scoring kernel scored the whole fine level:
//      SelectArgs::prescored) and normalised over the frontier: unselected
//      coarse clusters + all candidates (as the CPU policy does);
//   3. greedy selection of the candidates under budget; the rest joins the far field.
// Writes far_size for all of the entry's clusters, the compact far list and the exact rows.
// Code size matters: the kernel runs once per step, and after an L2 flush (or the weights
// of a layer streaming through) its instructions come from DRAM, so the loops over heads
// and most per-thread loops stay rolled.
// kProf: the per-phase clock (SelectArgs::prof) is compiled in; the plain variant has none of
// its code.
template <class KT, bool kProf>
__global__ void __launch_bounds__(kSelectThreads) select_hier_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  MP_SELECT_SHARED;
  __shared__ float s_M[16], s_Z[16], s_far[16], s_invZ[16], s_Mf[16];
  __shared__ int s_nfar, s_nsel;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e = blockIdx.x, Hkv = a.num_kv_heads, G = a.group, D = a.head_dim;
  // An entry the one-launch step finished. (This kernel follows that step with a plain launch:
  // the flags are final; read from L2.)
  if (a.fallback && __ldcg(a.fallback + e) == 0) return;
  const int b = e / Hkv, h = e % Hkv;
  const int cb = a.entry_begin[e], Cc = a.entry_coarse[e], Cf = a.entry_count[e] - Cc, fb = cb + Cc;
  const int cpad = pad(a.smem_clusters) + 1;
  uint32_t* key = reinterpret_cast<uint32_t*>(smem);  // [pad(n)] f32 bits of I
  int* size = reinterpret_cast<int*>(key + cpad);     // [pad(n)] n > 0 candidate, -n selected, 0 empty
  int* list_off = size + cpad;                        // [n]
  int* cand = list_off + a.smem_clusters;             // [Cf] fine ids of the candidates
  float* s_q = reinterpret_cast<float*>(cand + a.smem_clusters);  // [G, D] scaled scoring queries
  const int kc = a.cand_cache;
  float* s_x = s_q + G * D;                          // [kc, G] logits of the first kc candidates
  int* s_cn = reinterpret_cast<int*>(s_x + kc * G);  // [kc] their sizes

  pdl_trigger();  // the attention kernel may load its queries (it waits for our writes)
  PhaseClock pc(kProf ? a.prof : nullptr, kPhaseClockSlots);  // slots per entry
  EntryRows rows(a, e);  // the row look-ups of sinks and window come later (fetch_early)
  // The sequence's page table into L2 (write_exact_rows looks up the selected tokens' rows).
  if (const int pages = (rows.end + a.page_size - 1) / a.page_size; tid * 32 < pages)
    prefetch_l2(rows.table + tid * 32);
#pragma unroll 1
  for (int i = tid; i < G * D; i += kSelectThreads)
    s_q[i] = a.q_score[(int64_t(b) * Hkv * G + int64_t(h) * G) * D + i] * a.qscale;
  int32_t* far_ids = a.far_ids + int64_t(e) * a.far_cap;

  // 1. Coarse level.
  pdl_wait();  // everything above reads inputs only; from here on the scoring kernel's output
  combine_partials(a, b, h, s_M, s_Z);
  if (tid < G) {
    s_invZ[tid] = s_Z[tid] > 0.0f ? 1.0f / s_Z[tid] : 0.0f;
    s_far[tid] = 0.0f;
  }
  if (tid == 0) s_nsel = 0;
  __syncthreads();
  pc.mark(kProfPrologue);
  // A cluster's importance sum_g 2^(x[g] - M[g]) / Z[g] from its logits x [G]: four heads'
  // loads in flight together, the sum in head order.
  const auto importance = [&](const float* x) {
    float imp = 0.0f;
#pragma unroll 1
    for (int g0 = 0; g0 < G; g0 += 4) {
      float v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = g0 + u < G ? x[g0 + u] : 0.0f;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (g0 + u < G) imp += fast_exp2(v[u] - s_M[g0 + u]) * s_invZ[g0 + u];
    }
    return imp;
  };
  int mine = 0;
  for (int i = tid; i < Cc; i += kSelectThreads) {
    const int n = max(a.sizes[cb + i], 0);
    const float imp = importance(a.scores + int64_t(cb + i) * G);
    key[pad(i)] = __float_as_uint(n > 0 ? imp : 0.0f);
    size[pad(i)] = n;
    mine += n;
  }
  int total = block_scan(mine).y;
  pc.mark(kProfCoarseImp);
  pc.add(kProfCoarseClusters, Cc);
  const int coarse_budget = max(a.budget, a.coarse_budget);
  rows.fetch_early(32);  // warps 1.. wait for the page table while warp 0 may walk the greedy order
  greedy_select(key, size, Cc, coarse_budget, total, sh, a.warp_select_max, a.warp_select_steps,
                kProf ? &pc : nullptr, kProfCoarseRadix, kProfWalkItersCoarse, a.warp_select_precheck != 0,
                a.warp_select_sort);
  // Unselected coarse clusters: far size, far list, frontier sums (relative to s_M).
  {
    const int per = (Cc + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(Cc, tid * per), hi = min(Cc, lo + per);
    int nf = 0;
#pragma unroll 1
    for (int i = lo; i < hi; ++i) nf += size[pad(i)] > 0;
    int nfar;
    int at = block_exclusive_scan(nf, nfar);
#pragma unroll 1
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      a.far_size[cb + i] = max(n, 0);
      if (n > 0) far_ids[at++] = i;
      if (n < 0) list_off[atomicAdd(&s_nsel, 1)] = i;  // selected coarse clusters, any order
    }
    if (tid == 0) s_nfar = nfar;
    // Four heads at a time, the cluster loop outside: one round trip per cluster brings the
    // logits of all four (per head the same sums in the same order as one head at a time).
#pragma unroll 1
    for (int g0 = 0; g0 < G; g0 += 4) {
      float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
      for (int i = lo; i < hi; ++i) {
        const int n = size[pad(i)];
        if (n <= 0) continue;
        const float* x = a.scores + int64_t(cb + i) * G + g0;
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = g0 + u < G ? __ldg(x + u) : 0.0f;
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (g0 + u < G) z[u] += float(n) * fast_exp2(v[u] - s_M[g0 + u]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) z[u] = warp_sum(z[u]);
      if (lane == 0)
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (g0 + u < G && z[u] != 0.0f) atomicAdd(&s_far[g0 + u], z[u]);
    }
  }
  // 2. Candidates: non-empty children of the selected coarse clusters (all non-empty fine
  // clusters without a coarse level), flagged in `key` (free after the coarse selection;
  // `size` still holds the coarse selection), compacted in id order into `cand`.
  const bool flat = Cc == 0;
#pragma unroll 1
  for (int f = tid; f < Cf; f += kSelectThreads) {
    a.far_size[fb + f] = 0;
    key[pad(f)] = flat && a.sizes[fb + f] > 0 ? 1u : 0u;
  }
  __syncthreads();
  pc.mark(kProfFarList);
  // Each warp takes `per` (<= 32) selected coarse clusters at a time, spread over all warps
  // (a few large ones: one each, as before; ~100 small k-means ones: ~7 each): their list
  // bounds in one round trip, a warp scan of the child counts, then the lanes run over the
  // flattened children, so every child's id and size are in flight at once however skewed
  // the counts are (k-means coarse clusters hold 1 to ~200 children; one warp per coarse
  // cluster paid the round trips once per cluster with most lanes idle). The radix
  // histogram is free here: per warp [33] exclusive offsets, then [32] list starts.
  {
    int* wp = reinterpret_cast<int*>(sh.hist) + warp * 72;
    const int per = min(32, (s_nsel + kSelectWarps - 1) / kSelectWarps);
#pragma unroll 1
    for (int j0 = warp * per; j0 < s_nsel; j0 += kSelectWarps * per) {
      int beg = 0, cnt = 0;
      if (lane < per && j0 + lane < s_nsel) {
        const int i = list_off[j0 + lane];
        beg = a.member_begin[cb + i];
        cnt = a.member_begin[cb + i + 1] - beg;
      }
      const int incl = warp_inclusive_sum(cnt);
      wp[lane + 1] = incl;
      wp[33 + lane] = beg;
      if (lane == 0) wp[0] = 0;
      __syncwarp();
      const int T = __shfl_sync(0xffffffffu, incl, 31);
#pragma unroll 1
      for (int x = lane; x < T; x += 32) {
        int o = 0;  // the last coarse cluster whose children start at or before x (count > 0)
#pragma unroll
        for (int step = 16; step > 0; step >>= 1)
          if (wp[o + step] <= x) o += step;
        const int c = a.members[wp[33 + o] + (x - wp[o])];
        if (a.sizes[fb + c] > 0) {
          key[pad(c)] = 1u;
          // The candidate's key centroid into L2 now; it is scored after the compaction.
          if (a.prescored) continue;
          const char* row =
              reinterpret_cast<const char*>(static_cast<const KT*>(a.key_centroids) + int64_t(fb + c) * D);
#pragma unroll 1
          for (int off = 0; off < D * int(sizeof(KT)); off += 128)
            prefetch_l2(row + off);
        }
      }
      __syncwarp();  // wp is rewritten for the next 32
    }
  }
  __syncthreads();
  pc.mark(kProfMark);
  int nc;
  {
    const int per = (Cf + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(Cf, tid * per), hi = min(Cf, lo + per);
    int mc = 0;
#pragma unroll 1
    for (int f = lo; f < hi; ++f) mc += key[pad(f)] != 0u;
    int at = block_exclusive_scan(mc, nc);
#pragma unroll 1
    for (int f = lo; f < hi; ++f)
      if (key[pad(f)] != 0u) cand[at++] = f;
  }
  __syncthreads();
  pc.mark(kProfCompact);
  pc.add(kProfCandidates, nc);
  if (a.prescored) {
    // The scoring kernel wrote every fine cluster's logits: gather the candidates' (first kc
    // to shared memory; the others are read from global memory where needed), their sizes,
    // and their member lists into L2 for write_exact_rows.
#pragma unroll 1
    for (int k = tid; k < nc; k += kSelectThreads) {
      const int64_t c = fb + cand[k];
      if (k < kc) s_cn[k] = __ldg(a.sizes + c);
      prefetch_l2(a.members + __ldg(a.member_begin + c));
    }
#pragma unroll 1
    for (int t = tid; t < min(nc, kc) * G; t += kSelectThreads) {
      const int k = t / G;
      s_x[t] = __ldg(a.scores + (fb + cand[k]) * int64_t(G) + (t - k * G));
    }
  }
  // Score the candidates. bf16 / f16 key centroids on tensor cores (as the scoring kernel):
  // warp w takes tiles of 16 candidates (the A rows; each lane loads 16-byte slices of two rows
  // straight into its fragments, which fixes an order of the dimensions within each 32 that q's
  // fragments follow too), heads in n-tiles of 8, q in three 16-bit parts. f32 ones with FMAs.
  const KT* kcent = static_cast<const KT*>(a.key_centroids);
  // Candidate k < nc's logit for head g, and its size: the first kc in shared memory (their
  // logits go to global memory below, coalesced), the others' logits straight there.
  auto put_logit = [&](int k, int g, float x) {
    if (k < kc)
      s_x[k * G + g] = x;
    else
      a.scores_out[(fb + cand[k]) * int64_t(G) + g] = x;
  };
  auto put_size = [&](int k, int n) {
    if (k < kc) s_cn[k] = n;
  };
  if constexpr (!std::is_same_v<KT, float>) {
    using M = MmaType<KT>;
    const int gid = lane >> 2, tig = lane & 3, tiles = (nc + 15) / 16;
#pragma unroll 1
    for (int t = a.prescored ? tiles : warp; t < tiles; t += kSelectWarps) {
      const int k[2] = {t * 16 + gid, t * 16 + gid + 8};
      uint4 rows[2][4];
      int nk[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const bool valid = k[rr] < nc;
        const int64_t c = valid ? fb + cand[k[rr]] : 0;
        const uint4* row = reinterpret_cast<const uint4*>(kcent + c * D);
#pragma unroll
        for (int j = 0; j < 4; ++j) rows[rr][j] = valid && j * 32 < D ? __ldg(row + j * 4 + tig) : make_uint4(0, 0, 0, 0);
        nk[rr] = valid ? __ldg(a.sizes + c) : 0;
        // The candidate's member list into L2 (write_exact_rows reads those of the selected).
        if (valid && tig == 0) prefetch_l2(a.members + a.member_begin[c]);
      }
      pc.mark(kProfScoreLoads);
#pragma unroll 1
      for (int n0 = 0; n0 < G; n0 += 8) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const float* q = s_q + (n0 + gid) * D;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j * 32 >= D) break;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            // Lane (gid, tig)'s slice holds dims j*32 + tig*8 + [0, 8): a0/a1 take the pair at
            // half*4, a2/a3 the pair at half*4 + 2; b0/b1 are q's same dims for head n0 + gid.
            const uint32_t af[4] = {half ? rows[0][j].z : rows[0][j].x, half ? rows[1][j].z : rows[1][j].x,
                                    half ? rows[0][j].w : rows[0][j].y, half ? rows[1][j].w : rows[1][j].y};
            const int d0 = j * 32 + tig * 8 + half * 4;
            float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (n0 + gid < G)
#pragma unroll
              for (int i = 0; i < 4; ++i) x[i] = q[d0 + i];
#pragma unroll
            for (int p = 0; p < 3; ++p) {
              const uint32_t b0 = peel_part<KT>(x[0], x[1]), b1 = peel_part<KT>(x[2], x[3]);
              M::mma16816(acc, af, b0, b1);
            }
          }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int g = n0 + tig * 2 + hh;
            if (k[rr] < nc && g < G) put_logit(k[rr], g, acc[rr * 2 + hh]);
          }
      }
      if (tig == 0)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
          if (k[rr] < nc) put_size(k[rr], nk[rr]);
      pc.mark(kProfScoreMath);
    }
  } else {
    // f32: one warp per candidate, lanes over the dimensions (D <= 128). The loads of U
    // candidates per warp are all issued together, a round before their use; heads in a
    // rolled loop, the U warp sums interleaved.
    constexpr int U = 4;
    // One round's rows, sizes and list starts; the next round's are loaded before this
    // round's math, so each round waits on loads issued a round earlier.
    auto load_round = [&](int k0, float (&kv)[U][4], int (&nk)[U], int (&mbk)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u * kSelectWarps;
        const int64_t c = k < nc ? fb + cand[k] : 0;
        const auto* row = kcent + c * D;
        nk[u] = k < nc ? __ldg(a.sizes + c) : 0;
        mbk[u] = k < nc ? a.member_begin[c] : 0;  // kept in L1 for write_exact_rows
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int d = lane + 32 * j;
          kv[u][j] = k < nc && d < D ? __ldg(row + d) : 0.0f;
        }
      }
    };
    float kv[U][4], kv_next[U][4];
    int nk[U], mbk[U], nk_next[U], mbk_next[U];
    int k0 = a.prescored ? nc : warp;
    if (k0 < nc) load_round(k0, kv_next, nk_next, mbk_next);
#pragma unroll 1
    for (; k0 < nc; k0 += U * kSelectWarps) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        nk[u] = nk_next[u];
        mbk[u] = mbk_next[u];
#pragma unroll
        for (int j = 0; j < 4; ++j) kv[u][j] = kv_next[u][j];
      }
      if (k0 + U * kSelectWarps < nc) load_round(k0 + U * kSelectWarps, kv_next, nk_next, mbk_next);
      // The candidates' member lists into L2 (write_exact_rows reads those of the selected).
      if (lane == 0)
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (k0 + u * kSelectWarps < nc) prefetch_l2(a.members + mbk[u]);
      pc.mark(kProfScoreLoads);
#pragma unroll 1
      for (int g = 0; g < G; ++g) {
        float acc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          acc[u] = 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (lane + 32 * j < D) acc[u] = fmaf(s_q[g * D + lane + 32 * j], kv[u][j], acc[u]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
          for (int u = 0; u < U; ++u) acc[u] += __shfl_xor_sync(0xffffffffu, acc[u], o);
        if (lane == 0)
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int k = k0 + u * kSelectWarps;
            if (k < nc) put_logit(k, g, acc[u]);
          }
      }
      if (lane == 0)
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int k = k0 + u * kSelectWarps;
          if (k < nc) put_size(k, nk[u]);
        }
      pc.mark(kProfScoreMath);
    }
  }
  __syncthreads();  // the block's global writes are visible to the block after the barrier
  pc.mark(kProfScore);
  // Frontier normaliser per head: unselected coarse + all candidates. Warp g does head g
  // (G <= 16 warps) without block barriers; the sum keeps the order of a block reduction
  // (per thread t = 32 w + l over k = t, t + T, ..., then per warp w, then over w), so the
  // normaliser is bit-identical to one.
  // The cached candidates' logits to global memory (the attention kernel reads the far ones).
#pragma unroll 1
  for (int t = a.prescored ? nc * G : tid; t < min(nc, kc) * G; t += kSelectThreads) {
    const int k = t / G;
    a.scores_out[(fb + cand[k]) * int64_t(G) + (t - k * G)] = s_x[t];
  }
  if (warp < G) {
    const int g = warp;
    const auto x_of = [&](int k) { return k < kc ? s_x[k * G + g] : a.scores[int64_t(fb + cand[k]) * G + g]; };
    float mx = neg_inf();
#pragma unroll 1
    for (int k = lane; k < nc; k += 32) mx = fmaxf(mx, x_of(k));
    mx = warp_max(mx);
    const float M = fmaxf(mx, s_far[g] > 0.0f ? s_M[g] : neg_inf());
    float z = 0.0f;
    const int wn = min(kSelectWarps, (nc + 31) / 32);  // thread slots t >= nc contribute 0
#pragma unroll 1
    for (int w = 0; w < wn; ++w) {
      float v = 0.0f;
#pragma unroll 1
      for (int k = 32 * w + lane; k < nc; k += kSelectThreads)
        v += float(k < kc ? s_cn[k] : a.sizes[fb + cand[k]]) * fast_exp2(x_of(k) - M);
      z += warp_sum(v);
    }
    if (lane == 0) {
      if (s_far[g] > 0.0f) z += s_far[g] * fast_exp2(s_M[g] - M);
      s_Mf[g] = M;
      s_invZ[g] = z > 0.0f ? 1.0f / z : 0.0f;
      if (a.rerank) {
        a.rerank_norms[(int64_t(e) * G + g) * 2] = M;
        a.rerank_norms[(int64_t(e) * G + g) * 2 + 1] = z;
      }
    }
  }
  __syncthreads();
  if (tid < G) s_M[tid] = s_Mf[tid];
  __syncthreads();
  pc.mark(kProfFrontier);
  // 3. Fine selection among the candidates (index k, ascending fine id).
  mine = 0;
  for (int k = tid; k < nc; k += kSelectThreads) {
    const int64_t c = fb + cand[k];
    const int n = k < kc ? s_cn[k] : a.sizes[c];
    key[pad(k)] = __float_as_uint(importance(k < kc ? s_x + k * G : a.scores + c * G));
    size[pad(k)] = n;
    mine += n;
  }
  total = block_scan(mine).y;
  pc.mark(kProfFineImp);
  greedy_select(key, size, nc, a.rerank ? a.rerank : a.budget, total, sh, a.warp_select_max, a.warp_select_steps,
                kProf ? &pc : nullptr, kProfFineRadix, kProfWalkItersFine, a.warp_select_precheck != 0,
                a.warp_select_sort);
  {
    const int per = (nc + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(nc, tid * per), hi = min(nc, lo + per);
    int nf = 0;
#pragma unroll 1
    for (int k = lo; k < hi; ++k) nf += size[pad(k)] > 0;
    int nfar;
    int at = s_nfar + block_exclusive_scan(nf, nfar);
#pragma unroll 1
    for (int k = lo; k < hi; ++k) {
      const int n = size[pad(k)];
      if (n > 0) {
        a.far_size[fb + cand[k]] = n;
        far_ids[at++] = Cc + cand[k];
      }
    }
    if (tid == 0) a.far_n[e] = s_nfar + nfar;
  }
  pc.mark(kProfFineFar);
  if (a.rerank)
    write_picks(a, e, size, nc, [&](int k) { return fb + cand[k]; });
  else
    write_exact_rows(a, e, size, nc, reinterpret_cast<int*>(key), list_off, [&](int k) { return fb + cand[k]; }, rows);
  pc.mark(kProfExact);
  pc.finish();
}

}  // namespace multipole::cuda::detail
