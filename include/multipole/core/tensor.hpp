#pragma once
// Owning aligned buffers and non-owning strided tensor views over them (or over mmapped files).
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "multipole/core/dtype.hpp"

namespace multipole {

// 64-byte aligned, uninitialised heap memory (the OS commits pages lazily on first touch).
class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 64;
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  template <class T> T* as() { return reinterpret_cast<T*>(data_); }
  template <class T> const T* as() const { return reinterpret_cast<const T*>(data_); }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// A view of up to 4 dimensions; strides are in elements. Does not own its memory.
struct TensorView {
  static constexpr int kMaxRank = 4;
  void* data = nullptr;
  DType dtype = DType::F32;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> stride{};

  // Row-major contiguous view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape);

  int64_t numel() const;
  bool is_contiguous() const;
  int64_t dim(int i) const { return shape[i]; }
  std::byte* element(std::initializer_list<int64_t> index) const;
  std::string shape_string() const;  // "[2, 8, 128]"
  template <class T> T* as() const { return static_cast<T*>(data); }
};

}  // namespace multipole
