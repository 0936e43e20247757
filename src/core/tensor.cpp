#include "multipole/core/tensor.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <utility>

#include "multipole/core/error.hpp"

namespace multipole {

AlignedBuffer::AlignedBuffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  // Large buffers (KV cache pools, weights) are 2 MiB aligned and asked to be backed by
  // transparent huge pages: streaming a paged KV cache touches a new 4 KiB page every few
  // hundred bytes per head, and the TLB misses cost ~25% of dense decode bandwidth.
  const size_t huge = size_t(2) << 20;
  const size_t align = bytes >= 2 * huge ? huge : kAlignment;
  size_t rounded = (bytes + align - 1) / align * align;
  data_ = static_cast<std::byte*>(std::aligned_alloc(align, rounded));
  if (!data_) fail("out of memory: could not allocate {} bytes", bytes);
#ifdef MADV_HUGEPAGE
  if (align == huge) madvise(data_, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
}

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.rank = int(shape.size());
  MP_CHECK(v.rank <= kMaxRank, "tensor rank {} exceeds the limit {}", v.rank, kMaxRank);
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.stride[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::byte* TensorView::element(std::initializer_list<int64_t> index) const {
  MP_CHECK(int(index.size()) == rank, "tensor index has {} coordinates, tensor rank is {}", index.size(), rank);
  int64_t offset = 0;
  int d = 0;
  for (int64_t i : index) {
    MP_CHECK(i >= 0 && i < shape[d], "tensor index {} out of range [0, {}) in dimension {}", i, shape[d], d);
    offset += i * stride[d++];
  }
  return static_cast<std::byte*>(data) + offset * int64_t(dtype_size(dtype));
}

std::string TensorView::shape_string() const {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace multipole
