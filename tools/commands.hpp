#pragma once
// Each `multipole` subcommand lives in its own file and registers itself here.
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace multipole::cli {

void add_attn_command(CLI::App& app);   // tools/attn_command.cpp
void add_bench_command(CLI::App& app);  // tools/bench_command.cpp
void add_trace_command(CLI::App& app);  // tools/trace_command.cpp
void add_generate_command(CLI::App& app);  // tools/generate_command.cpp
void add_inspect_command(CLI::App& app);   // tools/inspect_command.cpp
#ifdef MULTIPOLE_HAVE_CUDA
void add_bench_cuda_command(CLI::App& app);  // tools/bench_cuda_command.cpp
#endif
// `bench attention --device cuda` (tools/bench_cuda_command.cpp); fails when built without CUDA.
struct CudaBenchRequest {
  std::vector<int64_t> contexts;
  std::vector<int> batches;
  int q_heads = 32, kv_heads = 8, head_dim = 128;
  std::string kv_dtype = "bf16";
  int budget = 128;
  std::vector<int> tokens_per_centroid;
  int steps = 50;
  uint64_t seed = 1;
  bool json = false;
};
void run_attention_bench_cuda(const CudaBenchRequest& request);
#ifdef MULTIPOLE_HAVE_TOKENIZER
void add_tokenize_command(CLI::App& app);  // tools/tokenize_command.cpp
void add_eval_command(CLI::App& app);      // tools/eval_command.cpp
void add_chat_command(CLI::App& app);      // tools/chat_command.cpp
#endif

}  // namespace multipole::cli
