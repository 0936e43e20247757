#pragma once
// What every suite gets from the runner (eval/runner.cpp): the model with its tokenizer and
// chat template, the variants to compare with dense, the results log and the progress line.
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "multipole/attention/config.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/engine/engine.hpp"
#include "multipole/eval/progress.hpp"
#include "multipole/eval/results_log.hpp"
#include "multipole/eval/runner.hpp"
#include "multipole/eval/tasks.hpp"
#include "multipole/model/model.hpp"
#include "multipole/tokenizer/chat_template.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

namespace multipole::eval {

struct SuiteContext {
  const EvalOptions& opt;
  Model& model;
  const Tokenizer& tok;
  const ChatTemplate& chat;
  ThreadPool& pool;
  ResultsLog& log;
  int64_t context = 0;            // positions per sequence
  std::vector<Variant> variants;  // the candidates; dense is the reference
  std::vector<int32_t> stop_ids;  // end-of-turn and end-of-text tokens

  // The model's attention shape with the variant's knobs (dense when v is null).
  AttentionConfig attention_config(const Variant* v) const;
  EngineOptions engine_options(const Variant* v) const;
  // A user turn in the model's chat template, ready to generate the assistant's answer.
  std::vector<int32_t> chat_prompt(const std::string& user) const;
  // A record of this suite/case/variant with the model named (dense when v is null).
  Record record(const std::string& suite, const std::string& case_id, const Variant* v) const;
  // The options that change results but are not in a record's key ("activations=int8
  // sinks=10 ..."): records of one results file must agree on them.
  std::string settings() const;
  int max_tokens(int suite_default) const { return opt.max_tokens > 0 ? opt.max_tokens : suite_default; }
};

// One engine per variant, and one for dense, built on first use (each holds a KV cache of
// the context's size).
class Engines {
 public:
  explicit Engines(const SuiteContext& sc) : sc_(sc) {}
  Engine& get(const Variant* v);  // null: dense

 private:
  const SuiteContext& sc_;
  std::map<std::string, std::unique_ptr<Engine>> engines_;
};

// A sequence of an engine, freed when this goes out of scope (on errors too).
class ScopedSequence {
 public:
  ScopedSequence(Engine& engine, SeqId seq) : engine_(engine), seq_(seq) {}
  ~ScopedSequence() { engine_.remove_sequence(seq_); }
  ScopedSequence(const ScopedSequence&) = delete;
  ScopedSequence& operator=(const ScopedSequence&) = delete;
  SeqId id() const { return seq_; }

 private:
  Engine& engine_;
  SeqId seq_;
};

struct Generation {
  std::vector<int32_t> tokens;
  std::string text;
  std::string finish;  // eos, length, context
  double seconds = 0;
};
// Greedy decoding of up to max_tokens (fewer when the context is full) from `prompt`.
Generation generate_greedy(const SuiteContext& sc, Engine& engine, std::span<const int32_t> prompt, int max_tokens);
// The same on a sequence of `engine` that already holds a prefix: `tokens` are prefilled
// onto it first. The sequence keeps what it saw.
Generation generate_greedy(const SuiteContext& sc, Engine& engine, SeqId seq, std::span<const int32_t> tokens,
                           int max_tokens);

// A case's prompt but its last token, prefilled once by the dense engine (prefill is dense
// under every policy). Each run continues a copy in its own engine (Engine::add_copy) and
// prefills the last token itself, so its policy indexes the whole prompt as after its own
// prefill: one prompt prefill per case instead of one per policy. Dense continues the shared
// sequence itself (the copies take only its first positions).
class SharedPrompt {
 public:
  SharedPrompt(Engines& engines, std::span<const int32_t> prompt);
  // Greedy generation of run v (null: dense) from the whole prompt.
  Generation generate(const SuiteContext& sc, const Variant* v, int max_tokens);
  double prefill_seconds() const { return seconds_; }

 private:
  Engines& engines_;
  std::span<const int32_t> prompt_;
  Engine& dense_;
  ScopedSequence shared_;
  double seconds_ = 0;
};

// The problems of --datasets (generated arithmetic, AIME 2025), interleaved, at most --limit.
struct DatasetProblem {
  Problem problem;
  std::string dataset;  // "arith", "aime"
};
std::vector<DatasetProblem> load_problems(const SuiteContext& sc);
// A folder or file under the shared assets (../shared next to the source tree or the
// working folder, or $MULTIPOLE_SHARED_DIR); "" when not found.
std::string find_shared(const std::string& relative);

void run_fidelity(SuiteContext& sc, Progress& progress);
void run_agreement(SuiteContext& sc, Progress& progress);
void run_passkey(SuiteContext& sc, Progress& progress);
void run_reasoning(SuiteContext& sc, Progress& progress);

}  // namespace multipole::eval
