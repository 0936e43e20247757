#pragma once
// The report of an evaluation run, from its results.jsonl alone (so it can be re-rendered):
// DIR/report.md (a table per suite), DIR/plots/*.dat + *.gp, and *.svg drawn by gnuplot
// when it is installed (the report says so when it is not).
#include <string>
#include <vector>

#include "multipole/eval/results_log.hpp"

namespace multipole::eval {

struct ReportResult {
  std::string markdown_path;
  std::vector<std::string> plots;  // SVG files written
  bool gnuplot = false;            // whether gnuplot was found
  std::string summary_json;        // the tables as one JSON object
};

ReportResult render_report(const std::string& out_dir);
// The same from records in memory (tests).
ReportResult render_report(const std::string& out_dir, const std::vector<Record>& records);

}  // namespace multipole::eval
