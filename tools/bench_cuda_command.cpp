// `multipole bench-cuda`: decode attention on the GPU, dense vs multipole vs squeezed.
#ifdef MULTIPOLE_HAVE_CUDA
#include <cstdio>
#include <memory>

#include "commands.hpp"
#include "multipole/core/error.hpp"
#include "multipole/cuda/bench.hpp"
#include "multipole/cuda/runtime.hpp"

namespace multipole::cli {

void add_bench_cuda_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench-cuda", "Time GPU decode attention: dense, multipole, squeezed (one layer-step)");
  auto o = std::make_shared<cuda::CudaBenchOptions>();
  auto key_dtype = std::make_shared<std::string>("bf16");
  auto no_graph = std::make_shared<bool>(false);
  cmd->add_option("--batch", o->batches, "Batch sizes")->expected(1, -1);
  cmd->add_option("--context", o->contexts, "Context lengths (tokens per sequence)")->expected(1, -1);
  cmd->add_option("--q-heads", o->q_heads, "Query heads");
  cmd->add_option("--kv-heads", o->kv_heads, "KV heads");
  cmd->add_option("--head-dim", o->head_dim, "Head dimension (64 or 128)");
  cmd->add_option("--budget", o->budget, "Tokens per KV head chosen beyond sinks + window");
  cmd->add_option("--tokens-per-centroid", o->tokens_per_centroid, "Mean cluster size");
  cmd->add_option("--key-dtype", *key_dtype, "Key centroid storage: f32 or bf16");
  cmd->add_option("--warmup", o->warmup, "Warm-up steps");
  cmd->add_option("--iters", o->iterations, "Timed steps (median reported)");
  cmd->add_flag("--no-graph", *no_graph, "Launch directly instead of replaying a CUDA graph");
  cmd->callback([o, key_dtype, no_graph] {
    o->key_dtype = parse_dtype(*key_dtype, "--key-dtype");
    o->graph = !*no_graph;
    const auto info = cuda::device_info();
    std::printf("# %s, %d SMs, L2 %lld MB; %d q heads, %d kv heads, d %d, budget %d, %s keys, %s\n", info.name.c_str(),
                info.sm_count, (long long)(info.l2_bytes >> 20), o->q_heads, o->kv_heads, o->head_dim, o->budget,
                dtype_name(o->key_dtype).data(), o->graph ? "graph replay" : "direct launches");
    std::printf("# us: L2 flushed by writes before each step (as do_bench); us_clean: flushed by reads\n");
    std::printf("%-6s %-8s %-16s %10s %9s %9s %9s %10s %9s %6s\n", "batch", "context", "variant", "us", "us_clean",
                "x dense", "GB/s", "MB read", "launches", "CTAs");
    cuda::run_cuda_attention_bench(*o, [](const cuda::CudaBenchRow& r) {
      std::printf("%-6d %-8lld %-16s %10.1f %9.1f %9.2f %9.0f %10.2f %9d %6d\n", r.batch, (long long)r.context,
                  r.variant.c_str(), r.us, r.us_clean, r.ratio_to_dense, r.gbps, double(r.bytes) / 1e6, r.launches,
                  r.ctas);
      std::fflush(stdout);
    });
  });
}

}  // namespace multipole::cli
#endif
