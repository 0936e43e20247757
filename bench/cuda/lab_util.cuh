#pragma once
// What the kernel lab's standalone programs share: LAB_CHECK (report a CUDA error with its
// call and exit), a device copy of a host vector, a step captured into a CUDA graph, its
// replay timed the way multipole's bench times a decode step (L2 flushed by a 256 MiB memset
// before the run), the median, and the library's launch config of a cluster grid under the
// lab's name.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "cuda/common.cuh"

#define LAB_CHECK(x)                                                                            \
  do {                                                                                          \
    const cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

namespace lab {

// A device copy of a host vector.
template <class T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  LAB_CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  LAB_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

inline double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// `step` captured once into a CUDA graph, as the bench replays a decode step; uploaded by
// one replay.
struct Graph {
  cudaGraph_t graph{};
  cudaGraphExec_t exec{};
  Graph(const std::function<void(cudaStream_t)>& step, cudaStream_t s) {
    LAB_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    step(s);
    LAB_CHECK(cudaStreamEndCapture(s, &graph));
    LAB_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    LAB_CHECK(cudaGraphLaunch(exec, s));
    LAB_CHECK(cudaStreamSynchronize(s));
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
};

// Times single replays of a graph on its own stream.
class FlushedTimer {
 public:
  static constexpr size_t kFlushBytes = size_t(256) << 20;
  FlushedTimer() {
    LAB_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LAB_CHECK(cudaEventCreate(&a_));
    LAB_CHECK(cudaEventCreate(&b_));
    LAB_CHECK(cudaMalloc(&flush_, kFlushBytes));
  }
  FlushedTimer(const FlushedTimer&) = delete;
  FlushedTimer& operator=(const FlushedTimer&) = delete;
  cudaStream_t stream() const { return stream_; }
  // Microseconds of one replay of `g`, after an L2 flush (a memset whose byte changes with
  // `i`, as the bench's) when `cold`.
  double run_us(const Graph& g, bool cold, int i) {
    if (cold) LAB_CHECK(cudaMemsetAsync(flush_, i & 0xff, kFlushBytes, stream_));
    LAB_CHECK(cudaEventRecord(a_, stream_));
    LAB_CHECK(cudaGraphLaunch(g.exec, stream_));
    LAB_CHECK(cudaEventRecord(b_, stream_));
    LAB_CHECK(cudaEventSynchronize(b_));
    float ms = 0;
    LAB_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return double(ms) * 1e3;
  }
  // Flushes the L2 the same way before an untimed launch (e.g. a profiled one).
  void flush(int i) { LAB_CHECK(cudaMemsetAsync(flush_, i & 0xff, kFlushBytes, stream_)); }

 private:
  cudaStream_t stream_{};
  cudaEvent_t a_{}, b_{};
  void* flush_ = nullptr;
};

// A launch of `clusters` clusters of `cluster` CTAs of `threads` (the library's).
using multipole::cuda::detail::cluster_launch_config;

}  // namespace lab
