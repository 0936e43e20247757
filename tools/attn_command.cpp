// `multipole attn TRACE`: replays a recorded (or synthetic) attention trace through the
// attention policies, decode step by decode step, and measures each against dense.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli_checks.hpp"
#include "commands.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/io/trace.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole::cli {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct AttnArgs {
  std::string trace;
  std::vector<std::string> policies;  // empty: every policy available
  std::string out, dump_index, kv_dtype = "f32";
  std::string device = "cpu";  // where the policies other than the dense reference decode
  bool json = false;
  int threads = 0;
  int page_size = 16;
  AttentionConfig config;  // heads, head dim and RoPE come from the trace
};

struct PolicyRun {
  std::string name;
  std::unique_ptr<AttentionPolicy> policy;
  std::vector<float> out;  // [T, Hq, d]
  DecodeStats totals;      // summed over steps
  double prefill_ms = 0, update_ms = 0, decode_ms = 0;
  double rel_l2 = 0, max_abs = 0, mean_step_rel = 0;
};

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Fails early (before minutes of work) when an output folder does not exist.
void check_output_path(const std::string& path, std::string_view option) {
  if (path.empty()) return;
  namespace fs = std::filesystem;
  fs::path parent = fs::path(path).parent_path();
  std::error_code ec;
  MP_CHECK(parent.empty() || fs::is_directory(parent, ec), "{} {}: folder '{}' does not exist", option, path,
           parent.string());
  MP_CHECK(!fs::is_directory(path, ec), "{} {}: is a folder, expected a file name", option, path);
}

// Policies to run: the requested ones (validated), or all. Dense always runs first: it is
// the reference.
std::vector<PolicyRun> make_runs(const AttnArgs& args, const AttentionConfig& config) {
  const auto known = attention_policy_names();
  std::string known_list;
  for (auto n : known) known_list += (known_list.empty() ? "" : ", ") + std::string(n);
  std::vector<std::string> names = args.policies;
  for (size_t i = 0; i < names.size(); ++i) {
    MP_CHECK(std::find(known.begin(), known.end(), names[i]) != known.end(),
             "--policies: unknown policy '{}' (known: {})", names[i], known_list);
    for (size_t j = 0; j < i; ++j) MP_CHECK(names[j] != names[i], "--policies: '{}' given twice", names[i]);
  }
  if (names.empty()) names.assign(known.begin(), known.end());
  if (std::find(names.begin(), names.end(), "dense") == names.end()) names.insert(names.begin(), "dense");
  std::stable_partition(names.begin(), names.end(), [](const std::string& n) { return n == "dense"; });

  std::vector<PolicyRun> runs;
  for (const auto& name : names) {
    PolicyRun run;
    run.name = name;
    // The first run, dense, is the reference: always on the cpu.
    run.policy = make_attention_policy(name, config, runs.empty() ? "cpu" : args.device);
    runs.push_back(std::move(run));
  }
  return runs;
}

// Rotates n tokens of `heads` head vectors, token i to position first + i.
//   x: [n, heads, d]
void rotate_tokens(const Rope& rope, float* x, int64_t n, int heads, int64_t first, ThreadPool& pool) {
  const int d = rope.head_dim();
  pool.parallel_for(n, [&](int64_t i, int) {
    for (int h = 0; h < heads; ++h) rope.apply(x + (i * heads + h) * d, double(first + i));
  });
}

void add_stats(DecodeStats& into, const DecodeStats& s) {
  into.exact_tokens += s.exact_tokens;
  into.selected_tokens += s.selected_tokens;
  into.centroids_scored += s.centroids_scored;
  into.pseudo_tokens += s.pseudo_tokens;
  into.bytes_read += s.bytes_read;
}

// Relative L2 over all outputs, max abs difference, mean over steps of the per-step
// relative L2; all in f64.
void measure_errors(PolicyRun& run, const std::vector<float>& ref, int64_t steps) {
  const size_t per_step = ref.size() / size_t(steps);
  double num = 0, den = 0, max_abs = 0, step_sum = 0;
  for (int64_t t = 0; t < steps; ++t) {
    double sn = 0, sd = 0;
    for (size_t i = size_t(t) * per_step; i < size_t(t + 1) * per_step; ++i) {
      double diff = double(run.out[i]) - double(ref[i]);
      sn += diff * diff;
      sd += double(ref[i]) * ref[i];
      max_abs = std::max(max_abs, std::abs(diff));
      if (std::isnan(diff)) max_abs = diff;
    }
    num += sn;
    den += sd;
    step_sum += sd > 0 ? std::sqrt(sn / sd) : std::sqrt(sn);
  }
  run.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  run.max_abs = max_abs;
  run.mean_step_rel = step_sum / double(steps);
}

json config_json(const AttentionConfig& c, const AttnArgs& args) {
  return {{"budget", c.budget},
          {"coarse_budget", c.coarse_budget},
          {"tokens_per_centroid", c.cluster.tokens_per_centroid},
          {"block_size", c.cluster.block_size},
          {"sinks", c.cluster.sinks},
          {"window", c.cluster.window},
          {"prefill_iterations", c.cluster.prefill_iterations},
          {"update_iterations", c.cluster.update_iterations},
          {"seed", c.cluster.seed},
          {"score_position", c.score_position},
          {"real_positions", c.score_real_positions},
          {"far_field_real_positions", c.far_field_real_positions},
          {"quest_page_size", c.quest_page_size},
          {"kv_dtype", args.kv_dtype},
          {"device", args.device},
          {"page_size", args.page_size}};
}

// The final cluster index of every KV head of the first multipole-kind policy, as safetensors:
// layer0.head<h>.level<l>.{key_centroids [C, d], value_centroids [C, d], sizes [C] I32,
// position_sums [C] I64, parents [C] I32}, layer0.head<h>.labels [clustered tokens] I32,
// layer0.head<h>.blocks [B, 2] I64 (token ranges); metadata clustered_begin/end per head.
void dump_index(const std::string& path, const PolicyRun& run, SeqId seq, const Trace& trace,
                const std::string& trace_path, const json& config) {
  SafetensorsWriter w;
  auto raw = [&](std::string name, SafetensorsDType dtype, std::vector<int64_t> shape, const auto& vec) {
    w.add_raw(std::move(name), dtype, std::move(shape), std::as_bytes(std::span(vec)));
  };
  for (int h = 0; h < trace.num_kv_heads; ++h) {
    const ClusterIndex* index = find_cluster_index(*run.policy, seq, 0, h);
    MP_CHECK(index != nullptr, "--dump-index: policy '{}' holds no cluster index for KV head {} (the prompt may be "
             "shorter than sinks + window)", run.name, h);
    const std::string prefix = fmt::format("layer0.head{}", h);
    for (int l = 0; l < index->num_levels(); ++l) {
      const ClusterLevel& lv = index->level(l);
      const std::string p = fmt::format("{}.level{}", prefix, l);
      const int64_t c = lv.count();
      w.add(p + ".key_centroids", {c, index->head_dim()}, lv.keys.data());
      w.add(p + ".value_centroids", {c, index->head_dim()}, lv.values.data());
      raw(p + ".sizes", SafetensorsDType::I32, {c}, lv.sizes);
      raw(p + ".position_sums", SafetensorsDType::I64, {c}, lv.position_sums);
      raw(p + ".parents", SafetensorsDType::I32, {c}, lv.parents);
    }
    std::vector<int32_t> labels(index->labels().begin(), index->labels().end());
    raw(prefix + ".labels", SafetensorsDType::I32, {int64_t(labels.size())}, labels);
    std::vector<int64_t> blocks;
    for (const auto& b : index->blocks()) blocks.insert(blocks.end(), {b.begin, b.end});
    raw(prefix + ".blocks", SafetensorsDType::I64, {int64_t(index->blocks().size()), 2}, blocks);
    w.set_metadata(prefix + ".clustered_begin", std::to_string(index->begin()));
    w.set_metadata(prefix + ".clustered_end", std::to_string(index->end()));
  }
  w.set_metadata("policy", run.name);
  w.set_metadata("trace", trace_path);
  w.set_metadata("config", config.dump());
  w.write(path);
}

void run_attn(const AttnArgs& args) {
  const DType kv_dtype = parse_dtype(args.kv_dtype, "--kv-dtype");
  check_output_path(args.out, "--out");
  check_output_path(args.dump_index, "--dump-index");
  const Trace trace = read_trace(args.trace);
  const int64_t N = trace.tokens, T = trace.generated, P = trace.prompt_tokens();
  const int hq = trace.num_q_heads, hkv = trace.num_kv_heads, d = trace.head_dim;

  AttentionConfig config = args.config;
  config.num_q_heads = hq;
  config.num_kv_heads = hkv;
  config.head_dim = d;
  config.rope = trace.rope;
  try {
    config.validate();
  } catch (const Error& e) {
    fail("{} (trace {})", e.what(), args.trace);
  }
  std::vector<PolicyRun> runs = make_runs(args, config);
  const PolicyRun* index_run = nullptr;
  for (const auto& r : runs)
    if (!index_run && (r.name == "multipole" || r.name == "squeezed")) index_run = &r;
  MP_CHECK(args.dump_index.empty() || index_run, "--dump-index needs the multipole or squeezed policy to run");
  MP_CHECK(args.dump_index.empty() || args.device == "cpu",
           "--dump-index reads the cpu policy's index; it cannot be used with --device {}", args.device);

  ThreadPool pool(args.threads);
  const Rope rope(config.rope);
  PagedKVCache cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = hkv, .head_dim = d, .page_size = args.page_size,
                                   .dtype = kv_dtype, .max_tokens = N});
  const SeqId seq = cache.add_sequence();
  const std::span<const SeqId> seqs(&seq, 1);
  const size_t token_floats = size_t(hkv) * d;

  // Prompt: keys rotated to their positions, written in chunks, then prefill clustering.
  std::vector<float> kbuf;
  if (P > 0) cache.extend(seq, P);
  for (int64_t pos = 0; pos < P; pos += 1024) {
    const int64_t n = std::min<int64_t>(1024, P - pos);
    kbuf.assign(trace.k.begin() + pos * token_floats, trace.k.begin() + (pos + n) * token_floats);
    rotate_tokens(rope, kbuf.data(), n, hkv, pos, pool);
    cache.write(seq, 0, pos, n, kbuf.data(), trace.v.data() + pos * token_floats);
  }
  for (auto& r : runs) {
    r.out.assign(size_t(T) * hq * d, 0.0f);
    if (P == 0) continue;
    auto start = Clock::now();
    r.policy->update(cache, 0, seqs, pool);
    r.prefill_ms = ms_since(start);
  }

  // Generation: append token P + t, update, decode query t at that position.
  std::vector<float> qbuf(size_t(hq) * d);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = P + t;
    cache.extend(seq, 1);
    kbuf.assign(trace.k.begin() + pos * token_floats, trace.k.begin() + (pos + 1) * token_floats);
    for (int h = 0; h < hkv; ++h) rope.apply(kbuf.data() + h * d, double(pos));
    cache.write(seq, 0, pos, 1, kbuf.data(), trace.v.data() + pos * token_floats);
    std::copy_n(trace.q.begin() + t * hq * d, hq * d, qbuf.begin());
    for (int g = 0; g < hq; ++g) rope.apply(qbuf.data() + g * d, double(pos));
    for (auto& r : runs) {
      auto start = Clock::now();
      r.policy->update(cache, 0, seqs, pool);
      auto mid = Clock::now();
      r.policy->decode(cache, 0, seqs, qbuf.data(), r.out.data() + t * hq * d, pool);
      r.update_ms += std::chrono::duration<double, std::milli>(mid - start).count();
      r.decode_ms += ms_since(mid);
      add_stats(r.totals, r.policy->last_stats());
    }
  }
  for (auto& r : runs) measure_errors(r, runs[0].out, T);

  const json cfg = config_json(config, args);
  if (!args.out.empty()) {
    SafetensorsWriter w;
    for (const auto& r : runs) w.add("o_" + r.name, {T, hq, d}, r.out.data());
    w.set_metadata("trace", args.trace);
    w.set_metadata("config", cfg.dump());
    w.write(args.out);
  }
  if (!args.dump_index.empty()) dump_index(args.dump_index, *index_run, seq, trace, args.trace, cfg);

  // Per-step stats are per KV head (DecodeStats sums over heads), bytes per step.
  auto per_head = [&](int64_t total) { return double(total) / double(T) / hkv; };
  if (args.json) {
    json policies = json::array();
    for (const auto& r : runs)
      policies.push_back({{"name", r.name},
                          {"rel_l2", r.rel_l2},
                          {"max_abs", r.max_abs},
                          {"mean_step_rel", r.mean_step_rel},
                          {"exact_per_head", per_head(r.totals.exact_tokens)},
                          {"selected_per_head", per_head(r.totals.selected_tokens)},
                          {"centroids_scored_per_head", per_head(r.totals.centroids_scored)},
                          {"pseudo_per_head", per_head(r.totals.pseudo_tokens)},
                          {"bytes_read_per_step", double(r.totals.bytes_read) / double(T)},
                          {"prefill_update_ms", r.prefill_ms},
                          {"update_ms", r.update_ms},
                          {"decode_ms", r.decode_ms}});
    json doc = {{"trace", args.trace}, {"tokens", N},  {"generated", T},          {"prompt_tokens", P},
                {"q_heads", hq},       {"kv_heads", hkv}, {"head_dim", d},        {"rope_theta", trace.rope.theta},
                {"threads", pool.size()}, {"reference", "dense"}, {"config", cfg}, {"policies", policies}};
    std::printf("%s\n", doc.dump(2).c_str());
    return;
  }
  fmt::print("trace {}: {} tokens ({} prompt + {} generated), {} query / {} KV heads, head dim {}, kv {}, {} threads\n",
             args.trace, N, P, T, hq, hkv, d, args.kv_dtype, pool.size());
  fmt::print("errors against dense over all {} decode steps; token counts per KV head per step\n", T);
  fmt::print("{:<12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}\n", "policy", "rel_l2",
             "max_abs", "step_rel", "exact", "selected", "scored", "pseudo", "prefill_ms", "update_ms", "decode_ms");
  for (const auto& r : runs)
    fmt::print("{:<12} {:>10.3e} {:>10.3e} {:>10.3e} {:>9.1f} {:>9.1f} {:>9.1f} {:>9.1f} {:>10.2f} {:>10.2f} {:>10.2f}\n",
               r.name, r.rel_l2, r.max_abs, r.mean_step_rel, per_head(r.totals.exact_tokens),
               per_head(r.totals.selected_tokens), per_head(r.totals.centroids_scored),
               per_head(r.totals.pseudo_tokens), r.prefill_ms, r.update_ms, r.decode_ms);
}

}  // namespace

void add_attn_command(CLI::App& app) {
  auto args = std::make_shared<AttnArgs>();
  AttentionConfig& c = args->config;
  auto* cmd = app.add_subcommand(
      "attn",
      "Replay an attention trace through the attention policies and compare each with dense.\n"
      "The trace (safetensors: pre-RoPE q [T, Hq, d], k and v [N, Hkv, d], metadata rope_theta;\n"
      "see docs/trace-format.md; `multipole trace synth` makes one) holds N tokens whose last T\n"
      "were generated. The first N-T keys, rotated to their positions, fill a paged KV cache and\n"
      "each policy indexes them (prefill clustering); then for each generated token t the key is\n"
      "appended, each policy updates, and query t, rotated to position N-T+t, is decoded against\n"
      "keys [0, N-T+t]. Prints each policy's error against dense (relative L2 over all outputs,\n"
      "max abs, mean per-step relative L2) and its per-step work and time.");
  cmd->add_option("trace", args->trace, "Trace file (safetensors)")->required();
  cmd->add_option("--policies", args->policies,
                  "Policies to run, comma separated (dense, multipole, squeezed, quest, oracle-topk); default: all. "
                  "Dense always runs: it is the reference")
      ->delimiter(',');
  cmd->add_option("--out", args->out, "Write o_<policy> [T, Hq, d] f32 outputs to this safetensors file");
  cmd->add_option("--dump-index", args->dump_index,
                  "Write the multipole policy's (or, if only that runs, squeezed's) final cluster index "
                  "(centroids, sizes, value centroids, labels per KV head and level) to this safetensors file");
  cmd->add_flag("--json", args->json, "Print the results as JSON instead of a table");
  cmd->add_option("--budget", c.budget, "Tokens per KV head chosen beyond sinks + window")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--coarse-budget", c.coarse_budget,
                  "Tokens under the clusters expanded at each coarser level (0: 16 x budget)")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--coarse-radius-weight", c.coarse_radius_weight,
                  "Experiment (cpu only): rank coarse clusters by s (q.c + w |q| r), r their children's radius")
      ->capture_default_str();
  cmd->add_option("--rerank-tokens", c.rerank_tokens,
                  "Multipole/squeezed: candidate clusters worth this many tokens are re-ranked by their "
                  "members' exact logits before the budget is filled (0: off; else above --budget; with --device cuda: "
                  "in the one-launch step where it holds (up to 512), else the three-kernel step and one launch more)")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--tokens-per-centroid", c.cluster.tokens_per_centroid,
                  "Tokens per centroid of each cluster level, finest first, comma separated (1 to 4 levels)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--block-size", c.cluster.block_size, "Tokens per k-means block")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--sinks", c.cluster.sinks, "First tokens always attended exactly")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--window", c.cluster.window, "Update interval W; the local window holds W..2W-1 tokens")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--prefill-iterations", c.cluster.prefill_iterations, "Lloyd iterations per block at prefill")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--update-iterations", c.cluster.update_iterations,
                  "Lloyd iterations of the open block per online update")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--seed", c.cluster.seed, "k-means seed")->capture_default_str();
  cmd->add_option("--score-position", c.score_position, "Fixed query position for centroid scoring")
      ->capture_default_str()
      ->check(at_least(0.0));
  cmd->add_flag("--real-positions", c.score_real_positions,
                "Score each centroid at its members' mean position instead of the fixed position");
  cmd->add_flag("--far-real-positions", c.far_field_real_positions,
                "Experiment: the far field from the centroids at their members' mean positions, the selection still "
                "at --score-position (on cuda: in the one-launch step where it holds, else one launch more)");
  cmd->add_option("--quest-page-size", c.quest_page_size, "Tokens per page bound of the quest policy")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--device", args->device,
                  "Where the policies decode: cpu, or cuda (GPU builds; needs --kv-dtype f16 or bf16). Dense, the "
                  "reference, always runs on the cpu")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", args->kv_dtype, "Storage type of the KV cache: f32, f16 or bf16")
      ->capture_default_str();
  cmd->add_option("--page-size", args->page_size, "Tokens per KV cache page")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--threads", args->threads, "Worker threads (0: one per hardware thread)")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->callback([args] { run_attn(*args); });
}

}  // namespace multipole::cli
