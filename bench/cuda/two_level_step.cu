// Kernel lab: a batch-1 multipole step over a two-level index in one launch (gpu-notes item 35).
//
// Item 34 selected over one level of at most 2048 clusters: 32K tokens. At 128K one level has
// 8K clusters, so the library scores a coarse level (one centroid per ~64 tokens) first and
// only the children of the selected coarse clusters after it. Here that rule runs in one
// launch: one 16-CTA cluster per entry (KV head; 8 entries, Qwen3-8B's at batch 1), G = 4,
// d = 128, bf16, fine clusters of 8..24 tokens, coarse clusters of consecutive fine ones up
// to >= 64 tokens (the bench's synthetic index), budgets 128 (fine) and 2048 (coarse):
//   1. each CTA stages its slice of the coarse key centroids, scores it and pushes the logits
//      into every CTA of the cluster (one cluster barrier), then stages its value centroids;
//   2. every CTA runs the same coarse selection (per-head normalisers, importances, greedy
//      rule under 2048 tokens: cuda/cluster_greedy.cuh) and lists the same candidates, the children of
//      the selected coarse clusters in ascending order;
//   3. each warp scores its share of the candidates from global memory, keeps their key and
//      value rows in registers and pushes their logits into every CTA (a second barrier);
//   4. every CTA normalises over the frontier (unselected coarse clusters and all candidates)
//      and runs the same fine selection under 128 tokens;
//   5. the selected clusters' rows (member list, page table, K/V), the far field over the
//      CTA's unselected coarse centroids (staged) and its warps' unselected candidates
//      (pseudo-rows with a log-size lift), the exact rows, and the merge of the 16 states (each
//      CTA 1/16 of the output, as the library's pull_merged_states since H31).
// The host checks both selections against the rule in f64 and the output against an f64
// computation over the kernel's own selections. Timed as the bench times a step (graph replay,
// 256 MiB memset flush before each run, median).
// Usage: lab_two_level_step [context tokens, default 131072] [runs, default 41] [1: phase profile]
// H200, session H25: 37.3-37.6 us at 128K and 31.2-31.4 us at 32K, against cuDNN's 136.8-137.1
// and 49.7-51.1 and the library's three-kernel step's 62.7-62.8 and 48.0-48.1 in the same call.
// With exp2f for 2^x instead of ex2.approx the kernel was 49-52 us at 128K: its code (192 KB)
// came from DRAM after the flush as it ran (Nsight Compute: a third of the stall samples were
// "no instruction").
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <numeric>
#include <random>
#include <vector>

#include "step_lab.cuh"

namespace cg = cooperative_groups;

namespace {

using namespace step_lab;

constexpr int kBudget = 128, kCoarseBudget = 16 * kBudget;  // tokens per entry
constexpr int kMaxCoarse = 2048;                             // coarse clusters per entry (128 a CTA)
constexpr int kOwned = kMaxCoarse / kThreads;                // coarse clusters per thread in the selection
constexpr int kRun = kMaxCoarse / kThreads;                  // consecutive coarse clusters per thread when listing
constexpr int kMaxCand = 512;                                // candidates per entry
constexpr int kOwnedCand = kMaxCand / kThreads;              // candidates per thread in the fine selection
constexpr int kCandSlots = kMaxCand / (kCtas * kWarps);      // candidates per warp
constexpr int kFixedRows = kSinks + kWindow;
constexpr int kSlots = (kFixedRows + kBudget + kWarps * kCtas - 1) / (kWarps * kCtas);  // exact rows per warp
constexpr int kMinCoarseTokens = 64, kMinFine = 8, kMaxFine = 24;
// Marks (%globaltimer of thread 0 of each CTA): entry, coarse logits pushed, cluster barrier,
// coarse normalisers, coarse selection, candidates listed, candidates scored and pushed, second
// barrier, frontier terms, frontier normalisers, fine selection, selected rows issued, far field,
// exact rows' states, exact rows joined, merged.
constexpr int kMarks = 16;

struct Args {
  const float* q;                // [E, G, D] queries, pre-scaled by softmax scale * log2(e)
  const uint16_t* coarse_key;    // [E, Cmax, D] bf16 coarse key centroids
  const uint16_t* coarse_value;  // [E, Cmax, D] bf16
  const uint16_t* coarse_size;   // [E, Cmax] tokens under each coarse cluster
  const int32_t* coarse_child;   // [E, Cmax + 1] first fine child of each coarse cluster (children are consecutive)
  const uint16_t* fine_key;      // [E, Fmax, D] bf16 fine key centroids
  const uint16_t* fine_value;    // [E, Fmax, D] bf16
  const uint16_t* fine_size;     // [E, Fmax] members of each fine cluster (>= 1)
  const int32_t* member_off;     // [E, Fmax] first member of each fine cluster in members
  const int32_t* members;        // [E, L] token positions, fine cluster after fine cluster
  const int32_t* coarse_count;   // [E] coarse clusters of each entry (<= Cmax)
  const int32_t* page_table;     // [N / 16] page of each 16 positions
  const uint16_t* k_cache;       // [pages, E, 16, D] bf16
  const uint16_t* v_cache;       // [pages, E, 16, D] bf16
  float* out;                    // [E, G, D]
  int32_t* picks;                // [E, 4 + 2 kMaxPicks]: coarse picks, candidates, fine picks, fine picks at once,
                                 // then the coarse clusters picked, then the fine clusters picked
  long long* prof;               // [E * kCtas, kMarks] or null
  int cmax, fmax, members_per_entry, tokens;
};

__global__ void __launch_bounds__(kThreads, 2) two_level_step_kernel(const Args a) {
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), e = blockIdx.x / kCtas;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = a.coarse_count[e];
  const PhaseMarks mark{a.prof, kMarks};
  mark(0);
  // Every CTA of the cluster must have started before another stores into its shared memory.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  // Dynamic: [cmax / 16] staged rows (coarse keys, then values, then the warps' partial sums),
  // [kMaxCoarse] float4 coarse logits, [kMaxCand] float4 candidate logits. The same layout in
  // every CTA of a cluster: the pushes address the others' copies by the local offsets.
  extern __shared__ __align__(16) uint8_t smem[];
  const int per_max = (a.cmax + kCtas - 1) / kCtas;
  const int per = (C + kCtas - 1) / kCtas, c0 = rank * per;
  const int n_local = max(0, min(per, C - c0));
  uint8_t* staged = smem;
  float4* xall = reinterpret_cast<float4*>(smem + size_t(per_max) * kRowStride);
  float4* xcand = xall + kMaxCoarse;
  float(*part)[kG][kD] = reinterpret_cast<float(*)[kG][kD]>(smem);  // after the far field
  __shared__ QueryParts qparts;
  __shared__ State st;
  __shared__ float red[kWarps][kG], red_z[kWarps][kG], gmax[kG], gzinv[kG];
  __shared__ Greedy<kMaxCoarse> coarse_sel;
  __shared__ Greedy<kMaxCand> fine_sel;
  __shared__ int cand_fine[kMaxCand], warp_total[kWarps];
  __shared__ StateScratch sc;

  const size_t ce = size_t(e) * a.cmax, fe = size_t(e) * a.fmax;
  const uint16_t* csize = a.coarse_size + ce;
  const int32_t* child = a.coarse_child + size_t(e) * (a.cmax + 1);
  const int32_t* members = a.members + size_t(e) * a.members_per_entry;

  // 1. Coarse key slice staged; this thread's coarse clusters of the selection (j = tid + 256 r)
  //    and of the candidate listing (j = 8 tid + i: their child ranges); the fixed rows issued.
  stage_rows(staged, a.coarse_key + (ce + c0) * kD, n_local);
  int own_n[kOwned], no_payload[kOwned];
#pragma unroll
  for (int r = 0; r < kOwned; ++r) {
    const int j = tid + r * kThreads;
    own_n[r] = j < C ? int(csize[j]) : 0, no_payload[r] = 0;
  }
  int run_child[kRun + 1];
#pragma unroll
  for (int i = 0; i <= kRun; ++i) run_child[i] = child[min(kRun * tid + i, C)];
  const int local_n = tid < n_local ? int(csize[c0 + tid]) : 0;  // far field: size of local coarse cluster tid
  if (tid < kMaxCoarse / 32) coarse_sel.selected_bits[tid] = 0;
  if (tid < kMaxCand / 32) fine_sel.selected_bits[tid] = 0;
  float qr[kG][4];
  load_queries(a.q + size_t(e) * kG * kD, qparts, qr);
  // The warp's rows: slots [0, kSlots) exact rows (row j of the entry's list, sinks, window,
  // then the selected fine clusters' members in pick order, goes to CTA j % 16, warp (j / 16)
  // % 8, slot j / 128); slots [kSlots, +kCandSlots) candidates (candidate k to CTA k % 16,
  // warp (k / 16) % 8, slot k / 128), pseudo-rows of the far field unless selected.
  constexpr int kAll = kSlots + kCandSlots;
  uint2 kr[kAll], vr[kAll];
  bool has_row[kAll];
  float lift[kAll];
  const auto load_row = [&](int i, int pos) {
    load_kv_row(a.page_table, a.k_cache, a.v_cache, e, pos, kr[i], vr[i]);
    has_row[i] = true;
  };
#pragma unroll
  for (int i = 0; i < kAll; ++i) {
    has_row[i] = false, lift[i] = 0;
    const int j = rank + kCtas * (warp + kWarps * i);
    if (i >= kSlots) continue;
    if (const int pos = fixed_row_position(j, a.tokens); pos >= 0) load_row(i, pos);
  }

  // 2. Coarse logits of the local slice, pushed to every other CTA; the value slice staged.
  score_and_push_slice(cluster, staged, n_local, qparts, xall, c0, a.coarse_value + (ce + c0) * kD);
  mark(1);
  cluster.sync();
  mark(2);

  // 3. Coarse normalisers Z_g = sum_j n_j 2^(x_gj - M_g), importances, the greedy rule under
  //    the coarse budget.
  // (own_x is read again from xall in step 6 rather than kept in registers through step 5.)
  const auto coarse_x = [&](int r) {
    const int j = tid + r * kThreads;
    return j < C ? xall[j] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
  };
  {
    float4 own_x[kOwned];
    float m[kG], z[kG];
#pragma unroll
    for (int r = 0; r < kOwned; ++r) own_x[r] = coarse_x(r);
    own_max_sum(own_x, own_n, m, z);
    block_max_sum(m, z, red, red_z, gmax, gzinv);
  }
  mark(3);
  {
    unsigned long long key[kOwned];
#pragma unroll
    for (int r = 0; r < kOwned; ++r) {
      key[r] = own_n[r] > 0 ? pick_key(importance(coarse_x(r), gmax, gzinv), tid + r * kThreads, own_n[r]) : 0ull;
    }
    greedy_select<true>(key, no_payload, kCoarseBudget, 255, coarse_sel, [] {}, [] {});
  }
  mark(4);

  // 4. Candidates: the children of the selected coarse clusters in ascending order (thread t
  //    lists those of coarse clusters [8 t, 8 t + 8)).
  int n_cand = 0;
  {
    int count = 0;
#pragma unroll
    for (int i = 0; i < kRun; ++i)
      if (kRun * tid + i < C && coarse_sel.selected(kRun * tid + i)) count += run_child[i + 1] - run_child[i];
    const int inc = multipole::cuda::detail::warp_inclusive_sum(count);
    if (lane == 31) warp_total[warp] = inc;
    __syncthreads();
    int k = inc - count;
    for (int w = 0; w < kWarps; ++w) k += w < warp ? warp_total[w] : 0, n_cand += warp_total[w];
#pragma unroll
    for (int i = 0; i < kRun; ++i)
      if (kRun * tid + i < C && coarse_sel.selected(kRun * tid + i))
        for (int f = run_child[i]; f < run_child[i + 1]; ++f, ++k)
          if (k < kMaxCand) cand_fine[k] = f;
    // More candidates than kMaxCand are dropped (the host then reports a wrong selection).
    n_cand = min(n_cand, kMaxCand);
    __syncthreads();
  }
  int cand_n[kOwnedCand], cand_off[kOwnedCand];
#pragma unroll
  for (int r = 0; r < kOwnedCand; ++r) {
    const int k = tid + r * kThreads;
    cand_n[r] = k < n_cand ? int(a.fine_size[fe + cand_fine[k]]) : 0;
    cand_off[r] = k < n_cand ? a.member_off[fe + cand_fine[k]] : 0;
  }
  mark(5);

  // 5. This warp's candidates: key and value rows into registers, logits pushed into every CTA
  //    (lane r < 16 stores into CTA r).
#pragma unroll
  for (int i = kSlots; i < kAll; ++i) {
    const int k = rank + kCtas * (warp + kWarps * (i - kSlots));
    if (k >= n_cand) continue;
    const size_t row = (fe + size_t(cand_fine[k])) * kD + lane * 4;
    kr[i] = *reinterpret_cast<const uint2*>(a.fine_key + row);
    vr[i] = *reinterpret_cast<const uint2*>(a.fine_value + row);
    lift[i] = log2f(float(a.fine_size[fe + cand_fine[k]]));
  }
#pragma unroll
  for (int i = kSlots; i < kAll; ++i) {
    const int k = rank + kCtas * (warp + kWarps * (i - kSlots));
    if (k >= n_cand) continue;
    float k4[4], x[kG];
    bf16x4(kr[i], k4);
    warp_dots(qr, k4, x);
    if (lane < kCtas) *cluster.map_shared_rank(&xcand[k], lane) = make_float4(x[0], x[1], x[2], x[3]);
  }
  mark(6);
  cluster.sync();
  mark(7);

  // 6. Normalisers over the frontier: the unselected coarse clusters and every candidate, then
  //    the candidates' importances and the greedy rule under the budget.
  float4 cand_x[kOwnedCand];
  {
    float4 own_x[kOwned];
    float m[kG], z[kG];
#pragma unroll
    for (int r = 0; r < kOwnedCand; ++r) {
      const int k = tid + r * kThreads;
      cand_x[r] = k < n_cand ? xcand[k] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
    int unselected_n[kOwned];
#pragma unroll
    for (int r = 0; r < kOwned; ++r)
      own_x[r] = coarse_x(r), unselected_n[r] = coarse_sel.selected(tid + r * kThreads) ? 0 : own_n[r];
    own_max_sum(own_x, unselected_n, m, z);
    float cm[kG], cz[kG];
    own_max_sum(cand_x, cand_n, cm, cz);
#pragma unroll
    for (int g = 0; g < kG; ++g) merge_max_sum(m[g], z[g], cm[g], cz[g]);
    mark(8);
    block_max_sum(m, z, red, red_z, gmax, gzinv);  // gmax: the frontier's maximum, every weight's reference from here
  }
  mark(9);
  {
    unsigned long long key[kOwnedCand];
#pragma unroll
    for (int r = 0; r < kOwnedCand; ++r) {
      key[r] = cand_n[r] > 0 ? pick_key(importance(cand_x[r], gmax, gzinv), tid + r * kThreads, cand_n[r]) : 0ull;
    }
    greedy_select<true>(key, cand_off, kBudget, 255, fine_sel, [] {}, [] {});
  }
  const int picks = fine_sel.n_picks;
  if (rank == 0) {
    int32_t* out = a.picks + size_t(e) * (4 + 2 * kMaxPicks);
    if (tid == 0)
      out[0] = coarse_sel.n_picks, out[1] = n_cand, out[2] = picks, out[3] = fine_sel.prefix_picks;
    for (int k = tid; k < coarse_sel.n_picks; k += kThreads) out[4 + k] = coarse_sel.pick_j[k];
    for (int k = tid; k < picks; k += kThreads) out[4 + kMaxPicks + k] = cand_fine[fine_sel.pick_j[k]];
  }
  mark(10);

  // 7. This warp's selected rows (member list, page table, then K and V); its candidates that
  //    were not selected stay as pseudo-rows.
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int pos = fine_sel.row_position(rank + kCtas * (warp + kWarps * i) - kFixedRows, members);
    if (pos >= 0) load_row(i, pos);
  }
#pragma unroll
  for (int i = kSlots; i < kAll; ++i) {
    const int k = rank + kCtas * (warp + kWarps * (i - kSlots));
    has_row[i] = k < n_cand && !fine_sel.selected(k);
  }
  mark(11);

  // 8. Far field over the unselected local coarse clusters: weights n 2^(x - M) in xall's slice.
  if (tid < n_local) xall[c0 + tid] = far_weights(xall[c0 + tid], local_n, coarse_sel.selected(c0 + tid), gmax);
  multipole::cuda::detail::cp_async_wait<0>();
  __syncthreads();
  far_field_staged(staged, xall + c0, n_local, st);
  mark(12);

  // 9. The exact rows and the candidates' pseudo-rows per warp (logits relative to gmax), then
  //    the CTA's state; the cluster's states merged through DSMEM (each CTA 1/16 of the output).
  {
    float m[kG], l[kG], acc[kG][4];
    warp_rows_state(kr, vr, has_row, qr, gmax, m, l, acc, lift);
    mark(13);
    const int fd = tid % kD, fg = 2 * (tid / kD);  // one thread per (head pair, dimension)
    join_cta_state(st, m, l, acc, fd, fg, part, sc);
  }
  mark(14);
  pull_merged_states(cluster, st, a.out + size_t(e) * kG * kD, [&] { mark(15); });
}

// One entry's two-level index over the clustered positions [kSinks, kSinks + L): fine
// clusters of kMinFine..kMaxFine tokens (the last may be smaller), coarse clusters of
// consecutive fine ones until >= kMinCoarseTokens tokens, members a random permutation.
struct EntryIndex {
  std::vector<int> fine_size, member_off, coarse_size, coarse_child, members;
};

EntryIndex make_index(int L, std::mt19937_64& rng) {
  EntryIndex x;
  std::uniform_int_distribution<int> fine(kMinFine, kMaxFine);
  for (int at = 0; at < L;) {
    const int n = std::min(fine(rng), L - at);
    x.member_off.push_back(at), x.fine_size.push_back(n), at += n;
  }
  x.members.resize(size_t(L));
  std::iota(x.members.begin(), x.members.end(), kSinks);
  std::shuffle(x.members.begin(), x.members.end(), rng);
  int under = 0;
  x.coarse_child.push_back(0);
  for (size_t f = 0; f < x.fine_size.size(); ++f) {
    under += x.fine_size[f];
    if (under >= kMinCoarseTokens || f + 1 == x.fine_size.size())
      x.coarse_size.push_back(under), x.coarse_child.push_back(int(f) + 1), under = 0;
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  const int tokens = argc > 1 ? std::atoi(argv[1]) : 131072;
  const int runs = argc > 2 ? std::max(3, std::atoi(argv[2])) : 41;
  const bool profile = argc > 3 && std::atoi(argv[3]) != 0;
  const int L = tokens - kFixedRows;
  if (tokens % kPage || L < kCoarseBudget) {
    std::fprintf(stderr, "context %d: must be a multiple of %d and hold at least %d clustered tokens\n", tokens, kPage,
                 kCoarseBudget);
    return 2;
  }
  std::mt19937_64 rng(11);
  const StepData data(tokens, rng);
  const std::vector<float>& q = data.q;
  std::vector<EntryIndex> index;
  int cmax = 0, fmax = 0;
  for (int e = 0; e < kEntries; ++e) {
    index.push_back(make_index(L, rng));
    cmax = std::max(cmax, int(index.back().coarse_size.size())), fmax = std::max(fmax, int(index.back().fine_size.size()));
  }
  if (cmax > kMaxCoarse) {
    std::fprintf(stderr, "context %d: %d coarse clusters in an entry, over the lab's %d\n", tokens, cmax, kMaxCoarse);
    return 2;
  }
  // Centroids (f64 means of the members, stored as bf16), padded to cmax / fmax per entry.
  std::vector<uint16_t> coarse_key(size_t(kEntries) * cmax * kD), coarse_value(coarse_key.size());
  std::vector<uint16_t> fine_key(size_t(kEntries) * fmax * kD), fine_value(fine_key.size());
  std::vector<uint16_t> coarse_size(size_t(kEntries) * cmax), fine_size(size_t(kEntries) * fmax);
  std::vector<int32_t> coarse_child(size_t(kEntries) * (cmax + 1)), member_off(size_t(kEntries) * fmax),
      members(size_t(kEntries) * L), coarse_count(kEntries);
  for (int e = 0; e < kEntries; ++e) {
    const EntryIndex& x = index[size_t(e)];
    const int C = int(x.coarse_size.size());
    coarse_count[size_t(e)] = C;
    std::copy(x.members.begin(), x.members.end(), members.begin() + ptrdiff_t(size_t(e) * L));
    std::vector<double> ks(kD), vs(kD), cks(kD), cvs(kD);
    for (int c = 0; c < C; ++c) {
      std::fill(cks.begin(), cks.end(), 0.0), std::fill(cvs.begin(), cvs.end(), 0.0);
      for (int f = x.coarse_child[size_t(c)]; f < x.coarse_child[size_t(c) + 1]; ++f) {
        std::fill(ks.begin(), ks.end(), 0.0), std::fill(vs.begin(), vs.end(), 0.0);
        const int n = x.fine_size[size_t(f)];
        for (int t = 0; t < n; ++t) {
          const int pos = x.members[size_t(x.member_off[size_t(f)] + t)];
          for (int d = 0; d < kD; ++d) ks[size_t(d)] += data.at(data.kcache, e, pos, d), vs[size_t(d)] += data.at(data.vcache, e, pos, d);
        }
        for (int d = 0; d < kD; ++d) {
          fine_key[(size_t(e) * fmax + f) * kD + d] = to_bf16(float(ks[size_t(d)] / n));
          fine_value[(size_t(e) * fmax + f) * kD + d] = to_bf16(float(vs[size_t(d)] / n));
          cks[size_t(d)] += ks[size_t(d)], cvs[size_t(d)] += vs[size_t(d)];
        }
        fine_size[size_t(e) * fmax + f] = uint16_t(n), member_off[size_t(e) * fmax + f] = x.member_off[size_t(f)];
      }
      const int n = x.coarse_size[size_t(c)];
      for (int d = 0; d < kD; ++d) {
        coarse_key[(size_t(e) * cmax + c) * kD + d] = to_bf16(float(cks[size_t(d)] / n));
        coarse_value[(size_t(e) * cmax + c) * kD + d] = to_bf16(float(cvs[size_t(d)] / n));
      }
      coarse_size[size_t(e) * cmax + c] = uint16_t(n);
    }
    for (int c = 0; c <= C; ++c) coarse_child[size_t(e) * (cmax + 1) + c] = x.coarse_child[size_t(c)];
  }

  Args a{};
  a.q = upload(q), a.coarse_key = upload(coarse_key), a.coarse_value = upload(coarse_value);
  a.coarse_size = upload(coarse_size), a.coarse_child = upload(coarse_child), a.fine_key = upload(fine_key);
  a.fine_value = upload(fine_value), a.fine_size = upload(fine_size), a.member_off = upload(member_off);
  a.members = upload(members), a.coarse_count = upload(coarse_count), a.page_table = upload(data.page_table);
  a.k_cache = upload(data.kcache), a.v_cache = upload(data.vcache);
  float* out = nullptr;
  int32_t* picks = nullptr;
  const size_t picks_len = size_t(kEntries) * (4 + 2 * kMaxPicks);
  LAB_CHECK(cudaMalloc(&out, q.size() * sizeof(float)));
  LAB_CHECK(cudaMalloc(&picks, picks_len * sizeof(int32_t)));
  a.out = out, a.picks = picks, a.cmax = cmax, a.fmax = fmax, a.members_per_entry = L, a.tokens = tokens;

  // Host: f64 logits of a centroid row for the entry's 4 heads.
  const auto logits = [&](int e, const std::vector<uint16_t>& rows, size_t row) {
    std::array<double, kG> x{};
    for (int g = 0; g < kG; ++g)
      for (int d = 0; d < kD; ++d) x[size_t(g)] += double(q[(size_t(e) * kG + g) * kD + d]) * from_bf16(rows[row * kD + d]);
    return x;
  };
  lab::FlushedTimer timer;
  const cudaStream_t s = timer.stream();
  const int per_max = (cmax + kCtas - 1) / kCtas;
  const size_t smem = std::max(size_t(per_max) * kRowStride, size_t(kWarps) * kG * kD * sizeof(float)) +
                      size_t(kMaxCoarse + kMaxCand) * sizeof(float4);
  std::printf("context %d: per entry up to %d coarse clusters (>= %d tokens) over up to %d fine ones (%d..%d tokens); "
              "%d entries x %d CTAs, %zu B of dynamic shared memory a CTA\n",
              tokens, cmax, kMinCoarseTokens, fmax, kMinFine, kMaxFine, kEntries, kCtas, smem);
  const auto kernel = two_level_step_kernel;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = step_config(kernel, attr, s, smem);
  const int fit = clusters_at_once(kernel, cfg);
  LAB_CHECK(cudaMemsetAsync(out, 0xff, q.size() * sizeof(float), s));  // poison
  LAB_CHECK(cudaMemsetAsync(picks, 0xff, picks_len * sizeof(int32_t), s));
  LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
  LAB_CHECK(cudaStreamSynchronize(s));
  std::vector<int32_t> got(picks_len);
  LAB_CHECK(cudaMemcpy(got.data(), picks, got.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));

  // Each entry: the rule's selections in f64 (the fine one over the kernel's candidates when
  // its coarse selection differs only by a near-tie) and the f64 output over the kernel's own.
  std::vector<double> ref(q.size());
  int wrong = 0, near_ties = 0;
  double sum_coarse = 0, sum_cand = 0, sum_fine = 0, sum_at_once = 0;
  for (int e = 0; e < kEntries; ++e) {
    const EntryIndex& x = index[size_t(e)];
    const int C = int(x.coarse_size.size());
    const int32_t* gp = got.data() + size_t(e) * (4 + 2 * kMaxPicks);
    if (gp[0] < 0 || gp[0] > kMaxPicks || gp[1] < 0 || gp[1] > kMaxCand || gp[2] < 0 || gp[2] > kMaxPicks ||
        gp[3] < 0 || gp[3] > gp[2]) {
      std::printf("  entry %d: counts %d, %d, %d, %d out of range\n", e, gp[0], gp[1], gp[2], gp[3]);
      ++wrong;
      continue;
    }
    sum_coarse += gp[0], sum_cand += gp[1], sum_fine += gp[2], sum_at_once += gp[3];
    const std::vector<int> got_coarse(gp + 4, gp + 4 + gp[0]), got_fine(gp + 4 + kMaxPicks, gp + 4 + kMaxPicks + gp[2]);
    // Coarse level.
    std::vector<std::array<double, kG>> xc(static_cast<size_t>(C));
    std::array<double, kG> M{}, Z{};
    M.fill(-1e300);
    for (int c = 0; c < C; ++c) {
      xc[size_t(c)] = logits(e, coarse_key, size_t(e) * cmax + c);
      for (int g = 0; g < kG; ++g) M[size_t(g)] = std::max(M[size_t(g)], xc[size_t(c)][size_t(g)]);
    }
    for (int c = 0; c < C; ++c)
      for (int g = 0; g < kG; ++g) Z[size_t(g)] += x.coarse_size[size_t(c)] * std::exp2(xc[size_t(c)][size_t(g)] - M[size_t(g)]);
    std::vector<double> imp_c(size_t(C), 0.0);
    for (int c = 0; c < C; ++c)
      for (int g = 0; g < kG; ++g) imp_c[size_t(c)] += std::exp2(xc[size_t(c)][size_t(g)] - M[size_t(g)]) / Z[size_t(g)];
    const int coarse_verdict = compare_selection("coarse", e, got_coarse, greedy_f64(imp_c, x.coarse_size, kCoarseBudget), imp_c);
    wrong += coarse_verdict == 2, near_ties += coarse_verdict == 1;
    std::vector<char> coarse_picked(size_t(C), 0);
    for (int c : got_coarse)
      if (c >= 0 && c < C) coarse_picked[size_t(c)] = 1;
    // Fine level over the kernel's candidates.
    std::vector<int> cand;
    for (int c = 0; c < C; ++c)
      if (coarse_picked[size_t(c)])
        for (int f = x.coarse_child[size_t(c)]; f < x.coarse_child[size_t(c) + 1]; ++f) cand.push_back(f);
    if (int(cand.size()) != gp[1]) {
      std::printf("  entry %d: %d candidates, the kernel listed %d\n", e, int(cand.size()), gp[1]);
      ++wrong;
      continue;
    }
    std::vector<std::array<double, kG>> xf(cand.size());
    std::array<double, kG> Zf{};
    for (size_t k = 0; k < cand.size(); ++k) xf[k] = logits(e, fine_key, size_t(e) * fmax + size_t(cand[k]));
    for (int g = 0; g < kG; ++g) {
      for (int c = 0; c < C; ++c)
        if (!coarse_picked[size_t(c)]) Zf[size_t(g)] += x.coarse_size[size_t(c)] * std::exp2(xc[size_t(c)][size_t(g)] - M[size_t(g)]);
      for (size_t k = 0; k < cand.size(); ++k)
        Zf[size_t(g)] += x.fine_size[size_t(cand[k])] * std::exp2(xf[k][size_t(g)] - M[size_t(g)]);
    }
    std::vector<double> imp_f(cand.size(), 0.0);
    std::vector<int> cand_size(cand.size());
    for (size_t k = 0; k < cand.size(); ++k) {
      cand_size[k] = x.fine_size[size_t(cand[k])];
      for (int g = 0; g < kG; ++g) imp_f[k] += std::exp2(xf[k][size_t(g)] - M[size_t(g)]) / Zf[size_t(g)];
    }
    std::vector<int> got_slots;  // the kernel's fine picks as candidate slots
    std::vector<char> fine_picked(cand.size(), 0);
    for (int f : got_fine) {
      const auto it = std::lower_bound(cand.begin(), cand.end(), f);
      const int k = it != cand.end() && *it == f ? int(it - cand.begin()) : -1;
      got_slots.push_back(k);
      if (k >= 0) fine_picked[size_t(k)] = 1;
    }
    if (std::count(got_slots.begin(), got_slots.end(), -1) > 0) {
      std::printf("  entry %d: a fine pick is not a candidate\n", e);
      ++wrong;
      continue;
    }
    const int fine_verdict = compare_selection("fine", e, got_slots, greedy_f64(imp_f, cand_size, kBudget), imp_f);
    wrong += fine_verdict == 2, near_ties += fine_verdict == 1;
    // Output: sinks, window and the picked fine clusters' members exact; unselected coarse
    // centroids and unselected candidates as pseudo-rows with a log2-size lift.
    std::vector<int> rows;
    for (int j = 0; j < kSinks; ++j) rows.push_back(j);
    for (int j = 0; j < kWindow; ++j) rows.push_back(tokens - kWindow + j);
    for (int f : got_fine)
      if (f >= 0 && f < int(x.fine_size.size()))
        for (int t = 0; t < x.fine_size[size_t(f)]; ++t) rows.push_back(x.members[size_t(x.member_off[size_t(f)] + t)]);
    for (int g = 0; g < kG; ++g) {
      const float* qg = q.data() + (size_t(e) * kG + g) * kD;
      std::vector<double> logit;
      std::vector<const uint16_t*> value;  // bf16 value row of each logit
      std::vector<uint16_t> exact_values(rows.size() * kD);
      for (size_t i = 0; i < rows.size(); ++i) {
        double dot = 0;
        for (int d = 0; d < kD; ++d) {
          dot += double(qg[d]) * data.at(data.kcache, e, rows[i], d);
          exact_values[i * kD + size_t(d)] = to_bf16(data.at(data.vcache, e, rows[i], d));  // exact: bf16 already
        }
        logit.push_back(dot);
      }
      for (size_t i = 0; i < rows.size(); ++i) value.push_back(exact_values.data() + i * kD);
      for (int c = 0; c < C; ++c)
        if (!coarse_picked[size_t(c)])
          logit.push_back(xc[size_t(c)][size_t(g)] + std::log2(double(x.coarse_size[size_t(c)]))),
              value.push_back(coarse_value.data() + (size_t(e) * cmax + c) * kD);
      for (size_t k = 0; k < cand.size(); ++k)
        if (!fine_picked[k])
          logit.push_back(xf[k][size_t(g)] + std::log2(double(cand_size[k]))),
              value.push_back(fine_value.data() + (size_t(e) * fmax + size_t(cand[k])) * kD);
      const double mx = *std::max_element(logit.begin(), logit.end());
      double l = 0;
      std::vector<double> o(kD, 0.0);
      for (size_t i = 0; i < logit.size(); ++i) {
        const double p = std::exp2(logit[i] - mx);
        l += p;
        for (int d = 0; d < kD; ++d) o[size_t(d)] += p * from_bf16(value[i][d]);
      }
      for (int d = 0; d < kD; ++d) ref[(size_t(e) * kG + g) * kD + d] = o[size_t(d)] / l;
    }
  }
  const double worst = worst_row_error(out, ref);
  const bool ok = worst < 1e-4 && wrong == 0;
  std::printf("two levels: per entry %.1f coarse picks, %.1f candidates, %.1f fine picks (%.1f at once); %d near-ties "
              "only; output worst relative L2 error %.2e (%s); %d clusters fit at once\n",
              sum_coarse / kEntries, sum_cand / kEntries, sum_fine / kEntries, sum_at_once / kEntries, near_ties, worst,
              ok ? "ok" : "WRONG", fit);
  const lab::Graph graph([&](cudaStream_t st) { LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, a)); }, s);
  const std::vector<double> us = time_flushed(timer, graph, runs);
  const auto [lo, hi] = std::minmax_element(us.begin(), us.end());
  std::printf("two levels: one-launch step, median %.2f us (min %.2f, max %.2f)\n", lab::median(us), *lo, *hi);
  std::vector<double> warm;
  for (int i = 0; i < runs; ++i) warm.push_back(timer.run_us(graph, false, i));
  std::printf("two levels: the same without the L2 flush, median %.2f us\n", lab::median(warm));
  if (profile)
    for (const bool cold : {true, false})
      profile_launch(timer, kEntries * kCtas,
                     {"", "coarse logits pushed", "cluster barrier", "coarse normalisers", "coarse selection",
                      "candidates listed", "candidates scored, pushed", "second barrier", "frontier terms",
                      "frontier normalisers", "fine selection", "selected rows issued", "far field",
                      "exact rows' states", "exact rows joined", "states merged"},
                     [&](long long* prof) {
                       Args pa = a;
                       pa.prof = prof;
                       LAB_CHECK(cudaLaunchKernelEx(&cfg, kernel, pa));
                     },
                     cold);
  return ok ? 0 : 1;
}
