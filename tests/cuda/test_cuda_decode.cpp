// CUDA decode attention against naive float64 references computed on the host from the
// same cache contents (and against the CPU decode kernels). Outputs are poisoned (NaN)
// before every run. Every test skips when there is no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "attention/decode_kernels.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/attention/policy.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/thread_pool.hpp"
#include "multipole/cuda/decode.hpp"
#include "test_scale.hpp"

using namespace multipole;
using namespace multipole::cuda;

namespace {

using multipole::test::small_scale;

#define REQUIRE_GPU() \
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device"

float round_to(DType t, float x) {
  return t == DType::BF16 ? bf16_to_f32(f32_to_bf16(x)) : t == DType::F16 ? f16_to_f32(f32_to_f16(x)) : x;
}

// A CPU cache with random contents for sequences of the given lengths; pages of different
// sequences are interleaved so that page tables are not contiguous.
struct Cache {
  KVCacheConfig config;
  PagedKVCache cpu;
  std::vector<SeqId> seqs;
  Cache(const KVCacheConfig& c, const std::vector<int64_t>& lengths, std::mt19937& rng) : config(c), cpu(c) {
    for (size_t b = 0; b < lengths.size(); ++b) seqs.push_back(cpu.add_sequence());
    // Grow in rounds of a few pages each.
    std::vector<int64_t> done(lengths.size(), 0);
    bool more = true;
    while (more) {
      more = false;
      for (size_t b = 0; b < lengths.size(); ++b) {
        const int64_t n = std::min<int64_t>(lengths[b] - done[b], int64_t(c.page_size) * (1 + rng() % 3));
        if (n > 0) {
          cpu.extend(seqs[b], n);
          done[b] += n;
          more = true;
        }
      }
    }
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int layer = 0; layer < c.num_layers; ++layer)
      for (size_t b = 0; b < lengths.size(); ++b) {
        const int64_t n = lengths[b];
        std::vector<float> k(size_t(n) * c.num_kv_heads * c.head_dim), v(k.size());
        for (auto& x : k) x = nd(rng);
        for (auto& x : v) x = nd(rng);
        if (n) cpu.write(seqs[b], layer, 0, n, k.data(), v.data());
      }
  }
  std::vector<float> keys(int layer, size_t b, int h) const {
    std::vector<float> out(size_t(cpu.length(seqs[b])) * config.head_dim);
    cpu.read_keys(seqs[b], layer, h, 0, cpu.length(seqs[b]), out.data());
    return out;
  }
  std::vector<float> values(int layer, size_t b, int h) const {
    std::vector<float> out(size_t(cpu.length(seqs[b])) * config.head_dim);
    cpu.read_values(seqs[b], layer, h, 0, cpu.length(seqs[b]), out.data());
    return out;
  }
};

// A cache config with room for `lengths` (plus slack for page rounding and appends), a CPU
// cache filled at random and its device mirror.
KVCacheConfig cache_config(int layers, int heads, int dim, int page, DType dtype, const std::vector<int64_t>& lengths) {
  KVCacheConfig kc;
  kc.num_layers = layers;
  kc.num_kv_heads = heads;
  kc.head_dim = dim;
  kc.page_size = page;
  kc.dtype = dtype;
  kc.max_tokens = std::accumulate(lengths.begin(), lengths.end(), int64_t(0)) + 8 * page * int64_t(lengths.size()) + 64;
  return kc;
}

struct Mirror {
  Cache cache;
  DeviceKVCache dev;
  Mirror(int layers, int heads, int dim, int page, DType dtype, const std::vector<int64_t>& lengths, std::mt19937& rng)
      : cache(cache_config(layers, heads, dim, page, dtype, lengths), lengths, rng), dev(cache.config, 64) {
    dev.upload(cache.cpu);
  }
};

struct DeviceFloats {
  DeviceBuffer buf;
  size_t n = 0;
  explicit DeviceFloats(const std::vector<float>& v) : buf(std::max<size_t>(v.size(), 1) * 4), n(v.size()) {
    buf.upload(v.data(), v.size() * 4);
  }
  explicit DeviceFloats(size_t count) : buf(std::max<size_t>(count, 1) * 4), n(count) {}
  float* ptr() const { return buf.as<float>(); }
  void poison() {  // all-ones bits: NaN; finished before work on any stream starts
    buf.memset(0xff);
    synchronize();
  }
  std::vector<float> get() const {
    std::vector<float> v(n);
    synchronize();
    buf.download(v.data(), n * 4);
    return v;
  }
};

std::vector<float> random_vector(size_t n, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// One (key, value, logit bias) row set for a naive softmax.
struct Rows {
  std::vector<const float*> k, v;
  std::vector<double> bias;
  std::vector<const float*> qsel;  // which query each row's logit uses (q or q_score)
};

// out[d] = sum_t e^{x_t} v_t / sum_t e^{x_t}, x_t = scale * q_t . k_t + bias_t, in f64.
std::vector<double> naive_softmax(const Rows& r, int d, double scale) {
  const size_t n = r.k.size();
  std::vector<double> x(n), out(d, 0.0);
  double m = -std::numeric_limits<double>::infinity();
  for (size_t t = 0; t < n; ++t) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += double(r.qsel[t][c]) * r.k[t][c];
    x[t] = scale * dot + r.bias[t];
    m = std::max(m, x[t]);
  }
  double l = 0;
  for (size_t t = 0; t < n; ++t) {
    const double e = std::exp(x[t] - m);
    l += e;
    for (int c = 0; c < d; ++c) out[c] += e * r.v[t][c];
  }
  for (auto& o : out) o = l > 0 ? o / l : 0.0;
  return out;
}

// ||a - ref|| / ||ref|| over one head; NaN anywhere fails.
double rel_error(const float* a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

AttentionConfig make_config(int G, int Hkv, int D) {
  AttentionConfig c;
  c.num_kv_heads = Hkv;
  c.num_q_heads = G * Hkv;
  c.head_dim = D;
  c.rope.head_dim = D;
  c.cluster.tokens_per_centroid = {16};
  return c;
}

struct DenseCase {
  int G, Hkv, D, page;
  DType dtype;
  std::vector<int64_t> lengths;
};

void run_dense(const DenseCase& dc, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "G=" << dc.G << " Hkv=" << dc.Hkv << " D=" << dc.D << " page=" << dc.page
                                    << " dtype=" << dtype_name(dc.dtype) << " B=" << dc.lengths.size());
  std::mt19937 rng(seed);
  Mirror su(2, dc.Hkv, dc.D, dc.page, dc.dtype, dc.lengths, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  const AttentionConfig ac = make_config(dc.G, dc.Hkv, dc.D);
  CudaDecoder dec(ac);
  dec.plan(dev, cache.seqs);
  const int B = int(dc.lengths.size()), Hq = ac.num_q_heads, D = dc.D;
  const auto q = random_vector(size_t(B) * Hq * D, rng);
  DeviceFloats dq(q), dout(size_t(B) * Hq * D);
  const int layer = 1;
  dout.poison();
  dec.dense(dev, layer, dq.ptr(), dout.ptr(), nullptr);
  const auto out = dout.get();
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < dc.Hkv; ++h) {
      const auto k = cache.keys(layer, b, h), v = cache.values(layer, b, h);
      for (int g = 0; g < dc.G; ++g) {
        const int qh = h * dc.G + g;
        const float* qp = q.data() + (size_t(b) * Hq + qh) * D;
        Rows r;
        for (int64_t t = 0; t < dc.lengths[b]; ++t) {
          r.k.push_back(k.data() + t * D);
          r.v.push_back(v.data() + t * D);
          r.bias.push_back(0.0);
          r.qsel.push_back(qp);
        }
        const auto ref = naive_softmax(r, D, ac.softmax_scale());
        EXPECT_LT(rel_error(out.data() + (size_t(b) * Hq + qh) * D, ref), 2e-5)
            << "b=" << b << " h=" << h << " g=" << g << " len=" << dc.lengths[b];
      }
    }
}

}  // namespace

TEST(CudaDense, OddLengthsGroupSizesHeadDims) {
  REQUIRE_GPU();
  const std::vector<int64_t> lens = small_scale() ? std::vector<int64_t>{1, 97, 513} : std::vector<int64_t>{1, 97, 2049};
  uint32_t seed = 1;
  for (int D : {64, 128})
    for (int G : {1, 4, 5, 7, 8})
      for (int64_t n : lens) run_dense({G, 2, D, 16, DType::BF16, {n}}, seed++);
}

TEST(CudaDense, MixedBatchesDtypesPageSizes) {
  REQUIRE_GPU();
  uint32_t seed = 100;
  run_dense({4, 8, 128, 16, DType::BF16, {1, 97, 2049, 300, 5000}}, seed++);
  run_dense({4, 8, 128, 16, DType::F16, {33, 2049, 97}}, seed++);
  run_dense({8, 2, 64, 5, DType::F16, {7, 1000, 64}}, seed++);
  run_dense({16, 2, 128, 16, DType::BF16, {700, 97}}, seed++);  // two head chunks of 8
  run_dense({12, 1, 64, 32, DType::BF16, {1500}}, seed++);      // chunks of 6 in 8-wide CTAs
  run_dense({2, 4, 128, 1, DType::BF16, {129, 3}}, seed++);     // one token per page
}

TEST(CudaDense, LongSequenceManySplits) {
  REQUIRE_GPU();
  run_dense({4, 8, 128, 16, DType::BF16, {small_scale() ? 8192 : 40000}}, 7);
}

TEST(CudaDense, MatchesCpuDecodeKernels) {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  const std::vector<int64_t> lens = {1234, 77};
  Mirror su(1, 2, 128, 16, DType::BF16, lens, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  const AttentionConfig ac = make_config(4, 2, 128);
  CudaDecoder dec(ac);
  dec.plan(dev, cache.seqs);
  const int Hq = 8, D = 128;
  const auto q = random_vector(2 * Hq * D, rng);
  DeviceFloats dq(q), dout(2 * Hq * D);
  dout.poison();
  dec.dense(dev, 0, dq.ptr(), dout.ptr(), nullptr);
  const auto out = dout.get();
  const KVLayerView view = cache.cpu.layer_view(0);
  for (int b = 0; b < 2; ++b)
    for (int h = 0; h < 2; ++h) {
      std::vector<float> m(4), l(4), o(4 * D), cpu_out(4 * D);
      kernels::SoftmaxState st{4, D, m.data(), l.data(), o.data()};
      st.reset();
      kernels::attend_range(view, cache.cpu.page_table(cache.seqs[b]).data(), h, 0, lens[b],
                            q.data() + (size_t(b) * Hq + h * 4) * D, ac.softmax_scale(), st);
      kernels::finalize(st, cpu_out.data());
      for (int i = 0; i < 4 * D; ++i)
        EXPECT_NEAR(out[(size_t(b) * Hq + h * 4) * D + i], cpu_out[i], 1e-4f + 1e-4f * std::fabs(cpu_out[i]));
    }
}

TEST(CudaDense, DeviceAppendMatchesHostWrite) {
  REQUIRE_GPU();
  std::mt19937 rng(21);
  const std::vector<int64_t> lens = {31, 32, 100};
  Mirror su(1, 2, 64, 16, DType::BF16, lens, rng);
  Cache& cache = su.cache;
  DeviceKVCache& dev = su.dev;
  // One more token per sequence: written on the host cache and appended on the device.
  const int B = 3, Hkv = 2, D = 64;
  const auto k = random_vector(size_t(B) * Hkv * D, rng), v = random_vector(size_t(B) * Hkv * D, rng);
  for (int b = 0; b < B; ++b) {
    const int64_t pos = cache.cpu.extend(cache.seqs[b], 1);
    cache.cpu.write(cache.seqs[b], 0, pos, 1, k.data() + size_t(b) * Hkv * D, v.data() + size_t(b) * Hkv * D);
  }
  dev.sync_tables(cache.cpu);
  std::vector<int32_t> ids(cache.seqs.begin(), cache.seqs.end());
  DeviceBuffer dids(ids.size() * 4);
  dids.upload(ids.data(), ids.size() * 4);
  DeviceFloats dk(k), dv(v);
  dev.append(0, dids.as<int32_t>(), B, dk.ptr(), dv.ptr(), nullptr);
  synchronize();
  std::vector<std::byte> host(size_t(dev.pool_bytes()));
  for (int which = 0; which < 2; ++which) {
    MP_CHECK(cudaMemcpy(host.data(), which ? dev.value_pool(0) : dev.key_pool(0), host.size(), cudaMemcpyDeviceToHost) == cudaSuccess, "copy");
    const KVLayerView view = cache.cpu.layer_view(0);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const int64_t pos = lens[b];
        const auto* want = which ? view.value(cache.cpu.page_table(cache.seqs[b]).data(), h, pos)
                                 : view.key(cache.cpu.page_table(cache.seqs[b]).data(), h, pos);
        const std::byte* got = host.data() + (want - (which ? view.values : view.keys));
        EXPECT_EQ(0, std::memcmp(want, got, size_t(view.token_bytes))) << "b=" << b << " h=" << h;
      }
  }
}

namespace {

// Captures step(stream) into a CUDA graph on a new non-blocking stream and replays it `reps`
// times back to back, then waits for it.
template <class Step>
void replay_in_graph(Step&& step, int reps) {
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t g;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  step(s);
  ASSERT_EQ(cudaStreamEndCapture(s, &g), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
  for (int rep = 0; rep < reps; ++rep) ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

// A random cluster index over [sinks, end) of each (b, h): positions shuffled, cluster
// sizes skewed (a few large, many small, some singletons); centroids are member means
// (keys as cached, perturbed), value centroids the member means.
struct IndexFixture {
  std::vector<HostClusterLevel> entries;
};

IndexFixture make_index(const Cache& cache, const AttentionConfig& ac, int layer, std::mt19937& rng, bool huge_first) {
  IndexFixture f;
  const int D = ac.head_dim;
  std::normal_distribution<float> noise(0.0f, 0.3f);
  for (size_t b = 0; b < cache.seqs.size(); ++b) {
    const int64_t len = cache.cpu.length(cache.seqs[b]);
    const int64_t end = ac.middle_end(len);
    const int64_t s0 = std::min<int64_t>(ac.cluster.sinks, end);
    for (int h = 0; h < ac.num_kv_heads; ++h) {
      const auto k = cache.keys(layer, b, h), v = cache.values(layer, b, h);
      std::vector<int32_t> pos;
      for (int64_t p = s0; p < end; ++p) pos.push_back(int32_t(p));
      std::shuffle(pos.begin(), pos.end(), rng);
      HostClusterLevel e;
      e.clustered_end = end;
      e.member_offsets.push_back(0);
      size_t at = 0;
      bool first = true;
      while (at < pos.size()) {
        int n;
        const uint32_t r = rng() % 100;
        if (first && huge_first)
          n = ac.budget + 5;
        else
          n = r < 10 ? 40 + int(rng() % 60) : r < 30 ? 1 : 2 + int(rng() % 20);
        first = false;
        n = int(std::min<size_t>(size_t(n), pos.size() - at));
        std::vector<float> kc(D, 0.0f), vc(D, 0.0f);
        for (int j = 0; j < n; ++j) {
          const int32_t p = pos[at + j];
          e.members.push_back(p);
          for (int c = 0; c < D; ++c) {
            kc[c] += k[size_t(p) * D + c] / n;
            vc[c] += v[size_t(p) * D + c] / n;
          }
        }
        for (auto& x : kc) x += noise(rng);
        e.key_centroids.insert(e.key_centroids.end(), kc.begin(), kc.end());
        e.value_centroids.insert(e.value_centroids.end(), vc.begin(), vc.end());
        e.sizes.push_back(n);
        e.member_offsets.push_back(int32_t(e.members.size()));
        at += size_t(n);
      }
      // An empty cluster must be neither selected nor in the far field.
      if (rng() % 2) {
        e.key_centroids.insert(e.key_centroids.end(), size_t(D), 5.0f);
        e.value_centroids.insert(e.value_centroids.end(), size_t(D), 0.0f);
        e.sizes.push_back(0);
        e.member_offsets.push_back(int32_t(e.members.size()));
      }
      f.entries.push_back(std::move(e));
    }
  }
  return f;
}

struct MpCase {
  int G, Hkv, D;
  DType dtype, key_dtype;
  std::vector<int64_t> lengths;
  int budget;
  bool far_field = true;
  bool huge_first = false;
  int chunk_tiles = 0;  // > 0: the planner's shortest attention split (MULTIPOLE_MP_CHUNK_TILES)
  int score_ctas = 0;   // > 0: the scoring kernel's CTAs (MULTIPOLE_SCORE_CTAS), so each takes several items
};

// Reference greedy selection (f64 importance) for one entry; returns selected flags and
// whether a near-tie (relative gap < 1e-4) makes the order ambiguous.
std::vector<char> reference_select(const HostClusterLevel& e, DType key_dtype, const float* qs, int G, int D,
                                   double scale, int budget, bool& ambiguous) {
  const int C = e.num_clusters();
  std::vector<double> x(size_t(C) * G);
  std::vector<double> M(G, -1e300), Z(G, 0.0);
  for (int i = 0; i < C; ++i)
    for (int g = 0; g < G; ++g) {
      double dot = 0;
      for (int c = 0; c < D; ++c) dot += double(qs[g * D + c]) * round_to(key_dtype, e.key_centroids[size_t(i) * D + c]);
      x[size_t(i) * G + g] = scale * dot;
      if (e.sizes[i] > 0) M[g] = std::max(M[g], scale * dot);
    }
  for (int i = 0; i < C; ++i)
    for (int g = 0; g < G; ++g)
      if (e.sizes[i] > 0) Z[g] += e.sizes[i] * std::exp(x[size_t(i) * G + g] - M[g]);
  std::vector<std::pair<double, int>> order;
  for (int i = 0; i < C; ++i) {
    if (e.sizes[i] <= 0) continue;
    double imp = 0;
    for (int g = 0; g < G; ++g) imp += std::exp(x[size_t(i) * G + g] - M[g]) / Z[g];
    order.push_back({imp, i});
  }
  std::sort(order.begin(), order.end(), [](auto& a, auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
  std::vector<char> sel(C, 0);
  int R = budget;
  size_t last = 0;
  for (size_t k = 0; k < order.size() && R > 0; ++k) {
    const int i = order[k].second;
    if (e.sizes[i] <= R) {
      sel[i] = 1;
      R -= e.sizes[i];
    }
    last = k;
  }
  // Swapping two near-equal neighbours can change the outcome only when one of them is taken.
  ambiguous = false;
  for (size_t k = 0; k + 1 < order.size() && k <= last; ++k)
    if (order[k].first - order[k + 1].first < 1e-4 * order[k].first && (sel[order[k].second] || sel[order[k + 1].second]))
      ambiguous = true;
  return sel;
}

void run_multipole(const MpCase& mc, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "G=" << mc.G << " Hkv=" << mc.Hkv << " D=" << mc.D << " dtype="
                                    << dtype_name(mc.dtype) << " keys=" << dtype_name(mc.key_dtype) << " budget=" << mc.budget
                                    << " far=" << mc.far_field << " B=" << mc.lengths.size());
  std::mt19937 rng(seed);
  Mirror su(1, mc.Hkv, mc.D, 16, mc.dtype, mc.lengths, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  AttentionConfig ac = make_config(mc.G, mc.Hkv, mc.D);
  ac.budget = mc.budget;
  ac.multipole_far_field = mc.far_field;
  const IndexFixture fx = make_index(cache, ac, 0, rng, mc.huge_first);
  DeviceClusterIndex index(mc.D, mc.Hkv, mc.key_dtype, mc.dtype, fx.entries);
  CudaDecoder dec(ac);
  dec.set_record_far_sizes(true);
  if (mc.chunk_tiles > 0) setenv("MULTIPOLE_MP_CHUNK_TILES", std::to_string(mc.chunk_tiles).c_str(), 1);
  if (mc.score_ctas > 0) setenv("MULTIPOLE_SCORE_CTAS", std::to_string(mc.score_ctas).c_str(), 1);
  dec.plan(dev, cache.seqs, &index);
  if (mc.chunk_tiles > 0) {
    unsetenv("MULTIPOLE_MP_CHUNK_TILES");
    EXPECT_GE(dec.plan_info().mp_chunk, 32 * mc.chunk_tiles);
  }
  if (mc.score_ctas > 0) {
    unsetenv("MULTIPOLE_SCORE_CTAS");
    EXPECT_EQ(dec.plan_info().score_ctas, mc.score_ctas);
    EXPECT_GT(dec.plan_info().score_work, 2 * mc.score_ctas);  // the deepest ring: three items in flight
  }
  const int B = int(mc.lengths.size()), Hq = ac.num_q_heads, D = mc.D, G = mc.G;
  const auto q = random_vector(size_t(B) * Hq * D, rng);
  const auto qs = random_vector(size_t(B) * Hq * D, rng, 1.5f);
  DeviceFloats dq(q), dqs(qs), dout(size_t(B) * Hq * D);
  dout.poison();
  dec.clear_error_flags();
  dec.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), dout.ptr(), nullptr);
  const auto out = dout.get();
  const auto far = dec.far_sizes();
  const auto counts = dec.exact_counts();
  EXPECT_EQ(dec.error_flags(), 0u);
  const double scale = ac.softmax_scale();
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < mc.Hkv; ++h) {
      const int e = b * mc.Hkv + h;
      const auto& ent = fx.entries[e];
      const int64_t first = index.entry_first_cluster(e);
      const int C = ent.num_clusters();
      // Selection: the device's choice, checked against the f64 greedy.
      std::vector<char> dsel(C);
      int sel_tokens = 0;
      for (int i = 0; i < C; ++i) {
        dsel[i] = ent.sizes[i] > 0 && far[first + i] == 0;
        if (ent.sizes[i] == 0) {
          EXPECT_EQ(far[first + i], 0);
        } else if (!dsel[i]) {
          EXPECT_EQ(far[first + i], ent.sizes[i]);
        }
        sel_tokens += dsel[i] ? ent.sizes[i] : 0;
      }
      EXPECT_LE(sel_tokens, mc.budget);
      bool ambiguous = false;
      const auto rsel = reference_select(ent, mc.key_dtype, qs.data() + (size_t(b) * Hq + h * G) * D, G, D, scale,
                                         mc.budget, ambiguous);
      if (ambiguous) {
        std::printf("note: b=%d h=%d importance near-tie, selection compared by budget only\n", b, h);
      } else {
        for (int i = 0; i < C; ++i) EXPECT_EQ(int(dsel[i]), int(rsel[i])) << "b=" << b << " h=" << h << " cluster " << i;
      }
      const int64_t len = mc.lengths[b], end = ent.clustered_end, s0 = std::min<int64_t>(ac.cluster.sinks, end);
      EXPECT_EQ(counts[e], s0 + sel_tokens + (len - end)) << "b=" << b << " h=" << h;
      // Output: exact rows with q, far field with q_score + log n, using the device's selection.
      const auto k = cache.keys(0, b, h), v = cache.values(0, b, h);
      std::vector<float> vc(ent.value_centroids.size()), kcent(ent.key_centroids.size());
      for (size_t i = 0; i < vc.size(); ++i) vc[i] = round_to(mc.dtype, ent.value_centroids[i]);
      for (size_t i = 0; i < kcent.size(); ++i) kcent[i] = round_to(mc.key_dtype, ent.key_centroids[i]);
      for (int g = 0; g < G; ++g) {
        const int qh = h * G + g;
        const float* qp = q.data() + (size_t(b) * Hq + qh) * D;
        const float* qsp = qs.data() + (size_t(b) * Hq + qh) * D;
        Rows r;
        auto exact = [&](int64_t p) {
          r.k.push_back(k.data() + p * D);
          r.v.push_back(v.data() + p * D);
          r.bias.push_back(0.0);
          r.qsel.push_back(qp);
        };
        for (int64_t p = 0; p < s0; ++p) exact(p);
        for (int64_t p = end; p < len; ++p) exact(p);
        for (int i = 0; i < C; ++i) {
          if (dsel[i]) {
            for (int j = ent.member_offsets[i]; j < ent.member_offsets[i + 1]; ++j) exact(ent.members[j]);
          } else if (mc.far_field && ent.sizes[i] > 0) {
            r.k.push_back(kcent.data() + size_t(i) * D);
            r.v.push_back(vc.data() + size_t(i) * D);
            r.bias.push_back(std::log(double(ent.sizes[i])));
            r.qsel.push_back(qsp);
          }
        }
        const auto ref = naive_softmax(r, D, scale);
        EXPECT_LT(rel_error(out.data() + (size_t(b) * Hq + qh) * D, ref), 2e-5) << "b=" << b << " h=" << h << " g=" << g;
      }
    }
}

}  // namespace

TEST(CudaMultipole, GroupSizesHeadDimsSkewedClusters) {
  REQUIRE_GPU();
  const int64_t n = small_scale() ? 1500 : 4097;
  uint32_t seed = 300;
  // f32 key centroids are scored with FMAs, bf16 ones on tensor cores.
  for (DType keys : {DType::F32, DType::BF16})
    for (int D : {64, 128})
      for (int G : {1, 4, 5, 7, 8}) run_multipole({G, 2, D, DType::BF16, keys, {n}, 128}, seed++);
}

TEST(CudaMultipole, MixedBatchOddLengthsDtypes) {
  REQUIRE_GPU();
  uint32_t seed = 400;
  run_multipole({4, 8, 128, DType::BF16, DType::BF16, {1, 97, 2049, 700, 5000}, 128}, seed++);
  run_multipole({4, 2, 128, DType::F16, DType::F32, {2049, 300}, 128}, seed++);
  run_multipole({8, 2, 64, DType::F16, DType::F16, {97, 3000}, 64}, seed++);
  run_multipole({16, 1, 128, DType::BF16, DType::F32, {2500}, 128}, seed++);  // two head chunks
  run_multipole({16, 1, 128, DType::BF16, DType::BF16, {2500}, 128}, seed++);
  run_multipole({5, 2, 128, DType::F16, DType::F16, {2049, 300}, 128}, seed++);
}

// Persistent scoring CTAs with several items each stream the next items' centroids through
// their shared-memory ring while they score one.
TEST(CudaMultipole, ScoringCtasTakeSeveralItems) {
  REQUIRE_GPU();
  const int64_t n = small_scale() ? 6000 : 20000;
  uint32_t seed = 450;
  for (DType keys : {DType::F32, DType::BF16}) {
    run_multipole({4, 4, 128, DType::BF16, keys, {n, 3001, 97}, 128, true, false, 0, 3}, seed++);
    run_multipole({16, 2, 64, DType::BF16, keys, {n, 1500}, 128, true, false, 0, 7}, seed++);
  }
  run_multipole({7, 2, 64, DType::F16, DType::F16, {n}, 256, true, false, 0, 2}, seed++);
}

TEST(CudaMultipole, LargeBudgetRadixPathAndSkippedGiant) {
  REQUIRE_GPU();
  uint32_t seed = 500;
  const int64_t n = small_scale() ? 6000 : 20000;
  run_multipole({4, 2, 128, DType::BF16, DType::F32, {n}, int(n / 20)}, seed++);      // 5% budget: deep radix select
  run_multipole({4, 2, 128, DType::BF16, DType::F32, {3000}, 128, true, true}, seed++);  // a cluster above the budget
  run_multipole({4, 2, 128, DType::BF16, DType::F32, {3000}, 0}, seed++);              // nothing selected
}

// Splits long enough that each warp of the attention kernel runs past the 32 tiles whose row
// codes it loads first, so it loads the next 32 while it runs (at the bench's shapes a warp
// has at most ~11 tiles; a batch of 64 at 128K tokens would have ~43).
TEST(CudaMultipole, LongSplitsLoadRowCodesAhead) {
  REQUIRE_GPU();
  const int64_t n = small_scale() ? 6000 : 20000;
  // Virtual lengths (exact set + far field) of ~2000-6000 positions: 36 to ~190 warp tiles.
  run_multipole({4, 2, 128, DType::BF16, DType::BF16, {n, 3001}, int(n / 4), true, false, 400}, 550);
  run_multipole({5, 1, 64, DType::F16, DType::F32, {n}, 512, true, false, 400}, 551);
  run_multipole({4, 2, 128, DType::BF16, DType::F32, {n}, int(n / 5), false, false, 400}, 552);  // squeezed
}

TEST(CudaMultipole, SqueezedDropsTheFarField) {
  REQUIRE_GPU();
  run_multipole({4, 2, 128, DType::BF16, DType::F32, {2049, 777}, 128, false}, 600);
}

TEST(CudaMultipole, FullBudgetEqualsDense) {
  REQUIRE_GPU();
  std::mt19937 rng(700);
  const std::vector<int64_t> lens = {3001, 500};
  Mirror su(1, 2, 128, 16, DType::BF16, lens, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  AttentionConfig ac = make_config(4, 2, 128);
  ac.budget = 4000;
  const IndexFixture fx = make_index(cache, ac, 0, rng, false);
  DeviceClusterIndex index(128, 2, DType::F32, DType::BF16, fx.entries);
  CudaDecoder dec(ac);
  dec.plan(dev, cache.seqs, &index);
  const size_t n = 2 * 8 * 128;
  const auto q = random_vector(n, rng), qs = random_vector(n, rng);
  DeviceFloats dq(q), dqs(qs), a(n), b(n);
  a.poison();
  b.poison();
  dec.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), a.ptr(), nullptr);
  dec.dense(dev, 0, dq.ptr(), b.ptr(), nullptr);
  const auto x = a.get(), y = b.get();
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(x[i], y[i], 1e-5f + 1e-5f * std::fabs(y[i])) << i;
}

TEST(CudaMultipole, GraphReplayMatchesDirectLaunches) {
  REQUIRE_GPU();
  std::mt19937 rng(800);
  const std::vector<int64_t> lens = {9000, 20000};
  Mirror su(1, 8, 128, 16, DType::BF16, lens, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  const AttentionConfig ac = make_config(4, 8, 128);
  const IndexFixture fx = make_index(cache, ac, 0, rng, false);
  DeviceClusterIndex index(128, 8, DType::BF16, DType::BF16, fx.entries);
  CudaDecoder dec(ac);
  dec.plan(dev, cache.seqs, &index);
  const size_t n = 2 * 32 * 128;
  const auto q = random_vector(n, rng), qs = random_vector(n, rng);
  DeviceFloats dq(q), dqs(qs), direct_mp(n), direct_dense(n), graph_mp(n), graph_dense(n);
  direct_mp.poison();
  direct_dense.poison();
  dec.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), direct_mp.ptr(), nullptr);
  dec.dense(dev, 0, dq.ptr(), direct_dense.ptr(), nullptr);
  synchronize();
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  dec.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), graph_mp.ptr(), s);
  dec.dense(dev, 0, dq.ptr(), graph_dense.ptr(), s);
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int rep = 0; rep < 3; ++rep) {
    graph_mp.poison();
    graph_dense.poison();
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    const auto a = direct_mp.get(), b = graph_mp.get(), c = direct_dense.get(), d = graph_dense.get();
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(a[i], b[i]) << "multipole, replay " << rep << ", element " << i;  // deterministic
      ASSERT_EQ(c[i], d[i]) << "dense, replay " << rep << ", element " << i;
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

// Programmatic dependent launch (the selection and attention kernels start their prologue
// while the previous kernel of the step runs) changes no result: one- and two-level index,
// direct launches and a graph replayed three times back to back (step n + 1's scoring
// kernel follows step n's attention kernel), against plain launches.
TEST(CudaMultipole, ProgrammaticDependentLaunchMatchesPlainLaunches) {
  REQUIRE_GPU();
  std::mt19937 rng(801);
  const std::vector<int64_t> lens = {9000, 20000, 3000};
  Mirror su(1, 8, 128, 16, DType::BF16, lens, rng);
  const Cache& cache = su.cache;
  const DeviceKVCache& dev = su.dev;
  const AttentionConfig ac = make_config(4, 8, 128);
  IndexFixture fx = make_index(cache, ac, 0, rng, false);
  const size_t n = lens.size() * 32 * 128;
  const auto q = random_vector(n, rng), qs = random_vector(n, rng);
  DeviceFloats dq(q), dqs(qs), plain(n), direct(n), graph(n);
  for (int levels = 1; levels <= 2; ++levels) {
    SCOPED_TRACE(levels);
    if (levels == 2)
      for (auto& e : fx.entries) {  // coarse clusters of ~8 consecutive fine ones, weighted means
        e.coarse_child_offsets = {0};
        for (int c0 = 0; c0 < e.num_clusters(); c0 += 8) {
          const int c1 = std::min(e.num_clusters(), c0 + 8);
          int under = 0;
          std::vector<float> kc(128, 0.0f), vc(128, 0.0f);
          for (int c = c0; c < c1; ++c) under += e.sizes[size_t(c)];
          for (int c = c0; c < c1; ++c) {
            e.coarse_children.push_back(c);
            const float w = under > 0 ? float(e.sizes[size_t(c)]) / float(under) : 0.0f;
            for (int d = 0; d < 128; ++d) {
              kc[size_t(d)] += w * e.key_centroids[size_t(c) * 128 + d];
              vc[size_t(d)] += w * e.value_centroids[size_t(c) * 128 + d];
            }
          }
          e.coarse_sizes.push_back(under);
          e.coarse_child_offsets.push_back(int32_t(e.coarse_children.size()));
          e.coarse_key_centroids.insert(e.coarse_key_centroids.end(), kc.begin(), kc.end());
          e.coarse_value_centroids.insert(e.coarse_value_centroids.end(), vc.begin(), vc.end());
        }
      }
    DeviceClusterIndex index(128, 8, DType::BF16, DType::BF16, fx.entries);
    ASSERT_EQ(index.hierarchical(), levels == 2);
    CudaDecoder off(ac), on(ac);
    off.set_pdl(false);
    on.set_pdl(true);
    off.set_record_far_sizes(true);
    on.set_record_far_sizes(true);
    off.plan(dev, cache.seqs, &index);
    on.plan(dev, cache.seqs, &index);
    plain.poison();
    direct.poison();
    off.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), plain.ptr(), nullptr);
    const auto far_off = off.far_sizes(), exact_off = off.exact_counts();
    on.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), direct.ptr(), nullptr);
    EXPECT_EQ(on.far_sizes(), far_off);
    EXPECT_EQ(on.exact_counts(), exact_off);
    graph.poison();
    replay_in_graph([&](cudaStream_t s) { on.multipole(dev, 0, index, dq.ptr(), dqs.ptr(), graph.ptr(), s); }, 3);
    EXPECT_EQ(on.far_sizes(), far_off);
    EXPECT_EQ(on.exact_counts(), exact_off);
    EXPECT_EQ(on.error_flags(), 0u);
    const auto a = plain.get(), b = direct.get(), c = graph.get();
    for (size_t i = 0; i < n; ++i) {
      ASSERT_FALSE(std::isnan(a[i])) << i;
      if (levels == 1) {
        ASSERT_EQ(a[i], b[i]) << "direct, element " << i;
        ASSERT_EQ(a[i], c[i]) << "graph, element " << i;
      } else {  // the coarse far-field sum adds per-warp partials with shared float atomics
        ASSERT_NEAR(a[i], b[i], 1e-6f * (1.0f + std::fabs(a[i]))) << "direct, element " << i;
        ASSERT_NEAR(a[i], c[i], 1e-6f * (1.0f + std::fabs(a[i]))) << "graph, element " << i;
      }
    }
  }
}

// The CPU "multipole" policy (k-means index, one or two levels) against the CUDA path fed
// with that policy's own index through host_cluster_level(): same selection rule (coarse
// level under the coarse budget, then the children of the selected coarse clusters), same
// far field. Differences: value centroids are rounded to bf16 on the device, so the far
// field differs by ~2^-9 of its weight.
// keys: the device index's key centroid dtype. f32: compared with the CPU policy. 16-bit, two
// levels: the step with the fine candidates scored by the selection kernel (prescore 0) is
// compared with the one where the scoring kernel scores them (prescore 1): two tensor-core
// paths over the same rounded centroids, whose logits differ only by summation order.
// Where the one-launch step holds (G <= 4, d 128, keys in the cache's type, one level of at
// most 2048 clusters or two), it runs too and
// must give the three-kernel step's selection (far sizes, exact counts) and output (up to
// summation order); kv: the cache's type; far_field false: squeezed. empties (16-bit keys):
// each entry also gets an empty fine cluster (two levels: under its first coarse cluster) and,
// with two levels, an empty coarse cluster, all with key centroids far above every other
// (logits of hundreds) and value centroids of 1000: an empty cluster must weigh nothing, in no
// normaliser and no far field. far_real: the far field at real positions (the one-launch step
// only without a fallback); expect_one_launch 0 / 1: whether the one-launch step must run (-1: any).
// rerank: AttentionConfig::rerank_tokens (three kernels and the re-ranking launch; in the
// one-launch step where it holds, up to 512).
void compare_with_cpu_policy(int G, int Hkv, int D, std::vector<int> tokens_per_centroid, int budget,
                             int coarse_budget, uint32_t seed, DType keys = DType::F32, DType kv = DType::BF16,
                             bool far_field = true, bool empties = false,
                             std::vector<int32_t>* fallbacks = nullptr, int page = 16,
                             int waves = CudaDecoder::kFusedWaves, bool far_real = false,
                             int expect_one_launch = -1, int rerank = 0) {
  SCOPED_TRACE(::testing::Message() << "G=" << G << " Hkv=" << Hkv << " D=" << D << " levels="
                                    << tokens_per_centroid.size() << " coarse_budget=" << coarse_budget
                                    << " keys=" << dtype_name(keys) << " kv=" << dtype_name(kv)
                                    << " far_field=" << far_field << " far_real=" << far_real
                                    << " rerank=" << rerank);
  std::mt19937 rng(seed);
  const std::vector<int64_t> lens = {small_scale() ? 1500 : 5000, 777, 97};
  const bool pow2_pages = (page & (page - 1)) == 0;
  Mirror su(1, Hkv, D, page, kv, lens, rng);
  AttentionConfig ac = make_config(G, Hkv, D);
  ac.cluster.block_size = 2048;
  const size_t levels = tokens_per_centroid.size();
  ac.cluster.tokens_per_centroid = std::move(tokens_per_centroid);
  ac.budget = budget;
  ac.coarse_budget = coarse_budget;
  ac.multipole_far_field = far_field;
  ac.far_field_real_positions = far_real;
  ac.rerank_tokens = rerank;
  ThreadPool pool(2);
  auto policy = make_attention_policy("multipole", ac);
  policy->update(su.cache.cpu, 0, su.cache.seqs, pool);
  const int B = int(lens.size()), Hq = G * Hkv;
  const auto q = random_vector(size_t(B) * Hq * D, rng);
  std::vector<float> cpu_out(q.size());
  policy->decode(su.cache.cpu, 0, su.cache.seqs, q.data(), cpu_out.data(), pool);
  if (far_real || rerank) {
    // The comparison below must tell the option from its absence: on the CPU the two outputs
    // differ by far more than its tolerance in some head.
    AttentionConfig fixed = ac;
    fixed.far_field_real_positions = false;
    fixed.rerank_tokens = 0;
    auto other = make_attention_policy("multipole", fixed);
    other->update(su.cache.cpu, 0, su.cache.seqs, pool);
    std::vector<float> fixed_out(q.size());
    other->decode(su.cache.cpu, 0, su.cache.seqs, q.data(), fixed_out.data(), pool);
    double most = 0;
    for (size_t o = 0; o < q.size(); o += size_t(D)) {
      const std::vector<double> real(cpu_out.begin() + o, cpu_out.begin() + o + D);
      most = std::max(most, rel_error(fixed_out.data() + o, real));
    }
    EXPECT_GT(most, 2e-2) << (rerank ? "re-ranking" : "the far field at real positions") << " barely changes this case";
  }

  std::vector<HostClusterLevel> entries;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h) {
      const ClusterIndex* idx = find_cluster_index(*policy, su.cache.seqs[b], 0, h);
      ASSERT_NE(idx, nullptr);
      entries.push_back(host_cluster_level(*idx));
      ASSERT_EQ(entries.back().num_coarse() > 0, idx->num_levels() == 2 && idx->level(1).count() > 0);
    }
  // Scoring queries: each query moved from its position (length - 1) to score_position.
  const Rope rope(ac.rope);
  std::vector<float> qs = q;
  for (int b = 0; b < B; ++b)
    for (int qh = 0; qh < Hq; ++qh) rope.rotate_by(qs.data() + (size_t(b) * Hq + qh) * D, ac.score_position - double(lens[b] - 1));
  if (empties)
    for (HostClusterLevel& x : entries) {
      if (x.num_coarse() == 0 && levels != 1) continue;  // (a two-level entry too short for a coarse level)
      const int32_t id = x.num_clusters();
      x.key_centroids.insert(x.key_centroids.end(), size_t(D), 200.0f);
      x.value_centroids.insert(x.value_centroids.end(), size_t(D), 1000.0f);
      x.sizes.push_back(0);
      x.member_offsets.push_back(int32_t(x.members.size()));
      if (levels == 1) continue;
      x.coarse_children.insert(x.coarse_children.begin() + x.coarse_child_offsets[1], id);
      for (size_t c = 1; c < x.coarse_child_offsets.size(); ++c) ++x.coarse_child_offsets[c];
      x.coarse_key_centroids.insert(x.coarse_key_centroids.end(), size_t(D), 200.0f);
      x.coarse_value_centroids.insert(x.coarse_value_centroids.end(), size_t(D), 1000.0f);
      x.coarse_sizes.push_back(0);
      x.coarse_child_offsets.push_back(x.coarse_child_offsets.back());
    }
  DeviceClusterIndex index(D, Hkv, keys, kv, entries);
  ASSERT_TRUE(keys == DType::F32 || index.hierarchical() == (levels == 2));
  std::vector<std::vector<float>> outs;  // per prescore mode
  std::vector<std::vector<int32_t>> fars;
  std::vector<int32_t> three_counts;  // the three-kernel step's exact counts (16-bit keys)
  // Two levels: the fine candidates scored by the selection kernel, then by the scoring one.
  for (const int prescore : index.hierarchical() ? std::vector<int>{0, 1} : std::vector<int>{-1}) {
    SCOPED_TRACE(::testing::Message() << "prescore=" << prescore);
    CudaDecoder dec(ac);
    dec.set_prescore(prescore);
    dec.set_fused(false);
    dec.plan(su.dev, su.cache.seqs, &index);
    EXPECT_FALSE(dec.plan_info().fused);
    EXPECT_EQ(dec.plan_info().hierarchical, index.hierarchical());
    EXPECT_EQ(dec.plan_info().prescored, prescore == 1);
    EXPECT_EQ(dec.plan_info().far_real, far_real && far_field);
    EXPECT_EQ(dec.plan_info().rerank, rerank > 0);
    DeviceFloats dq(q), dqs(qs), dout(q.size());
    dout.poison();
    dec.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), dout.ptr(), nullptr);
    const auto out = dout.get();
    EXPECT_EQ(dec.error_flags(), 0u);
    if (keys != DType::F32) {
      outs.push_back(out);
      fars.push_back(dec.far_sizes());
      three_counts = dec.exact_counts();
      continue;
    }
    for (int b = 0; b < B; ++b)
      for (int qh = 0; qh < Hq; ++qh) {
        std::vector<double> ref(cpu_out.begin() + (size_t(b) * Hq + qh) * D, cpu_out.begin() + (size_t(b) * Hq + qh + 1) * D);
        EXPECT_LT(rel_error(out.data() + (size_t(b) * Hq + qh) * D, ref), 5e-3) << "b=" << b << " q head " << qh;
      }
    if (!index.hierarchical()) continue;
    // Two levels: the far field holds every unselected coarse cluster, and fine clusters only
    // under selected coarse ones; selected and far tokens never overlap.
    const auto far = dec.far_sizes();
    for (int e = 0; e < B * Hkv; ++e) {
      const auto& x = entries[size_t(e)];
      const int64_t c0 = index.entry_first_cluster(e);
      for (int i = 0; i < x.num_coarse(); ++i) {
        const bool coarse_far = far[size_t(c0 + i)] > 0;
        EXPECT_TRUE(!coarse_far || far[size_t(c0 + i)] == x.coarse_sizes[size_t(i)]);
        for (int k = x.coarse_child_offsets[size_t(i)]; k < x.coarse_child_offsets[size_t(i) + 1]; ++k)
          if (coarse_far) {
            EXPECT_EQ(far[size_t(c0 + x.num_coarse() + x.coarse_children[size_t(k)])], 0) << "entry " << e << " coarse " << i;
          }
      }
    }
    // The selection's algorithms (one warp walking or sorting the greedy order; block-wide
    // radix select + a walked or sorted tail), the hand-over between them (precheck off: the
    // walk runs its picks first; on: straight to the radix path when many clusters are
    // tiny), and candidate logits read back from global memory instead of shared memory give
    // the same step, bit for bit.
    const auto counts = dec.exact_counts();
    for (const auto& [warp_max, warp_steps, cache, precheck, sort] :
         {std::tuple{0, 64, 1 << 30, true, 0}, std::tuple{256, 2, 1 << 30, false, 0},
          std::tuple{256, 1, 1 << 30, false, 0}, std::tuple{256, 2, 1 << 30, true, 0},
          std::tuple{256, 8, 1 << 30, true, 0}, std::tuple{256, 64, 1 << 30, false, 0},
          std::tuple{256, 64, 5, true, 0}, std::tuple{0, 64, 0, true, 0}, std::tuple{256, 24, 1 << 30, true, 1},
          std::tuple{256, 2, 1 << 30, false, 1}, std::tuple{256, 24, 5, true, 2}}) {
      SCOPED_TRACE(::testing::Message() << "warp_max=" << warp_max << " warp_steps=" << warp_steps
                                        << " cand_cache=" << cache << " precheck=" << precheck << " sort=" << sort);
      dec.set_select_options(warp_max, warp_steps, cache, precheck, sort);
      DeviceFloats dout2(q.size());
      dout2.poison();
      dec.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), dout2.ptr(), nullptr);
      const auto out2 = dout2.get();
      EXPECT_EQ(dec.far_sizes(), far);
      EXPECT_EQ(dec.exact_counts(), counts);
      for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out2[i], out[i]) << "element " << i;
    }
  }
  if (keys == DType::F32) return;
  const bool one_level_fits = index.hierarchical() || index.max_clusters() <= 2048;
  bool one_launch = G <= 4 && D == 128 && keys == kv && budget <= 128 && pow2_pages && one_level_fits && rerank <= 512;
  if (one_launch && far_real) {
    // At real positions the one-launch step takes no fallback: over 512 candidates, three kernels.
    CudaDecoder probe(ac);
    probe.set_fused_waves(waves);
    probe.plan(su.dev, su.cache.seqs, &index);
    if (probe.plan_info().fused_candidate_bound > 512) {
      EXPECT_FALSE(probe.plan_info().fused);
      EXPECT_STREQ(probe.plan_info().fused_why, "far field at real positions over 512 candidates");
      one_launch = false;
    }
  }
  if (expect_one_launch >= 0) {
    EXPECT_EQ(one_launch, expect_one_launch == 1) << "the case was meant to compare the one-launch step";
  }
  if (one_launch) {
    // The one-launch step on the same index and queries.
    CudaDecoder dec(ac);
    dec.set_fused_waves(waves);
    dec.set_record_far_sizes(true);
    dec.plan(su.dev, su.cache.seqs, &index);
    ASSERT_TRUE(dec.plan_info().fused) << dec.plan_info().fused_why;
    if (rerank) {  // re-ranking in one launch can be turned off (A/B against three kernels)
      CudaDecoder three(ac);
      three.set_fused_waves(waves);
      three.set_fused_rerank(false);
      three.plan(su.dev, su.cache.seqs, &index);
      EXPECT_FALSE(three.plan_info().fused);
      EXPECT_STREQ(three.plan_info().fused_why,
                   "re-ranking in one launch is off (MULTIPOLE_FUSED_RERANK=0 or set_fused_rerank(false))");
    }
    if (waves != CudaDecoder::kFusedWaves) {
      EXPECT_GT(B * Hkv, dec.plan_info().fused_clusters_at_once) << "the case must hold more clusters than run at once";
    }
    EXPECT_EQ(dec.plan_info().fused_fallback, dec.plan_info().fused_candidate_bound > 512);
    EXPECT_EQ(dec.multipole_launches(), dec.plan_info().fused_fallback ? 3 + (rerank ? 1 : 0) : 1);
    DeviceFloats dq(q), dqs(qs), dout(q.size());
    dout.poison();
    dec.clear_error_flags();
    dec.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), dout.ptr(), nullptr);
    EXPECT_EQ(dec.error_flags(), 0u);
    outs.push_back(dout.get());
    fars.push_back(dec.far_sizes());
    EXPECT_EQ(dec.exact_counts(), three_counts);
    // The first key slices staged at the kernel's entry from the plan's counts (the default, up to
    // 16 entries), not ahead, or ahead from counts one short (every entry staged again); and the
    // default without recording the far sizes (ahead -1), where far_sizes() refuses: one step each.
    for (const int ahead : {0, 2, -1}) {
      CudaDecoder other(ac);
      other.set_fused_waves(waves);
      if (ahead >= 0) other.set_fused_stage_ahead(ahead), other.set_record_far_sizes(true);
      other.plan(su.dev, su.cache.seqs, &index);
      DeviceFloats aout(q.size());
      aout.poison();
      other.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), aout.ptr(), nullptr);
      EXPECT_EQ(other.error_flags(), 0u);
      EXPECT_EQ(other.exact_counts(), three_counts);
      if (ahead >= 0) EXPECT_EQ(other.far_sizes(), fars.back());
      else EXPECT_THROW(other.far_sizes(), Error);
      const auto direct = outs.back(), a = aout.get();
      for (size_t i = 0; i < direct.size(); ++i)  // (as below: the kernels behind a fallback are not bitwise)
        ASSERT_NEAR(a[i], direct[i], 1e-6f * (1.0f + std::fabs(direct[i]))) << "stage ahead " << ahead << ", element " << i;
    }
    if (fallbacks) {
      *fallbacks = dec.fused_fallbacks();
      // The step's launches without programmatic dependent launch, and replayed from a graph
      // three times back to back (each step's one-launch kernel rewrites the flags): the same step.
      CudaDecoder plain(ac);
      plain.set_pdl(false);
      plain.set_fused_waves(waves);
      plain.plan(su.dev, su.cache.seqs, &index);
      DeviceFloats pout(q.size()), gout(q.size());
      pout.poison();
      plain.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), pout.ptr(), nullptr);
      EXPECT_EQ(plain.fused_fallbacks(), *fallbacks);
      gout.poison();
      replay_in_graph([&](cudaStream_t s) { dec.multipole(su.dev, 0, index, dq.ptr(), dqs.ptr(), gout.ptr(), s); }, 3);
      EXPECT_EQ(dec.fused_fallbacks(), *fallbacks);
      EXPECT_EQ(dec.far_sizes(), fars.back());
      EXPECT_EQ(dec.error_flags(), 0u);
      const auto direct = outs.back(), p = pout.get(), gr = gout.get();
      for (size_t i = 0; i < direct.size(); ++i) {  // (the far field's shared float atomics: not bitwise)
        ASSERT_NEAR(p[i], direct[i], 1e-6f * (1.0f + std::fabs(direct[i]))) << "no PDL, element " << i;
        ASSERT_NEAR(gr[i], direct[i], 1e-6f * (1.0f + std::fabs(direct[i]))) << "graph, element " << i;
      }
    }
  } else {
    // Outside its limits the plan keeps three launches and says why.
    CudaDecoder dec(ac);
    dec.plan(su.dev, su.cache.seqs, &index);
    EXPECT_FALSE(dec.plan_info().fused);
    EXPECT_STRNE(dec.plan_info().fused_why, "");
    if (rerank > 512) {
      EXPECT_STREQ(dec.plan_info().fused_why, "re-ranking over 512 tokens");
    } else if (!pow2_pages) {
      EXPECT_STREQ(dec.plan_info().fused_why, "page size not a power of two");
    } else if (!one_level_fits) {
      EXPECT_STREQ(dec.plan_info().fused_why, "one level of over 2048 clusters in an entry");
    }
    EXPECT_EQ(dec.multipole_launches(), 3 + (far_real ? 1 : 0) + (rerank ? 1 : 0));
  }
  // (One level outside the one-launch step's limits: the three-kernel step alone, nothing to compare.)
  ASSERT_GE(outs.size(), index.hierarchical() ? 2u : 1u);
  for (size_t k = 1; k < outs.size(); ++k) {
    SCOPED_TRACE(!index.hierarchical() ? "one launch against three"
                 : k == 1             ? "prescored against not"
                                      : "one launch against prescored");
    EXPECT_EQ(fars[k - 1], fars[k]);
    for (int b = 0; b < B; ++b)
      for (int qh = 0; qh < Hq; ++qh) {
        const size_t o = (size_t(b) * Hq + qh) * D;
        const std::vector<double> ref(outs[k - 1].begin() + o, outs[k - 1].begin() + o + D);
        EXPECT_LT(rel_error(outs[k].data() + o, ref), 1e-5) << "b=" << b << " q head " << qh;
      }
  }
}

TEST(CudaMultipole, MatchesCpuMultipolePolicy) {
  REQUIRE_GPU();
  compare_with_cpu_policy(4, 2, 128, {16}, 128, 0, 900);
}

TEST(CudaMultipole, TwoLevelsMatchCpuMultipolePolicy) {
  REQUIRE_GPU();
  compare_with_cpu_policy(4, 2, 128, {16, 128}, 128, 0, 901);     // default coarse budget (16 x budget)
  compare_with_cpu_policy(4, 2, 128, {16, 128}, 64, 512, 902);    // few coarse clusters expanded
  compare_with_cpu_policy(5, 1, 64, {8, 64}, 48, 256, 903);        // odd group, d 64
  compare_with_cpu_policy(8, 2, 128, {16, 128}, 100000, 0, 904);  // everything selected: exact
}

// The far field at real positions (AttentionConfig::far_field_real_positions) against the CPU
// policy with it: f32 centroids (the CPU's to rounding) at one and two levels, an odd group at d
// 64, clusters of 2 tokens with an empty one; 16-bit centroids (prescored or not: the same step;
// against the CPU policy's errors: test_cuda_attention_policy) at two levels with a coarse budget
// over 512 candidates (three kernels) and under (one launch against three, with three heads a
// group), and at one level (one launch against three).
TEST(CudaMultipole, FarFieldAtRealPositionsMatchesTheCpuPolicy) {
  REQUIRE_GPU();
  const auto k = CudaDecoder::kFusedWaves;
  compare_with_cpu_policy(4, 2, 128, {16}, 128, 0, 960, DType::F32, DType::BF16, true, false, nullptr, 16, k, true);
  compare_with_cpu_policy(4, 2, 128, {16, 128}, 128, 0, 961, DType::F32, DType::BF16, true, false, nullptr, 16, k, true);
  compare_with_cpu_policy(5, 1, 64, {8, 64}, 48, 256, 962, DType::F32, DType::F16, true, false, nullptr, 16, k, true);
  compare_with_cpu_policy(4, 2, 128, {16, 64}, 128, 0, 963, DType::BF16, DType::BF16, true, false, nullptr, 16, k, true);
  compare_with_cpu_policy(4, 2, 128, {2}, 128, 0, 964, DType::F32, DType::F16, true, true, nullptr, 16, k, true);
  compare_with_cpu_policy(3, 2, 128, {16, 64}, 64, 256, 965, DType::F16, DType::F16, true, false, nullptr, 16, k, true, 1);
  compare_with_cpu_policy(4, 2, 128, {16}, 128, 0, 966, DType::BF16, DType::BF16, true, false, nullptr, 16, k, true, 1);
}

// Re-ranking (AttentionConfig::rerank_tokens) against the CPU policy with it: f32 centroids at
// one and two levels, an odd group at d 64 with an f16 cache, squeezed, clusters of 2 tokens with
// an empty one; 16-bit centroids with empty clusters at two levels (prescored or not: the same
// step). Each case first checks that re-ranking changes the CPU's output beyond the tolerance.
TEST(CudaMultipole, RerankMatchesTheCpuPolicy) {
  REQUIRE_GPU();
  const auto k = CudaDecoder::kFusedWaves;
  compare_with_cpu_policy(4, 2, 128, {16}, 64, 0, 970, DType::F32, DType::BF16, true, false, nullptr, 16, k, false, 0, 256);
  compare_with_cpu_policy(4, 2, 128, {16, 128}, 64, 512, 971, DType::F32, DType::BF16, true, false, nullptr, 16, k,
                          false, 0, 256);
  compare_with_cpu_policy(5, 1, 64, {8, 64}, 48, 256, 972, DType::F32, DType::F16, true, false, nullptr, 16, k, false, 0,
                          200);
  compare_with_cpu_policy(4, 2, 128, {16}, 64, 0, 973, DType::F32, DType::BF16, false, false, nullptr, 16, k, false, 0,
                          256);
  compare_with_cpu_policy(4, 2, 128, {2}, 32, 0, 974, DType::F32, DType::F16, true, true, nullptr, 16, k, false, 0, 100);
  compare_with_cpu_policy(4, 2, 128, {16, 64}, 64, 0, 975, DType::BF16, DType::BF16, true, true, nullptr, 16, k, false, 1,
                          512);
}

TEST(CudaMultipole, TwoLevelsCandidatesOnTensorCores) {
  REQUIRE_GPU();
  compare_with_cpu_policy(4, 2, 128, {16, 64}, 128, 0, 905, DType::BF16);
  compare_with_cpu_policy(5, 1, 64, {8, 64}, 48, 256, 906, DType::BF16);   // odd group, d 64
  compare_with_cpu_policy(16, 1, 128, {16, 64}, 64, 512, 907, DType::BF16);  // two n-tiles of heads
}

// The one-launch step (fused_step.cuh) against the three-kernel one, one gtest case per index
// and query set, so that a sanitizer runs each in its own process (a racecheck of all of them in
// one process ran past 540 s). Two levels: every group size it holds, bf16 and f16, budgets and
// coarse budgets, squeezed, empty clusters, and pages of 12 tokens (three launches: the one-launch
// step addresses rows by shifts). One level: the same, and clusters of 3 tokens (up to ~1600 an
// entry, a long greedy walk) and of 2 (over its 2048 in the long sequence's entries at full scale:
// three launches there).
namespace {
struct OneLaunchCase {
  std::string name;
  int G;
  std::vector<int> tokens_per_centroid;
  int budget, coarse_budget;
  uint32_t seed;
  DType kv = DType::BF16;
  bool far_field = true, empties = false;
  int page = 16, kv_heads = 2;
  int rerank = 0;  // AttentionConfig::rerank_tokens
};

class CudaMultipoleOneLaunch : public ::testing::TestWithParam<OneLaunchCase> {};

TEST_P(CudaMultipoleOneLaunch, MatchesTheThreeKernelStep) {
  REQUIRE_GPU();
  const OneLaunchCase& c = GetParam();
  compare_with_cpu_policy(c.G, c.kv_heads, 128, c.tokens_per_centroid, c.budget, c.coarse_budget, c.seed, c.kv, c.kv,
                          c.far_field, c.empties, nullptr, c.page, CudaDecoder::kFusedWaves, false, c.rerank > 0 ? 1 : -1,
                          c.rerank);
}

void PrintTo(const OneLaunchCase& c, std::ostream* os) { *os << c.name; }  // also the case's gtest name
}  // namespace

INSTANTIATE_TEST_SUITE_P(
    TwoLevelsInOneLaunch, CudaMultipoleOneLaunch,
    ::testing::Values(OneLaunchCase{"G1", 1, {16, 64}, 128, 0, 910}, OneLaunchCase{"G2", 2, {16, 64}, 128, 0, 911},
                      OneLaunchCase{"G3", 3, {16, 64}, 128, 0, 912}, OneLaunchCase{"G4", 4, {16, 64}, 128, 0, 913},
                      OneLaunchCase{"F16ThreeHeadsCoarseBudget512", 4, {16, 64}, 64, 512, 914, DType::F16, true, false, 16, 3},
                      OneLaunchCase{"Squeezed", 4, {8, 128}, 128, 0, 915, DType::BF16, false},
                      OneLaunchCase{"F16CoarseBudget1024", 2, {16, 32}, 32, 1024, 916, DType::F16},
                      OneLaunchCase{"EmptyClusters", 4, {16, 64}, 128, 0, 917, DType::BF16, true, true},
                      OneLaunchCase{"PagesOf12ThreeLaunches", 4, {16, 64}, 128, 0, 918, DType::BF16, true, false, 12}),
    ::testing::PrintToStringParamName());

INSTANTIATE_TEST_SUITE_P(
    OneLevelInOneLaunch, CudaMultipoleOneLaunch,
    ::testing::Values(OneLaunchCase{"G1", 1, {16}, 128, 0, 930}, OneLaunchCase{"G2", 2, {16}, 128, 0, 931},
                      OneLaunchCase{"G3", 3, {16}, 128, 0, 932}, OneLaunchCase{"G4", 4, {16}, 128, 0, 933},
                      OneLaunchCase{"F16ThreeHeadsBudget64", 4, {16}, 64, 0, 934, DType::F16, true, false, 16, 3},
                      OneLaunchCase{"Squeezed", 4, {8}, 128, 0, 935, DType::BF16, false},
                      OneLaunchCase{"F16ClustersOf3", 3, {3}, 128, 0, 936, DType::F16},
                      OneLaunchCase{"ClustersOf2", 4, {2}, 128, 0, 937},
                      OneLaunchCase{"EmptyClusters", 4, {16}, 128, 0, 938, DType::BF16, true, true}),
    ::testing::PrintToStringParamName());

// Re-ranking inside the one-launch step (cluster_rerank.cuh) against the three-kernel step's
// re-ranking launch, which RerankMatchesTheCpuPolicy holds to the CPU policy: one and two levels,
// 512 tokens' picks (every row slot of the cluster), f16 with three heads, squeezed, empty
// clusters, clusters of 3 (over 128 picks: the listing past the selection's default), and a
// coarse budget whose long entries list over 512 candidates (left to the kernels behind, which
// re-rank in their own launch). Each case first checks on the CPU that re-ranking changes it.
INSTANTIATE_TEST_SUITE_P(
    RerankInOneLaunch, CudaMultipoleOneLaunch,
    ::testing::Values(
        OneLaunchCase{"OneLevel512", 4, {16}, 128, 0, 980, DType::BF16, true, false, 16, 2, 512},
        OneLaunchCase{"OneLevelF16ThreeHeads", 3, {16}, 64, 0, 981, DType::F16, true, false, 16, 2, 256},
        OneLaunchCase{"OneLevelSqueezed", 4, {8}, 64, 0, 982, DType::BF16, false, false, 16, 2, 256},
        OneLaunchCase{"OneLevelClustersOf3", 4, {3}, 64, 0, 983, DType::BF16, true, false, 16, 2, 512},
        OneLaunchCase{"TwoLevels512", 4, {16, 64}, 128, 0, 984, DType::BF16, true, false, 16, 2, 512},
        OneLaunchCase{"TwoLevelsF16G2", 2, {16, 64}, 64, 512, 985, DType::F16, true, false, 16, 2, 256},
        OneLaunchCase{"TwoLevelsEmptyClusters", 4, {16, 64}, 64, 0, 986, DType::BF16, true, true, 16, 2, 256},
        OneLaunchCase{"TwoLevelsSqueezed", 4, {8, 128}, 64, 0, 987, DType::BF16, false, false, 16, 2, 256},
        OneLaunchCase{"TwoLevelsLongListsLeftBehind", 4, {2, 64}, 64, 2048, 988, DType::BF16, true, false, 16, 2, 256}),
    ::testing::PrintToStringParamName());

// More entries than the one-launch step's clusters the GPU holds at once (3 sequences x 40 KV
// heads; 10 at the sanitizers' small scale, still over what runs at once, which the comparison
// checks): the clusters past them run as the first end, and the step is still the three-kernel one.
// One test a level, so that the sanitizer script can run each in its own process.
// (compute-sanitizer synccheck reports divergent warps at this launch's barriers; so it does for a
// kernel without divergent code whose clusters run in waves: the tool's, gpu-notes item 48.)
const int kWavesKvHeads = small_scale() ? 10 : 40;

TEST(CudaMultipole, OneLevelInWaves) {
  REQUIRE_GPU();
  compare_with_cpu_policy(4, kWavesKvHeads, 128, {16}, 128, 0, 940, DType::BF16, DType::BF16, true, false, nullptr, 16,
                          0);
}

TEST(CudaMultipole, TwoLevelsInWaves) {
  REQUIRE_GPU();
  std::vector<int32_t> left;  // the long sequence's entries left to the kernels behind
  compare_with_cpu_policy(4, kWavesKvHeads, 128, {2, 64}, 128, 2048, 941, DType::BF16, DType::BF16, true, false, &left,
                          16, 0);
  std::vector<int32_t> expected(size_t(3 * kWavesKvHeads), 0);  // entries (b, h) = b * kWavesKvHeads + h
  std::fill(expected.begin(), expected.begin() + kWavesKvHeads, 1);
  EXPECT_EQ(left, expected);
}

// Fine clusters of 2 tokens under a coarse budget of 2048: the long sequence's entries list
// over 512 candidates, the shorter ones fewer. The one-launch step leaves the former to the
// selection and attention kernels launched behind it, and the step still equals the three-kernel
// one.
TEST(CudaMultipole, OneLaunchLeavesLongCandidateListsToTheKernelsBehind) {
  REQUIRE_GPU();
  for (const DType kv : {DType::BF16, DType::F16}) {
    std::vector<int32_t> left;
    compare_with_cpu_policy(4, 2, 128, {2, 64}, 128, 2048, 920, kv, kv, true, false, &left);
    ASSERT_EQ(left.size(), 6u);
    // Entries (b, h) = b * 2 + h: the 1500- or 5000-token sequence's both heads, no others.
    EXPECT_EQ(left, (std::vector<int32_t>{1, 1, 0, 0, 0, 0})) << dtype_name(kv);
  }
}

TEST(CudaRuntime, RejectsBadInput) {
  // Runs without a GPU too: checks happen before any device call where possible.
  AttentionConfig ac = make_config(4, 2, 96);
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  EXPECT_THROW(CudaDecoder{ac}, Error);
  HostClusterLevel bad;
  bad.clustered_end = 10;
  bad.sizes = {2};
  bad.member_offsets = {0, 2};
  bad.members = {1, 11};  // 11 is outside the clustered region
  bad.key_centroids.assign(64, 0.0f);
  bad.value_centroids.assign(64, 0.0f);
  std::vector<HostClusterLevel> entries{bad};
  EXPECT_THROW(DeviceClusterIndex(64, 1, DType::F32, DType::BF16, entries), Error);
  // A coarse cluster whose size is not its children's total.
  HostClusterLevel two;
  two.clustered_end = 10;
  two.sizes = {2, 3};
  two.member_offsets = {0, 2, 5};
  two.members = {1, 2, 3, 4, 5};
  two.key_centroids.assign(128, 0.0f);
  two.value_centroids.assign(128, 0.0f);
  two.coarse_sizes = {4};
  two.coarse_child_offsets = {0, 2};
  two.coarse_children = {0, 1};
  two.coarse_key_centroids.assign(64, 0.0f);
  two.coarse_value_centroids.assign(64, 0.0f);
  entries = {two};
  EXPECT_THROW(DeviceClusterIndex(64, 1, DType::F32, DType::BF16, entries), Error);
  two.coarse_sizes = {5};
  two.coarse_children = {0, 0};  // a child listed twice
  entries = {two};
  EXPECT_THROW(DeviceClusterIndex(64, 1, DType::F32, DType::BF16, entries), Error);
  two.coarse_children = {0, 1};
  entries = {two};
  EXPECT_NO_THROW(DeviceClusterIndex(64, 1, DType::F32, DType::BF16, entries));
  // A centroid that is not finite (the one-launch step reads every coarse value centroid).
  for (std::vector<float>* v : {&two.key_centroids, &two.value_centroids, &two.coarse_key_centroids,
                                &two.coarse_value_centroids}) {
    const float was = (*v)[5];
    (*v)[5] = std::nanf("");
    entries = {two};
    try {
      DeviceClusterIndex index(64, 1, DType::F32, DType::BF16, entries);
      ADD_FAILURE() << "a NaN centroid was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not finite"), std::string::npos) << e.what();
    }
    (*v)[5] = was;
  }
}
