#pragma once
// k-means for the cluster index: a seeded RNG, the nearest-centroid assignment (a blocked
// AVX2 [points x centroids] distance GEMM), and weighted Lloyd iterations that re-seed empty
// clusters. Deterministic: same inputs and seed give the same result on every run.
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace multipole::kmeans {

// Mixes a seed with ids (sequence, layer, head, block, ...) into an independent stream seed.
uint64_t mix_seed(uint64_t seed, std::initializer_list<uint64_t> ids);

// xoshiro256** seeded through splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  // Uniform in [0, n); n > 0.
  uint64_t below(uint64_t n);

 private:
  uint64_t s_[4];
};

// Writes k distinct values drawn uniformly from items[0, n) to out[0, k) (partial
// Fisher-Yates; items is shuffled in place). Requires 0 <= k <= n.
void sample_distinct(Rng& rng, int32_t* items, int64_t n, int64_t k, int32_t* out);

// Reused buffers of assign_nearest (centroids transposed and padded, their norms).
struct AssignScratch {
  std::vector<float> transposed;  // [d, k rounded up to 16]
  std::vector<float> norms;       // [k rounded up to 16]
};

// Nearest centroid by squared Euclidean distance, ties to the lower centroid index.
//   points:    [n, d] f32
//   centroids: [k, d] f32, k >= 1
//   labels:    [n] out
//   dist2:     [n] out, the squared distance to the chosen centroid (>= 0); may be null
// d must be a multiple of 8.
void assign_nearest(const float* points, int64_t n, const float* centroids, int64_t k, int d, int32_t* labels,
                    float* dist2, AssignScratch& scratch);

// Partial squared distances ||c_j||^2 - 2 x_i.c_j (the squared distance minus ||x_i||^2,
// enough to compare centroids for one point).
//   points: [n, d], centroids: [k, d], out: rows of `stride` floats, out[i * stride + j]
void partial_distances(const float* points, int64_t n, const float* centroids, int64_t k, int d, float* out,
                       int64_t stride, AssignScratch& scratch);

struct LloydScratch {
  AssignScratch assign;
  std::vector<double> sums;     // [k, d]
  std::vector<double> weights;  // [k]
  std::vector<int32_t> counts;  // [k]
  std::vector<float> dist2;     // [n]
  std::vector<int32_t> order;   // [n]
};

struct LloydResult {
  double first_inertia = 0;  // sum_i w_i ||x_i - c_{label_i}||^2 at the first assignment (initial centroids)
  double inertia = 0;        // the same at the last assignment
  int reseeded = 0;          // empty clusters re-seeded over all iterations
};

// Picks k distinct points uniformly as initial centroids. Requires 1 <= k <= n.
//   points: [n, d], centroids: [k, d] out
void init_random(const float* points, int64_t n, int d, int64_t k, Rng& rng, float* centroids,
                 std::vector<int32_t>& scratch);

// Lloyd's algorithm on squared Euclidean distance, starting from `centroids`. Each of the
// `iterations` (>= 1) rounds assigns every point to its nearest centroid, re-seeds each
// empty cluster with the point farthest from its centroid (taken from a cluster that keeps
// at least one point; a cluster stays empty only when no point lies away from its centroid),
// and moves every centroid to the weighted mean of its points. On return `labels` is the
// last assignment and `centroids` the means of exactly those labels (an empty cluster
// keeps its previous centroid).
//   points:    [n, d] f32
//   weights:   [n] > 0, or null for all ones
//   centroids: [k, d] in/out
//   labels:    [n] out
LloydResult lloyd(const float* points, const float* weights, int64_t n, int d, int64_t k, int iterations,
                  float* centroids, int32_t* labels, LloydScratch& scratch);

}  // namespace multipole::kmeans
