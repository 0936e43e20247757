#pragma once
// Rotary position embedding in the Hugging Face "rotate half" layout (Llama, Qwen): channel
// i pairs with channel i + rotary_dim/2. Positions are real numbers so that a centroid can be
// rotated to its members' mean position. Rotation is additive in position, so
// rotate(rotate(x, a), b) == rotate(x, a + b) for every scaling kind.
#include <string>
#include <vector>

namespace multipole {

struct RopeConfig {
  enum class Scaling { None, Linear, Llama3, Yarn };
  double theta = 10000.0;
  int head_dim = 128;
  int rotary_dim = 0;  // 0: the whole head
  Scaling scaling = Scaling::None;
  double factor = 1.0;                           // linear, llama3, yarn
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  double original_max_position = 8192;           // llama3, yarn
  double beta_fast = 32.0, beta_slow = 1.0;      // yarn
  double attention_factor = 0.0;                 // yarn; 0: 0.1 ln(factor) + 1
};

class Rope {
 public:
  Rope() : Rope(RopeConfig{}) {}
  explicit Rope(const RopeConfig& config);

  const RopeConfig& config() const { return config_; }
  int head_dim() const { return config_.head_dim; }
  // Angular frequency of pair i, i in [0, rotary_dim/2).
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  // Magnitude factor applied to cos/sin (yarn's attention factor; 1 otherwise).
  float magnitude() const { return magnitude_; }

  // Rotates x[head_dim] in place to `position` (applies the magnitude factor too).
  void apply(float* x, double position) const;
  // Exact inverse of apply (divides the magnitude back out).
  void apply_inverse(float* x, double position) const;
  // Pure rotation by `delta` positions, magnitude unchanged: moves an already rotated vector
  // from position p to p + delta. rotate_by(k, -p) takes a cached key back to position 0, the
  // space keys are clustered in.
  void rotate_by(float* x, double delta) const { rotate(x, delta, 1.0f); }
  // Rotates `count` vectors of head_dim floats, vector j to position first + j.
  void apply_range(float* x, int count, double first) const;

 private:
  void rotate(float* x, double angle_scale, float magnitude) const;
  RopeConfig config_;
  std::vector<double> inv_freq_;
  float magnitude_ = 1.0f;
};

}  // namespace multipole
