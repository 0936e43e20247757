// agreement: greedy decoding from the same prompts under dense and under each candidate;
// how many tokens they share before the first divergence and whether the final answers
// agree. The dense run's tokens are kept in its record, so --resume does not redo it.
#include <algorithm>

#include "eval/suite.hpp"
#include "multipole/core/error.hpp"

namespace multipole::eval {

namespace {

std::vector<double> as_series(const std::vector<int32_t>& t) { return {t.begin(), t.end()}; }

// Tokens shared before the first difference (the shorter length when one is a prefix).
int64_t first_divergence(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return int64_t(i);
}

}  // namespace

void run_agreement(SuiteContext& sc, Progress& progress) {
  const std::vector<DatasetProblem> problems = load_problems(sc);
  const int max_tokens = sc.max_tokens(256);
  Engines engines(sc);
  progress.add_total(int64_t(problems.size() * (sc.variants.size() + 1)));
  for (const auto& [p, dataset] : problems) {
    // The dense reference: from the log when a resumed run has it.
    const Record dense_key = sc.record("agreement", p.id, nullptr);
    std::vector<int32_t> dense_tokens;
    std::string dense_text;
    if (const Record* done = sc.log.find(dense_key.key())) {
      for (double x : done->series.at("tokens")) dense_tokens.push_back(int32_t(x));
      dense_text = sc.tok.decode(dense_tokens);
      progress.skip(1);
    }
    std::vector<const Variant*> todo;
    for (const Variant& v : sc.variants)
      if (!sc.log.done(sc.record("agreement", p.id, &v).key())) todo.push_back(&v);
      else progress.skip(1);
    if (todo.empty() && sc.log.done(dense_key.key())) continue;
    const std::vector<int32_t> prompt = sc.chat_prompt(p.question);
    SharedPrompt shared(engines, prompt);
    if (!sc.log.done(dense_key.key())) {
      progress.advance(0, p.id + " dense");
      const Generation g = shared.generate(sc, nullptr, max_tokens);
      dense_tokens = g.tokens;
      dense_text = g.text;
      Record r = dense_key;
      const auto ans = extract_answer(g.text);
      r.num["prompt_tokens"] = double(prompt.size());
      r.num["tokens"] = double(g.tokens.size());
      r.num["has_answer"] = ans.has_value();
      r.num["correct"] = ans && answers_equal(*ans, p.answer);
      r.num["seconds"] = g.seconds;  // the last prompt token and the answer
      r.num["shared_prefill_seconds"] = shared.prefill_seconds();
      r.str["answer"] = ans.value_or("");
      r.str["expected"] = p.answer;
      r.str["dataset"] = dataset;
      r.str["finish"] = g.finish;
      r.str["text"] = g.text;
      r.series["tokens"] = as_series(g.tokens);
      sc.log.append(r);
      progress.advance(1);
    }
    const auto dense_answer = extract_answer(dense_text);
    for (const Variant* v : todo) {
      progress.advance(0, p.id + " " + v->label());
      const Generation g = shared.generate(sc, v, max_tokens);
      const auto ans = extract_answer(g.text);
      Record r = sc.record("agreement", p.id, v);
      const int64_t div = first_divergence(dense_tokens, g.tokens);
      r.num["prompt_tokens"] = double(prompt.size());
      r.num["tokens"] = double(g.tokens.size());
      r.num["dense_tokens"] = double(dense_tokens.size());
      r.num["divergence"] = double(div);
      r.num["identical"] = g.tokens == dense_tokens;
      // Both without an answer counts as agreeing (the report shows how often dense had one).
      r.num["answer_match"] = dense_answer.has_value() == ans.has_value() &&
                              (!ans || answers_equal(*ans, *dense_answer));
      r.num["dense_has_answer"] = dense_answer.has_value();
      r.num["has_answer"] = ans.has_value();
      r.num["correct"] = ans && answers_equal(*ans, p.answer);
      r.num["seconds"] = g.seconds;
      r.num["shared_prefill_seconds"] = shared.prefill_seconds();
      r.str["answer"] = ans.value_or("");
      r.str["dense_answer"] = dense_answer.value_or("");
      r.str["expected"] = p.answer;
      r.str["dataset"] = dataset;
      r.str["finish"] = g.finish;
      sc.log.append(r);
      progress.advance(1);
    }
  }
}

}  // namespace multipole::eval
