#include "multipole/attention/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "multipole/core/error.hpp"

namespace multipole {

Rope::Rope(const RopeConfig& config) : config_(config) {
  auto& c = config_;
  if (c.rotary_dim == 0) c.rotary_dim = c.head_dim;
  MP_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "rope: head_dim {} must be positive and even", c.head_dim);
  MP_CHECK(c.rotary_dim > 0 && c.rotary_dim % 2 == 0 && c.rotary_dim <= c.head_dim,
           "rope: rotary_dim {} must be even and in (0, head_dim={}]", c.rotary_dim, c.head_dim);
  MP_CHECK(std::isfinite(c.theta) && c.theta > 1.0, "rope: rope_theta {} must be finite and > 1", c.theta);
  MP_CHECK(std::isfinite(c.factor) && c.factor > 0, "rope: scaling factor {} must be finite and > 0", c.factor);
  const int half = c.rotary_dim / 2;
  inv_freq_.resize(half);
  for (int i = 0; i < half; ++i) inv_freq_[i] = std::pow(c.theta, -2.0 * i / c.rotary_dim);

  constexpr double two_pi = 2 * std::numbers::pi;
  switch (c.scaling) {
    case RopeConfig::Scaling::None: break;
    case RopeConfig::Scaling::Linear:
      for (double& f : inv_freq_) f /= c.factor;
      break;
    case RopeConfig::Scaling::Llama3: {
      MP_CHECK(c.high_freq_factor > c.low_freq_factor, "rope llama3: high_freq_factor {} must exceed low_freq_factor {}",
               c.high_freq_factor, c.low_freq_factor);
      const double low_wavelen = c.original_max_position / c.low_freq_factor;
      const double high_wavelen = c.original_max_position / c.high_freq_factor;
      for (double& f : inv_freq_) {
        double wavelen = two_pi / f;
        if (wavelen > low_wavelen) {
          f /= c.factor;
        } else if (wavelen >= high_wavelen) {
          double smooth = (c.original_max_position / wavelen - c.low_freq_factor) /
                          (c.high_freq_factor - c.low_freq_factor);
          f = (1 - smooth) * f / c.factor + smooth * f;
        }
      }
      break;
    }
    case RopeConfig::Scaling::Yarn: {
      auto correction_dim = [&](double rotations) {
        return c.rotary_dim * std::log(c.original_max_position / (rotations * two_pi)) / (2 * std::log(c.theta));
      };
      double low = std::max(0.0, std::floor(correction_dim(c.beta_fast)));
      double high = std::min(double(c.rotary_dim - 1), std::ceil(correction_dim(c.beta_slow)));
      if (low == high) high += 0.001;
      for (int i = 0; i < half; ++i) {
        double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        double extrapolation = 1.0 - ramp;
        double interpolated = inv_freq_[i] / c.factor;
        inv_freq_[i] = interpolated * (1 - extrapolation) + inv_freq_[i] * extrapolation;
      }
      magnitude_ = float(c.attention_factor > 0 ? c.attention_factor : 0.1 * std::log(c.factor) + 1.0);
      break;
    }
  }
}

void Rope::rotate(float* x, double position, float magnitude) const {
  const int half = config_.rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    double angle = position * inv_freq_[i];
    float c = float(std::cos(angle)) * magnitude, s = float(std::sin(angle)) * magnitude;
    float a = x[i], b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

void Rope::apply(float* x, double position) const { rotate(x, position, magnitude_); }

void Rope::apply_inverse(float* x, double position) const { rotate(x, -position, 1.0f / magnitude_); }

void Rope::apply_range(float* x, int count, double first) const {
  for (int j = 0; j < count; ++j) apply(x + size_t(j) * config_.head_dim, first + j);
}

}  // namespace multipole
