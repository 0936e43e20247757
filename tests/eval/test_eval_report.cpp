// The results log (append, resume, torn lines), the progress line, and the report rendered
// from hand-made records: tables hold the aggregates computed here by hand, plots exist.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "eval/eval_test_util.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/progress.hpp"
#include "multipole/eval/report.hpp"
#include "multipole/eval/results_log.hpp"

namespace multipole::eval {
namespace {

namespace fs = std::filesystem;

Record rec(const std::string& suite, const std::string& id, const std::string& policy, int budget,
           const std::string& cluster) {
  Record r;
  r.suite = suite, r.case_id = id, r.policy = policy, r.budget = budget, r.cluster = cluster;
  r.str["model"] = "m.gguf";
  return r;
}

TEST(EvalResultsLog, AppendsResumesAndRefusesToClobber) {
  const std::string dir = tiny::temp_dir("eval-log");
  const std::string path = dir + "/results.jsonl";
  {
    ResultsLog log(path, false, false);
    Record a = rec("passkey", "c1", "dense", 0, "");
    a.num["found"] = 1;
    a.num["nan"] = std::nan("");
    a.series["s"] = {1.5, 2.5};
    log.append(a);
    log.append(rec("passkey", "c1", "multipole", 128, "16/128"));
    EXPECT_TRUE(log.done("passkey|c1|multipole|128|16/128"));
  }
  EXPECT_THROW(ResultsLog(path, false, false), Error);  // would clobber a run
  try {
    ResultsLog log(path, false, false);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
  }
  // A run killed mid-line leaves a torn last line: resume drops it and keeps the rest.
  std::ofstream(path, std::ios::app) << R"({"suite": "passkey", "case": "c2", "pol)";
  {
    ResultsLog log(path, true, false);
    EXPECT_EQ(log.resumed(), 2);
    EXPECT_TRUE(log.done("passkey|c1|dense|0|"));
    EXPECT_FALSE(log.done("passkey|c2|dense|0|"));
    const Record* a = log.find("passkey|c1|dense|0|");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->get("found"), 1);
    EXPECT_TRUE(std::isnan(a->get("nan")));
    EXPECT_EQ(a->series.at("s"), (std::vector<double>{1.5, 2.5}));
    log.append(rec("passkey", "c2", "dense", 0, ""));
  }
  EXPECT_EQ(ResultsLog::read(path).size(), 3u);
  // A malformed line in the middle is an error naming the line.
  std::ofstream(path, std::ios::app) << "not json\n" << record_to_json(rec("passkey", "c3", "dense", 0, "")) << "\n";
  try {
    ResultsLog::read(path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 4"), std::string::npos) << e.what();
  }
  // A budget that is not an int (a float too large for one, as a fuzzer would write) is an
  // error, not undefined behaviour.
  for (const char* budget : {"2.5e19", "1.5", "-1", "4294967296"}) {
    std::string line = record_to_json(rec("passkey", "c4", "dense", 0, ""));
    line.replace(line.find("\"budget\":0"), 10, std::string("\"budget\":") + budget);
    try {
      record_from_json(line, "r.jsonl:1");
      ADD_FAILURE() << budget << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("r.jsonl:1: budget"), std::string::npos) << e.what();
    }
  }
  {
    ResultsLog fresh(path, false, true);  // --overwrite starts empty
    EXPECT_EQ(ResultsLog::read(path).size(), 0u);
  }
  ResultsLog again(path, false, false);  // an empty file holds nothing to protect
  EXPECT_EQ(again.resumed(), 0);
}

TEST(EvalProgress, LineShowsCountsAndEta) {
  EXPECT_EQ(Progress::format_duration(45), "45s");
  EXPECT_EQ(Progress::format_duration(187), "3m07s");
  EXPECT_EQ(Progress::format_duration(7500), "2h05m");
  Progress p("fidelity", 10, false);
  p.advance(3, "doc:a");
  const std::string line = p.line();
  EXPECT_NE(line.find("fidelity 3/10 (30%)"), std::string::npos) << line;
  EXPECT_NE(line.find("ETA"), std::string::npos) << line;
  EXPECT_NE(line.find("doc:a"), std::string::npos) << line;
  p.advance(7);
  EXPECT_NE(p.line().find("done"), std::string::npos) << p.line();
}

// Set-up before the first unit (a long prefill) is not in the rate: after 600 s of set-up, 2 of
// 4 units done 10 s apart read "ETA 20s", not the 610 s the whole elapsed time would give.
TEST(EvalProgress, EtaLeavesOutTheSetUpBeforeTheFirstUnit) {
  Progress::Clock::time_point t{};
  Progress p("fidelity", 4, false, [&] { return t; });
  p.advance(0, "dense prefill");
  t += std::chrono::seconds(600);
  p.advance(1, "position 1");
  t += std::chrono::seconds(10);
  p.advance(1, "position 2");
  EXPECT_NE(p.line().find("10m10s elapsed, ETA 20s"), std::string::npos) << p.line();
}

// A run stopped by an error must not end its progress with a "done" line.
TEST(EvalProgress, AnErrorDoesNotPrintDone) {
  // The runner's case: an option rejected before any case was counted (0/0 would read as
  // "100%, done"), and an error after a case was drawn (no second, final line).
  testing::internal::CaptureStderr();
  try {
    Progress p("passkey", 0, true);
    throw Error("eval: --depths: 1.5 must be in [0, 1]");
  } catch (const Error&) {
  }
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  testing::internal::CaptureStderr();
  try {
    Progress p("passkey", 4, true);
    p.advance(1, "case-1");
    throw Error("a failing case");
  } catch (const Error&) {
  }
  const std::string failed = testing::internal::GetCapturedStderr();
  EXPECT_EQ(std::count(failed.begin(), failed.end(), '\n'), 1) << failed;
  testing::internal::CaptureStderr();
  { Progress p("passkey", 1, true); p.advance(1, "case-1"); }
  const std::string ok = testing::internal::GetCapturedStderr();
  EXPECT_NE(ok.find("passkey 1/1 (100%)"), std::string::npos) << ok;
  EXPECT_NE(ok.find("done"), std::string::npos) << ok;
}

// The Wilson interval written out here (not the library's) for the expected table cell.
std::string wilson_cell(int k, int n) {
  const double z = 1.96, p = double(k) / n, d = 1 + z * z / n;
  const double c = (p + z * z / (2 * n)) / d, h = z * std::sqrt(p * (1 - p) / n + z * z / (4.0 * n * n)) / d;
  return fmt::format("{}/{} = {:.1f}% [{:.1f}, {:.1f}]", k, n, 100.0 * p, 100 * (c - h), 100 * (c + h));
}

TEST(EvalReport, RendersTablesAndPlotsFromRecords) {
  const std::string dir = tiny::temp_dir("eval-report");
  std::vector<Record> rs;
  // fidelity: two texts; the table's means are position-weighted: (100 * 0.1 + 300 * 0.3) / 400 = 0.25.
  for (auto [id, n, kl, top] : {std::tuple{"doc:a", 100.0, 0.1, 0.9}, std::tuple{"doc:b", 300.0, 0.3, 0.5}}) {
    Record r = rec("fidelity", id, "multipole", 128, "16/128");
    r.num = {{"positions", n}, {"kl_mean", kl}, {"kl_max", 2 * kl}, {"top1", top}, {"err_mean", 0.01},
             {"err_max", 0.02}, {"bin_tokens", 64}, {"text_tokens", n + 64}};
    r.series["bin_count"] = {0, n / 2, n / 2};
    r.series["bin_kl"] = {0, kl * n / 2, kl * n / 2};
    r.series["bin_top1"] = {0, top * n / 2, top * n / 2};
    r.series["bin_err"] = {0, 0.01 * n / 2, 0.01 * n / 2};
    r.series["layer_err"] = {0.005 * n, 0.015 * n};
    rs.push_back(r);
  }
  // passkey: dense finds 2 of 3 (p0, p1); quest 1 of 2 (it misses p0, where dense found the key), and
  // answers p1 word for word as dense; squeezed finds p2, which dense misses, in other words.
  for (int i = 0; i < 3; ++i) {
    const std::string id = "p" + std::to_string(i);
    Record d = rec("passkey", id, "dense", 0, "");
    d.num = {{"length", 1024}, {"depth", 0.5 * i}, {"found", double(i < 2)}};
    d.str["text"] = i < 2 ? "The pass key is 12." : "I do not know.";
    rs.push_back(d);
    if (i < 2) {
      Record q = rec("passkey", id, "quest", 64, "");
      q.num = {{"length", 1024}, {"depth", 0.5 * i}, {"found", double(i)}};
      q.str["text"] = i == 1 ? "The pass key is 12." : "The pass key is 1.";
      rs.push_back(q);
    } else {
      Record q = rec("passkey", id, "squeezed", 64, "16/64");
      q.num = {{"length", 1024}, {"depth", 0.5 * i}, {"found", 1}};
      q.str["text"] = "It is 12.";
      rs.push_back(q);
    }
  }
  // reasoning: 3 of 4 arithmetic problems right under dense (answers "0", "1", "7", "3"; the
  // truth is i). Multipole answers "0", none, "7.0" (equal to "7"), "2": right on 1 of 4 (25%,
  // inside dense's interval [30.1, 95.4]? no: below it), answers equal to dense's 2 of 4.
  for (int i = 0; i < 4; ++i) {
    Record r = rec("reasoning", "arith-" + std::to_string(i), "dense", 0, "");
    r.num = {{"correct", double(i != 2)}, {"has_answer", 1}, {"tokens", 100}};
    r.str["dataset"] = "arith";
    r.str["answer"] = i == 2 ? "7" : std::to_string(i);
    rs.push_back(r);
    Record m = rec("reasoning", "arith-" + std::to_string(i), "multipole", 128, "16/128");
    m.num = {{"correct", double(i == 0)}, {"has_answer", double(i != 1)}, {"tokens", 50}};
    m.str["dataset"] = "arith";
    m.str["answer"] = std::vector<std::string>{"0", "", "7.0", "2"}[size_t(i)];
    rs.push_back(m);
    // Squeezed: right on 2 of 4 (inside dense's interval), answers equal to dense's 3 of 4.
    Record q = rec("reasoning", "arith-" + std::to_string(i), "squeezed", 128, "16/128");
    q.num = {{"correct", double(i < 2)}, {"has_answer", 1}, {"tokens", 80}};
    q.str["dataset"] = "arith";
    q.str["answer"] = std::vector<std::string>{"0", "1", "7", "9"}[size_t(i)];
    rs.push_back(q);
  }
  // agreement: one case, identical for 40 tokens then different.
  Record ag = rec("agreement", "arith-0", "squeezed", 128, "16/128");
  ag.num = {{"identical", 0}, {"divergence", 40}, {"tokens", 50}, {"answer_match", 1}, {"correct", 0}};
  rs.push_back(ag);

  const ReportResult rr = render_report(dir, rs);
  ASSERT_TRUE(fs::exists(rr.markdown_path));
  const std::string md = eval_test::slurp(rr.markdown_path);
  for (const char* section : {"## fidelity", "## agreement", "## passkey", "## reasoning"})
    EXPECT_NE(md.find(section), std::string::npos) << section;
  EXPECT_NE(md.find("| multipole | 128 | 16/128 | 2 | 400 | 0.25000 | 0.6000 | 60.0% |"), std::string::npos) << md;
  EXPECT_NE(md.find("| quest | 64 | - | " + wilson_cell(1, 2) + " | 1 | 1/2 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| squeezed | 64 | 16/64 | " + wilson_cell(1, 1) + " | 0 | 0/1 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| dense | - | - | " + wilson_cell(2, 3) + " | - | - |"), std::string::npos) << md;
  EXPECT_NE(md.find("Keys dense finds that a policy misses:\n\n- quest b64: p0\n"), std::string::npos) << md;
  EXPECT_NE(md.find("| dense | - | - | arith | " + wilson_cell(3, 4) + " | 100.0% | 100.0 | - | - |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("| multipole | 128 | 16/128 | arith | " + wilson_cell(1, 4) + " | 75.0% | 50.0 | " +
                    wilson_cell(2, 4) + " | no |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| squeezed | 128 | 16/128 | arith | " + wilson_cell(2, 4) + " | 100.0% | 80.0 | " +
                    wilson_cell(3, 4) + " | yes |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| squeezed | 128 | 16/128 | 1 | " + wilson_cell(0, 1) + " | 40.0 | 50.0 |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("| doc:b | 364 | 0.3000 / 50.0% |"), std::string::npos) << md;
  // Curves: the position bins hold the per-bin means (0.1 * 50 + 0.3 * 150) / 200 = 0.25 at 64 and 128.
  const std::string dat = eval_test::slurp(dir + "/plots/fidelity_kl_position.dat");
  EXPECT_NE(dat.find("64 0.25\n128 0.25\n"), std::string::npos) << dat;
  EXPECT_TRUE(fs::exists(dir + "/plots/passkey_accuracy_length.gp"));
  EXPECT_TRUE(fs::exists(dir + "/plots/reasoning_accuracy.gp"));
  if (rr.gnuplot) {
    EXPECT_GE(rr.plots.size(), 4u);
    for (const std::string& svg : rr.plots) {
      EXPECT_NE(eval_test::slurp(svg).find("<svg"), std::string::npos) << svg;
      EXPECT_NE(md.find("plots/" + fs::path(svg).filename().string()), std::string::npos) << svg;
    }
  } else {
    EXPECT_NE(md.find("gnuplot is not installed"), std::string::npos) << md;
  }
  const auto summary = nlohmann::json::parse(rr.summary_json);
  EXPECT_NEAR(summary["fidelity"][0]["kl_mean"].get<double>(), 0.25, 1e-12);
  EXPECT_EQ(summary["passkey"][1]["found"].get<int>(), 1);
  EXPECT_EQ(summary["passkey"][1]["identical_to_dense"].get<int>(), 1);
  EXPECT_EQ(summary["passkey"][1]["missed_where_dense_found"], nlohmann::json::array({"p0"}));
  EXPECT_EQ(summary["passkey"][2]["missed_where_dense_found"], nlohmann::json::array());
  EXPECT_EQ(summary["reasoning"][1]["answer_match"].get<int>(), 2);
  EXPECT_FALSE(summary["reasoning"][1]["within_dense_ci"].get<bool>());
  EXPECT_TRUE(summary["reasoning"][2]["within_dense_ci"].get<bool>());
  EXPECT_FALSE(summary["reasoning"][0].contains("within_dense_ci"));
}

// The fidelity section sets each policy beside oracle-topk at its budget: its mean KL as a multiple
// of the oracle's and its top-1 in points above or below; budgets without an oracle are left out.
TEST(EvalReport, FidelityAgainstTheOracleAtTheSameBudget) {
  const std::string dir = tiny::temp_dir("eval-report-oracle");
  std::vector<Record> rs;
  for (auto [policy, budget, cluster, kl, top] :
       {std::tuple{"multipole", 128, "16/64", 0.3, 0.8}, std::tuple{"squeezed", 128, "16/64", 0.45, 0.7},
        std::tuple{"oracle-topk", 128, "", 0.15, 0.85}, std::tuple{"multipole", 512, "16/64", 0.1, 0.9}}) {
    Record r = rec("fidelity", "doc:a", policy, budget, cluster);
    r.num = {{"positions", 100}, {"kl_mean", kl}, {"kl_max", 1}, {"top1", top}, {"err_mean", 0.1},
             {"err_max", 0.2}, {"bin_tokens", 64}, {"text_tokens", 164}};
    rs.push_back(r);
  }
  const ReportResult rr = render_report(dir, rs);
  const std::string md = eval_test::slurp(rr.markdown_path);
  EXPECT_NE(md.find("| multipole | 128 | 16/64 | 2.00 | -5.0 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| squeezed | 128 | 16/64 | 3.00 | -15.0 |"), std::string::npos) << md;
  const std::string b512 = "| multipole | 512 | 16/64 | ";
  const size_t first = md.find(b512);
  ASSERT_NE(first, std::string::npos) << md;
  EXPECT_EQ(md.find(b512, first + 1), std::string::npos) << "budget 512 has no oracle to compare with\n" << md;
  const auto summary = nlohmann::json::parse(rr.summary_json);
  for (const auto& j : summary["fidelity"]) {
    if (j["policy"] == "multipole" && j["budget"] == 128) {
      EXPECT_NEAR(j["kl_over_oracle"].get<double>(), 2.0, 1e-12);
      EXPECT_NEAR(j["top1_minus_oracle"].get<double>(), -0.05, 1e-12);
    } else if (j["policy"] == "squeezed") {
      EXPECT_NEAR(j["kl_over_oracle"].get<double>(), 3.0, 1e-12);
    } else {  // the oracle itself, and budget 512
      EXPECT_FALSE(j.contains("kl_over_oracle")) << j.dump();
    }
  }
}

}  // namespace
}  // namespace multipole::eval
