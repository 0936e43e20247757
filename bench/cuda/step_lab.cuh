#pragma once
// What the one-launch step labs share (fused_step.cu, gpu-notes item 33; fused_select_step.cu,
// item 34; two_level_step.cu, item 35) beyond the library's pieces (cuda/cluster_step.cuh,
// cuda/cluster_greedy.cuh, promoted from here in item 36): the shapes (Qwen3-8B's 8 KV heads
// at batch 1, G = 4, d = 128, bf16, pages of 16 tokens), the labs' cache layout and fixed rows,
// the warps' exact rows, and the host side's buffers, greedy rule in f64, error measure,
// launch config, timing and phase profile.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/cluster_step.cuh"
#include "cuda/common.cuh"
#include "lab_util.cuh"

namespace step_lab {

// The library's one-launch step pieces (kD, kG, kCtas, kThreads, kWarps, kRowStride, the
// greedy rule, the staged scoring, far field and state merges): the labs run them in bf16.
using namespace multipole::cuda::detail::cluster_step;
using multipole::cuda::detail::warp_max;
using multipole::cuda::detail::warp_sum;

constexpr int kEntries = 8;
constexpr int kPage = 16, kSinks = 16, kWindow = 128;

__device__ __forceinline__ void bf16x4(const uint2 u, float* f) {
  f[0] = __uint_as_float(u.x << 16), f[1] = __uint_as_float(u.x & 0xffff0000u);
  f[2] = __uint_as_float(u.y << 16), f[3] = __uint_as_float(u.y & 0xffff0000u);
}

// 2^x by the SFU alone, as the library's kernels: exp2f adds a range fix-up around it, whose
// code at the labs' many unrolled uses costs instruction-cache misses after an L2 flush
// (gpu-notes item 35).
using multipole::cuda::detail::fast_exp2;

// Profile marks: %globaltimer (ns) of thread 0 of each CTA at mark i into prof[block, i], when
// prof is set ([blocks, count]).
struct PhaseMarks {
  long long* prof;
  int count;
  __device__ __forceinline__ void operator()(int i) const {
    if (prof && threadIdx.x == 0) {
      long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      prof[size_t(blockIdx.x) * count + i] = t;
    }
  }
};

// The entry's queries q [kG, kD]: all of them into qp (shared, in the scoring's parts), and the
// lane's dims [4 lane, 4 lane + 4) of each head into qr. qp is read only after a barrier.
__device__ __forceinline__ void load_queries(const float* q, QueryParts& qp, float (&qr)[kG][4]) {
  for (int i = threadIdx.x; i < kG * kD / 2; i += blockDim.x)
    put_query_pair<__nv_bfloat16>(qp, i / (kD / 2), 2 * (i % (kD / 2)), q[2 * i], q[2 * i + 1]);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    const float4 v = *reinterpret_cast<const float4*>(q + g * kD + lane * 4);
    qr[g][0] = v.x, qr[g][1] = v.y, qr[g][2] = v.z, qr[g][3] = v.w;
  }
}

// The lane's dims [4 lane, 4 lane + 4) of K and V at position pos of entry e (caches
// [pages, kEntries, kPage, kD] bf16, page_table [N / kPage]).
__device__ __forceinline__ void load_kv_row(const int32_t* page_table, const uint16_t* k_cache, const uint16_t* v_cache,
                                            int e, int pos, uint2& k, uint2& v) {
  const size_t page = size_t(page_table[pos / kPage]);
  const size_t row = ((page * kEntries + e) * kPage + pos % kPage) * kD + (threadIdx.x & 31) * 4;
  k = *reinterpret_cast<const uint2*>(k_cache + row);
  v = *reinterpret_cast<const uint2*>(v_cache + row);
}

// Row j of an entry's exact list before the selection: [0, kSinks) the sinks, then the window
// of kWindow rows ending at `tokens`; -1 past them.
__device__ __forceinline__ int fixed_row_position(int j, int tokens) {
  return j < kSinks ? j : j < kSinks + kWindow ? tokens - kWindow + (j - kSinks) : -1;
}

// One warp's exact rows, each lane holding dims [4 lane, 4 lane + 4) of a row's K (kr) and V
// (vr) and of the queries (qr): per head, the maximum m of the logits less bias[g], the sum l
// of their exponents and the lane's dims of the weighted V sum (m = -inf, l = 0 without rows).
// lift[i], if given, is added to row i's logits (log2 of a pseudo-row's size: a centroid).
template <int Slots>
__device__ void warp_rows_state(const uint2 (&kr)[Slots], const uint2 (&vr)[Slots], const bool (&has)[Slots],
                                const float (&qr)[kG][4], const float* bias, float (&m)[kG], float (&l)[kG],
                                float (&acc)[kG][4], const float* lift = nullptr) {
  float s[Slots][kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY, l[g] = 0;
#pragma unroll
    for (int t = 0; t < 4; ++t) acc[g][t] = 0;
  }
#pragma unroll
  for (int i = 0; i < Slots; ++i) {
    if (!has[i]) continue;
    float k4[4], x[kG];
    bf16x4(kr[i], k4);
    warp_dots(qr, k4, x);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      s[i][g] = x[g] - bias[g] + (lift ? lift[i] : 0.0f);
      m[g] = fmaxf(m[g], s[i][g]);
    }
  }
#pragma unroll
  for (int i = 0; i < Slots; ++i) {
    if (!has[i]) continue;
    float v4[4];
    bf16x4(vr[i], v4);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      const float p = fast_exp2(s[i][g] - m[g]);
      l[g] += p;
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[g][t] += p * v4[t];
    }
  }
}

// Host side.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The cache and queries of a step: K and V rows of random bf16 values in pages of 16 tokens in
// a shuffled order, and each entry's G queries pre-scaled by softmax scale * log2(e).
struct StepData {
  std::vector<uint16_t> kcache, vcache;  // [pages, E, 16, D] bf16
  std::vector<int32_t> page_table;       // [N / 16] page of each 16 positions
  std::vector<float> q;                  // [E, G, D]

  StepData(int tokens, std::mt19937_64& rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int pages = tokens / kPage;
    kcache.resize(size_t(pages) * kEntries * kPage * kD), vcache.resize(kcache.size());
    for (auto& h : kcache) h = to_bf16(nd(rng));
    for (auto& h : vcache) h = to_bf16(nd(rng));
    page_table.resize(size_t(pages));
    std::iota(page_table.begin(), page_table.end(), 0);
    std::shuffle(page_table.begin(), page_table.end(), rng);
    const float scale = 1.0f / std::sqrt(float(kD)) * 1.4426950408889634f;
    q.resize(size_t(kEntries) * kG * kD);
    for (auto& v : q) v = nd(rng) * scale;
  }
  // Dimension d of entry e's row at position pos of kcache or vcache.
  float at(const std::vector<uint16_t>& cache, int e, int pos, int d) const {
    const size_t page = size_t(page_table[size_t(pos / kPage)]);
    return from_bf16(cache[((page * kEntries + e) * kPage + pos % kPage) * kD + d]);
  }
};

using lab::upload;

// The worst relative L2 error over rows of kD values: got (device, f32) against ref (f64).
inline double worst_row_error(const float* got_device, const std::vector<double>& ref) {
  std::vector<float> got(ref.size());
  LAB_CHECK(cudaMemcpy(got.data(), got_device, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  double worst = 0;
  for (size_t row = 0; row < got.size(); row += kD) {
    double num = 0, den = 0;
    for (int d = 0; d < kD; ++d) {
      const double diff = double(got[row + d]) - ref[row + d];
      num += diff * diff, den += ref[row + d] * ref[row + d];
    }
    worst = std::max(worst, std::sqrt(num / den));
  }
  return worst;
}

// Prints the phases of one profiled launch: marks [ctas, names.size()] of %globaltimer (ns)
// by thread 0 of each CTA, mark 0 at entry. Mean over CTAs of each phase, the slowest CTA's
// span, and the span from the first CTA's start to the last one's end.
inline void print_phase_profile(const std::vector<long long>& marks, int ctas, const std::vector<const char*>& names) {
  const int n = int(names.size());
  std::vector<double> mean(size_t(n), 0.0);
  double slowest = 0;
  long long first = marks[0], last = marks[0], last_start = marks[0];
  for (int b = 0; b < ctas; ++b) {
    const long long* m = marks.data() + size_t(b) * size_t(n);
    for (int i = 1; i < n; ++i) mean[size_t(i)] += double(m[i] - m[i - 1]) / ctas;
    slowest = std::max(slowest, double(m[n - 1] - m[0]));
    first = std::min(first, m[0]), last_start = std::max(last_start, m[0]), last = std::max(last, m[n - 1]);
  }
  std::printf("  phases (mean over CTAs, us):");
  for (int i = 1; i < n; ++i) std::printf(" %s %.2f;", names[size_t(i)], mean[size_t(i)] / 1e3);
  std::printf(" slowest CTA %.2f; first CTA start to last end %.2f, of which start skew %.2f\n", slowest / 1e3,
              double(last - first) / 1e3, double(last_start - first) / 1e3);
}

// The greedy rule in f64: indices in decreasing importance (ties: lower first), one that does
// not fit the room left skipped. Returns the picked indices, ascending.
inline std::vector<int> greedy_f64(const std::vector<double>& imp, const std::vector<int>& size, int budget) {
  std::vector<int> order(imp.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int l, int r) { return imp[size_t(l)] > imp[size_t(r)]; });
  std::vector<int> picked;
  int room = budget;
  for (int c : order)
    if (size[size_t(c)] <= room) picked.push_back(c), room -= size[size_t(c)];
  std::sort(picked.begin(), picked.end());
  return picked;
}

// got (any order) against the rule's want (ascending): 0 if equal, 1 if the difference is a
// near-tie (an importance gap of f32 rounding), 2 if wrong; prints what differs.
inline int compare_selection(const char* what, int e, std::vector<int> got, const std::vector<int>& want,
                      const std::vector<double>& imp) {
  std::sort(got.begin(), got.end());
  if (got == want) return 0;
  std::vector<int> diff;
  std::set_symmetric_difference(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(diff));
  double lo = 1e300, hi = 0;
  for (int c : diff)
    if (c >= 0 && size_t(c) < imp.size()) lo = std::min(lo, imp[size_t(c)]), hi = std::max(hi, imp[size_t(c)]);
  const double gap = hi > 0 ? (hi - lo) / hi : 1.0;
  std::printf("  entry %d: %s selection differs from the rule in %zu clusters, importance gap %.1e\n", e, what,
              diff.size(), gap);
  return gap > 1e-5 ? 2 : 1;
}

// The launch of a one-launch step on stream s: kEntries clusters of kCtas CTAs of kThreads with
// smem bytes of dynamic shared memory each. attr must outlive the config.
template <class Kernel>
cudaLaunchConfig_t step_config(Kernel kernel, cudaLaunchAttribute& attr, cudaStream_t s, size_t smem) {
  LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  LAB_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  return lab::cluster_launch_config(attr, kEntries, kCtas, kThreads, s, smem);
}

// How many clusters of the config fit the device at once.
template <class Kernel>
int clusters_at_once(Kernel kernel, const cudaLaunchConfig_t& cfg) {
  int fit = 0;
  LAB_CHECK(cudaOccupancyMaxActiveClusters(&fit, kernel, &cfg));
  return fit;
}

// Microseconds of `runs` flushed replays of graph, after 3 untimed ones (warm-up).
inline std::vector<double> time_flushed(lab::FlushedTimer& timer, const lab::Graph& graph, int runs) {
  std::vector<double> us;
  for (int i = 0; i < runs + 3; ++i) {
    const double t = timer.run_us(graph, true, i);
    if (i >= 3) us.push_back(t);
  }
  return us;
}

// One launch with prof set ([ctas, names.size()] marks), after an L2 flush when `cold`, its
// phases printed.
template <class Launch>
void profile_launch(lab::FlushedTimer& timer, int ctas, const std::vector<const char*>& names, const Launch& launch,
                    bool cold = true) {
  long long* prof = nullptr;
  const size_t n = size_t(ctas) * names.size();
  LAB_CHECK(cudaMalloc(&prof, n * sizeof(long long)));
  if (cold) timer.flush(0x5a);
  launch(prof);
  LAB_CHECK(cudaStreamSynchronize(timer.stream()));
  std::vector<long long> marks(n);
  LAB_CHECK(cudaMemcpy(marks.data(), prof, n * sizeof(long long), cudaMemcpyDeviceToHost));
  LAB_CHECK(cudaFree(prof));
  std::printf("  %s", cold ? "after an L2 flush:" : "warm:");
  print_phase_profile(marks, ctas, names);
}

}  // namespace step_lab
