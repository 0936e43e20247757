// Kernel lab: a batch-1 multipole step in one launch, the selection left out (gpu-notes item 33).
//
// Item 32 costs the links of a one-launch step at ~7.5 us of floors. This lab builds the step
// but its selection: one cluster of kCtas CTAs per entry (KV head; 8 entries, Qwen3-8B's KV
// heads at batch 1), G = 4 query heads, d = 128, bf16 centroids and cache, one level of fine
// clusters of 16 tokens:
//   1. the row addresses of the CTA's share of the exact rows (sinks, the selected clusters'
//      members through the member list, the window; each through the page table) and their
//      K/V loads are issued first, so that they overlap the scoring;
//   2. each CTA scores its slice of the centroids for the 4 heads (logit + log size);
//   3. the per-head maximum over the cluster (DSMEM), then the far field over the CTA's
//      unselected centroids with weights 2^(x - max);
//   4. the exact rows' softmax state, merged with the far field's;
//   5. the cluster's states merged (DSMEM) into the output: variant 3 pushes them to CTA 0,
//      which merges them; variants 1 and 2 pull them, each CTA 1/16 of the output (the
//      library's pull_merged_states; CTA 0 did it all until H31).
// Variants (llm.c style, each checked and timed): 1: each warp loads its centroids into
// registers, 8 bytes a lane, four centroids at a time, and reduces each dot product with
// shuffles; 2: each CTA copies its whole slice of key and value centroids into shared memory
// with cp.async first (rows padded to 272 bytes), then one thread per (centroid, head) dot
// product and one per (head pair, dimension) far-field sum, without shuffles; 3: as 2, but
// the cluster's exchanges (maxima, final states) are pushed by remote stores into the
// reader's shared memory instead of pulled by dependent remote loads.
// Which clusters are selected comes from the host: the time is that of everything a
// one-launch step does besides the selection. The output is checked against a host f64
// computation of the same formula; the time is the bench's (graph replay, 256 MiB memset
// flush before each run, median).
// Usage: lab_fused_step [context tokens, default 32768] [runs, default 41] [1: phase profile].
// H200, session H23, median us at 32K / 64K / 128K: variant 1 23.6 / 34.9 / 57.9, variant 2
// 20.4 / 37.5 / -, variant 3 27.0 / 35.5 / - (the floors of item 32 add up to ~7.5 us). The
// phase profile at 32K puts variant 3's CTAs at 13.2 us, but its eight clusters do not all
// fit at once (the last starts ~13 us late).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/common.cuh"
#include "step_lab.cuh"

namespace cg = cooperative_groups;

namespace {

using namespace step_lab;

constexpr int kClusterTokens = 16, kSelected = 8;
constexpr int kExact = kSinks + kSelected * kClusterTokens + kWindow;  // 272 rows per entry
constexpr int kRowsPerCta = (kExact + kCtas - 1) / kCtas;               // 17
constexpr int kRowsPerWarp = (kRowsPerCta + kWarps - 1) / kWarps;       // 3
constexpr int kMaxLocal = 1024;                                          // centroids per CTA
constexpr int kMaxStaged = 256;   // variant 2: centroids per CTA staged in shared memory
// Profile marks (%globaltimer of thread 0 of each CTA): entry, row loads issued, scores done, cluster max
// known, far field summed, exact rows merged, states merged (CTA 0: output written).
constexpr int kMarks = 7;

struct Args {
  const float* q;              // [E, G, D] queries, pre-scaled by softmax scale * log2(e)
  const uint16_t* key_c;       // [E, C, D] bf16 key centroids
  const uint16_t* value_c;     // [E, C, D] bf16 value centroids
  const float* log2_size;      // [E, C]
  const uint8_t* selected;     // [E, C] 1 where the cluster is selected
  const int32_t* sel_list;     // [E, kSelected] the selected clusters
  const int32_t* members;      // [E, C * 16] token positions of each cluster's members
  const int32_t* page_table;   // [N / 16] page of each 16 positions
  const uint16_t* k_cache;     // [pages, E, 16, D] bf16
  const uint16_t* v_cache;     // [pages, E, 16, D] bf16
  float* out;                  // [E, G, D]
  long long* prof;             // [E * kCtas, kMarks] %globaltimer (ns) at each mark of thread 0, or null
  int clusters, tokens;
};

template <int V>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const Args a) {
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), e = blockIdx.x / kCtas;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto mark = [&](int i) {
    if (a.prof && threadIdx.x == 0) {
      long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      a.prof[size_t(blockIdx.x) * kMarks + i] = t;
    }
  };
  mark(0);
  __shared__ float x[kG][kMaxLocal];          // logits, then 2^(x - max) of unselected ones
  __shared__ float part[kWarps][kG][kD];      // per-warp sums before the CTA's
  __shared__ float wm[kWarps][kG], wl[kWarps][kG];
  __shared__ float cta_max[kG], gmax[kG];
  __shared__ State st;

  const float* q = a.q + size_t(e) * kG * kD;
  float qr[kG][4];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    const float4 v = *reinterpret_cast<const float4*>(q + g * kD + lane * 4);
    qr[g][0] = v.x, qr[g][1] = v.y, qr[g][2] = v.z, qr[g][3] = v.w;
  }

  // 1. This warp's exact rows: addresses, then their K and V, in flight during the scoring.
  uint2 kr[kRowsPerWarp], vr[kRowsPerWarp];
  int nrows = 0;
  {
    int pos[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int j = rank * kRowsPerCta + warp + i * kWarps;  // row of the entry's exact list
      pos[i] = -1;
      if (warp + i * kWarps >= kRowsPerCta || j >= kExact) continue;
      if (j < kSinks) {
        pos[i] = j;
      } else if (j < kSinks + kSelected * kClusterTokens) {
        const int k = j - kSinks, c = a.sel_list[e * kSelected + k / kClusterTokens];
        pos[i] = a.members[(size_t(e) * a.clusters + c) * kClusterTokens + k % kClusterTokens];
      } else {
        pos[i] = a.tokens - kWindow + (j - kSinks - kSelected * kClusterTokens);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (pos[i] < 0) continue;
      const size_t page = size_t(a.page_table[pos[i] / kPage]);
      const size_t row = ((page * kEntries + e) * kPage + pos[i] % kPage) * kD + lane * 4;
      kr[i] = *reinterpret_cast<const uint2*>(a.k_cache + row);
      vr[i] = *reinterpret_cast<const uint2*>(a.v_cache + row);
      nrows = i + 1;
    }
  }

  mark(1);
  // 2. Scores of this CTA's centroids [c0, c0 + n).
  const int per = (a.clusters + kCtas - 1) / kCtas, c0 = rank * per;
  const int n = max(0, min(per, a.clusters - c0));
  const uint16_t* kc = a.key_c + (size_t(e) * a.clusters + c0) * kD;
  const uint16_t* vc = a.value_c + (size_t(e) * a.clusters + c0) * kD;
  const float* ls = a.log2_size + size_t(e) * a.clusters + c0;
  const uint8_t* sel = a.selected + size_t(e) * a.clusters + c0;
  extern __shared__ __align__(16) uint8_t staged[];  // variant 2: [n] key rows, then [n] value rows
  if constexpr (V == 1) {
    // Four centroids at a time per warp, 8 bytes a lane, dot products reduced by shuffles.
    for (int j0 = warp * 4; j0 < n; j0 += kWarps * 4) {
      uint2 kv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (j0 + u < n) kv[u] = *reinterpret_cast<const uint2*>(kc + size_t(j0 + u) * kD + lane * 4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (j0 + u >= n) break;
        float k4[4], s[kG];
        bf16x4(kv[u], k4);
        warp_dots(qr, k4, s);
#pragma unroll
        for (int g = 0; g < kG; ++g)
          if (lane == 0) x[g][j0 + u] = s[g] + ls[j0 + u];
      }
    }
  } else {
    // The whole slice into shared memory at once, then one thread per (centroid, head).
    for (int i = threadIdx.x; i < 2 * n * 16; i += kThreads) {
      const int row = i / 16, chunk = i % 16;  // rows [0, n) keys, [n, 2n) values
      const uint16_t* src = row < n ? kc + size_t(row) * kD : vc + size_t(row - n) * kD;
      multipole::cuda::detail::cp_async16(staged + size_t(row) * kRowStride + chunk * 16, src + chunk * 8, true);
    }
    multipole::cuda::detail::cp_async_commit();
    multipole::cuda::detail::cp_async_wait<0>();
    __syncthreads();
    __shared__ float qs[kG][kD];
    for (int i = threadIdx.x; i < kG * kD; i += kThreads) qs[i / kD][i % kD] = q[i];
    __syncthreads();
    for (int i = threadIdx.x; i < kG * n; i += kThreads) {
      const int g = i / n, j = i % n;
      x[g][j] = staged_dot(staged, j, qs[g]) + ls[j];
    }
  }
  __syncthreads();
  mark(2);

  // 3. The cluster's maximum per head, then this CTA's far field.
  if (warp < kG) {
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, x[warp][j]);
    m = warp_max(m);
    if (lane == 0) cta_max[warp] = m;
  }
  if constexpr (V >= 3) {
    // Push: every CTA stores its maxima into every CTA's all_max (stores do not wait).
    __shared__ float all_max[kCtas][kG];
    __syncthreads();
    if (threadIdx.x < kCtas * kG) {
      const int r = threadIdx.x / kG, g = threadIdx.x % kG;
      *cluster.map_shared_rank(&all_max[rank][g], r) = cta_max[g];
    }
    cluster.sync();
    if (threadIdx.x < kG) {
      float m = -INFINITY;
      for (int r = 0; r < kCtas; ++r) m = fmaxf(m, all_max[r][threadIdx.x]);
      gmax[threadIdx.x] = m;
    }
  } else {
    // Pull: thread g reads the 16 CTAs' maxima one remote load after another.
    cluster.sync();
    if (threadIdx.x < kG) {
      float m = -INFINITY;
      for (int r = 0; r < kCtas; ++r) m = fmaxf(m, *cluster.map_shared_rank(&cta_max[threadIdx.x], r));
      gmax[threadIdx.x] = m;
    }
  }
  __syncthreads();
  mark(3);
  for (int i = threadIdx.x; i < kG * n; i += kThreads) {
    const int g = i / n, j = i % n;
    x[g][j] = sel[j] ? 0.0f : fast_exp2(x[g][j] - gmax[g]);
  }
  __syncthreads();
  if constexpr (V == 1) {
    float acc[kG][4] = {};
    for (int j0 = warp * 4; j0 < n; j0 += kWarps * 4) {
      uint2 vv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (j0 + u < n && !sel[j0 + u]) vv[u] = *reinterpret_cast<const uint2*>(vc + size_t(j0 + u) * kD + lane * 4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (j0 + u >= n || sel[j0 + u]) continue;
        float v4[4];
        bf16x4(vv[u], v4);
#pragma unroll
        for (int g = 0; g < kG; ++g)
#pragma unroll
          for (int t = 0; t < 4; ++t) acc[g][t] += x[g][j0 + u] * v4[t];
      }
    }
#pragma unroll
    for (int g = 0; g < kG; ++g)
#pragma unroll
      for (int t = 0; t < 4; ++t) part[warp][g][lane * 4 + t] = acc[g][t];
  } else {
    // One thread per (head pair, dimension); the values' rows are in shared memory. Each
    // thread's sum goes to part[0..1]: the reduction below then adds zeros for warps 2..7.
    const int d = threadIdx.x % kD, g0 = 2 * (threadIdx.x / kD);
    float s0 = 0, s1 = 0;
    const uint8_t* vrow = staged + size_t(n) * kRowStride + d * 2;
    for (int j = 0; j < n; ++j) {
      const float v = __uint_as_float(uint32_t(*reinterpret_cast<const uint16_t*>(vrow + size_t(j) * kRowStride)) << 16);
      s0 += x[g0][j] * v, s1 += x[g0 + 1][j] * v;
    }
    for (int w = 0; w < kWarps; ++w) part[w][g0][d] = part[w][g0 + 1][d] = 0.0f;
    part[0][g0][d] = s0, part[0][g0 + 1][d] = s1;
  }
  __syncthreads();
  // The CTA's far state: m = the cluster's max, l = sum of its weights, o = sum over warps.
  for (int i = threadIdx.x; i < kG * kD; i += kThreads) {
    const int g = i / kD, d = i % kD;
    float s = 0;
    for (int w = 0; w < kWarps; ++w) s += part[w][g][d];
    st.o[g][d] = s;
  }
  if (warp < kG) {
    float l = 0;
    for (int j = lane; j < n; j += 32) l += x[warp][j];
    l = warp_sum(l);
    if (lane == 0) st.m[warp] = gmax[warp], st.l[warp] = l;
  }

  mark(4);
  // 4. The exact rows: per warp, then merged into the CTA's state.
  {
    bool has[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) has[i] = i < nrows;
    const float no_bias[kG] = {};
    float m[kG], l[kG], acc[kG][4];
    warp_rows_state(kr, vr, has, qr, no_bias, m, l, acc);
    __syncthreads();  // the far state's reads of part[] are done
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int t = 0; t < 4; ++t) part[warp][g][lane * 4 + t] = acc[g][t];
      if (lane == 0) wm[warp][g] = m[g], wl[warp][g] = l[g];
    }
  }
  __syncthreads();
  // Per head: the new maximum and each part's factor (far field, then each warp; 0 for a
  // warp without rows), then the CTA's state rescaled once.
  __shared__ float factor[kWarps + 1][kG];
  if (threadIdx.x < kG) merge_factors(st, wm, wl, factor, threadIdx.x);
  __syncthreads();
  for (int i = threadIdx.x; i < kG * kD; i += kThreads) {
    const int g = i / kD, d = i % kD;
    float o = st.o[g][d] * factor[0][g];
    for (int w = 0; w < kWarps; ++w) o += part[w][g][d] * factor[w + 1][g];
    st.o[g][d] = o;
  }

  mark(5);
  // 5. The cluster's states merged.
  if constexpr (V >= 3) {
    // Push: each CTA stores its state into CTA 0's gather area, then CTA 0 merges locally;
    // nothing of another CTA is read after the barrier.
    State* gather = reinterpret_cast<State*>(staged + size_t(2) * ((a.clusters + kCtas - 1) / kCtas) * kRowStride);
    __syncthreads();
    const float* mine = reinterpret_cast<const float*>(&st);
    float* theirs = reinterpret_cast<float*>(cluster.map_shared_rank(gather + rank, 0));
    for (int i = threadIdx.x; i < int(sizeof(State) / 4); i += kThreads) theirs[i] = mine[i];
    cluster.sync();
    if (rank == 0)
      write_merged_states([&](int r, int i) { return reinterpret_cast<const float*>(gather + r)[i]; },
                          a.out + size_t(e) * kG * kD);
    __syncthreads();
    mark(6);
  } else {
    // Pull: every CTA reads the cluster's states through DSMEM and writes 1/16 of the output.
    pull_merged_states(cluster, st, a.out + size_t(e) * kG * kD, [&] { mark(6); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int tokens = argc > 1 ? std::atoi(argv[1]) : 32768;
  const int runs = argc > 2 ? std::max(3, std::atoi(argv[2])) : 41;
  const bool profile = argc > 3 && std::atoi(argv[3]) != 0;
  const int clusters = (tokens - kSinks - kWindow) / kClusterTokens;
  if (tokens % kPage || clusters < kSelected || (clusters + kCtas - 1) / kCtas > kMaxLocal) {
    std::fprintf(stderr, "context %d: must be a multiple of %d with %d..%d clusters\n", tokens, kPage, kSelected,
                 kMaxLocal * kCtas);
    return 2;
  }
  // Clustered tokens [kSinks, kSinks + clusters * 16); the few left before the window join
  // neither (they stand for the open block).
  std::mt19937_64 rng(7);
  const StepData data(tokens, rng);
  const std::vector<uint16_t>&kcache = data.kcache, &vcache = data.vcache;
  const std::vector<float>& q = data.q;
  std::vector<int32_t> members(size_t(kEntries) * clusters * kClusterTokens), sel_list(size_t(kEntries) * kSelected);
  std::vector<uint8_t> selected(size_t(kEntries) * clusters, 0);
  std::vector<uint16_t> key_c(size_t(kEntries) * clusters * kD), value_c(key_c.size());
  std::vector<float> log2_size(size_t(kEntries) * clusters, std::log2(float(kClusterTokens)));
  const auto kv_at = [&](const std::vector<uint16_t>& cache, int e, int pos, int d) { return data.at(cache, e, pos, d); };
  for (int e = 0; e < kEntries; ++e) {
    std::vector<int32_t> perm(size_t(clusters) * kClusterTokens);
    std::iota(perm.begin(), perm.end(), kSinks);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (size_t i = 0; i < perm.size(); ++i) members[size_t(e) * perm.size() + i] = perm[i];
    for (int c = 0; c < clusters; ++c)
      for (int d = 0; d < kD; ++d) {
        double ks = 0, vs = 0;
        for (int t = 0; t < kClusterTokens; ++t) {
          const int pos = perm[size_t(c) * kClusterTokens + t];
          ks += kv_at(kcache, e, pos, d), vs += kv_at(vcache, e, pos, d);
        }
        key_c[(size_t(e) * clusters + c) * kD + d] = to_bf16(float(ks / kClusterTokens));
        value_c[(size_t(e) * clusters + c) * kD + d] = to_bf16(float(vs / kClusterTokens));
      }
    for (int k = 0; k < kSelected; ++k) {
      int c;
      do c = int(rng() % uint64_t(clusters));
      while (selected[size_t(e) * clusters + c]);
      selected[size_t(e) * clusters + c] = 1;
      sel_list[size_t(e) * kSelected + k] = c;
    }
  }

  Args a{};
  a.q = upload(q), a.key_c = upload(key_c), a.value_c = upload(value_c), a.log2_size = upload(log2_size);
  a.selected = upload(selected), a.sel_list = upload(sel_list), a.members = upload(members);
  a.page_table = upload(data.page_table), a.k_cache = upload(kcache), a.v_cache = upload(vcache);
  float* out = nullptr;
  LAB_CHECK(cudaMalloc(&out, q.size() * sizeof(float)));
  a.out = out, a.clusters = clusters, a.tokens = tokens;

  // The host reference, f64: softmax over the exact rows and the unselected centroids (each
  // standing for its 16 members: weight 16 e^(q.c)). ref: [E, G, D]
  std::vector<double> ref(q.size());
  for (int e = 0; e < kEntries; ++e) {
    std::vector<int> rows;
    for (int j = 0; j < kSinks; ++j) rows.push_back(j);
    for (int k = 0; k < kSelected * kClusterTokens; ++k)
      rows.push_back(members[(size_t(e) * clusters + sel_list[size_t(e) * kSelected + k / kClusterTokens]) *
                                 kClusterTokens + k % kClusterTokens]);
    for (int j = 0; j < kWindow; ++j) rows.push_back(tokens - kWindow + j);
    for (int g = 0; g < kG; ++g) {
      const float* qg = q.data() + (size_t(e) * kG + g) * kD;
      std::vector<double> o(kD, 0.0), logit;
      std::vector<std::vector<double>> value;
      double mx = -1e300;
      for (int pos : rows) {
        double dot = 0;
        std::vector<double> v(kD);
        for (int d = 0; d < kD; ++d) dot += double(qg[d]) * kv_at(kcache, e, pos, d), v[d] = kv_at(vcache, e, pos, d);
        logit.push_back(dot), value.push_back(v), mx = std::max(mx, dot);
      }
      for (int c = 0; c < clusters; ++c) {
        if (selected[size_t(e) * clusters + c]) continue;
        double dot = 0;
        std::vector<double> v(kD);
        for (int d = 0; d < kD; ++d) {
          dot += double(qg[d]) * from_bf16(key_c[(size_t(e) * clusters + c) * kD + d]);
          v[d] = from_bf16(value_c[(size_t(e) * clusters + c) * kD + d]);
        }
        logit.push_back(dot + std::log2(double(kClusterTokens))), value.push_back(v), mx = std::max(mx, logit.back());
      }
      double l = 0;
      for (size_t i = 0; i < logit.size(); ++i) {
        const double p = std::exp2(logit[i] - mx);
        l += p;
        for (int d = 0; d < kD; ++d) o[d] += p * value[i][d];
      }
      for (int d = 0; d < kD; ++d) ref[(size_t(e) * kG + g) * kD + d] = o[d] / l;
    }
  }

  lab::FlushedTimer timer;
  const cudaStream_t s = timer.stream();
  long long* prof = nullptr;
  LAB_CHECK(cudaMalloc(&prof, size_t(kEntries) * kCtas * kMarks * sizeof(long long)));
  const int per = (clusters + kCtas - 1) / kCtas;
  const double mb = (double(key_c.size() + value_c.size()) * 2 + double(kEntries) * kExact * kD * 4) / 1e6;
  std::printf("context %d: %d clusters per entry, %d entries x %d CTAs, %.1f MB of centroids and rows\n", tokens,
              clusters, kEntries, kCtas, mb);
  int failed = 0;
  const auto run = [&]<int V>() {
    const size_t smem = V >= 2 ? size_t(2) * per * kRowStride + (V >= 3 ? kCtas * sizeof(State) : 0) : 0;
    if (V >= 2 && per > kMaxStaged) {
      std::printf("variant %d: %d centroids per CTA, over the %d it stages: not run\n", V, per, kMaxStaged);
      return;
    }
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = step_config(fused_step_kernel<V>, attr, s, smem);
    LAB_CHECK(cudaMemsetAsync(out, 0xff, q.size() * sizeof(float), s));  // poison
    LAB_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel<V>, a));
    LAB_CHECK(cudaStreamSynchronize(s));
    const double worst = worst_row_error(out, ref);
    const bool ok = worst < 1e-4;
    failed += !ok;
    // Time: graph replay after a memset flush, as the bench; the first 3 runs warm up.
    const lab::Graph g([&](cudaStream_t st) { LAB_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel<V>, a)); }, s);
    std::vector<double> us;
    for (int i = 0; i < runs + 3; ++i) {
      const double t = timer.run_us(g, true, i);
      if (i >= 3) us.push_back(t);
    }
    const auto [lo, hi] = std::minmax_element(us.begin(), us.end());
    std::printf("variant %d: worst relative L2 error %.2e (%s); median %.2f us (min %.2f, max %.2f)\n", V, worst,
                ok ? "ok" : "WRONG", lab::median(us), *lo, *hi);
    if (profile) {
      // One more flushed launch with the marks on: mean over CTAs of each phase, the slowest
      // CTA's whole span, and the span from the first CTA's start to the last one's end.
      Args pa = a;
      pa.prof = prof;
      timer.flush(0x5a);
      LAB_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel<V>, pa));
      LAB_CHECK(cudaStreamSynchronize(s));
      std::vector<long long> marks(size_t(kEntries) * kCtas * kMarks);
      LAB_CHECK(cudaMemcpy(marks.data(), prof, marks.size() * sizeof(long long), cudaMemcpyDeviceToHost));
      print_phase_profile(marks, kEntries * kCtas,
                          {"", "row loads issued", "scores", "cluster max", "far field", "exact rows", "states merged"});
    }
  };
  run.template operator()<1>();
  run.template operator()<2>();
  run.template operator()<3>();
  return failed ? 1 : 0;
}
