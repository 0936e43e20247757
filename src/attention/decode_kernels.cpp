#include "attention/decode_kernels.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <string_view>
#include <limits>
#include <type_traits>

#include "attention/decode_block.hpp"
#include "attention/simd_avx2.hpp"
#include "multipole/core/error.hpp"

namespace multipole::kernels {

using simd::load8;

namespace {

using detail::kBlock;
using detail::kMaxGroups;
using detail::Prefetch;
using detail::softmax_step;

constexpr int kMaxPermDim = 1024;  // widest row scored through the bf16 lane-order path (quest's [lo|hi])
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Logits of NG heads for n keys; NT keys at a time so that NG*NT accumulator chains hide
// the FMA latency (2 FMAs per cycle at 4 cycles latency need 8 chains) when NG is small,
// within the 16 ymm registers (q stays a memory operand).
//   rows: [n] pointers to keys of d elements; q: [NG, d]; out: [NG] rows of stride `ostride`
//   bias: [n] added after scaling, or nullptr
// PERM (bf16 only, d % 16 == 0): keys are unpacked 16 channels at a time in lane order
// (simd::unpack16) and q must have been permuted to match (simd::permute16).
template <class T, int NG, int NT, bool PERM>
void logits_tile(const T* const* rows, int n, const float* q, int d, float scale, const float* bias, float* out,
                 int64_t ostride, const Prefetch<T>& pf) {
  int t = 0;
  for (; t + NT <= n; t += NT) {
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) pf.token(t + j);
    __m256 acc[NT][NG];
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j)
#pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) acc[j][g] = _mm256_setzero_ps();
    if constexpr (PERM) {
      for (int c = 0; c < d; c += 16) {
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) {
          __m256 klo, khi;
          simd::unpack16(rows[t + j] + c, klo, khi);
#pragma GCC unroll 16
          for (int g = 0; g < NG; ++g) {
            acc[j][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c), klo, acc[j][g]);
            acc[j][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c + 8), khi, acc[j][g]);
          }
        }
      }
    } else {
      for (int c = 0; c < d; c += 8) {
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) {
          __m256 k = load8(rows[t + j] + c);
#pragma GCC unroll 16
          for (int g = 0; g < NG; ++g) acc[j][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c), k, acc[j][g]);
        }
      }
    }
    // Transpose-add trees sum the NT*NG accumulators 8 at a time.
    constexpr int NA = NT * NG, NR = (NA + 7) / 8;
    alignas(32) float sums[NR * 8];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      __m256 flat[8];
#pragma GCC unroll 16
      for (int i = 0; i < 8; ++i) flat[i] = r * 8 + i < NA ? acc[(r * 8 + i) / NG][(r * 8 + i) % NG] : _mm256_setzero_ps();
      _mm256_store_ps(sums + r * 8, _mm256_mul_ps(simd::hsum8(flat), _mm256_set1_ps(scale)));
    }
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const float b = bias ? bias[t + j] : 0.0f;
#pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) out[g * ostride + t + j] = sums[j * NG + g] + b;
    }
  }
  if constexpr (NT > 1) {
    if (t < n)
      logits_tile<T, NG, 1, PERM>(rows + t, n - t, q, d, scale, bias ? bias + t : nullptr, out + t, ostride,
                                  pf.from(t));
  }
}

// One tile of ng <= 8 heads.
template <class T, bool PERM>
void logits_tiles(const T* const* rows, int n, const float* q, int ng, int d, float scale, const float* bias,
                  float* out, int64_t ostride, const Prefetch<T>& pf) {
  switch (ng) {
    case 1: logits_tile<T, 1, 8, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 2: logits_tile<T, 2, 4, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 3: logits_tile<T, 3, 3, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 4: logits_tile<T, 4, 3, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 5: logits_tile<T, 5, 1, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 6: logits_tile<T, 6, 1, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    case 7: logits_tile<T, 7, 1, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
    default: logits_tile<T, 8, 1, PERM>(rows, n, q, d, scale, bias, out, ostride, pf); break;
  }
}

template <class T>
void logits(const T* const* rows, int n, const float* q, int groups, int d, float scale, const float* bias, float* out,
            int64_t ostride, const Prefetch<T>& prefetch = {}) {
  if (detail::use_avx512(d)) return detail::logits_avx512<T>(rows, n, q, groups, d, scale, bias, out, ostride, prefetch);
  // Heads are processed in tiles of at most 8 so the accumulators stay in registers; the
  // second tile re-reads the keys from L1.
  int tile = groups <= 8 ? groups : (groups + 1) / 2;
  if constexpr (std::is_same_v<T, bf16>) {
    if (d % 16 == 0 && d <= kMaxPermDim) {
      alignas(32) float qperm[8 * kMaxPermDim];
      for (int g0 = 0; g0 < groups; g0 += tile) {
        const int ng = std::min(tile, groups - g0);
        for (int i = 0; i < ng * d; i += 16) simd::permute16(q + int64_t(g0) * d + i, qperm + i);
        logits_tiles<T, true>(rows, n, qperm, ng, d, scale, bias, out + g0 * ostride, ostride,
                              g0 == 0 ? prefetch : Prefetch<T>{});
      }
      return;
    }
  }
  for (int g0 = 0; g0 < groups; g0 += tile)
    logits_tiles<T, false>(rows, n, q + int64_t(g0) * d, std::min(tile, groups - g0), d, scale, bias,
                           out + g0 * ostride, ostride, g0 == 0 ? prefetch : Prefetch<T>{});
}

// One pass of PV over channels [c, c + 8 NS): the NS x NG accumulators stay in registers
// across the block's tokens. PERM (bf16, NS even): values are read 16 channels per load in
// lane order (simd::unpack16) and the accumulators are converted from/to the state's order
// once per pass.
template <class T, int NG, int NS, bool PERM>
void pv_pass(const T* const* rows, int n, const float* p, int d, float* o, int c) {
  __m256 acc[NS][NG];
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += PERM ? 2 : 1) {
      if constexpr (PERM) simd::permute16(o + g * d + c + 8 * s, acc[s][g], acc[s + 1][g]);
      else acc[s][g] = _mm256_loadu_ps(o + g * d + c + 8 * s);
    }
  for (int t = 0; t < n; ++t) {
    __m256 v[NS];
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += PERM ? 2 : 1) {
      if constexpr (PERM) simd::unpack16(rows[t] + c + 8 * s, v[s], v[s + 1]);
      else v[s] = load8(rows[t] + c + 8 * s);
    }
#pragma GCC unroll 16
    for (int g = 0; g < NG; ++g) {
      const __m256 pg = _mm256_broadcast_ss(p + g * kBlock + t);
#pragma GCC unroll 16
      for (int s = 0; s < NS; ++s) acc[s][g] = _mm256_fmadd_ps(pg, v[s], acc[s][g]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int s = 0; s < NS; s += PERM ? 2 : 1) {
      if constexpr (PERM) simd::unpermute16(acc[s][g], acc[s + 1][g], o + g * d + c + 8 * s);
      else _mm256_storeu_ps(o + g * d + c + 8 * s, acc[s][g]);
    }
}

// o[g] += sum_t p[g][t] v_t for NG heads.
//   rows: [n] pointers to values of d elements; p: [NG] rows of stride kBlock; o: [NG, d]
template <class T, int NG>
void pv_tile(const T* const* rows, int n, const float* p, int d, float* o) {
  // Several slices per pass where registers allow (NS NG accumulators + values + a
  // broadcast <= 16): a broadcast probability serves 8 NS channels, and small groups still
  // have enough independent FMA chains to hide the latency.
  constexpr int NS = NG == 1 ? 8 : NG == 2 ? 4 : NG <= 6 ? 2 : 1;
  constexpr bool PERM = std::is_same_v<T, bf16> && NS % 2 == 0;
  int c = 0;
  for (; c + 8 * NS <= d; c += 8 * NS) pv_pass<T, NG, NS, PERM>(rows, n, p, d, o, c);
  for (; c < d; c += 8) pv_pass<T, NG, 1, false>(rows, n, p, d, o, c);  // when d is not a multiple of 8 NS
}

//   prefetch: the next block's rows (only the AVX-512 passes fetch values here)
template <class T>
void pv(const T* const* rows, int n, const float* p, int groups, int d, float* o, const Prefetch<T>& prefetch = {}) {
  if (detail::use_avx512(d)) return detail::pv_avx512<T>(rows, n, p, groups, d, o, prefetch);
  int tile = groups <= 8 ? groups : (groups + 1) / 2;
  for (int g0 = 0; g0 < groups; g0 += tile) {
    int ng = std::min(tile, groups - g0);
    const float* pt = p + g0 * kBlock;
    float* ot = o + int64_t(g0) * d;
    switch (ng) {
      case 1: pv_tile<T, 1>(rows, n, pt, d, ot); break;
      case 2: pv_tile<T, 2>(rows, n, pt, d, ot); break;
      case 3: pv_tile<T, 3>(rows, n, pt, d, ot); break;
      case 4: pv_tile<T, 4>(rows, n, pt, d, ot); break;
      case 5: pv_tile<T, 5>(rows, n, pt, d, ot); break;
      case 6: pv_tile<T, 6>(rows, n, pt, d, ot); break;
      case 7: pv_tile<T, 7>(rows, n, pt, d, ot); break;
      default: pv_tile<T, 8>(rows, n, pt, d, ot); break;
    }
  }
}

void scale_row(float* x, int d, float factor) {
  __m256 f = _mm256_set1_ps(factor);
  for (int c = 0; c < d; c += 8) _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), f));
}

// Head g's running max raised to m_new (>= the current one, finite), l and o rescaled to it.
void raise_max(SoftmaxState& s, int g, float m_new) {
  if (m_new <= s.m[g]) return;
  const float alpha = std::exp(s.m[g] - m_new);  // 0 when m was -inf
  s.l[g] *= alpha;
  scale_row(s.o + int64_t(g) * s.dim, s.dim, alpha);
  s.m[g] = m_new;
}

// One block of n <= kBlock keys/values (f32 q, K/V rows of type T).
template <class T>
void attend_block(const T* const* krows, const T* const* vrows, const float* bias, int n, const float* q, float scale,
                  SoftmaxState& s, const Prefetch<T>& prefetch = {}) {
  alignas(32) float x[kMaxGroups * kBlock];
  logits(krows, n, q, s.groups, s.dim, scale, bias, x, kBlock, prefetch);
  softmax_step(x, n, s);
  pv(vrows, n, x, s.groups, s.dim, s.o, prefetch);
}

void check_state(const SoftmaxState& s, int head_dim, const char* what) {
  MP_CHECK(s.groups >= 1 && s.groups <= kMaxGroups, "{}: state has {} query heads, expected 1 to {}", what, s.groups,
           kMaxGroups);
  MP_CHECK(s.dim == head_dim, "{}: state head_dim {} differs from the keys' head_dim {}", what, s.dim, head_dim);
  MP_CHECK(s.dim > 0 && s.dim % 8 == 0, "{}: head_dim {} must be a positive multiple of 8", what, s.dim);
  MP_CHECK(s.m && s.l && s.o, "{}: state buffers are not set", what);
}

void check_view(const KVLayerView& kv, int head, const char* what) {
  MP_CHECK(head >= 0 && head < kv.num_kv_heads, "{}: kv head {} out of range [0, {})", what, head, kv.num_kv_heads);
}

// Row pointers of one KV head's keys/values, without a division per token.
template <class T>
struct Rows {
  const KVLayerView& kv;
  const int32_t* table;
  int head;

  // Consecutive positions [p, p + n): one page-table lookup per page.
  void range(int64_t p, int n, const T** k, const T** v) const {
    int64_t page = p / kv.page_size;
    int slot = int(p - page * kv.page_size);
    for (int i = 0; i < n;) {
      const int64_t base = int64_t(table[page]) * kv.page_bytes + head * kv.head_bytes;
      for (; slot < kv.page_size && i < n; ++slot, ++i) {
        k[i] = reinterpret_cast<const T*>(kv.keys + base + slot * kv.token_bytes);
        v[i] = reinterpret_cast<const T*>(kv.values + base + slot * kv.token_bytes);
      }
      ++page;
      slot = 0;
    }
  }
  // Listed positions; a shift and a mask where the page size is a power of two.
  void list(const int32_t* pos, int n, const T** k, const T** v) const {
    const int ps = kv.page_size;
    const bool pow2 = (ps & (ps - 1)) == 0;
    const int shift = std::countr_zero(unsigned(ps));
    for (int i = 0; i < n; ++i) {
      const int32_t p = pos[i];
      const int32_t page = pow2 ? p >> shift : p / ps, slot = pow2 ? p & (ps - 1) : p % ps;
      const int64_t off = int64_t(table[page]) * kv.page_bytes + head * kv.head_bytes + slot * kv.token_bytes;
      k[i] = reinterpret_cast<const T*>(kv.keys + off);
      v[i] = reinterpret_cast<const T*>(kv.values + off);
    }
  }
};

// Positions come either from a range or a list; both are resolved to row pointers a block
// at a time, so the kernels never see the page structure. The next block's rows are
// resolved before the current block runs, so that it can prefetch them.
//   fill(first, n, krows, vrows) resolves items [first, first + n)
//   fn(krows, vrows, n, first, prefetch)
template <class T, class Fill, class Fn>
void for_blocks(int64_t count, int row_bytes, Fill fill, Fn fn) {
  const T* krows[2][kBlock];
  const T* vrows[2][kBlock];
  auto resolve = [&](int64_t b, int buf) {
    const int n = int(std::min<int64_t>(kBlock, count - b));
    fill(b, n, krows[buf], vrows[buf]);
    return n;
  };
  int n = resolve(0, 0), cur = 0;
  for (int64_t b = 0; b < count; b += kBlock) {
    const int next_n = b + kBlock < count ? resolve(b + kBlock, cur ^ 1) : 0;
    const Prefetch<T> pf{krows[cur ^ 1], vrows[cur ^ 1], next_n, row_bytes};
    fn(krows[cur], vrows[cur], n, b, pf);
    n = next_n;
    cur ^= 1;
  }
}

// Calls body(T{}) with T the storage type of the view.
template <class Body>
void dispatch(DType dtype, Body body) {
  switch (dtype) {
    case DType::F32: body(float{}); break;
    case DType::F16: body(f16{}); break;
    case DType::BF16: body(bf16{}); break;
  }
}

// Attends `count` cached positions; range: positions begin + i, else positions[i].
void attend_cache(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, const int32_t* positions,
                  int64_t count, const float* q, float scale, SoftmaxState& s) {
  dispatch(kv.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> rows{kv, page_table, head};
    auto fill = [&](int64_t i, int n, const T** k, const T** v) {
      if (positions) rows.list(positions + i, n, k, v);
      else rows.range(begin + i, n, k, v);
    };
    for_blocks<T>(count, int(kv.token_bytes), fill, [&](const T* const* k, const T* const* v, int n, int64_t, const Prefetch<T>& pf) {
      attend_block<T>(k, v, nullptr, n, q, scale, s, pf);
    });
  });
}

}  // namespace

namespace detail {

void softmax_step(float* x, int n, SoftmaxState& s) {
  const int n8 = (n + 7) & ~7;
  for (int g = 0; g < s.groups; ++g) {
    float* xg = x + g * kBlock;
    for (int t = n; t < n8; ++t) xg[t] = kNegInf;
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int t = 0; t < n8; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(xg + t));
    const float block_max = simd::hmax(mx);
    const float m_new = std::max(s.m[g], block_max);
    if (m_new == kNegInf) {  // nothing with weight yet (all logits -inf)
      std::fill(xg, xg + n8, 0.0f);
      continue;
    }
    raise_max(s, g, m_new);
    const __m256 m = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < n8; t += 8) {
      __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(xg + t), m));
      _mm256_storeu_ps(xg + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    s.l[g] += simd::hsum(sum);
  }
}

bool use_avx512(int d) { return d % 16 == 0 && simd_level() == SimdLevel::Avx512; }

}  // namespace detail

void SoftmaxState::reset() {
  std::fill(m, m + groups, kNegInf);
  std::fill(l, l + groups, 0.0f);
  std::fill(o, o + int64_t(groups) * dim, 0.0f);
}

void attend_range(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, int64_t end,
                  const float* q, float scale, SoftmaxState& state) {
  if (end <= begin) return;
  check_state(state, kv.head_dim, "attend_range");
  check_view(kv, head, "attend_range");
  MP_CHECK(begin >= 0, "attend_range: begin {} must be >= 0", begin);
  attend_cache(kv, page_table, head, begin, nullptr, end - begin, q, scale, state);
}

void attend_range_all_heads(const KVLayerView& kv, const int32_t* page_table, int64_t begin, int64_t end,
                            const float* q, float scale, SoftmaxState* states) {
  if (end <= begin) return;
  const int H = kv.num_kv_heads;
  for (int h = 0; h < H; ++h) check_state(states[h], kv.head_dim, "attend_range_all_heads");
  MP_CHECK(begin >= 0, "attend_range_all_heads: begin {} must be >= 0", begin);
  dispatch(kv.dtype, [&](auto tag) {
    using T = decltype(tag);
    // Items (block, head), head inner; the next item's rows are resolved (and prefetched)
    // while the current one runs.
    const T* krows[2][kBlock];
    const T* vrows[2][kBlock];
    auto resolve = [&](int64_t b, int h, int buf) {
      const int n = int(std::min<int64_t>(kBlock, end - b));
      Rows<T>{kv, page_table, h}.range(b, n, krows[buf], vrows[buf]);
      return n;
    };
    int64_t b = begin;
    int h = 0, cur = 0, n = resolve(b, h, cur);
    for (;;) {
      int64_t nb = b;
      int nh = h + 1;
      if (nh == H) {
        nh = 0;
        nb += kBlock;
      }
      const int next_n = nb < end ? resolve(nb, nh, cur ^ 1) : 0;
      const SoftmaxState& s = states[h];
      attend_block<T>(krows[cur], vrows[cur], nullptr, n, q + int64_t(h) * s.groups * s.dim, scale, states[h],
                      Prefetch<T>{krows[cur ^ 1], vrows[cur ^ 1], next_n, int(kv.token_bytes)});
      if (next_n == 0) break;
      b = nb;
      h = nh;
      n = next_n;
      cur ^= 1;
    }
  });
}

void attend_positions(const KVLayerView& kv, const int32_t* page_table, int head, const int32_t* positions,
                      int64_t count, const float* q, float scale, SoftmaxState& state) {
  if (count <= 0) return;
  check_state(state, kv.head_dim, "attend_positions");
  check_view(kv, head, "attend_positions");
  attend_cache(kv, page_table, head, 0, positions, count, q, scale, state);
}

void attend_weighted(const float* values, const int32_t* ids, int64_t count, const float* w, const float* mx,
                     SoftmaxState& state) {
  if (count <= 0) return;
  check_state(state, state.dim, "attend_weighted");
  const int G = state.groups, d = state.dim;
  // Bring the state to the new maxima once; the weights, taken to the same maxima, then add
  // to l and o directly.
  float factor[kMaxGroups];
  for (int g = 0; g < G; ++g) {
    factor[g] = 0;
    if (mx[g] == kNegInf) continue;
    const float m_new = std::max(state.m[g], mx[g]);
    raise_max(state, g, m_new);
    factor[g] = std::exp(mx[g] - m_new);
  }
  alignas(64) float p[kMaxGroups * kBlock];
  const float* rows[kBlock];
  for (int64_t b = 0; b < count; b += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, count - b));
    for (int i = 0; i < n; ++i) rows[i] = values + (ids ? int64_t(ids[b + i]) : b + i) * d;
    for (int g = 0; g < G; ++g) {
      float* pg = p + g * kBlock;
      const float f = factor[g];  // 0 also where mx is -inf and w may be NaN
      std::fill(pg, pg + kBlock, 0.0f);
      if (f == 0.0f) continue;
      const float* wg = w + int64_t(g) * count + b;
      float sum = 0;
      for (int i = 0; i < n; ++i) sum += pg[i] = wg[i] * f;
      state.l[g] += sum;
    }
    pv(rows, n, p, G, d, state.o);
  }
}

void score_rows(const float* keys, const int32_t* ids, int64_t count, const float* q, int groups, int dim, float scale,
                float* out) {
  score_rows_typed(keys, DType::F32, ids, count, q, groups, dim, scale, out);
}

void score_rows_typed(const void* rows, DType type, const int32_t* ids, int64_t count, const float* q, int groups,
                      int dim, float scale, float* out) {
  if (count <= 0) return;
  MP_CHECK(groups >= 1 && groups <= kMaxGroups, "score_rows: {} query heads, expected 1 to {}", groups, kMaxGroups);
  MP_CHECK(dim > 0 && dim % 8 == 0, "score_rows: head_dim {} must be a positive multiple of 8", dim);
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(rows);
    const int row_bytes = dim * int(sizeof(T));
    auto fill = [&](int64_t j0, int n, const T** k, const T** v) {
      for (int i = 0; i < n; ++i) k[i] = v[i] = base + (ids ? int64_t(ids[j0 + i]) : j0 + i) * dim;
    };
    for_blocks<T>(count, row_bytes, fill, [&](const T* const* k, const T* const*, int n, int64_t j0, const Prefetch<T>& pf) {
      logits<T>(k, n, q, groups, dim, scale, nullptr, out + j0, count, Prefetch<T>{pf.k, nullptr, pf.n, pf.row_bytes});
    });
  });
}

namespace {

// Exact logits of cached keys from a range (positions == nullptr) or a list of positions.
void score_cache(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, const int32_t* positions,
                 int64_t count, const float* q, int groups, float scale, float* out, const char* what) {
  if (count <= 0) return;
  check_view(kv, head, what);
  MP_CHECK(groups >= 1 && groups <= kMaxGroups, "{}: {} query heads, expected 1 to {}", what, groups, kMaxGroups);
  MP_CHECK(begin >= 0, "{}: begin {} must be >= 0", what, begin);
  dispatch(kv.dtype, [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> rows{kv, page_table, head};
    auto fill = [&](int64_t i, int n, const T** k, const T** v) {
      if (positions) rows.list(positions + i, n, k, v);
      else rows.range(begin + i, n, k, v);
    };
    for_blocks<T>(count, int(kv.token_bytes), fill, [&](const T* const* k, const T* const*, int n, int64_t first, const Prefetch<T>& pf) {
                    // Only the keys are read: prefetch those alone.
                    logits<T>(k, n, q, groups, kv.head_dim, scale, nullptr, out + first, count,
                              Prefetch<T>{pf.k, nullptr, pf.n, pf.row_bytes});
                  });
  });
}

}  // namespace

void score_range(const KVLayerView& kv, const int32_t* page_table, int head, int64_t begin, int64_t end,
                 const float* q, int groups, float scale, float* out) {
  score_cache(kv, page_table, head, begin, nullptr, end - begin, q, groups, scale, out, "score_range");
}

void score_positions(const KVLayerView& kv, const int32_t* page_table, int head, const int32_t* positions,
                     int64_t count, const float* q, int groups, float scale, float* out) {
  score_cache(kv, page_table, head, 0, positions, count, q, groups, scale, out, "score_positions");
}

void merge(SoftmaxState& into, const SoftmaxState& other) {
  MP_CHECK(into.groups == other.groups && into.dim == other.dim,
           "merge: states differ in shape ([{}, {}] vs [{}, {}])", into.groups, into.dim, other.groups, other.dim);
  const int d = into.dim;
  for (int g = 0; g < into.groups; ++g) {
    const float mo = other.m[g];
    // A state without mass for this head adds nothing, and its maximum must not scale the
    // other's mass away: a far field whose reference is a selected cluster's logit can hold
    // l = 0 under a maximum far above every logit of the exact part.
    if (mo == kNegInf || other.l[g] == 0.0f) continue;
    const float mi = into.l[g] == 0.0f ? kNegInf : into.m[g];
    const float m = std::max(mi, mo);
    const float a = mi == kNegInf ? 0.0f : std::exp(mi - m);
    const float b = std::exp(mo - m);
    into.l[g] = into.l[g] * a + other.l[g] * b;
    into.m[g] = m;
    float* oi = into.o + int64_t(g) * d;
    const float* oo = other.o + int64_t(g) * d;
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int c = 0; c < d; c += 8)
      _mm256_storeu_ps(oi + c, _mm256_fmadd_ps(_mm256_loadu_ps(oo + c), vb, _mm256_mul_ps(_mm256_loadu_ps(oi + c), va)));
  }
}

void finalize(const SoftmaxState& state, float* out) {
  const int d = state.dim;
  for (int g = 0; g < state.groups; ++g) {
    const float l = state.l[g];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const __m256 f = _mm256_set1_ps(inv);
    const float* o = state.o + int64_t(g) * d;
    float* dst = out + int64_t(g) * d;
    for (int c = 0; c < d; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), f));
  }
}

void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, simd::exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tail[8] = {};
    std::memcpy(tail, x + i, size_t(n - i) * 4);
    _mm256_store_ps(tail, simd::exp8(_mm256_load_ps(tail)));
    std::memcpy(x + i, tail, size_t(n - i) * 4);
  }
}

}  // namespace multipole::kernels
