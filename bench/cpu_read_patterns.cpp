// How fast can this machine's cores read? The plain-copy and plain-read figures of
// `multipole bench attention` (a memcpy counted as read + write bytes, and a one-stream
// vector sum) against read loops that keep more misses in flight: several interleaved
// streams per thread, software prefetch at several distances. Dense CPU decode can only
// read as fast as the best of these (docs/benchmarks.md, issue 2's "70% of plain copy").
//   cpu_read_patterns [MiB] [threads...]      (defaults: 512, then 1 2)
// GB/s of the median of 7 passes; each thread reads its own contiguous share.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "multipole/core/tensor.hpp"

using namespace multipole;

namespace {

enum class Prefetch { none, t0, t1, t2, nta };

// Sum of [lo, hi) of `base` as `streams` interleaved sub-ranges, 128 bytes of each per step,
// with an optional software prefetch `dist` bytes ahead in each stream.
template <Prefetch kPf, int kStreams>
float read_range(const std::byte* base, size_t lo, size_t hi, size_t dist) {
  const size_t per = (hi - lo) / kStreams / 128 * 128;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t j = 0; j < per; j += 128)
    for (int k = 0; k < kStreams; ++k) {
      const std::byte* p = base + lo + size_t(k) * per + j;
      // Inline asm: GCC deletes prefetch-only statements it sees no effect of.
      if constexpr (kPf == Prefetch::t0) asm volatile("prefetcht0 %0" : : "m"(*(p + dist)));
      if constexpr (kPf == Prefetch::t1) asm volatile("prefetcht1 %0" : : "m"(*(p + dist)));
      if constexpr (kPf == Prefetch::t2) asm volatile("prefetcht2 %0" : : "m"(*(p + dist)));
      if constexpr (kPf == Prefetch::nta) asm volatile("prefetchnta %0" : : "m"(*(p + dist)));
      if constexpr (kPf != Prefetch::none) asm volatile("prefetcht2 %0" : : "m"(*(p + dist + 64)));
      const float* f = reinterpret_cast<const float*>(p);
      s0 = _mm256_add_ps(s0, _mm256_load_ps(f));
      s1 = _mm256_add_ps(s1, _mm256_load_ps(f + 8));
      s2 = _mm256_add_ps(s2, _mm256_load_ps(f + 16));
      s3 = _mm256_add_ps(s3, _mm256_load_ps(f + 24));
    }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  return t[0];
}

// Median seconds of 7 passes of body(thread, lo, hi) over `bytes`, split across `threads`.
template <class Body>
double median_seconds(int threads, size_t bytes, Body body) {
  std::vector<double> times;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i)
      pool.emplace_back([&, i] {
        body(i, bytes * size_t(i) / size_t(threads) / 128 * 128, bytes * size_t(i + 1) / size_t(threads) / 128 * 128);
      });
    for (auto& t : pool) t.join();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int mib = 512;
  std::vector<int> thread_counts;
  for (int i = 1; i < argc; ++i) {
    char* end = nullptr;
    const long v = std::strtol(argv[i], &end, 10);
    if (end == argv[i] || *end != '\0' || v <= 0 || v > 65536) {
      std::fprintf(stderr, "cpu_read_patterns: argument %d '%s' is not an integer in [1, 65536]\n", i, argv[i]);
      return 2;
    }
    if (i == 1) mib = int(v);
    else thread_counts.push_back(int(v));
  }
  if (thread_counts.empty()) thread_counts = {1, 2};
  const size_t bytes = size_t(mib) << 20;
  AlignedBuffer a(bytes), b(bytes);  // huge pages where the kernel gives them (as the KV pool)
  std::memset(a.data(), 1, bytes);
  std::memset(b.data(), 2, bytes);
  std::vector<float> sink(64);
  std::printf("%d MiB per buffer; GB/s, median of 7 passes\n", mib);
  for (const int T : thread_counts) {
    const double copy = 2.0 * double(bytes) / median_seconds(T, bytes, [&](int, size_t lo, size_t hi) {
      std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
    });
    std::printf("threads %d: plain copy (read + write) %.1f\n", T, copy / 1e9);
    auto row = [&](const std::string& name, auto fn) {
      const double bw = double(bytes) / median_seconds(T, bytes, [&](int i, size_t lo, size_t hi) {
        sink[size_t(i) % sink.size()] += fn(a.data(), lo, hi);
      });
      std::printf("threads %d: %-34s %6.1f  (%3.0f%% of copy)\n", T, name.c_str(), bw / 1e9, 100.0 * bw / copy);
    };
    row("read, 1 stream (bench's plain read)", [](auto p, size_t lo, size_t hi) { return read_range<Prefetch::none, 1>(p, lo, hi, 0); });
    row("read, 2 streams", [](auto p, size_t lo, size_t hi) { return read_range<Prefetch::none, 2>(p, lo, hi, 0); });
    row("read, 4 streams", [](auto p, size_t lo, size_t hi) { return read_range<Prefetch::none, 4>(p, lo, hi, 0); });
    row("read, 8 streams", [](auto p, size_t lo, size_t hi) { return read_range<Prefetch::none, 8>(p, lo, hi, 0); });
    for (const size_t d : {size_t(512), size_t(2048), size_t(8192)}) {
      char at[32];
      std::snprintf(at, sizeof at, " %zu B ahead", d);
      auto label = [&](const char* what) { return std::string(what).append(at); };
      row(label("prefetcht0"), [d](auto p, size_t lo, size_t hi) { return read_range<Prefetch::t0, 1>(p, lo, hi, d); });
      row(label("prefetcht1"), [d](auto p, size_t lo, size_t hi) { return read_range<Prefetch::t1, 1>(p, lo, hi, d); });
      row(label("prefetcht2"), [d](auto p, size_t lo, size_t hi) { return read_range<Prefetch::t2, 1>(p, lo, hi, d); });
      row(label("prefetchnta"), [d](auto p, size_t lo, size_t hi) { return read_range<Prefetch::nta, 1>(p, lo, hi, d); });
      row(label("4 streams, prefetcht1"), [d](auto p, size_t lo, size_t hi) { return read_range<Prefetch::t1, 4>(p, lo, hi, d); });
    }
  }
  return sink[0] == -1.0f ? 1 : 0;  // keeps the sums
}
