#pragma once
// Quest and oracle-topk selection kernels: they only fill per-(sequence, KV head) lists of
// exact rows, which the multipole variant of the attention kernel (attend.cuh, far field
// off) then attends. Shapes: B batch, Hkv KV heads, G = Hq / Hkv, D head dim,
// E = B * Hkv entries (e = b * Hkv + h). Regions as AttentionConfig::middle_end: sinks
// [0, s), middle [s, m), window [m, length); s = min(sinks, length).
// The argument block is plain data (the host planner includes this header without nvcc).
#include <cstddef>
#include <cstdint>

#include "multipole/core/dtype.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda::detail {

constexpr int kQuestPagesPerCta = 64;  // quest scoring: 4 warps x 16 pages
constexpr int kLogitChunk = 512;       // oracle: middle keys per CTA of the logit pass
constexpr int kSparseSelectThreads = 1024;
constexpr int kSparseMaxPicks = 4096;

struct SparseArgs {
  // Cache (one layer), as AttendArgs: row r = (page * Hkv + h) * P + slot, D elements each.
  const std::byte* keys = nullptr;         // [num_pages, Hkv, P, D] bf16 or f16
  const int32_t* tables = nullptr;         // concatenated page tables
  const int64_t* table_offset = nullptr;   // [max_sequences]
  const int32_t* lengths = nullptr;        // [max_sequences]
  const int32_t* seq_ids = nullptr;        // [B]
  int page_size = 0, num_kv_heads = 0, group = 0;
  int sinks = 0, window = 0, budget = 0;
  int quest_page = 0;                      // quest: tokens per page bound
  const float* q = nullptr;                // [B, Hq, D] f32
  float qscale = 0;                        // oracle: softmax scale * log2 e (log2-domain logits)
  // Quest: page bounds of this layer [E, page_cap, 2 (min, max), D] in the KV dtype.
  std::byte* meta = nullptr;
  int64_t page_cap = 0;
  int update = 0;                          // metadata kernel: 1 rebuilds only the last window's pages
  // Quest: page scores [E, page_cap]; oracle: logits [E, G, middle_cap] (log2 domain).
  float* values = nullptr;
  int64_t middle_cap = 0;
  int chunks = 0;                          // oracle: logit chunks per entry (kLogitChunk keys)
  float* stats = nullptr;                  // oracle: [E, chunks, G, 2] chunk (max, sum 2^(x - max))
  float* importance = nullptr;             // oracle: [E, middle_cap]
  // Output: exact lists as the attention kernel reads them.
  int exact_cap = 0;
  int32_t* exact_rows = nullptr;           // [E, exact_cap] pool rows
  int32_t* exact_pos = nullptr;            // [E, exact_cap] positions (inspection)
  int32_t* exact_n = nullptr;              // [E]
  uint32_t* error_flags = nullptr;         // bit 0: list overflow, bit 1: a sequence grew past the plan
};

void launch_quest_meta(const SparseArgs& a, DType dtype, int head_dim, int grid_x, int entries, Stream stream);
void launch_quest_score(const SparseArgs& a, DType dtype, int head_dim, int entries, Stream stream);
void launch_oracle_logits(const SparseArgs& a, DType dtype, int head_dim, int entries, Stream stream);
void launch_sparse_select(const SparseArgs& a, bool quest, int entries, Stream stream);

}  // namespace multipole::cuda::detail

#if defined(__CUDACC__)
#include "cuda/common.cuh"

namespace multipole::cuda::detail {

struct SparseRegion {
  int length, s, m;  // tokens, sinks end, middle end
};
__device__ __forceinline__ SparseRegion sparse_region(const SparseArgs& a, int seq) {
  SparseRegion r;
  r.length = a.lengths[seq];
  r.s = min(a.sinks, r.length);
  r.m = r.length - r.s < a.window ? r.s : r.s + (r.length - r.s - a.window) / a.window * a.window;
  return r;
}
__device__ __forceinline__ int sparse_row(const SparseArgs& a, const int32_t* table, int h, int pos) {
  return (table[pos / a.page_size] * a.num_kv_heads + h) * a.page_size + pos % a.page_size;
}

// Quest page bounds: grid (pages, E), 128 threads over the channels. The min and max of
// stored keys are storage values, so they are stored exactly. update: only the pages that
// [m - window, m) falls in (grid.x covers them).
template <class T>
__global__ void __launch_bounds__(128) quest_meta_kernel(const SparseArgs a, int D) {
  const int e = blockIdx.y, b = e / a.num_kv_heads, h = e % a.num_kv_heads;
  const int seq = a.seq_ids[b];
  const SparseRegion r = sparse_region(a, seq);
  const int P = a.quest_page, pages = (r.m - r.s + P - 1) / P;
  const int first = a.update ? max(0, r.m - a.window - r.s) / P : 0;
  const int page = first + int(blockIdx.x);
  if (page >= pages) return;
  if (page >= a.page_cap) {
    if (threadIdx.x == 0) atomicOr(a.error_flags, 2u);
    return;
  }
  const int32_t* table = a.tables + a.table_offset[seq];
  const T* keys = reinterpret_cast<const T*>(a.keys);
  const int begin = r.s + page * P, end = min(begin + P, r.m);
  T* out = reinterpret_cast<T*>(a.meta) + (int64_t(e) * a.page_cap + page) * 2 * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float lo = __int_as_float(0x7f800000), hi = neg_inf();
#pragma unroll 8
    for (int p = begin; p < end; ++p) {  // unrolled: the loads of a page are independent
      const float x = to_f32(keys[int64_t(sparse_row(a, table, h, p)) * D + c]);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    out[c] = from_f32<T>(lo);
    out[D + c] = from_f32<T>(hi);
  }
}

// Quest page scores: grid (ceil(page_cap / kQuestPagesPerCta), E), 4 warps. Eight lanes
// share a page (D / 8 channels each, 16-byte loads), so a warp scores 4 pages per step and
// a page's sum needs 3 shuffles per head; a warp loads the bounds of its next 8 pages
// before any math. score = max_g sum_c min(q_gc, 0) lo_c + max(q_gc, 0) hi_c (unscaled q,
// as the CPU policy). Skipped when every page fits the budget.
template <int D, class T>
__global__ void __launch_bounds__(128) quest_score_kernel(const SparseArgs a) {
  constexpr int C = D / 8, NV = C / 8;  // channels per lane, 16-byte vectors per bound
  constexpr int STEPS = 2;              // 4-page steps loaded together
  constexpr int QS = 8 * (C + 1);        // q row stride: lane sl's channels at sl (C + 1), no bank conflicts
  __shared__ float s_q[16 * QS];
  const int e = blockIdx.y, b = e / a.num_kv_heads, h = e % a.num_kv_heads, G = a.group;
  const SparseRegion r = sparse_region(a, a.seq_ids[b]);
  const int P = a.quest_page, pages = min((r.m - r.s + P - 1) / P, int(a.page_cap));  // beyond: flagged
  if (pages <= a.budget / P) return;
  const int p0 = blockIdx.x * kQuestPagesPerCta;
  if (p0 >= pages) return;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x)
    s_q[i / D * QS + i % D / C * (C + 1) + i % C] = a.q[(int64_t(b) * a.num_kv_heads * G + h * G) * D + i];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane >> 3, sl = lane & 7;
  const T* meta = reinterpret_cast<const T*>(a.meta) + int64_t(e) * a.page_cap * 2 * D;
  const int end = min(pages, p0 + kQuestPagesPerCta);
  // Warp w takes pages p0 + 4 (w + 4 j) + sub, j = 0, 1, ...; STEPS of them per batch.
  for (int j0 = 0; p0 + 4 * (warp + 4 * j0) < end; j0 += STEPS) {
    uint4 lo[STEPS][NV], hi[STEPS][NV];
#pragma unroll
    for (int t = 0; t < STEPS; ++t) {
      const int page = p0 + 4 * (warp + 4 * (j0 + t)) + sub;
      const uint4* src = reinterpret_cast<const uint4*>(meta + int64_t(page) * 2 * D + sl * C);
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        lo[t][v] = page < end ? __ldg(src + v) : make_uint4(0u, 0u, 0u, 0u);
        hi[t][v] = page < end ? __ldg(src + D / 8 + v) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int t = 0; t < STEPS; ++t) {
      const int page = p0 + 4 * (warp + 4 * (j0 + t)) + sub;
      float lof[C], hif[C];
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        Storage<T>::to_float(lo[t][v], lof + 8 * v);
        Storage<T>::to_float(hi[t][v], hif + 8 * v);
      }
      float best = neg_inf();
      for (int g = 0; g < G; ++g) {
        const float* qg = s_q + g * QS + sl * (C + 1);
        float acc = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const float qc = qg[c];
          acc = fmaf(fminf(qc, 0.0f), lof[c], acc);
          acc = fmaf(fmaxf(qc, 0.0f), hif[c], acc);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        best = fmaxf(best, acc);
      }
      if (sl == 0 && page < end) a.values[int64_t(e) * a.page_cap + page] = best;
    }
  }
}

// Oracle logits of the middle region: grid (chunks, E), 128 threads, kLogitChunk keys per
// CTA (key i of the chunk on thread i % 128). Writes x_g = qscale q_g . k for every head of
// the group and the chunk's per-head (max, sum 2^(x - max)). GM >= G accumulators.
// Every thread reads its own key rows (16-byte loads; a warp's rows share lines through
// L1). Tiling the keys through shared memory by coalesced loads measured slower (H200,
// docs/gpu-notes.md item 12).
template <int D, int GM, class T>
__global__ void __launch_bounds__(128) oracle_logits_kernel(const SparseArgs a) {
  constexpr int KPT = kLogitChunk / 128;
  __shared__ __align__(16) float s_q[GM * D];
  __shared__ float s_red[4][GM];
  const int e = blockIdx.y, b = e / a.num_kv_heads, h = e % a.num_kv_heads, G = a.group;
  const int seq = a.seq_ids[b];
  const SparseRegion r = sparse_region(a, seq);
  const int M = min(r.m - r.s, int(a.middle_cap)), i0 = blockIdx.x * kLogitChunk;  // beyond: flagged
  if (M <= a.budget || i0 >= M) return;
  for (int i = threadIdx.x; i < GM * D; i += blockDim.x)
    s_q[i] = i < G * D ? a.q[(int64_t(b) * a.num_kv_heads * G + h * G) * D + i] * a.qscale : 0.0f;
  __syncthreads();
  const int32_t* table = a.tables + a.table_offset[seq];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float x[KPT][GM];
#pragma unroll
  for (int k = 0; k < KPT; ++k) {
    const int i = i0 + k * 128 + tid;
#pragma unroll
    for (int g = 0; g < GM; ++g) x[k][g] = 0.0f;
    if (i >= M) continue;
    const uint4* row = reinterpret_cast<const uint4*>(a.keys + int64_t(sparse_row(a, table, h, r.s + i)) * D * 2);
#pragma unroll 4
    for (int c8 = 0; c8 < D / 8; ++c8) {
      float kf[8];
      Storage<T>::to_float(__ldg(row + c8), kf);
#pragma unroll
      for (int g = 0; g < GM; ++g) {
        const float4 qa = *reinterpret_cast<const float4*>(s_q + g * D + c8 * 8);
        const float4 qb = *reinterpret_cast<const float4*>(s_q + g * D + c8 * 8 + 4);
        float acc = x[k][g];
        acc = fmaf(qa.x, kf[0], acc);
        acc = fmaf(qa.y, kf[1], acc);
        acc = fmaf(qa.z, kf[2], acc);
        acc = fmaf(qa.w, kf[3], acc);
        acc = fmaf(qb.x, kf[4], acc);
        acc = fmaf(qb.y, kf[5], acc);
        acc = fmaf(qb.z, kf[6], acc);
        acc = fmaf(qb.w, kf[7], acc);
        x[k][g] = acc;
      }
    }
#pragma unroll
    for (int g = 0; g < GM; ++g)
      if (g < G) a.values[(int64_t(e) * G + g) * a.middle_cap + i] = x[k][g];
  }
  // Chunk max, then sum 2^(x - max), per head.
  float mx[GM];
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    float v = neg_inf();
#pragma unroll
    for (int k = 0; k < KPT; ++k)
      if (i0 + k * 128 + tid < M) v = fmaxf(v, x[k][g]);
    v = warp_max(v);
    if (lane == 0) s_red[warp][g] = v;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GM; ++g) mx[g] = fmaxf(fmaxf(s_red[0][g], s_red[1][g]), fmaxf(s_red[2][g], s_red[3][g]));
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < KPT; ++k)
      if (i0 + k * 128 + tid < M) v += exp2f(x[k][g] - mx[g]);
    v = warp_sum(v);
    if (lane == 0) s_red[warp][g] = v;
  }
  __syncthreads();
  if (tid < G) {
    float* st = a.stats + ((int64_t(e) * a.chunks + blockIdx.x) * G + tid) * 2;
    float m = 0.0f, l = 0.0f;
#pragma unroll
    for (int g = 0; g < GM; ++g)
      if (g == tid) {
        m = mx[g];
        l = s_red[0][g] + s_red[1][g] + s_red[2][g] + s_red[3][g];
      }
    st[0] = m;
    st[1] = l;
  }
}

// Float -> unsigned key with the same order (+0 and -0 are one key, as for comparisons).
__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kSubHists = 16;  // radix sub-histograms (two warps share one)
// Keys a selection thread loads before using any: its loops over L2-resident scores are
// latency bound with one load in flight.
constexpr int kSelectUnroll = 8;

// Block-wide radix select: the k-th largest of key(i), i < n (1 <= k <= n), 8 bits per
// pass. Returns it; `take` gets how many elements equal to it belong to the top k and
// `equal` how many there are. hist: (kSubHists + 1) * 256 words of shared memory (per-warp
// pair counts, then their sum); s_bc: 3 words. Keys of one pass often share a bin (the
// top byte of similar floats): each warp adds its leader lane's bin with one atomic for all
// lanes in it, the other lanes one each, into its own sub-histogram.
template <class Key>
__device__ uint32_t block_kth_largest(int n, int k, Key key, uint32_t* hist, int* s_bc, int& take, int& equal) {
  const int tid = threadIdx.x, lane = tid & 31;
  uint32_t prefix = 0, mask = 0;
  int want = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < kSubHists * 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    uint32_t* sub = hist + ((tid >> 5) % kSubHists) * 256;
    for (int base = 0; base < n; base += blockDim.x * kSelectUnroll) {
      uint32_t us[kSelectUnroll];
#pragma unroll
      for (int j = 0; j < kSelectUnroll; ++j) {
        const int i = base + j * blockDim.x + tid;
        us[j] = i < n ? key(i) : 0u;
      }
#pragma unroll
      for (int j = 0; j < kSelectUnroll; ++j) {
        const uint32_t u = us[j];
        const bool in = base + j * int(blockDim.x) + tid < n && (u & mask) == prefix;
        const uint32_t bin = (u >> shift) & 255u;
        const unsigned active = __ballot_sync(0xffffffffu, in);
        if (active == 0) continue;
        const int leader = __ffs(active) - 1;
        const uint32_t lead_bin = __shfl_sync(0xffffffffu, bin, leader);
        const unsigned same = __ballot_sync(0xffffffffu, in && bin == lead_bin);
        if (lane == leader)
          atomicAdd(sub + bin, uint32_t(__popc(same)));
        else if (in && bin != lead_bin)
          atomicAdd(sub + bin, 1u);
      }
    }
    __syncthreads();
    for (int j = tid; j < 256; j += blockDim.x) {
      uint32_t c = 0;
      for (int w = 0; w < kSubHists; ++w) c += hist[w * 256 + j];
      hist[kSubHists * 256 + j] = c;
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 8 (31 - l) .. + 7, so lanes run from the top bin down.
      const uint32_t* total = hist + kSubHists * 256;
      const int top = 8 * (31 - lane);
      int own = 0;
      for (int j = 0; j < 8; ++j) own += int(total[top + j]);
      const int incl = warp_inclusive_sum(own);  // elements in bins >= this lane's lowest bin
      const int excl = incl - own;
      if (excl < want && want <= incl) {
        int above = excl;
        for (int j = 7; j >= 0; --j) {
          const int c = int(total[top + j]);
          if (above + c >= want) {
            s_bc[0] = top + j;
            s_bc[1] = want - above;
            s_bc[2] = c;
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    prefix |= uint32_t(s_bc[0]) << shift;
    mask |= 255u << shift;
    want = s_bc[1];
    equal = s_bc[2];
  }
  take = want;
  return prefix;
}

// One CTA per entry: selection of the middle region, then the exact list (sinks, selected
// positions ascending, window) as pool rows and positions.
//   quest:  candidates = pages of the middle region (the last may be partial), score from
//           quest_score_kernel, top floor(budget / page) pages.
//   oracle: candidates = middle keys, importance sum_g softmax_g from the logits and chunk
//           partials (written to a.importance), top budget keys.
// Everything is taken when the candidates fit.
template <bool QUEST>
__global__ void __launch_bounds__(kSparseSelectThreads) sparse_select_kernel(const SparseArgs a) {
  __shared__ uint32_t s_hist[(kSubHists + 1) * 256];
  __shared__ int s_bc[3], s_count, s_partial;
  __shared__ int32_t s_pick[kSparseMaxPicks];
  __shared__ float s_norm[16][2];  // oracle: per head max and 1 / sum
  const int e = blockIdx.x, b = e / a.num_kv_heads, h = e % a.num_kv_heads, G = a.group;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int seq = a.seq_ids[b];
  const SparseRegion r = sparse_region(a, seq);
  const int32_t* table = a.tables + a.table_offset[seq];
  const int P = a.quest_page, M = r.m - r.s;
  int n = QUEST ? (M + P - 1) / P : M;
  if (n > (QUEST ? a.page_cap : a.middle_cap)) {  // grew past the plan: select from what fits
    n = int(QUEST ? a.page_cap : a.middle_cap);
    if (tid == 0) atomicOr(a.error_flags, 2u);
  }
  const int k = QUEST ? a.budget / P : a.budget;
  const float* val = QUEST ? a.values + int64_t(e) * a.page_cap : a.importance + int64_t(e) * a.middle_cap;

  int picked = n;  // candidates taken; ranks are their indices when all are taken
  if (n > k && k > 0) {
    if constexpr (!QUEST) {
      if (tid < 32) {
        const int chunks = (n + kLogitChunk - 1) / kLogitChunk;
        for (int g = 0; g < G; ++g) {
          const float* st = a.stats + (int64_t(e) * a.chunks * G + g) * 2;
          float mx = neg_inf();
          for (int c = tid; c < chunks; c += 32) mx = fmaxf(mx, st[int64_t(c) * G * 2]);
          mx = warp_max(mx);
          float z = 0.0f;
          for (int c = tid; c < chunks; c += 32) z += st[int64_t(c) * G * 2 + 1] * exp2f(st[int64_t(c) * G * 2] - mx);
          z = warp_sum(z);
          if (tid == 0) {
            s_norm[g][0] = mx;
            s_norm[g][1] = 1.0f / z;
          }
        }
      }
      __syncthreads();
      float* imp = a.importance + int64_t(e) * a.middle_cap;
      constexpr int U = kSelectUnroll / 2;
      for (int base = 0; base < n; base += nt * U) {
        float s[U] = {};
        for (int g = 0; g < G; ++g) {
          const float* xg = a.values + (int64_t(e) * G + g) * a.middle_cap;
          float x[U];
#pragma unroll
          for (int j = 0; j < U; ++j) x[j] = base + j * nt + tid < n ? xg[base + j * nt + tid] : 0.0f;
#pragma unroll
          for (int j = 0; j < U; ++j) s[j] += exp2f(x[j] - s_norm[g][0]) * s_norm[g][1];
        }
#pragma unroll
        for (int j = 0; j < U; ++j)
          if (base + j * nt + tid < n) imp[base + j * nt + tid] = s[j];
      }
      __syncthreads();  // the block's global writes are visible to it after the barrier
    }
    auto key = [&](int i) { return ordered_key(val[i]); };
    int take = 0, equal = 0;
    const uint32_t t = block_kth_largest(n, k, key, s_hist, s_bc, take, equal);
    // Ties at the threshold go to the lower indices: the take-th largest of ~index among them.
    uint32_t last_tie = 0xffffffffu;
    if (take < equal) {
      int t2 = 0, e2 = 0;
      last_tie = ~block_kth_largest(n, take, [&](int i) { return key(i) == t ? ~uint32_t(i) : 0u; }, s_hist, s_bc,
                                    t2, e2);
    }
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int base = 0; base < n; base += nt * kSelectUnroll) {
      uint32_t us[kSelectUnroll];
#pragma unroll
      for (int j = 0; j < kSelectUnroll; ++j) us[j] = base + j * nt + tid < n ? key(base + j * nt + tid) : 0u;
#pragma unroll
      for (int j = 0; j < kSelectUnroll; ++j) {
        const int i = base + j * nt + tid;
        if (i < n && (us[j] > t || (us[j] == t && uint32_t(i) <= last_tie))) s_pick[atomicAdd(&s_count, 1)] = i;
      }
    }
    __syncthreads();
  }
  if (n > k) picked = k;
  // Tokens selected: quest pages are full except the partial last one (index n - 1).
  const int tail = QUEST ? min(P, M - (n - 1) * P) : 1;
  if (tid == 0) s_partial = 0;
  __syncthreads();
  const int cap = a.exact_cap;
  int32_t* rows = a.exact_rows + int64_t(e) * cap;
  int32_t* pos = a.exact_pos + int64_t(e) * cap;
  auto put = [&](int slot, int p) {
    if (slot < cap) {
      rows[slot] = sparse_row(a, table, h, p);
      pos[slot] = p;
    }
  };
  for (int j = tid; j < picked; j += nt) {
    const int c = n > k ? s_pick[j] : j;
    int rank = j;
    if (n > k) {  // rank among the picks = output order (ascending index)
      rank = 0;
      for (int o = 0; o < picked; ++o) rank += s_pick[o] < c;
    }
    if constexpr (QUEST) {
      const int cnt = c == n - 1 ? tail : P;
      if (cnt < P) s_partial = P - cnt;
      for (int t = 0; t < cnt; ++t) put(r.s + rank * P + t, r.s + c * P + t);
    } else {
      put(r.s + rank, r.s + c);
    }
  }
  for (int p = tid; p < r.s; p += nt) put(p, p);
  __syncthreads();
  const int selected = QUEST ? picked * P - s_partial : picked;
  const int wbegin = r.s + selected;
  for (int p = r.m + tid; p < r.length; p += nt) put(wbegin + p - r.m, p);
  if (tid == 0) {
    const int total = wbegin + r.length - r.m;
    if (total > cap) atomicOr(a.error_flags, 1u);
    a.exact_n[e] = min(total, cap);
  }
}

}  // namespace multipole::cuda::detail
#endif
