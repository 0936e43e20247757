// reasoning: AIME 2025 and generated arithmetic problems, answered in the chat template with
// thinking on, greedy, up to --max-tokens; the extracted answer against the known one.
#include "eval/suite.hpp"
#include "multipole/core/error.hpp"

namespace multipole::eval {

void run_reasoning(SuiteContext& sc, Progress& progress) {
  const std::vector<DatasetProblem> problems = load_problems(sc);
  const int max_tokens = sc.max_tokens(1024);
  Engines engines(sc);
  progress.add_total(int64_t(problems.size() * (sc.variants.size() + 1)));
  for (const auto& [p, dataset] : problems) {
    std::vector<const Variant*> runs = {nullptr};
    for (const Variant& v : sc.variants) runs.push_back(&v);
    std::erase_if(runs, [&](const Variant* v) {
      const bool done = sc.log.done(sc.record("reasoning", p.id, v).key());
      if (done) progress.skip(1);
      return done;
    });
    if (runs.empty()) continue;
    const std::vector<int32_t> prompt = sc.chat_prompt(p.question);
    SharedPrompt shared(engines, prompt);
    for (const Variant* v : runs) {
      progress.advance(0, p.id + " " + (v ? v->label() : std::string("dense")));
      const Generation g = shared.generate(sc, v, max_tokens);
      const auto ans = extract_answer(g.text);
      Record r = sc.record("reasoning", p.id, v);
      r.num["prompt_tokens"] = double(prompt.size());
      r.num["tokens"] = double(g.tokens.size());
      r.num["steps"] = p.steps;
      r.num["has_answer"] = ans.has_value();
      r.num["correct"] = ans && answers_equal(*ans, p.answer);
      r.num["seconds"] = g.seconds;  // the last prompt token and the answer
      r.num["shared_prefill_seconds"] = shared.prefill_seconds();
      r.str["dataset"] = dataset;
      r.str["answer"] = ans.value_or("");
      r.str["expected"] = p.answer;
      r.str["finish"] = g.finish;
      r.str["text"] = g.text;  // to see why a policy's answer differs from dense's
      sc.log.append(r);
      progress.advance(1);
    }
  }
}

}  // namespace multipole::eval
