// Kernel lab: a batch-1 multipole step in one launch, its selection included (gpu-notes item 34).
//
// Item 33 timed everything of a one-launch step but the selection (20-27 us at 32K). Here the
// kernel also selects, so its time is that of a whole step. One 16-CTA cluster per entry (KV
// head; 8 entries, Qwen3-8B's at batch 1), G = 4 query heads, d = 128, bf16 centroids and
// cache, one level of clusters of skewed sizes (1 to ~150 tokens, mean 16), budget 128 tokens:
//   1. each CTA stages its slice of the key centroids (cp.async) and issues the loads of its
//      share of the rows known before the selection (sinks, window);
//   2. scores its slice for the 4 heads and pushes the logits into every CTA of the cluster
//      (remote stores; one cluster barrier), then stages its value centroids;
//   3. every CTA now holds all logits and runs the same selection on them, so no CTA waits
//      for another's: per-head normalisers, importances I = sum_g 2^(x_g - M_g) / Z_g, and
//      the greedy rule (clusters in decreasing importance, one that does not fit skipped).
//      Select 1 takes each pick in a round of block-wide maxima over the clusters that still
//      fit; select 2 finds the first cluster the walk skips by radix passes, takes every one
//      above it at once and only the walk's tail in rounds;
//   4. loads of its share of the selected clusters' rows (member list, page table, K/V);
//   5. the far field over its unselected centroids, the exact rows, the merge into the CTA's
//      state, and CTA 0 merges the cluster's 16 states (DSMEM) into the output.
// The host checks the selection against the greedy rule in f64 (a difference is reported with
// its importance gap: f32 near-ties may order differently) and the output against an f64
// computation over the kernel's own selection. Timed as the bench times a step (graph replay,
// 256 MiB memset flush before each run, median).
// Usage: lab_fused_select_step [context tokens, default 32768] [runs, default 41] [1: phase profile]
//                              [first radix pass's buckets, default 255] [1: clusters of 16 tokens].
// H200, session H24, 32K (2039 clusters, ~72 picks an entry, ~70 of them at once): select 1
// 81-83 us (its ~73 rounds take ~40 us), select 2 28.9 us; the same call's cuDNN decode 50.6-
// 52.2 us, the library's three-kernel step 47.6-47.8 (one level: 43.1-43.3), item 33's step
// without a selection 20.7-20.9.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "step_lab.cuh"

namespace cg = cooperative_groups;

namespace {

using namespace step_lab;

constexpr int kBudget = 128;                                   // tokens per entry
constexpr int kMaxPerCta = 128;                                // centroids per CTA
constexpr int kMaxClusters = kCtas * kMaxPerCta;               // 2048 (the keys below hold 11 bits of index)
constexpr int kOwned = kMaxClusters / kThreads;                // clusters per thread in the selection
constexpr int kFixedRows = kSinks + kWindow;                   // rows known before the selection
constexpr int kSlots = (kFixedRows + kBudget + kWarps * kCtas - 1) / (kWarps * kCtas);  // rows per warp
// Marks (%globaltimer of thread 0 of each CTA): entry, logits pushed, cluster barrier, normalisers,
// radix passes, keys above the skipped cluster taken, selection done, selected rows issued, far
// field, exact rows merged, states merged.
constexpr int kMarks = 11;

struct Args {
  const float* q;              // [E, G, D] queries, pre-scaled by softmax scale * log2(e)
  const uint16_t* key_c;       // [E, C, D] bf16 key centroids
  const uint16_t* value_c;     // [E, C, D] bf16 value centroids
  const uint16_t* size;        // [E, C] members of each cluster (>= 1)
  const int32_t* member_off;   // [E, C] first member of each cluster in members
  const int32_t* members;      // [E, L] token positions, cluster after cluster
  const int32_t* page_table;   // [N / 16] page of each 16 positions
  const uint16_t* k_cache;     // [pages, E, 16, D] bf16
  const uint16_t* v_cache;     // [pages, E, 16, D] bf16
  float* out;                  // [E, G, D]
  int32_t* picks;              // [E, 2 + kBudget]: picks, picks taken at once, then the selected clusters
  long long* prof;             // [E * kCtas, kMarks] or null
  int clusters, members_per_entry, tokens;
  int window;                  // 16-bit key buckets of the first radix pass, 1..255 (255; less to test the passes after it)
};

// Order of the greedy walk in one 64-bit key: importance bits (positive floats order as their
// bits), then the lower index first; the size rides in the low bits. 0: no candidate.
__device__ __forceinline__ unsigned long long pick_key(float importance, int j, int n) {
  return (static_cast<unsigned long long>(__float_as_uint(importance)) << 32) |
         (static_cast<unsigned long long>(kMaxClusters - 1 - j) << 16) | static_cast<unsigned>(n);
}

template <int Select>
__global__ void __launch_bounds__(kThreads, 2) fused_select_step_kernel(const Args a) {
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), e = blockIdx.x / kCtas;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = a.clusters;
  const auto mark = [&](int i) {
    if (a.prof && tid == 0) {
      long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      a.prof[size_t(blockIdx.x) * kMarks + i] = t;
    }
  };
  mark(0);
  // Every CTA of the cluster must have started before another stores into its shared memory:
  // arrive now, wait just before the first remote store.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  // Dynamic: [per] staged rows (keys, then values, then the warps' partial sums), then
  // [C] float4 logits of every cluster of the entry (x_g for g = 0..3).
  extern __shared__ __align__(16) uint8_t smem[];
  const int per = (C + kCtas - 1) / kCtas, c0 = rank * per;
  const int n_local = max(0, min(per, C - c0));
  uint8_t* staged = smem;
  float4* xall = reinterpret_cast<float4*>(smem + size_t(per) * kRowStride);
  float(*part)[kG][kD] = reinterpret_cast<float(*)[kG][kD]>(smem);  // after the far field
  __shared__ float qs[kG][kD];
  __shared__ State st;
  __shared__ float red[kWarps][kG], red_z[kWarps][kG], gmax[kG], gzinv[kG];
  __shared__ unsigned long long best[2][kWarps];
  __shared__ int pick_first[kBudget], pick_row[kBudget + 1], pick_j[kBudget], n_picks;
  __shared__ int hist[256], digit_info[3], warp_count[kWarps];
  static_assert(kThreads == 256, "one digit of hist[] per thread");
  __shared__ uint32_t selected_bits[kMaxClusters / 32];
  __shared__ float wm[kWarps][kG], wl[kWarps][kG], factor[kWarps + 1][kG];

  const uint16_t* kc = a.key_c + (size_t(e) * C + c0) * kD;
  const uint16_t* vc = a.value_c + (size_t(e) * C + c0) * kD;
  const uint16_t* sizes = a.size + size_t(e) * C;
  const int32_t* member_off = a.member_off + size_t(e) * C;
  const int32_t* members = a.members + size_t(e) * a.members_per_entry;

  // 1. Key centroids staged; this thread's clusters of the selection (j = tid + 256 r) and
  //    their sizes and member offsets; the fixed rows' K/V loads issued.
  for (int i = tid; i < n_local * 16; i += kThreads)
    multipole::cuda::detail::cp_async16(staged + size_t(i / 16) * kRowStride + (i % 16) * 16, kc + size_t(i) * 8,
                                        true);
  multipole::cuda::detail::cp_async_commit();
  int own_n[kOwned], own_off[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = tid + r * kThreads;
    own_n[r] = j < C ? int(sizes[j]) : 0;
    own_off[r] = j < C ? member_off[j] : 0;
  }
  const int local_n = tid < n_local ? int(sizes[c0 + tid]) : 0;  // far field: size of local cluster tid
  for (int i = tid; i < kG * kD; i += kThreads) qs[i / kD][i % kD] = a.q[size_t(e) * kG * kD + i];
  if (tid < kMaxClusters / 32) selected_bits[tid] = 0;
  const float* q = a.q + size_t(e) * kG * kD;
  float qr[kG][4];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    const float4 v = *reinterpret_cast<const float4*>(q + g * kD + lane * 4);
    qr[g][0] = v.x, qr[g][1] = v.y, qr[g][2] = v.z, qr[g][3] = v.w;
  }
  // Row j of the entry's exact list: [0, 16) sinks, [16, 144) the window, then the selected
  // clusters' members in pick order. Row j goes to CTA j % 16, warp (j / 16) % 8, slot j / 128.
  uint2 kr[kSlots], vr[kSlots];
  bool has_row[kSlots];
  const auto load_row = [&](int i, int pos) {
    const size_t page = size_t(a.page_table[pos / kPage]);
    const size_t row = ((page * kEntries + e) * kPage + pos % kPage) * kD + lane * 4;
    kr[i] = *reinterpret_cast<const uint2*>(a.k_cache + row);
    vr[i] = *reinterpret_cast<const uint2*>(a.v_cache + row);
    has_row[i] = true;
  };
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    has_row[i] = false;
    const int j = rank + kCtas * (warp + kWarps * i);
    if (j < kSinks) load_row(i, j);
    else if (j < kFixedRows) load_row(i, a.tokens - kWindow + (j - kSinks));
  }

  // 2. Logits of the local slice into the local xall, then pushed to every other CTA.
  multipole::cuda::detail::cp_async_wait<0>();
  __syncthreads();
  for (int i = tid; i < kG * n_local; i += kThreads) {
    const int g = i / n_local, j = i % n_local;
    reinterpret_cast<float*>(&xall[c0 + j])[g] = staged_dot(staged, j, qs[g]);
  }
  __syncthreads();
  // The value centroids into the same staging rows (the keys are no longer read).
  for (int i = tid; i < n_local * 16; i += kThreads)
    multipole::cuda::detail::cp_async16(staged + size_t(i / 16) * kRowStride + (i % 16) * 16, vc + size_t(i) * 8,
                                        true);
  multipole::cuda::detail::cp_async_commit();
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  for (int i = tid; i < n_local * (kCtas - 1); i += kThreads) {
    const int j = i % n_local, r = (rank + 1 + i / n_local) % kCtas;
    *cluster.map_shared_rank(&xall[c0 + j], r) = xall[c0 + j];
  }
  mark(1);
  cluster.sync();
  mark(2);

  // 3. Per-head maximum and normaliser Z_g = sum_j n_j 2^(x_gj - M_g) over all clusters, the
  //    same in every CTA (same data, same order).
  float4 own_x[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = tid + r * kThreads;
    own_x[r] = j < C ? xall[j] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
  }
  {
    // Each thread's (max, sum relative to it) per head, then the pairs merged over the warp
    // and the warps: one block-wide reduction for both.
    float m[kG], z[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      m[g] = -INFINITY, z[g] = 0;
#pragma unroll
      for (int r = 0; r < kOwned; ++r) m[g] = fmaxf(m[g], reinterpret_cast<const float*>(&own_x[r])[g]);
#pragma unroll
      for (int r = 0; r < kOwned; ++r)
        if (own_n[r] > 0) z[g] += float(own_n[r]) * exp2f(reinterpret_cast<const float*>(&own_x[r])[g] - m[g]);
    }
    const auto merge = [](float& m, float& z, float m2, float z2) {
      const float mx = fmaxf(m, m2);
      z = (m == -INFINITY ? 0.0f : z * exp2f(m - mx)) + (m2 == -INFINITY ? 0.0f : z2 * exp2f(m2 - mx));
      m = mx;
    };
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
        merge(m[g], z[g], __shfl_xor_sync(0xffffffffu, m[g], o), __shfl_xor_sync(0xffffffffu, z[g], o));
      if (lane == 0) red[warp][g] = m[g], red_z[warp][g] = z[g];
    }
    __syncthreads();
    if (tid < kG) {
      float mm = red[0][tid], zz = red_z[0][tid];
      for (int w = 1; w < kWarps; ++w) merge(mm, zz, red[w][tid], red_z[w][tid]);
      gmax[tid] = mm, gzinv[tid] = 1.0f / zz;
    }
    __syncthreads();
  }
  mark(3);

  // 4. The greedy rule. A round takes the most important cluster that still fits (one the
  //    walk skipped never fits again: the room only shrinks); select 2 first takes at once
  //    every cluster above the first one skipped.
  unsigned long long key[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    float imp = 0;
#pragma unroll
    for (int g = 0; g < kG; ++g) imp += exp2f(reinterpret_cast<const float*>(&own_x[r])[g] - gmax[g]) * gzinv[g];
    key[r] = own_n[r] > 0 ? pick_key(imp, tid + r * kThreads, own_n[r]) : 0ull;
  }
  int room = kBudget, picks = 0, rows = 0;
  unsigned long long below = ~0ull;  // the rounds consider keys under this only
  if constexpr (Select >= 2) {
    // Radix passes from the top of the keys: per digit, (clusters << 16) + tokens of the keys
    // that share the digits found so far; the digit where the tokens from the top first
    // exceed the budget is kept, until it holds one cluster: the first one the walk skips.
    // Every key above it fits, so all are taken at once. The first pass counts the 255
    // buckets of 16 key bits at and below the largest key's (two octaves of importance, where
    // the budget almost always runs out): the keys further down would crowd a few digits and
    // serialise their atomics. Only if the budget outlasts them do 8-bit passes over the rest
    // follow.
    unsigned top = 0;
#pragma unroll
    for (int r = 0; r < kOwned; ++r) top = max(top, unsigned(key[r] >> 48));
    top = __reduce_max_sync(0xffffffffu, top);
    if (lane == 0) warp_count[warp] = int(top);
    hist[tid] = 0;
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) top = max(top, unsigned(warp_count[w]));
    const int lo16 = int(top) - a.window;  // the first pass counts buckets (lo16, top] as digits 1..window
    // Warp 0: the digit where the tokens from the top, after `above` of them, first exceed the
    // budget -> digit_info {digit or -1 when all fit, tokens above it (all: their total), its clusters}.
    const auto find_digit = [&](int above) {
      if (warp != 0) return;
      int v[8], sum = 0;  // lane l holds digits 255 - 8l - i, i = 0..7: the lanes in order walk from the top
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = hist[255 - 8 * lane - i], sum += v[i] & 0xffff;
      const int inc = multipole::cuda::detail::warp_inclusive_sum(sum);
      int acc = above + inc - sum, found = -1, found_v = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (found < 0) {
          if (acc + (v[i] & 0xffff) > kBudget) found = i, found_v = v[i];
          else acc += v[i] & 0xffff;
        }
      const unsigned hit = __ballot_sync(0xffffffffu, found >= 0);
      if (hit == 0) {
        if (lane == 31) digit_info[0] = -1, digit_info[1] = acc;
      } else if (lane == __ffs(int(hit)) - 1) {
        digit_info[0] = 255 - 8 * lane - found, digit_info[1] = acc, digit_info[2] = found_v >> 16;
      }
    };
#pragma unroll
    for (int r = 0; r < kOwned; ++r)
      if (key[r] != 0 && int(key[r] >> 48) > lo16)
        atomicAdd(&hist[int(key[r] >> 48) - lo16], (1 << 16) | int(key[r] & 0xffffu));
    __syncthreads();
    find_digit(0);
    __syncthreads();
    unsigned long long prefix = 0;
    int shift = 48, above = digit_info[1];
    unsigned limit = 0xffffu;  // the 8-bit passes count keys whose top 16 bits are at most this
    bool all_fit = false, done = true;
    if (digit_info[0] >= 0) {
      prefix = unsigned(lo16 + digit_info[0]), done = digit_info[2] == 1;
    } else if (lo16 < 0) {
      all_fit = true;  // the window held every key
    } else {
      limit = unsigned(lo16), shift = 64, done = false;  // the budget outlasts the window
    }
    while (!done) {
      shift -= 8;
      hist[tid] = 0;
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kOwned; ++r)
        if (key[r] != 0 && (key[r] >> 48) <= limit && (shift == 56 || (key[r] >> (shift + 8)) == prefix))
          atomicAdd(&hist[(key[r] >> shift) & 0xff], (1 << 16) | int(key[r] & 0xffffu));
      __syncthreads();
      find_digit(above);
      __syncthreads();
      above = digit_info[1];
      if (digit_info[0] < 0) {
        all_fit = true;  // (only in the first of these passes: every cluster fits)
        break;
      }
      prefix = (prefix << 8) | unsigned(digit_info[0]);
      done = digit_info[2] == 1 || shift == 16;
    }
    mark(4);
    // Slots in (thread, r) order, the same in every CTA (each CTA lays out the rows from them).
    unsigned taken = 0;
#pragma unroll
    for (int r = 0; r < kOwned; ++r)
      if (key[r] != 0 && (all_fit || (key[r] >> shift) > prefix)) taken |= 1u << r;
    const int count = __popc(taken);
    const int inc = multipole::cuda::detail::warp_inclusive_sum(count);
    if (lane == 31) warp_count[warp] = inc;
    __syncthreads();
    int k = inc - count, total = 0;
    for (int w = 0; w < kWarps; ++w) k += w < warp ? warp_count[w] : 0, total += warp_count[w];
#pragma unroll
    for (int r = 0; r < kOwned; ++r)
      if ((taken >> r) & 1u) {
        const int j = tid + r * kThreads;
        pick_first[k] = own_off[r], pick_j[k] = j, pick_row[k] = int(key[r] & 0xffffu);  // size for now
        atomicOr(&selected_bits[j / 32], 1u << (j % 32));
        key[r] = 0, ++k;
      }
    __syncthreads();
    picks = total;
    if (warp == 0) {
      // pick_row: sizes -> first row of each pick (exclusive scan, 4 picks a lane).
      int v[4], s = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = 4 * lane + i < picks ? pick_row[4 * lane + i] : 0, s += v[i];
      const int inc = multipole::cuda::detail::warp_inclusive_sum(s);
      int acc = inc - s;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (4 * lane + i < picks) pick_row[4 * lane + i] = acc, acc += v[i];
    }
    __syncthreads();
    rows = above, room = kBudget - above;
    below = all_fit ? 0ull : prefix << shift;
  } else {
    mark(4);
  }
  mark(5);
  const int prefix_picks = picks;
  for (; room > 0; ++picks) {  // (room > 0 bounds the picks by the budget)
    unsigned long long mine = 0;
#pragma unroll
    for (int r = 0; r < kOwned; ++r)
      if (int(key[r] & 0xffffu) <= room && key[r] < below && key[r] > mine) mine = key[r];
    const unsigned hi = __reduce_max_sync(0xffffffffu, unsigned(mine >> 32));
    const unsigned lo = __reduce_max_sync(0xffffffffu, unsigned(mine >> 32) == hi ? unsigned(mine) : 0u);
    if (lane == 0) best[picks & 1][warp] = (static_cast<unsigned long long>(hi) << 32) | lo;
    __syncthreads();
    unsigned long long b = best[picks & 1][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) b = max(b, best[picks & 1][w]);
    if (b == 0) break;
    const int j = kMaxClusters - 1 - int((b >> 16) & 0xffffu), n = int(b & 0xffffu);
#pragma unroll
    for (int r = 0; r < kOwned; ++r)  // (a constant index keeps key[] and own_off[] in registers)
      if (j == tid + r * kThreads) {
        key[r] = 0;
        pick_first[picks] = own_off[r];
        selected_bits[j / 32] |= 1u << (j % 32);  // one writer a round; the rounds' barriers order them
      }
    if (tid == 0) pick_row[picks] = rows, pick_j[picks] = j;
    rows += n, room -= n;
  }
  if (tid == 0) pick_row[picks] = rows, n_picks = picks;
  __syncthreads();
  if (rank == 0) {
    int32_t* out_picks = a.picks + size_t(e) * (2 + kBudget);
    if (tid == 0) out_picks[0] = picks, out_picks[1] = prefix_picks;
    for (int k = tid; k < picks; k += kThreads) out_picks[2 + k] = pick_j[k];
  }
  mark(6);

  // 5. This warp's selected rows: member list, page table, then K and V.
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int t = rank + kCtas * (warp + kWarps * i) - kFixedRows;
    if (t < 0 || t >= pick_row[n_picks]) continue;
    int k = 0, hi = n_picks;  // the pick holding row t: pick_row[k] <= t < pick_row[k + 1]
    while (hi - k > 1) {
      const int mid = (k + hi) / 2;
      if (pick_row[mid] <= t) k = mid;
      else hi = mid;
    }
    load_row(i, members[pick_first[k] + (t - pick_row[k])]);
  }
  mark(7);

  // 6. Far field over the unselected local clusters: weights n 2^(x - M) in xall's local slice.
  if (tid < n_local) {
    const int j = c0 + tid;
    const bool sel = (selected_bits[j / 32] >> (j % 32)) & 1u;
    float4 x = xall[j];
    float* xs = reinterpret_cast<float*>(&x);
#pragma unroll
    for (int g = 0; g < kG; ++g) xs[g] = sel ? 0.0f : float(local_n) * exp2f(xs[g] - gmax[g]);
    xall[j] = x;
  }
  multipole::cuda::detail::cp_async_wait<0>();
  __syncthreads();
  float far0, far1;
  const int fd = tid % kD, fg = 2 * (tid / kD);  // one thread per (head pair, dimension)
  {
    float s0 = 0, s1 = 0;
    const uint8_t* vrow = staged + fd * 2;
    for (int j = 0; j < n_local; ++j) {
      const float v = __uint_as_float(uint32_t(*reinterpret_cast<const uint16_t*>(vrow + size_t(j) * kRowStride)) << 16);
      const float* w = reinterpret_cast<const float*>(&xall[c0 + j]);
      s0 += w[fg] * v, s1 += w[fg + 1] * v;
    }
    far0 = s0, far1 = s1;
  }
  if (warp < kG) {
    float l = 0;
    for (int j = lane; j < n_local; j += 32) l += reinterpret_cast<const float*>(&xall[c0 + j])[warp];
    l = warp_sum(l);
    if (lane == 0) st.m[warp] = 0.0f, st.l[warp] = l;  // weights are relative to gmax: m = 0 here
  }
  mark(8);

  // 7. The exact rows per warp (logits relative to gmax like the far field's), then the CTA's state.
  {
    float m[kG], l[kG], acc[kG][4];
    warp_rows_state(kr, vr, has_row, qr, gmax, m, l, acc);
    __syncthreads();  // the far field's reads of the staged values are done: part[] may overwrite them
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int t = 0; t < 4; ++t) part[warp][g][lane * 4 + t] = acc[g][t];
      if (lane == 0) wm[warp][g] = m[g], wl[warp][g] = l[g];
    }
  }
  __syncthreads();
  if (tid < kG) merge_factors(st, wm, wl, factor, tid);
  __syncthreads();
  {
    // Far sums of this thread's (head pair, dimension) plus the warps' exact sums.
    const float far[2] = {far0, far1};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int g = fg + h;
      float o = far[h] * factor[0][g];
      for (int w = 0; w < kWarps; ++w) o += part[w][g][fd] * factor[w + 1][g];
      st.o[g][fd] = o;
    }
  }
  mark(9);

  // 8. CTA 0 merges the cluster's states through DSMEM.
  pull_merged_states(cluster, st, a.out + size_t(e) * kG * kD, [&] { mark(10); });
}

}  // namespace

int main(int argc, char** argv) {
  const int tokens = argc > 1 ? std::atoi(argv[1]) : 32768;
  const int runs = argc > 2 ? std::max(3, std::atoi(argv[2])) : 41;
  const bool profile = argc > 3 && std::atoi(argv[3]) != 0;
  const int window = argc > 4 ? std::clamp(std::atoi(argv[4]), 1, 255) : 255;
  const bool uniform = argc > 5 && std::atoi(argv[5]) != 0;  // every cluster 16 tokens (8 picks an entry)
  const int clusters = (tokens - kFixedRows) / 16;
  if (tokens % kPage || clusters < 16 || clusters > kMaxClusters) {
    std::fprintf(stderr, "context %d: must be a multiple of %d with 16..%d clusters of 16 tokens on average\n", tokens,
                 kPage, kMaxClusters);
    return 2;
  }
  // Clustered tokens [kSinks, kSinks + L); sizes are the gaps between random cuts (skewed,
  // mean 16), or 16 each when `uniform`; members are a random permutation of the clustered
  // positions.
  const int L = clusters * 16;
  std::mt19937_64 rng(11);
  const StepData data(tokens, rng);
  const std::vector<uint16_t>&kcache = data.kcache, &vcache = data.vcache;
  const std::vector<float>& q = data.q;
  std::vector<uint16_t> size(size_t(kEntries) * clusters), key_c(size_t(kEntries) * clusters * kD),
      value_c(key_c.size());
  std::vector<int32_t> member_off(size.size()), members(size_t(kEntries) * L);
  const auto kv_at = [&](const std::vector<uint16_t>& cache, int e, int pos, int d) { return data.at(cache, e, pos, d); };
  int largest = 0;
  for (int e = 0; e < kEntries; ++e) {
    std::vector<int> cuts(size_t(L - 1));
    std::iota(cuts.begin(), cuts.end(), 1);
    if (uniform) {
      for (int c = 0; c < clusters - 1; ++c) cuts[size_t(c)] = 16 * (c + 1);
    } else {
      std::shuffle(cuts.begin(), cuts.end(), rng);
    }
    cuts.resize(size_t(clusters - 1));
    cuts.push_back(0), cuts.push_back(L);
    std::sort(cuts.begin(), cuts.end());
    int32_t* mem = members.data() + size_t(e) * L;
    std::iota(mem, mem + L, kSinks);
    std::shuffle(mem, mem + L, rng);
    for (int c = 0; c < clusters; ++c) {
      const int first = cuts[size_t(c)], n = cuts[size_t(c) + 1] - first;
      size[size_t(e) * clusters + c] = uint16_t(n), member_off[size_t(e) * clusters + c] = first;
      largest = std::max(largest, n);
      for (int d = 0; d < kD; ++d) {
        double ks = 0, vs = 0;
        for (int t = 0; t < n; ++t) ks += kv_at(kcache, e, mem[first + t], d), vs += kv_at(vcache, e, mem[first + t], d);
        key_c[(size_t(e) * clusters + c) * kD + d] = to_bf16(float(ks / n));
        value_c[(size_t(e) * clusters + c) * kD + d] = to_bf16(float(vs / n));
      }
    }
  }

  Args a{};
  a.q = upload(q), a.key_c = upload(key_c), a.value_c = upload(value_c), a.size = upload(size);
  a.member_off = upload(member_off), a.members = upload(members), a.page_table = upload(data.page_table);
  a.k_cache = upload(kcache), a.v_cache = upload(vcache);
  float* out = nullptr;
  int32_t* picks = nullptr;
  LAB_CHECK(cudaMalloc(&out, q.size() * sizeof(float)));
  LAB_CHECK(cudaMalloc(&picks, size_t(kEntries) * (2 + kBudget) * sizeof(int32_t)));
  a.out = out, a.picks = picks, a.clusters = clusters, a.members_per_entry = L, a.tokens = tokens, a.window = window;

  // Host: the f64 logits and importances, and the greedy rule's selection of each entry.
  std::vector<std::vector<double>> x(size_t(kEntries) * kG, std::vector<double>(size_t(clusters)));
  std::vector<std::vector<int>> want(kEntries);
  std::vector<std::vector<double>> imp(kEntries, std::vector<double>(size_t(clusters), 0.0));
  for (int e = 0; e < kEntries; ++e) {
    for (int g = 0; g < kG; ++g) {
      std::vector<double>& xg = x[size_t(e) * kG + g];
      for (int c = 0; c < clusters; ++c) {
        double dot = 0;
        for (int d = 0; d < kD; ++d)
          dot += double(q[(size_t(e) * kG + g) * kD + d]) * from_bf16(key_c[(size_t(e) * clusters + c) * kD + d]);
        xg[size_t(c)] = dot;
      }
      const double mx = *std::max_element(xg.begin(), xg.end());
      double z = 0;
      for (int c = 0; c < clusters; ++c) z += size[size_t(e) * clusters + c] * std::exp2(xg[size_t(c)] - mx);
      for (int c = 0; c < clusters; ++c) imp[size_t(e)][size_t(c)] += std::exp2(xg[size_t(c)] - mx) / z;
    }
    std::vector<int> order(static_cast<size_t>(clusters));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int l, int r) { return imp[size_t(e)][size_t(l)] > imp[size_t(e)][size_t(r)]; });
    int room = kBudget;
    for (int c : order)
      if (size[size_t(e) * clusters + c] <= room) want[size_t(e)].push_back(c), room -= size[size_t(e) * clusters + c];
    std::sort(want[size_t(e)].begin(), want[size_t(e)].end());
  }
  // The f64 output of one entry over a given selection. ref: [E, G, D]
  std::vector<double> ref(q.size());
  const auto reference = [&](int e, const std::vector<char>& selected) {
    std::vector<int> rows;
    for (int j = 0; j < kSinks; ++j) rows.push_back(j);
    for (int j = 0; j < kWindow; ++j) rows.push_back(tokens - kWindow + j);
    for (int c = 0; c < clusters; ++c)
      if (selected[size_t(c)])
        for (int t = 0; t < size[size_t(e) * clusters + c]; ++t)
          rows.push_back(members[size_t(e) * L + member_off[size_t(e) * clusters + c] + t]);
    for (int g = 0; g < kG; ++g) {
      const float* qg = q.data() + (size_t(e) * kG + g) * kD;
      std::vector<double> logit, o(kD, 0.0);
      std::vector<int> value_of;  // >= 0: a cache position; < 0: -1 - cluster
      for (int pos : rows) {
        double dot = 0;
        for (int d = 0; d < kD; ++d) dot += double(qg[d]) * kv_at(kcache, e, pos, d);
        logit.push_back(dot), value_of.push_back(pos);
      }
      for (int c = 0; c < clusters; ++c)
        if (!selected[size_t(c)])
          logit.push_back(x[size_t(e) * kG + g][size_t(c)] + std::log2(double(size[size_t(e) * clusters + c]))),
              value_of.push_back(-1 - c);
      const double mx = *std::max_element(logit.begin(), logit.end());
      double l = 0;
      for (size_t i = 0; i < logit.size(); ++i) {
        const double p = std::exp2(logit[i] - mx);
        l += p;
        for (int d = 0; d < kD; ++d)
          o[size_t(d)] += p * (value_of[i] >= 0 ? kv_at(vcache, e, value_of[i], d)
                                                : from_bf16(value_c[(size_t(e) * clusters + (-1 - value_of[i])) * kD + d]));
      }
      for (int d = 0; d < kD; ++d) ref[(size_t(e) * kG + g) * kD + d] = o[size_t(d)] / l;
    }
  };

  lab::FlushedTimer timer;
  const cudaStream_t s = timer.stream();
  const int per = (clusters + kCtas - 1) / kCtas;
  // The warps' partial sums [kWarps, G, D] f32 reuse the front of it at the end.
  const size_t smem = std::max(size_t(per) * kRowStride + size_t(clusters) * sizeof(float4),
                               size_t(kWarps) * kG * kD * sizeof(float));
  std::printf("context %d: %d clusters per entry (sizes 1..%d), %d entries x %d CTAs, %zu B of dynamic shared "
              "memory a CTA\n",
              tokens, clusters, largest, kEntries, kCtas, smem);
  int failed = 0;
  const auto run = [&]<int Select>() {
    const auto kernel = fused_select_step_kernel<Select>;
    LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = lab::cluster_config(attr, kEntries, kCtas, kThreads, s, smem);
    int fit = 0;
    LAB_CHECK(cudaOccupancyMaxActiveClusters(&fit, kernel, &cfg));
    LAB_CHECK(cudaMemsetAsync(out, 0xff, q.size() * sizeof(float), s));  // poison
    LAB_CHECK(cudaMemsetAsync(picks, 0xff, size_t(kEntries) * (2 + kBudget) * sizeof(int32_t), s));
    LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
    LAB_CHECK(cudaStreamSynchronize(s));
    std::vector<int32_t> got_picks(size_t(kEntries) * (2 + kBudget));
    LAB_CHECK(cudaMemcpy(got_picks.data(), picks, got_picks.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
    int wrong = 0, total = 0, at_once = 0, near_ties = 0;
    for (int e = 0; e < kEntries; ++e) {
      const int32_t* gp = got_picks.data() + size_t(e) * (2 + kBudget);
      if (gp[0] < 0 || gp[0] > kBudget || gp[1] < 0 || gp[1] > gp[0]) {
        std::printf("  entry %d: pick counts %d, %d\n", e, gp[0], gp[1]);
        ++wrong;
        continue;
      }
      total += gp[0], at_once += gp[1];
      std::vector<int> got(gp + 2, gp + 2 + gp[0]);
      std::vector<char> selected(size_t(clusters), 0);
      int taken = 0;
      for (int c : got) {
        if (c < 0 || c >= clusters || selected[size_t(c)]) {
          std::printf("  entry %d: bad pick %d\n", e, c);
          ++wrong;
          break;
        }
        selected[size_t(c)] = 1, taken += size[size_t(e) * clusters + c];
      }
      if (taken > kBudget) std::printf("  entry %d: %d tokens over the budget %d\n", e, taken, kBudget), ++wrong;
      std::sort(got.begin(), got.end());
      if (got != want[size_t(e)]) {
        // The least important cluster in one selection and not the other, against the most important such:
        // a gap of f32 rounding is a near-tie, anything more a wrong selection.
        std::vector<int> diff;
        std::set_symmetric_difference(got.begin(), got.end(), want[size_t(e)].begin(), want[size_t(e)].end(),
                                      std::back_inserter(diff));
        double lo = 1e300, hi = 0;
        for (int c : diff) lo = std::min(lo, imp[size_t(e)][size_t(c)]), hi = std::max(hi, imp[size_t(e)][size_t(c)]);
        const double gap = (hi - lo) / hi;
        std::printf("  entry %d: selection differs from the greedy rule in %zu clusters, importance gap %.1e\n", e,
                    diff.size(), gap);
        if (gap > 1e-5) ++wrong;
        else ++near_ties;
      }
      reference(e, selected);
    }
    const double worst = worst_row_error(out, ref);
    const bool ok = worst < 1e-4 && wrong == 0;
    failed += !ok;
    std::printf("select %d: %.1f picks per entry (%.1f at once), %d of %d entries differ by a near-tie only; output "
                "worst relative L2 error %.2e (%s); %d clusters fit at once\n",
                Select, double(total) / kEntries, double(at_once) / kEntries, near_ties, kEntries, worst,
                ok ? "ok" : "WRONG", fit);
    const lab::Graph graph([&](cudaStream_t st) { LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, a)); }, s);
    std::vector<double> us;
    for (int i = 0; i < runs + 3; ++i) {
      const double t = timer.run_us(graph, true, i);
      if (i >= 3) us.push_back(t);  // the first 3 warm up
    }
    const auto [lo, hi] = std::minmax_element(us.begin(), us.end());
    std::printf("select %d: one-launch step with its selection, median %.2f us (min %.2f, max %.2f)\n", Select,
                lab::median(us), *lo, *hi);
    if (profile) {
      long long* prof = nullptr;
      LAB_CHECK(cudaMalloc(&prof, size_t(kEntries) * kCtas * kMarks * sizeof(long long)));
      Args pa = a;
      pa.prof = prof;
      timer.flush(0x5a);
      LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, pa));
      LAB_CHECK(cudaStreamSynchronize(s));
      std::vector<long long> marks(size_t(kEntries) * kCtas * kMarks);
      LAB_CHECK(cudaMemcpy(marks.data(), prof, marks.size() * sizeof(long long), cudaMemcpyDeviceToHost));
      LAB_CHECK(cudaFree(prof));
      print_phase_profile(marks, kEntries * kCtas,
                          {"", "logits pushed", "cluster barrier", "normalisers", "radix passes", "taken at once",
                           "rounds", "selected rows issued", "far field", "exact rows", "states merged"});
    }
  };
  run.template operator()<1>();
  run.template operator()<2>();
  return failed ? 1 : 0;
}
