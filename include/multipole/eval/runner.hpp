#pragma once
// `multipole eval`: runs a model under dense attention and under each candidate policy at
// equal budgets, case by case, and writes results.jsonl (appended per case, resumable) and
// a Markdown report with plots. Suites:
//   fidelity   teacher-forced long texts, in lockstep: next-token KL to dense, top-1
//              agreement, per-layer attention-output relative error, against position,
//              budget and cluster setting;
//   agreement  greedy decoding from the same prompts: tokens until the first divergence
//              from dense, and whether the final answers equal dense's;
//   passkey    a number hidden in generated filler at several lengths and depths;
//   reasoning  AIME 2025 and generated arithmetic problems: accuracy with 95% intervals.
// CPU only: the CUDA backend has no model forward yet.
#include <cstdint>
#include <string>
#include <vector>

#include "multipole/attention/config.hpp"

namespace multipole::eval {

// One candidate configuration compared with dense.
struct Variant {
  std::string policy;                    // multipole, squeezed, quest, oracle-topk
  int budget = 128;
  std::vector<int> tokens_per_centroid;  // cluster levels, finest first; empty for quest/oracle-topk
  std::string cluster() const;           // "16/128", "" when no clusters
  std::string label() const;             // "multipole b128 c16/128"
};

// Whether a policy uses the cluster setting (multipole, squeezed).
bool policy_uses_clusters(const std::string& policy);
// Every (policy, budget, cluster) combination; cluster settings only for policies that use them.
std::vector<Variant> make_variants(const std::vector<std::string>& policies, const std::vector<int>& budgets,
                                   const std::vector<std::vector<int>>& clusters);
// "16/128" -> {16, 128}; throws naming the text.
std::vector<int> parse_cluster_setting(const std::string& text);
// {16, 128} -> "16/128" ("" for no levels): the inverse of parse_cluster_setting.
std::string cluster_setting_text(const std::vector<int>& tokens_per_centroid);

struct EvalOptions {
  std::string model;  // GGUF file or Hugging Face folder
  std::string suite;  // fidelity, agreement, passkey, reasoning
  std::string out = "eval-out";
  bool resume = false, overwrite = false;
  bool progress = true;  // progress line on stderr

  std::vector<std::string> policies = {"multipole", "squeezed", "quest", "oracle-topk"};
  std::vector<int> budgets = {128};
  std::vector<std::vector<int>> clusters = {ClusterConfig{}.tokens_per_centroid};
  int sinks = 10, window = 128;
  int coarse_budget = 0;    // tokens under the coarse clusters expanded (two-level settings); 0: 16 x budget
  float coarse_radius_weight = 0;  // coarse ranking by centroid score + w |q| radius (experiment; cpu only)
  int64_t max_context = 0;  // 0: the model's context length, capped at kDefaultContextCap
  int limit = 0;            // cases at most; 0: all
  uint64_t seed = 0;
  int threads = 0;          // 0: all hardware threads
  int max_tokens = 0;       // generated tokens at most; 0: the suite's default
  bool f32_activations = false;  // products with quantised weights keep f32 activations (no int8 rounding)
  double score_position = 2048;   // multipole/squeezed: fixed query position of centroid scoring
  bool real_positions = false;     // multipole/squeezed: score centroids at their members' mean position
  bool far_real_positions = false; // multipole: far field at the members' mean positions (experiment)
  bool select_by_mass = false;     // multipole/squeezed: clusters selected by exact attention mass (experiment; cpu)
  bool mass_at_score_position = false;  // ... that mass with every key at the scoring position
  bool score_with_spread = false;  // multipole/squeezed: centroid logits + the members' spread term (experiment; cpu)
  int rerank_tokens = 0;           // multipole/squeezed: candidates re-ranked by their members' exact logits
  std::string device = "cpu";      // where the compared policies decode; dense, the reference, stays on the cpu

  // fidelity
  std::vector<std::string> texts;  // files; empty: the default sources (docs + cot)
  std::string docs_dir;            // default documents folder; empty: ../shared/docs if found
  int cot_texts = -1;              // the model's own greedy chain of thought on this many arithmetic problems; -1: 1 when no --texts
  int prefix = 64;                 // tokens prefilled densely before the teacher-forced decode
  int bin_tokens = 256;            // position bin width of the curves
  bool dense_history = false;      // after each position the policies' K/V rows are replaced by dense's

  // passkey
  std::vector<int64_t> lengths;  // empty: 1024 doubling up to the context
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  int repeats = 1;               // cases per (length, depth)

  // agreement, reasoning
  std::string aime;               // aime2025.jsonl; empty: ../shared/assets/aime2025 if found
  std::vector<std::string> datasets = {"arith", "aime"};
  int problems = 20;              // generated arithmetic problems
  int steps = 4, difficulty = 1, distractors = 0;
  bool thinking = true;           // chat template's thinking switch (Qwen3)
};

constexpr int64_t kDefaultContextCap = 8192;

// Runs the suite and renders the report; returns the summary as JSON text.
std::string run_eval(const EvalOptions& options);

}  // namespace multipole::eval
