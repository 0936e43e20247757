// Quantised blocks: dequantisation against golden values of an independent implementation
// (gguf's numpy dequantizers, via scripts/make-quant-golden.py), and the integer dot
// products / GEMV / GEMM against dequantise-then-f64 references with stated tolerances.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "multipole/core/dtype.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/quant.hpp"
#include "multipole/core/thread_pool.hpp"
#include "simd_levels.hpp"
#include "test_scale.hpp"

#if __has_include("multipole/io/gguf.hpp")
#include "multipole/io/gguf.hpp"
#define MULTIPOLE_TEST_HAVE_GGUF 1
#endif

using namespace multipole;
using json = nlohmann::json;

namespace {

const json& golden() {
  static const json g = [] {
    std::ifstream in(std::string(MULTIPOLE_SOURCE_DIR) + "/tests/core/data/quant_golden.json");
    EXPECT_TRUE(in.good()) << "tests/core/data/quant_golden.json is missing";
    return json::parse(in);
  }();
  return g;
}

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = uint8_t(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

QuantType type_of(const json& entry) {
  auto t = quant_type_from_ggml(entry.at("ggml_type").get<uint32_t>());
  EXPECT_TRUE(t.has_value()) << entry.at("type");
  return *t;
}

using multipole::test::small_scale;

const QuantType kQuantTypes[] = {QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1,
                                 QuantType::Q8_0, QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K};

// Random bytes with the f16 scale fields (byte offsets from the layouts) set to finite values.
std::vector<uint8_t> random_blocks(QuantType t, int64_t blocks, std::mt19937& rng) {
  const QuantTraits tr = quant_traits(t);
  std::vector<uint8_t> raw(static_cast<size_t>(blocks * tr.block_bytes));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : raw) b = uint8_t(byte(rng));
  std::vector<int> fields;
  switch (t) {
    case QuantType::Q4_1: case QuantType::Q5_1: case QuantType::Q4_K: case QuantType::Q5_K: fields = {0, 2}; break;
    case QuantType::Q6_K: fields = {208}; break;
    default: fields = {0}; break;
  }
  std::uniform_real_distribution<float> mag(1e-3f, 0.1f);
  for (int64_t b = 0; b < blocks; ++b) {
    for (size_t k = 0; k < fields.size(); ++k) {
      const float s = (k == 0 && (rng() & 3) == 0) ? -mag(rng) : mag(rng);
      const uint16_t h = f32_to_f16(k == 1 ? s * 0.5f : s);
      std::memcpy(&raw[size_t(b * tr.block_bytes + fields[k])], &h, 2);
    }
  }
  return raw;
}

std::vector<float> random_vector(int64_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> g(0.f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = g(rng);
  return x;
}

// Tolerances of a quantised dot product of weights w [n] with activations:
//  - against the quantised activations xq (what the integer kernel computes): f32 rounding
//    of the per-32 partial sums, 1e-5 of sum over groups of max|w| * sum |xq| (intermediate
//    terms, before the offset/min corrections cancel, are a few times max|w| * sum |xq|);
//  - against the original x: additionally sum |w_i| |x_i - xq_i| <= sum_g (d_g / 2) sum_g |w|,
//    with d_g = max_g |x| / 127, computed here from x itself.
struct DotRefs {
  double exact_q = 0, exact_x = 0, tol_q = 0, tol_x = 0;
};

DotRefs dot_refs(const float* w, const float* x, const Q8Activations& xa, int64_t xrow, int64_t n) {
  DotRefs r;
  for (int64_t g = 0; g < n / 32; ++g) {
    double maxw = 0, sum_xq = 0, sum_w = 0, maxx = 0;
    for (int64_t i = 32 * g; i < 32 * g + 32; ++i) {
      const double xq = double(xa.d(xrow)[g]) * xa.q(xrow)[i];
      r.exact_q += double(w[i]) * xq;
      r.exact_x += double(w[i]) * x[i];
      maxw = std::max(maxw, std::fabs(double(w[i])));
      sum_w += std::fabs(double(w[i]));
      sum_xq += std::fabs(xq);
      maxx = std::max(maxx, std::fabs(double(x[i])));
    }
    r.tol_q += 1e-5 * maxw * sum_xq;
    r.tol_x += maxx / 127.0 / 2.0 * sum_w * (1 + 1e-6);
  }
  r.tol_q += 1e-30;
  r.tol_x += r.tol_q;
  return r;
}

}  // namespace

TEST(Quant, TraitsAndTypeNumbers) {
  EXPECT_EQ(quant_traits(QuantType::Q4_0).block_bytes, 18);
  EXPECT_EQ(quant_traits(QuantType::Q4_1).block_bytes, 20);
  EXPECT_EQ(quant_traits(QuantType::Q5_0).block_bytes, 22);
  EXPECT_EQ(quant_traits(QuantType::Q5_1).block_bytes, 24);
  EXPECT_EQ(quant_traits(QuantType::Q8_0).block_bytes, 34);
  EXPECT_EQ(quant_traits(QuantType::Q4_K).block_bytes, 144);
  EXPECT_EQ(quant_traits(QuantType::Q5_K).block_bytes, 176);
  EXPECT_EQ(quant_traits(QuantType::Q6_K).block_bytes, 210);
  EXPECT_EQ(quant_row_bytes(QuantType::Q4_1, 576), 18 * 20);
  EXPECT_EQ(quant_row_bytes(QuantType::BF16, 7), 14);
  EXPECT_EQ(quant_type_from_ggml(14), QuantType::Q6_K);
  EXPECT_EQ(quant_type_from_ggml(30), QuantType::BF16);
  EXPECT_FALSE(quant_type_from_ggml(10).has_value());  // Q2_K: no kernels
  EXPECT_FALSE(quant_type_from_ggml(9).has_value());   // Q8_1: activations only in ggml
  EXPECT_FALSE(quant_type_from_ggml(1000).has_value());
  // The golden file's sizes (from the gguf package) agree with ours.
  for (const auto& e : golden().at("types")) {
    const QuantTraits tr = quant_traits(type_of(e));
    EXPECT_EQ(tr.name, e.at("type").get<std::string>());
    EXPECT_EQ(tr.block_size, e.at("block_size").get<int64_t>());
    EXPECT_EQ(tr.block_bytes, e.at("block_bytes").get<int64_t>());
  }
}

TEST(Quant, DequantizeMatchesGgufPackage) {
  const auto& types = golden().at("types");
  ASSERT_EQ(types.size(), 8u);
  for (const auto& e : types) {
    const QuantType t = type_of(e);
    const auto raw = from_hex(e.at("bytes_hex").get<std::string>());
    const auto want = e.at("values").get<std::vector<double>>();
    const int64_t n = e.at("blocks").get<int64_t>() * e.at("block_size").get<int64_t>();
    ASSERT_EQ(int64_t(want.size()), n);
    ASSERT_EQ(int64_t(raw.size()), quant_row_bytes(t, n));
    std::vector<float> got(static_cast<size_t>(n));
    dequantize_row(t, raw.data(), got.data(), n);
    int bad = 0;
    for (int64_t i = 0; i < n && bad < 5; ++i) {
      // Both compute in f32; allow a couple of ulps for a different operation order.
      const double tol = 4e-7 * std::fabs(want[size_t(i)]) + 1e-30;
      if (std::fabs(got[size_t(i)] - want[size_t(i)]) > tol) {
        ADD_FAILURE() << e.at("type") << " value " << i << ": got " << got[size_t(i)] << ", gguf says "
                      << want[size_t(i)];
        ++bad;
      }
    }
  }
}

TEST(Quant, ActivationQuantisationFollowsItsDefinition) {
  std::mt19937 rng(7);
  const int64_t rows = 3, cols = 96;
  auto x = random_vector(rows * cols, rng, 3.f);
  for (int i = 32; i < 64; ++i) x[size_t(i)] = 0.f;  // an all-zero block
  x[5] = 1e-30f;                                      // a tiny value next to big ones
  Q8Activations a;
  a.quantize(x.data(), rows, cols);
  ASSERT_EQ(a.rows(), rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < cols / 32; ++g) {
      float maxx = 0;
      for (int i = 0; i < 32; ++i) maxx = std::max(maxx, std::fabs(x[size_t(r * cols + 32 * g + i)]));
      const float d = a.d(r)[g];
      EXPECT_NEAR(d, maxx / 127.0, 1e-6 * maxx);
      for (int h = 0; h < 2; ++h) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) {
          const int64_t k = 32 * g + 16 * h + i;
          const int q = a.q(r)[k];
          ASSERT_LE(std::abs(q), 127);
          EXPECT_LE(std::fabs(double(d) * q - x[size_t(r * cols + k)]), d / 2 * (1 + 1e-5) + 1e-38) << r << " " << k;
          sum += q;
        }
        EXPECT_EQ(a.sums(r)[2 * g + h], sum);
      }
    }
  }
  EXPECT_EQ(a.d(0)[1], 0.f);
  EXPECT_THROW(a.quantize(x.data(), 1, 48), Error);
  x[7] = std::nanf("");
  EXPECT_THROW(a.quantize(x.data(), 1, 32), Error);
}

// The golden blocks as one row each: the kernel's dot against f64 dots of gguf's values.
TEST(Quant, DotOnGoldenBlocksMatchesF64) {
  std::mt19937 rng(11);
  for (const auto& e : golden().at("types")) {
    const QuantType t = type_of(e);
    const auto raw = from_hex(e.at("bytes_hex").get<std::string>());
    const auto want = e.at("values").get<std::vector<float>>();
    // Skip the edge-scale blocks (one has d = 1000) in the x-error bound: it holds anyway.
    const int64_t n = int64_t(want.size());
    const auto x = random_vector(n, rng);
    Q8Activations a;
    a.quantize(x.data(), 1, n);
    const DotRefs ref = dot_refs(want.data(), x.data(), a, 0, n);
    const float got = dot_row(t, raw.data(), a, 0);
    EXPECT_NEAR(got, ref.exact_q, ref.tol_q) << e.at("type");
    EXPECT_NEAR(got, ref.exact_x, ref.tol_x) << e.at("type");
    // The f32-activation path has no activation error.
    const float got_f = dot_row_f32(t, raw.data(), x.data(), n);
    double abs_sum = 0;
    for (int64_t i = 0; i < n; ++i) abs_sum += std::fabs(double(want[size_t(i)]) * x[size_t(i)]);
    EXPECT_NEAR(got_f, ref.exact_x, 1e-5 * abs_sum) << e.at("type");
  }
}

// Runs a test under one SIMD level (the GEMV has AVX-512 VNNI kernels for some types).
class QuantSimd : public multipole::test::SimdLevelTest {};

MULTIPOLE_INSTANTIATE_SIMD_LEVELS(QuantSimd);

// Random matrices of every type: GEMV (1 and 2 threads) and GEMM (n = 1..7) against the
// f64 reference on dequantised rows (dequantize_row is checked against gguf above). 320
// columns are one group of 8 blocks plus a tail of 2, and 301 or 37 rows leave a tail of 1
// after the 4-row passes of the VNNI kernels.
TEST_P(QuantSimd, GemvAndGemmMatchReference) {
  const bool small = small_scale();
  ThreadPool pool(2);
  std::mt19937 rng(3);
  for (QuantType t : kQuantTypes) {
    const QuantTraits tr = quant_traits(t);
    const int64_t cols = tr.block_size == 256 ? 768 : 320, rows = small ? 37 : 301;
    const auto raw = random_blocks(t, rows * cols / tr.block_size, rng);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      dequantize_row(t, raw.data() + r * quant_row_bytes(t, cols), w.data() + r * cols, cols);
    for (float v : w) ASSERT_TRUE(std::isfinite(v));
    const QuantMatrix m{t, raw.data(), rows, cols};
    const int64_t n = 7;
    const auto x = random_vector(n * cols, rng, 2.f);
    Q8Activations a;
    a.quantize(x.data(), n, cols);

    std::vector<float> y1(static_cast<size_t>(rows)), y2(static_cast<size_t>(rows)), yn(static_cast<size_t>(n * rows));
    gemv(m, x.data(), y1.data());
    Q8Activations scratch;
    gemv(m, x.data(), y2.data(), &pool, &scratch);
    gemm(m, x.data(), n, yn.data(), &pool);
    for (int64_t r = 0; r < rows; ++r) {
      const DotRefs ref = dot_refs(w.data() + r * cols, x.data(), a, 0, cols);
      ASSERT_NEAR(y1[size_t(r)], ref.exact_q, ref.tol_q) << tr.name << " row " << r;
      ASSERT_NEAR(y1[size_t(r)], ref.exact_x, ref.tol_x) << tr.name << " row " << r;
      ASSERT_EQ(y1[size_t(r)], y2[size_t(r)]) << tr.name << " threads change row " << r;
      for (int64_t k = 0; k < n; ++k) {
        const DotRefs rk = dot_refs(w.data() + r * cols, x.data() + k * cols, a, k, cols);
        ASSERT_NEAR(yn[size_t(k * rows + r)], rk.exact_q, rk.tol_q) << tr.name << " gemm " << k << "," << r;
      }
      ASSERT_NEAR(yn[size_t(r)], y1[size_t(r)], ref.tol_q) << tr.name << " gemm row 0 differs from gemv";
    }
  }
}

// gemm_group equals one gemm per matrix (same kernels, bitwise), for a group of matrices of
// different types and row counts sharing one input, on one and two threads.
TEST_P(QuantSimd, GroupEqualsSeparateProducts) {
  ThreadPool pool(2);
  std::mt19937 rng(11);
  const int64_t cols = 256;
  const QuantType types[] = {QuantType::Q4_1, QuantType::Q8_0, QuantType::Q4_0, QuantType::F16};
  const int64_t rows[] = {300, 97, 5, 33};
  std::vector<std::vector<uint8_t>> raw;
  for (int i = 0; i < 4; ++i) {
    if (types[i] == QuantType::F16) {
      const auto w = random_vector(rows[i] * cols, rng);
      raw.emplace_back(size_t(rows[i] * cols * 2));
      convert_from_f32(w.data(), DType::F16, raw.back().data(), w.size());
    } else {
      raw.push_back(random_blocks(types[i], rows[i] * cols / 32, rng));
    }
  }
  for (int64_t n : {1, 3}) {
    const auto x = random_vector(n * cols, rng, 2.f);
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      std::vector<std::vector<float>> separate(4), grouped(4);
      std::vector<GemmOutput> outs;
      for (int i = 0; i < 4; ++i) {
        const QuantMatrix m{types[i], raw[size_t(i)].data(), rows[i], cols};
        separate[size_t(i)].resize(size_t(n * rows[i]));
        grouped[size_t(i)].assign(size_t(n * rows[i]), NAN);
        gemm(m, x.data(), n, separate[size_t(i)].data(), p);
        outs.push_back({m, grouped[size_t(i)].data()});
      }
      Q8Activations scratch;
      gemm_group(outs, x.data(), n, p, &scratch);
      for (int i = 0; i < 4; ++i)
        for (size_t k = 0; k < separate[size_t(i)].size(); ++k)
          ASSERT_EQ(grouped[size_t(i)][k], separate[size_t(i)][k]) << "matrix " << i << " n " << n << " value " << k;
    }
  }
  // Every matrix must take the same input width.
  std::vector<float> x(512), y(600);
  const GemmOutput bad[] = {{QuantMatrix{QuantType::Q4_1, raw[0].data(), 2, 256}, y.data()},
                            {QuantMatrix{QuantType::Q4_1, raw[0].data(), 2, 128}, y.data() + 2}};
  try {
    gemm_group(bad, x.data(), 1, &pool);
    FAIL() << "mismatched columns accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("matrix 1 has 128 columns"), std::string::npos) << e.what();
  }
}

// ActivationPrecision::F32: every quantised type against the f64 product of the dequantised
// rows and the unrounded x, to f32 accumulation error (the int8 path's activation rounding is
// ~100x larger here, so a product that still rounded x fails). n = 1 (where the VNNI GEMV
// would otherwise run), 2 and 5 (a 4-row pass plus a tail); with and without the pool;
// gemm_group too.
TEST_P(QuantSimd, F32ActivationsMatchF64OnDequantisedRows) {
  ThreadPool pool(2);
  std::mt19937 rng(17);
  for (QuantType t : kQuantTypes) {
    const QuantTraits tr = quant_traits(t);
    const int64_t cols = tr.block_size == 256 ? 768 : 320, rows = 37;
    const auto raw = random_blocks(t, rows * cols / tr.block_size, rng);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      dequantize_row(t, raw.data() + r * quant_row_bytes(t, cols), w.data() + r * cols, cols);
    const QuantMatrix m{t, raw.data(), rows, cols};
    for (int64_t n : {1, 2, 5}) {
      const auto x = random_vector(n * cols, rng, 2.f);
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> y(static_cast<size_t>(n * rows), NAN), yg(y.size(), NAN);
        gemm(m, x.data(), n, y.data(), p, nullptr, ActivationPrecision::F32);
        const GemmOutput one[] = {{m, yg.data()}};
        gemm_group(one, x.data(), n, p, nullptr, ActivationPrecision::F32);
        for (int64_t k = 0; k < n; ++k)
          for (int64_t r = 0; r < rows; ++r) {
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < cols; ++i) {
              const double term = double(w[size_t(r * cols + i)]) * x[size_t(k * cols + i)];
              ref += term;
              mag += std::fabs(term);
            }
            ASSERT_NEAR(y[size_t(k * rows + r)], ref, 1e-5 * mag) << tr.name << " n " << n << " row " << r;
            ASSERT_EQ(yg[size_t(k * rows + r)], y[size_t(k * rows + r)]) << tr.name << " group differs";
          }
      }
    }
  }
}

TEST(Quant, FloatRowsUseF32Activations) {
  ThreadPool pool(2);
  std::mt19937 rng(5);
  const int64_t rows = 70, cols = 203;  // not a multiple of 8: the tail path
  const auto w = random_vector(rows * cols, rng);
  const auto x = random_vector(3 * cols, rng);
  for (QuantType t : {QuantType::F32, QuantType::F16, QuantType::BF16}) {
    std::vector<uint8_t> raw(static_cast<size_t>(quant_row_bytes(t, cols) * rows));
    const DType dt = t == QuantType::F32 ? DType::F32 : t == QuantType::F16 ? DType::F16 : DType::BF16;
    convert_from_f32(w.data(), dt, raw.data(), w.size());
    std::vector<float> ws(w.size());  // the stored (rounded) weights
    convert_to_f32(raw.data(), dt, ws.data(), w.size());
    std::vector<float> y(static_cast<size_t>(3 * rows));
    gemm(QuantMatrix{t, raw.data(), rows, cols}, x.data(), 3, y.data(), &pool);
    for (int64_t k = 0; k < 3; ++k)
      for (int64_t r = 0; r < rows; ++r) {
        double ref = 0, mag = 0;
        for (int64_t i = 0; i < cols; ++i) {
          ref += double(ws[size_t(r * cols + i)]) * x[size_t(k * cols + i)];
          mag += std::fabs(double(ws[size_t(r * cols + i)]) * x[size_t(k * cols + i)]);
        }
        ASSERT_NEAR(y[size_t(k * rows + r)], ref, 1e-6 * mag) << quant_traits(t).name;
      }
  }
}

TEST(Quant, RejectsBadShapesAndTypes) {
  std::vector<uint8_t> raw(1024);
  std::vector<float> x(512), y(8);
  EXPECT_THROW(quant_row_bytes(QuantType::Q4_K, 100), Error);
  EXPECT_THROW(quant_row_bytes(QuantType::Q4_0, 0), Error);
  EXPECT_THROW(quant_traits(QuantType(10)), Error);
  EXPECT_THROW(gemv(QuantMatrix{QuantType::Q4_0, raw.data(), 2, 48}, x.data(), y.data()), Error);
  EXPECT_THROW(gemv(QuantMatrix{QuantType::Q8_0, nullptr, 2, 32}, x.data(), y.data()), Error);
  EXPECT_THROW(gemv(QuantMatrix{QuantType::Q8_0, raw.data(), -1, 32}, x.data(), y.data()), Error);
  EXPECT_THROW(gemm(QuantMatrix{QuantType::Q8_0, raw.data(), 1, 32}, x.data(), -2, y.data()), Error);
  Q8Activations a;
  a.quantize(x.data(), 1, 256);
  EXPECT_THROW(dot_row(QuantType::F32, raw.data(), a, 0), Error);
  EXPECT_THROW(dot_row(QuantType::Q8_0, raw.data(), a, 1), Error);
  EXPECT_THROW(dequantize_row(QuantType::Q6_K, raw.data(), y.data(), 32), Error);
  try {
    quant_row_bytes(QuantType::Q6_K, 300);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q6_K"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("300"), std::string::npos) << e.what();
  }
}

// Real weights from the models of scripts/fetch-models.sh, when present: dequantisation
// against statistics that the gguf package computed on the same tensors, and GEMV against
// the f64 reference.
TEST(Quant, RealModelTensors) {
#ifndef MULTIPOLE_TEST_HAVE_GGUF
  GTEST_SKIP() << "no GGUF reader in this build";
#else
  const char* env = std::getenv("MULTIPOLE_MODEL_CACHE");
  const std::string cache = env ? env : std::string(MULTIPOLE_SOURCE_DIR) + "/.cache/models";
  ThreadPool pool(2);
  std::mt19937 rng(13);
  int checked = 0;
  for (const auto& model : golden().at("real")) {
    const std::string path = cache + "/" + model.at("file").get<std::string>();
    std::error_code ec;
    if (std::filesystem::file_size(path, ec) != model.at("size").get<uint64_t>() || ec) continue;
    const GGUFFile file(path);
    for (const auto& te : model.at("tensors")) {
      const GGUFTensor& tensor = file.tensor(te.at("name").get<std::string>());
      const QuantType t = type_of(te);
      ASSERT_EQ(uint32_t(tensor.type), uint32_t(t)) << tensor.name;
      const int64_t cols = te.at("cols").get<int64_t>(), all_rows = int64_t(tensor.dims.at(1));
      ASSERT_EQ(int64_t(tensor.dims.at(0)), cols);
      int64_t rows = te.at("rows").get<int64_t>();
      // Statistics over `rows` rows, as the gguf package computed them.
      std::vector<float> w(static_cast<size_t>(rows * cols));
      const int64_t rb = quant_row_bytes(t, cols);
      const auto* base = reinterpret_cast<const uint8_t*>(tensor.data.data());
      for (int64_t r = 0; r < rows; ++r) dequantize_row(t, base + r * rb, w.data() + r * cols, cols);
      double sum = 0, sum_abs = 0, sum_sq = 0;
      for (float v : w) {
        sum += v;
        sum_abs += std::fabs(v);
        sum_sq += double(v) * v;
      }
      const std::string what = model.at("file").get<std::string>() + " " + tensor.name;
      EXPECT_NEAR(sum, te.at("sum").get<double>(), 1e-9 * sum_abs) << what;
      EXPECT_NEAR(sum_abs, te.at("sum_abs").get<double>(), 1e-9 * sum_abs) << what;
      EXPECT_NEAR(sum_sq, te.at("sum_sq").get<double>(), 1e-9 * sum_sq) << what;
      for (const auto& s : te.at("samples")) {
        const double want = s.at(1).get<double>();
        EXPECT_NEAR(w[s.at(0).get<size_t>()], want, 4e-7 * std::fabs(want)) << what << " at " << s.at(0);
      }
      // GEMV on (a slice of) the real matrix.
      if (small_scale()) rows = std::min<int64_t>(rows, 64);
      rows = std::min(rows, all_rows);
      const auto x = random_vector(cols, rng);
      Q8Activations a;
      a.quantize(x.data(), 1, cols);
      std::vector<float> y(static_cast<size_t>(rows));
      gemv(QuantMatrix{t, base, rows, cols}, x.data(), y.data(), &pool);
      for (int64_t r = 0; r < rows; ++r) {
        const DotRefs ref = dot_refs(w.data() + r * cols, x.data(), a, 0, cols);
        ASSERT_NEAR(y[size_t(r)], ref.exact_q, ref.tol_q) << what << " row " << r;
        ASSERT_NEAR(y[size_t(r)], ref.exact_x, ref.tol_x) << what << " row " << r;
      }
      ++checked;
    }
  }
  if (checked == 0)
    GTEST_SKIP() << "no real model in " << cache << " (run scripts/fetch-models.sh; see docs/models.md)";
#endif
}
