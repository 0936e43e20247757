#pragma once
// CUDA error checks for .cu and .cpp files alike (no fmt here: nvcc never sees it).
#define MP_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const int mp_cuda_err_ = static_cast<int>(call);                                     \
    if (mp_cuda_err_ != 0) ::multipole::cuda::detail::cuda_fail(mp_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

namespace multipole::cuda::detail {
// Throws multipole::Error naming the call, the place and the CUDA error string.
[[noreturn]] void cuda_fail(int error, const char* what, const char* file, int line);
}  // namespace multipole::cuda::detail
