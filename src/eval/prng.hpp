#pragma once
// The generators' random numbers: splitmix64, coded here so that a (seed, index) names the
// same problem on every platform and standard library (std:: distributions are not portable).
#include <cstdint>
#include <initializer_list>

namespace multipole::eval {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  // Mixes several values (seed, index, spec fields) into one starting state.
  static SplitMix64 from(std::initializer_list<uint64_t> parts) {
    SplitMix64 mixer(0x6d756c7469706f6cULL);  // "multipol"
    uint64_t state = 0;
    for (uint64_t part : parts) {
      mixer.state_ ^= part;
      state = mixer.next() ^ (state * 0x9e3779b97f4a7c15ULL);
    }
    return SplitMix64(state);
  }

  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi] (hi >= lo); the modulo bias is below 2^-40 for the ranges used here.
  int64_t uniform(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  // True with probability numerator / denominator.
  bool chance(int numerator, int denominator) { return uniform(1, denominator) <= numerator; }

 private:
  uint64_t state_;
};

}  // namespace multipole::eval
