#pragma once
// Key centroids rotated to their members' mean positions, for the far field at real positions
// (AttentionConfig::far_field_real_positions): the far field's logits then come from the real
// query against each unselected cluster as if its tokens sat at their mean position, while the
// selection keeps the scores at the fixed position. The CPU reference is
// MultipolePolicy::centroids_at_mean_positions; rotation as multipole::Rotation (pairs (i, i +
// half), no magnitude factor), angles reduced in double so that positions past 100K keep their
// phase.
#include "cuda/common.cuh"
#include "cuda/launch.hpp"

namespace multipole::cuda::detail {

// Sum of the token positions under slot c of entry e over the warp (every lane gets it): a fine
// cluster's members across the lanes, or a coarse cluster's children one per lane (each lane
// summing its child's members), so that neither waits on one child after another.
__device__ __forceinline__ long long member_position_sum(const MeanPositionArgs& a, int e, int64_t c, bool coarse) {
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
// entry_count[e] are left alone. Empty slots get zero rows (their far sizes are 0, so nothing
// reads them as pseudo-tokens).
//   key_centroids, rotated: [total_clusters, D] of CT; inv_freq: [half] angular frequencies
template <int D, class CT>
__global__ void __launch_bounds__(256) centroids_at_mean_positions_kernel(MeanPositionArgs a) {
  const int e = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = blockIdx.x * 8 + warp;
  if (j >= a.entry_count[e]) return;
  const int64_t c = int64_t(a.entry_begin[e]) + j;
  const CT* src = static_cast<const CT*>(a.key_centroids) + c * D;
  CT* dst = static_cast<CT*>(a.rotated) + c * D;
  const int n = a.sizes[c];
  if (n <= 0) {
    for (int i = lane; i < D; i += 32) dst[i] = from_f32<CT>(0.0f);
    return;
  }
  const double mean = double(member_position_sum(a, e, c, j < a.entry_coarse[e])) / n;
  const int half = a.half;
  for (int i = lane; i < half; i += 32) {
    // The angle reduced to [-pi, pi] in double (exact to ~1e-11 rad at 10^5 rad), then a float
    // sincos, which is fast and accurate on that range.
    double t = mean * a.inv_freq[i];
    t -= 6.283185307179586 * rint(t * 0.15915494309189535);
    float s, co;
    sincosf(float(t), &s, &co);
    const float x = to_f32(src[i]), y = to_f32(src[i + half]);
    dst[i] = from_f32<CT>(x * co - y * s);
    dst[i + half] = from_f32<CT>(y * co + x * s);
  }
  for (int i = 2 * half + lane; i < D; i += 32) dst[i] = src[i];  // channels past rotary_dim
}

}  // namespace multipole::cuda::detail
