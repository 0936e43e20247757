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

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned int hist[4096];
  __shared__ float s_M[16], s_invZ[16];
  __shared__ int s_tmp[kSelectWarps + 1];
  __shared__ unsigned long long s_tmp64[kSelectWarps];
  __shared__ int s_digit, s_above;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e = blockIdx.x, Hkv = a.num_kv_heads, G = a.group;
  const int b = e / Hkv, h = e % Hkv;
  const int cb = a.entry_begin[e], C = a.entry_count[e];
  uint32_t* key = reinterpret_cast<uint32_t*>(smem);          // [C] f32 bits of I
  int* size = reinterpret_cast<int*>(key + a.smem_clusters);  // [C] 0: not a candidate
  uint8_t* sel = reinterpret_cast<uint8_t*>(size + a.smem_clusters);  // [C]

  // 1. Normalisers per head from the scoring CTAs' partials.
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
      s_invZ[g] = zs > 0.0f ? 1.0f / zs : 0.0f;
    }
  }
  __syncthreads();

  // 2. Importance keys.
  int mine = 0;
  for (int i = tid; i < C; i += kSelectThreads) {
    const int n = max(a.sizes[cb + i], 0);
    float imp = 0.0f;
    if (n > 0)
      for (int g = 0; g < G; ++g) imp += fast_exp2(a.scores[int64_t(cb + i) * G + g] - s_M[g]) * s_invZ[g];
    key[i] = __float_as_uint(imp);  // I >= 0: the bits order like the values
    size[i] = n;
    sel[i] = 0;
    mine += n;
  }
  int total;
  block_exclusive_scan(mine, s_tmp, total);
  int R = a.budget;

  if (total <= R) {
    for (int i = tid; i < C; i += kSelectThreads) sel[i] = size[i] > 0;
    R -= total;
  } else {
    // 3. Weighted radix select: find the key `prefix` at which the budget runs out.
    uint32_t prefix = 0, mask = 0;
    const int shifts[3] = {20, 10, 0}, widths[3] = {12, 10, 10};
    for (int pass = 0; pass < 3; ++pass) {
      const int shift = shifts[pass], nb = 1 << widths[pass];
      for (int d = tid; d < nb; d += kSelectThreads) hist[d] = 0;
      __syncthreads();
      for (int i = tid; i < C; i += kSelectThreads)
        if (size[i] > 0 && (key[i] & mask) == prefix) atomicAdd(&hist[(key[i] >> shift) & (nb - 1)], unsigned(size[i]));
      __syncthreads();
      // Thread t owns digits [nb - (t+1) per, nb - t per), scanned from the top.
      const int per = nb / kSelectThreads;
      const int top = nb - 1 - tid * per;
      int local = 0;
      for (int k = 0; k < per; ++k) local += int(hist[top - k]);
      int dummy;
      const int above = block_exclusive_scan(local, s_tmp, dummy);
      if (above <= R && R < above + local) {
        int cum = above;
        for (int k = 0; k < per; ++k) {
          const int w = int(hist[top - k]);
          if (cum + w > R) {
            s_digit = top - k;
            s_above = cum;
            break;
          }
          cum += w;
        }
      }
      __syncthreads();
      R -= s_above;
      prefix |= uint32_t(s_digit) << shift;
      mask |= uint32_t(nb - 1) << shift;
      __syncthreads();
    }
    // Everything above the boundary key is in; ties at it go in index order while they fit.
    const int per = (C + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(C, tid * per), hi = min(C, lo + per);
    int ties = 0;
    for (int i = lo; i < hi; ++i) {
      if (size[i] > 0 && key[i] > prefix) sel[i] = 1;
      if (size[i] > 0 && key[i] == prefix) ties += size[i];
    }
    int dummy;
    int cum = block_exclusive_scan(ties, s_tmp, dummy);
    int used = 0;
    for (int i = lo; i < hi; ++i)
      if (size[i] > 0 && key[i] == prefix) {
        cum += size[i];
        if (cum <= R) {
          sel[i] = 1;
          used += size[i];
        }
      }
    int used_total;
    block_exclusive_scan(used, s_tmp, used_total);
    R -= used_total;
  }
  __syncthreads();

  // 4. The rest of the greedy walk.
  while (R > 0) {
    unsigned long long best = 0;
    for (int i = tid; i < C; i += kSelectThreads)
      if (size[i] > 0 && size[i] <= R && !sel[i]) {
        const unsigned long long k = (static_cast<unsigned long long>(key[i]) << 32) | (0xffffffffu - uint32_t(i));
        best = k > best ? k : best;
      }
    best = block_max_u64(best, s_tmp64);
    if (best == 0) break;
    const int i = int(0xffffffffu - uint32_t(best & 0xffffffffu));
    if (tid == 0) sel[i] = 1;
    R -= size[i];
    __syncthreads();
  }
  __syncthreads();

  // 5. Outputs: far-field sizes and the exact rows.
  for (int i = tid; i < C; i += kSelectThreads) a.far_size[cb + i] = sel[i] ? 0 : size[i];
  const int seq = a.seq_ids[b], len = a.lengths[seq], end = a.entry_end[e];
  const int32_t* table = a.tables + a.table_offset[seq];
  const int P = a.page_size, cap = a.exact_cap;
  int32_t* rows = a.exact_rows + int64_t(e) * cap;
  auto row_of = [&](int pos) { return (table[pos / P] * Hkv + h) * P + pos % P; };
  const int nsink = min(a.sinks, end), nwin = max(len - end, 0);
  const int per = (C + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(C, tid * per), hi = min(C, lo + per);
  int chosen = 0;
  for (int i = lo; i < hi; ++i) chosen += sel[i] ? size[i] : 0;
  int nsel;
  int at = nsink + block_exclusive_scan(chosen, s_tmp, nsel);
  for (int i = lo; i < hi; ++i)
    if (sel[i]) {
      const int mb = a.member_begin[cb + i];
      for (int k = 0; k < size[i]; ++k, ++at)
        if (at < cap) rows[at] = row_of(a.members[mb + k]);
    }
  for (int t = tid; t < nsink; t += kSelectThreads)
    if (t < cap) rows[t] = row_of(t);
  for (int t = tid; t < nwin; t += kSelectThreads)
    if (nsink + nsel + t < cap) rows[nsink + nsel + t] = row_of(end + t);
  if (tid == 0) {
    const int count = nsink + nsel + nwin;
    if (count > cap) atomicOr(a.error_flags, 1u);
    a.exact_n[e] = min(count, cap);
  }
}

}  // namespace multipole::cuda::detail
