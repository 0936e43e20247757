// fidelity: teacher-forced texts in lockstep. After a dense prefill of a short prefix, one
// dense model state and one per candidate are fed the same next text token; at every
// position each candidate's next-token distribution is compared with dense's (KL, top-1)
// and each layer's attention output with the exact one on the candidate's own state
// (ComparingPolicy). Prefill is dense for everyone, so differences start at the prefix end.
// With --dense-history each candidate's K/V rows are overwritten by dense's after every
// position, so each position measures one step over dense's history instead of the drift.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <span>
#include <sstream>

#include "eval/suite.hpp"
#include "multipole/core/error.hpp"
#include "multipole/eval/comparing_policy.hpp"
#include "multipole/eval/metrics.hpp"

namespace multipole::eval {

namespace {

namespace fs = std::filesystem;

struct Text {
  std::string id;
  std::vector<int32_t> tokens;
  std::string fingerprint;  // tokens_fingerprint(tokens), once they are known
};

// FNV-1a over the token ids: tells a resumed run, and whoever compares two runs, whether a
// case saw the same tokens (a text file edited between runs changes every curve after the edit).
std::string tokens_fingerprint(std::span<const int32_t> tokens) {
  uint64_t h = 14695981039346656037ull;
  for (const int32_t t : tokens)
    for (int b = 0; b < 4; ++b) {
      h ^= (uint32_t(t) >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  return fmt::format("{:016x}", h);
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MP_CHECK(f, "eval: --texts {}: cannot open", path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// One model state fed token by token: its own cache and policy.
struct Stream {
  std::unique_ptr<PagedKVCache> cache;
  std::unique_ptr<AttentionPolicy> policy;
  ComparingPolicy* comparing = nullptr;  // null for the dense reference
  SeqId seq = 0;
  std::vector<float> logits;
  // Accumulated over positions.
  int64_t positions = 0, agree = 0;
  double kl_sum = 0, kl_max = 0, err_sum = 0, err_max = 0;
  std::vector<double> bin_count, bin_kl, bin_top1, bin_err, layer_err;
};

void add_to_bin(std::vector<double>& v, size_t bin, double x) {
  if (v.size() <= bin) v.resize(bin + 1, 0.0);
  v[bin] += x;
}

}  // namespace

void run_fidelity(SuiteContext& sc, Progress& progress) {
  const EvalOptions& o = sc.opt;
  MP_CHECK(o.prefix >= 1, "eval: --prefix {} must be >= 1", o.prefix);
  MP_CHECK(o.bin_tokens >= 1, "eval: --bin-tokens {} must be >= 1", o.bin_tokens);
  const int layers = sc.model.config().num_layers;
  const int64_t vocab = sc.model.config().vocab_size;

  auto pending = [&](const std::string& id) {
    std::vector<const Variant*> out;
    for (const Variant& v : sc.variants)
      if (!sc.log.done(sc.record("fidelity", id, &v).key())) out.push_back(&v);
    return out;
  };

  // The texts: files, default documents, the model's own chains of thought.
  std::vector<Text> texts;
  std::vector<std::string> files = o.texts;
  if (files.empty()) {
    const std::string docs = o.docs_dir.empty() ? find_shared("docs") : o.docs_dir;
    if (!docs.empty()) {
      std::vector<std::string> found;
      for (const auto& e : fs::directory_iterator(docs))
        if (e.path().extension() == ".md") found.push_back(e.path().string());
      std::sort(found.begin(), found.end());
      files = found;
    } else {
      std::fprintf(stderr, "note: no default documents found (../shared/docs); pass --texts FILE...\n");
    }
  }
  for (const std::string& f : files) {
    const std::string id = (o.texts.empty() ? "doc:" : "file:") + fs::path(f).stem().string();
    // The case id is the file's stem: two files of one stem would share results.
    for (size_t i = 0; i < texts.size(); ++i)
      MP_CHECK(texts[i].id != id, "eval: --texts {} and {} have the same name '{}' (the case id): rename one", files[i],
               f, id);
    texts.push_back({id, {}, {}});
  }
  const int cot = o.cot_texts >= 0 ? o.cot_texts : (o.texts.empty() ? 1 : 0);
  const ArithmeticSpec spec{.steps = o.steps, .difficulty = o.difficulty, .distractors = o.distractors, .seed = o.seed};
  std::vector<Problem> cot_problems;
  for (int i = 0; i < cot; ++i) {
    cot_problems.push_back(make_arithmetic_problem(spec, i));
    texts.push_back({"cot:" + cot_problems.back().id, {}, {}});
  }
  if (o.limit > 0 && int64_t(texts.size()) > o.limit) texts.resize(size_t(o.limit));
  MP_CHECK(!texts.empty(), "eval: fidelity has no texts (--texts, --cot-texts)");

  // Tokens of the texts that still have work (the chains of thought are generated now).
  std::unique_ptr<Engine> generator;
  for (size_t i = 0; i < texts.size(); ++i) {
    Text& t = texts[i];
    if (pending(t.id).empty()) continue;
    if (i < files.size()) {
      t.tokens = sc.tok.encode(slurp(files[i]), {.add_special = true, .parse_special = false});
    } else {
      const Problem& p = cot_problems[i - files.size()];
      if (!generator) generator = std::make_unique<Engine>(sc.model, sc.engine_options(nullptr), sc.pool);
      progress.advance(0, "generating the dense chain of thought for " + p.id);
      t.tokens = sc.chat_prompt(p.question);
      const int room = int(std::min<int64_t>(sc.context - int64_t(t.tokens.size()), 1 << 30));
      const Generation g = generate_greedy(sc, *generator, t.tokens, sc.max_tokens(room));
      t.tokens.insert(t.tokens.end(), g.tokens.begin(), g.tokens.end());
    }
    if (int64_t(t.tokens.size()) > sc.context) t.tokens.resize(size_t(sc.context));
    // Results already in the file for this text must come from the same tokens.
    t.fingerprint = tokens_fingerprint(t.tokens);
    for (const Record& r : sc.log.records()) {
      if (r.suite != "fidelity" || r.case_id != t.id) continue;
      const auto it = r.str.find("tokens_fingerprint");
      MP_CHECK(it == r.str.end() || it->second == t.fingerprint,
               "eval: {}: case {} was recorded from other tokens (fingerprint {}, now {}: the text changed); use "
               "another --out or --overwrite",
               sc.log.path(), t.id, it->second, t.fingerprint);
    }
  }
  generator.reset();
  for (const Text& t : texts) {
    const auto todo = pending(t.id);
    const int64_t steps = std::max<int64_t>(0, int64_t(t.tokens.size()) - o.prefix);
    if (!todo.empty()) progress.add_total(steps);
  }

  for (const Text& t : texts) {
    const auto todo = pending(t.id);
    if (todo.empty()) continue;
    const int64_t n = int64_t(t.tokens.size());
    if (n <= o.prefix + 1) {
      std::fprintf(stderr, "note: %s has %lld tokens, not more than --prefix %d + 1: skipped\n", t.id.c_str(),
                   (long long)n, o.prefix);
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    // Stream 0 is dense; then one per pending variant. The prefix but its last token is
    // prefilled once, into stream 0; the others copy that K/V. Then each stream prefills the
    // last prefix token itself, so its policy indexes the whole prefix as after a prefill of
    // its own: one long prefill per text instead of one per stream.
    const std::span<const int32_t> prefix = std::span(t.tokens).first(size_t(o.prefix));
    std::vector<Stream> streams(todo.size() + 1);
    for (size_t s = 0; s < streams.size(); ++s) {
      Stream& st = streams[s];
      st.cache = std::make_unique<PagedKVCache>(sc.model.kv_cache_config(n));
      if (s == 0) {
        st.policy = make_attention_policy("dense", sc.attention_config(nullptr));
      } else {
        auto cmp = std::make_unique<ComparingPolicy>(
            make_attention_policy(todo[s - 1]->policy, sc.attention_config(todo[s - 1]), sc.opt.device), layers);
        st.comparing = cmp.get();
        st.policy = std::move(cmp);
      }
      // (A long prefix takes minutes before the first position: say which phase runs.)
      if (s == 0) {
        st.seq = st.cache->add_sequence();
        progress.advance(0, fmt::format("{} dense prefill of {} tokens", t.id, prefix.size()));
        if (prefix.size() > 1) {
          // Chunk by chunk, so that a long prefix's line moves (its elapsed time with it).
          sc.model.set_prefill_progress([&](int64_t done, int64_t total) {
            progress.advance(0, fmt::format("{} dense prefill {}/{} tokens", t.id, done, total));
          });
          struct Clear {  // (also on an exception: the callback captures this frame)
            Model& m;
            ~Clear() { m.set_prefill_progress({}); }
          } clear{sc.model};
          sc.model.prefill(*st.cache, st.seq, prefix.first(prefix.size() - 1), *st.policy, sc.pool, nullptr);
        }
      } else {
        progress.advance(0, fmt::format("{} {} indexes the prefix", t.id, todo[s - 1]->label()));
        st.seq = st.cache->add_copy(*streams[0].cache, streams[0].seq, int64_t(prefix.size()) - 1);
      }
      st.logits.resize(size_t(vocab));
      st.layer_err.assign(size_t(layers), 0.0);
      sc.model.prefill(*st.cache, st.seq, prefix.last(1), *st.policy, sc.pool, st.logits.data());
    }
    for (int64_t pos = o.prefix; pos < n; ++pos) {
      const int32_t token = t.tokens[size_t(pos)];
      for (Stream& st : streams) {
        const SeqId seqs[1] = {st.seq};
        const int32_t toks[1] = {token};
        sc.model.decode(*st.cache, seqs, toks, *st.policy, sc.pool, st.logits.data());
      }
      // The logits now predict position pos + 1 from a query at position pos.
      const size_t bin = size_t(pos / o.bin_tokens);
      const int32_t dense_top = argmax(streams[0].logits);
      for (size_t s = 1; s < streams.size(); ++s) {
        Stream& st = streams[s];
        const double kl = kl_divergence(streams[0].logits, st.logits);
        const bool agree = argmax(st.logits) == dense_top;
        double err = 0;
        for (int l = 0; l < layers; ++l) {
          const double e = st.comparing->last_errors()[size_t(l)];
          st.layer_err[size_t(l)] += e;
          err += e;
          st.err_max = std::max(st.err_max, e);
        }
        err /= layers;
        ++st.positions;
        st.agree += agree;
        st.kl_sum += kl;
        st.kl_max = std::max(st.kl_max, kl);
        st.err_sum += err;
        add_to_bin(st.bin_count, bin, 1);
        add_to_bin(st.bin_kl, bin, kl);
        add_to_bin(st.bin_top1, bin, agree);
        add_to_bin(st.bin_err, bin, err);
      }
      // Each policy's next step then starts from dense's history: its K/V rows at pos become dense's.
      if (o.dense_history)
        for (size_t s = 1; s < streams.size(); ++s)
          streams[s].cache->copy_positions(*streams[0].cache, streams[0].seq, streams[s].seq, pos, 1);
      progress.advance(1, fmt::format("{} position {}/{}", t.id, pos + 1, n));
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (size_t s = 1; s < streams.size(); ++s) {
      const Stream& st = streams[s];
      Record r = sc.record("fidelity", t.id, todo[s - 1]);
      const double np = double(std::max<int64_t>(1, st.positions));
      r.num["text_tokens"] = double(n);
      r.str["tokens_fingerprint"] = t.fingerprint;
      r.num["prefix"] = o.prefix;
      r.str["history"] = o.dense_history ? "dense" : "own";
      r.num["positions"] = double(st.positions);
      r.num["kl_mean"] = st.kl_sum / np;
      r.num["kl_max"] = st.kl_max;
      r.num["top1"] = double(st.agree) / np;
      r.num["err_mean"] = st.err_sum / np;
      r.num["err_max"] = st.err_max;
      r.num["bin_tokens"] = o.bin_tokens;
      r.num["seconds"] = seconds;  // of the whole lockstep run of this text
      r.series["bin_count"] = st.bin_count;
      r.series["bin_kl"] = st.bin_kl;
      r.series["bin_top1"] = st.bin_top1;
      r.series["bin_err"] = st.bin_err;
      r.series["layer_err"] = st.layer_err;
      sc.log.append(r);
    }
  }
}

}  // namespace multipole::eval
