// The model layer: configs from both formats, the forward of each family against a naive
// float64 forward of the same random weights (prefill and decode, chunked, threaded, GGUF
// with llama.cpp's Q/K permutation), stored types, every attention policy with a budget
// covering everything against dense, a chunked prompt indexed once after its last chunk, and
// bad input.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "attention/multipole_policy.hpp"
#include "model/tiny_model.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "multipole/model/model.hpp"

namespace multipole {
namespace {

namespace fs = std::filesystem;

struct RunOptions {
  std::string policy = "dense";
  AttentionConfig knobs;
  DType kv = DType::F32;
  int chunk = 256;
  int threads = 1;
};
RunOptions opts(std::string policy, const AttentionConfig& knobs, DType kv = DType::F32, int chunk = 256, int threads = 1) {
  RunOptions o;
  o.policy = std::move(policy), o.knobs = knobs, o.kv = kv, o.chunk = chunk, o.threads = threads;
  return o;
}

// Logits of every position: prefill of the first `prefill` tokens (all rows), then one
// decode step per remaining token.
std::vector<std::vector<float>> run_model(Model& m, const std::vector<int32_t>& tokens, size_t prefill,
                                          const RunOptions& o = {}) {
  ThreadPool pool(o.threads);
  AttentionConfig ac = o.knobs;
  const AttentionConfig shape = m.attention_config();
  ac.num_q_heads = shape.num_q_heads, ac.num_kv_heads = shape.num_kv_heads, ac.head_dim = shape.head_dim;
  ac.rope = shape.rope;
  auto policy = make_attention_policy(o.policy, ac);
  PagedKVCache cache(m.kv_cache_config(1024, o.kv, 16));
  m.set_prefill_chunk(o.chunk);
  const SeqId seq = cache.add_sequence();
  const int64_t V = m.config().vocab_size;
  std::vector<float> all(prefill * size_t(V));
  std::vector<float> last(static_cast<size_t>(V));
  m.prefill(cache, seq, std::span(tokens).first(prefill), *policy, pool, last.data(), all.data());
  std::vector<std::vector<float>> out;
  for (size_t t = 0; t < prefill; ++t) out.emplace_back(all.begin() + t * V, all.begin() + (t + 1) * V);
  EXPECT_EQ(last, out.back());
  for (size_t t = prefill; t < tokens.size(); ++t) {
    const SeqId seqs[1] = {seq};
    m.decode(cache, seqs, std::span(tokens).subspan(t, 1), *policy, pool, last.data());
    out.push_back(last);
  }
  return out;
}

// max |ours - ref| over all positions and tokens.
template <class Ref>
double max_diff(const std::vector<std::vector<float>>& ours, const Ref& ref) {
  EXPECT_EQ(ours.size(), ref.size());
  double d = 0;
  for (size_t t = 0; t < std::min(ours.size(), ref.size()); ++t)
    for (size_t v = 0; v < ours[t].size(); ++v) d = std::max(d, std::abs(double(ours[t][v]) - double(ref[t][v])));
  return d;
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint64_t(vocab));
  return t;
}

bool small() {
  const char* s = std::getenv("MULTIPOLE_TEST_SCALE");
  return s && std::string(s) == "small";
}

class FamilyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FamilyTest, ForwardMatchesNaiveFloat64InBothFormats) {
  const tiny::Config c = tiny::family_config(GetParam());
  const tiny::Weights w = tiny::random_weights(c, 7);
  const auto tokens = random_tokens(small() ? 12 : 23, c.vocab, 3);
  const auto ref = tiny::reference_logits(w, tokens);
  const std::string dir = tiny::temp_dir("fwd-" + c.family);
  tiny::write_safetensors(w, dir + "/hf");
  tiny::gguf_builder(w).write(dir + "/m.gguf");

  auto st = Model::load(dir + "/hf");
  EXPECT_EQ(st->format(), "safetensors");
  EXPECT_EQ(model_family_name(st->config().family), c.family);
  auto gg = Model::load(dir + "/m.gguf");
  EXPECT_EQ(gg->format(), "gguf");
  for (Model* m : {st.get(), gg.get()}) {
    SCOPED_TRACE(std::string(m->format()));
    // Prefill all, then half prefill / half decode, then chunked and threaded.
    EXPECT_LT(max_diff(run_model(*m, tokens, tokens.size()), ref), 2e-4);
    EXPECT_LT(max_diff(run_model(*m, tokens, tokens.size() / 2), ref), 2e-4);
    EXPECT_LT(max_diff(run_model(*m, tokens, tokens.size() - 3, opts("dense", {}, DType::F32, 4, 2)), ref), 2e-4);
  }
  fs::remove_all(dir);
}

TEST(ModelForward, ShardedSafetensorsCheckpoint) {
  // The single-file checkpoint re-cut into two shards + model.safetensors.index.json.
  const tiny::Config c = tiny::family_config("qwen3");
  const tiny::Weights w = tiny::random_weights(c, 17);
  const std::string dir = tiny::temp_dir("shards");
  tiny::write_safetensors(w, dir + "/one");
  SafetensorsFile one(dir + "/one/model.safetensors");
  SafetensorsWriter a, b;
  std::string map;
  size_t i = 0;
  for (const SafetensorsTensor& t : one.tensors()) {
    const bool first = i++ % 2 == 0;
    (first ? a : b).add_raw(t.name, t.dtype, t.shape, t.bytes);
    map += (map.empty() ? "" : ",") + std::string("\"") + t.name + "\": \"" +
           (first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors") + "\"";
  }
  fs::create_directories(dir + "/two");
  a.write(dir + "/two/model-00001-of-00002.safetensors");
  b.write(dir + "/two/model-00002-of-00002.safetensors");
  std::ofstream(dir + "/two/model.safetensors.index.json") << "{\"metadata\": {}, \"weight_map\": {" << map << "}}";
  fs::copy_file(dir + "/one/config.json", dir + "/two/config.json");
  auto m = Model::load(dir + "/two");
  const auto tokens = random_tokens(9, c.vocab, 4);
  EXPECT_LT(max_diff(run_model(*m, tokens, 5), tiny::reference_logits(w, tokens)), 2e-4);
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyTest, ::testing::Values("llama", "qwen2", "qwen3"));

TEST(ModelForward, GGUFLlamaQKPermutationIsUndone) {
  // The same GGUF read by a forward that skipped the un-permutation would rotate the wrong
  // channel pairs: check the reference itself tells them apart, so the test above can fail.
  tiny::Config c = tiny::family_config("llama");
  tiny::Weights w = tiny::random_weights(c, 11);
  const auto tokens = random_tokens(8, c.vocab, 5);
  const auto ref = tiny::reference_logits(w, tokens);
  tiny::Weights p = w;
  for (auto& L : p.layers) {
    L.wq = tiny::permute_rows(L.wq, c.heads, c.head_dim, c.hidden);
    L.wk = tiny::permute_rows(L.wk, c.kv_heads, c.head_dim, c.hidden);
  }
  const auto wrong = tiny::reference_logits(p, tokens);
  double d = 0;
  for (size_t t = 0; t < ref.size(); ++t)
    for (size_t v = 0; v < ref[t].size(); ++v) d = std::max(d, std::abs(ref[t][v] - wrong[t][v]));
  EXPECT_GT(d, 1e-2);
  // Position 0 has no rotation: there the permutation cancels in q.k.
  double d0 = 0;
  for (size_t v = 0; v < ref[0].size(); ++v) d0 = std::max(d0, std::abs(ref[0][v] - wrong[0][v]));
  EXPECT_LT(d0, 1e-9);
}

TEST(ModelForward, StoredTypesBF16F16Q8_0) {
  const tiny::Config c = tiny::family_config("qwen2");
  const tiny::Weights w = tiny::random_weights(c, 21);
  const auto tokens = random_tokens(14, c.vocab, 9);
  const std::string dir = tiny::temp_dir("types");
  struct Case {
    const char* name;
    double tol;
  };
  // bf16 / f16 weights are exact in the reference (it uses the rounded values); the f16 KV
  // cache rounds K and V. Q8_0 matrices multiply int8-quantised activations (as llama.cpp).
  {
    tiny::Weights r = w;
    tiny::round_through(r, DType::BF16);
    tiny::write_safetensors(w, dir + "/bf16", DType::BF16);
    auto m = Model::load(dir + "/bf16");
    EXPECT_LT(max_diff(run_model(*m, tokens, 8), tiny::reference_logits(r, tokens)), 2e-4);
    EXPECT_LT(max_diff(run_model(*m, tokens, 8, opts("dense", {}, DType::F16)), tiny::reference_logits(r, tokens)), 2e-2);
  }
  {
    tiny::Weights r = w;
    tiny::round_through(r, DType::F16);
    tiny::gguf_builder(w, 1).write(dir + "/f16.gguf");
    auto m = Model::load(dir + "/f16.gguf");
    EXPECT_LT(max_diff(run_model(*m, tokens, 8), tiny::reference_logits(r, tokens)), 2e-4);
  }
  {
    tiny::Weights r = w;
    tiny::round_through_q8_0(r);
    tiny::gguf_builder(w, 8).write(dir + "/q8.gguf");
    auto m = Model::load(dir + "/q8.gguf");
    const auto ref = tiny::reference_logits(r, tokens);
    const double d = max_diff(run_model(*m, tokens, 8), ref);
    EXPECT_LT(d, 0.08) << "Q8_0 x int8 activations";
    EXPECT_GT(d, 0.0);
  }
  fs::remove_all(dir);
}

TEST(AttentionPolicies, FullBudgetReproducesDenseLogits) {
  const tiny::Config c = tiny::family_config("llama");
  const tiny::Weights w = tiny::random_weights(c, 31);
  const int n = small() ? 70 : 110;
  const auto tokens = random_tokens(n, c.vocab, 13);
  const std::string dir = tiny::temp_dir("policies");
  tiny::gguf_builder(w).write(dir + "/m.gguf");
  auto m = Model::load(dir + "/m.gguf");
  AttentionConfig knobs;
  knobs.cluster.sinks = 2;
  knobs.cluster.window = 8;
  knobs.cluster.block_size = 32;
  knobs.cluster.tokens_per_centroid = {4};
  knobs.quest_page_size = 4;
  knobs.budget = 4096;
  knobs.coarse_budget = 4096;
  const size_t prefill = 30;
  const auto dense = run_model(*m, tokens, prefill, opts("dense", knobs));
  EXPECT_LT(max_diff(dense, tiny::reference_logits(w, tokens)), 2e-4);
  for (const char* p : {"multipole", "squeezed", "quest", "oracle-topk"}) {
    SCOPED_TRACE(p);
    EXPECT_LT(max_diff(run_model(*m, tokens, prefill, opts(p, knobs)), dense), 1e-4);
  }
  // With a small budget the sparse policies do differ (the comparison above can fail).
  knobs.budget = 4;
  knobs.coarse_budget = 8;
  EXPECT_GT(max_diff(run_model(*m, tokens, prefill, opts("squeezed", knobs)), dense), 1e-3);
  fs::remove_all(dir);
}

// A prompt prefilled in chunks is indexed once, after its last chunk: each layer's index is
// the one prefill clustering builds over the whole prompt, not the first chunk's grown by
// online updates (which never move a token once placed).
TEST(AttentionPolicies, ChunkedPrefillIndexesThePromptOnce) {
  const tiny::Config c = tiny::family_config("llama");
  const tiny::Weights w = tiny::random_weights(c, 41);
  const auto tokens = random_tokens(small() ? 80 : 120, c.vocab, 17);
  const std::string dir = tiny::temp_dir("chunked-index");
  tiny::gguf_builder(w).write(dir + "/m.gguf");
  auto m = Model::load(dir + "/m.gguf");
  AttentionConfig ac = m->attention_config();
  ac.cluster.sinks = 2;
  ac.cluster.window = 8;
  ac.cluster.block_size = 32;
  ac.cluster.tokens_per_centroid = {4, 16};
  ac.budget = 8;
  ThreadPool pool(2);
  PagedKVCache cache(m->kv_cache_config(256, DType::F32, 16));
  const SeqId seq = cache.add_sequence();
  MultipolePolicy chunked(ac);
  m->set_prefill_chunk(16);
  std::vector<float> logits(size_t(m->config().vocab_size));
  m->prefill(cache, seq, tokens, chunked, pool, logits.data());
  MultipolePolicy whole(ac);
  const SeqId seqs[1] = {seq};
  for (int l = 0; l < m->config().num_layers; ++l) {
    whole.update(cache, l, seqs, pool);
    for (int h = 0; h < ac.num_kv_heads; ++h) {
      SCOPED_TRACE(fmt::format("layer {} head {}", l, h));
      const ClusterIndex* got = chunked.index(seq, l, h);
      const ClusterIndex* want = whole.index(seq, l, h);
      ASSERT_NE(got, nullptr);
      ASSERT_NE(want, nullptr);
      EXPECT_EQ(got->end(), ac.clustered_end(int64_t(tokens.size())));
      EXPECT_EQ(got->blocks().size(), want->blocks().size());
      EXPECT_TRUE(std::ranges::equal(got->labels(), want->labels()));
      for (int lv = 0; lv < want->num_levels(); ++lv) {
        EXPECT_EQ(got->level(lv).keys, want->level(lv).keys);
        EXPECT_EQ(got->level(lv).sizes, want->level(lv).sizes);
      }
    }
  }
  fs::remove_all(dir);
}

// ------------------------------------------------------------------------------- configs

// A prefill reports each chunk (tokens done, total), and the report changes nothing it computes.
TEST(ModelForward, PrefillReportsEachChunk) {
  const tiny::Config c = tiny::family_config("llama");
  const tiny::Weights w = tiny::random_weights(c, 43);
  const auto tokens = random_tokens(50, c.vocab, 19);
  const std::string dir = tiny::temp_dir("prefill-progress");
  tiny::gguf_builder(w).write(dir + "/m.gguf");
  auto m = Model::load(dir + "/m.gguf");
  ThreadPool pool(1);
  auto dense = make_attention_policy("dense", m->attention_config());
  m->set_prefill_chunk(16);
  const auto run = [&] {
    PagedKVCache cache(m->kv_cache_config(64, DType::F32, 16));
    std::vector<float> logits(size_t(m->config().vocab_size));
    m->prefill(cache, cache.add_sequence(), tokens, *dense, pool, logits.data());
    return logits;
  };
  const std::vector<float> quiet = run();
  std::vector<std::pair<int64_t, int64_t>> calls;
  m->set_prefill_progress([&](int64_t done, int64_t total) { calls.emplace_back(done, total); });
  EXPECT_EQ(run(), quiet);
  EXPECT_EQ(calls, (std::vector<std::pair<int64_t, int64_t>>{{16, 50}, {32, 50}, {48, 50}, {50, 50}}));
  m->set_prefill_progress({});
  calls.clear();
  run();
  EXPECT_TRUE(calls.empty());
  fs::remove_all(dir);
}

TEST(ModelConfig, FromHFJson) {
  for (const char* f : {"llama", "qwen2", "qwen3"}) {
    const tiny::Config c = tiny::family_config(f);
    ModelConfig m = model_config_from_hf_json(tiny::config_json(c), "config.json");
    EXPECT_EQ(m.architecture, f);
    EXPECT_EQ(m.hidden_size, c.hidden);
    EXPECT_EQ(m.intermediate_size, c.inter);
    EXPECT_EQ(m.num_layers, c.layers);
    EXPECT_EQ(m.num_heads, c.heads);
    EXPECT_EQ(m.num_kv_heads, c.kv_heads);
    EXPECT_EQ(m.head_dim, c.head_dim);
    EXPECT_EQ(m.vocab_size, c.vocab);
    EXPECT_EQ(m.context_length, c.context);
    EXPECT_EQ(m.tied_embeddings, c.tied);
    EXPECT_EQ(m.qkv_bias, c.bias);
    EXPECT_EQ(m.qk_norm, c.qk_norm);
    EXPECT_DOUBLE_EQ(m.rope.theta, c.theta);
    EXPECT_EQ(m.bos_id, c.bos);
    EXPECT_EQ(m.eos_ids, std::vector<int32_t>{c.eos});
  }
  // Llama 3.1 style: rope_scaling llama3, eos list, no head_dim (hidden / heads).
  ModelConfig l = model_config_from_hf_json(R"({"model_type":"llama","hidden_size":256,"intermediate_size":512,
      "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"vocab_size":1000,
      "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
      "original_max_position_embeddings":8192,"rope_type":"llama3"},"max_position_embeddings":131072,
      "eos_token_id":[7,9,11],"bos_token_id":3})",
                                            "l31");
  EXPECT_EQ(l.head_dim, 64);
  EXPECT_EQ(l.rope.scaling, RopeConfig::Scaling::Llama3);
  EXPECT_DOUBLE_EQ(l.rope.factor, 8.0);
  EXPECT_EQ(l.eos_ids, (std::vector<int32_t>{7, 9, 11}));
  // transformers 5 rope_parameters; Qwen2 yarn.
  ModelConfig q = model_config_from_hf_json(R"({"model_type":"qwen3","hidden_size":64,"intermediate_size":96,
      "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"vocab_size":50,
      "rope_parameters":{"rope_type":"yarn","rope_theta":1000000,"factor":4.0,"original_max_position_embeddings":32768}})",
                                            "q3");
  EXPECT_EQ(q.rope.scaling, RopeConfig::Scaling::Yarn);
  EXPECT_DOUBLE_EQ(q.rope.theta, 1e6);
  EXPECT_TRUE(q.tied_embeddings);  // Qwen3's default
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, BadHFJson) {
  auto hf = [](const std::string& s) { return [s] { model_config_from_hf_json(s, "cfg.json"); }; };
  std::string base = tiny::config_json(tiny::family_config("llama"));
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = base;
    size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return s.replace(at, from.size(), to);
  };
  expect_error(hf("{"), "not valid JSON");
  expect_error(hf(with("\"llama\"", "\"bert\"")), "unknown model_type 'bert'");
  expect_error(hf(with("\"hidden_size\": 64,", "")), "missing field 'hidden_size'");
  expect_error(hf(with("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3")), "not a multiple");
  expect_error(hf(with("\"num_hidden_layers\": 2", "\"num_hidden_layers\": \"2\"")), "'num_hidden_layers' must be");
  expect_error(hf(with("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2}")),
               "unsupported rope_type 'dynamic'");
  expect_error(hf(with("\"silu\"", "\"gelu\"")), "hidden_act 'gelu'");
  expect_error(hf(with("\"eos_token_id\": 2", "\"eos_token_id\": 500")), "eos id 500");
  // Ids beyond int32 are errors, not wrapped into a plausible id (2^32 + 3 -> 3).
  expect_error(hf(with("\"bos_token_id\": 1", "\"bos_token_id\": 4294967299")),
               "'bos_token_id' = 4294967299 is not a valid token id");
  expect_error(hf(with("\"bos_token_id\": 1", "\"bos_token_id\": 18446744073709551615")), "is not a valid token id");
  // An eos id past int64 is dropped like any other out-of-range one, not wrapped to -2.
  EXPECT_TRUE(model_config_from_hf_json(with("\"eos_token_id\": 2", "\"eos_token_id\": [18446744073709551614, 5]"),
                                        "cfg.json")
                  .eos_ids == std::vector<int32_t>{5});
}

// ----------------------------------------------------------------------------- bad files

TEST(ModelLoad, BadFilesFailWithAMessage) {
  const tiny::Config c = tiny::family_config("qwen2");
  const tiny::Weights w = tiny::random_weights(c, 41);
  const std::string dir = tiny::temp_dir("bad");
  expect_error([&] { Model::load(dir + "/nothing-here"); }, "no such file");
  expect_error([&] { Model::load(dir); }, "no config.json");

  // GGUF: unknown architecture, truncated, missing tensor, wrong shape.
  {
    tiny::Weights x = w;
    x.c.family = "falcon";
    tiny::gguf_builder(x).write(dir + "/falcon.gguf");
    expect_error([&] { Model::load(dir + "/falcon.gguf"); }, "unknown architecture 'falcon'");
  }
  auto bytes = tiny::gguf_builder(w).bytes();
  {
    std::ofstream(dir + "/trunc.gguf", std::ios::binary).write((const char*)bytes.data(), std::streamsize(bytes.size() / 2));
    EXPECT_THROW(Model::load(dir + "/trunc.gguf"), Error);
    std::ofstream(dir + "/head.gguf", std::ios::binary).write((const char*)bytes.data(), 40);
    EXPECT_THROW(Model::load(dir + "/head.gguf"), Error);
  }
  {
    // Qwen2 always has q/k/v biases: a file without them fails naming the first one.
    tiny::Weights x = w;
    x.c.bias = false;
    tiny::gguf_builder(x).write(dir + "/nobias.gguf");
    expect_error([&] { Model::load(dir + "/nobias.gguf"); }, "missing tensor 'blk.0.attn_q.bias'");
  }
  fs::remove_all(dir);
}

TEST(ModelLoad, WrongShapesAndDtypesNameTheTensor) {
  const tiny::Config c = tiny::family_config("llama");
  const tiny::Weights w = tiny::random_weights(c, 43);
  const std::string dir = tiny::temp_dir("shapes");
  // config.json says intermediate 128, the tensors hold 96.
  tiny::write_safetensors(w, dir + "/a");
  {
    tiny::Config cc = c;
    cc.inter = 128;
    std::ofstream(dir + "/a/config.json") << tiny::config_json(cc);
  }
  expect_error([&] { Model::load(dir + "/a"); }, "'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], expected [128, 64]");
  // An integer tensor where a matrix belongs.
  {
    SafetensorsWriter sw;
    std::vector<std::byte> raw(size_t(c.vocab) * c.hidden * 4);
    sw.add_raw("model.embed_tokens.weight", SafetensorsDType::I32, {c.vocab, c.hidden}, raw);
    fs::create_directories(dir + "/b");
    sw.write(dir + "/b/model.safetensors");
    std::ofstream(dir + "/b/config.json") << tiny::config_json(c);
    expect_error([&] { Model::load(dir + "/b"); }, "has dtype I32");
  }
  // Missing lm_head when not tied.
  {
    tiny::Weights x = w;
    x.c.tied = true;  // written without lm_head...
    tiny::write_safetensors(x, dir + "/c");
    std::ofstream(dir + "/c/config.json") << tiny::config_json(c);  // ...but config says untied
    expect_error([&] { Model::load(dir + "/c"); }, "missing tensor 'lm_head.weight'");
  }
  // A truncated safetensors file.
  {
    tiny::write_safetensors(w, dir + "/d");
    const auto size = fs::file_size(dir + "/d/model.safetensors");
    fs::resize_file(dir + "/d/model.safetensors", size - 100);
    EXPECT_THROW(Model::load(dir + "/d"), Error);
  }
  // Unknown architecture in config.json.
  {
    tiny::write_safetensors(w, dir + "/e");
    std::ofstream(dir + "/e/config.json") << R"({"model_type": "gpt2", "n_embd": 64})";
    expect_error([&] { Model::load(dir + "/e"); }, "unknown model_type 'gpt2'");
  }
  fs::remove_all(dir);
}

TEST(ModelLoad, ListsTensorsAndConfigWithoutBinding) {
  const tiny::Config c = tiny::family_config("qwen3");
  const tiny::Weights w = tiny::random_weights(c, 47);
  const std::string dir = tiny::temp_dir("list");
  tiny::gguf_builder(w, 8).write(dir + "/m.gguf");
  auto m = Model::load(dir + "/m.gguf", {.bind_weights = false});
  EXPECT_EQ(m->config().head_dim, 32);
  EXPECT_TRUE(m->config().qk_norm);
  EXPECT_TRUE(m->config().tied_embeddings);
  bool found = false;
  for (const TensorInfo& t : m->tensors())
    if (t.name == "blk.1.attn_q.weight") {
      found = true;
      EXPECT_EQ(t.dtype, "Q8_0");
      EXPECT_EQ(t.shape, (std::vector<int64_t>{128, 64}));
      EXPECT_EQ(t.bytes, 128 * 2 * 34);
    }
  EXPECT_TRUE(found);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace multipole
