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

template <class CT, bool kProf, bool kHier>
cudaLaunchConfig_t fused_config(cudaLaunchAttribute& attr, int entries, size_t smem, Stream stream) {
  // Set once per instantiation at the largest room any plan may ask (2048 coarse clusters).
  static const bool configured = [] {
    MP_CUDA_CHECK(cudaFuncSetAttribute(fused_step_kernel<CT, kProf, kHier>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    MP_CUDA_CHECK(cudaFuncSetAttribute(fused_step_kernel<CT, kProf, kHier>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(cluster_step::fused_step_smem_bytes(cluster_step::kMaxCoarse))));
    return true;
  }();
  (void)configured;
  return cluster_launch_config(attr, entries, kCtas, kThreads, stream, smem);
}

template <class CT, bool kProf, bool kHier>
void launch_variant(const FusedStepArgs& a, int entries, Stream stream) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg =
      fused_config<CT, kProf, kHier>(attr, entries, cluster_step::fused_step_smem_bytes(a.max_coarse), stream);
  MP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel<CT, kProf, kHier>, a));
}
template <class CT>
void launch_typed(const FusedStepArgs& a, int entries, Stream stream) {
  if (a.hierarchical)
    a.prof ? launch_variant<CT, true, true>(a, entries, stream) : launch_variant<CT, false, true>(a, entries, stream);
  else
    a.prof ? launch_variant<CT, true, false>(a, entries, stream) : launch_variant<CT, false, false>(a, entries, stream);
}

template <class CT, bool kHier>
int clusters_typed(int max_coarse) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg =
      fused_config<CT, false, kHier>(attr, 1, cluster_step::fused_step_smem_bytes(max_coarse), nullptr);
  int fit = 0;
  if (cudaOccupancyMaxActiveClusters(&fit, fused_step_kernel<CT, false, kHier>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a device without cluster launch: the plan takes the three-kernel path
    return 0;
  }
  return fit;
}

}  // namespace

void launch_fused_step(const FusedStepArgs& a, DType dtype, int entries, Stream stream) {
  if (dtype == DType::BF16)
    launch_typed<__nv_bfloat16>(a, entries, stream);
  else
    launch_typed<__half>(a, entries, stream);
}

int fused_step_clusters_at_once(DType dtype, int max_coarse, bool hierarchical) {
  if (dtype == DType::BF16)
    return hierarchical ? clusters_typed<__nv_bfloat16, true>(max_coarse) : clusters_typed<__nv_bfloat16, false>(max_coarse);
  return hierarchical ? clusters_typed<__half, true>(max_coarse) : clusters_typed<__half, false>(max_coarse);
}

}  // namespace multipole::cuda::detail
