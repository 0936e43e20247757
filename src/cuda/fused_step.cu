// Launch of the one-launch Multipole step (fused_step.cuh): clusters of 16 CTAs, one per entry.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/check.hpp"
#include "cuda/fused_step.cuh"
#include "cuda/host_setup.hpp"

namespace multipole::cuda::detail {

namespace {

using cluster_step::fused_step_kernel;
using cluster_step::kCtas;
using cluster_step::kThreads;

template <class CT, bool kProf, bool kHier, bool kFarReal, bool kRerank>
cudaLaunchConfig_t fused_config(cudaLaunchAttribute& attr, int entries, size_t smem, Stream stream) {
  // Set once per instantiation at the largest room any plan may ask (2048 coarse clusters).
  static const bool configured = [] {
    auto* const kernel = fused_step_kernel<CT, kProf, kHier, kFarReal, kRerank>;
    MP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    // At batch 1 (8 clusters of 16) only seven GPCs have 16 SMs free: by default the eighth
    // cluster doubles up on another's SMs and both end late; allowed to load-balance, it packs
    // two of its own CTAs an SM on the smaller GPC and the other seven keep theirs (gpu-notes item 63).
    MP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeClusterSchedulingPolicyPreference,
                                       cudaClusterSchedulingPolicyLoadBalancing));
    MP_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        int(cluster_step::fused_step_smem_bytes(cluster_step::kMaxCoarse, kRerank && kHier))));
    return true;
  }();
  (void)configured;
  return cluster_launch_config(attr, entries, kCtas, kThreads, stream, smem);
}

template <class CT, bool kProf, bool kHier, bool kFarReal = false, bool kRerank = false>
void launch_variant(const FusedStepArgs& a, int entries, Stream stream) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = fused_config<CT, kProf, kHier, kFarReal, kRerank>(
      attr, entries, cluster_step::fused_step_smem_bytes(a.max_coarse, kRerank && kHier), stream);
  MP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel<CT, kProf, kHier, kFarReal, kRerank>, a));
}
template <class CT>
void launch_typed(const FusedStepArgs& a, int entries, Stream stream) {
  if (a.rerank > 0)  // (re-ranking: not profiled, not with the far field at real positions)
    a.hierarchical ? launch_variant<CT, false, true, false, true>(a, entries, stream)
                   : launch_variant<CT, false, false, false, true>(a, entries, stream);
  else if (a.position_sums)  // (the far field at real positions: not profiled)
    a.hierarchical ? launch_variant<CT, false, true, true>(a, entries, stream)
                   : launch_variant<CT, false, false, true>(a, entries, stream);
  else if (a.hierarchical)
    a.prof ? launch_variant<CT, true, true>(a, entries, stream) : launch_variant<CT, false, true>(a, entries, stream);
  else
    a.prof ? launch_variant<CT, true, false>(a, entries, stream) : launch_variant<CT, false, false>(a, entries, stream);
}

template <class CT, bool kHier, bool kFarReal, bool kRerank = false>
int clusters_typed(int max_coarse) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = fused_config<CT, false, kHier, kFarReal, kRerank>(
      attr, 1, cluster_step::fused_step_smem_bytes(max_coarse, kRerank && kHier), nullptr);
  int fit = 0;
  if (cudaOccupancyMaxActiveClusters(&fit, fused_step_kernel<CT, false, kHier, kFarReal, kRerank>, &cfg) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // a device without cluster launch: the plan takes the three-kernel path
    return 0;
  }
  return fit;
}
template <class CT>
int clusters_of(int max_coarse, bool hierarchical, bool far_real, bool rerank) {
  if (rerank)
    return hierarchical ? clusters_typed<CT, true, false, true>(max_coarse) : clusters_typed<CT, false, false, true>(max_coarse);
  if (far_real)
    return hierarchical ? clusters_typed<CT, true, true>(max_coarse) : clusters_typed<CT, false, true>(max_coarse);
  return hierarchical ? clusters_typed<CT, true, false>(max_coarse) : clusters_typed<CT, false, false>(max_coarse);
}

}  // namespace

void launch_fused_step(const FusedStepArgs& a, DType dtype, int entries, Stream stream) {
  if (dtype == DType::BF16)
    launch_typed<__nv_bfloat16>(a, entries, stream);
  else
    launch_typed<__half>(a, entries, stream);
}

int fused_step_clusters_at_once(DType dtype, int max_coarse, bool hierarchical, bool far_real, bool rerank) {
  return dtype == DType::BF16 ? clusters_of<__nv_bfloat16>(max_coarse, hierarchical, far_real, rerank)
                              : clusters_of<__half>(max_coarse, hierarchical, far_real, rerank);
}

}  // namespace multipole::cuda::detail
