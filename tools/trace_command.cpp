// `multipole trace synth|info`: make a synthetic attention trace, or describe a trace file.
#include <cmath>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "cli_checks.hpp"
#include "commands.hpp"
#include "multipole/attention/synthetic.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/trace.hpp"

namespace multipole::cli {

namespace {

struct SynthArgs {
  std::string out;
  std::string dtype = "f32";
  SyntheticTraceParams params;
};

void run_synth(const SynthArgs& args) {
  const DType dtype = parse_dtype(args.dtype, "--dtype");
  Trace t = make_synthetic_trace(args.params);
  write_trace(args.out, t, dtype);
  fmt::print("wrote {}: q [{}, {}, {}], k and v [{}, {}, {}] {}, rope_theta {}\n", args.out, t.generated,
             t.num_q_heads, t.head_dim, t.tokens, t.num_kv_heads, t.head_dim, args.dtype, t.rope.theta);
}

void run_info(const std::string& path) {
  const Trace t = read_trace(path);
  double q2 = 0, k2 = 0;
  for (float x : t.q) q2 += double(x) * x;
  for (float x : t.k) k2 += double(x) * x;
  fmt::print("{}\n  tokens N = {} ({} prompt + {} generated)\n  heads: {} query, {} KV (group {}), head dim {}\n",
             path, t.tokens, t.prompt_tokens(), t.generated, t.num_q_heads, t.num_kv_heads,
             t.num_q_heads / t.num_kv_heads, t.head_dim);
  fmt::print("  rope_theta {}{}\n", t.rope.theta,
             t.rope.scaling == RopeConfig::Scaling::None ? "" : ", rope_scaling " + rope_scaling_json(t.rope));
  fmt::print("  rms |q| {:.4g}, rms |k| {:.4g} per vector\n", std::sqrt(q2 / double(t.generated * t.num_q_heads)),
             std::sqrt(k2 / double(t.tokens * t.num_kv_heads)));
  for (const auto& [key, value] : t.metadata) fmt::print("  {}: {}\n", key, value);
}

}  // namespace

void add_trace_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("trace", "Make or inspect attention traces (see docs/trace-format.md)");
  cmd->require_subcommand(1);

  auto args = std::make_shared<SynthArgs>();
  SyntheticTraceParams& p = args->params;
  auto* synth = cmd->add_subcommand(
      "synth",
      "Write a synthetic trace: per KV head, pre-RoPE keys in clusters of Zipf-skewed sizes that\n"
      "arrive in runs, most energy in the low-frequency RoPE channels, and queries aligned with the\n"
      "keys of a few earlier tokens, so attention is peaked as in real models. Deterministic.");
  synth->add_option("out", args->out, "Output file (safetensors)")->required();
  synth->add_option("--tokens", p.tokens, "N: tokens (prompt + generated)")->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--generated", p.generated, "T: generated tokens (queries), at most N")->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--q-heads", p.num_q_heads, "Query heads")->capture_default_str()->check(at_least(1));
  synth->add_option("--kv-heads", p.num_kv_heads, "KV heads (must divide the query heads)")->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--head-dim", p.head_dim, "Head dim (even; the attention policies need a multiple of 16)")
      ->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--clusters", p.clusters, "Key clusters per KV head")->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--spread", p.spread, "Within-cluster key noise relative to the centre")->capture_default_str()
      ->check(at_least(0.0));
  synth->add_option("--skew", p.skew, "Zipf exponent of cluster popularity (0: equal sizes)")->capture_default_str()
      ->check(at_least(0.0));
  synth->add_option("--stickiness", p.stickiness, "Probability that a token stays in its predecessor's cluster")
      ->capture_default_str();
  synth->add_option("--focus", p.focus, "Earlier tokens each query aligns with")->capture_default_str()
      ->check(at_least(1));
  synth->add_option("--sharpness", p.sharpness,
                    "Scaled logit of an aligned key before RoPE, minus ln(keys the query sees); larger is more "
                    "peaked, and the ln term keeps the peakedness similar at every length")
      ->capture_default_str();
  synth->add_flag("--random-queries", p.random_queries, "Queries of plain noise (flat attention), as a control");
  synth->add_option("--rope-theta", p.rope_theta, "RoPE base written to the trace")->capture_default_str();
  synth->add_option("--seed", p.seed, "Random seed")->capture_default_str();
  synth->add_option("--dtype", args->dtype, "Storage type of q, k, v: f32, f16 or bf16")->capture_default_str();
  synth->callback([args] { run_synth(*args); });

  auto path = std::make_shared<std::string>();
  auto* info = cmd->add_subcommand("info", "Validate a trace and print its shapes, RoPE and metadata");
  info->add_option("trace", *path, "Trace file (safetensors)")->required();
  info->callback([path] { run_info(*path); });
}

}  // namespace multipole::cli
