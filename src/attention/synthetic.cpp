#include "multipole/attention/synthetic.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "multipole/core/error.hpp"

namespace multipole {

namespace {

// SplitMix64 + Box-Muller: the standard library's distributions differ between
// implementations, and traces must be the same everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  int64_t below(int64_t n) { return int64_t(uniform() * double(n)); }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u = 1.0 - uniform(), v = uniform();  // u in (0, 1]
    double r = std::sqrt(-2.0 * std::log(u));
    spare_ = r * std::sin(2 * std::numbers::pi * v);
    has_spare_ = true;
    return r * std::cos(2 * std::numbers::pi * v);
  }

 private:
  uint64_t state_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace

void SyntheticTraceParams::validate() const {
  MP_CHECK(tokens >= 1, "synthetic trace: tokens {} must be >= 1", tokens);
  MP_CHECK(generated >= 1 && generated <= tokens, "synthetic trace: generated {} must be in [1, tokens={}]", generated,
           tokens);
  MP_CHECK(num_kv_heads >= 1 && num_kv_heads <= 256, "synthetic trace: kv heads {} must be in [1, 256]", num_kv_heads);
  MP_CHECK(num_q_heads >= 1 && num_q_heads <= 1024 && num_q_heads % num_kv_heads == 0,
           "synthetic trace: q heads {} must be a multiple of kv heads {} in [1, 1024]", num_q_heads, num_kv_heads);
  MP_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 1024,
           "synthetic trace: head dim {} must be even and in [2, 1024]", head_dim);
  constexpr int64_t kMaxValues = int64_t(1) << 31;
  MP_CHECK(tokens <= kMaxValues / (int64_t(num_kv_heads) * head_dim),
           "synthetic trace: tokens {} x kv heads {} x head dim {} exceeds the limit of {} values per tensor", tokens,
           num_kv_heads, head_dim, kMaxValues);
  MP_CHECK(clusters >= 1, "synthetic trace: clusters {} must be >= 1", clusters);
  MP_CHECK(std::isfinite(spread) && spread >= 0, "synthetic trace: spread {} must be finite and >= 0", spread);
  MP_CHECK(std::isfinite(skew) && skew >= 0, "synthetic trace: skew {} must be finite and >= 0", skew);
  MP_CHECK(stickiness >= 0 && stickiness < 1, "synthetic trace: stickiness {} must be in [0, 1)", stickiness);
  MP_CHECK(focus >= 1, "synthetic trace: focus {} must be >= 1", focus);
  MP_CHECK(std::isfinite(sharpness), "synthetic trace: sharpness {} must be finite", sharpness);
  MP_CHECK(std::isfinite(rope_theta) && rope_theta > 1, "synthetic trace: rope_theta {} must be finite and > 1",
           rope_theta);
}

Trace make_synthetic_trace(const SyntheticTraceParams& p) {
  p.validate();
  const int d = p.head_dim, half = d / 2, hkv = p.num_kv_heads, hq = p.num_q_heads, group = hq / hkv;
  const int64_t n = p.tokens, t_count = p.generated, c_count = p.clusters;
  Rng rng(p.seed);

  // Channel weights: pair i rotates with frequency theta^(-2i/d), so high i is low frequency.
  // Most energy there; normalised to mean square 1 so a centre has norm about sqrt(d).
  std::vector<float> profile(d);
  double mean_sq = 0;
  for (int i = 0; i < half; ++i) {
    double x = half > 1 ? double(i) / (half - 1) : 1.0;
    double w = 0.15 + 2.0 * x * x * x;
    profile[i] = profile[i + half] = float(w);
    mean_sq += w * w / half;
  }
  for (float& w : profile) w = float(w / std::sqrt(mean_sq));

  // Zipf popularity of the clusters, as a cumulative distribution.
  std::vector<double> cdf(c_count);
  double total = 0;
  for (int64_t c = 0; c < c_count; ++c) cdf[c] = total += std::pow(double(c + 1), -p.skew);
  auto draw_cluster = [&] {
    return int64_t(std::upper_bound(cdf.begin(), cdf.end(), rng.uniform() * total) - cdf.begin()) % c_count;
  };

  Trace t;
  t.tokens = n;
  t.generated = t_count;
  t.num_q_heads = hq;
  t.num_kv_heads = hkv;
  t.head_dim = d;
  t.rope.theta = p.rope_theta;
  t.rope.head_dim = d;
  t.k.resize(size_t(n * hkv * d));
  t.v.resize(t.k.size());
  t.q.resize(size_t(t_count * hq * d));

  std::vector<float> centres(size_t(c_count * d)), value_centres(centres.size());
  std::vector<int32_t> labels(static_cast<size_t>(n));
  for (int h = 0; h < hkv; ++h) {
    for (int64_t c = 0; c < c_count; ++c)
      for (int j = 0; j < d; ++j) {
        centres[c * d + j] = float(rng.normal()) * profile[j];
        value_centres[c * d + j] = float(rng.normal());
      }
    // Labels: runs of one cluster, restarting from the popularity distribution.
    for (int64_t i = 0; i < n; ++i) labels[i] = int32_t(i > 0 && rng.uniform() < p.stickiness ? labels[i - 1]
                                                                                            : draw_cluster());
    for (int64_t i = 0; i < n; ++i) {
      float* k = &t.k[(i * hkv + h) * d];
      float* v = &t.v[(i * hkv + h) * d];
      const float* c = &centres[labels[i] * d];
      const float* vc = &value_centres[labels[i] * d];
      for (int j = 0; j < d; ++j) {
        k[j] = c[j] + float(p.spread * rng.normal()) * profile[j];
        v[j] = vc[j] + 0.5f * float(rng.normal());
      }
    }
    // Queries of this KV head's group: aligned with the keys of `focus` earlier tokens.
    std::vector<double> dir(d);
    for (int64_t s = 0; s < t_count; ++s) {
      const int64_t pos = n - t_count + s;
      for (int g = h * group; g < (h + 1) * group; ++g) {
        float* q = &t.q[(s * hq + g) * d];
        std::fill(dir.begin(), dir.end(), 0.0);
        for (int f = 0; f < p.focus; ++f) {
          const float* c = &t.k[(rng.below(pos + 1) * hkv + h) * d];
          double norm = 0;
          for (int j = 0; j < d; ++j) norm += double(c[j]) * c[j];
          norm = std::sqrt(std::max(norm, 1e-30));
          for (int j = 0; j < d; ++j) dir[j] += c[j] / norm;
        }
        double norm = 0;
        for (double x : dir) norm += x * x;
        norm = std::sqrt(std::max(norm, 1e-30));
        // |q| = L * sqrt(focus) puts each aligned key's scaled logit near L = sharpness +
        // ln(keys visible): the background sum grows like the key count, so this keeps the
        // peak's share of the softmax the same at every length.
        const double size = (p.sharpness + std::log(double(pos + 1))) * std::sqrt(double(p.focus));
        if (p.random_queries) {
          for (int j = 0; j < d; ++j) q[j] = float(rng.normal());
          continue;
        }
        const double noise = 0.2 * size / std::sqrt(double(d));
        for (int j = 0; j < d; ++j) q[j] = float(size * dir[j] / norm + noise * rng.normal());
      }
    }
  }
  t.metadata["synthetic"] = fmt::format(
      "tokens={} generated={} q_heads={} kv_heads={} head_dim={} clusters={} spread={} skew={} stickiness={} "
      "focus={} sharpness={} random_queries={} seed={}",
      n, t_count, hq, hkv, d, c_count, p.spread, p.skew, p.stickiness, p.focus, p.sharpness, p.random_queries, p.seed);
  t.validate("synthetic trace");
  return t;
}

}  // namespace multipole
