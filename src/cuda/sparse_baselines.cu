// Quest and oracle-topk selection launches (kernels in sparse_baselines.cuh).
#include "cuda/check.hpp"
#include "cuda/sparse_baselines.cuh"

namespace multipole::cuda::detail {

namespace {
// Calls f.template operator()<D, T>() for the runtime head dim and KV type.
template <class F>
void dispatch_dt(DType dtype, int head_dim, F&& f) {
  auto by_d = [&]<class T>() {
    if (head_dim == 64)
      f.template operator()<64, T>();
    else
      f.template operator()<128, T>();
  };
  if (dtype == DType::F16)
    by_d.template operator()<__half>();
  else
    by_d.template operator()<__nv_bfloat16>();
}
}  // namespace

void launch_quest_meta(const SparseArgs& a, DType dtype, int head_dim, int grid_x, int entries, Stream stream) {
  if (grid_x <= 0 || entries <= 0) return;
  const dim3 grid(grid_x, entries);
  if (dtype == DType::F16)
    quest_meta_kernel<__half><<<grid, 128, 0, stream>>>(a, head_dim);
  else
    quest_meta_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(a, head_dim);
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_quest_score(const SparseArgs& a, DType dtype, int head_dim, int entries, Stream stream) {
  const dim3 grid(unsigned((a.page_cap + kQuestPagesPerCta - 1) / kQuestPagesPerCta), entries);
  dispatch_dt(dtype, head_dim, [&]<int D, class T>() { quest_score_kernel<D, T><<<grid, 128, 0, stream>>>(a); });
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_oracle_logits(const SparseArgs& a, DType dtype, int head_dim, int entries, Stream stream) {
  const dim3 grid(a.chunks, entries);
  dispatch_dt(dtype, head_dim, [&]<int D, class T>() {
    if (a.group <= 4)
      oracle_logits_kernel<D, 4, T><<<grid, 128, 0, stream>>>(a);
    else if (a.group <= 8)
      oracle_logits_kernel<D, 8, T><<<grid, 128, 0, stream>>>(a);
    else
      oracle_logits_kernel<D, 16, T><<<grid, 128, 0, stream>>>(a);
  });
  MP_CUDA_CHECK(cudaGetLastError());
}

void launch_sparse_select(const SparseArgs& a, bool quest, int entries, Stream stream) {
  if (quest)
    sparse_select_kernel<true><<<entries, kSparseSelectThreads, 0, stream>>>(a);
  else
    sparse_select_kernel<false><<<entries, kSparseSelectThreads, 0, stream>>>(a);
  MP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace multipole::cuda::detail
