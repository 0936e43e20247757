// Attention kernels for bf16 KV (one translation unit per storage type keeps builds parallel).
#include "cuda/attend_launch.cuh"

namespace multipole::cuda::detail {
void launch_attend_bf16(const AttendArgs& a, int head_dim, int rows, bool mp, int items, Stream stream) {
  launch_attend_typed<__nv_bfloat16>(a, head_dim, rows, mp, items, stream);
}
int attend_occupancy_bf16(int head_dim, int rows, bool mp) { return attend_occupancy_typed<__nv_bfloat16>(head_dim, rows, mp); }
}  // namespace multipole::cuda::detail
