// `multipole bench attention --device cuda` (and its alias `bench-cuda`, which exposes the
// GPU-only knobs): decode attention on the GPU, dense vs multipole vs squeezed, plus the GPU
// prefill clustering.
#include <cstdio>
#include <memory>

#include "commands.hpp"
#include "multipole/core/dtype.hpp"
#include "multipole/core/error.hpp"
#ifdef MULTIPOLE_HAVE_CUDA
#include <nlohmann/json.hpp>

#include "multipole/cuda/bench.hpp"
#include "multipole/cuda/runtime.hpp"
#endif

namespace multipole::cli {

#ifdef MULTIPOLE_HAVE_CUDA
namespace {

void print_cuda_bench(const cuda::CudaBenchOptions& o, bool json) {
  o.validate();  // (options first: a bad one is named even without a device)
  MP_CHECK(cuda::device_count() > 0, "bench attention --device cuda: no CUDA device found");
  const auto info = cuda::device_info();
  if (!json) {
    std::printf("# %s, %d SMs, L2 %lld MB; %d q heads, %d kv heads, d %d, budget %d (coarse %d), %s keys, %s pages of "
                "%d tokens, %s\n",
                info.name.c_str(), info.sm_count, (long long)(info.l2_bytes >> 20), o.q_heads, o.kv_heads,
                o.head_dim, o.budget, o.coarse_budget > 0 ? o.coarse_budget : 16 * o.budget, dtype_name(o.key_dtype).data(), o.scattered_pages ? "scattered" : "sequential", o.page_size,
                o.graph ? "graph replay" : "direct launches");
    std::printf("# us: median per layer-step, L2 flushed by writes before each step (as do_bench); us_clean: by reads\n");
    std::printf("# kmeans-prefill: one GPU clustering of the whole batch (B x %d KV heads, blocks of %d tokens,\n"
                "#   %d Lloyd iterations, levels %d/%d tokens per centroid); 'x dense' of that row is meaningless\n",
                o.kv_heads, o.block_size, o.prefill_iterations, o.tokens_per_centroid, o.coarse_tokens_per_centroid);
    std::printf("# kmeans-update: the GPU online update (DeviceKMeans::append) of the W tokens past the prefill's end,\n"
                "#   wall time; they join its last block, nearly full here: the dearest update of a block's life;\n"
                "#   kmeans-upd/token: the same over W (compare with mp-kmeans-index);\n"
                "#   kmeans-update-life, kmeans-upd/tok-life: the mean over the block_size / W updates of a block's life;\n"
                "#   *-gpu: the device's time alone (events; the update queued behind k-means steps, as in a decode loop)\n");
    std::printf("%-6s %-8s %-16s %10s %9s %9s %9s %10s %9s %6s\n", "batch", "context", "variant", "us", "us_clean",
                "x dense", "GB/s", "MB read", "launches", "CTAs");
  }
  cuda::run_cuda_attention_bench(o, [json, &info](const cuda::CudaBenchRow& r) {
    if (json) {
      nlohmann::json j = {{"device", info.name}, {"batch", r.batch},     {"context", r.context},
                          {"variant", r.variant}, {"us", r.us},          {"us_clean", r.us_clean},
                          {"ratio_to_dense", r.ratio_to_dense},          {"gbps", r.gbps},
                          {"bytes", r.bytes},     {"launches", r.launches}, {"ctas", r.ctas}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%-6d %-8lld %-16s %10.1f %9.1f %9.2f %9.0f %10.2f %9d %6d\n", r.batch, (long long)r.context,
                  r.variant.c_str(), r.us, r.us_clean, r.ratio_to_dense, r.gbps, double(r.bytes) / 1e6, r.launches,
                  r.ctas);
    }
    std::fflush(stdout);
  });
}

}  // namespace

void add_bench_cuda_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench-cuda",
                                 "Alias of `bench attention --device cuda` with the GPU-only knobs (defaults: batch 1 4 "
                                 "16, context 32768 131072)");
  auto o = std::make_shared<cuda::CudaBenchOptions>();
  auto key_dtype = std::make_shared<std::string>("bf16");
  auto no_graph = std::make_shared<bool>(false);
  auto no_kmeans = std::make_shared<bool>(false);
  auto json = std::make_shared<bool>(false);
  auto sequential_pages = std::make_shared<bool>(false);
  cmd->add_option("--batch", o->batches, "Batch sizes")->expected(1, -1);
  cmd->add_option("--context", o->contexts, "Context lengths (tokens per sequence)")->expected(1, -1);
  cmd->add_option("--q-heads", o->q_heads, "Query heads");
  cmd->add_option("--kv-heads", o->kv_heads, "KV heads");
  cmd->add_option("--head-dim", o->head_dim, "Head dimension (64 or 128)");
  cmd->add_option("--budget", o->budget, "Tokens per KV head chosen beyond sinks + window");
  cmd->add_option("--page-size", o->page_size, "Tokens per KV-cache page (handed out in random order unless --sequential-pages)")
      ->check(CLI::Range(1, 4096));
  cmd->add_flag("--sequential-pages", *sequential_pages,
                "Give each sequence consecutive pages instead of scattered ones (a fresh cache's layout)");
  cmd->add_option("--tokens-per-centroid", o->tokens_per_centroid, "Mean fine cluster size");
  cmd->add_option("--coarse-tokens-per-centroid", o->coarse_tokens_per_centroid, "Coarse level (0: one level)");
  cmd->add_option("--coarse-budget", o->coarse_budget,
                  "Tokens under the coarse clusters whose children are scored (0: 16 x the budget)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--rerank-tokens", o->rerank_tokens,
                  "Candidates of the mp-rerank and mp-1level-rerank rows, tokens (0: 4 x the budget; above the budget)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--key-dtype", *key_dtype, "Key centroid storage: f32 or bf16");
  cmd->add_option("--warmup", o->warmup, "Warm-up steps");
  cmd->add_option("--iters", o->iterations, "Timed steps (median reported)");
  cmd->add_option("--block-size", o->block_size, "k-means block (tokens)");
  cmd->add_option("--prefill-iterations", o->prefill_iterations, "Lloyd iterations of the prefill clustering");
  cmd->add_flag("--no-kmeans", *no_kmeans, "Skip the GPU prefill clustering rows");
  cmd->add_flag("--no-graph", *no_graph, "Launch directly instead of replaying a CUDA graph");
  cmd->add_flag("--json", *json, "One JSON object per line instead of a table");
  cmd->callback([o, key_dtype, no_graph, no_kmeans, json, sequential_pages] {
    o->scattered_pages = !*sequential_pages;
    o->key_dtype = parse_dtype(*key_dtype, "--key-dtype");
    o->graph = !*no_graph;
    o->kmeans = !*no_kmeans;
    print_cuda_bench(*o, *json);
  });
}

void run_attention_bench_cuda(const CudaBenchRequest& r) {
  cuda::CudaBenchOptions o;
  o.contexts = r.contexts;
  o.batches = r.batches;
  o.q_heads = r.q_heads;
  o.kv_heads = r.kv_heads;
  o.head_dim = r.head_dim;
  o.budget = r.budget;
  o.dtype = parse_dtype(r.kv_dtype, "--kv-dtype");
  MP_CHECK(o.dtype == DType::BF16 || o.dtype == DType::F16, "bench attention --device cuda: --kv-dtype {} must be bf16 or f16",
           r.kv_dtype);
  o.key_dtype = o.dtype;
  MP_CHECK(r.tokens_per_centroid.size() == 1 || r.tokens_per_centroid.size() == 2,
           "bench attention --device cuda: --tokens-per-centroid takes 1 or 2 levels, got {}",
           r.tokens_per_centroid.size());
  o.tokens_per_centroid = r.tokens_per_centroid[0];
  o.coarse_tokens_per_centroid = r.tokens_per_centroid.size() == 2 ? r.tokens_per_centroid[1] : 0;
  o.iterations = r.steps;
  o.seed = r.seed;
  print_cuda_bench(o, r.json);
}
#else
void run_attention_bench_cuda(const CudaBenchRequest&) {
  MP_CHECK(false, "bench attention: --device cuda needs a build with CUDA (nvcc found at configure time)");
}
#endif

}  // namespace multipole::cli
