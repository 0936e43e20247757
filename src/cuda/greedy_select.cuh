#pragma once
// The greedy cluster selection of one CTA (kSelectThreads threads) over C clusters in shared
// memory, as the multipole kernels use it (select.cuh) and the op tests run it alone
// (tests/cuda/test_cuda_select.cu). Semantics: greedy in decreasing importance (ties: lower
// cluster index first), taking a cluster when its size fits the remaining budget and
// skipping it otherwise. Computed without a pick-by-pick sort of all clusters:
//   1. a count-weighted radix select over the f32 bits of I (12 + 10 + 10 bits) finds the
//      longest prefix of the greedy order whose sizes fit the budget (ties by index scan);
//   2. the rest of the greedy walk: every unselected cluster ahead of the current point
//      has a size above the remaining budget R (it was skipped, and R only shrinks), so the
//      next pick is the most important cluster with n <= R; repeat while one exists;
// or, for at most 256 clusters, by a one-warp walk, finished by a block-wide sort
// (sorted_greedy) where the walk would run long.
// Non-template functions are `inline`: the header is included by more than one .cu.
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

constexpr int kSelectWarps = kSelectThreads / 32;

// Exclusive prefix sum over the CTA (thread order): .x this thread's, .y the total. Its
// scratch is its own static shared array and both results come back in registers: with a
// pointer argument and a reference for the total, this non-inlined function reached shared
// memory through generic loads and returned the total through local memory (ncu, gpu-notes
// item 17). Not inlined: one copy of the code for its ~14 call sites (fewer instruction
// fetches).
inline __device__ __noinline__ int2 block_scan(int x) {
  __shared__ int s_scan[kSelectWarps + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int incl = warp_inclusive_sum(x);
  if (lane == 31) s_scan[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kSelectWarps ? s_scan[lane] : 0;
    const int wi = warp_inclusive_sum(w);
    if (lane < kSelectWarps) s_scan[lane] = wi - w;
    if (lane == kSelectWarps - 1) s_scan[kSelectWarps] = wi;
  }
  __syncthreads();
  const int2 r = make_int2(s_scan[warp] + incl - x, s_scan[kSelectWarps]);
  __syncthreads();
  return r;
}
// block_scan's exclusive sum; `total` gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int x, int& total) {
  const int2 r = block_scan(x);
  total = r.y;
  return r.x;
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

struct SelectShared {
  unsigned int* hist;  // [4096], 8-byte aligned (sorted_greedy's scratch)
  unsigned long long* tmp64;  // [kSelectWarps]
  int* digit;
  int* above;
};

// Greedy walk by one warp over C <= 32 * kPer clusters held in registers (cluster i in lane
// i % 32, slot i / 32): each step takes the most important cluster with 0 < n <= R (ties:
// lower index), which is the greedy order (a cluster skipped once never fits again, R only
// shrinks). Selected clusters get size -n in shared memory. Stops before pick max_steps + 1
// and sets `more` if one still fits then. No barriers; ~10-20 steps in practice.
// precheck: if at least max_steps + 1 clusters have 0 < n <= R / (max_steps + 1) (so that
// many picks are possible: the greedy tail is likely long), pick nothing and set `more`: a
// walk that hands over after max_steps picks costs them (~0.25 us each) on top of the
// radix path (many tiny clusters, e.g. k-means of random keys). A bound on the smallest
// size alone is not enough: one small trailing cluster sent uniform indexes to the radix
// path (H200: +10 us per step at 32K b1).
template <int kPer>
__device__ int warp_greedy(const uint32_t* key, int* size, int C, int R, int max_steps, bool& more,
                           bool precheck = false) {
  const int lane = threadIdx.x & 31;
  uint32_t k1[kPer];  // key + 1 (f32 bits of I >= 0 stay below 0xffffffff): 0 means "none"
  int n[kPer];
  const int tiny_max = R / (max_steps + 1);
  int tiny = 0;  // clusters with 0 < n <= tiny_max
#pragma unroll
  for (int s = 0; s < kPer; ++s) {
    const int i = lane + 32 * s;
    n[s] = i < C ? size[pad(i)] : 0;
    k1[s] = i < C ? key[pad(i)] + 1u : 0u;
    tiny += n[s] > 0 && n[s] <= tiny_max;
  }
  more = false;
  if (precheck && max_steps < C && int(__reduce_add_sync(0xffffffffu, unsigned(tiny))) > max_steps) {
    more = true;
    return R;
  }
  for (int steps = 0; R > 0; ++steps) {
    // This lane's best eligible cluster (slots in ascending index: strict > keeps the lower
    // index on ties), then the warp's largest key and, among its holders, the lowest index.
    uint32_t bk = 0, bi = 0xffffffffu;
#pragma unroll
    for (int s = 0; s < kPer; ++s)
      if (n[s] > 0 && n[s] <= R && k1[s] > bk) {
        bk = k1[s];
        bi = uint32_t(lane + 32 * s);
      }
    const uint32_t m = __reduce_max_sync(0xffffffffu, bk);
    if (m == 0) break;
    if (steps == max_steps) {
      more = true;
      break;
    }
    const int i = int(__reduce_min_sync(0xffffffffu, bk == m ? bi : 0xffffffffu)), slot = i >> 5, owner = i & 31;
    int ni = 0;
#pragma unroll
    for (int s = 0; s < kPer; ++s)
      if (s == slot) ni = n[s];
    ni = __shfl_sync(0xffffffffu, ni, owner);
    if (lane == owner) {
#pragma unroll
      for (int s = 0; s < kPer; ++s)
        if (s == slot) n[s] = -n[s];
      size[pad(i)] = -ni;
    }
    R -= ni;
  }
  return R;
}

// The greedy tail of C clusters (C <= 2048), walked by one warp from shared memory: tkey[j]
// is cluster j's key + 1 (0: none, as in warp_greedy), tidn[j] its id << 16 | n, in
// ascending ids (the lower j is the lower id on ties). Each step takes the most important
// cluster with 0 < n <= R, as warp_greedy does; taken ones get n = 0 here and size -n.
// Shared memory rather than registers: a slot per cluster in registers would raise the
// kernel's register count, and with it whether a selection CTA fits beside a scoring CTA
// on an SM (H200: +1.5-2 us per batch-1 step with 16 slots). No barriers. picks: how many.
inline __device__ int warp_greedy_tail(int* size, const uint32_t* tkey, uint32_t* tidn, int C, int R, int& picks) {
  const int lane = threadIdx.x & 31;
  picks = 0;
  while (R > 0) {
    uint32_t bk = 0;
    int bj = C;
#pragma unroll 4
    for (int j = lane; j < C; j += 32) {  // ascending j: strict > keeps the lower j on ties
      const int n = int(tidn[j] & 0xffffu);
      const uint32_t k = tkey[j];
      if (n > 0 && n <= R && k > bk) {
        bk = k;
        bj = j;
      }
    }
    const uint32_t m = __reduce_max_sync(0xffffffffu, bk);
    if (m == 0) break;
    const int j = int(__reduce_min_sync(0xffffffffu, bk == m ? unsigned(bj) : unsigned(C)));
    const uint32_t idn = tidn[j];
    const int n = int(idn & 0xffffu);
    __syncwarp();  // every lane has read tidn[j] before it changes
    if (lane == (j & 31)) {
      tidn[j] = idn & 0xffff0000u;
      size[pad(int(idn >> 16))] = -n;
    }
    __syncwarp();
    R -= n;
    ++picks;
  }
  return R;
}

// The greedy order over C <= 256 clusters by sorting them, for all threads of the CTA:
//   1. each of 8 warps sorts 32 clusters by (key, lower index first), descending, in
//      registers (bitonic, shuffles); a cluster's place in the whole order is its place in
//      its warp's run plus, from a binary search in each other run, the count of larger
//      ones there (keys are unique with the index: no ties);
//   2. one warp takes the sorted order in rounds: the clusters that can still fit (n <= R)
//      are taken while their running sum stays <= R; the first one past that does not fit
//      (the walk would skip it), and the next round starts after it with what is left. The
//      first round is the longest prefix that fits: one warp scan per skip, not per pick.
//      (Lane 0 walking the order after the first round, a plain loop over sizes in shared
//      memory, was no faster on the H200: gpu-notes item 20.)
// Candidates are the clusters with n > 0; selected ones get size -n. Returns the budget
// left. Uses sh.hist as scratch. Three barriers.
inline __device__ __noinline__ int sorted_greedy(const uint32_t* key, int* size, int C, int R, const SelectShared& sh) {
  constexpr int kPer = 8;  // sorted positions per lane of the taking warp
  unsigned long long* runs = reinterpret_cast<unsigned long long*>(sh.hist);  // [256] the warps' runs
  // Sorted position p at p + p / 8 (the taking warp reads 8 consecutive ones per lane).
  int* sorted_id = reinterpret_cast<int*>(sh.hist) + 512;  // [288]
  int* sorted_n = sorted_id + 288;                         // [288]; 0 past the candidates
  auto at = [](int p) { return p + (p >> 3); };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // (key << 32) | ~index: descending is the greedy order; 0 marks "no candidate".
  unsigned long long v = 0;
  if (tid < 256) {
    if (tid < C && size[pad(tid)] > 0) v = (static_cast<unsigned long long>(key[pad(tid)]) << 32) | (0xffffffffu - uint32_t(tid));
#pragma unroll 1
    for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll 1
      for (int j = k >> 1; j > 0; j >>= 1) {
        const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, j);
        const bool keep_max = ((lane & j) == 0) == ((lane & k) == 0);
        v = keep_max == (o > v) ? o : v;
      }
    }
    runs[tid] = v;
    sorted_n[at(tid)] = 0;
  }
  __syncthreads();
  if (tid < 256 && v != 0) {
    int rank = lane;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const unsigned long long* run = runs + 32 * r;
      int pos = run[31] > v ? 32 : 0;  // how many of the run are larger than v (0..32)
#pragma unroll
      for (int step = 16; step > 0; step >>= 1) pos += pos < 32 && run[pos + step - 1] > v ? step : 0;
      rank += r == warp ? 0 : pos;
    }
    const int id = int(0xffffffffu - uint32_t(v & 0xffffffffu));
    sorted_id[at(rank)] = id;
    sorted_n[at(rank)] = size[pad(id)];
  }
  __syncthreads();
  if (tid < 32) {
    int m[kPer];
#pragma unroll
    for (int s = 0; s < kPer; ++s) m[s] = sorted_n[at(lane * kPer + s)];
    unsigned taken = 0;
    for (int last = -1; R > 0;) {
      int incl = 0;
#pragma unroll
      for (int s = 0; s < kPer; ++s) incl += m[s] > 0 && m[s] <= R && lane * kPer + s > last ? m[s] : 0;
      int cum = warp_inclusive_sum(incl) - incl, used = 0, skip = 1 << 30;
#pragma unroll
      for (int s = 0; s < kPer; ++s) {
        if (m[s] > 0 && m[s] <= R && lane * kPer + s > last) {
          cum += m[s];
          if (cum <= R) {
            taken |= 1u << s;
            used = cum;
          } else {
            skip = min(skip, lane * kPer + s);
          }
        }
      }
      R -= int(__reduce_max_sync(0xffffffffu, unsigned(used)));
      last = int(__reduce_min_sync(0xffffffffu, unsigned(skip)));
      if (last == 1 << 30) break;
    }
#pragma unroll
    for (int s = 0; s < kPer; ++s)
      if (taken >> s & 1u) size[pad(sorted_id[at(lane * kPer + s)])] = -m[s];
    if (tid == 0) *sh.above = R;
  }
  __syncthreads();
  return *sh.above;
}

// Greedy selection over key[pad(i)] (f32 bits of I >= 0) and size[pad(i)] (n > 0 candidate)
// for i < C under budget R, `total` = sum of candidate sizes: selected clusters get size -n.
// All threads call; returns the budget left. C <= min(warp_max, 256): one warp walks the
// greedy order (at most warp_steps picks; the radix path below finishes after that, which
// is the greedy over the remaining clusters and budget); otherwise the radix path.
// sort (C <= min(warp_max, 256)): 1, where the warp walk stops early (the precheck, or
// warp_steps picks) sorted_greedy finishes instead of the radix path; 2, sorted_greedy
// alone.
// pc: optional phase clock, marks slot0 (radix), slot0 + 1 (ties), slot0 + 2 (walk) and
// adds to iters_slot the picks of the tail after the radix path (by one warp or block-wide),
// 1000 for the one-warp walk of C <= 256 and 2000 for sorted_greedy.
// Not inlined: the coarse and the fine selection share one copy of the code (instruction
// fetches after an L2 flush are a large part of this kernel's time).
inline __device__ __noinline__ int greedy_select(uint32_t* key, int* size, int C, int R, int total, const SelectShared& sh,
                             int warp_max = 0, int warp_steps = 64, PhaseClock* pc = nullptr, int slot0 = 0,
                             int iters_slot = 0, bool precheck = false, int sort = 0) {
  const int tid = threadIdx.x;
  if (total <= R) {
    for (int i = tid; i < C; i += kSelectThreads) size[pad(i)] = -size[pad(i)];
    __syncthreads();
    return R - total;
  }
  if (C <= warp_max && C <= 256) {
    const int R0 = R;
    bool more = true;
    if (sort != 2) {
      if (tid < 32) {
        const int r = warp_greedy<8>(key, size, C, R, warp_steps, more, precheck);
        if (tid == 0) {
          *sh.above = r;
          *sh.digit = more ? 1 : 0;
        }
      }
      __syncthreads();
      R = *sh.above;
      more = *sh.digit != 0;
      if (pc) pc->add(iters_slot, 1000);  // marks the warp path in the profile
    }
    if (more && sort != 0) {  // (its first barrier orders the reads of sh.above before its write)
      R = sorted_greedy(key, size, C, R, sh);
      more = false;
      if (pc) pc->add(iters_slot, 2000);  // marks the sorting path in the profile
    }
    if (pc) pc->mark(slot0 + 2);
    if (!more) return R;
    // Nothing picked (the precheck foresaw a long walk): total > R still holds.
    // (The radix pass's first barrier orders the reads of sh.above before its next write.)
    if (R != R0) {
      int mine = 0;
      for (int i = tid; i < C; i += kSelectThreads) mine += max(size[pad(i)], 0);
      total = block_scan(mine).y;  // its barriers also order the reads of sh.above
      if (total <= R) {
        for (int i = tid; i < C; i += kSelectThreads)
          if (size[pad(i)] > 0) size[pad(i)] = -size[pad(i)];
        __syncthreads();
        return R - total;
      }
    }
  }
  // Weighted radix select: find the key `prefix` at which the budget runs out.
  // Loops stay rolled here and below: the code runs once per CTA, and fetching unrolled
  // copies of it after an L2 flush costs more than the loop overhead.
  uint32_t prefix = 0, mask = 0;
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 20 : pass == 1 ? 10 : 0, nb = pass == 0 ? 4096 : 1024;
#pragma unroll 1
    for (int d = tid; d < nb; d += kSelectThreads) sh.hist[d] = 0;
    __syncthreads();
#pragma unroll 1
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
#pragma unroll 1
    for (int k = 0; k < per; ++k) local += int(sh.hist[top - k]);
    const int above = block_scan(local).x;
    if (above <= R && R < above + local) {
      int cum = above;
#pragma unroll 1
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
  if (pc) pc->mark(slot0);
  // Everything above the boundary key is in; ties at it go in index order while they fit.
  {
    const int per = (C + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(C, tid * per), hi = min(C, lo + per);
    int ties = 0;
#pragma unroll 1
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      const uint32_t k = key[pad(i)];
      if (n > 0 && k > prefix) size[pad(i)] = -n;
      if (n > 0 && k == prefix) ties += n;
    }
    int cum = block_scan(ties).x;
    int used = 0;
#pragma unroll 1
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
    R -= block_scan(used).y;
  }
  __syncthreads();
  if (pc) pc->mark(slot0 + 1);

  // The rest of the greedy walk. Only clusters with 0 < n <= R can still be taken (R only
  // shrinks). When at most kTailWalkMax are left (k-means of random keys leaves hundreds to
  // thousands of clusters of a few tokens after the large ones), one warp walks them from
  // shared memory (no pick limit; a pick scans left / 32 entries per lane); otherwise
  // block-wide steps (~0.9-1.3 us per pick, two barriers), of which the slowest entry of a
  // k-means step took 16-26 before H20.
  int iters = 0;
  bool walked = false;  // the tail went to one warp (uniform: every thread saw the same total)
  {
    const int per = (C + kSelectThreads - 1) / kSelectThreads;
    const int lo = min(C, tid * per), hi = min(C, lo + per);
    int ne = 0;
#pragma unroll 1
    for (int i = lo; i < hi; ++i) {
      const int n = size[pad(i)];
      ne += n > 0 && n <= R;
    }
    int left;
    int at = block_exclusive_scan(ne, left);
    constexpr int kTailWalkMax = 2048;  // two words each fill sh.hist (free after the radix passes)
    if (left > 0 && left <= kTailWalkMax && R < 65536 && C <= 65536) {  // id << 16 | n fits a word
      uint32_t* tkey = sh.hist;
      uint32_t* tidn = sh.hist + kTailWalkMax;
#pragma unroll 1
      for (int i = lo; i < hi; ++i) {
        const int n = size[pad(i)];
        if (n > 0 && n <= R) {
          tkey[at] = key[pad(i)] + 1u;
          tidn[at++] = uint32_t(i) << 16 | uint32_t(n);
        }
      }
      __syncthreads();
      if (tid < 32) {
        const int r = warp_greedy_tail(size, tkey, tidn, left, R, iters);  // thread 0's count goes to pc
        if (tid == 0) *sh.above = r;
      }
      __syncthreads();
      R = *sh.above;
      walked = true;
    }
  }
  while (!walked && R > 0) {
    ++iters;
    unsigned long long best = 0;
#pragma unroll 1
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
  if (pc) {
    pc->mark(slot0 + 2);
    pc->add(iters_slot, iters);
  }
  return R;
}

}  // namespace multipole::cuda::detail
