// dense, quest and oracle-topk against naive float64 references (reference_dense.hpp).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"
#include "reference_dense.hpp"
#include "test_scale.hpp"
#include "attention/attention_test_config.hpp"

using namespace multipole;
namespace ref = multipole::reference;

// Counts malloc calls while `g_counting` is set, by interposing glibc's malloc (operator new
// is already replaced elsewhere in this binary, and ASan owns malloc).
#if !defined(__SANITIZE_ADDRESS__) && defined(__GLIBC__)
extern "C" void* __libc_malloc(size_t n);
namespace {
std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_mallocs{0};
}  // namespace
extern "C" void* malloc(size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
#define MULTIPOLE_COUNT_MALLOC 1
#endif

namespace {

using multipole::test::attention_config;
using multipole::test::small_scale;

std::vector<int64_t> batch_lengths() {
  return small_scale() ? std::vector<int64_t>{1, 97, 2049} : std::vector<int64_t>{1, 97, 2049, 8203};
}


// A batch of sequences written to layer 1 of a 2-layer cache in interleaved pieces (so
// page tables are fragmented), with random keys and values.
struct Batch {
  std::unique_ptr<PagedKVCache> cache;
  std::vector<SeqId> seqs;
  std::mt19937 rng;

  Batch(const AttentionConfig& c, DType dtype, const std::vector<int64_t>& lengths, uint32_t seed) : rng(seed) {
    int64_t total = 0;
    for (auto l : lengths) total += l + 16;
    cache = std::make_unique<PagedKVCache>(KVCacheConfig{.num_layers = 2, .num_kv_heads = c.num_kv_heads,
                                                         .head_dim = c.head_dim, .page_size = 16, .dtype = dtype,
                                                         .max_tokens = total + 4096});
    for (size_t i = 0; i < lengths.size(); ++i) seqs.push_back(cache->add_sequence());
    std::vector<int64_t> done(lengths.size(), 0);
    for (bool more = true; more;) {
      more = false;
      for (size_t i = 0; i < lengths.size(); ++i) {
        const int64_t n = std::min<int64_t>(lengths[i] - done[i], 37 + int64_t(i) * 50);
        if (n <= 0) continue;
        append(seqs[i], n);
        done[i] += n;
        more = true;
      }
    }
  }
  // Appends n random tokens to layer 1 of seq.
  void append(SeqId seq, int64_t n) {
    const auto& kc = cache->config();
    std::normal_distribution<float> dist;
    std::vector<float> k(size_t(n) * kc.num_kv_heads * kc.head_dim), v(k.size());
    for (auto& x : k) x = dist(rng);
    for (auto& x : v) x = dist(rng);
    const int64_t pos = cache->extend(seq, n);
    cache->write(seq, 1, pos, n, k.data(), v.data());
  }
  std::vector<float> queries(const AttentionConfig& c, float magnitude) {
    std::normal_distribution<float> dist(0.0f, magnitude);
    std::vector<float> q(seqs.size() * c.num_q_heads * c.head_dim);
    for (auto& x : q) x = dist(rng);
    return q;
  }
};

// ||out - ref|| / ||ref|| over one group's [G, d] slice.
double rel_err(const float* out, const std::vector<double>& r) {
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (out[i] - r[i]) * (out[i] - r[i]);
    den += r[i] * r[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

enum class Rule { Dense, Quest, Oracle };

// Runs `policy` on the batch and compares every (sequence, KV head) with the reference
// attention over the reference's selection. Returns how many groups were skipped because
// the reference selection was a near tie (float rounding may then choose differently).
int check_policy(AttentionPolicy& policy, Batch& batch, const AttentionConfig& c, Rule rule, const std::vector<float>& q,
                 ThreadPool& pool, const std::string& what) {
  const int G = c.group_size(), d = c.head_dim, Hq = c.num_q_heads;
  policy.update(*batch.cache, 1, batch.seqs, pool);
  std::vector<float> out(q.size(), NAN);
  policy.decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool);
  const DecodeStats st = policy.last_stats();
  int skipped = 0;
  int64_t exact = 0, chosen = 0;
  for (size_t b = 0; b < batch.seqs.size(); ++b) {
    ref::SeqKV kv(*batch.cache, batch.seqs[b], 1);
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const float* qg = q.data() + (b * Hq + h * G) * d;
      ref::Selection sel;
      if (rule == Rule::Dense) {
        sel.positions = ref::range(0, kv.length);
      } else {
        sel = rule == Rule::Quest ? ref::quest(kv, h, c, qg, G) : ref::oracle_topk(kv, h, c, qg, G);
        EXPECT_LE(sel.chosen_tokens, c.budget) << what;
      }
      exact += int64_t(sel.positions.size());
      chosen += sel.chosen_tokens;
      if (sel.margin < 1e-4) {
        ++skipped;
        continue;
      }
      auto r = ref::attend(kv, h, sel.positions, qg, G, c.softmax_scale());
      EXPECT_LT(rel_err(out.data() + (b * Hq + h * G) * d, r), 1e-5)
          << what << " seq " << b << " (length " << kv.length << ") head " << h;
    }
  }
  if (skipped == 0) {
    EXPECT_EQ(st.exact_tokens, exact) << what;
    EXPECT_EQ(st.selected_tokens, chosen) << what;
  }
  EXPECT_LE(st.selected_tokens, int64_t(c.budget) * c.num_kv_heads * int64_t(batch.seqs.size())) << what;
  EXPECT_GE(st.bytes_read, st.exact_tokens * 2 * d * int64_t(dtype_size(batch.cache->config().dtype))) << what;
  return skipped;
}

struct Case {
  DType dtype;
  int G, d;
};

std::vector<Case> cases() {
  std::vector<Case> v;
  for (int G : {1, 4, 5, 7, 8})
    for (int d : {64, 128}) v.push_back({DType::BF16, G, d});
  v.push_back({DType::F32, 4, 128});
  v.push_back({DType::F32, 5, 64});
  v.push_back({DType::F16, 8, 64});
  v.push_back({DType::F16, 1, 128});
  if (small_scale()) v = {{DType::BF16, 4, 128}, {DType::F32, 5, 64}, {DType::F16, 1, 128}, {DType::BF16, 8, 64}};
  return v;
}

std::string describe(const Case& k) {
  return std::string(dtype_name(k.dtype)) + " G=" + std::to_string(k.G) + " d=" + std::to_string(k.d);
}

}  // namespace

TEST(DenseQuestOracle, DenseMatchesReference) {
  ThreadPool pool(2);
  for (const Case& k : cases()) {
    AttentionConfig c = attention_config(k.G, k.d);
    Batch batch(c, k.dtype, batch_lengths(), uint32_t(k.G * 1000 + k.d));
    auto policy = make_attention_policy("dense", c);
    EXPECT_EQ(check_policy(*policy, batch, c, Rule::Dense, batch.queries(c, 2.0f), pool, "dense " + describe(k)), 0);
    int64_t total = 0;
    for (SeqId s : batch.seqs) total += batch.cache->length(s);
    EXPECT_EQ(policy->last_stats().bytes_read, total * c.num_kv_heads * 2 * k.d * int64_t(dtype_size(k.dtype)));
  }
}

TEST(DenseQuestOracle, DenseSplitAcrossThreadsMatchesReference) {
  // One long sequence and one KV head: the work is split into chunks whose states merge.
  ThreadPool pool(4);
  AttentionConfig c = attention_config(4, 128, 1);
  Batch batch(c, DType::BF16, {small_scale() ? 4500 : 9000}, 5);
  auto policy = make_attention_policy("dense", c);
  check_policy(*policy, batch, c, Rule::Dense, batch.queries(c, 3.0f), pool, "dense split");
}

TEST(DenseQuestOracle, QuestAndOracleMatchTheirSelectionRules) {
  ThreadPool pool(2);
  int skipped = 0, groups = 0;
  for (const Case& k : cases()) {
    AttentionConfig c = attention_config(k.G, k.d);
    Batch batch(c, k.dtype, batch_lengths(), uint32_t(k.G * 7 + k.d));
    auto q = batch.queries(c, 2.0f);
    auto quest = make_attention_policy("quest", c);
    auto oracle = make_attention_policy("oracle-topk", c);
    skipped += check_policy(*quest, batch, c, Rule::Quest, q, pool, "quest " + describe(k));
    skipped += check_policy(*oracle, batch, c, Rule::Oracle, q, pool, "oracle " + describe(k));
    groups += 2 * int(batch.seqs.size()) * c.num_kv_heads;
  }
  // Near ties at the selection boundary should be rare with random data.
  EXPECT_LE(skipped * 20, groups) << skipped << " of " << groups << " groups skipped as near ties";
}

TEST(DenseQuestOracle, QuestPartialLastPageAndOddBudget) {
  // Pages of 24 tokens do not divide the 128-token steps of the middle region, so its last
  // page is partial; budget 100 takes 4 pages (96 tokens).
  ThreadPool pool(2);
  AttentionConfig c = attention_config(5, 64);
  c.quest_page_size = 24;
  c.budget = 100;
  Batch batch(c, DType::BF16, {2049, 1300, 530}, 9);
  auto quest = make_attention_policy("quest", c);
  EXPECT_EQ(check_policy(*quest, batch, c, Rule::Quest, batch.queries(c, 2.0f), pool, "quest page 24"), 0);
  EXPECT_LE(quest->last_stats().selected_tokens, 96 * 2 * 3);
}

TEST(DenseQuestOracle, BudgetCoveringEverythingIsDense) {
  ThreadPool pool(2);
  for (const Case& k : {Case{DType::BF16, 4, 128}, Case{DType::F32, 7, 64}}) {
    AttentionConfig c = attention_config(k.G, k.d);
    c.budget = 1 << 20;
    Batch batch(c, k.dtype, batch_lengths(), 21);
    auto q = batch.queries(c, 2.0f);
    std::vector<std::vector<float>> outs;
    for (const char* name : {"dense", "quest", "oracle-topk"}) {
      auto p = make_attention_policy(name, c);
      p->update(*batch.cache, 1, batch.seqs, pool);
      outs.emplace_back(q.size());
      p->decode(*batch.cache, 1, batch.seqs, q.data(), outs.back().data(), pool);
      int64_t total = 0;
      for (SeqId s : batch.seqs) total += batch.cache->length(s);
      EXPECT_EQ(p->last_stats().exact_tokens, total * c.num_kv_heads) << name;
    }
    for (size_t i = 0; i < q.size(); ++i) {
      ASSERT_NEAR(outs[1][i], outs[0][i], 1e-5 * (1 + std::abs(outs[0][i]))) << "quest vs dense " << describe(k);
      ASSERT_NEAR(outs[2][i], outs[0][i], 1e-5 * (1 + std::abs(outs[0][i]))) << "oracle vs dense " << describe(k);
    }
  }
}

TEST(DenseQuestOracle, QuestIncrementalUpdateMatchesFreshIndex) {
  // Generation: append one token, update, decode; the incrementally kept page bounds must
  // select what a policy indexing everything from scratch selects.
  ThreadPool pool(2);
  AttentionConfig c = attention_config(4, 64);
  c.budget = 64;
  Batch batch(c, DType::BF16, {700, 300}, 33);
  auto live = make_attention_policy("quest", c);
  live->update(*batch.cache, 1, batch.seqs, pool);
  const int steps = small_scale() ? 140 : 300;  // crosses at least one window step (W = 128)
  for (int step = 0; step < steps; ++step) {
    for (SeqId s : batch.seqs) batch.append(s, 1);
    live->update(*batch.cache, 1, batch.seqs, pool);
    auto q = batch.queries(c, 2.0f);
    std::vector<float> a(q.size()), b(q.size());
    live->decode(*batch.cache, 1, batch.seqs, q.data(), a.data(), pool);
    if (step % 37 == 0 || step == steps - 1) {
      auto fresh = make_attention_policy("quest", c);
      fresh->update(*batch.cache, 1, batch.seqs, pool);
      fresh->decode(*batch.cache, 1, batch.seqs, q.data(), b.data(), pool);
      for (size_t i = 0; i < q.size(); ++i) ASSERT_EQ(a[i], b[i]) << "step " << step;
    }
  }
  EXPECT_LE(check_policy(*live, batch, c, Rule::Quest, batch.queries(c, 2.0f), pool, "quest after generation"), 1);
}

TEST(DenseQuestOracle, RejectsMisuse) {
  ThreadPool pool(2);
  AttentionConfig c = attention_config(4, 64);
  Batch batch(c, DType::BF16, {2049}, 1);
  auto q = batch.queries(c, 1.0f);
  std::vector<float> out(q.size());
  auto quest = make_attention_policy("quest", c);
  EXPECT_THROW(quest->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool), Error);  // no update()
  quest->update(*batch.cache, 1, batch.seqs, pool);
  batch.append(batch.seqs[0], 128);  // the middle region grows: the index is stale
  EXPECT_THROW(quest->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool), Error);
  quest->forget(batch.seqs[0]);
  quest->update(*batch.cache, 1, batch.seqs, pool);
  EXPECT_NO_THROW(quest->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool));

  auto dense = make_attention_policy("dense", c);
  AttentionConfig other = attention_config(4, 128);
  auto wrong = make_attention_policy("dense", other);
  EXPECT_THROW(wrong->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool), Error);
  SeqId empty = batch.cache->add_sequence();
  std::vector<SeqId> with_empty = {empty};
  EXPECT_THROW(dense->decode(*batch.cache, 1, with_empty, q.data(), out.data(), pool), Error);
  EXPECT_THROW(dense->decode(*batch.cache, 2, batch.seqs, q.data(), out.data(), pool), Error);
  EXPECT_THROW(make_attention_policy("nope", c), Error);
}

TEST(DenseQuestOracle, WarmDecodeStepDoesNotAllocate) {
#ifndef MULTIPOLE_COUNT_MALLOC
  GTEST_SKIP() << "malloc counting needs glibc and no ASan";
#else
  ThreadPool pool(2);
  AttentionConfig c = attention_config(4, 64);
  Batch batch(c, DType::BF16, {3000, 700}, 41);
  auto q = batch.queries(c, 1.0f);
  std::vector<float> out(q.size());
  for (const char* name : {"dense", "quest", "oracle-topk"}) {
    auto p = make_attention_policy(name, c);
    for (int warm = 0; warm < 2; ++warm) {
      p->update(*batch.cache, 1, batch.seqs, pool);
      p->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool);
    }
    g_mallocs = 0;
    g_counting = true;
    p->update(*batch.cache, 1, batch.seqs, pool);  // nothing new to index
    p->decode(*batch.cache, 1, batch.seqs, q.data(), out.data(), pool);
    g_counting = false;
    EXPECT_EQ(g_mallocs.load(), 0) << name;
  }
  // The counter works: an allocation is seen.
  g_mallocs = 0;
  g_counting = true;
  auto* v = new std::vector<float>(100);
  g_counting = false;
  delete v;
  EXPECT_GE(g_mallocs.load(), 1);
#endif
}
