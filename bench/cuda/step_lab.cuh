#pragma once
// What the one-launch step labs share (fused_step.cu, gpu-notes item 33; fused_select_step.cu,
// item 34; two_level_step.cu, item 35): the shapes (Qwen3-8B's 8 KV heads at batch 1, one
// 16-CTA cluster each, G = 4, d = 128, bf16), bf16 conversions, warp and block reductions, the
// steps every lab runs (queries, the fixed rows, centroid slices staged, scored and pushed to
// the cluster, the far field over a staged slice, exact rows, a CTA's softmax state and the
// merge of a cluster's states), and the host side's buffers, greedy rule in f64, error
// measure, launch config, timing and phase profile. The greedy rule on the GPU is in
// lab_greedy.cuh.
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

#include "cuda/common.cuh"
#include "lab_util.cuh"

namespace step_lab {

constexpr int kD = 128, kG = 4, kEntries = 8, kCtas = 16, kThreads = 256, kWarps = kThreads / 32;
constexpr int kPage = 16, kSinks = 16, kWindow = 128;
constexpr int kRowStride = 272;  // bytes per centroid row staged in shared memory (256 + 16: no bank conflicts)

__device__ __forceinline__ void bf16x4(const uint2 u, float* f) {
  f[0] = __uint_as_float(u.x << 16), f[1] = __uint_as_float(u.x & 0xffff0000u);
  f[2] = __uint_as_float(u.y << 16), f[3] = __uint_as_float(u.y & 0xffff0000u);
}

// 2^x by the SFU alone, as the library's kernels: exp2f adds a range fix-up around it, whose
// code at the labs' many unrolled uses costs instruction-cache misses after an L2 flush
// (gpu-notes item 35).
using multipole::cuda::detail::fast_exp2;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// (m, z): a maximum and the sum of 2^(x - m) of the terms under it; (m2, z2) merged in.
__device__ __forceinline__ void merge_max_sum(float& m, float& z, float m2, float z2) {
  const float mx = fmaxf(m, m2);
  z = (m == -INFINITY ? 0.0f : z * fast_exp2(m - mx)) + (m2 == -INFINITY ? 0.0f : z2 * fast_exp2(m2 - mx));
  m = mx;
}

// Every thread's (m[g], z[g]) per head merged over the block: threads g < kG write gmax[g] and
// gzinv[g] = 1 / sum, visible to all on return. red, red_z: [kWarps][kG] scratch.
__device__ __forceinline__ void block_max_sum(float (&m)[kG], float (&z)[kG], float (*red)[kG], float (*red_z)[kG],
                                              float* gmax, float* gzinv) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      merge_max_sum(m[g], z[g], __shfl_xor_sync(0xffffffffu, m[g], o), __shfl_xor_sync(0xffffffffu, z[g], o));
    if (lane == 0) red[warp][g] = m[g], red_z[warp][g] = z[g];
  }
  __syncthreads();
  if (tid < kG) {
    float mm = red[0][tid], zz = red_z[0][tid];
    for (int w = 1; w < kWarps; ++w) merge_max_sum(mm, zz, red[w][tid], red_z[w][tid]);
    gmax[tid] = mm, gzinv[tid] = 1.0f / zz;
  }
  __syncthreads();
}

// One CTA's softmax state (base-2 logits): max, sum, unnormalised output.
struct State {
  float m[kG], l[kG], o[kG][kD];
};

// q_g . centroid row j staged in shared memory (bf16 rows kRowStride bytes apart); qg: [D].
__device__ __forceinline__ float staged_dot(const uint8_t* staged, int j, const float* qg) {
  const uint4* row = reinterpret_cast<const uint4*>(staged + size_t(j) * kRowStride);
  float acc[4] = {};
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const uint4 u = row[c];
    float k8[8];
    bf16x4(make_uint2(u.x, u.y), k8);
    bf16x4(make_uint2(u.z, u.w), k8 + 4);
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[t & 3] += qg[c * 8 + t] * k8[t];
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

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

// The entry's queries q [kG, kD]: all of them into qs (shared), and the lane's dims
// [4 lane, 4 lane + 4) of each head into qr. qs is read only after a barrier.
__device__ __forceinline__ void load_queries(const float* q, float (*qs)[kD], float (&qr)[kG][4]) {
  for (int i = threadIdx.x; i < kG * kD; i += blockDim.x) qs[i / kD][i % kD] = q[i];
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

// The thread's maximum m[g] over its values x[r] (-inf for none) and sum z[g] = sum_r n[r]
// 2^(x[r]_g - m[g]) over those with n[r] > 0, per head, for block_max_sum. (The maximum may
// include values left out of the sum: it is only the sum's reference.)
template <int Owned>
__device__ __forceinline__ void own_max_sum(const float4 (&x)[Owned], const int (&n)[Owned], float (&m)[kG],
                                            float (&z)[kG]) {
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    m[g] = -INFINITY, z[g] = 0;
#pragma unroll
    for (int r = 0; r < Owned; ++r) m[g] = fmaxf(m[g], reinterpret_cast<const float*>(&x[r])[g]);
#pragma unroll
    for (int r = 0; r < Owned; ++r)
      if (n[r] > 0) z[g] += float(n[r]) * fast_exp2(reinterpret_cast<const float*>(&x[r])[g] - m[g]);
  }
}

// The far-field weights n 2^(x_g - gmax_g) of a cluster's logits x (0 when selected).
__device__ __forceinline__ float4 far_weights(float4 x, int n, bool selected, const float* gmax) {
  float* xs = reinterpret_cast<float*>(&x);
#pragma unroll
  for (int g = 0; g < kG; ++g) xs[g] = selected ? 0.0f : float(n) * fast_exp2(xs[g] - gmax[g]);
  return x;
}

// n rows of kD bf16 from src (contiguous) into staged rows kRowStride bytes apart, as one
// cp.async group.
__device__ __forceinline__ void stage_rows(uint8_t* staged, const uint16_t* src, int n) {
  for (int i = threadIdx.x; i < n * 16; i += blockDim.x)
    multipole::cuda::detail::cp_async16(staged + size_t(i / 16) * kRowStride + (i % 16) * 16, src + size_t(i) * 8,
                                        true);
  multipole::cuda::detail::cp_async_commit();
}

// Logits of n staged rows for the kG heads: x[j] = (q_0 . row j, ..., q_3 . row j). qs: [kG][kD].
__device__ __forceinline__ void score_staged(const uint8_t* staged, int n, const float (*qs)[kD], float4* x) {
  for (int i = threadIdx.x; i < kG * n; i += blockDim.x) {
    const int g = i / n, j = i % n;
    reinterpret_cast<float*>(&x[j])[g] = staged_dot(staged, j, qs[g]);
  }
}

// x[c0, c0 + n) of this CTA stored into every other CTA of the cluster at the same offsets.
__device__ __forceinline__ void push_to_cluster(const cooperative_groups::cluster_group& cluster, float4* x, int c0,
                                                int n) {
  const int rank = int(cluster.block_rank());
  for (int i = threadIdx.x; i < n * (kCtas - 1); i += blockDim.x) {
    const int j = i % n, r = (rank + 1 + i / n) % kCtas;
    *cluster.map_shared_rank(&x[c0 + j], r) = x[c0 + j];
  }
}

// The scoring step of a one-launch step: the key slice (n rows staged by stage_rows, in flight)
// scored into x[c0, c0 + n), the value slice `values` staged over it, and the logits pushed
// into every CTA of the cluster. The kernel must have arrived on the cluster barrier at entry
// (every CTA must have started before another stores into its shared memory).
__device__ __forceinline__ void score_and_push_slice(const cooperative_groups::cluster_group& cluster,
                                                     uint8_t* staged, int n, const float (*qs)[kD], float4* x,
                                                     int c0, const uint16_t* values) {
  multipole::cuda::detail::cp_async_wait<0>();
  __syncthreads();
  score_staged(staged, n, qs, x + c0);
  __syncthreads();
  stage_rows(staged, values, n);  // (the keys are no longer read)
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  push_to_cluster(cluster, x, c0, n);
}

// Row j of an entry's exact list before the selection: [0, kSinks) the sinks, then the window
// of kWindow rows ending at `tokens`; -1 past them.
__device__ __forceinline__ int fixed_row_position(int j, int tokens) {
  return j < kSinks ? j : j < kSinks + kWindow ? tokens - kWindow + (j - kSinks) : -1;
}

// The far field of n staged value rows with weights w[j] (float4: heads 0..3): the thread's
// sums for heads fg, fg + 1 at dimension fd; warps g < kG also set st.m[g] = 0 (the weights'
// reference) and st.l[g] = the weights' sum.
__device__ __forceinline__ void far_field_staged(const uint8_t* staged, const float4* w, int n, int fd, int fg,
                                                 float& far0, float& far1, State& st) {
  float s0 = 0, s1 = 0;
  const uint8_t* vrow = staged + fd * 2;
  for (int j = 0; j < n; ++j) {
    const float v = __uint_as_float(uint32_t(*reinterpret_cast<const uint16_t*>(vrow + size_t(j) * kRowStride)) << 16);
    const float* wj = reinterpret_cast<const float*>(&w[j]);
    s0 += wj[fg] * v, s1 += wj[fg + 1] * v;
  }
  far0 = s0, far1 = s1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp < kG) {
    float l = 0;
    for (int j = lane; j < n; j += 32) l += reinterpret_cast<const float*>(&w[j])[warp];
    l = warp_sum(l);
    if (lane == 0) st.m[warp] = 0.0f, st.l[warp] = l;
  }
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
    float k4[4];
    bf16x4(kr[i], k4);
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      s[i][g] = warp_sum(qr[g][0] * k4[0] + qr[g][1] * k4[1] + qr[g][2] * k4[2] + qr[g][3] * k4[3]) - bias[g] +
                (lift ? lift[i] : 0.0f);
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

// Thread g < kG: st's max and sum for head g after the warps' exact rows (wm, wl: [kWarps][kG])
// join its far field; factor[0][g] rescales the far field's sums, factor[1 + w][g] warp w's
// (0 for a warp without rows).
__device__ __forceinline__ void merge_factors(State& st, const float (*wm)[kG], const float (*wl)[kG],
                                              float (*factor)[kG], int g) {
  float mx = st.m[g];
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w][g]);
  factor[0][g] = fast_exp2(st.m[g] - mx);
  float l = st.l[g] * factor[0][g];
  for (int w = 0; w < kWarps; ++w) {
    factor[w + 1][g] = wl[w][g] > 0 ? fast_exp2(wm[w][g] - mx) : 0.0f;
    l += wl[w][g] * factor[w + 1][g];
  }
  st.m[g] = mx, st.l[g] = l;
}

// Shared memory where a CTA joins its warps' exact-row states to its far field.
struct StateScratch {
  float wm[kWarps][kG], wl[kWarps][kG], factor[kWarps + 1][kG];
};

// st.o, st.m, st.l of the CTA: the far field (st.m, st.l as far_field_staged set them; this
// thread's sums far0, far1 for heads fg, fg + 1 at dimension fd) joined with each warp's exact
// rows (m, l, acc as warp_rows_state gives them). part: [kWarps][kG][kD] f32 that may alias
// the staged rows: written only after a barrier.
__device__ __forceinline__ void join_cta_state(State& st, const float (&m)[kG], const float (&l)[kG],
                                               const float (&acc)[kG][4], float far0, float far1, int fd, int fg,
                                               float (*part)[kG][kD], StateScratch& sc) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __syncthreads();  // the far field's reads of the staged values are done: part[] may overwrite them
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int t = 0; t < 4; ++t) part[warp][g][lane * 4 + t] = acc[g][t];
    if (lane == 0) sc.wm[warp][g] = m[g], sc.wl[warp][g] = l[g];
  }
  __syncthreads();
  if (tid < kG) merge_factors(st, sc.wm, sc.wl, sc.factor, tid);
  __syncthreads();
  const float far[2] = {far0, far1};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int g = fg + h;
    float o = far[h] * sc.factor[0][g];
    for (int w = 0; w < kWarps; ++w) o += part[w][g][fd] * sc.factor[w + 1][g];
    st.o[g][fd] = o;
  }
}

// out [G, D] of one entry = the merge of the cluster's kCtas states; state_of(r) gives CTA r's
// (local or through DSMEM). Run by every thread of one CTA.
template <class StateOf>
__device__ void write_merged_states(const StateOf& state_of, float* out) {
  for (int i = threadIdx.x; i < kG * kD; i += blockDim.x) {
    const int g = i / kD, d = i % kD;
    float m[kCtas], mx = -INFINITY;
    for (int r = 0; r < kCtas; ++r) mx = fmaxf(mx, m[r] = state_of(r)->m[g]);
    float l = 0, o = 0;
    for (int r = 0; r < kCtas; ++r) {
      const State* other = state_of(r);
      const float f = fast_exp2(m[r] - mx);
      l += other->l[g] * f, o += other->o[g][d] * f;
    }
    out[g * kD + d] = o / l;
  }
}

// The pull merge of a one-launch step: CTA 0 reads the cluster's states through DSMEM and
// writes their merge (out: [G, D] of the entry); `done` runs after it (a profile mark); the
// last barrier keeps every CTA's state alive until CTA 0 has read it.
template <class Done>
__device__ void pull_merged_states(const cooperative_groups::cluster_group& cluster, State& st, float* out,
                                   const Done& done) {
  cluster.sync();
  if (cluster.block_rank() == 0)
    write_merged_states([&](int r) { return static_cast<const State*>(cluster.map_shared_rank(&st, r)); }, out);
  __syncthreads();
  done();
  cluster.sync();
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

template <class T> T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  LAB_CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  LAB_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

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
  return lab::cluster_config(attr, kEntries, kCtas, kThreads, s, smem);
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
