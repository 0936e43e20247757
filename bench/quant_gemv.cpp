// GEMV/GEMM speed on quantised weights, in GB/s of weight bytes read, for the matrix shapes
// of SmolLM2-135M (Q4_1 + Q8_0 tied embeddings) and Qwen2.5-Coder-0.5B (Q5_0/Q4_K/Q6_K).
//   quant_gemv [--f32-activations] [threads...]      (default: 1 2)
// "hot": one matrix again and again (in cache: the kernel's compute speed);
// "model": every matrix of every layer in turn, as one decode step reads them (from memory).
// Weights are random blocks with valid scales; speed does not depend on their values.
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "multipole/core/dtype.hpp"
#include "multipole/core/quant.hpp"
#include "multipole/core/thread_pool.hpp"

using namespace multipole;

namespace {

struct Shape {
  const char* name;
  QuantType type;
  int64_t rows, cols;
  int per_layer;  // how many matrices of this shape one layer has (0: once per model)
};

std::vector<uint8_t> random_matrix(QuantType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::vector<uint8_t> raw(size_t(quant_row_bytes(t, cols) * rows));
  for (auto& b : raw) b = uint8_t(rng());
  const QuantTraits tr = quant_traits(t);
  const int scale_at = t == QuantType::Q6_K ? 208 : 0;
  const uint16_t h = f32_to_f16(0.01f);
  for (size_t off = 0; off < raw.size(); off += size_t(tr.block_bytes)) {
    std::memcpy(&raw[off + scale_at], &h, 2);
    if (t == QuantType::Q4_1 || t == QuantType::Q5_1 || t == QuantType::Q4_K || t == QuantType::Q5_K)
      std::memcpy(&raw[off + 2], &h, 2);
  }
  return raw;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// CPU time of the whole process: on a loaded machine wall time overstates the cost.
double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

ActivationPrecision g_precision = ActivationPrecision::Int8;

void run_model(const char* model, const std::vector<Shape>& shapes, int layers, int threads) {
  ThreadPool pool(threads);
  std::mt19937 rng(1);
  struct Mat {
    Shape s;
    std::vector<uint8_t> raw;
  };
  std::vector<Mat> mats;
  double bytes = 0;
  for (const Shape& s : shapes) {
    const int copies = s.per_layer == 0 ? 1 : s.per_layer * layers;
    for (int c = 0; c < copies; ++c) {
      mats.push_back({s, random_matrix(s.type, s.rows, s.cols, rng)});
      bytes += double(mats.back().raw.size());
    }
  }
  std::vector<float> x(1 << 16), y(1 << 18);
  std::normal_distribution<float> g;
  for (auto& v : x) v = g(rng);
  Q8Activations scratch;

  // Hot: each shape on its own, repeated for ~0.3 s.
  for (const Shape& s : shapes) {
    const Mat* m = nullptr;
    for (const Mat& mm : mats)
      if (mm.s.name == s.name) m = &mm;
    const QuantMatrix w{s.type, m->raw.data(), s.rows, s.cols};
    int iters = 0;
    auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_seconds();
    do {
      gemv(w, x.data(), y.data(), &pool, &scratch, g_precision);
      ++iters;
    } while (seconds_since(t0) < 0.3);
    const double dt = seconds_since(t0) / iters, ct = (cpu_seconds() - c0) / iters;
    std::printf("%-6s %-12s %-5s [%6lld x %5lld] %d thr: hot %8.1f us %6.1f GB/s wall, %6.1f GB/s per CPU-second\n",
                model, s.name, std::string(quant_traits(s.type).name).c_str(), (long long)s.rows,
                (long long)s.cols, threads, dt * 1e6, double(m->raw.size()) / dt / 1e9,
                double(m->raw.size()) / ct / 1e9);
  }
  // Model: all matrices once per "token".
  int iters = 0;
  auto t0 = std::chrono::steady_clock::now();
  const double c0 = cpu_seconds();
  do {
    for (const Mat& m : mats)
      gemv(QuantMatrix{m.s.type, m.raw.data(), m.s.rows, m.s.cols}, x.data(), y.data(), &pool, &scratch, g_precision);
    ++iters;
  } while (seconds_since(t0) < 1.0);
  const double dt = seconds_since(t0) / iters, ct = (cpu_seconds() - c0) / iters;
  std::printf("%-6s all %zu matrices (%.1f MB) %d thr: %.2f ms per token, %.1f GB/s wall (%.0f tok/s bound), "
              "%.1f GB/s per CPU-second\n",
              model, mats.size(), bytes / 1e6, threads, dt * 1e3, bytes / dt / 1e9, 1.0 / dt, bytes / ct / 1e9);
  // Prefill-style GEMM on the largest per-layer shape, 64 tokens.
  const Mat& big = mats.front();
  const int64_t n = 64;
  std::vector<float> xs(size_t(n * big.s.cols)), ys(size_t(n * big.s.rows));
  for (auto& v : xs) v = g(rng);
  iters = 0;
  t0 = std::chrono::steady_clock::now();
  do {
    gemm(QuantMatrix{big.s.type, big.raw.data(), big.s.rows, big.s.cols}, xs.data(), n, ys.data(), &pool, &scratch,
         g_precision);
    ++iters;
  } while (seconds_since(t0) < 0.3);
  const double gt = seconds_since(t0) / iters;
  std::printf("%-6s gemm %s x %lld tokens %d thr: %.1f GFLOP/s (%.1f us per token)\n", model, big.s.name,
              (long long)n, threads, 2.0 * n * big.s.rows * big.s.cols / gt / 1e9, gt / n * 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--f32-activations") == 0)
      g_precision = ActivationPrecision::F32;
    else
      threads.push_back(std::atoi(argv[i]));
  }
  if (threads.empty()) threads = {1, 2};
  // SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 kv heads of 64, ffn 1536, vocab 49152.
  const std::vector<Shape> smol = {
      {"ffn_gate/up", QuantType::Q4_1, 1536, 576, 2}, {"ffn_down", QuantType::Q4_1, 576, 1536, 1},
      {"attn_q/o", QuantType::Q4_1, 576, 576, 2},     {"attn_k/v", QuantType::Q4_1, 192, 576, 2},
      {"output", QuantType::Q8_0, 49152, 576, 0},
  };
  // Qwen2.5-Coder-0.5B (the PyPI Q4_K_M file): 24 layers, hidden 896, ffn 4864, vocab 151936;
  // ffn_down is Q6_K in most layers (Q4_K in some), the rest Q5_0, output Q8_0.
  const std::vector<Shape> qwen = {
      {"ffn_gate/up", QuantType::Q5_0, 4864, 896, 2}, {"ffn_down", QuantType::Q6_K, 896, 4864, 1},
      {"ffn_down4k", QuantType::Q4_K, 896, 4864, 0},  {"attn_q/o", QuantType::Q5_0, 896, 896, 2},
      {"attn_k/v", QuantType::Q5_0, 128, 896, 2},     {"output", QuantType::Q8_0, 151936, 896, 0},
  };
  for (int t : threads) run_model("smol", smol, 30, t);
  for (int t : threads) run_model("qwen05", qwen, 24, t);
}
