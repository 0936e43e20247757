// Fused selection + attention launch (small batches; select_attend.cuh).
#include "cuda/check.hpp"
#include "cuda/select_attend.cuh"

namespace multipole::cuda::detail {

size_t select_attend_smem_bytes(int clusters, int group, int head_dim, int cand_cache) {
  const size_t worker = size_t(FusedLayout(group, head_dim).words) * 4;
  const size_t gather = size_t(FusedGather(group, head_dim, kFusedMaxCtas - 1).words) * 4;
  return std::max(select_hier_smem_bytes(clusters, group, head_dim, cand_cache), std::max(worker, gather));
}

void launch_select_attend(const SelectArgs& a, const AttendArgs& t, DType kv_dtype, int entries, int ctas,
                          Stream stream) {
  static size_t configured[6] = {};
  // [key type: f32, bf16, f16][KV type: bf16, f16]
  void (*const kernels[6])(SelectArgs, AttendArgs) = {
      select_attend_kernel<float, __nv_bfloat16>,         select_attend_kernel<float, __half>,
      select_attend_kernel<__nv_bfloat16, __nv_bfloat16>, select_attend_kernel<__nv_bfloat16, __half>,
      select_attend_kernel<__half, __nv_bfloat16>,        select_attend_kernel<__half, __half>};
  const int k = 2 * (a.key_kind == 0 ? 0 : a.key_kind == 1 ? 1 : 2) + (kv_dtype == DType::F16 ? 1 : 0);
  const size_t smem = select_attend_smem_bytes(a.smem_clusters, a.group, a.head_dim, a.cand_cache);
  if (smem > configured[k]) {
    MP_CUDA_CHECK(cudaFuncSetAttribute(kernels[k], cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    MP_CUDA_CHECK(cudaFuncSetAttribute(kernels[k], cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    configured[k] = smem;
  }
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(ctas);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(entries * ctas));
  cfg.blockDim = dim3(kSelectThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = a.pdl ? 2 : 1;
  MP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernels[k], a, t));
}

int select_attend_max_clusters(size_t smem, int ctas) {
  auto* kernel = select_attend_kernel<__nv_bfloat16, __nv_bfloat16>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(ctas);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(unsigned(ctas));
  cfg.blockDim = dim3(kSelectThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace multipole::cuda::detail
