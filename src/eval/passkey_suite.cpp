// passkey: a number stated once in generated filler, asked for at the end; found or not, per
// policy, length and depth. Lengths are the model's tokens (the filler is measured with its
// tokenizer) and are trimmed so that prompt + answer fit the context.
#include <algorithm>
#include <bit>

#include "eval/prng.hpp"
#include "eval/suite.hpp"
#include "multipole/core/error.hpp"

namespace multipole::eval {

void run_passkey(SuiteContext& sc, Progress& progress) {
  const EvalOptions& o = sc.opt;
  const int max_tokens = sc.max_tokens(16);
  MP_CHECK(o.repeats >= 1, "eval: --repeats {} must be >= 1", o.repeats);
  MP_CHECK(!o.depths.empty(), "eval: no --depths given");
  for (double d : o.depths) MP_CHECK(d >= 0 && d <= 1, "eval: --depths: {} must be in [0, 1]", d);
  std::vector<int64_t> lengths = o.lengths;
  if (lengths.empty()) {
    for (int64_t l = 1024; l <= sc.context; l *= 2) lengths.push_back(l);
    if (lengths.empty()) lengths.push_back(sc.context);
  }
  for (int64_t l : lengths)
    MP_CHECK(l >= 16 && l <= sc.context, "eval: --lengths: {} must be in [16, the context {}]", l, sc.context);

  struct Case {
    std::string id;
    int64_t length;
    double depth;
    uint64_t seed;
  };
  std::vector<Case> cases;
  // A case's seed comes from what its id names (length, depth, repeat) and --seed, never
  // from its place in the list: the same id is the same case whatever other lengths or
  // depths a run asks for, which --resume relies on.
  for (int64_t l : lengths)
    for (double d : o.depths)
      for (int r = 0; r < o.repeats; ++r)
        cases.push_back({fmt::format("passkey-L{}-D{:.2f}-{}", l, d, r), l, d,
                         SplitMix64::from({o.seed, uint64_t(l), std::bit_cast<uint64_t>(d), uint64_t(r)}).next()});
  if (o.limit > 0 && int64_t(cases.size()) > o.limit) cases.resize(size_t(o.limit));

  auto count = [&](std::string_view text) { return int64_t(sc.tok.encode(text).size()); };
  Engines engines(sc);
  progress.add_total(int64_t(cases.size() * (sc.variants.size() + 1)));
  for (const Case& c : cases) {
    std::vector<const Variant*> runs = {nullptr};
    for (const Variant& v : sc.variants) runs.push_back(&v);
    std::erase_if(runs, [&](const Variant* v) {
      const bool done = sc.log.done(sc.record("passkey", c.id, v).key());
      if (done) progress.skip(1);
      return done;
    });
    if (runs.empty()) continue;
    // Filler of the case's length, trimmed when prompt + answer would not fit the context.
    int64_t target = c.length;
    PasskeyCase pk;
    std::vector<int32_t> prompt;
    for (int attempt = 0;; ++attempt) {
      target = std::min<int64_t>(target, sc.context - max_tokens - 8);
      MP_CHECK(target >= 16, "eval: passkey length {} leaves no room for the prompt in the context {}", c.length,
               sc.context);
      pk = make_passkey_case(count, target, c.depth, c.seed);
      prompt = sc.chat_prompt(pk.prompt);
      const int64_t over = int64_t(prompt.size()) + max_tokens - sc.context;
      if (over <= 0) break;
      MP_CHECK(attempt < 4, "eval: cannot fit a passkey prompt of length {} in the context {}", c.length, sc.context);
      target -= over + 8;
    }
    SharedPrompt shared(engines, prompt);
    for (const Variant* v : runs) {
      progress.advance(0, c.id + " " + (v ? v->label() : std::string("dense")));
      const Generation g = shared.generate(sc, v, max_tokens);
      Record r = sc.record("passkey", c.id, v);
      r.num["length"] = double(c.length);
      r.num["depth"] = c.depth;
      r.num["prompt_tokens"] = double(prompt.size());
      r.num["found"] = passkey_found(g.text, pk.passkey);
      r.num["seconds"] = g.seconds;  // the last prompt token and the answer
      r.num["shared_prefill_seconds"] = shared.prefill_seconds();
      r.str["passkey"] = pk.passkey;
      r.str["text"] = g.text;
      sc.log.append(r);
      progress.advance(1);
    }
  }
}

}  // namespace multipole::eval
