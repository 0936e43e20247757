#pragma once
// LAB_CHECK for the kernel lab's standalone programs: report a CUDA error with its call and
// exit.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define LAB_CHECK(x)                                                                            \
  do {                                                                                          \
    const cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
