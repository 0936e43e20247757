// The `multipole` command line: one binary, one subcommand per job.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "commands.hpp"
#include "multipole/core/error.hpp"
#ifdef MULTIPOLE_HAVE_CUDA
#include "multipole/cuda/attention_policy.hpp"
#endif

int main(int argc, char** argv) {
  CLI::App app{"multipole: long chain-of-thought inference with Multipole Attention"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "multipole 0.1.0");
#ifdef MULTIPOLE_HAVE_CUDA
  multipole::cuda::register_cuda_attention();  // --device cuda
#endif
  multipole::cli::add_attn_command(app);
  multipole::cli::add_bench_command(app);
  multipole::cli::add_trace_command(app);
  multipole::cli::add_generate_command(app);
  multipole::cli::add_inspect_command(app);
#ifdef MULTIPOLE_HAVE_CUDA
  multipole::cli::add_bench_cuda_command(app);
#endif
#ifdef MULTIPOLE_HAVE_TOKENIZER
  multipole::cli::add_tokenize_command(app);
  multipole::cli::add_eval_command(app);
  multipole::cli::add_chat_command(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const multipole::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
