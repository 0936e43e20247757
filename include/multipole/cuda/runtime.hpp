#pragma once
// CUDA runtime helpers that need no CUDA headers: device queries, owning device buffers,
// streams. cudaStream_t is CUstream_st*, so a Stream converts to it without a cast.
#include <cstddef>
#include <cstdint>
#include <string>

struct CUstream_st;

namespace multipole::cuda {

using Stream = CUstream_st*;  // nullptr: the legacy default stream

// Usable CUDA devices; 0 without a driver or GPU. Never throws.
int device_count();

struct DeviceInfo {
  std::string name;
  int sm_count = 0;
  int major = 0, minor = 0;
  int64_t l2_bytes = 0;
  int64_t global_bytes = 0;
  int64_t smem_per_block_optin = 0;
};
DeviceInfo device_info(int device = 0);

// Owning cudaMalloc allocation. Copies are synchronous helpers for setup and tests; the
// decode path never calls them.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  template <class T> T* as() const { return static_cast<T*>(data_); }

  // Reallocates (contents lost) when smaller than `bytes`.
  void reserve(size_t bytes);
  void upload(const void* src, size_t bytes, size_t offset = 0);
  void download(void* dst, size_t bytes, size_t offset = 0) const;
  void memset(int value);

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

void synchronize();
void stream_synchronize(Stream stream);

}  // namespace multipole::cuda
