#pragma once
// GGUF (ggml) quantised block formats: layouts, dequantisation, and the matrix-vector
// products that decode runs straight on quantised weights (never dequantising a matrix).
//
// Layouts, little-endian; d, m, dmin are f16; a row of `cols` values is cols/block_size
// consecutive blocks. "nibble" j of qs[16] is qs[j] & 15 for value j and qs[j] >> 4 for
// value j+16.
//   Q4_0  32 values, 18 B: d, qs[16]                   x = d * (q - 8)
//   Q4_1  32 values, 20 B: d, m, qs[16]                x = d * q + m
//   Q5_0  32 values, 22 B: d, qh[4], qs[16]            x = d * (q - 16), q = nibble | bit i of qh << 4
//   Q5_1  32 values, 24 B: d, m, qh[4], qs[16]         x = d * q + m
//   Q8_0  32 values, 34 B: d, int8 q[32]               x = d * q
//   Q4_K 256 values, 144 B: d, dmin, scales[12], qs[128]
//        8 sub-blocks of 32 with 6-bit scale sc_j and min m_j packed in scales[12];
//        x = d * sc_j * q - dmin * m_j. Chunk c (values 64c..64c+63) uses qs[32c..32c+31]:
//        low nibbles are sub-block 2c, high nibbles sub-block 2c+1.
//   Q5_K 256 values, 176 B: d, dmin, scales[12], qh[32], qs[128]
//        as Q4_K with a fifth bit: value l of sub-block j has bit j of qh[l] as bit 4.
//   Q6_K 256 values, 210 B: ql[128], qh[64], int8 scales[16], d
//        16 sub-blocks of 16, x = d * scales[s] * (q - 32), q = 4 bits of ql | 2 bits of qh.
// F32, F16 and BF16 rows are handled by the same entry points (block size 1).
//
// The dot products quantise the activations to int8 (Q8Activations: one f32 scale per 32
// values, as llama.cpp does) and multiply in integers with AVX2; the error this adds is
// bounded by sum over blocks of (d_x / 2) * sum |w| (see tests/core/test_quant.cpp).
// ActivationPrecision::F32 keeps the activations in f32 instead (blocks unpacked to f32).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace multipole {

class ThreadPool;

// Numbers are the ggml_type numbers of GGUF files; only types with kernels here are listed.
enum class QuantType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

struct QuantTraits {
  std::string_view name;    // "Q4_K"
  int64_t block_size = 0;   // values per block
  int64_t block_bytes = 0;  // bytes per block
};

QuantTraits quant_traits(QuantType t);
// nullopt for ggml types without kernels here (Q2_K, IQ*, ...).
std::optional<QuantType> quant_type_from_ggml(uint32_t ggml_type);
// Throws unless `cols` is a positive multiple of the block size.
int64_t quant_row_bytes(QuantType t, int64_t cols);

// out [n] = the n values stored in `row` (n a multiple of the block size).
void dequantize_row(QuantType t, const void* row, float* out, int64_t n);

// Activation rows quantised to int8 for the integer dot products. Row r, value i:
// x ~= d(r)[i / 32] * q(r)[i], q in [-127, 127], d = max |x| / 127 over the 32 values;
// sums(r)[k] is the sum of q over values 16k..16k+15, and dsum(r)[g] = d[g] * (sum of q over
// the 32 values of block g) (weight formats with an offset or a min need them).
class Q8Activations {
 public:
  // x [rows, cols] row-major, cols a positive multiple of 32. Reuses its buffers.
  void quantize(const float* x, int64_t rows, int64_t cols);
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const int8_t* q(int64_t row) const { return q_.data() + row * cols_; }
  const float* d(int64_t row) const { return d_.data() + row * (cols_ / 32); }
  const int16_t* sums(int64_t row) const { return sums_.data() + row * (cols_ / 16); }
  const float* dsum(int64_t row) const { return dsum_.data() + row * (cols_ / 32); }

 private:
  int64_t rows_ = 0, cols_ = 0;
  std::vector<int8_t> q_;
  std::vector<float> d_;
  std::vector<int16_t> sums_;
  std::vector<float> dsum_;
};

// View of a weight matrix W [rows, cols] stored row by row (a GGUF tensor with
// dims [cols, rows]): row r starts at data + r * quant_row_bytes(type, cols).
struct QuantMatrix {
  QuantType type = QuantType::F32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Dot of one stored row of `cols` values with activation row `xrow` of `x` (x.cols() == cols).
// Quantised types only (F32/F16/BF16 rows take f32 activations: use dot_row_f32).
float dot_row(QuantType t, const void* row, const Q8Activations& x, int64_t xrow);
// Dot of one stored row with f32 values x [cols], without quantising x: dequantises block by
// block and accumulates in f32. Every type; slower for quantised types than dot_row.
float dot_row_f32(QuantType t, const void* row, const float* x, int64_t cols);

// How the products treat the activations of quantised weights. Int8: quantised per 32
// values (as llama.cpp does) for integer dot products, the fast path. F32: kept in f32
// while each weight block is dequantised (about as exact as f32 rounding allows, several
// times slower); for measurements that must not see the activation rounding (evaluation).
enum class ActivationPrecision { Int8, F32 };

// y [rows] = W x, x [cols]. Quantised W: x is quantised to int8 first (into `scratch` when
// given, so that a decode loop does not allocate). Rows are split over `pool` if given
// (not from inside a task of that same pool; matrices under 64 KiB stay on this thread).
void gemv(const QuantMatrix& w, const float* x, float* y, ThreadPool* pool = nullptr,
          Q8Activations* scratch = nullptr, ActivationPrecision precision = ActivationPrecision::Int8);
// y [n, rows] = x [n, cols] W^T: n activation rows at once (prefill). Each weight block is
// unpacked once for up to 4 activation rows. Per row the result equals gemv's up to f32
// rounding (the partial sums are grouped differently).
void gemm(const QuantMatrix& w, const float* x, int64_t n, float* y, ThreadPool* pool = nullptr,
          Q8Activations* scratch = nullptr, ActivationPrecision precision = ActivationPrecision::Int8);

// One matrix of a gemm_group and where its product goes: y [n, w.rows].
struct GemmOutput {
  QuantMatrix w;
  float* y = nullptr;
};
inline constexpr size_t kMaxGroupMatrices = 8;
// gemm of several matrices with the same input x [n, cols] (q/k/v, gate/up): x is quantised
// once and all their rows go to the pool in one loop (one wake-up and one wait instead of
// one per matrix). Every matrix has `cols` columns; at most kMaxGroupMatrices of them.
void gemm_group(std::span<const GemmOutput> outs, const float* x, int64_t n, ThreadPool* pool = nullptr,
                Q8Activations* scratch = nullptr, ActivationPrecision precision = ActivationPrecision::Int8);

}  // namespace multipole
