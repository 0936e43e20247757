#pragma once
// Host-side setup shared by the planners (decoder.cpp, sparse_baselines.cpp, kmeans.cpp) and the
// bench: the head dims the kernels take, plan tables copied to the device and the SM count they
// are sized by. Synchronous; never on the decode path.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "cuda/check.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cuda::detail {

// The head dims every kernel is instantiated for (the launchers' `d == 64 ? K<64> : K<128>`).
constexpr bool is_kernel_head_dim(int d) { return d == 64 || d == 128; }

// Grows `buf` to hold v (at least 16 bytes, so an empty table is still a valid pointer)
// and copies v into it.
template <class T>
void upload_vector(DeviceBuffer& buf, const std::vector<T>& v) {
  buf.reserve(std::max<size_t>(v.size() * sizeof(T), 16));
  if (!v.empty()) buf.upload(v.data(), v.size() * sizeof(T));
}

// Streaming multiprocessors of the current device.
inline int current_sm_count() {
  int dev = 0, n = 0;
  MP_CUDA_CHECK(cudaGetDevice(&dev));
  MP_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

}  // namespace multipole::cuda::detail
