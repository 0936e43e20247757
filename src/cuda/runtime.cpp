#include "multipole/cuda/runtime.hpp"

#include <cuda_runtime.h>

#include <utility>

#include "cuda/check.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

namespace detail {
void cuda_fail(int error, const char* what, const char* file, int line) {
  fail("CUDA error in {} ({}:{}): {}", what, file, line, cudaGetErrorString(static_cast<cudaError_t>(error)));
}
}  // namespace detail

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp p{};
  MP_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo info;
  info.name = p.name;
  info.sm_count = p.multiProcessorCount;
  info.major = p.major;
  info.minor = p.minor;
  info.l2_bytes = p.l2CacheSize;
  info.global_bytes = int64_t(p.totalGlobalMem);
  info.smem_per_block_optin = int64_t(p.sharedMemPerBlockOptin);
  return info;
}

DeviceBuffer::DeviceBuffer(size_t bytes) { reserve(bytes); }

DeviceBuffer::~DeviceBuffer() {
  if (data_) cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void DeviceBuffer::reserve(size_t bytes) {
  if (bytes <= size_ && data_) return;
  if (data_) MP_CUDA_CHECK(cudaFree(data_));
  data_ = nullptr;
  size_ = 0;
  if (bytes == 0) return;
  const cudaError_t err = cudaMalloc(&data_, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    data_ = nullptr;
    fail("cudaMalloc of {} bytes failed: {}", bytes, cudaGetErrorString(err));
  }
  size_ = bytes;
}

void DeviceBuffer::upload(const void* src, size_t bytes, size_t offset) {
  MP_CHECK(offset + bytes <= size_, "device upload of {} bytes at {} exceeds the buffer of {} bytes", bytes, offset, size_);
  if (bytes) MP_CUDA_CHECK(cudaMemcpy(static_cast<char*>(data_) + offset, src, bytes, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* dst, size_t bytes, size_t offset) const {
  MP_CHECK(offset + bytes <= size_, "device download of {} bytes at {} exceeds the buffer of {} bytes", bytes, offset, size_);
  if (bytes) MP_CUDA_CHECK(cudaMemcpy(dst, static_cast<const char*>(data_) + offset, bytes, cudaMemcpyDeviceToHost));
}

void DeviceBuffer::memset(int value) {
  if (size_) MP_CUDA_CHECK(cudaMemset(data_, value, size_));
}

void synchronize() { MP_CUDA_CHECK(cudaDeviceSynchronize()); }
void stream_synchronize(Stream stream) { MP_CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace multipole::cuda
