#pragma once
// CPU decode-attention building blocks shared by every policy: attend the G query heads of
// one GQA group to a set of keys, keeping an unnormalised f32 softmax state, then merge
// states and normalise. SIMD (AVX2/FMA/F16C, AVX-512 variants of the block kernels where
// the CPU has them); the K/V storage type is dispatched inside.
//
// A state for G query heads holds, per head g: running max m[g], sum l[g] = sum e^{x - m},
// and o[g][d] = sum e^{x - m} v. Logits x are scale * q.k (+ bias for pseudo-tokens).
#include <cstdint>
#include <string_view>
#include <vector>

#include "multipole/core/simd.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

namespace multipole::kernels {

struct SoftmaxState {
  int groups = 0;      // G
  int dim = 0;         // d
  float* m = nullptr;  // [G]
  float* l = nullptr;  // [G]
  float* o = nullptr;  // [G, d]
  void reset();        // m = -inf, l = 0, o = 0
};

// Keys/values at positions [begin, end) of KV head `head` of one sequence.
//   q: [G, d] f32 (rotated to the query's position)
void attend_range(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, int64_t end,
                  const float* q, float scale, SoftmaxState& state);

// Every KV head of positions [begin, end), heads inner: a page holds all heads' slices
// contiguously, so this streams the cache in address order (the dense path).
//   q: [H, G, d] (H = kv.num_kv_heads, G = states[h].groups), states: [H]
void attend_range_all_heads(const KVLayerView& kv, const int32_t* page_table, int64_t begin, int64_t end,
                            const float* q, float scale, SoftmaxState* states);

// Keys/values at the listed positions (any order, no duplicates expected).
//   positions: [count]
void attend_positions(const KVLayerView& kv, const int32_t* page_table, int head, const int32_t* positions,
                      int64_t count, const float* q, float scale, SoftmaxState& state);

// Pseudo-tokens (far-field centroids) whose logits the scoring already computed, given as
// weights w_{g,j} = e^{logit_{g,j} - mx_g} (logit = scale q_g . c + log n): the far field
// reuses them instead of reading the key centroids a second time.
//   values: [C, d] f32; ids: [count] rows of values, nullptr: rows 0..count-1
//   w:      [G, count] (0 leaves a row out); mx: [G] (-inf: no weight for that head)
void attend_weighted(const float* values, const int32_t* ids, int64_t count, const float* w, const float* mx,
                     SoftmaxState& state);

// Scores for centroid scoring: out[g * count + j] = scale * q_g . keys[ids[j]].
//   q: [G, d], keys: [C, d] f32, ids: [count] or nullptr (0..count-1), out: [G, count]
void score_rows(const float* keys, const int32_t* ids, int64_t count, const float* q, int groups, int dim,
                float scale, float* out);

// score_rows for rows stored as `type` (f32, f16, bf16). rows: [C, dim] of that type.
void score_rows_typed(const void* rows, DType type, const int32_t* ids, int64_t count, const float* q, int groups,
                      int dim, float scale, float* out);

// Exact logits of cached keys: out[g * (end - begin) + i] = scale * q_g . k_{begin + i}.
//   q: [G, d], out: [G, end - begin]
void score_range(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, int64_t end,
                 const float* q, int groups, float scale, float* out);

// Exact logits of cached keys at the listed positions: out[g * count + i] = scale * q_g . k_{positions[i]}.
//   positions: [count], q: [G, d], out: [G, count]
void score_positions(const KVLayerView& kv, const int32_t* page_table, int head, const int32_t* positions,
                     int64_t count, const float* q, int groups, float scale, float* out);

// A SoftmaxState that owns its buffers; resize() allocates only when the shape grows.
class OwnedState {
 public:
  SoftmaxState& resize(int groups, int dim) {
    size_t need = size_t(groups) * (size_t(dim) + 2);
    if (buffer_.size() < need) buffer_.resize(need);
    state_ = SoftmaxState{groups, dim, buffer_.data(), buffer_.data() + groups, buffer_.data() + 2 * groups};
    return state_;
  }
  SoftmaxState& get() { return state_; }

 private:
  std::vector<float> buffer_;
  SoftmaxState state_;
};

// into <- log-sum-exp merge of into and other (same G, d).
void merge(SoftmaxState& into, const SoftmaxState& other);

// out[g][:] = o[g][:] / l[g]. out: [G, d]. A state with l = 0 (nothing attended) gives zeros.
void finalize(const SoftmaxState& state, float* out);

// Vectorised e^x for n floats (in place), |rel err| < 2e-7 on [-87, 88]; e^-inf = 0.
void exp_inplace(float* x, int64_t n);

}  // namespace multipole::kernels
