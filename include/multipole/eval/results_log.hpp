#pragma once
// The results file of an evaluation run: one JSON object per line (JSONL), appended and
// flushed case by case, so that a run killed at any point keeps every finished case and
// `--resume` skips them. A record is keyed by (suite, case id, policy, budget, cluster
// setting); dense reference runs have policy "dense", budget 0 and no cluster setting.
#include <map>
#include <set>
#include <string>
#include <vector>

namespace multipole::eval {

struct Record {
  std::string suite;    // fidelity, agreement, passkey, reasoning
  std::string case_id;  // "doc:architecture", "passkey-L1024-D0.50-0", "aime2025-3", ...
  std::string policy;   // dense, multipole, squeezed, quest, oracle-topk
  int budget = 0;
  std::string cluster;  // tokens per centroid of each level, "16/128"; empty where unused
  std::map<std::string, double> num;                   // scalar results
  std::map<std::string, std::string> str;              // texts (answers, model, ...)
  std::map<std::string, std::vector<double>> series;   // per-bin / per-layer sums

  std::string key() const;  // "suite|case|policy|budget|cluster"
  double get(const std::string& name, double fallback = 0) const;
  std::string text(const std::string& name, const std::string& fallback = "") const;  // str[name]
};

class ResultsLog {
 public:
  // path: the results.jsonl. resume: keep and index the records already there (a torn last
  // line, from a killed run, is dropped with a warning on stderr); else the file must not
  // exist yet unless `overwrite`, and starts empty.
  ResultsLog(std::string path, bool resume, bool overwrite);
  ~ResultsLog();
  ResultsLog(const ResultsLog&) = delete;
  ResultsLog& operator=(const ResultsLog&) = delete;

  bool done(const std::string& key) const { return keys_.count(key) != 0; }
  const Record* find(const std::string& key) const;
  // Writes one line and flushes it to the file.
  void append(const Record& record);
  const std::vector<Record>& records() const { return records_; }
  int64_t resumed() const { return resumed_; }  // records found at open
  const std::string& path() const { return path_; }

  // All records of a results file. Throws naming the file and line of a malformed record
  // (except a torn last line, which is skipped).
  static std::vector<Record> read(const std::string& path);

 private:
  std::string path_;
  std::vector<Record> records_;
  std::set<std::string> keys_;
  int64_t resumed_ = 0;
  struct File;
  File* file_ = nullptr;
};

// JSON text of one record (one line, no newline) and back; from_json throws naming `where`.
std::string record_to_json(const Record& r);
Record record_from_json(const std::string& line, const std::string& where);

}  // namespace multipole::eval
