#pragma once
// Re-ranking of the finest selection's picks by their members' exact logits (AttentionConfig::
// rerank_tokens; the CPU rule is MultipolePolicy::rerank). One CTA per entry, after the selection
// kernel ran its finest selection under `rerank` tokens (SelectArgs::rerank_ids / rerank_n /
// rerank_norms):
//   1. each pick's members -> page table -> key rows (no values), G logits a row from the real
//      queries (log2 domain), kept in shared memory;
//   2. per head the normaliser (M, Z) is raised to the largest exact logit and each pick's
//      centroid mass n 2^(x - M) in Z replaced by its exact mass e = sum 2^(l - M);
//   3. importances sum_g e_g / Z_g / n and the greedy rule under `budget` over the picks;
//   4. the chosen picks' members are the exact rows; an unchosen pick joins the far field with
//      its exact mass: its logit becomes log2(e) + M - log2(n), so the attention kernel's
//      pseudo-token weight n 2^(logit) is e 2^M.
#include "cuda/select.cuh"

namespace multipole::cuda::detail {

// D: head dim (64 or 128); KT: the cache's 16-bit type (the keys read here).
template <int D, class KT>
__global__ void __launch_bounds__(kSelectThreads) rerank_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  MP_SELECT_SHARED;
  __shared__ float s_M[16], s_invZ[16];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e = blockIdx.x, Hkv = a.num_kv_heads, G = a.group, R = a.rerank;
  const int b = e / Hkv, h = e % Hkv;
  const int rpad = pad(R) + 1;
  constexpr int kStride = 2 * D + 16;                 // bytes a staged row (+16: ldmatrix rows in distinct banks)
  uint8_t* stage = smem;                              // [2][kRerankChunk] key rows
  float* s_q = reinterpret_cast<float*>(stage + 2 * kRerankChunk * kStride);  // [G, D] q * qscale
  float* logit = s_q + G * D;                         // [G, R] exact logits, token t at [g * R + t]
  float* mass = logit + G * R;                        // [k, G] exact masses 2^(l - M') summed
  uint32_t* key = reinterpret_cast<uint32_t*>(mass + G * R);  // [pad(k)] f32 bits of the exact importance
  int* size = reinterpret_cast<int*>(key + rpad);     // [pad(k)] n; -n once chosen
  int* list_off = size + rpad;                        // [k] (write_exact_rows)
  int* off = list_off + R;                            // [k + 1] first token of pick j
  int* cid = off + R + 1;                             // [k] global cluster ids
  int* mb = cid + R;                                  // [k] member list starts
  int* prow = mb + R;                                 // [T] pool rows of the picks' members

  pdl_trigger();  // the attention kernel may load its queries (it waits for our writes)
  if (a.fallback && __ldcg(a.fallback + e) == 0) return;  // behind a one-launch step: an entry it finished
  EntryRows rows(a, e);
#pragma unroll 1
  for (int i = tid; i < G * D; i += kSelectThreads)
    s_q[i] = a.q[(int64_t(b) * Hkv * G + int64_t(h) * G) * D + i] * a.qscale;
  rows.fetch_early(0);

  pdl_wait();  // the selection's picks and normalisers
  const int k = a.rerank_n[e];
  const int32_t* ids = a.rerank_ids + int64_t(e) * R;
  // The picks in blocks of consecutive j a thread: sizes, list starts, token offsets.
  const int per = (k + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(k, tid * per), hi = min(k, lo + per);
  int mine = 0;
#pragma unroll 1
  for (int j = lo; j < hi; ++j) {
    const int c = ids[j], n = a.sizes[c];
    cid[j] = c;
    mb[j] = a.member_begin[c];
    size[pad(j)] = n;
    mine += n;
  }
  int T;
  int at = block_exclusive_scan(mine, T);
#pragma unroll 1
  for (int j = lo; j < hi; ++j) {
    off[j] = at;
    at += size[pad(j)];
  }
  if (tid == 0) off[k] = T;
  if (tid < G) {
    s_M[tid] = a.rerank_norms[(int64_t(e) * G + tid) * 2];
    s_invZ[tid] = a.rerank_norms[(int64_t(e) * G + tid) * 2 + 1];  // Z for now
  }
  __syncthreads();

  // 1. Pool rows of the members (each thread's tokens: positions, then pages, each batch of
  // loads in flight together).
  constexpr int kTok = 4;
#pragma unroll 1
  for (int t0 = tid; t0 < T; t0 += kTok * kSelectThreads) {
    int pos[kTok];
#pragma unroll
    for (int u = 0; u < kTok; ++u) {
      const int t = t0 + u * kSelectThreads;
      pos[u] = -1;
      if (t < T) {
        const int j = last_at_or_below(off, k, t);  // the pick holding token t
        pos[u] = a.members[mb[j] + (t - off[j])];
      }
    }
#pragma unroll
    for (int u = 0; u < kTok; ++u)
      if (pos[u] >= 0) prow[t0 + u * kSelectThreads] = rows.row_of(pos[u]);
  }
  __syncthreads();
  // The logits on tensor cores (mma_rows_three_part: q in three 16-bit parts, f32-class): the
  // key rows staged kRerankChunk at a time by cp.async, the next chunk in flight while this one
  // is scored, a warp a 16-row tile and eight heads at a time. (Lanes over the dimensions with
  // FMAs and shuffle reductions took ~28 us for 512 rows at b1 on an H100; gpu-notes item 54.)
  {
    const int gid = lane >> 2, tig = lane & 3, chunks = (T + kRerankChunk - 1) / kRerankChunk;
    constexpr int kPieces = D / 8;  // 16-byte pieces a row
    auto stage_chunk = [&](int c) {
      const int t0 = c * kRerankChunk, n = min(kRerankChunk, T - t0);
      uint8_t* buf = stage + (c & 1) * kRerankChunk * kStride;
#pragma unroll 1
      for (int i = tid; i < n * kPieces; i += kSelectThreads) {
        const int r = i / kPieces, p = i - r * kPieces;
        cp_async16(buf + r * kStride + p * 16, a.keys + (int64_t(prow[t0 + r]) * D + p * 8) * 2, true);
      }
      cp_async_commit();
    };
    if (chunks > 0) stage_chunk(0);
#pragma unroll 1
    for (int c = 0; c < chunks; ++c) {
      if (c + 1 < chunks) {
        stage_chunk(c + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const uint8_t* buf = stage + (c & 1) * kRerankChunk * kStride;
      const int t0 = c * kRerankChunk, n = min(kRerankChunk, T - t0);
#pragma unroll 1
      for (int tile = warp; 16 * tile < n; tile += kSelectWarps) {
        // The lane's ldmatrix row; rows past n read row n - 1 (their logits are dropped).
        const int r = min(16 * tile + (lane & 7) + ((lane >> 3) & 1) * 8, n - 1);
#pragma unroll 1
        for (int g0 = 0; g0 < G; g0 += 8) {
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma_rows_three_part<D, KT>(
              d, min(8, G - g0), [&](int g, int x) { return *reinterpret_cast<const float2*>(s_q + (g0 + g) * D + x); },
              [&](int ks) { return buf + r * kStride + (ks * 2 + (lane >> 4)) * 16; });
          const int r0 = 16 * tile + gid;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            if (const int g = g0 + 2 * tig + hh; g < G) {
              if (r0 < n) logit[g * R + t0 + r0] = d[hh];
              if (r0 + 8 < n) logit[g * R + t0 + r0 + 8] = d[2 + hh];
            }
        }
      }
      __syncthreads();  // this buffer is staged again two chunks on
    }
  }

  // 2. Per head (warp g): M' = max(M, the largest exact logit); then each pick's exact mass.
#pragma unroll 1
  for (int g = warp; g < G; g += kSelectWarps) {
    float mx = neg_inf();
#pragma unroll 1
    for (int t = lane; t < T; t += 32) mx = fmaxf(mx, logit[g * R + t]);
    mx = warp_max(mx);
    if (lane == 0 && mx > s_M[g]) {
      const float z = s_invZ[g];
      s_invZ[g] = z > 0.0f ? z * fast_exp2(s_M[g] - mx) : 0.0f;
      s_M[g] = mx;
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int i = tid; i < k * G; i += kSelectThreads) {  // a thread a (pick, head)
    const int j = i / G, g = i - j * G;
    float s = 0.0f;
#pragma unroll 1
    for (int t = off[j]; t < off[j + 1]; ++t) s += fast_exp2(logit[g * R + t] - s_M[g]);
    mass[i] = s;
  }
  __syncthreads();
  // Z' = Z + sum_j (e_j - n_j 2^(x_j - M')), in pick order per lane, then over the lanes.
#pragma unroll 1
  for (int g = warp; g < G; g += kSelectWarps) {
    float d = 0.0f;
#pragma unroll 1
    for (int j = lane; j < k; j += 32)
      d += mass[j * G + g] - float(size[pad(j)]) * fast_exp2(a.scores[int64_t(cid[j]) * G + g] - s_M[g]);
    d = warp_sum(d);
    if (lane == 0) {
      const float z = s_invZ[g] + d;
      s_invZ[g] = z > 0.0f ? 1.0f / z : 0.0f;
    }
  }
  __syncthreads();

  // 3. The greedy rule under the budget over the picks' exact importances.
#pragma unroll 1
  for (int j = tid; j < k; j += kSelectThreads) {
    float imp = 0.0f;
#pragma unroll 1
    for (int g = 0; g < G; ++g) imp += mass[j * G + g] * s_invZ[g];
    key[pad(j)] = __float_as_uint(imp / float(size[pad(j)]));
  }
  __syncthreads();
  greedy_select(key, size, k, a.budget, T, sh, a.warp_select_max, a.warp_select_steps, nullptr, 0, 0,
                a.warp_select_precheck != 0, a.warp_select_sort);

  // 4. Unchosen picks join the far field with their exact masses; the chosen ones' members are
  // the exact rows.
  {
    int nf = 0;
#pragma unroll 1
    for (int j = lo; j < hi; ++j) nf += size[pad(j)] > 0;
    int nfar;
    int far_at = block_exclusive_scan(nf, nfar);
    const int far0 = a.far_ids ? a.far_n[e] : 0;
    const int cb = a.entry_begin[e];
#pragma unroll 1
    for (int j = lo; j < hi; ++j) {
      const int n = size[pad(j)];
      if (n <= 0) continue;
      const int c = cid[j];
      a.far_size[c] = n;
      if (a.far_ids && far0 + far_at < a.far_cap) a.far_ids[int64_t(e) * a.far_cap + far0 + far_at] = c - cb;
      ++far_at;
#pragma unroll 1
      for (int g = 0; g < G; ++g) {
        const float m = mass[j * G + g];
        a.scores_out[int64_t(c) * G + g] = m > 0.0f ? __log2f(m) + s_M[g] - __log2f(float(n)) : neg_inf();
      }
    }
    __syncthreads();  // far_n read by every thread above
    if (tid == 0 && a.far_ids) a.far_n[e] = min(far0 + nfar, a.far_cap);
  }
  write_exact_rows(a, e, size, k, reinterpret_cast<int*>(key), list_off, [&](int j) { return cid[j]; }, rows);
}

}  // namespace multipole::cuda::detail
