#pragma once
// Each `multipole` subcommand lives in its own file and registers itself here.
#include <CLI/CLI.hpp>

namespace multipole::cli {

void add_attn_command(CLI::App& app);   // tools/attn_command.cpp
void add_bench_command(CLI::App& app);  // tools/bench_command.cpp
void add_trace_command(CLI::App& app);  // tools/trace_command.cpp
void add_generate_command(CLI::App& app);  // tools/generate_command.cpp
void add_inspect_command(CLI::App& app);   // tools/inspect_command.cpp
#ifdef MULTIPOLE_HAVE_CUDA
void add_bench_cuda_command(CLI::App& app);  // tools/bench_cuda_command.cpp
#endif
#ifdef MULTIPOLE_HAVE_TOKENIZER
void add_tokenize_command(CLI::App& app);  // tools/tokenize_command.cpp
#endif

}  // namespace multipole::cli
