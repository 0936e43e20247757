// AIME problems from a JSON-lines file: {"id": 0, "problem": "...", "answer": "70"} per line.
// Problem ids are "<file stem>-<id>" ("aime2025-0"); answers must be integers (AIME answers
// are 0..999) and are stored in canonical form ("070" -> "70").
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/eval/tasks.hpp"

namespace multipole::eval {

namespace {

using json = nlohmann::json;

constexpr std::string_view kBoxInstruction = "Please reason step by step, and put your final answer within \\boxed{}.";

std::string trim(const std::string& s) {
  const size_t begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return {};
  return s.substr(begin, s.find_last_not_of(" \t\r\n") - begin + 1);
}

// "70", " 070 ", "-3" -> canonical integer text; "" when it is not an integer.
std::string canonical_integer(const std::string& text) {
  std::string s = trim(text);
  bool negative = false;
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) {
    negative = s[0] == '-';
    s.erase(0, 1);
  }
  if (s.empty() || s.size() > 18 || s.find_first_not_of("0123456789") != std::string::npos) return {};
  s.erase(0, std::min(s.find_first_not_of('0'), s.size() - 1));
  return negative && s != "0" ? "-" + s : s;
}

}  // namespace

std::vector<Problem> load_aime(const std::string& path) {
  std::ifstream in(path);
  MP_CHECK(in.good(), "AIME file {}: cannot open", path);
  const std::string stem = std::filesystem::path(path).stem().string();
  std::vector<Problem> problems;
  std::set<std::string> ids;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (trim(line).empty()) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      fail("AIME file {} line {}: not valid JSON ({})", path, number, e.what());
    }
    MP_CHECK(j.is_object(), "AIME file {} line {}: expected a JSON object, got {}", path, number, j.type_name());
    for (const char* field : {"id", "problem", "answer"})
      MP_CHECK(j.contains(field), "AIME file {} line {}: field '{}' is missing", path, number, field);

    Problem p;
    const json& id = j["id"];
    MP_CHECK(id.is_string() || id.is_number_integer(), "AIME file {} line {}: field 'id' must be a string or an integer, got {}",
             path, number, id.dump());
    p.id = stem + "-" + (id.is_string() ? id.get<std::string>() : id.dump());
    MP_CHECK(ids.insert(p.id).second, "AIME file {} line {}: field 'id' {} repeats an earlier id", path, number,
             id.dump());

    const json& problem = j["problem"];
    MP_CHECK(problem.is_string() && !trim(problem.get<std::string>()).empty(),
             "AIME file {} line {}: field 'problem' must be a non-empty string", path, number);
    p.question = trim(problem.get<std::string>());
    if (p.question.find("\\boxed") == std::string::npos) p.question += "\n" + std::string(kBoxInstruction);

    const json& answer = j["answer"];
    MP_CHECK(answer.is_string() || answer.is_number_integer(),
             "AIME file {} line {}: field 'answer' must be a string or an integer, got {}", path, number,
             answer.dump());
    p.answer = canonical_integer(answer.is_string() ? answer.get<std::string>() : answer.dump());
    MP_CHECK(!p.answer.empty(), "AIME file {} line {}: field 'answer' {} is not an integer", path, number,
             answer.dump());
    problems.push_back(std::move(p));
  }
  MP_CHECK(!problems.empty(), "AIME file {}: no problems", path);
  return problems;
}

}  // namespace multipole::eval
