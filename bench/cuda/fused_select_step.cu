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
//      state, and the merge of the cluster's 16 states (DSMEM; each CTA 1/16 of the output).
// The host checks the selection against the greedy rule in f64 (a difference is reported with
// its importance gap: f32 near-ties may order differently) and the output against an f64
// computation over the kernel's own selection. Timed as the bench times a step (graph replay,
// 256 MiB memset flush before each run, median).
// Usage: lab_fused_select_step [context tokens, default 32768] [runs, default 41] [1: phase profile]
//                              [first radix pass's buckets, default 255] [1: clusters of 16 tokens].
// H200, session H24, 32K (2039 clusters, ~72 picks an entry, ~70 of them at once): select 1
// 81-83 us (its ~73 rounds take ~40 us), select 2 28.9 us; the same call's cuDNN decode 50.6-
// 52.2 us, the library's three-kernel step 47.6-47.8 (one level: 43.1-43.3), item 33's step
// without a selection 20.7-20.9. Session H25, 2^x by ex2.approx instead of exp2f (item 35):
// select 2 27.7-28.2 us beside cuDNN's 49.7-51.1.
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
constexpr int kMaxClusters = kCtas * kMaxPerCta;               // 2048 (= kKeyIndexLimit)
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

template <int Select>
__global__ void __launch_bounds__(kThreads, 2) fused_select_step_kernel(const Args a) {
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), e = blockIdx.x / kCtas;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int C = a.clusters;
  const PhaseMarks mark{a.prof, kMarks};
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
  __shared__ QueryParts qparts;
  __shared__ State st;
  __shared__ float red[kWarps][kG], red_z[kWarps][kG], gmax[kG], gzinv[kG];
  __shared__ Greedy<kMaxClusters> gs;
  __shared__ StateScratch sc;

  const uint16_t* kc = a.key_c + (size_t(e) * C + c0) * kD;
  const uint16_t* vc = a.value_c + (size_t(e) * C + c0) * kD;
  const uint16_t* sizes = a.size + size_t(e) * C;
  const int32_t* member_off = a.member_off + size_t(e) * C;
  const int32_t* members = a.members + size_t(e) * a.members_per_entry;

  // 1. Key centroids staged; this thread's clusters of the selection (j = tid + 256 r) and
  //    their sizes and member offsets; the fixed rows' K/V loads issued.
  stage_rows(staged, kc, n_local);
  int own_n[kOwned], own_off[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = tid + r * kThreads;
    own_n[r] = j < C ? int(sizes[j]) : 0;
    own_off[r] = j < C ? member_off[j] : 0;
  }
  const int local_n = tid < n_local ? int(sizes[c0 + tid]) : 0;  // far field: size of local cluster tid
  if (tid < kMaxClusters / 32) gs.selected_bits[tid] = 0;
  float qr[kG][4];
  load_queries(a.q + size_t(e) * kG * kD, qparts, qr);
  // Row j of the entry's exact list: [0, 16) sinks, [16, 144) the window, then the selected
  // clusters' members in pick order. Row j goes to CTA j % 16, warp (j / 16) % 8, slot j / 128.
  uint2 kr[kSlots], vr[kSlots];
  bool has_row[kSlots];
  const auto load_row = [&](int i, int pos) {
    load_kv_row(a.page_table, a.k_cache, a.v_cache, e, pos, kr[i], vr[i]);
    has_row[i] = true;
  };
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    has_row[i] = false;
    const int j = rank + kCtas * (warp + kWarps * i);
    if (const int pos = fixed_row_position(j, a.tokens); pos >= 0) load_row(i, pos);
  }

  // 2. Logits of the local slice into the local xall, then pushed to every other CTA.
  score_and_push_slice(cluster, staged, n_local, qparts, xall, c0, vc);
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
    own_max_sum(own_x, own_n, m, z);
    block_max_sum(m, z, red, red_z, gmax, gzinv);
  }
  mark(3);

  // 4. The greedy rule (cuda/cluster_greedy.cuh): select 1 takes each pick in a round, select 2 first
  //    takes at once every cluster above the first one the walk skips.
  unsigned long long key[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    key[r] = own_n[r] > 0 ? pick_key(importance(own_x[r], gmax, gzinv), tid + r * kThreads, own_n[r]) : 0ull;
  }
  greedy_select<Select >= 2>(key, own_off, kBudget, a.window, gs, [&] { mark(4); }, [&] { mark(5); });
  const int picks = gs.n_picks;
  if (rank == 0) {
    int32_t* out_picks = a.picks + size_t(e) * (2 + kBudget);
    if (tid == 0) out_picks[0] = picks, out_picks[1] = gs.prefix_picks;
    for (int k = tid; k < picks; k += kThreads) out_picks[2 + k] = gs.pick_j[k];
  }
  mark(6);

  // 5. This warp's selected rows: member list, page table, then K and V.
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int pos = gs.row_position(rank + kCtas * (warp + kWarps * i) - kFixedRows, members);
    if (pos >= 0) load_row(i, pos);
  }
  mark(7);

  // 6. Far field over the unselected local clusters: weights n 2^(x - M) in xall's local slice.
  if (tid < n_local) xall[c0 + tid] = far_weights(xall[c0 + tid], local_n, gs.selected(c0 + tid), gmax);
  multipole::cuda::detail::cp_async_wait<0>();
  __syncthreads();
  far_field_staged(staged, xall + c0, n_local, st);  // weights relative to gmax
  mark(8);

  // 7. The exact rows per warp (logits relative to gmax like the far field's), then the CTA's state.
  {
    float m[kG], l[kG], acc[kG][4];
    warp_rows_state(kr, vr, has_row, qr, gmax, m, l, acc);
    const int fd = tid % kD, fg = 2 * (tid / kD);  // one thread per (head pair, dimension)
    join_cta_state(st, m, l, acc, fd, fg, part, sc);
  }
  mark(9);

  // 8. The cluster's states merged through DSMEM, each CTA 1/16 of the output.
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
    want[size_t(e)] = greedy_f64(imp[size_t(e)], std::vector<int>(size.begin() + ptrdiff_t(size_t(e) * clusters),
                                                                 size.begin() + ptrdiff_t(size_t(e + 1) * clusters)),
                                 kBudget);
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
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = step_config(kernel, attr, s, smem);
    const int fit = clusters_at_once(kernel, cfg);
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
      const int verdict = compare_selection("the", e, got, want[size_t(e)], imp[size_t(e)]);
      wrong += verdict == 2, near_ties += verdict == 1;
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
    const std::vector<double> us = time_flushed(timer, graph, runs);
    const auto [lo, hi] = std::minmax_element(us.begin(), us.end());
    std::printf("select %d: one-launch step with its selection, median %.2f us (min %.2f, max %.2f)\n", Select,
                lab::median(us), *lo, *hi);
    if (profile)
      profile_launch(timer, kEntries * kCtas,
                     {"", "logits pushed", "cluster barrier", "normalisers", "radix passes", "taken at once", "rounds",
                      "selected rows issued", "far field", "exact rows", "states merged"},
                     [&](long long* prof) {
                       Args pa = a;
                       pa.prof = prof;
                       LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, pa));
                     });
  };
  run.template operator()<1>();
  run.template operator()<2>();
  return failed ? 1 : 0;
}
