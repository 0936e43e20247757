#pragma once
// What the one-launch step labs share (fused_step.cu, gpu-notes item 33; fused_select_step.cu,
// item 34): the shapes (Qwen3-8B's 8 KV heads at batch 1, one 16-CTA cluster each, G = 4,
// d = 128, bf16), bf16 conversions, warp reductions, a CTA's softmax state and the merge of a
// cluster's states, and the host side's buffers, error measure and phase profile.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "lab_util.cuh"

namespace step_lab {

constexpr int kD = 128, kG = 4, kEntries = 8, kCtas = 16, kThreads = 256, kWarps = kThreads / 32;
constexpr int kPage = 16, kSinks = 16, kWindow = 128;
constexpr int kRowStride = 272;  // bytes per centroid row staged in shared memory (256 + 16: no bank conflicts)

__device__ __forceinline__ void bf16x4(const uint2 u, float* f) {
  f[0] = __uint_as_float(u.x << 16), f[1] = __uint_as_float(u.x & 0xffff0000u);
  f[2] = __uint_as_float(u.y << 16), f[3] = __uint_as_float(u.y & 0xffff0000u);
}

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

// One warp's exact rows, each lane holding dims [4 lane, 4 lane + 4) of a row's K (kr) and V
// (vr) and of the queries (qr): per head, the maximum m of the logits less bias[g], the sum l
// of their exponents and the lane's dims of the weighted V sum (m = -inf, l = 0 without rows).
template <int Slots>
__device__ void warp_rows_state(const uint2 (&kr)[Slots], const uint2 (&vr)[Slots], const bool (&has)[Slots],
                                const float (&qr)[kG][4], const float* bias, float (&m)[kG], float (&l)[kG],
                                float (&acc)[kG][4]) {
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
      s[i][g] = warp_sum(qr[g][0] * k4[0] + qr[g][1] * k4[1] + qr[g][2] * k4[2] + qr[g][3] * k4[3]) - bias[g];
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
      const float p = exp2f(s[i][g] - m[g]);
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
  factor[0][g] = exp2f(st.m[g] - mx);
  float l = st.l[g] * factor[0][g];
  for (int w = 0; w < kWarps; ++w) {
    factor[w + 1][g] = wl[w][g] > 0 ? exp2f(wm[w][g] - mx) : 0.0f;
    l += wl[w][g] * factor[w + 1][g];
  }
  st.m[g] = mx, st.l[g] = l;
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
      const float f = exp2f(m[r] - mx);
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

}  // namespace step_lab
