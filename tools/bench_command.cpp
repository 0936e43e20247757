// `multipole bench attention`: decode-attention speed of each policy on synthetic keys with
// cluster structure, side by side with dense and with a plain memory copy in the same run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <immintrin.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "attention/decode_kernels.hpp"
#include "multipole/attention/policy.hpp"
#include "multipole/attention/rope.hpp"
#include "multipole/core/error.hpp"
#include "multipole/core/tensor.hpp"

namespace multipole::cli {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct BenchArgs {
  std::vector<int64_t> contexts = {32768, 131072};
  std::vector<int> batches = {1};
  int q_heads = 32, kv_heads = 8, head_dim = 128;
  std::string kv_dtype = "bf16";
  int budget = 128;
  std::vector<int> tokens_per_centroid = ClusterConfig{}.tokens_per_centroid;
  std::vector<std::string> policies;
  int threads = 0;
  int steps = 16;
  uint64_t seed = 1;
  bool json = false;
  std::string device = "cpu";
  int copy_mib = 512;  // memcpy buffer size (each of source and destination)
  double rope_theta = 1e6;  // Qwen3
  std::string simd = "auto";  // CPU kernels' instruction set: auto, avx2, avx512
};

// Synthetic keys: per KV head a mixture of Gaussians in pre-RoPE space (cluster centres of
// norm ~sqrt(d), within-cluster noise 0.35 of that, cluster popularity skewed), rotated to
// their positions; values are random. Queries lie near a cluster centre, so attention is
// peaked on a few clusters as in real models. Deterministic in (seed, sequence, position).
class SyntheticKV {
 public:
  SyntheticKV(int kv_heads, int q_heads, int d, double theta, uint64_t seed)
      : kv_heads_(kv_heads), q_heads_(q_heads), d_(d), rope_(RopeConfig{.theta = theta, .head_dim = d}),
        seed_(seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> dist;
    centres_.resize(size_t(kv_heads) * kClusters * d);
    for (auto& x : centres_) x = dist(rng);
  }

  // Keys and values of tokens [pos, pos + n) of sequence `seq`: [n, kv_heads, d] each.
  // The stream is seeded by (seed, seq, pos), so equal calls give equal data.
  void tokens(int seq, int64_t pos, int64_t n, float* keys, float* values) const {
    std::mt19937_64 rng(mix(seq, pos, 1));
    std::normal_distribution<float> dist;
    for (int64_t t = 0; t < n; ++t)
      for (int h = 0; h < kv_heads_; ++h) {
        const float* c = centres_.data() + (size_t(h) * kClusters + cluster(rng)) * d_;
        float* k = keys + (t * kv_heads_ + h) * d_;
        float* v = values + (t * kv_heads_ + h) * d_;
        for (int i = 0; i < d_; ++i) k[i] = c[i] + 0.35f * dist(rng);
        for (int i = 0; i < d_; ++i) v[i] = dist(rng);
        rope_.apply(k, double(pos + t));
      }
  }

  // Queries of all q heads of sequence `seq` at `pos`: [q_heads, d], rotated.
  void query(int seq, int64_t pos, float* q) const {
    std::mt19937_64 rng(mix(seq, pos, 2));
    std::normal_distribution<float> dist;
    const int G = q_heads_ / kv_heads_;
    for (int hq = 0; hq < q_heads_; ++hq) {
      const float* c = centres_.data() + (size_t(hq / G) * kClusters + cluster(rng)) * d_;
      for (int i = 0; i < d_; ++i) q[hq * d_ + i] = c[i] + 0.5f * dist(rng);
      rope_.apply(q + hq * d_, double(pos));
    }
  }

 private:
  static constexpr int kClusters = 256;
  // Skewed popularity: cluster = floor(256 * u^2).
  template <class R>
  static int cluster(R& rng) {
    double u = std::uniform_real_distribution<double>(0, 1)(rng);
    return std::min(kClusters - 1, int(kClusters * u * u));
  }
  uint64_t mix(int seq, int64_t pos, uint64_t what) const {
    return seed_ ^ (uint64_t(seq) << 48) ^ (what << 44) ^ uint64_t(pos) * 0x9e3779b97f4a7c15ull;
  }

  int kv_heads_, q_heads_, d_;
  Rope rope_;
  uint64_t seed_;
  std::vector<float> centres_;  // [kv_heads, clusters, d]
};

// Plain parallel streaming over large buffers, the references dense is measured against:
// `copy` = read+write bytes per second of memcpy; `read` = bytes per second of a vector sum.
struct Bandwidth {
  double copy = 0, read = 0;
};

Bandwidth plain_bandwidth(ThreadPool& pool, int mib) {
  const size_t bytes = size_t(mib) << 20;
  AlignedBuffer a(bytes), b(bytes);
  std::memset(a.data(), 1, bytes);
  std::memset(b.data(), 2, bytes);
  const int64_t parts = pool.size();
  std::vector<float> sums(static_cast<size_t>(parts));
  float* sink = sums.data();  // keeps the read loop
  auto median_time = [&](auto body) {
    std::vector<double> times;
    for (int rep = 0; rep < 7; ++rep) {
      auto t0 = Clock::now();
      pool.parallel_for(parts, [&](int64_t i, int) {
        const size_t lo = bytes * size_t(i) / size_t(parts) / 64 * 64, hi = bytes * size_t(i + 1) / size_t(parts) / 64 * 64;
        body(i, lo, hi);
      });
      times.push_back(seconds_since(t0));
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  };
  Bandwidth bw;
  bw.copy = 2.0 * double(bytes) / median_time([&](int64_t, size_t lo, size_t hi) {
    std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
  });
  bw.read = double(bytes) / median_time([&](int64_t i, size_t lo, size_t hi) {
    const float* p = reinterpret_cast<const float*>(a.data() + lo);
    const size_t n = (hi - lo) / 4;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t j = 0; j + 32 <= n; j += 32) {
      s0 = _mm256_add_ps(s0, _mm256_load_ps(p + j));
      s1 = _mm256_add_ps(s1, _mm256_load_ps(p + j + 8));
      s2 = _mm256_add_ps(s2, _mm256_load_ps(p + j + 16));
      s3 = _mm256_add_ps(s3, _mm256_load_ps(p + j + 24));
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    sink[i] = t[0];
  });
  return bw;
}

// The 1-minute load average (-1 where /proc/loadavg is missing): benchmarks on a shared
// machine are only comparable with it.
double load_average() {
  double load = -1;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = -1;
    std::fclose(f);
  }
  return load;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Row {
  std::string policy, skipped;
  double step_us = 0, prefill_ms = 0, update_us_per_token = 0;
  int64_t generated = 0;
  DecodeStats stats;
  Bandwidth bw;  // plain copy and read timed right after the policy's steps
};

// Copies the first n positions of `src` into the empty sequence `dst` (layer 0).
void clone_prefix(PagedKVCache& cache, SeqId src, SeqId dst, int64_t n) {
  const int H = cache.config().num_kv_heads, d = cache.config().head_dim;
  const int64_t chunk = 1024;
  std::vector<float> per_head(size_t(chunk) * d), k(size_t(chunk) * H * d), v(k.size());
  cache.extend(dst, n);
  for (int64_t p = 0; p < n; p += chunk) {
    const int64_t m = std::min(chunk, n - p);
    for (int which = 0; which < 2; ++which) {
      float* out = which == 0 ? k.data() : v.data();
      for (int h = 0; h < H; ++h) {
        if (which == 0) cache.read_keys(src, 0, h, p, m, per_head.data());
        else cache.read_values(src, 0, h, p, m, per_head.data());
        for (int64_t t = 0; t < m; ++t) std::copy_n(per_head.data() + t * d, d, out + (t * H + h) * d);
      }
    }
    cache.write(dst, 0, p, m, k.data(), v.data());
  }
}

void run_attention_bench(const BenchArgs& args) {
  MP_CHECK(args.device == "cpu" || args.device == "cuda", "bench attention: --device '{}' must be cpu or cuda",
           args.device);
  if (args.device == "cuda") {
    CudaBenchRequest r;
    r.contexts = args.contexts;
    r.batches = args.batches;
    r.q_heads = args.q_heads;
    r.kv_heads = args.kv_heads;
    r.head_dim = args.head_dim;
    r.kv_dtype = args.kv_dtype;
    r.budget = args.budget;
    r.tokens_per_centroid = args.tokens_per_centroid;
    r.steps = args.steps;
    r.seed = args.seed;
    r.json = args.json;
    return run_attention_bench_cuda(r);
  }
  MP_CHECK(!args.contexts.empty() && !args.batches.empty(), "bench attention: --context and --batch need values");
  for (int64_t c : args.contexts) MP_CHECK(c > 0, "bench attention: context {} must be > 0", c);
  for (int b : args.batches) MP_CHECK(b > 0, "bench attention: batch {} must be > 0", b);
  MP_CHECK(args.steps >= 1, "bench attention: --steps {} must be >= 1", args.steps);

  AttentionConfig config;
  config.num_q_heads = args.q_heads;
  config.num_kv_heads = args.kv_heads;
  config.head_dim = args.head_dim;
  config.rope = RopeConfig{.theta = args.rope_theta, .head_dim = args.head_dim};
  config.budget = args.budget;
  config.cluster.tokens_per_centroid = args.tokens_per_centroid;
  config.cluster.seed = args.seed;
  config.validate();
  const DType dtype = parse_dtype(args.kv_dtype, "--kv-dtype");

  std::vector<std::string> names;
  for (auto n : attention_policy_names()) names.emplace_back(n);
  std::vector<std::string> chosen = args.policies.empty() ? names : args.policies;
  for (const auto& n : chosen)
    MP_CHECK(std::find(names.begin(), names.end(), n) != names.end(),
             "bench attention: unknown policy '{}' (known: dense, multipole, squeezed, quest, oracle-topk)", n);
  // Dense first: every ratio is against it.
  std::stable_partition(chosen.begin(), chosen.end(), [](const std::string& n) { return n == "dense"; });

  if (args.simd != "auto") {
    MP_CHECK(args.simd == "avx2" || args.simd == "avx512", "bench attention: --simd '{}' is not one of auto, avx2, avx512",
             args.simd);
    set_simd_level(args.simd == "avx512" ? SimdLevel::Avx512 : SimdLevel::Avx2);
  }
  const std::string_view simd = simd_level_name(simd_level());

  ThreadPool pool(args.threads);
  std::fprintf(stderr, "measuring plain copy and read bandwidth (%d threads)...\n", pool.size());
  const Bandwidth bw = plain_bandwidth(pool, args.copy_mib);
  if (args.json) {
    json j = {{"bench", "memcpy"},       {"threads", pool.size()},     {"gb_per_s", bw.copy / 1e9}, {"simd", simd},
              {"read_gb_per_s", bw.read / 1e9}, {"load_average", load_average()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    fmt::print("attention decode, {} q heads / {} KV heads, head dim {}, kv {}, budget {}, tokens per centroid {}, "
               "{} threads, {} kernels\nplain copy (read + write): {:.2f} GB/s; plain read: {:.2f} GB/s; load average {:.2f}\n"
               "(%copy and %read: against a copy and a read timed right after each row's steps, 'copy GB/s')\n",
               args.q_heads, args.kv_heads, args.head_dim, args.kv_dtype, args.budget,
               fmt::join(args.tokens_per_centroid, ","), pool.size(), simd, bw.copy / 1e9, bw.read / 1e9, load_average());
    fmt::print("{:>8} {:>5} {:<12} {:>10} {:>8} {:>9} {:>7} {:>6} {:>6} {:>9} {:>10} {:>10} {:>8}\n", "context",
               "batch", "policy", "us/step", "x dense", "MB/step", "GB/s", "%copy", "%read", "copy GB/s", "index ms",
               "upd us/tok", "upd %");
  }
  std::fflush(stdout);

  const int W = config.cluster.window;
  const int64_t generated = std::max<int64_t>(args.steps, 2 * W);  // the update is amortised over >= 2W tokens
  const int d = args.head_dim, Hkv = args.kv_heads, Hq = args.q_heads;
  SyntheticKV data(Hkv, Hq, d, args.rope_theta, args.seed);

  for (int64_t context : args.contexts)
    for (int batch : args.batches) {
      // The prompt is generated once into template sequences; each policy runs on fresh
      // copies so that all see the same cache.
      const int64_t per_seq = context + generated + 16;
      PagedKVCache cache(KVCacheConfig{.num_layers = 1, .num_kv_heads = Hkv, .head_dim = d, .page_size = 16,
                                       .dtype = dtype, .max_tokens = 2 * batch * per_seq});
      std::vector<SeqId> prompts;
      {
        const int64_t chunk = 4096;
        std::vector<float> k(size_t(chunk) * Hkv * d), v(k.size());
        auto t0 = Clock::now();
        for (int b = 0; b < batch; ++b) {
          prompts.push_back(cache.add_sequence());
          cache.extend(prompts.back(), context);
          for (int64_t p = 0; p < context; p += chunk) {
            const int64_t n = std::min(chunk, context - p);
            data.tokens(b, p, n, k.data(), v.data());
            cache.write(prompts.back(), 0, p, n, k.data(), v.data());
            if (seconds_since(t0) > 2)
              std::fprintf(stderr, "\rwriting prompt: sequence %d/%d, %lld/%lld tokens", b + 1, batch,
                           (long long)(p + n), (long long)context);
          }
        }
        std::fprintf(stderr, "\rprompt of %lld tokens x %d written in %.1f s%20s\n", (long long)context, batch,
                     seconds_since(t0), "");
      }

      std::vector<Row> rows;
      std::vector<float> k(size_t(batch) * Hkv * d), v(k.size()), q(size_t(batch) * Hq * d), out(q.size());
      for (const auto& name : chosen) {
        Row row;
        row.policy = name;
        std::unique_ptr<AttentionPolicy> policy;
        try {
          policy = make_attention_policy(name, config);
        } catch (const Error& e) {
          row.skipped = e.what();
          std::fprintf(stderr, "skipping %s: not available in this build (%s)\n", name.c_str(), e.what());
          rows.push_back(row);
          continue;
        }
        std::vector<SeqId> seqs;
        for (int b = 0; b < batch; ++b) {
          seqs.push_back(cache.add_sequence());
          clone_prefix(cache, prompts[b], seqs.back(), context);
        }
        std::fprintf(stderr, "%s: indexing the prompt...\n", name.c_str());
        auto t0 = Clock::now();
        policy->update(cache, 0, seqs, pool);
        row.prefill_ms = seconds_since(t0) * 1e3;

        // Generation: append a token, update, decode. Decode is timed on the last `steps`.
        std::vector<double> step_s;
        double update_s = 0;
        DecodeStats sum;
        for (int64_t g = 0; g < generated; ++g) {
          for (int b = 0; b < batch; ++b) {
            const int64_t pos = cache.extend(seqs[b], 1);
            data.tokens(b, pos, 1, k.data(), v.data());
            cache.write(seqs[b], 0, pos, 1, k.data(), v.data());
            data.query(b, pos, q.data() + size_t(b) * Hq * d);
          }
          t0 = Clock::now();
          policy->update(cache, 0, seqs, pool);
          update_s += seconds_since(t0);
          if (g == generated - args.steps - 1 || (generated == args.steps && g == 0))
            policy->decode(cache, 0, seqs, q.data(), out.data(), pool);  // warm-up: scratch sized
          if (g >= generated - args.steps) {
            t0 = Clock::now();
            policy->decode(cache, 0, seqs, q.data(), out.data(), pool);
            step_s.push_back(seconds_since(t0));
            const auto& s = policy->last_stats();
            sum.exact_tokens += s.exact_tokens;
            sum.selected_tokens += s.selected_tokens;
            sum.centroids_scored += s.centroids_scored;
            sum.pseudo_tokens += s.pseudo_tokens;
            sum.bytes_read += s.bytes_read;
          }
        }
        row.step_us = median(step_s) * 1e6;
        // This VM's bandwidth drifts by tens of percent over minutes: each row's %copy and
        // %read are against a copy and read timed right after its own steps.
        row.bw = plain_bandwidth(pool, args.copy_mib);
        row.generated = generated;
        row.update_us_per_token = update_s / double(generated) * 1e6;
        row.stats = DecodeStats{sum.exact_tokens / args.steps, sum.selected_tokens / args.steps,
                                sum.centroids_scored / args.steps, sum.pseudo_tokens / args.steps,
                                sum.bytes_read / args.steps};
        for (SeqId s : seqs) {
          policy->forget(s);
          cache.free_sequence(s);
        }
        rows.push_back(row);
        std::fprintf(stderr, "%s: %.0f us per step\n", name.c_str(), row.step_us);
      }

      double dense_us = 0;
      for (const auto& r : rows)
        if (r.policy == "dense" && r.skipped.empty()) dense_us = r.step_us;
      for (const auto& r : rows) {
        const double gbs = r.step_us > 0 ? double(r.stats.bytes_read) / (r.step_us * 1e-6) / 1e9 : 0;
        const double speedup = dense_us > 0 && r.step_us > 0 ? dense_us / r.step_us : 0;
        const double update_pct = r.step_us > 0 ? 100.0 * r.update_us_per_token / r.step_us : 0;
        if (args.json) {
          json j = {{"bench", "attention"}, {"context", context}, {"batch", batch}, {"policy", r.policy},
                    {"q_heads", Hq}, {"kv_heads", Hkv}, {"head_dim", d}, {"kv_dtype", args.kv_dtype},
                    {"budget", args.budget}, {"tokens_per_centroid", args.tokens_per_centroid},
                    {"threads", pool.size()}, {"device", args.device}, {"simd", simd},
                    {"load_average", load_average()}};
          if (!r.skipped.empty()) {
            j["skipped"] = r.skipped;
          } else {
            j.update({{"us_per_step", r.step_us}, {"steps", args.steps}, {"speedup_vs_dense", speedup},
                      {"bytes_per_step", r.stats.bytes_read}, {"gb_per_s", gbs},
                      {"copy_gb_per_s", r.bw.copy / 1e9}, {"read_gb_per_s", r.bw.read / 1e9},
                      {"pct_of_copy_bandwidth", 100 * gbs * 1e9 / r.bw.copy},
                      {"pct_of_read_bandwidth", 100 * gbs * 1e9 / r.bw.read}, {"prefill_index_ms", r.prefill_ms},
                      {"update_us_per_token", r.update_us_per_token}, {"update_pct_of_step", update_pct},
                      {"generated_tokens", r.generated}, {"exact_tokens", r.stats.exact_tokens},
                      {"selected_tokens", r.stats.selected_tokens}, {"centroids_scored", r.stats.centroids_scored},
                      {"pseudo_tokens", r.stats.pseudo_tokens}});
          }
          std::printf("%s\n", j.dump().c_str());
        } else if (!r.skipped.empty()) {
          fmt::print("{:>8} {:>5} {:<12} skipped: not available ({})\n", context, batch, r.policy, r.skipped);
        } else {
          fmt::print(
              "{:>8} {:>5} {:<12} {:>10.0f} {:>8} {:>9.2f} {:>7.2f} {:>6.1f} {:>6.1f} {:>9.2f} {:>10.1f} {:>10.2f} {:>8.2f}\n",
              context, batch, r.policy, r.step_us, dense_us > 0 ? fmt::format("{:.2f}", speedup) : "-",
              double(r.stats.bytes_read) / 1e6, gbs, 100 * gbs * 1e9 / r.bw.copy, 100 * gbs * 1e9 / r.bw.read,
              r.bw.copy / 1e9, r.prefill_ms, r.update_us_per_token, update_pct);
        }
        std::fflush(stdout);
      }
    }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks (tables by default, JSON lines with --json)");
  bench->require_subcommand(1);
  auto args = std::make_shared<BenchArgs>();
  auto* cmd = bench->add_subcommand(
      "attention",
      "Decode attention per policy on synthetic keys with cluster structure (a mixture of Gaussians before RoPE,\n"
      "rotated to their positions; random values). Per context and batch size the prompt is written to a paged\n"
      "KV cache, each policy indexes it (timed: 'index ms'), then generation runs: each step appends one token\n"
      "per sequence, calls update() and decode() on one layer. Reports the median decode time per layer-step,\n"
      "its ratio to dense, bytes read per step and the resulting GB/s (also as % of a plain memcpy and of a\n"
      "plain parallel read, timed right after each policy's steps), and the online update's cost amortised over >= 2W\n"
      "generated tokens (per token and as % of the policy's step).");
  cmd->add_option("--context", args->contexts, "Prompt lengths, comma separated")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--batch", args->batches, "Batch sizes, comma separated")->delimiter(',')->capture_default_str();
  cmd->add_option("--q-heads", args->q_heads, "Query heads")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--kv-heads", args->kv_heads, "KV heads")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--head-dim", args->head_dim, "Head dimension")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--kv-dtype", args->kv_dtype, "KV cache storage: f32, f16 or bf16")->capture_default_str();
  cmd->add_option("--budget", args->budget, "Tokens per KV head chosen beyond sinks + window")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--tokens-per-centroid", args->tokens_per_centroid,
                  "Tokens per centroid of each cluster level, finest first, comma separated")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--policies", args->policies,
                  "Policies, comma separated (default: all; those not available in this build are skipped)")
      ->delimiter(',');
  cmd->add_option("--threads", args->threads, "Threads (0: one per hardware thread)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--steps", args->steps, "Timed decode steps per policy (the median is reported)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "Seed of the synthetic data and the clustering")->capture_default_str();
  cmd->add_option("--rope-theta", args->rope_theta, "RoPE theta of the synthetic keys")->capture_default_str();
  cmd->add_flag("--json", args->json, "One JSON object per line instead of a table");
  cmd->add_option("--device", args->device,
                  "cpu, or cuda (GPU build): dense, multipole (two levels), squeezed, multipole with the far field at\n"
                  "real positions (mp-far-real), multipole re-ranking 4 x budget tokens' picks (mp-rerank), the\n"
                  "multipole stages, GPU prefill k-means of the batch and multipole\n"
                  "on that index, per batch and context, on random K/V;\n"
                  "--steps timed steps (L2 flushed before each); --policies, --threads, --simd, --copy-mib and\n"
                  "--rope-theta apply to cpu only")
      ->capture_default_str();
  cmd->add_option("--simd", args->simd,
                  "CPU kernels' instruction set: auto (the best this CPU has), avx2 or avx512 (also MULTIPOLE_SIMD)")
      ->capture_default_str();
  cmd->add_option("--copy-mib", args->copy_mib, "MiB of each memcpy buffer for the plain-copy bandwidth")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  cmd->callback([args] { run_attention_bench(*args); });
}

}  // namespace multipole::cli
