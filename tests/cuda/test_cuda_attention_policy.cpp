// The GPU policies behind the AttentionPolicy interface (--device cuda) against the CPU
// policies, driven the way the model drives them: a batch of two sequences of different
// lengths over two layers, the prompt written and indexed at once, then tokens appended one
// at a time with update() + decode() per layer (crossing several online updates).
//   dense, quest, oracle-topk: the same rule on the same f16 cache, so the outputs agree
//   with the CPU policy's to rounding;
//   multipole, squeezed: the GPU k-means assigns by f16 distances, so clusters (and the
//   selection) may differ from the CPU's; the error against dense must stay that of the
//   CPU policy, and with a budget covering every token the output is dense's.
// Every test skips without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "multipole/attention/policy.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/attention/synthetic.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/cuda/attention_policy.hpp"
#include "multipole/cuda/runtime.hpp"
#include "multipole/eval/metrics.hpp"
#include "test_scale.hpp"

using namespace multipole;

namespace {

#define REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr int kLayers = 2, kHq = 8, kHkv = 2, kD = 64;
// Decode steps: at least one online update (every W = 128 tokens) either way.
const int64_t kSteps = multipole::test::small_scale() ? 140 : 300;
const int64_t kPrompts[2] = {700, 1300};

// One synthetic trace per (sequence, layer): clustered pre-RoPE keys, peaked queries.
struct Traces {
  std::vector<Trace> t;  // [seq * kLayers + layer]
  Traces() {
    for (int s = 0; s < 2; ++s)
      for (int l = 0; l < kLayers; ++l) {
        SyntheticTraceParams p;
        p.tokens = kPrompts[s] + kSteps;
        p.generated = kSteps;
        p.num_q_heads = kHq;
        p.num_kv_heads = kHkv;
        p.head_dim = kD;
        p.seed = uint64_t(10 * s + l + 1);
        t.push_back(make_synthetic_trace(p));
      }
  }
  const Trace& at(int s, int l) const { return t[size_t(s * kLayers + l)]; }
};

const Traces& traces() {
  static const Traces t;
  return t;
}

AttentionConfig config(int budget = 128) {
  AttentionConfig a;
  a.num_q_heads = kHq;
  a.num_kv_heads = kHkv;
  a.head_dim = kD;
  a.rope = traces().at(0, 0).rope;
  a.budget = budget;
  return a;
}

// Runs the CPU policy and the GPU one side by side on one host cache; per (step, layer,
// sequence) the relative errors of both against the CPU's dense and of the GPU against
// the CPU policy.
struct Errors {
  std::vector<double> cpu_vs_dense, gpu_vs_dense, gpu_vs_cpu;
  static double mean(const std::vector<double>& x) {
    double s = 0;
    for (double v : x) s += v;
    return x.empty() ? 0 : s / double(x.size());
  }
  static double max(const std::vector<double>& x) { return x.empty() ? 0 : *std::max_element(x.begin(), x.end()); }
};

Errors run_side_by_side(const std::string& name, const AttentionConfig& ac, DType kv_dtype = DType::F16) {
  ThreadPool pool(2);
  const Rope rope(ac.rope);
  PagedKVCache cache(KVCacheConfig{.num_layers = kLayers, .num_kv_heads = kHkv, .head_dim = kD, .page_size = 16,
                                   .dtype = kv_dtype, .max_tokens = kPrompts[0] + kPrompts[1] + 2 * kSteps + 64});
  std::unique_ptr<AttentionPolicy> dense = make_attention_policy("dense", ac);
  std::unique_ptr<AttentionPolicy> cpu = make_attention_policy(name, ac);
  std::unique_ptr<AttentionPolicy> gpu = cuda::make_cuda_attention_policy(name, ac);
  const std::vector<SeqId> seqs = {cache.add_sequence(), cache.add_sequence()};
  const size_t token = size_t(kHkv) * kD, row = size_t(kHq) * kD;

  auto write = [&](int s, int64_t pos, int64_t n) {
    for (int l = 0; l < kLayers; ++l) {
      const Trace& t = traces().at(s, l);
      std::vector<float> k(t.k.begin() + pos * token, t.k.begin() + (pos + n) * token);
      for (int64_t i = 0; i < n; ++i)
        for (int h = 0; h < kHkv; ++h) rope.apply(k.data() + size_t(i) * token + size_t(h) * kD, double(pos + i));
      cache.write(seqs[size_t(s)], l, pos, n, k.data(), t.v.data() + pos * token);
    }
  };
  // Prompts grown in interleaved pieces, so that page tables are fragmented.
  for (int64_t done = 0; done < kPrompts[1]; done += 100)
    for (int s = 0; s < 2; ++s) {
      const int64_t n = std::min<int64_t>(100, kPrompts[s] - done);
      if (n <= 0) continue;
      cache.extend(seqs[size_t(s)], n);
      write(s, done, n);
    }
  for (int l = 0; l < kLayers; ++l)
    for (AttentionPolicy* p : {dense.get(), cpu.get(), gpu.get()}) p->update(cache, l, seqs, pool);

  Errors e;
  std::vector<float> q(2 * row), o_dense(2 * row), o_cpu(2 * row), o_gpu(2 * row);
  for (int64_t t = 0; t < kSteps; ++t) {
    for (int s = 0; s < 2; ++s) {
      const int64_t pos = kPrompts[s] + t;
      cache.extend(seqs[size_t(s)], 1);
      write(s, pos, 1);
    }
    for (int l = 0; l < kLayers; ++l) {
      for (int s = 0; s < 2; ++s) {
        const Trace& tr = traces().at(s, l);
        std::copy_n(tr.q.begin() + t * int64_t(row), row, q.begin() + s * int64_t(row));
        for (int g = 0; g < kHq; ++g) rope.apply(q.data() + size_t(s) * row + size_t(g) * kD, double(kPrompts[s] + t));
      }
      std::fill(o_gpu.begin(), o_gpu.end(), std::nanf(""));
      dense->update(cache, l, seqs, pool);
      dense->decode(cache, l, seqs, q.data(), o_dense.data(), pool);
      cpu->update(cache, l, seqs, pool);
      cpu->decode(cache, l, seqs, q.data(), o_cpu.data(), pool);
      gpu->update(cache, l, seqs, pool);
      gpu->decode(cache, l, seqs, q.data(), o_gpu.data(), pool);
      for (int s = 0; s < 2; ++s) {
        const std::span<const float> d(o_dense.data() + s * row, row), c(o_cpu.data() + s * row, row),
            g(o_gpu.data() + s * row, row);
        e.cpu_vs_dense.push_back(eval::relative_error(c, d));
        e.gpu_vs_dense.push_back(eval::relative_error(g, d));
        e.gpu_vs_cpu.push_back(eval::relative_error(g, c));
      }
      EXPECT_GT(gpu->last_stats().exact_tokens, 0);
    }
  }
  return e;
}

// One gtest case per policy, so that the sanitizer script can run each in its own process.
std::string policy_case_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string name = info.param;
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

// dense, quest and oracle-topk: the same rule on the same f16 cache as the CPU policy.
class CudaSameRulePolicy : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaSameRulePolicy, MatchesTheCpuPolicy) {
  REQUIRE_GPU();
  const Errors e = run_side_by_side(GetParam(), config());
  ASSERT_EQ(e.gpu_vs_cpu.size(), size_t(kSteps * kLayers * 2));
  // NaN (an output never written) fails these too.
  EXPECT_LT(Errors::max(e.gpu_vs_cpu), 2e-3) << "mean " << Errors::mean(e.gpu_vs_cpu);
  for (double x : e.gpu_vs_cpu) ASSERT_FALSE(std::isnan(x));
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaSameRulePolicy, ::testing::Values("dense", "quest", "oracle-topk"),
                         policy_case_name);

// multipole and squeezed: the GPU index is clustered by the GPU k-means, so only the error
// against dense is compared. "multipole-far-real": multipole with the far field at real
// positions, on both devices; "multipole-rerank": multipole re-ranking 4 x budget tokens' picks.
class CudaClusteredPolicy : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaClusteredPolicy, ErrsAsMuchAsOnTheCpu) {
  REQUIRE_GPU();
  AttentionConfig ac = config();
  std::string name = GetParam();
  if (name == "multipole-far-real") {
    ac.far_field_real_positions = true;
    name = "multipole";
  } else if (name == "multipole-rerank") {
    ac.rerank_tokens = 4 * ac.budget;
    name = "multipole";
  }
  const Errors e = run_side_by_side(name, ac);
  for (double x : e.gpu_vs_dense) ASSERT_FALSE(std::isnan(x));
  const double cpu = Errors::mean(e.cpu_vs_dense), gpu = Errors::mean(e.gpu_vs_dense);
  // The budget leaves most keys out, so the policy is not dense...
  EXPECT_GT(cpu, 1e-3);
  // ...and the GPU index serves it as well as the CPU's (clusters may differ a little).
  EXPECT_LT(gpu, 1.2 * cpu + 0.01) << "cpu " << cpu << ", gpu " << gpu;
  EXPECT_LT(Errors::max(e.gpu_vs_dense), 2 * Errors::max(e.cpu_vs_dense) + 0.05);
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaClusteredPolicy,
                         ::testing::Values("multipole", "squeezed", "multipole-far-real", "multipole-rerank"),
                         policy_case_name);

TEST(CudaAttentionPolicy, MultipoleWithABudgetOverEveryTokenIsDense) {
  REQUIRE_GPU();
  // Every cluster fits, at both levels: the exact part covers the whole sequence. Missing or
  // stale mirrored pages, or an online update that did not run, would show here.
  AttentionConfig ac = config(4096);
  ac.coarse_budget = 4096;
  const Errors e = run_side_by_side("multipole", ac);
  EXPECT_LT(Errors::max(e.gpu_vs_dense), 2e-3);
  EXPECT_LT(Errors::max(e.cpu_vs_dense), 2e-3);
}

TEST(CudaAttentionPolicy, RefusesWhatTheKernelsCannotDo) {
  REQUIRE_GPU();
  ThreadPool pool(1);
  PagedKVCache f32_cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = kHkv, .head_dim = kD, .page_size = 16,
                                       .dtype = DType::F32, .max_tokens = 64});
  const SeqId seq = f32_cache.add_sequence();
  f32_cache.extend(seq, 1);
  auto dense = cuda::make_cuda_attention_policy("dense", config());
  try {
    dense->update(f32_cache, 0, std::span(&seq, 1), pool);
    FAIL() << "an f32 cache was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 or f16"), std::string::npos) << e.what();
  }
  // Misuse: decode before update, a layer or sequence the mirror does not hold.
  PagedKVCache f16_cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = kHkv, .head_dim = kD, .page_size = 16,
                                       .dtype = DType::F16, .max_tokens = 64});
  const SeqId s16 = f16_cache.add_sequence();
  f16_cache.extend(s16, 20);
  std::vector<float> q(size_t(kHq) * kD, 0.5f), o(q.size());
  auto d16 = cuda::make_cuda_attention_policy("dense", config());
  EXPECT_THROW(d16->decode(f16_cache, 0, std::span(&s16, 1), q.data(), o.data(), pool), Error);
  d16->update(f16_cache, 0, std::span(&s16, 1), pool);
  d16->decode(f16_cache, 0, std::span(&s16, 1), q.data(), o.data(), pool);
  EXPECT_THROW(d16->decode(f16_cache, 1, std::span(&s16, 1), q.data(), o.data(), pool), Error);
  const SeqId stranger = 300;
  EXPECT_THROW(d16->decode(f16_cache, 0, std::span(&stranger, 1), q.data(), o.data(), pool), Error);
  f16_cache.extend(s16, 1);  // a token the mirror has not seen
  EXPECT_THROW(d16->decode(f16_cache, 0, std::span(&s16, 1), q.data(), o.data(), pool), Error);
  AttentionConfig real = config();
  real.score_real_positions = true;
  EXPECT_THROW(cuda::make_cuda_attention_policy("multipole", real), Error);
  AttentionConfig bound = config();
  bound.coarse_radius_weight = 1.0f;
  EXPECT_THROW(cuda::make_cuda_attention_policy("multipole", bound), Error);
  AttentionConfig rerank_far = config();
  rerank_far.rerank_tokens = 512;
  rerank_far.far_field_real_positions = true;
  try {
    cuda::make_cuda_attention_policy("multipole", rerank_far);
    FAIL() << "re-ranking with the far field at real positions was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rerank_tokens 512 with the far field at real positions is cpu-only"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(cuda::make_cuda_attention_policy("nope", config()), Error);
  AttentionConfig wide = config();
  wide.head_dim = 96;
  wide.rope.head_dim = 96;
  EXPECT_THROW(cuda::make_cuda_attention_policy("dense", wide), Error);
}

TEST(CudaAttentionPolicy, IsTheCudaDevice) {
  cuda::register_cuda_attention();
  const auto devices = attention_devices();
  EXPECT_NE(std::find(devices.begin(), devices.end(), "cuda"), devices.end());
  if (cuda::device_count() == 0) {
    // Without a GPU the device is known but refuses to make a policy, with a reason.
    try {
      make_attention_policy("dense", config(), "cuda");
      FAIL() << "made a cuda policy without a device";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no usable CUDA device"), std::string::npos) << e.what();
    }
  } else {
    EXPECT_EQ(make_attention_policy("dense", config(), "cuda")->name(), "dense");
  }
}

}  // namespace
