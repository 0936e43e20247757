#pragma once
// The k-means assignment (prefill, src/cuda/kmeans.cu; timed alone by bench/cuda/kmeans_assign.cu):
// each point's nearest centroid of its block, ||c||^2 - 2 x.c on the centred f16 copies with f32
// accumulation, argmin with the lowest index on ties, dist2 = max(0, ||x||^2 + min). One CTA of
// 4 warps per kKmTilePoints (128) points of a block; the block's centroids stream through shared
// memory kAssignCents at a time (cp.async stages). Two forms of the tile, the same function:
//   assign_tile_wgmma: sm_90a's warpgroup mma (the 4 warps as one warpgroup, 2 x m64 rows of
//     points in registers, 64 centroids a wgmma from shared memory in the 128-byte swizzled
//     layout, S stages), the library's where the code is sm_90a's;
//   assign_tile_mma: mma.sync m16n8k16 (each warp 32 points), for the PTX that other GPUs compile.
// They differ in the order of the f32 sums only. f16 operands (11-bit significands, on data
// centred per block) keep the distance error ~8x below bf16's at the same rate.
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kmeans_launch.hpp"

namespace multipole::cuda::detail {

constexpr int kAssignCents = 64;  // centroids per shared-memory stage

struct KmAssign {
  const KmBlock* blocks;
  const KmTile* tiles;  // [tiles] one a CTA
  const __half* xb;     // [P, D] points centred on their block's mean
  const float* xnorm;   // [P] their squared norms
  const __half* centb;  // [K, D] centroids centred likewise
  const float* cnorm;   // [K] their squared norms; +inf past a block's active clusters
  int32_t* labels;      // [P] out: block-local cluster
  float* dist2;         // [P] out: squared distance to it
};

// The A fragments of 16-row tiles of points in mma's layout (which wgmma's register A shares):
// a[t][ks] = rows row0(t) + grp (+8), columns 16 ks + 2 tig (+8); rows past the block are zero.
template <int D, int T, class Row0>
__device__ __forceinline__ void load_point_fragments(const KmAssign& a, const KmBlock& blk, Row0 row0,
                                                     uint32_t (&frag)[T][D / 16][4]) {
  const int lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(a.xb);
#pragma unroll
  for (int t = 0; t < T; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0(t) + grp + h * 8;
      const bool ok = r < blk.n;
      const int64_t base = (int64_t(blk.point_begin) + (ok ? r : 0)) * (D / 2);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        frag[t][ks][h] = ok ? xw[base + ks * 8 + tig] : 0u;
        frag[t][ks][h + 2] = ok ? xw[base + ks * 8 + 4 + tig] : 0u;
      }
    }
}

// Candidate centroids c and c + 1 at distances (less ||x||^2) d0, d1 for one row: the strict
// compare keeps the lower index on ties, as candidates arrive in ascending order.
__device__ __forceinline__ void keep_nearest(float& best_v, int& best_i, float d0, float d1, int c) {
  if (d0 < best_v) best_v = d0, best_i = c;
  if (d1 < best_v) best_v = d1, best_i = c + 1;
}

// The four lanes of a row merge their bests (lowest index on ties) and lane tig 0 writes it.
__device__ __forceinline__ void write_nearest(const KmAssign& a, const KmBlock& blk, int r, float v, int i) {
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, m);
    const int oi = __shfl_xor_sync(0xffffffffu, i, m);
    if (ov < v || (ov == v && oi < i)) v = ov, i = oi;
  }
  if ((threadIdx.x & 3) == 0 && r < blk.n) {
    const int64_t g = int64_t(blk.point_begin) + r;
    a.labels[g] = i == 0x7fffffff ? 0 : i;
    a.dist2[g] = fmaxf(0.0f, a.xnorm[g] + v);
  }
}

// Stage st's centroids of the block into `tile`, chunk pc (16 bytes) of row r at place(r, pc),
// zeros past the block, and their norms into snorm (+inf past it); one cp.async group.
template <int D, class Place>
__device__ __forceinline__ void load_centroid_stage(const KmAssign& a, const KmBlock& blk, int st, unsigned char* tile,
                                                    float* snorm, Place place) {
  const int c0 = st * kAssignCents;
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  for (int x = threadIdx.x; x < kAssignCents * kPieces; x += 128) {
    const int r = x / kPieces, pc = x % kPieces;
    const bool ok = c0 + r < blk.k;
    const __half* src = a.centb + (int64_t(blk.cluster_begin) + (ok ? c0 + r : 0)) * D + pc * 8;
    cp_async16(tile + place(r, pc), src, ok);
  }
  if (threadIdx.x < kAssignCents) {
    const int c = c0 + threadIdx.x;
    snorm[threadIdx.x] = c < blk.k ? a.cnorm[blk.cluster_begin + c] : __int_as_float(0x7f800000);
  }
  cp_async_commit();
}

// A cp.async pipeline of S shared-memory stages: load(s, buf) issues the copies of stage s into
// buffer buf and commits them as one group; past the last stage an empty group keeps the count,
// so every wait is the same. Each round ends with a barrier before its buffer is loaded again.
template <int S, class Load>
__device__ __forceinline__ void pipeline_start(int stages, const Load& load) {
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < stages) load(s, s);
    else cp_async_commit();
  }
}
// Issues stage st + S - 1, then waits for this thread's copies of stage st.
template <int S, class Load>
__device__ __forceinline__ void pipeline_await(int st, int stages, const Load& load) {
  const int next = st + S - 1;
  if (next < stages) load(next, next % S);
  else cp_async_commit();
  cp_async_wait<S - 1>();
}

// Each thread's best (distance less ||x||^2, cluster) of its rows grp and grp + 8 of two tiles.
struct Nearest {
  float v[2][2];
  int i[2][2];
  __device__ Nearest() {
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) v[t][h] = __int_as_float(0x7f800000), i[t][h] = 0x7fffffff;
  }
};

// ---- mma.sync: 4 warps of 32 points (two m16 tiles, A fragments in registers) ---------------

template <int D>
__device__ __forceinline__ void assign_tile_mma(const KmAssign& a) {
  constexpr int RS = D * 2;  // row bytes; chunks swizzled (swizzled_offset)
  __shared__ __align__(128) unsigned char tile[2][kAssignCents * RS];
  __shared__ float snorm[2][kAssignCents];
  const KmTile tl = a.tiles[blockIdx.x];
  const KmBlock blk = a.blocks[tl.block];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const int p0 = tl.start + warp * 32;  // the warp's first point (block-local)
  uint32_t frag[2][D / 16][4];
  load_point_fragments<D>(a, blk, [&](int t) { return p0 + t * 16; }, frag);

  const auto load_stage = [&](int st, int buf) {
    load_centroid_stage<D>(a, blk, st, tile[buf], snorm[buf], [](int r, int pc) { return swizzled_offset(r, pc, RS); });
  };
  Nearest best;
  const int stages = (blk.k + kAssignCents - 1) / kAssignCents;
  pipeline_start<2>(stages, load_stage);
  for (int st = 0; st < stages; ++st) {
    const int buf = st & 1;
    pipeline_await<2>(st, stages, load_stage);
    __syncthreads();
    const unsigned char* t = tile[buf];
#pragma unroll 2
    for (int nt = 0; nt < kAssignCents / 8; ++nt) {
      float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk) {
        uint32_t b[4];
        ldmatrix_x4(b, t + swizzled_offset(nt * 8 + (lane & 7), kk * 4 + (lane >> 3), RS));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          MmaType<__half>::mma16816(acc[mt], frag[mt][2 * kk], b[0], b[1]);
          MmaType<__half>::mma16816(acc[mt], frag[mt][2 * kk + 1], b[2], b[3]);
        }
      }
      const int cl = nt * 8 + tig * 2;
      const float n0 = snorm[buf][cl], n1 = snorm[buf][cl + 1];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          keep_nearest(best.v[mt][h], best.i[mt][h], fmaf(-2.0f, acc[mt][2 * h], n0), fmaf(-2.0f, acc[mt][2 * h + 1], n1),
                       st * kAssignCents + cl);
    }
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) write_nearest(a, blk, p0 + mt * 16 + grp + h * 8, best.v[mt][h], best.i[mt][h]);
}

// ---- wgmma (sm_90a): one warpgroup, two m64 tiles of points, n64 centroids a stage ----------

// Dynamic shared memory of the wgmma form: S stages of kAssignCents centroids (the K slices of
// each 1024-aligned, so 1 KB of slack for the alignment), then their norms.
template <int D>
constexpr int kAssignStageBytes = (D / 64) * kAssignCents * 128;
template <int D, int S>
constexpr size_t assign_wgmma_smem_bytes() {
  return 1024 + size_t(S) * (kAssignStageBytes<D> + kAssignCents * sizeof(float));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzled layout: rows of
// 64 16-bit elements (128 bytes) in groups of 8 rows (1024 bytes apart), the start 1024-aligned
// but for the k-step's offset inside the row (the hardware swizzles the address).
__device__ __forceinline__ uint64_t sw128_desc(const void* smem) {
  const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3ffff) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// D[64 x 64] (+)= A[64 x 16] (registers) * B[16 x 64] (shared, K-major): acc as wgmma lays it,
// per warp rows 16 warp + grp (+8), columns 8 j + 2 tig (+1) in acc[4 j .. 4 j + 3].
template <bool kAccumulate>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(kAccumulate ? 1 : 0));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across the asynchronous mma.
__device__ __forceinline__ void wgmma_pin(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Each stage's tile 0 products run behind tile 1's argmin of the stage before, its tile 1 products
// behind tile 0's argmin, so every argmin overlaps a product of its warpgroup (gpu-notes item 70).
template <int D, int S>
__device__ __forceinline__ void assign_tile_wgmma(const KmAssign& a) {
  static_assert(S >= 2, "a stage is loaded while another is read");
  constexpr int kSlice = kAssignCents * 128;  // bytes of one K slice (64 dims) of a stage
  extern __shared__ unsigned char assign_smem[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(assign_smem));
  unsigned char* tiles = assign_smem + (((raw + 1023) & ~1023u) - raw);
  float* norms = reinterpret_cast<float*>(tiles + S * kAssignStageBytes<D>);
  const KmTile tl = a.tiles[blockIdx.x];
  const KmBlock blk = a.blocks[tl.block];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  // Tile t of the warpgroup's two m64 tiles: the warp's rows 64 t + 16 warp + grp (+8).
  const auto row0 = [&](int t) { return tl.start + t * 64 + warp * 16; };
  uint32_t frag[2][D / 16][4];
  load_point_fragments<D>(a, blk, row0, frag);

  // Centroid row r's 16-byte chunk pc: K slice pc / 8, chunk pc % 8 swizzled with r % 8.
  const auto load_stage = [&](int st, int buf) {
    load_centroid_stage<D>(a, blk, st, tiles + buf * kAssignStageBytes<D>, norms + buf * kAssignCents,
                           [](int r, int pc) { return (pc / 8) * kSlice + r * 128 + (((pc % 8) ^ (r & 7)) << 4); });
  };
  Nearest best;
  float acc[2][32];
  // Tile t's products of a stage as one wgmma group (after a wgmma_fence).
  const auto issue = [&](int t, const unsigned char* tile) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint64_t desc = sw128_desc(tile + (ks / 4) * kSlice + (ks % 4) * 32);
      if (ks == 0) wgmma_m64n64k16<false>(acc[t], frag[t][ks], desc);
      else wgmma_m64n64k16<true>(acc[t], frag[t][ks], desc);
    }
    wgmma_commit();
  };
  // Tile t's argmin over stage st's products (waited for).
  const auto nearest = [&](int t, int st) {
    const float* snorm = norms + (st % S) * kAssignCents;
    wgmma_pin(acc[t]);
#pragma unroll
    for (int j = 0; j < kAssignCents / 8; ++j) {
      const int cl = 8 * j + 2 * tig;
      const float n0 = snorm[cl], n1 = snorm[cl + 1];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        keep_nearest(best.v[t][h], best.i[t][h], fmaf(-2.0f, acc[t][4 * j + 2 * h], n0),
                     fmaf(-2.0f, acc[t][4 * j + 2 * h + 1], n1), st * kAssignCents + cl);
    }
  };
  const int stages = (blk.k + kAssignCents - 1) / kAssignCents;
  pipeline_start<S>(stages, load_stage);
  // Every group is waited for within its round (ptxas serializes wgmma whose accumulators are
  // read while a group from an earlier round may be pending): tile 1's products of round st - 1
  // are complete at round st's start, and its argmin runs behind tile 0's products of round st.
  for (int st = 0; st < stages; ++st) {
    cp_async_wait<S - 2>();  // stages through st + S - 2 were issued: st's copies are done
    // cp.async wrote the stage through the generic proxy; wgmma reads it through the async one.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const unsigned char* tile = tiles + (st % S) * kAssignStageBytes<D>;
    wgmma_fence();
    issue(0, tile);
    wgmma_wait<1>();  // nothing to wait for: it tells ptxas tile 0's group is the pending one
    if (st > 0) nearest(1, st - 1);
    __syncthreads();  // every warp is past stage st - 1's products and norms: its buffer is free
    const int next = st + S - 1;
    if (next < stages) load_stage(next, next % S);
    else cp_async_commit();
    wgmma_fence();
    issue(1, tile);
    wgmma_wait<1>();
    nearest(0, st);
    wgmma_wait<0>();
  }
  if (stages > 0) nearest(1, stages - 1);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) write_nearest(a, blk, row0(t) + grp + h * 8, best.v[t][h], best.i[t][h]);
}
#endif

// The library's kernel: wgmma where the code is sm_90a's, mma.sync in the PTX for other GPUs
// (which then leaves the dynamic shared memory unused). Launch with assign_kernel_smem_bytes<D>().
// Three stages: a stage's copies are issued mid-round, once its buffer is free, so a third buffer
// gives them a round and a half (388 us against 391 with two on the prefill's shape, item 70).
constexpr int kAssignStages = 3;
template <int D>
constexpr size_t assign_kernel_smem_bytes() {
  return assign_wgmma_smem_bytes<D, kAssignStages>();
}
template <int D>
__global__ void __launch_bounds__(128) assign_kernel(const KmAssign a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  assign_tile_wgmma<D, kAssignStages>(a);
#else
  assign_tile_mma<D>(a);
#endif
}

}  // namespace multipole::cuda::detail
