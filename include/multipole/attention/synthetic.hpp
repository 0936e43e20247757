#pragma once
// Synthetic attention traces shaped like real ones, for trying the policies without a model
// and for benchmarks. Per KV head, keys (before RoPE) form clusters of skewed sizes (Zipf)
// and arrive in runs (a token tends to stay in its predecessor's cluster, as text stays on a
// topic); most of a key's energy sits in the low-frequency RoPE channels, which survive
// rotation over long distances, as in real models. Each query aligns with the keys of a few
// random earlier tokens (so, a little less, with their clusters): attention is peaked on a
// small set of keys and spills over onto their clusters.
// Deterministic: the same parameters give the same trace on every machine.
#include <cstdint>

#include "multipole/io/trace.hpp"

namespace multipole {

struct SyntheticTraceParams {
  int64_t tokens = 4096;     // N: keys (prompt + generated)
  int64_t generated = 128;   // T: queries, for the last T tokens
  int num_q_heads = 8;
  int num_kv_heads = 2;
  int head_dim = 64;
  int clusters = 64;         // key clusters per KV head
  double spread = 0.35;      // within-cluster key noise relative to the cluster centre
  double skew = 1.1;         // Zipf exponent of cluster popularity (0: equal)
  double stickiness = 0.8;   // probability that a token stays in its predecessor's cluster
  int focus = 2;             // earlier tokens each query aligns with
  double sharpness = 2.0;    // scaled logit of an aligned key (before RoPE) minus ln(keys visible)
  bool random_queries = false;  // queries of plain noise instead (a flat-attention control)
  double rope_theta = 10000;
  uint64_t seed = 0;

  // Throws multipole::Error naming the first invalid field.
  void validate() const;
};

// Returns a validated trace: q [T, Hq, d], k and v [N, Hkv, d], rope_theta as given, and
// metadata "synthetic" describing the parameters.
Trace make_synthetic_trace(const SyntheticTraceParams& params);

}  // namespace multipole
