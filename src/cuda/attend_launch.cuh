#pragma once
// Instantiation and dispatch of the attention kernel for one KV storage type T: head dim
// {64, 128} x tensor-core rows {8, 16} x {dense, multipole}. Included by one .cu per T.
#include "cuda/attend.cuh"
#include "cuda/check.hpp"

namespace multipole::cuda::detail {

template <int D, int GC, class T, bool MP>
void configure_attend() {
  static const bool done = [] {
    MP_CUDA_CHECK(cudaFuncSetAttribute(attend_kernel<D, GC, T, MP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       AttendShape<D, GC, MP>::kSmem));
    return true;
  }();
  (void)done;
}

template <int D, int GC, class T, bool MP>
void launch_attend_one(const AttendArgs& a, int items, Stream stream) {
  configure_attend<D, GC, T, MP>();
  const dim3 grid(items, a.num_kv_heads * a.head_chunks);
  MP_CUDA_CHECK(launch_maybe_pdl(attend_kernel<D, GC, T, MP>, grid, dim3(AttendShape<D, GC, MP>::kThreads),
                                  AttendShape<D, GC, MP>::kSmem, stream, MP && a.pdl, a));
}

template <int D, int GC, class T, bool MP>
int occupancy_one() {
  configure_attend<D, GC, T, MP>();
  int n = 0;
  MP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, attend_kernel<D, GC, T, MP>,
                                                              AttendShape<D, GC, MP>::kThreads, AttendShape<D, GC, MP>::kSmem));
  return n;
}

// Calls f.template operator()<D, ROWS, MP>() for the runtime shape.
template <class F>
void dispatch_attend(int head_dim, int rows, bool mp, F&& f) {
  auto by_gc = [&]<int D, bool MP>() {
    if (rows <= 8)
      f.template operator()<D, 8, MP>();
    else
      f.template operator()<D, 16, MP>();
  };
  if (head_dim == 64)
    mp ? by_gc.template operator()<64, true>() : by_gc.template operator()<64, false>();
  else
    mp ? by_gc.template operator()<128, true>() : by_gc.template operator()<128, false>();
}

template <class T>
void launch_attend_typed(const AttendArgs& a, int head_dim, int gc, bool mp, int items, Stream stream) {
  dispatch_attend(head_dim, gc, mp, [&]<int D, int GC, bool MP>() { launch_attend_one<D, GC, T, MP>(a, items, stream); });
}

template <class T>
int attend_occupancy_typed(int head_dim, int gc, bool mp) {
  int n = 0;
  dispatch_attend(head_dim, gc, mp, [&]<int D, int GC, bool MP>() { n = occupancy_one<D, GC, T, MP>(); });
  return n;
}

}  // namespace multipole::cuda::detail
