// Quest and oracle-topk on the GPU against the CPU policies on the same cache contents:
// outputs (poisoned first) against the CPU policy and against a float64 softmax over the
// GPU's own exact set; the selected set against the policies' rule re-implemented here in
// float64 (differences only at near-ties of the cut, exact ties to the lower index); quest
// page bounds bit-exact after device appends. Every test skips without a CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "multipole/attention/policy.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/cuda/sparse_baselines.hpp"
#include "test_scale.hpp"

using namespace multipole;
using namespace multipole::cuda;

namespace {

#define REQUIRE_GPU() \
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device"

struct Case {
  SparseBaseline kind;
  int G, Hkv, D;
  DType dtype;
  std::vector<int64_t> lengths;
  bool structured = false;  // keys repeat every `period` middle tokens: exact score ties
  int sinks = 10, window = 128, quest_page = 16, budget = 128;
};

const char* kind_name(SparseBaseline k) { return k == SparseBaseline::Quest ? "quest" : "oracle-topk"; }

AttentionConfig config_of(const Case& c) {
  AttentionConfig a;
  a.num_kv_heads = c.Hkv;
  a.num_q_heads = c.G * c.Hkv;
  a.head_dim = c.D;
  a.rope.head_dim = c.D;
  a.budget = c.budget;
  a.cluster.sinks = c.sinks;
  a.cluster.window = c.window;
  a.quest_page_size = c.quest_page;
  return a;
}

// A 2-layer CPU cache (pages of 16 tokens, sequences grown in interleaved pieces so page
// tables are fragmented) with keys and values on layer 1, and its device mirror.
struct Bed {
  KVCacheConfig kc;
  PagedKVCache cpu;
  std::vector<SeqId> seqs;
  DeviceKVCache dev;
  static KVCacheConfig make(const Case& c, int64_t extra) {
    int64_t total = 0;
    for (int64_t n : c.lengths) total += n + extra + 32;
    return KVCacheConfig{.num_layers = 2, .num_kv_heads = c.Hkv, .head_dim = c.D, .page_size = 16, .dtype = c.dtype,
                         .max_tokens = total + 256};
  }
  Bed(const Case& c, std::mt19937& rng, int64_t extra = 0) : kc(make(c, extra)), cpu(kc), dev(kc, 64) {
    for (size_t b = 0; b < c.lengths.size(); ++b) seqs.push_back(cpu.add_sequence());
    std::vector<int64_t> done(c.lengths.size(), 0);
    for (bool more = true; more;) {
      more = false;
      for (size_t b = 0; b < c.lengths.size(); ++b) {
        const int64_t n = std::min<int64_t>(c.lengths[b] - done[b], 16 * int64_t(1 + rng() % 3));
        if (n > 0) {
          cpu.extend(seqs[b], n);
          done[b] += n;
          more = true;
        }
      }
    }
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int period = 3 * c.quest_page;  // whole quest pages repeat too
    for (size_t b = 0; b < c.lengths.size(); ++b) {
      const int64_t n = c.lengths[b];
      const size_t row = size_t(c.Hkv) * c.D;
      std::vector<float> k(size_t(n) * row), v(k.size());
      for (auto& x : v) x = nd(rng);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t src = c.structured && t >= c.sinks + period ? c.sinks + (t - c.sinks) % period : t;
        for (size_t i = 0; i < row; ++i) k[size_t(t) * row + i] = src == t ? nd(rng) : k[size_t(src) * row + i];
      }
      if (n) cpu.write(seqs[b], 1, 0, n, k.data(), v.data());
    }
    dev.upload(cpu);
  }
};

std::vector<float> random_vector(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

struct Floats {
  DeviceBuffer buf;
  size_t n;
  explicit Floats(const std::vector<float>& v) : buf(std::max<size_t>(v.size(), 1) * 4), n(v.size()) {
    buf.upload(v.data(), v.size() * 4);
  }
  float* ptr() const { return buf.as<float>(); }
  std::vector<float> get() const {
    std::vector<float> v(n);
    synchronize();
    buf.download(v.data(), n * 4);
    return v;
  }
};

// Candidate scores of one entry in float64 as the CPU policies define them: quest pages
// (max over the group of sum_c max(q lo, q hi)) or oracle keys (sum over the group of the
// softmax over the middle region). keys: the head's [length, D] keys.
std::vector<double> reference_scores(const Case& c, const AttentionConfig& ac, const std::vector<float>& keys,
                                     const float* qg, int64_t s, int64_t m) {
  const int D = c.D, G = c.G;
  std::vector<double> out;
  if (c.kind == SparseBaseline::Quest) {
    for (int64_t p0 = s; p0 < m; p0 += c.quest_page) {
      const int64_t p1 = std::min<int64_t>(p0 + c.quest_page, m);
      double best = -std::numeric_limits<double>::infinity();
      for (int g = 0; g < G; ++g) {
        double sum = 0;
        for (int ch = 0; ch < D; ++ch) {
          float lo = keys[size_t(p0) * D + ch], hi = lo;
          for (int64_t p = p0; p < p1; ++p) {
            lo = std::min(lo, keys[size_t(p) * D + ch]);
            hi = std::max(hi, keys[size_t(p) * D + ch]);
          }
          const double q = qg[g * D + ch];
          sum += std::max(q * lo, q * hi);
        }
        best = std::max(best, sum);
      }
      out.push_back(best);
    }
    return out;
  }
  out.assign(size_t(m - s), 0.0);
  std::vector<double> x(size_t(m - s));
  for (int g = 0; g < G; ++g) {
    double mx = -std::numeric_limits<double>::infinity(), z = 0;
    for (int64_t t = s; t < m; ++t) {
      double dot = 0;
      for (int ch = 0; ch < D; ++ch) dot += double(qg[g * D + ch]) * keys[size_t(t) * D + ch];
      x[size_t(t - s)] = dot * ac.softmax_scale();
      mx = std::max(mx, x[size_t(t - s)]);
    }
    for (auto& v : x) z += std::exp(v - mx);
    for (size_t i = 0; i < x.size(); ++i) out[i] += std::exp(x[i] - mx) / z;
  }
  return out;
}

// The GPU's selected candidates (pages or keys) against the rule: top k by score, ties to
// the lower index. Disagreements are allowed only within `tol` (relative) of the k-th score,
// and never between exactly equal scores.
void check_selection(const std::vector<double>& score, int k, const std::vector<int>& picked, double tol) {
  const int n = int(score.size());
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  std::vector<char> want(n, 0), got(n, 0);
  for (int i = 0; i < std::min(n, k); ++i) want[order[i]] = 1;
  ASSERT_EQ(int(picked.size()), std::min(n, k));
  for (int i : picked) {
    ASSERT_TRUE(i >= 0 && i < n) << "picked " << i;
    got[i] = 1;
  }
  if (n <= k) return;
  const double kth = score[order[k - 1]];
  for (int i = 0; i < n; ++i)
    if (want[i] != got[i]) {
      EXPECT_LE(std::abs(score[i] - kth), tol * std::abs(kth) + 1e-12)
          << "candidate " << i << (got[i] ? " picked" : " missed") << ", score " << score[i] << ", cut " << kth;
    }
  // Exact ties: within a run of equal scores (ascending index), the picks are a prefix.
  for (int a = 0, z = 0; a < n; a = z) {
    for (z = a; z < n && score[order[z]] == score[order[a]]; ++z) {
    }
    bool gap = false;
    for (int i = a; i < z; ++i) {
      if (got[order[i]] && gap) ADD_FAILURE() << "tie at " << order[i] << " not broken to the lower index";
      gap = gap || !got[order[i]];
    }
  }
}

double rel_error(const float* a, const float* ref, int d) {
  double num = 0, den = 0;
  for (int i = 0; i < d; ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    num += double(a[i] - ref[i]) * (a[i] - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// float64 softmax attention of query qg (one head) over `positions` of one head.
std::vector<double> attend_f64(const std::vector<float>& keys, const std::vector<float>& values,
                               const std::vector<int32_t>& positions, const float* q, int D, double scale) {
  std::vector<double> x(positions.size()), out(D, 0.0);
  double mx = -std::numeric_limits<double>::infinity(), l = 0;
  for (size_t i = 0; i < positions.size(); ++i) {
    double dot = 0;
    for (int c = 0; c < D; ++c) dot += double(q[c]) * keys[size_t(positions[i]) * D + c];
    x[i] = dot * scale;
    mx = std::max(mx, x[i]);
  }
  for (size_t i = 0; i < positions.size(); ++i) {
    const double e = std::exp(x[i] - mx);
    l += e;
    for (int c = 0; c < D; ++c) out[c] += e * values[size_t(positions[i]) * D + c];
  }
  for (auto& o : out) o /= l;
  return out;
}

// Runs one step of the GPU baseline and the CPU policy on layer 1 of `su` and checks
// output, exact sets and selections.
void check_step(const Case& c, Bed& su, CudaSparseDecoder& dec, AttentionPolicy& cpu_policy, std::mt19937& rng) {
  const AttentionConfig ac = config_of(c);
  const int B = int(c.lengths.size()), Hkv = c.Hkv, G = c.G, D = c.D, Hq = G * Hkv;
  std::vector<int64_t> len(B);
  for (int b = 0; b < B; ++b) len[b] = su.cpu.length(su.seqs[b]);
  const auto q = random_vector(size_t(B) * Hq * D, rng);
  Floats dq(q), dout(std::vector<float>(q.size(), std::numeric_limits<float>::quiet_NaN()));
  dec.decode(su.dev, 1, dq.ptr(), dout.ptr(), nullptr);
  const auto out = dout.get();
  EXPECT_EQ(dec.error_flags(), 0u);
  const auto exact = dec.exact_positions();

  ThreadPool pool(2);
  std::vector<float> ref(q.size(), std::numeric_limits<float>::quiet_NaN());
  cpu_policy.update(su.cpu, 1, su.seqs, pool);
  cpu_policy.decode(su.cpu, 1, su.seqs, q.data(), ref.data(), pool);

  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h) {
      SCOPED_TRACE(::testing::Message() << "b=" << b << " length " << len[b] << " h=" << h);
      const int e = b * Hkv + h;
      std::vector<float> keys(size_t(len[b]) * D), values(keys.size());
      su.cpu.read_keys(su.seqs[b], 1, h, 0, len[b], keys.data());
      su.cpu.read_values(su.seqs[b], 1, h, 0, len[b], values.data());
      const int64_t s = std::min<int64_t>(c.sinks, len[b]), m = ac.middle_end(len[b]);
      // Exact set: sinks, middle picks ascending, window.
      const auto& pos = exact[size_t(e)];
      std::vector<int> picked;
      std::vector<int32_t> sinks_window;
      for (size_t i = 0; i < pos.size(); ++i) {
        if (i > 0) {
          EXPECT_LT(pos[i - 1], pos[i]) << "positions not ascending at " << i;
        }
        if (pos[i] < s || pos[i] >= m) {
          sinks_window.push_back(pos[i]);
        } else if (c.kind == SparseBaseline::OracleTopk) {
          picked.push_back(int(pos[i] - s));
        } else {
          const int page = int((pos[i] - s) / c.quest_page);
          if (picked.empty() || picked.back() != page) picked.push_back(page);
        }
      }
      std::vector<int32_t> want_sw(static_cast<size_t>(s));
      std::iota(want_sw.begin(), want_sw.end(), 0);
      for (int64_t p = m; p < len[b]; ++p) want_sw.push_back(int32_t(p));
      EXPECT_EQ(sinks_window, want_sw);
      if (c.kind == SparseBaseline::Quest)  // picked pages are whole (the partial last one up to m)
        for (int page : picked) {
          const int64_t p0 = s + int64_t(page) * c.quest_page, p1 = std::min<int64_t>(p0 + c.quest_page, m);
          EXPECT_EQ(std::count_if(pos.begin(), pos.end(), [&](int32_t p) { return p >= p0 && p < p1; }), p1 - p0);
        }
      const float* qg = q.data() + (size_t(b) * Hq + size_t(h) * G) * D;
      const auto score = reference_scores(c, ac, keys, qg, s, m);
      const int k = c.kind == SparseBaseline::Quest ? c.budget / c.quest_page : c.budget;
      check_selection(score, k, picked, 1e-4);
      for (int g = 0; g < G; ++g) {
        const size_t o = (size_t(b) * Hq + size_t(h) * G + g) * D;
        const auto want = attend_f64(keys, values, pos, qg + size_t(g) * D, D, ac.softmax_scale());
        std::vector<float> wf(want.begin(), want.end());
        EXPECT_LT(rel_error(out.data() + o, wf.data(), D), 2e-5) << "g=" << g << " vs f64 over the GPU's set";
        EXPECT_LT(rel_error(out.data() + o, ref.data() + o, D), 5e-3) << "g=" << g << " vs the CPU policy";
      }
    }
}

void run_case(const Case& c, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << kind_name(c.kind) << " G=" << c.G << " Hkv=" << c.Hkv << " D=" << c.D << " "
                                    << dtype_name(c.dtype) << (c.structured ? " structured" : " random") << " B="
                                    << c.lengths.size() << " page " << c.quest_page << " window " << c.window);
  std::mt19937 rng(seed);
  Bed su(c, rng);
  const AttentionConfig ac = config_of(c);
  CudaSparseDecoder dec(ac, c.kind);
  dec.plan(su.dev, su.seqs);
  if (c.kind == SparseBaseline::Quest) dec.build_metadata(su.dev, 1, nullptr);
  auto policy = make_attention_policy(kind_name(c.kind), ac);
  check_step(c, su, dec, *policy, rng);
}

std::vector<int64_t> lengths() {
  return multipole::test::small_scale() ? std::vector<int64_t>{1, 97, 2049}
                                        : std::vector<int64_t>{2049, 1, 97, 5003, 301, 1000};
}

// Both baselines, group sizes 1..8 and both head dims, the KV dtype alternating.
TEST(CudaSparseBaselines, GroupSizesHeadDimsDtypes) {
  REQUIRE_GPU();
  uint32_t seed = 1;
  for (auto kind : {SparseBaseline::Quest, SparseBaseline::OracleTopk})
    for (int G : {1, 4, 5, 7, 8})
      for (int D : {64, 128}) {
        const DType t = (G + D / 64 + int(kind)) % 2 ? DType::BF16 : DType::F16;
        run_case({kind, G, 2, D, t, lengths()}, seed++);
      }
}

TEST(CudaSparseBaselines, PartialPagesOddRegionsGroup16) {
  REQUIRE_GPU();
  // Window 100 and pages of 24 from sink 7: the middle region ends inside a page.
  for (auto kind : {SparseBaseline::Quest, SparseBaseline::OracleTopk})
    for (DType t : {DType::BF16, DType::F16}) {
      Case c{kind, 16, 1, 128, t, lengths()};
      c.sinks = 7;
      c.window = 100;
      c.quest_page = 24;
      c.budget = 200;
      run_case(c, 7);
      c.G = 3;
      c.Hkv = 3;
      c.D = 64;
      run_case(c, 8);
    }
}

TEST(CudaSparseBaselines, StructuredKeysTiesGoToTheLowerIndex) {
  REQUIRE_GPU();
  for (auto kind : {SparseBaseline::Quest, SparseBaseline::OracleTopk})
    for (int G : {1, 4}) {
      Case c{kind, G, 2, 64, DType::BF16, lengths(), true};
      run_case(c, 20 + G);
      c.D = 128;
      c.dtype = DType::F16;
      run_case(c, 30 + G);
    }
}

TEST(CudaSparseBaselines, QuestBoundsStayExactAfterDeviceAppends) {
  REQUIRE_GPU();
  const int steps = multipole::test::small_scale() ? 140 : 300;  // the middle region moves at least once
  for (int D : {64, 128}) {
    Case c{SparseBaseline::Quest, 4, 2, D, D == 64 ? DType::BF16 : DType::F16, {1, 97, 2049, 300}};
    c.window = 64;
    c.quest_page = 24;
    std::mt19937 rng(50 + D);
    Bed su(c, rng, steps);
    const AttentionConfig ac = config_of(c);
    const int B = int(c.lengths.size()), Hkv = c.Hkv;
    CudaSparseDecoder dec(ac, c.kind);
    int64_t longest = 0;
    for (int64_t n : c.lengths) longest = std::max(longest, n + steps);
    dec.plan(su.dev, su.seqs, longest);
    dec.build_metadata(su.dev, 1, nullptr);
    std::vector<int32_t> ids(su.seqs.begin(), su.seqs.end());
    DeviceBuffer dids(ids.size() * 4);
    dids.upload(ids.data(), ids.size() * 4);
    for (int step = 0; step < steps; ++step) {
      const auto k = random_vector(size_t(B) * Hkv * D, rng), v = random_vector(k.size(), rng);
      for (int b = 0; b < B; ++b) {
        const int64_t pos = su.cpu.extend(su.seqs[b], 1);
        su.cpu.write(su.seqs[b], 1, pos, 1, k.data() + size_t(b) * Hkv * D, v.data() + size_t(b) * Hkv * D);
      }
      su.dev.sync_tables(su.cpu);
      Floats dk(k), dv(v);
      su.dev.append(1, dids.as<int32_t>(), B, dk.ptr(), dv.ptr(), nullptr);
      dec.update_metadata(su.dev, 1, nullptr);
    }
    // Bounds of every page of every entry, bit-exact.
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const int64_t n = su.cpu.length(su.seqs[b]), s = std::min<int64_t>(c.sinks, n), m = ac.middle_end(n);
        const int pages = int((m - s + c.quest_page - 1) / c.quest_page);
        std::vector<float> keys(size_t(n) * D);
        su.cpu.read_keys(su.seqs[b], 1, h, 0, n, keys.data());
        const auto got = dec.page_bounds(1, b * Hkv + h, pages);
        int bad = 0;
        for (int p = 0; p < pages; ++p)
          for (int ch = 0; ch < D; ++ch) {
            float lo = std::numeric_limits<float>::infinity(), hi = -lo;
            for (int64_t t = s + int64_t(p) * c.quest_page; t < std::min<int64_t>(m, s + int64_t(p + 1) * c.quest_page); ++t) {
              lo = std::min(lo, keys[size_t(t) * D + ch]);
              hi = std::max(hi, keys[size_t(t) * D + ch]);
            }
            bad += got[(size_t(p) * 2) * D + ch] != lo || got[(size_t(p) * 2 + 1) * D + ch] != hi;
          }
        EXPECT_EQ(bad, 0) << "D=" << D << " b=" << b << " h=" << h << " of " << pages << " pages";
      }
    for (int b = 0; b < B; ++b) c.lengths[size_t(b)] = su.cpu.length(su.seqs[b]);
    auto policy = make_attention_policy("quest", ac);
    check_step(c, su, dec, *policy, rng);
  }
}

TEST(CudaSparseBaselines, FullBudgetAndGraphReplay) {
  REQUIRE_GPU();
  // Budget beyond every middle region: everything is taken (quest and oracle equal dense up
  // to the order of summation); then the same step replayed from a CUDA graph.
  for (auto kind : {SparseBaseline::Quest, SparseBaseline::OracleTopk}) {
    Case c{kind, 4, 2, 128, DType::BF16, {300, 1000, 97}};
    c.budget = 1024;
    std::mt19937 rng(70);
    Bed su(c, rng);
    const AttentionConfig ac = config_of(c);
    CudaSparseDecoder dec(ac, kind);
    dec.plan(su.dev, su.seqs);
    if (kind == SparseBaseline::Quest) dec.build_metadata(su.dev, 1, nullptr);
    auto policy = make_attention_policy(kind_name(kind), ac);
    check_step(c, su, dec, *policy, rng);
    const auto q = random_vector(size_t(3) * 8 * 128, rng);
    Floats dq(q), o1(std::vector<float>(q.size(), NAN)), o2(std::vector<float>(q.size(), NAN));
    dec.decode(su.dev, 1, dq.ptr(), o1.ptr(), nullptr);
    // The graph's stream does not wait for the default stream, and both steps use the
    // decoder's workspaces (racecheck's slow kernels made them overlap).
    synchronize();
    cudaStream_t st;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    dec.decode(su.dev, 1, dq.ptr(), o2.ptr(), st);
    ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    EXPECT_EQ(o1.get(), o2.get());
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(st);
  }
}

TEST(CudaSparseBaselines, RejectsBadConfig) {
  AttentionConfig ac;
  ac.head_dim = 96;
  ac.rope.head_dim = 96;
  EXPECT_THROW(CudaSparseDecoder(ac, SparseBaseline::Quest), Error);
  ac = AttentionConfig{};
  ac.budget = 5000;
  EXPECT_THROW(CudaSparseDecoder(ac, SparseBaseline::OracleTopk), Error);
}

}  // namespace
