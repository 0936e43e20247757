#pragma once
// The greedy rule of the one-launch step (fused_step.cuh; gpu-notes items 34-36), run alike by
// every CTA of an entry's thread-block cluster over keys that every CTA holds, so that no CTA
// waits for another: clusters in decreasing importance, one that does not fit the room left
// skipped (it never fits again: the room only shrinks). Each thread of a 256-thread CTA owns
// the keys of indices tid + r kThreads.
#include <cstdint>
#include <cstring>

#include "cuda/common.cuh"

namespace multipole::cuda::detail::cluster_step {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kG = 4;  // query heads of a group held per cluster logit (float4); fewer are padded
constexpr int kKeyIndexLimit = 2048;  // indices a key can hold (its 16 index bits count down from here)
constexpr int kMaxPicks = 128;        // picks whose rows a selection lists by default (warp 0 scans them 4 a lane)
constexpr int kRoundsBeforeBatch = 2; // greedy_select<..., Walk = 2>: one-pick rounds before walk_batched

// A cluster's importance per token: sum_g 2^(x_g - gmax_g) / Z_g (gzinv_g = 1 / Z_g; 0 for a
// padded head).
__device__ __forceinline__ float importance(float4 x, const float* gmax, const float* gzinv) {
  float imp = 0;
#pragma unroll
  for (int g = 0; g < kG; ++g) imp += fast_exp2(reinterpret_cast<const float*>(&x)[g] - gmax[g]) * gzinv[g];
  return imp;
}

// Order of the greedy walk in one 64-bit key: importance bits (positive floats order as their
// bits), then the lower index first; the size (< 2^16) rides in the low bits. 0: no candidate.
// (Host code too: the lab and the tests build keys with it.)
__host__ __device__ __forceinline__ unsigned long long pick_key(float importance, int j, int n) {
#ifdef __CUDA_ARCH__
  const unsigned bits = __float_as_uint(importance);
#else
  unsigned bits;
  std::memcpy(&bits, &importance, sizeof bits);
#endif
  return (static_cast<unsigned long long>(bits) << 32) |
         (static_cast<unsigned long long>(kKeyIndexLimit - 1 - j) << 16) | static_cast<unsigned>(n);
}
__host__ __device__ __forceinline__ int key_index(unsigned long long key) {
  return kKeyIndexLimit - 1 - int((key >> 16) & 0xffffu);
}
__host__ __device__ __forceinline__ int key_size(unsigned long long key) { return int(key & 0xffffu); }

// Shared memory of one selection over at most Keys indices. After greedy_select: picks
// [0, n_picks) in walk order (the first Picks of them listed), pick k of index pick_j[k]
// with payload pick_first[k] (a member offset) and rows [pick_row[k], pick_row[k + 1]);
// selected_bits marks every picked index. (Picks 512: the one-launch step's re-ranking lists
// picks worth up to 512 tokens.)
template <int Keys, int Picks = kMaxPicks>
struct Greedy {
  static_assert(Picks % 128 == 0, "warp 0 scans the listed picks' rows, Picks / 32 a lane");
  static constexpr int kPicks = Picks;
  int hist[256], digit_info[3], warp_count[kWarps];
  unsigned long long best[2][kWarps];
  int pick_j[Picks], pick_first[Picks], pick_row[Picks + 1], n_picks, prefix_picks;
  int all_picks, all_prefix_picks;  // not capped at Picks (diagnostics)
  uint32_t selected_bits[Keys / 32];

  __device__ bool selected(int j) const { return (selected_bits[j / 32] >> (j % 32)) & 1u; }
  // Row t's offset in the member lists (token positions, cluster after cluster; pick_first
  // the picks' offsets), t in [0, pick_row[n_picks]).
  __device__ int member_offset(int t) const {
    int k = 0, hi = n_picks;  // the pick holding row t: pick_row[k] <= t < pick_row[k + 1]
    while (hi - k > 1) {
      const int mid = (k + hi) / 2;
      if (pick_row[mid] <= t) k = mid;
      else hi = mid;
    }
    return pick_first[k] + (t - pick_row[k]);
  }
  // The token position of row t of the picks' rows, -1 outside [0, pick_row[n_picks]).
  __device__ int row_position(int t, const int32_t* members) const {
    return t < 0 || t >= pick_row[n_picks] ? -1 : members[member_offset(t)];
  }
};

// Histogram counts pack (clusters << 20) + tokens: tokens up to 2^20 per digit, clusters < 2^12.
constexpr int kCountShift = 20;
constexpr int kTokenMask = (1 << kCountShift) - 1;
// The taken keys' scan packs (picks << 16) + tokens: their tokens are at most the budget, which
// is under 2^16 as a key's size is (the plan's limit).
constexpr int kTakenShift = 16;
constexpr int kTakenMask = (1 << kTakenShift) - 1;

// Scratch of walk_batched in Greedy::hist (free after the radix passes).
struct WalkScratch {
  unsigned long long cand[kWarps * 4];  // each warp's four largest first keys, 0 for none
  int cand_payload[kWarps * 4];
  unsigned long long bound[kWarps];     // each warp's largest key that is no candidate
  int room, rows, picks;
  unsigned long long below;
};

// The walk over keys sorted in decreasing order across a warp's lanes (lane l holds the l-th, of
// size n; `open`: the lanes that hold one) under the room `left`: while some remain, the eligible
// ones (size <= left) that fit in order are taken; the first that does not is skipped, and so is
// every key before it that was not eligible. Returns the taken lanes; `left` loses their sizes.
__device__ __forceinline__ unsigned settle_sorted_warp(unsigned open, int n, int& left) {
  const int lane = threadIdx.x & 31;
  unsigned taken = 0;
  while (open) {
    const bool elig = ((open >> lane) & 1u) && n <= left;
    const int mine = elig ? n : 0, inc = warp_inclusive_sum(mine);
    const unsigned over = __ballot_sync(0xffffffffu, elig && inc > left);
    if (over == 0) {
      taken |= __ballot_sync(0xffffffffu, elig);
      left -= __shfl_sync(0xffffffffu, inc, 31);
      break;
    }
    const int f = __ffs(int(over)) - 1;
    const unsigned before = (1u << f) - 1u;
    taken |= __ballot_sync(0xffffffffu, elig) & before;
    left -= __shfl_sync(0xffffffffu, inc - mine, f);
    open &= ~((before << 1) | 1u);  // lanes up to f are settled
  }
  return taken;
}

// The greedy walk, many keys a round. Every thread takes its two largest eligible keys (under
// `below`, size <= room; one that does not fit now never will). Let L be the largest key that
// is not among the warps' four largest first keys: every key above L is such a candidate, so
// the candidates above L are exactly the eligible keys above L. Warp 0 sorts them and walks
// them in order (taken if it fits, else skipped for good), and the next round looks below L.
// A round settles at least one key (the largest) and typically many. Same picks, listing and
// bits as the one-pick rounds.
template <int Owned, int Keys, int Picks>
__device__ void walk_batched(const unsigned long long (&key)[Owned], const int (&payload)[Owned], Greedy<Keys, Picks>& gs,
                             int& room, int& rows, int& picks, unsigned long long& below) {
  static_assert(sizeof(WalkScratch) <= sizeof(gs.hist), "the walk's scratch lives in hist[]");
  WalkScratch& ws = *reinterpret_cast<WalkScratch*>(gs.hist);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const auto warp_max = [](unsigned long long v) {
    const unsigned hi = __reduce_max_sync(0xffffffffu, unsigned(v >> 32));
    const unsigned lo = __reduce_max_sync(0xffffffffu, unsigned(v >> 32) == hi ? unsigned(v) : 0u);
    return (static_cast<unsigned long long>(hi) << 32) | lo;
  };
  while (room > 0) {
    unsigned long long b1 = 0, b2 = 0;
    int p1 = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r) {
      const unsigned long long k = key[r];
      if (k == 0 || k >= below || key_size(k) > room) continue;
      if (k > b1) b2 = b1, b1 = k, p1 = payload[r];
      else if (k > b2) b2 = k;
    }
    // The warp's four largest first keys become candidates; the fifth and every second key bound them.
    unsigned long long v = b1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned long long m = warp_max(v);
      if (lane == 0) ws.cand[warp * 4 + i] = m;
      if (m == 0 ? lane == 0 : v == m) ws.cand_payload[warp * 4 + i] = m == 0 ? 0 : p1;
      if (m != 0 && v == m) v = 0;
    }
    const unsigned long long bound = warp_max(v > b2 ? v : b2);
    if (lane == 0) ws.bound[warp] = bound;
    __syncthreads();
    if (warp == 0) {
      unsigned long long L = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) L = max(L, ws.bound[w]);
      unsigned long long k = ws.cand[lane];
      int p = ws.cand_payload[lane];
      if (k <= L) k = 0;
      // Bitonic sort, largest first, the payload alongside.
#pragma unroll
      for (int size = 2; size <= 32; size <<= 1)
#pragma unroll
        for (int stride = size / 2; stride > 0; stride >>= 1) {
          const unsigned long long ok = __shfl_xor_sync(0xffffffffu, k, stride);
          const int op = __shfl_xor_sync(0xffffffffu, p, stride);
          const bool lower = (lane & stride) == 0, descending = (lane & size) == 0 || size == 32;
          // The lower lane of a pair keeps the larger key in a descending run.
          const bool take_other = (lower == descending) ? ok > k : ok < k;
          if (take_other) k = ok, p = op;
        }
      const int n = k != 0 ? key_size(k) : 0;
      int left = room;
      const unsigned taken = settle_sorted_warp(__ballot_sync(0xffffffffu, k != 0), n, left);
      const bool mine_taken = (taken >> lane) & 1u;
      const int at = picks + __popc(taken & ((1u << lane) - 1u));
      const int size_before = warp_inclusive_sum(mine_taken ? n : 0) - (mine_taken ? n : 0);
      if (mine_taken) {
        const int j = key_index(k);
        atomicOr(&gs.selected_bits[j / 32], 1u << (j % 32));
        if (at < Picks) gs.pick_first[at] = p, gs.pick_j[at] = j, gs.pick_row[at] = rows + size_before;
      }
      if (lane == 0) {
        ws.picks = picks + __popc(taken), ws.rows = rows + (room - left), ws.room = left;
        ws.below = L + 1;  // every key above L is settled (L = 0: every key)
      }
    }
    __syncthreads();
    picks = ws.picks, rows = ws.rows, room = ws.room, below = ws.below;
    if (below == 1) break;
    // (The next round writes cand and bound, read only after its first barrier; the fields
    // read here are written after that barrier too.)
  }
}

// The greedy rule under `budget` tokens over the keys of every thread (key[r]: index tid + r
// kThreads, 0 for none; payload[r] its member offset). Radix = false: each pick is one round
// of block-wide maxima. Radix = true: radix passes from the top of the keys find the first
// cluster the walk skips, every key above it fits and is taken at once, and only the walk's
// tail takes rounds. The first pass counts `window` (1..255) buckets of 16 key bits at and
// below the largest key's; the keys further down would crowd a few digits and serialise the
// atomics. 8-bit passes over the rest follow only if the budget outlasts them.
// The walk after them: Walk = 0, one pick a round (block-wide maxima; what the step runs);
// Walk = 1, many keys settled a round (walk_batched: dearer a round, cheaper on long walks);
// Walk = 2, one-pick rounds for the first kRoundsBeforeBatch picks, then walk_batched. Walks 1
// and 2 are for the lab (bench/cuda/greedy_walk.cu): in the step, walk 2 made every phase
// slower, ~3.5 us in all (gpu-notes item 38).
// gs.selected_bits must be 0 and visible to every thread before the call. Every thread
// returns with the picks in gs (key[] is not for use after the call: the batched walk leaves
// its picks there); radix_done() runs after the passes, taken_done() after the keys taken at
// once (profile marks).
template <bool Radix, int Walk = 0, int Owned, int Keys, int Picks, class RadixDone, class TakenDone>
__device__ void greedy_select(unsigned long long (&key)[Owned], const int (&payload)[Owned], int budget, int window,
                              Greedy<Keys, Picks>& gs, const RadixDone& radix_done, const TakenDone& taken_done) {
  static_assert(Owned * kThreads <= Keys && Keys <= kKeyIndexLimit, "keys beyond the selection's bits");
  static_assert(kThreads == 256, "one digit of hist[] per thread");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int room = budget, picks = 0, rows = 0;
  unsigned long long below = ~0ull;  // the rounds consider keys under this only
  if constexpr (Radix) {
    unsigned top = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r) top = max(top, unsigned(key[r] >> 48));
    top = __reduce_max_sync(0xffffffffu, top);
    if (lane == 0) gs.warp_count[warp] = int(top);
    gs.hist[tid] = 0;
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) top = max(top, unsigned(gs.warp_count[w]));
    const int lo16 = int(top) - window;  // the first pass counts buckets (lo16, top] as digits 1..window
    // Warp 0: the digit where the tokens from the top, after `above` of them, first exceed the
    // budget -> digit_info {digit or -1 when all fit, tokens above it (all: their total), its clusters}.
    const auto find_digit = [&](int above) {
      if (warp != 0) return;
      int v[8], sum = 0;  // lane l holds digits 255 - 8l - i, i = 0..7: the lanes in order walk from the top
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = gs.hist[255 - 8 * lane - i], sum += v[i] & kTokenMask;
      const int inc = multipole::cuda::detail::warp_inclusive_sum(sum);
      int acc = above + inc - sum, found = -1, found_v = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (found < 0) {
          if (acc + (v[i] & kTokenMask) > budget) found = i, found_v = v[i];
          else acc += v[i] & kTokenMask;
        }
      const unsigned hit = __ballot_sync(0xffffffffu, found >= 0);
      if (hit == 0) {
        if (lane == 31) gs.digit_info[0] = -1, gs.digit_info[1] = acc;
      } else if (lane == __ffs(int(hit)) - 1) {
        gs.digit_info[0] = 255 - 8 * lane - found, gs.digit_info[1] = acc, gs.digit_info[2] = found_v >> kCountShift;
      }
    };
    // Passes: the first counts the window (lo16, top] of the keys' top 16 bits; 8-bit passes
    // follow below the crossing digit's prefix, or below the window when the budget outlasts it.
    // (One loop, so the count and find_digit are one copy of code each: a one-launch step
    // fetches its code after every flush.)
    unsigned long long prefix = 0;
    int shift = 48, above = 0;
    unsigned limit = 0xffffu;  // the 8-bit passes count keys whose top 16 bits are at most this
    bool all_fit = false;
    for (bool window_pass = true;; window_pass = false) {
#pragma unroll
      for (int r = 0; r < Owned; ++r) {
        const unsigned top16 = unsigned(key[r] >> 48);
        // (8-bit passes: under the window's limit, and in the prefix found so far.)
        const bool in_prefix = top16 <= limit && (shift == 56 || (key[r] >> (shift + 8)) == prefix);
        const bool counted = key[r] != 0 && (window_pass ? int(top16) > lo16 : in_prefix);
        if (counted)
          atomicAdd(&gs.hist[window_pass ? int(top16) - lo16 : int(key[r] >> shift) & 0xff],
                    (1 << kCountShift) | key_size(key[r]));
      }
      __syncthreads();
      find_digit(above);
      __syncthreads();
      const int digit = gs.digit_info[0];
      const bool one_cluster = gs.digit_info[2] == 1;
      above = gs.digit_info[1];
      if (window_pass && digit < 0) {
        if (lo16 < 0) {
          all_fit = true;  // the window held every key
          break;
        }
        limit = unsigned(lo16), shift = 64;  // the budget outlasts the window
      } else if (digit < 0) {
        all_fit = true;  // (only in the first 8-bit pass: every cluster fits)
        break;
      } else {
        prefix = window_pass ? unsigned(lo16 + digit) : (prefix << 8) | unsigned(digit);
        if (one_cluster || shift == 16) break;
      }
      shift -= 8;
      gs.hist[tid] = 0;
      __syncthreads();
    }
    radix_done();
    // Slots in (thread, r) order, the same in every CTA (each CTA lays out the rows from them).
    // Taken: every key of the first pass's window when the budget outlasted it (counted in
    // `above`; such a key can share the 8-bit passes' prefix, which then ended at its top byte),
    // and every key above the prefix.
    // One scan over the block gives each taken key its pick and its first row (both in the
    // same (thread, r) order): picks and tokens packed as (picks << kTakenShift) + tokens.
    static_assert(kKeyIndexLimit < (1 << (31 - kTakenShift)), "a taken count and its tokens share one int");
    unsigned taken = 0;
    int mine = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if (key[r] != 0 && (all_fit || (key[r] >> 48) > limit || (key[r] >> shift) > prefix))
        taken |= 1u << r, mine += (1 << kTakenShift) + key_size(key[r]);
    const int inc = multipole::cuda::detail::warp_inclusive_sum(mine);
    if (lane == 31) gs.warp_count[warp] = inc;
    __syncthreads();
    int at = inc - mine, total = 0;
    for (int w = 0; w < kWarps; ++w) at += w < warp ? gs.warp_count[w] : 0, total += gs.warp_count[w];
    int k = at >> kTakenShift, row = at & kTakenMask;
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if ((taken >> r) & 1u) {
        const int j = tid + r * kThreads;
        if (k < Picks) gs.pick_first[k] = payload[r], gs.pick_j[k] = j, gs.pick_row[k] = row;
        atomicOr(&gs.selected_bits[j / 32], 1u << (j % 32));
        row += key_size(key[r]), key[r] = 0, ++k;
      }
    __syncthreads();
    picks = total >> kTakenShift;
    rows = above, room = budget - above;
    below = all_fit ? 0ull : prefix << shift;
  } else {
    radix_done();
  }
  taken_done();
  const int prefix_picks = picks;
  if constexpr (Walk == 1) walk_batched(key, payload, gs, room, rows, picks, below);
  for (; Walk != 1 && room > 0; ++picks) {  // (room > 0 bounds the picks by the budget)
    if (Walk == 2 && picks - prefix_picks == kRoundsBeforeBatch) {
      walk_batched(key, payload, gs, room, rows, picks, below);  // (the rounds' picks are cleared from key[])
      break;
    }
    unsigned long long mine = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if (key_size(key[r]) <= room && key[r] < below && key[r] > mine) mine = key[r];
    const unsigned hi = __reduce_max_sync(0xffffffffu, unsigned(mine >> 32));
    const unsigned lo = __reduce_max_sync(0xffffffffu, unsigned(mine >> 32) == hi ? unsigned(mine) : 0u);
    if (lane == 0) gs.best[picks & 1][warp] = (static_cast<unsigned long long>(hi) << 32) | lo;
    __syncthreads();
    unsigned long long b = gs.best[picks & 1][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) b = max(b, gs.best[picks & 1][w]);
    if (b == 0) break;
    const int j = key_index(b), n = key_size(b);
#pragma unroll
    for (int r = 0; r < Owned; ++r)  // (a constant index keeps key[] and payload[] in registers)
      if (j == tid + r * kThreads) {
        key[r] = 0;
        if (picks < Picks) gs.pick_first[picks] = payload[r];
        gs.selected_bits[j / 32] |= 1u << (j % 32);  // one writer a round; the rounds' barriers order them
      }
    if (tid == 0 && picks < Picks) gs.pick_row[picks] = rows, gs.pick_j[picks] = j;
    rows += n, room -= n;
  }
  // Rows are listed only when every pick is (picks <= Picks: a budget of at most Picks tokens).
  if (tid == 0) {
    gs.pick_row[min(picks, Picks)] = rows, gs.n_picks = min(picks, Picks);
    gs.prefix_picks = min(prefix_picks, Picks), gs.all_picks = picks, gs.all_prefix_picks = prefix_picks;
  }
  __syncthreads();
}

}  // namespace multipole::cuda::detail::cluster_step
