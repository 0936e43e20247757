#pragma once
// Cluster selection, one CTA per entry (sequence, KV head), all entries of a layer in one
// launch. Importance I_i = sum_g p_{g,i} with p_{g,i} = 2^(x_gi) / sum_j n_j 2^(x_gj).
// Semantics: greedy in decreasing importance (ties: lower cluster index first), taking a
// cluster when its size fits the remaining budget and skipping it otherwise. Computed
// without sorting:
//   1. a count-weighted radix select over the f32 bits of I (12 + 10 + 10 bits) finds the
//      longest prefix of the greedy order whose sizes fit the budget (ties by index scan);
//   2. the rest of the greedy walk: every unselected cluster ahead of the current point
//      has a size above the remaining budget R (it was skipped, and R only shrinks), so the
//      next pick is the most important cluster with n <= R; repeat while one exists.
// Then writes far_size (n for far-field clusters, 0 for selected or empty ones) and the
// exact rows: sinks, members of selected clusters (cluster index order), window.
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

constexpr int kSelectWarps = kSelectThreads / 32;

// Exclusive prefix sum over the CTA (thread order); `total` gets the sum. s_tmp: [warps + 1].
__device__ __forceinline__ int block_exclusive_scan(int x, int* s_tmp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_tmp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kSelectWarps ? s_tmp[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += y;
    }
    if (lane < kSelectWarps) s_tmp[lane] = wi - w;
    if (lane == kSelectWarps - 1) s_tmp[kSelectWarps] = wi;
  }
  __syncthreads();
  const int excl = s_tmp[warp] + incl - x;
  total = s_tmp[kSelectWarps];
  __syncthreads();
  return excl;
}

__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long x, unsigned long long* s_tmp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  if (lane == 0) s_tmp[warp] = x;
  __syncthreads();
  unsigned long long best = 0;
  for (int w = 0; w < kSelectWarps; ++w) best = s_tmp[w] > best ? s_tmp[w] : best;
  __syncthreads();
  return best;
}

// Shared-memory arrays are padded by one word per 32 so that both access patterns used
// below (strided i = tid + k T, and contiguous per-thread ranges) are free of bank conflicts.
__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

// Normalisers per head from the scoring CTAs' partials: s_M[g] (max) and s_Z[g] (sum of
// n 2^(x - max)) over the entry's scored clusters.
__device__ __forceinline__ void combine_partials(const SelectArgs& a, int b, int h, float* s_M, float* s_Z) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, Hkv = a.num_kv_heads, G = a.group;
  const int sb = a.seq_score_base[b], nch = a.seq_score_chunks[b];
  for (int g = warp; g < G; g += kSelectWarps) {
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

struct SelectShared {
  unsigned int* hist;  // [4096]
  int* tmp;            // [kSelectWarps + 1]
  unsigned long long* tmp64;  // [kSelectWarps]
  int* digit;
  int* above;
};

// Greedy selection over key[pad(i)] (f32 bits of I >= 0) and size[pad(i)] (n > 0 candidate)
// for i < C under budget R, `total` = sum of candidate sizes: selected clusters get size -n.
// All threads call; returns the budget left.
__device__ int greedy_select(uint32_t* key, int* size, int C, int R, int total, const SelectShared& sh) {
  const int tid = threadIdx.x;
  if (total <= R) {
    for (int i = tid; i < C; i += kSelectThreads) size[pad(i)] = -size[pad(i)];
    __syncthreads();
    return R - total;
  }
  // Weighted radix select: find the key `prefix` at which the budget runs out.
  uint32_t prefix = 0, mask = 0;
  const int shifts[3] = {20, 10, 0}, widths[3] = {12, 10, 10};
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = shifts[pass], nb = 1 << widths[pass];
    for (int d = tid; d < nb; d += kSelectThreads) sh.hist[d] = 0;
    __syncthreads();
    for (int i = tid; i < C; i += kSelectThreads) {
      const uint32_t k = key[pad(i)];
      const int n = size[pad(i)];
      if (n > 0 && (k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & (nb - 1)], unsigned(n));
    }
    __syncthreads();
    // Thread t owns digits [nb - (t+1) per, nb - t per), scanned from the top.
    const int per = nb / kSelectThreads;
    const int top = nb - 1 - tid * per;
    int local = 0;
    for (int k = 0; k < per; ++k) local += int(sh.hist[top - k]);
    int dummy;
    const int above = block_exclusive_scan(local, sh.tmp, dummy);
    if (above <= R && R < above + local) {
      int cum = above;
      for (int k = 0; k < per; ++k) {
        const int w = int(sh.hist[top - k]);
        if (cum + w > R) {
          *sh.digit = top - k;
          *sh.above = cum;
          break;
        }
        cum += w;
      }
    }
    __syncthreads();
    R -= *sh.above;
    prefix |= uint32_t(*sh.digit) << shift;
    mask |= uint32_t(nb - 1) << shift;
    __syncthreads();
  }
  // Everything above the boundary key is in; ties at it go in index order while they fit.
  {
    const int per = (C + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(C, tid * per), hi = min(C, lo + per);
    int ties = 0;
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      const uint32_t k = key[pad(i)];
      if (n > 0 && k > prefix) size[pad(i)] = -n;
      if (n > 0 && k == prefix) ties += n;
    }
    int dummy;
    int cum = block_exclusive_scan(ties, sh.tmp, dummy);
    int used = 0;
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      if (n > 0 && key[pad(i)] == prefix) {
        cum += n;
        if (cum <= R) {
          size[pad(i)] = -n;
          used += n;
        }
      }
    }
    int used_total;
    block_exclusive_scan(used, sh.tmp, used_total);
    R -= used_total;
  }
  __syncthreads();

  // The rest of the greedy walk.
  while (R > 0) {
    unsigned long long best = 0;
    for (int i = tid; i < C; i += kSelectThreads) {
      const int n = size[pad(i)];
      if (n > 0 && n <= R) {
        const unsigned long long k = (static_cast<unsigned long long>(key[pad(i)]) << 32) | (0xffffffffu - uint32_t(i));
        best = k > best ? k : best;
      }
    }
    best = block_max_u64(best, sh.tmp64);
    if (best == 0) break;
    const int i = int(0xffffffffu - uint32_t(best & 0xffffffffu));
    const int n = size[pad(i)];
    __syncthreads();  // everyone has read size[i] before it is flipped
    if (tid == 0) size[pad(i)] = -n;
    R -= n;
    __syncthreads();
  }
  return R;
}

// Sinks and window of entry e. Their rows do not depend on the selection: each thread
// looks its one up at construction so the loads overlap the selection (more only for very
// long windows).
struct EntryRows {
  const int32_t* table;
  int P, Hkv, h, nsink, nwin, end, early_row;
  __device__ EntryRows(const SelectArgs& a, int e) {
    const int b = e / a.num_kv_heads, seq = a.seq_ids[b], len = a.lengths[seq], tid = threadIdx.x;
    table = a.tables + a.table_offset[seq];
    P = a.page_size;
    Hkv = a.num_kv_heads;
    h = e % Hkv;
    end = a.entry_end[e];
    nsink = min(a.sinks, end);
    nwin = max(len - end, 0);
    early_row = tid < nsink ? row_of(tid) : (tid < nsink + nwin ? row_of(end + tid - nsink) : -1);
  }
  __device__ int row_of(int pos) const { return (table[pos / P] * Hkv + h) * P + pos % P; }
};

// Exact rows of entry e: sinks, members of the selected clusters (size[pad(i)] < 0, i < C,
// in i order; cluster_of(i) is its global id), window. scratch: [C] ints (overwritten),
// list_off: [C]. r: the entry's sinks and window (this thread's row looked up early).
template <class ClusterOf>
__device__ void write_exact_rows(const SelectArgs& a, int e, const int* size, int C, int* scratch, int* list_off,
                                 ClusterOf cluster_of, const EntryRows& r, int* s_tmp) {
  const int tid = threadIdx.x, cap = a.exact_cap;
  const int nsink = r.nsink, nwin = r.nwin, end = r.end;
  auto row_of = [&](int pos) { return r.row_of(pos); };
  int32_t* rows = a.exact_rows + int64_t(e) * cap;
  // Compact the selected clusters (index order) with their token offsets, then expand their
  // members with all threads (k-th cluster found by binary search over the offsets).
  const int per = (C + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(C, tid * per), hi = min(C, lo + per);
  int chosen = 0, nchosen = 0;
  for (int i = lo; i < hi; ++i) {
    const int n = size[pad(i)];
    if (n < 0) {
      chosen -= n;
      ++nchosen;
    }
  }
  int nsel, nclusters;
  int at = block_exclusive_scan(chosen, s_tmp, nsel);
  int k = block_exclusive_scan(nchosen, s_tmp, nclusters);
  int* list_mb = scratch;
  __syncthreads();  // all reads of the scratch done (the list overwrites it)
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
  for (int j = tid; j < nsel && nsink + j < cap; j += kSelectThreads) {
    int lo_k = 0, hi_k = nclusters - 1;  // largest k with list_off[k] <= j
    while (lo_k < hi_k) {
      const int mid = (lo_k + hi_k + 1) >> 1;
      if (list_off[mid] <= j)
        lo_k = mid;
      else
        hi_k = mid - 1;
    }
    rows[nsink + j] = row_of(a.members[list_mb[lo_k] + (j - list_off[lo_k])]);
  }
  for (int t = tid; t < nsink + nwin; t += kSelectThreads) {
    const int at_t = t < nsink ? t : nsel + t;  // window rows follow the selected ones
    if (at_t < cap) rows[at_t] = t == tid ? r.early_row : (t < nsink ? row_of(t) : row_of(end + t - nsink));
  }
  if (tid == 0) {
    const int count = nsink + nsel + nwin;
    if (count > cap) atomicOr(a.error_flags, 1u);
    a.exact_n[e] = min(count, cap);
  }
}

#define MP_SELECT_SHARED                                   \
  __shared__ unsigned int hist[4096];                      \
  __shared__ int s_tmp[kSelectWarps + 1];                  \
  __shared__ unsigned long long s_tmp64[kSelectWarps];     \
  __shared__ int s_digit, s_above;                         \
  const SelectShared sh{hist, s_tmp, s_tmp64, &s_digit, &s_above}

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

  const EntryRows rows(a, e);

  combine_partials(a, b, h, s_M, s_invZ);
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
  int total;
  block_exclusive_scan(mine, s_tmp, total);
  greedy_select(key, size, C, a.budget, total, sh);

  // Outputs: far-field sizes and the exact rows.
  for (int i = tid; i < C; i += kSelectThreads) a.far_size[cb + i] = max(size[pad(i)], 0);
  write_exact_rows(a, e, size, C, reinterpret_cast<int*>(key), list_off, [&](int i) { return cb + i; }, rows, s_tmp);
}

// Block-wide max (kMax) or sum of v[g] for the heads g < G; the result for head g is
// returned to thread g (others get the identity). s_red: [kSelectWarps][16].
template <bool kMax>
__device__ float reduce_heads(const float (&v)[16], int G, float (*s_red)[16]) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int g = 0; g < 16; ++g)
    if (g < G) {
      const float r = kMax ? warp_max(v[g]) : warp_sum(v[g]);
      if (lane == 0) s_red[warp][g] = r;
    }
  __syncthreads();
  float r = kMax ? neg_inf() : 0.0f;
  if (tid < G)
    for (int w = 0; w < kSelectWarps; ++w) r = kMax ? fmaxf(r, s_red[w][tid]) : r + s_red[w][tid];
  return r;
}

__device__ __forceinline__ float load_key(const void* p, int kind, int64_t i) {
  if (kind == 0) return __ldg(static_cast<const float*>(p) + i);
  if (kind == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

// Two-level selection, one CTA per entry (after the scoring kernel scored the coarse level):
//   1. coarse importance, greedy selection under coarse_budget; unselected coarse clusters
//      go to the far field and to the frontier sum (their n 2^x);
//   2. the children of the selected coarse clusters (ascending fine id, non-empty) are
//      scored here (one warp per candidate) and normalised over the frontier: unselected
//      coarse clusters + all candidates (as the CPU policy does);
//   3. greedy selection of the candidates under budget; the rest joins the far field.
// Writes far_size for all of the entry's clusters, the compact far list and the exact rows.
__global__ void __launch_bounds__(kSelectThreads) select_hier_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  MP_SELECT_SHARED;
  __shared__ float s_M[16], s_Z[16], s_far[16], s_invZ[16], s_Mf[16];
  __shared__ int s_nfar;
  // Per-warp head reductions reuse the histogram (idle outside greedy_select).
  auto s_red = reinterpret_cast<float(*)[16]>(hist);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e = blockIdx.x, Hkv = a.num_kv_heads, G = a.group, D = a.head_dim;
  const int b = e / Hkv, h = e % Hkv;
  const int cb = a.entry_begin[e], Cc = a.entry_coarse[e], Cf = a.entry_count[e] - Cc, fb = cb + Cc;
  const int cpad = pad(a.smem_clusters) + 1;
  uint32_t* key = reinterpret_cast<uint32_t*>(smem);  // [pad(n)] f32 bits of I
  int* size = reinterpret_cast<int*>(key + cpad);     // [pad(n)] n > 0 candidate, -n selected, 0 empty
  int* list_off = size + cpad;                        // [n]
  int* cand = list_off + a.smem_clusters;             // [Cf] fine ids of the candidates
  float* s_q = reinterpret_cast<float*>(cand + a.smem_clusters);  // [G, D] scaled scoring queries

  const EntryRows rows(a, e);
  for (int i = tid; i < G * D; i += kSelectThreads)
    s_q[i] = a.q_score[(int64_t(b) * Hkv * G + int64_t(h) * G) * D + i] * a.qscale;
  int32_t* far_ids = a.far_ids + int64_t(e) * a.far_cap;

  // 1. Coarse level.
  combine_partials(a, b, h, s_M, s_Z);
  if (tid < G) {
    s_invZ[tid] = s_Z[tid] > 0.0f ? 1.0f / s_Z[tid] : 0.0f;
    s_far[tid] = 0.0f;
  }
  __syncthreads();
  int mine = 0;
  for (int i = tid; i < Cc; i += kSelectThreads) {
    const int n = max(a.sizes[cb + i], 0);
    float imp = 0.0f;
    for (int g = 0; g < G; ++g) imp += fast_exp2(a.scores[int64_t(cb + i) * G + g] - s_M[g]) * s_invZ[g];
    key[pad(i)] = __float_as_uint(n > 0 ? imp : 0.0f);
    size[pad(i)] = n;
    mine += n;
  }
  int total;
  block_exclusive_scan(mine, s_tmp, total);
  const int coarse_budget = max(a.budget, a.coarse_budget);
  greedy_select(key, size, Cc, coarse_budget, total, sh);
  // Unselected coarse clusters: far size, far list, frontier sums (relative to s_M).
  {
    const int per = (Cc + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(Cc, tid * per), hi = min(Cc, lo + per);
    int nf = 0;
    for (int i = lo; i < hi; ++i) nf += size[pad(i)] > 0;
    int nfar;
    int at = block_exclusive_scan(nf, s_tmp, nfar);
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      a.far_size[cb + i] = max(n, 0);
      if (n > 0) far_ids[at++] = i;
    }
    if (tid == 0) s_nfar = nfar;
    for (int g = 0; g < G; ++g) {
      float z = 0.0f;
      for (int i = lo; i < hi; ++i) {
        const int n = size[pad(i)];
        if (n > 0) z += float(n) * fast_exp2(a.scores[int64_t(cb + i) * G + g] - s_M[g]);
      }
      z = warp_sum(z);
      if (lane == 0 && z != 0.0f) atomicAdd(&s_far[g], z);
    }
  }
  __syncthreads();
  // 2. Candidates: non-empty children of the selected coarse clusters (all non-empty fine
  // clusters without a coarse level), flagged in `size`, compacted in id order into `cand`.
  // One warp per selected coarse cluster, lanes over its children (few round trips).
  for (int i = tid; i < Cf; i += kSelectThreads) a.far_size[fb + i] = 0;
  const bool flat = Cc == 0;
  int nsc;
  {
    const int per = (Cc + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(Cc, tid * per), hi = min(Cc, lo + per);
    int ms = 0;
    for (int i = lo; i < hi; ++i) ms += size[pad(i)] < 0;
    int at = block_exclusive_scan(ms, s_tmp, nsc);
    for (int i = lo; i < hi; ++i)
      if (size[pad(i)] < 0) list_off[at++] = i;  // selected coarse clusters
  }
  __syncthreads();
  for (int f = tid; f < Cf; f += kSelectThreads) size[pad(f)] = flat && a.sizes[fb + f] > 0 ? 1 : 0;
  __syncthreads();
  for (int j = warp; j < nsc; j += kSelectWarps) {
    const int i = list_off[j];
    const int beg = a.member_begin[cb + i], fin = a.member_begin[cb + i + 1];
    for (int k = beg + lane; k < fin; k += 32) {
      const int c = a.members[k];
      if (a.sizes[fb + c] > 0) size[pad(c)] = 1;
    }
  }
  __syncthreads();
  int nc;
  {
    const int per = (Cf + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(Cf, tid * per), hi = min(Cf, lo + per);
    int mc = 0;
    for (int f = lo; f < hi; ++f) mc += size[pad(f)] != 0;
    int at = block_exclusive_scan(mc, s_tmp, nc);
    for (int f = lo; f < hi; ++f)
      if (size[pad(f)] != 0) cand[at++] = f;
  }
  __syncthreads();
  // Score the candidates: one warp per candidate, lanes over the dimensions (D <= 128), the
  // rows of U candidates in flight per warp.
  constexpr int U = 4;
  for (int k0 = warp; k0 < nc; k0 += U * kSelectWarps) {
    float kv[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kSelectWarps;
      const int64_t c = k < nc ? fb + cand[k] : 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int d = lane + 32 * j;
        kv[u][j] = k < nc && d < D ? load_key(a.key_centroids, a.key_kind, c * D + d) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kSelectWarps;
      if (k >= nc) break;  // uniform across the warp
      const int64_t c = fb + cand[k];
#pragma unroll
      for (int g = 0; g < 16; ++g)
        if (g < G) {
          float acc = 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (lane + 32 * j < D) acc = fmaf(s_q[g * D + lane + 32 * j], kv[u][j], acc);
          const float x = warp_sum(acc);
          if (lane == g) a.scores_out[c * G + g] = x;
        }
    }
  }
  __syncthreads();  // the block's global writes are visible to the block after the barrier
  // Frontier normaliser per head: unselected coarse + all candidates. Candidates strided
  // over the threads (all loads of a pass in flight), per-head block reductions.
  {
    float lm[16];
#pragma unroll
    for (int g = 0; g < 16; ++g) lm[g] = neg_inf();
    for (int k = tid; k < nc; k += kSelectThreads) {
      const float* x = a.scores + int64_t(fb + cand[k]) * G;
#pragma unroll
      for (int g = 0; g < 16; ++g)
        if (g < G) lm[g] = fmaxf(lm[g], x[g]);
    }
    const float mx = reduce_heads<true>(lm, G, s_red);
    if (tid < G) s_Mf[tid] = fmaxf(mx, s_far[tid] > 0.0f ? s_M[tid] : neg_inf());
    __syncthreads();
    float lz[16];
#pragma unroll
    for (int g = 0; g < 16; ++g) lz[g] = 0.0f;
    for (int k = tid; k < nc; k += kSelectThreads) {
      const int64_t c = fb + cand[k];
      const float n = float(a.sizes[c]);
#pragma unroll
      for (int g = 0; g < 16; ++g)
        if (g < G) lz[g] += n * fast_exp2(a.scores[c * G + g] - s_Mf[g]);
    }
    float z = reduce_heads<false>(lz, G, s_red);
    if (tid < G) {
      if (s_far[tid] > 0.0f) z += s_far[tid] * fast_exp2(s_M[tid] - s_Mf[tid]);
      s_M[tid] = s_Mf[tid];
      s_invZ[tid] = z > 0.0f ? 1.0f / z : 0.0f;
    }
    __syncthreads();
  }
  // 3. Fine selection among the candidates (index k, ascending fine id).
  mine = 0;
  for (int k = tid; k < nc; k += kSelectThreads) {
    const int64_t c = fb + cand[k];
    const int n = a.sizes[c];
    float imp = 0.0f;
    for (int g = 0; g < G; ++g) imp += fast_exp2(a.scores[c * G + g] - s_M[g]) * s_invZ[g];
    key[pad(k)] = __float_as_uint(imp);
    size[pad(k)] = n;
    mine += n;
  }
  block_exclusive_scan(mine, s_tmp, total);
  greedy_select(key, size, nc, a.budget, total, sh);
  {
    const int per = (nc + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(nc, tid * per), hi = min(nc, lo + per);
    int nf = 0;
    for (int k = lo; k < hi; ++k) nf += size[pad(k)] > 0;
    int nfar;
    int at = s_nfar + block_exclusive_scan(nf, s_tmp, nfar);
    for (int k = lo; k < hi; ++k) {
      const int n = size[pad(k)];
      if (n > 0) {
        a.far_size[fb + cand[k]] = n;
        far_ids[at++] = Cc + cand[k];
      }
    }
    if (tid == 0) a.far_n[e] = s_nfar + nfar;
  }
  write_exact_rows(a, e, size, nc, reinterpret_cast<int*>(key), list_off, [&](int k) { return fb + cand[k]; }, rows,
                   s_tmp);
}

}  // namespace multipole::cuda::detail
