#include "multipole/eval/results_log.hpp"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/json_integer.hpp"
#include "multipole/core/error.hpp"

namespace multipole::eval {

using json = nlohmann::json;

std::string Record::key() const {
  return fmt::format("{}|{}|{}|{}|{}", suite, case_id, policy, budget, cluster);
}

double Record::get(const std::string& name, double fallback) const {
  auto it = num.find(name);
  return it == num.end() ? fallback : it->second;
}

std::string Record::text(const std::string& name, const std::string& fallback) const {
  auto it = str.find(name);
  return it == str.end() ? fallback : it->second;
}

namespace {

// JSON has no NaN/inf: they are written as null and read back as NaN.
json number(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }
double read_number(const json& v) { return v.is_null() ? std::nan("") : v.get<double>(); }

}  // namespace

std::string record_to_json(const Record& r) {
  json j;
  j["suite"] = r.suite;
  j["case"] = r.case_id;
  j["policy"] = r.policy;
  j["budget"] = r.budget;
  j["cluster"] = r.cluster;
  json num = json::object(), str = json::object(), series = json::object();
  for (const auto& [k, v] : r.num) num[k] = number(v);
  for (const auto& [k, v] : r.str) str[k] = v;
  for (const auto& [k, v] : r.series) {
    json a = json::array();
    for (double x : v) a.push_back(number(x));
    series[k] = std::move(a);
  }
  j["num"] = std::move(num);
  j["str"] = std::move(str);
  j["series"] = std::move(series);
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Record record_from_json(const std::string& line, const std::string& where) {
  Record r;
  try {
    const json j = json::parse(line);
    r.suite = j.at("suite").get<std::string>();
    r.case_id = j.at("case").get<std::string>();
    r.policy = j.at("policy").get<std::string>();
    const std::optional<int64_t> budget = json_int64(j.at("budget"));
    if (!budget || *budget < 0 || *budget > INT32_MAX)
      fail("{}: budget {} is not an integer in 0..{}", where, j.at("budget").dump(), INT32_MAX);
    r.budget = int(*budget);
    r.cluster = j.at("cluster").get<std::string>();
    for (const auto& [k, v] : j.at("num").items()) r.num[k] = read_number(v);
    for (const auto& [k, v] : j.at("str").items()) r.str[k] = v.get<std::string>();
    for (const auto& [k, v] : j.at("series").items()) {
      std::vector<double> a;
      for (const json& x : v) a.push_back(read_number(x));
      r.series[k] = std::move(a);
    }
  } catch (const json::exception& e) {
    fail("{}: not a results record: {}", where, e.what());
  }
  return r;
}

std::vector<Record> ResultsLog::read(const std::string& path) {
  std::ifstream f(path);
  MP_CHECK(f, "{}: cannot open the results file", path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) lines.push_back(line);
  std::vector<Record> out;
  for (size_t i = 0; i < lines.size(); ++i) {
    try {
      out.push_back(record_from_json(lines[i], fmt::format("{} line {}", path, i + 1)));
    } catch (const Error& e) {
      if (i + 1 < lines.size()) throw;
      std::fprintf(stderr, "warning: %s (a torn last line from an interrupted run: dropped)\n", e.what());
    }
  }
  return out;
}

struct ResultsLog::File {
  std::FILE* f = nullptr;
};

ResultsLog::ResultsLog(std::string path, bool resume, bool overwrite) : path_(std::move(path)) {
  namespace fs = std::filesystem;
  // An empty file (a run that failed before its first case) holds nothing to protect.
  std::error_code ec;
  const bool exists = fs::exists(path_) && fs::file_size(path_, ec) > 0;
  if (resume && exists) {
    records_ = read(path_);
    for (const Record& r : records_) keys_.insert(r.key());
    resumed_ = int64_t(records_.size());
    // Rewrite the kept records so that a torn last line does not stay in the middle.
    std::ofstream o(path_, std::ios::trunc);
    MP_CHECK(o, "{}: cannot write the results file", path_);
    for (const Record& r : records_) o << record_to_json(r) << '\n';
  } else {
    MP_CHECK(!exists || overwrite || resume,
             "{}: a results file is already there: pass --resume to continue that run or --overwrite to start over",
             path_);
    std::ofstream o(path_, std::ios::trunc);
    MP_CHECK(o, "{}: cannot create the results file", path_);
  }
  file_ = new File;
  file_->f = std::fopen(path_.c_str(), "a");
  if (!file_->f) {
    delete file_;
    file_ = nullptr;
    fail("{}: cannot open the results file for appending", path_);
  }
}

ResultsLog::~ResultsLog() {
  if (file_) {
    std::fclose(file_->f);
    delete file_;
  }
}

const Record* ResultsLog::find(const std::string& key) const {
  for (const Record& r : records_)
    if (r.key() == key) return &r;
  return nullptr;
}

void ResultsLog::append(const Record& record) {
  const std::string line = record_to_json(record) + "\n";
  MP_CHECK(std::fwrite(line.data(), 1, line.size(), file_->f) == line.size() && std::fflush(file_->f) == 0,
           "{}: write failed", path_);
  records_.push_back(record);
  keys_.insert(record.key());
}

}  // namespace multipole::eval
