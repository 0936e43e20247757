// The report: aggregates results.jsonl per suite and variant into Markdown tables, writes
// the curves as gnuplot data + scripts and runs gnuplot (SVG) when it is installed.
#include "multipole/eval/report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace multipole::eval {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct VariantKey {
  std::string policy;
  int budget = 0;
  std::string cluster;
  bool operator==(const VariantKey& o) const = default;
  std::string label() const {
    if (policy == "dense") return "dense";
    std::string s = fmt::format("{} b{}", policy, budget);
    if (!cluster.empty()) s += " c" + cluster;
    return s;
  }
  json to_json() const { return {{"policy", policy}, {"budget", budget}, {"cluster", cluster}}; }
};

VariantKey key_of(const Record& r) { return {r.policy, r.budget, r.cluster}; }

// Variants of a suite in order of first appearance, dense first.
std::vector<VariantKey> variants_of(const std::vector<const Record*>& rs) {
  std::vector<VariantKey> out;
  for (const Record* r : rs) {
    VariantKey k = key_of(*r);
    if (std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
  }
  std::stable_partition(out.begin(), out.end(), [](const VariantKey& k) { return k.policy == "dense"; });
  return out;
}

std::vector<const Record*> of_variant(const std::vector<const Record*>& rs, const VariantKey& k) {
  std::vector<const Record*> out;
  for (const Record* r : rs)
    if (key_of(*r) == k) out.push_back(r);
  return out;
}

// Dense's record of each case: the reference the per-case comparisons read.
std::map<std::string, const Record*> dense_by_case(const std::vector<const Record*>& rs) {
  std::map<std::string, const Record*> out;
  for (const Record* r : rs)
    if (r->policy == "dense") out[r->case_id] = r;
  return out;
}

std::string cell(double v, int digits = 4) {
  if (!std::isfinite(v)) return "-";
  if (v != 0 && std::fabs(v) < std::pow(10.0, -digits)) return fmt::format("{:.2e}", v);
  return fmt::format("{:.{}f}", v, digits);
}
std::string pct(double v) { return std::isfinite(v) ? fmt::format("{:.1f}%", 100 * v) : "-"; }
std::string rate_ci(int64_t k, int64_t n) {
  if (n == 0) return "-";
  const Interval ci = wilson_interval(k, n);
  return fmt::format("{}/{} = {:.1f}% [{:.1f}, {:.1f}]", k, n, 100.0 * double(k) / double(n), 100 * ci.low,
                     100 * ci.high);
}
std::string cluster_cell(const VariantKey& k) { return k.cluster.empty() ? "-" : k.cluster; }
std::string budget_cell(const VariantKey& k) { return k.policy == "dense" ? "-" : std::to_string(k.budget); }

// ------------------------------------------------------------------------------ plots

struct Series {
  std::string title;
  std::vector<double> x, y, lo, hi;  // lo/hi: error bars (optional)
};

struct PlotSpec {
  std::string name, title, xlabel, ylabel;
  bool logx = false, bars = false;
  std::vector<std::string> xtics;  // categorical x labels (x = 0, 1, ...)
  std::string yrange;              // e.g. "[0:1.05]"
};

PlotSpec plot_spec(std::string name, std::string title, std::string xlabel, std::string ylabel, bool logx = false,
                   std::string yrange = {}) {
  PlotSpec p;
  p.name = std::move(name), p.title = std::move(title), p.xlabel = std::move(xlabel), p.ylabel = std::move(ylabel);
  p.logx = logx, p.yrange = std::move(yrange);
  return p;
}

std::string gp_quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// Writes plots/NAME.dat and plots/NAME.gp; returns the script's path ("" when no data).
std::string write_plot(const fs::path& dir, const PlotSpec& p, const std::vector<Series>& series) {
  std::vector<const Series*> used;
  for (const Series& s : series)
    if (!s.x.empty()) used.push_back(&s);
  if (used.empty()) return {};
  fs::create_directories(dir);
  std::ofstream dat(dir / (p.name + ".dat"));
  for (size_t i = 0; i < used.size(); ++i) {
    dat << "# " << used[i]->title << "\n";
    for (size_t j = 0; j < used[i]->x.size(); ++j) {
      dat << fmt::format("{} {}", used[i]->x[j], used[i]->y[j]);
      if (p.bars) dat << fmt::format(" {} {}", used[i]->lo[j], used[i]->hi[j]);
      dat << "\n";
    }
    dat << "\n\n";
  }
  std::ofstream gp(dir / (p.name + ".gp"));
  gp << "set terminal svg size 800,480 dynamic noenhanced font 'sans,12' background rgb 'white'\n";
  gp << "set output " << gp_quote(p.name + ".svg") << "\n";
  gp << "set title " << gp_quote(p.title) << "\n";
  gp << "set xlabel " << gp_quote(p.xlabel) << "\nset ylabel " << gp_quote(p.ylabel) << "\n";
  gp << "set grid\nset key outside right top\n";
  if (p.logx) gp << "set logscale x 2\n";
  if (!p.yrange.empty()) gp << "set yrange " << p.yrange << "\n";
  if (!p.xtics.empty()) {
    gp << "set xtics (";
    for (size_t i = 0; i < p.xtics.size(); ++i) gp << (i ? ", " : "") << gp_quote(p.xtics[i]) << " " << i;
    gp << ") rotate by -30\nset xrange [-0.5:" << double(p.xtics.size()) - 0.5 << "]\n";
  }
  gp << "plot ";
  for (size_t i = 0; i < used.size(); ++i) {
    gp << (i ? ", \\\n     " : "") << gp_quote(p.name + ".dat") << " index " << i << " using 1:2"
       << (p.bars ? ":3:4 with yerrorbars" : " with linespoints") << " title " << gp_quote(used[i]->title);
  }
  gp << "\n";
  return (dir / (p.name + ".gp")).string();
}

bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

// ------------------------------------------------------------------------------ suites

struct Section {
  std::string markdown;
  std::vector<std::pair<std::string, std::string>> plots;  // (script, caption)
  json summary = json::array();
};

Section fidelity_section(const std::vector<const Record*>& rs, const fs::path& plots) {
  Section s;
  const auto vs = variants_of(rs);
  s.markdown +=
      "Teacher-forced texts: a dense prefill of the prefix, then every text token fed to dense and to each policy in "
      "lockstep. KL(dense || policy) of the next-token distributions in nats, top-1 = same argmax as dense, attention "
      "error = ||o - o_dense|| / ||o_dense|| of each layer's attention output on the policy's own state, averaged "
      "over layers. Means are over all decoded positions of all texts.\n\n";
  if (std::any_of(rs.begin(), rs.end(), [](const Record* r) { return r->text("history", "own") == "dense"; }))
    s.markdown +=
        "History: dense's (`--dense-history`): after each position every policy's K/V rows were overwritten by "
        "dense's, so each position is one step's error over dense's history, without the drift of the policy's "
        "own states.\n\n";
  s.markdown += "| policy | budget | clusters | texts | positions | mean KL | max KL | top-1 agreement | "
                "mean attn error | max attn error |\n|---|---|---|---|---|---|---|---|---|---|\n";
  std::vector<Series> kl_pos, top_pos, err_layer;
  std::map<std::string, Series> by_budget, by_cluster;
  for (const VariantKey& k : vs) {
    const auto rr = of_variant(rs, k);
    double n = 0, kl = 0, top = 0, err = 0, klmax = 0, errmax = 0;
    std::vector<double> bc, bk, bt, layer;
    double bin_tokens = 0;
    for (const Record* r : rr) {
      const double p = r->get("positions");
      n += p, kl += p * r->get("kl_mean"), top += p * r->get("top1"), err += p * r->get("err_mean");
      klmax = std::max(klmax, r->get("kl_max"));
      errmax = std::max(errmax, r->get("err_max"));
      bin_tokens = r->get("bin_tokens");
      auto add = [](std::vector<double>& to, const std::vector<double>& from) {
        if (to.size() < from.size()) to.resize(from.size(), 0.0);
        for (size_t i = 0; i < from.size(); ++i) to[i] += from[i];
      };
      if (r->series.count("bin_count")) {
        add(bc, r->series.at("bin_count")), add(bk, r->series.at("bin_kl")), add(bt, r->series.at("bin_top1"));
      }
      if (r->series.count("layer_err")) add(layer, r->series.at("layer_err"));
    }
    const double m = std::max(1.0, n);
    s.markdown += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", k.policy, budget_cell(k),
                              cluster_cell(k), rr.size(), int64_t(n), cell(kl / m, 5), cell(klmax, 4), pct(top / m),
                              cell(err / m, 4), cell(errmax, 4));
    json j = k.to_json();
    j.update({{"texts", rr.size()}, {"positions", int64_t(n)}, {"kl_mean", kl / m}, {"kl_max", klmax},
              {"top1", top / m}, {"err_mean", err / m}, {"err_max", errmax}});
    s.summary.push_back(j);
    Series a, b, c;
    a.title = b.title = c.title = k.label();
    for (size_t i = 0; i < bc.size(); ++i)
      if (bc[i] > 0) {
        a.x.push_back(bin_tokens * double(i)), a.y.push_back(bk[i] / bc[i]);
        b.x.push_back(bin_tokens * double(i)), b.y.push_back(bt[i] / bc[i]);
      }
    for (size_t l = 0; l < layer.size(); ++l) c.x.push_back(double(l)), c.y.push_back(layer[l] / m);
    kl_pos.push_back(a), top_pos.push_back(b), err_layer.push_back(c);
    // Against budget: one line per (policy, cluster); against cluster fraction: per (policy, budget).
    Series& sb = by_budget[k.policy + (k.cluster.empty() ? "" : " c" + k.cluster)];
    sb.title = k.policy + (k.cluster.empty() ? "" : " c" + k.cluster);
    sb.x.push_back(k.budget), sb.y.push_back(kl / m);
    if (!k.cluster.empty()) {
      Series& sc = by_cluster[fmt::format("{} b{}", k.policy, k.budget)];
      sc.title = fmt::format("{} b{}", k.policy, k.budget);
      sc.x.push_back(1.0 / std::atof(k.cluster.c_str())), sc.y.push_back(kl / m);
    }
  }
  // Against oracle-topk at the same budget: the exact top-k of that many tokens, the best any
  // selection can do, so a policy's distance from it says what is left for selection to win.
  std::map<int, const json*> oracle;
  for (const json& j : s.summary)
    if (j["policy"] == "oracle-topk") oracle[j["budget"].get<int>()] = &j;
  bool header = false;
  for (json& j : s.summary) {
    const VariantKey k{j["policy"].get<std::string>(), j["budget"].get<int>(), j["cluster"].get<std::string>()};
    const auto o = oracle.find(k.budget);
    if (k.policy == "oracle-topk" || k.policy == "dense" || o == oracle.end()) continue;
    if (!header) {
      s.markdown += "\nAgainst oracle-topk (exact top-k of the same budget):\n\n| policy | budget | clusters | mean KL / "
                    "oracle's | top-1 - oracle's (points) |\n|---|---|---|---|---|\n";
      header = true;
    }
    const double okl = (*o->second)["kl_mean"].get<double>();
    const double ratio = okl > 0 ? j["kl_mean"].get<double>() / okl : std::numeric_limits<double>::infinity();
    const double dtop = j["top1"].get<double>() - (*o->second)["top1"].get<double>();
    s.markdown += fmt::format("| {} | {} | {} | {} | {:+.1f} |\n", k.policy, budget_cell(k), cluster_cell(k),
                              cell(ratio, 2), 100 * dtop);
    j["kl_over_oracle"] = std::isfinite(ratio) ? json(ratio) : json(nullptr);
    j["top1_minus_oracle"] = dtop;
  }
  auto add_plot = [&](const PlotSpec& p, const std::vector<Series>& series, const std::string& caption) {
    const std::string gp = write_plot(plots, p, series);
    if (!gp.empty()) s.plots.push_back({gp, caption});
  };
  add_plot(plot_spec("fidelity_kl_position", "KL(dense || policy) against position", "position (bin start, tokens)",
                     "mean KL (nats)"),
           kl_pos, "Mean next-token KL to dense per position bin");
  add_plot(plot_spec("fidelity_top1_position", "Top-1 agreement with dense against position",
                     "position (bin start, tokens)", "top-1 agreement", false, "[0:1.05]"),
           top_pos, "Top-1 agreement with dense per position bin");
  add_plot(plot_spec("fidelity_error_layer", "Attention output relative error per layer", "layer",
                     "mean relative error"),
           err_layer, "Attention-output relative error per layer");
  auto sorted = [](std::map<std::string, Series>& m, size_t min_points) {
    std::vector<Series> out;
    for (auto& [name, se] : m) {
      if (se.x.size() < min_points) continue;
      std::vector<size_t> idx(se.x.size());
      for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
      std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return se.x[a] < se.x[b]; });
      Series o;
      o.title = se.title;
      for (size_t i : idx) o.x.push_back(se.x[i]), o.y.push_back(se.y[i]);
      out.push_back(o);
    }
    return out;
  };
  add_plot(plot_spec("fidelity_kl_budget", "KL(dense || policy) against budget", "budget (tokens per KV head)",
                     "mean KL (nats)", true),
           sorted(by_budget, 2), "Mean KL against budget");
  add_plot(plot_spec("fidelity_kl_cluster", "KL(dense || policy) against cluster fraction",
                     "centroids per token (finest level)", "mean KL (nats)", true),
           sorted(by_cluster, 2), "Mean KL against the cluster fraction");

  // Per text.
  std::vector<std::string> cases;
  for (const Record* r : rs)
    if (std::find(cases.begin(), cases.end(), r->case_id) == cases.end()) cases.push_back(r->case_id);
  s.markdown += "\nPer text (mean KL / top-1):\n\n| text | tokens |";
  for (const VariantKey& k : vs) s.markdown += fmt::format(" {} |", k.label());
  s.markdown += "\n|---|---|";
  for (size_t i = 0; i < vs.size(); ++i) s.markdown += "---|";
  s.markdown += "\n";
  for (const std::string& c : cases) {
    std::string row, tokens = "-";
    for (const VariantKey& k : vs) {
      const Record* found = nullptr;
      for (const Record* r : rs)
        if (r->case_id == c && key_of(*r) == k) found = r;
      if (found) tokens = std::to_string(int64_t(found->get("text_tokens")));
      row += found ? fmt::format(" {} / {} |", cell(found->get("kl_mean"), 4), pct(found->get("top1"))) : " - |";
    }
    s.markdown += fmt::format("| {} | {} |{}\n", c, tokens, row);
  }
  return s;
}

Section agreement_section(const std::vector<const Record*>& rs) {
  Section s;
  s.markdown +=
      "Greedy decoding from the same prompts. Divergence = tokens equal to dense's before the first difference; "
      "answers agree when both extracted final answers are equal (or both absent). Rates with Wilson 95% intervals.\n\n"
      "| policy | budget | clusters | cases | identical to dense | mean tokens to divergence | mean tokens | "
      "final answer = dense's | correct |\n|---|---|---|---|---|---|---|---|---|\n";
  for (const VariantKey& k : variants_of(rs)) {
    const auto rr = of_variant(rs, k);
    int64_t n = int64_t(rr.size()), ident = 0, match = 0, correct = 0;
    double div = 0, toks = 0;
    for (const Record* r : rr) {
      ident += r->get("identical") > 0, match += r->get("answer_match") > 0, correct += r->get("correct") > 0;
      div += r->get("divergence"), toks += r->get("tokens");
    }
    const double m = std::max<int64_t>(1, n);
    const bool dense = k.policy == "dense";
    s.markdown += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", k.policy, budget_cell(k),
                              cluster_cell(k), n, dense ? "-" : rate_ci(ident, n), dense ? "-" : cell(div / m, 1),
                              cell(toks / m, 1), dense ? "-" : rate_ci(match, n), rate_ci(correct, n));
    json j = k.to_json();
    j.update({{"cases", n}, {"correct", correct}, {"mean_tokens", toks / m}});
    if (!dense) j.update({{"identical", ident}, {"answer_match", match}, {"mean_divergence", div / m}});
    s.summary.push_back(j);
  }
  return s;
}

Section passkey_section(const std::vector<const Record*>& rs, const fs::path& plots) {
  Section s;
  const auto vs = variants_of(rs);
  std::set<double> lengths, depths;
  for (const Record* r : rs) lengths.insert(r->get("length")), depths.insert(r->get("depth"));
  s.markdown +=
      "Passkey retrieval (greedy answer contains the number). Accuracy with Wilson 95% intervals; against dense, "
      "per case: keys dense finds that the policy misses, and answers word for word dense's.\n\n"
      "| policy | budget | clusters | found | misses where dense finds | answer identical to dense's |\n"
      "|---|---|---|---|---|---|\n";
  const auto dense_of = dense_by_case(rs);
  std::string missed_lines;
  std::vector<Series> curves;
  std::string grid = "\nBy length (rows) and depth (columns), found / cases:\n\n| policy | length |";
  for (double d : depths) grid += fmt::format(" {:.2f} |", d);
  grid += "\n|---|---|";
  for (size_t i = 0; i < depths.size(); ++i) grid += "---|";
  grid += "\n";
  for (const VariantKey& k : vs) {
    const auto rr = of_variant(rs, k);
    const bool dense = k.policy == "dense";
    int64_t found = 0, compared = 0, identical = 0;
    std::vector<std::string> missed;
    for (const Record* r : rr) {
      found += r->get("found") > 0;
      const auto d = dense_of.find(r->case_id);
      if (dense || d == dense_of.end()) continue;
      ++compared;
      identical += r->text("text") == d->second->text("text");
      if (d->second->get("found") > 0 && !(r->get("found") > 0)) missed.push_back(r->case_id);
    }
    s.markdown += fmt::format("| {} | {} | {} | {} | {} | {} |\n", k.policy, budget_cell(k), cluster_cell(k),
                              rate_ci(found, int64_t(rr.size())), dense ? "-" : std::to_string(missed.size()),
                              dense ? "-" : fmt::format("{}/{}", identical, compared));
    if (!missed.empty()) missed_lines += fmt::format("- {}: {}\n", k.label(), fmt::join(missed, ", "));
    json j = k.to_json();
    j.update({{"cases", rr.size()}, {"found", found}});
    if (!dense)
      j.update({{"compared_with_dense", compared}, {"identical_to_dense", identical},
                {"missed_where_dense_found", missed}});
    json per_length = json::object();
    Series c;
    c.title = k.label();
    for (double l : lengths) {
      grid += fmt::format("| {} | {} |", k.label(), int64_t(l));
      int64_t fl = 0, nl = 0;
      for (double d : depths) {
        int64_t f = 0, n = 0;
        for (const Record* r : rr)
          if (r->get("length") == l && r->get("depth") == d) ++n, f += r->get("found") > 0;
        grid += n ? fmt::format(" {}/{} |", f, n) : " - |";
        fl += f, nl += n;
      }
      grid += "\n";
      if (nl) {
        c.x.push_back(l), c.y.push_back(double(fl) / double(nl));
        per_length[std::to_string(int64_t(l))] = {{"found", fl}, {"cases", nl}};
      }
    }
    j["by_length"] = per_length;
    s.summary.push_back(j);
    curves.push_back(c);
  }
  if (!missed_lines.empty()) s.markdown += "\nKeys dense finds that a policy misses:\n\n" + missed_lines;
  s.markdown += grid;
  const std::string gp = write_plot(plots,
                                    plot_spec("passkey_accuracy_length", "Passkey retrieval against length",
                                              "prompt length (tokens)", "accuracy (all depths)", true, "[0:1.05]"),
                                    curves);
  if (!gp.empty()) s.plots.push_back({gp, "Passkey accuracy against length"});
  return s;
}

Section reasoning_section(const std::vector<const Record*>& rs, const fs::path& plots) {
  Section s;
  const auto vs = variants_of(rs);
  std::vector<std::string> datasets;
  for (const Record* r : rs) {
    const std::string d = r->text("dataset", "?");
    if (std::find(datasets.begin(), datasets.end(), d) == datasets.end()) datasets.push_back(d);
  }
  s.markdown += "Greedy answers (chat template, thinking on) scored against the known answers; accuracy with Wilson "
                "95% intervals. Answers agree with dense's when both extracted final answers are equal (or both "
                "absent); the last column says whether the policy's accuracy lies inside dense's interval.\n\n"
                "| policy | budget | clusters | dataset | correct | answered | mean tokens | answer = dense's | "
                "within dense's 95% interval |\n|---|---|---|---|---|---|---|---|---|\n";
  const auto dense_of = dense_by_case(rs);
  std::map<std::string, Interval> dense_ci;  // dataset -> dense's interval
  std::vector<Series> bars;
  std::vector<std::string> xtics;
  for (const VariantKey& k : vs) xtics.push_back(k.label());
  for (const std::string& d : datasets) {
    Series b;
    b.title = d;
    for (size_t vi = 0; vi < vs.size(); ++vi) {
      const VariantKey& k = vs[vi];
      const bool dense = k.policy == "dense";
      int64_t n = 0, correct = 0, answered = 0, paired = 0, match = 0;
      double toks = 0;
      for (const Record* r : of_variant(rs, k)) {
        if (r->text("dataset", "?") != d) continue;
        ++n, correct += r->get("correct") > 0, answered += r->get("has_answer") > 0, toks += r->get("tokens");
        if (auto dr = dense_of.find(r->case_id); !dense && dr != dense_of.end()) {
          const std::string a = r->text("answer"), b = dr->second->text("answer");
          ++paired, match += a.empty() ? b.empty() : !b.empty() && answers_equal(a, b);
        }
      }
      if (!n) continue;
      const Interval ci = wilson_interval(correct, n);
      const double accuracy = double(correct) / double(n);
      if (dense) dense_ci[d] = ci;
      const auto dci = dense_ci.find(d);  // dense sorts first among the variants
      const bool has_dci = !dense && dci != dense_ci.end();
      const bool within = has_dci && accuracy >= dci->second.low && accuracy <= dci->second.high;
      s.markdown += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", k.policy, budget_cell(k),
                                cluster_cell(k), d, rate_ci(correct, n), pct(double(answered) / double(n)),
                                cell(toks / double(n), 1), paired ? rate_ci(match, paired) : "-",
                                has_dci ? (within ? "yes" : "no") : "-");
      json j = k.to_json();
      j.update({{"dataset", d}, {"cases", n}, {"correct", correct}, {"accuracy", accuracy}, {"ci_low", ci.low},
                {"ci_high", ci.high}, {"answered", answered}});
      if (paired) j.update({{"answer_match", match}, {"paired_with_dense", paired}});
      if (has_dci) j["within_dense_ci"] = within;
      s.summary.push_back(j);
      b.x.push_back(double(vi) + 0.1 * double(&d - datasets.data())), b.y.push_back(double(correct) / double(n));
      b.lo.push_back(ci.low), b.hi.push_back(ci.high);
    }
    bars.push_back(b);
  }
  PlotSpec p = plot_spec("reasoning_accuracy", "Accuracy with 95% intervals", "policy", "accuracy", false, "[0:1.05]");
  p.bars = true;
  p.xtics = xtics;
  const std::string gp = write_plot(plots, p, bars);
  if (!gp.empty()) s.plots.push_back({gp, "Reasoning accuracy per policy (Wilson 95% intervals)"});
  return s;
}

}  // namespace

ReportResult render_report(const std::string& out_dir) {
  return render_report(out_dir, ResultsLog::read((fs::path(out_dir) / "results.jsonl").string()));
}

ReportResult render_report(const std::string& out_dir, const std::vector<Record>& records) {
  const fs::path dir(out_dir), plots = dir / "plots";
  ReportResult result;
  result.gnuplot = have_gnuplot();
  std::map<std::string, std::vector<const Record*>> by_suite;
  std::set<std::string> models, activations, settings;
  for (const Record& r : records) {
    by_suite[r.suite].push_back(&r);
    if (auto it = r.str.find("model"); it != r.str.end()) models.insert(it->second);
    activations.insert(r.text("activations", "int8"));
    if (auto it = r.str.find("settings"); it != r.str.end()) settings.insert(fmt::format("`{}`", it->second));
  }
  auto join = [](const std::set<std::string>& items) {
    std::string s;
    for (const std::string& m : items) s += (s.empty() ? "" : ", ") + m;
    return s.empty() ? std::string("-") : s;
  };
  std::string md = "# Evaluation report\n\n";
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  md += fmt::format("Model: {}. Activations of the quantised products: {}. Records: {} (results.jsonl). Rendered {}.\n\n",
                    join(models), join(activations), records.size(), date);
  // Experiments (the far field's positions, the selection, the history) are named here.
  if (!settings.empty()) md += fmt::format("Settings: {}.\n\n", join(settings));
  if (records.empty()) md += "No results yet.\n";
  if (!result.gnuplot && !records.empty())
    md += "Note: gnuplot is not installed, so the plots were not drawn; their data and scripts are in plots/ "
          "(`apt-get install gnuplot-nox`, then `multipole eval --report-only --out DIR`).\n\n";
  json summary = json::object();
  for (const char* suite : {"fidelity", "agreement", "passkey", "reasoning"}) {
    auto it = by_suite.find(suite);
    if (it == by_suite.end()) continue;
    Section s;
    if (std::string(suite) == "fidelity") s = fidelity_section(it->second, plots);
    if (std::string(suite) == "agreement") s = agreement_section(it->second);
    if (std::string(suite) == "passkey") s = passkey_section(it->second, plots);
    if (std::string(suite) == "reasoning") s = reasoning_section(it->second, plots);
    md += fmt::format("## {}\n\n{}\n", suite, s.markdown);
    for (const auto& [gp, caption] : s.plots) {
      const fs::path script(gp);
      const std::string svg = script.stem().string() + ".svg";
      if (result.gnuplot) {
        const std::string cmd = fmt::format("cd '{}' && gnuplot '{}' >/dev/null 2>&1", plots.string(),
                                            script.filename().string());
        if (std::system(cmd.c_str()) == 0 && fs::exists(plots / svg)) {
          result.plots.push_back((plots / svg).string());
          md += fmt::format("![{}](plots/{})\n\n", caption, svg);
          continue;
        }
        md += fmt::format("(gnuplot failed on plots/{})\n\n", script.filename().string());
      } else {
        md += fmt::format("({}: plots/{} and plots/{}.dat, not drawn)\n\n", caption, script.filename().string(),
                          script.stem().string());
      }
    }
    summary[suite] = s.summary;
  }
  fs::create_directories(dir);
  result.markdown_path = (dir / "report.md").string();
  std::ofstream(result.markdown_path) << md;
  MP_CHECK(fs::exists(result.markdown_path), "{}: cannot write the report", result.markdown_path);
  if (!records.empty()) summary["activations"] = join(activations);
  result.summary_json = summary.dump(2) + "\n";
  return result;
}

}  // namespace multipole::eval
