#pragma once
// Kernel lab (lab_cluster_select): the greedy rule of one level over a 16-CTA cluster from each
// CTA's largest keys (gpu-notes items 65-66; in the step it cost +5.4 us at 32K b1, so not in the
// library): a CTA keys only its own slice, pushes its kTop largest keys into every CTA with the largest
// key it kept back (its bound) and the least size it kept back; every CTA then ranks the 256
// published keys and walks them (cluster_greedy.cuh's rule: decreasing keys, a key taken when it
// fits the room left). Above the largest bound L every key is published, so the walk there is the
// rule's; past L a key kept back could only be taken while the room left is at least the least
// size kept back, and only then do the published keys not settle it: every CTA sees the same keys,
// so all report it alike and the caller runs the rule over every key (greedy_select).
#include <climits>
#include <cstdint>

#include "cuda/cluster_greedy.cuh"
#include "cuda/cluster_step.cuh"
#include "cuda/common.cuh"

namespace multipole::cuda::detail::cluster_step {

constexpr int kTop = 16;                 // keys a CTA publishes
constexpr int kPublished = kTop * kCtas;  // a cluster's: one a thread when ranked
static_assert(kPublished == kThreads, "one published key a thread");

// Shared memory of the rule. clear() before a cluster barrier that every CTA passes before any
// calls select_top (the other CTAs store into it).
struct alignas(16) TopSelect {
  unsigned long long key[kCtas][kTop];  // CTA r's published keys, descending; 0: none
  int payload[kCtas][kTop];
  unsigned long long bound[kCtas];      // the largest key CTA r kept back (0: none)
  int least[kCtas];                     // the least size CTA r kept back (INT_MAX: none)
  unsigned long long sorted[kPublished];
  int sorted_payload[kPublished], count[2][kThreads / 2], warp_least[kWarps];
  int n_sorted, n_above, least_all, room, rows, picks;

  __device__ void clear() {
    for (int i = threadIdx.x; i < kCtas * kTop; i += kThreads) key[i / kTop][i % kTop] = 0;
    if (threadIdx.x < kCtas) bound[threadIdx.x] = 0, least[threadIdx.x] = INT_MAX;
  }
};

namespace top_select_detail {

__device__ __forceinline__ void st_u64(uint32_t a, unsigned long long v) {
  asm volatile("st.shared::cluster.u64 [%0], %1;" ::"r"(a), "l"(v) : "memory");
}
__device__ __forceinline__ void st_s32(uint32_t a, int v) {
  asm volatile("st.shared::cluster.s32 [%0], %1;" ::"r"(a), "r"(v) : "memory");
}

// Warp 0 walks ts.sorted[lo, hi) under ts.room, listing the picks into gs (payload, index, first
// row) and setting their bits.
template <int Keys, int Picks>
__device__ void walk_sorted(TopSelect& ts, Greedy<Keys, Picks>& gs, int lo, int hi) {
  const int lane = threadIdx.x & 31;
  int left = ts.room, picks = ts.picks, rows = ts.rows;
  for (int base = lo; base < hi && left > 0; base += 32) {
    const int i = base + lane;
    const unsigned long long k = i < hi ? ts.sorted[i] : 0ull;
    const int n = k != 0 ? key_size(k) : 0;
    const int room = left;
    const unsigned taken = settle_sorted_warp(__ballot_sync(0xffffffffu, k != 0), n, left);
    const bool mine_taken = (taken >> lane) & 1u;
    const int size_before = warp_inclusive_sum(mine_taken ? n : 0) - (mine_taken ? n : 0);
    if (mine_taken) {
      const int at = picks + __popc(taken & ((1u << lane) - 1u)), j = key_index(k);
      atomicOr(&gs.selected_bits[j / 32], 1u << (j % 32));
      if (at < Picks) gs.pick_first[at] = ts.sorted_payload[i], gs.pick_j[at] = j, gs.pick_row[at] = rows + size_before;
    }
    picks += __popc(taken), rows += room - left;
  }
  __syncwarp();  // (every lane has read ts's fields)
  if (lane == 0) ts.room = left, ts.picks = picks, ts.rows = rows;
}

}  // namespace top_select_detail

// The rule under `budget` over the cluster's keys: thread t < 128 holds the CTA's key t (`key`, 0:
// none; threads t >= 128 pass 0) with its `payload`. Returns true with gs
// as greedy_select leaves it (picks in walk order; all_prefix_picks 0), or false in every CTA
// when the published keys do not settle the rule (gs untouched but for its bits, which must then
// be cleared). gs.selected_bits must be 0 and visible before the call; ts as TopSelect says.
// mark(k): phase boundaries for a lab's clocks (k = 0..3). kSpread: the published keys pushed by
// all 256 threads, one (slot, CTA) each, not 16 stores a publishing thread.
template <bool kSpread, int Keys, int Picks, class Mark>
__device__ bool select_top(const cooperative_groups::cluster_group& cluster, unsigned long long key, int payload,
                           int budget, TopSelect& ts, Greedy<Keys, Picks>& gs, const Mark& mark) {
  namespace d = top_select_detail;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, rank = int(cluster.block_rank());
  // Rank among the CTA's keys (distinct but for the zeros): threads t and t + 128 count the keys
  // above key t in one half each, two keys a load.
  constexpr int kHalf = kThreads / 2;
  unsigned long long* lk = ts.sorted;  // (free until the published keys are ranked)
  if (tid < kHalf) lk[tid] = key;
  __syncthreads();
  {
    const unsigned long long k = lk[tid % kHalf];
    const ulonglong2* half = reinterpret_cast<const ulonglong2*>(lk + (tid / kHalf) * (kHalf / 2));
    int c = 0;
#pragma unroll 8
    for (int i = 0; i < kHalf / 4; ++i) {
      const ulonglong2 two = half[i];
      c += (two.x > k ? 1 : 0) + (two.y > k ? 1 : 0);
    }
    ts.count[tid / kHalf][tid % kHalf] = c;
  }
  __syncthreads();
  const int above_me = tid < kHalf ? ts.count[0][tid] + ts.count[1][tid] : 0;
  mark(0);
  int kept = INT_MAX;
  if (kSpread && key != 0) {  // (own copies first; pushed below)
    if (above_me < kTop) ts.key[rank][above_me] = key, ts.payload[rank][above_me] = payload;
    else kept = key_size(key);
    if (above_me == kTop) ts.bound[rank] = key;
  } else if (key != 0) {
    if (above_me < kTop) {
#pragma unroll 1
      for (int r = 0; r < kCtas; ++r) {
        d::st_u64(cluster_addr(&ts.key[rank][above_me], r), key);
        d::st_s32(cluster_addr(&ts.payload[rank][above_me], r), payload);
      }
    } else {
      kept = key_size(key);
      if (above_me == kTop)
#pragma unroll 1
        for (int r = 0; r < kCtas; ++r) d::st_u64(cluster_addr(&ts.bound[rank], r), key);
    }
  }
  kept = __reduce_min_sync(0xffffffffu, kept);
  if (lane == 0) ts.warp_least[warp] = kept;
  __syncthreads();
  if (tid < kCtas) {
    int m = INT_MAX;
    for (int w = 0; w < kWarps; ++w) m = min(m, ts.warp_least[w]);
    d::st_s32(cluster_addr(&ts.least[rank], tid), m);
    if (kSpread && tid != rank && ts.bound[rank] != 0) d::st_u64(cluster_addr(&ts.bound[rank], tid), ts.bound[rank]);
  }
  if constexpr (kSpread) {
    const int s = tid % kTop, r = tid / kTop;
    if (r != rank && ts.key[rank][s] != 0) {
      d::st_u64(cluster_addr(&ts.key[rank][s], r), ts.key[rank][s]);
      d::st_s32(cluster_addr(&ts.payload[rank][s], r), ts.payload[rank][s]);
    }
  }
  mark(1);
  cluster.sync();
  mark(2);
  {
    // Published key t's rank among all: its place in its list and the keys above it in the others.
    unsigned long long bound = 0;
    int least = INT_MAX;
    for (int r = 0; r < kCtas; ++r) bound = max(bound, ts.bound[r]), least = min(least, ts.least[r]);
    const int c = tid / kTop, s = tid % kTop;
    const unsigned long long k = ts.key[c][s];
    if (k != 0) {
      int g = s;
#pragma unroll  // (15 searches of four dependent probes each, interleaved: a search loop per list took ~4 us)
      for (int o = 1; o < kCtas; ++o) {
        const unsigned long long* list = ts.key[(c + o) % kCtas];
        // The keys of list above k (descending, zeros last): halves of 8, 4, 2, 1, then the 16th.
        int n = list[7] > k ? 8 : 0;
        n += list[n + 3] > k ? 4 : 0;
        n += list[n + 1] > k ? 2 : 0;
        n += list[n] > k ? 1 : 0;
        g += n + (n == 15 && list[15] > k ? 1 : 0);
      }
      ts.sorted[g] = k, ts.sorted_payload[g] = ts.payload[c][s];
    }
    const int total = __syncthreads_count(k != 0), above = __syncthreads_count(k > bound);
    if (tid == 0) ts.n_sorted = total, ts.n_above = above, ts.least_all = least, ts.room = budget, ts.rows = 0, ts.picks = 0;
  }
  __syncthreads();
  mark(3);
  if (warp == 0) {
    // First the keys above L, then, if no key kept back can fit, the rest (one copy of the walk).
    bool settled = true;
#pragma unroll 1
    for (int pass = 0; pass < 2 && settled; ++pass) {
      d::walk_sorted(ts, gs, pass == 0 ? 0 : ts.n_above, pass == 0 ? ts.n_above : ts.n_sorted);
      __syncwarp();
      if (pass == 0) settled = ts.room == 0 || ts.room < ts.least_all;
    }
    __syncwarp();
    if (lane == 0) {
      gs.n_picks = settled ? min(ts.picks, Picks) : -1;
      if (settled) gs.pick_row[min(ts.picks, Picks)] = ts.rows;
      gs.prefix_picks = 0, gs.all_picks = ts.picks, gs.all_prefix_picks = 0;
    }
  }
  __syncthreads();
  return gs.n_picks >= 0;
}
template <int Keys, int Picks>
__device__ bool select_top(const cooperative_groups::cluster_group& cluster, unsigned long long key, int payload,
                           int budget, TopSelect& ts, Greedy<Keys, Picks>& gs) {
  return select_top<false>(cluster, key, payload, budget, ts, gs, [](int) {});
}

}  // namespace multipole::cuda::detail::cluster_step
