// `multipole eval --model PATH --suite fidelity|agreement|passkey|reasoning`: compares the
// attention policies with dense at equal budgets; writes DIR/results.jsonl case by case
// (resumable) and DIR/report.md with plots; prints the report (or --json, a summary).
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli_checks.hpp"
#include "commands.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/report.hpp"
#include "multipole/eval/runner.hpp"

namespace multipole::cli {

namespace {

struct EvalArgs {
  eval::EvalOptions o;
  std::vector<std::string> clusters = {eval::cluster_setting_text(o.clusters.front())};  // o's default, as text
  bool report_only = false;
  bool json = false;
  bool quiet = false;
  bool no_think = false;
};

void run_eval_command(EvalArgs& a) {
  std::string summary;
  std::string report_path = a.o.out + "/report.md";
  if (a.report_only) {
    summary = eval::render_report(a.o.out).summary_json;
  } else {
    MP_CHECK(!a.o.model.empty(), "eval: --model is required (unless --report-only)");
    MP_CHECK(!a.o.suite.empty(), "eval: --suite is required (fidelity, agreement, passkey, reasoning)");
    a.o.clusters.clear();
    for (const std::string& c : a.clusters) a.o.clusters.push_back(eval::parse_cluster_setting(c));
    a.o.progress = !a.quiet;
    a.o.thinking = !a.no_think;
    summary = eval::run_eval(a.o);
  }
  if (a.json) {
    std::fwrite(summary.data(), 1, summary.size(), stdout);
    return;
  }
  std::ifstream f(report_path);
  std::ostringstream s;
  s << f.rdbuf();
  std::fputs(s.str().c_str(), stdout);
  std::fprintf(stderr, "report: %s\n", report_path.c_str());
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  eval::EvalOptions& o = a->o;
  CLI::App* cmd = app.add_subcommand(
      "eval",
      "Compare attention policies with dense on a model: fidelity (teacher-forced KL / top-1 / attention error), "
      "agreement (greedy divergence), passkey, reasoning (AIME 2025 + generated arithmetic). The model runs on the CPU; --device cuda "
      "decodes the compared policies on the GPU.");
  cmd->add_option("--model,-m", o.model, "GGUF file or Hugging Face folder");
  cmd->add_option("--suite", o.suite, "fidelity, agreement, passkey or reasoning")
      ->check(CLI::IsMember({"fidelity", "agreement", "passkey", "reasoning"}));
  cmd->add_option("--out,-o", o.out, "Output folder: results.jsonl, report.md, plots/")->capture_default_str();
  cmd->add_flag("--resume", o.resume, "Continue the run in --out: cases already in results.jsonl are skipped");
  cmd->add_flag("--overwrite", o.overwrite, "Start over even if --out has a results.jsonl");
  cmd->add_flag("--report-only", a->report_only, "Only re-render report.md and the plots from --out/results.jsonl");
  cmd->add_flag("--json", a->json, "Print the summary as JSON instead of the Markdown report");
  cmd->add_flag("--quiet,-q", a->quiet, "No progress line on stderr");
  cmd->add_option("--policies", o.policies, "Policies compared with dense (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--budgets", o.budgets, "Budgets, tokens per KV head (comma-separated, e.g. 64,128,256,512,1024)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--clusters", a->clusters,
                  "Tokens per centroid of each cluster level, finest first, levels separated by '/' "
                  "(comma-separated settings, e.g. 16/128,32,8); multipole and squeezed only")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--sinks", o.sinks, "Attention sink tokens")->capture_default_str()->check(at_least(0));
  cmd->add_option("--window", o.window, "Local window / update interval W")->capture_default_str()->check(at_least(1));
  cmd->add_option("--coarse-budget", o.coarse_budget,
                  "Two-level --clusters settings: tokens under the coarse clusters whose children are scored (0: 16 x "
                  "the budget)")
      ->capture_default_str()
      ->check(at_least(0));
  cmd->add_option("--coarse-radius-weight", o.coarse_radius_weight,
                  "Experiment (cpu only): rank coarse clusters for expansion by s (q.c + w |q| r), r the largest "
                  "distance of a child centroid from theirs (0: by the centroid score, the method; 1: an upper bound "
                  "of the best child's score)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-context", o.max_context, "Positions per sequence (0: the model's, at most 8192)")
      ->capture_default_str();
  cmd->add_option("--limit", o.limit, "Cases at most (0: all)")->capture_default_str();
  cmd->add_option("--seed", o.seed, "Seed of generated problems, passkeys and k-means")->capture_default_str();
  cmd->add_option("--threads", o.threads, "Threads (0: all hardware threads)")->capture_default_str();
  cmd->add_option("--max-tokens,-n", o.max_tokens,
                  "Generated tokens at most (0: suite default: agreement 256, passkey 16, reasoning 1024, fidelity's "
                  "chains of thought up to the context)")
      ->capture_default_str();
  // fidelity
  cmd->add_option("--texts", o.texts, "fidelity: text files (default: ../shared/docs/*.md and one chain of thought)");
  cmd->add_option("--docs", o.docs_dir, "fidelity: folder of default *.md documents");
  cmd->add_option("--cot-texts", o.cot_texts,
                  "fidelity: texts made of the model's own dense greedy chain of thought on generated arithmetic "
                  "problems (-1: 1 when no --texts)")
      ->capture_default_str();
  cmd->add_option("--prefix", o.prefix, "fidelity: tokens prefilled densely before the lockstep decode")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_option("--bin-tokens", o.bin_tokens, "fidelity: position bin width of the curves")
      ->capture_default_str()
      ->check(at_least(1));
  cmd->add_flag("--dense-history", o.dense_history,
                "fidelity: after each position, overwrite each policy's K/V rows with dense's, so every position "
                "measures one step's error over dense's own history, not the drift of the policy's states (cpu)");
  // passkey
  cmd->add_option("--lengths", o.lengths, "passkey: prompt lengths in tokens (default: 1024 doubling to the context)")
      ->delimiter(',');
  cmd->add_option("--depths", o.depths, "passkey: relative depths of the needle")->delimiter(',')->capture_default_str();
  cmd->add_option("--repeats", o.repeats, "passkey: cases per length and depth")->capture_default_str();
  // agreement, reasoning
  cmd->add_option("--datasets", o.datasets, "agreement/reasoning: arith, aime")->delimiter(',')->capture_default_str();
  cmd->add_option("--aime", o.aime, "AIME 2025 jsonl (default: ../shared/assets/aime2025/aime2025.jsonl)");
  cmd->add_option("--problems", o.problems, "Generated arithmetic problems")->capture_default_str();
  cmd->add_option("--steps", o.steps, "Arithmetic problems: reasoning steps")->capture_default_str();
  cmd->add_option("--difficulty", o.difficulty, "Arithmetic problems: difficulty 1..3")->capture_default_str();
  cmd->add_option("--distractors", o.distractors, "Arithmetic problems: irrelevant sentences")->capture_default_str();
  cmd->add_flag("--f32-activations", o.f32_activations,
               "Keep activations in f32 in the products with quantised weights (no int8 rounding, so tiny "
               "attention differences are not amplified into rounding flips; several times slower)");
  cmd->add_option("--score-position", o.score_position,
                  "multipole/squeezed: fixed query position at which centroids are scored")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e9));
  cmd->add_flag("--real-positions", o.real_positions,
                "multipole/squeezed: score centroids at their members' mean position instead");
  cmd->add_flag("--far-real-positions", o.far_real_positions,
                "Experiment: multipole's far field from the centroids at their members' mean positions, the selection "
                "still at --score-position (with --device cuda: in the one-launch step where it holds, else one "
                "launch more)");
  cmd->add_flag("--select-by-mass", o.select_by_mass,
                "Experiment (cpu only): multipole and squeezed select clusters by their members' exact attention mass "
                "(the real query against every clustered key: a cluster oracle) instead of their centroid scores; the "
                "far field keeps the centroids");
  cmd->add_flag("--mass-at-score-position", o.mass_at_score_position,
                "With --select-by-mass: each member's key seen at --score-position, as the centroids are scored, so "
                "the mass keeps the spread of a cluster's keys without the position's error");
  cmd->add_flag("--score-with-spread", o.score_with_spread,
                "Experiment (cpu only): multipole and squeezed add to each centroid's logit the second-order term of its "
                "members' spread about it, s^2/2 sum_j q_j^2 v_j (v: the members' mean square deviation a dimension, "
                "from every clustered key at each step), in the selection and the far field");
  cmd->add_option("--rerank-tokens", o.rerank_tokens,
                  "multipole/squeezed: candidate clusters worth this many tokens, by their centroid scores, "
                  "are re-ranked by their members' exact logits before the budget is filled (0: off; else above every "
                  "--budgets; with --device cuda: in the one-launch step where it holds (up to 512), else the three-kernel "
                  "step and one launch more)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--device", o.device,
                  "Where the compared policies decode: cpu, or cuda (GPU builds); dense, the reference, stays on the "
                  "cpu")
      ->capture_default_str();
  cmd->add_flag("--no-think", a->no_think, "Chat template: thinking off (Qwen3 enable_thinking=false)");
  cmd->callback([a] { run_eval_command(*a); });
}

}  // namespace multipole::cli
