#pragma once
// The far field at real positions (AttentionConfig::far_field_real_positions): the far field's
// logits come from the real query against each unselected cluster as if its tokens sat at their
// mean position, while the selection keeps the scores at the fixed position. The CPU reference is
// MultipolePolicy::centroids_at_mean_positions; rotation as multipole::Rotation (pairs (i, i +
// half), no magnitude factor), angles reduced in double so that positions past 100K keep their
// phase. Two kernels: the index's position sums (once per index change, not per step), and the
// far clusters' logits (per step, after the selection, only the far list).
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

// Sum of the token positions under slot c of entry e over the warp (every lane gets it): a fine
// cluster's members across the lanes, or a coarse cluster's children one per lane (each lane
// summing its child's members), so that neither waits on one child after another.
__device__ __forceinline__ long long member_position_sum(const DeviceClusterView& a, int e, int64_t c, bool coarse) {
  const int lane = threadIdx.x & 31;
  long long sum = 0;
  if (!coarse) {
    const int32_t* m = a.members + a.member_begin[c];
    for (int k = lane; k < a.sizes[c]; k += 32) sum += m[k];
  } else {
    const int64_t fine0 = int64_t(a.entry_begin[e]) + a.entry_coarse[e];
    const int32_t first = a.member_begin[c], last = a.member_begin[c + 1];
    for (int32_t k = first + lane; k < last; k += 32) {
      const int64_t f = fine0 + a.members[k];
      const int32_t* m = a.members + a.member_begin[f];
      const int n = a.sizes[f];
#pragma unroll 4
      for (int j = 0; j < n; ++j) sum += m[j];
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  return sum;
}

// One warp per slot: grid (ceil(most slots of an entry / 8), E), 256 threads; slots past
// entry_count[e] are left alone, empty ones get 0 (a placeholder's child list is not read).
//   sums: [total_clusters] out
__global__ void __launch_bounds__(256) position_sums_kernel(DeviceClusterView a, int64_t* sums) {
  const int e = blockIdx.y, lane = threadIdx.x & 31;
  const int j = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (j >= a.entry_count[e]) return;
  const int64_t c = int64_t(a.entry_begin[e]) + j;
  const long long sum = a.sizes[c] > 0 ? member_position_sum(a, e, c, j < a.entry_coarse[e]) : 0;
  if (lane == 0) sums[c] = sum;
}

// One warp per far cluster: grid (X, E), 256 threads, the warps striding over the entry's far
// list (two levels) or its slots (one level, those with far_size > 0). The lanes hold the
// centroid rotated to its mean position in f32 (pairs lane + 32 t and the channels past the
// rotary dims), then reduce its dot product with each of the G queries, staged in shared memory.
//   scores[c, g] = qscale * q_g . R(mean_c) k_c
template <int D, class CT>
__global__ void __launch_bounds__(256) far_logits_at_mean_positions_kernel(FarLogitArgs a) {
  extern __shared__ float s_q[];  // [G, D]
  const int e = blockIdx.y, lane = threadIdx.x & 31, G = a.group;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) s_q[i] = a.q[int64_t(e) * G * D + i];
  __syncthreads();
  if (a.pdl) pdl_wait();  // far_size, far_ids and far_n are the selection's
  const int items = a.far_ids ? min(a.far_n[e], a.far_cap) : a.entry_count[e];
  const int half = a.half;
  constexpr int kPairs = (D / 2 + 31) / 32, kChannels = D / 32;
  for (int j = blockIdx.x * 8 + (threadIdx.x >> 5); j < items; j += gridDim.x * 8) {
    const int64_t c = int64_t(a.entry_begin[e]) + (a.far_ids ? a.far_ids[int64_t(e) * a.far_cap + j] : j);
    const int n = a.far_size[c];
    if (n <= 0) continue;  // (warp-uniform: the warp shares j)
    const CT* k = static_cast<const CT*>(a.key_centroids) + c * D;
    const double mean = double(a.position_sums[c]) / n;
    float x[kPairs], y[kPairs], p[kChannels];
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      const int i = lane + 32 * t;
      x[t] = y[t] = 0.0f;
      if (i < half) {
        // The hardware sincos on the reduced angle: within ~2^-21 on [-pi, pi] (sincosf would
        // keep a local-memory stack for its large-argument path).
        float s, co;
        __sincosf(reduced_angle(mean, a.inv_freq[i]), &s, &co);
        const float k0 = to_f32(k[i]), k1 = to_f32(k[i + half]);
        x[t] = k0 * co - k1 * s;
        y[t] = k1 * co + k0 * s;
      }
    }
#pragma unroll
    for (int t = 0; t < kChannels; ++t) {
      const int i = 2 * half + lane + 32 * t;
      p[t] = i < D ? to_f32(k[i]) : 0.0f;
    }
    for (int g = 0; g < G; ++g) {
      const float* q = s_q + g * D;
      float dot = 0.0f;
#pragma unroll
      for (int t = 0; t < kPairs; ++t) {
        const int i = lane + 32 * t;
        if (i < half) dot += q[i] * x[t] + q[i + half] * y[t];
      }
#pragma unroll
      for (int t = 0; t < kChannels; ++t) {
        const int i = 2 * half + lane + 32 * t;
        if (i < D) dot += q[i] * p[t];
      }
      dot = warp_sum(dot);
      if (lane == 0) a.scores[c * G + g] = dot * a.qscale;
    }
  }
}

}  // namespace multipole::cuda::detail
