#pragma once
// How far a candidate's outputs are from dense attention's: next-token KL divergence and
// top-1 agreement of two logit vectors, and the relative error of two attention outputs.
// Everything in f64 so that tiny divergences (1e-6 nats) are not rounding noise.
#include <cstdint>
#include <span>

namespace multipole::eval {

// KL(P_ref || P_cand) in nats, P = softmax(logits), both [vocab]. Exact log-softmax in f64;
// clamped at 0 (it is >= 0 mathematically; rounding can give -1e-17).
double kl_divergence(std::span<const float> ref_logits, std::span<const float> cand_logits);

// Index of the largest logit (the lowest index among ties).
int32_t argmax(std::span<const float> logits);

// ||approx - exact||_2 / ||exact||_2 over the whole vector; 0 when both are zero, +inf when
// only `exact` is.
double relative_error(std::span<const float> approx, std::span<const float> exact);

}  // namespace multipole::eval
