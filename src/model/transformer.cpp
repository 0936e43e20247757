// The shared transformer forward of every family: RMSNorm, q/k/v projections (+bias), the
// GGUF Q/K un-permutation, per-head q/k RMSNorm, RoPE, K/V into the paged cache, attention
// (dense causal at prefill, the policy at decode), output projection, SwiGLU MLP, tied or
// separate LM head. Matrix products run on the stored weights (core/quant.hpp gemm/gemv);
// everything else is f32 with the row loops split over the pool when there are many rows.
#include <chrono>
#include <cmath>
#include <cstring>

#include "model/model_impl.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

float* ensure(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Rows of a batch on the pool when there are enough of them to pay for waking it.
template <class Fn>
void for_rows(ThreadPool& pool, int64_t rows, Fn&& fn) {
  if (rows < 8 || pool.size() == 1) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
  const int64_t tasks = std::min<int64_t>(rows, int64_t(pool.size()) * 4);
  pool.parallel_for(tasks, [&](int64_t t, int) {
    for (int64_t r = rows * t / tasks; r < rows * (t + 1) / tasks; ++r) fn(r);
  });
}

// y = x / sqrt(mean(x^2) + eps) * w over n values (sum in double: n is up to 16K).
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// GGUF Llama rows are, per head, in the order (i, j) -> 2i + j of GGML's interleaved RoPE;
// Hugging Face's rotate-half order is j * (d/2) + i. Puts one head back in HF order.
void unpermute_head(float* x, float* tmp, int d) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    tmp[i] = x[2 * i];
    tmp[half + i] = x[2 * i + 1];
  }
  std::memcpy(x, tmp, size_t(d) * 4);
}

// Rotate-half RoPE of one head with precomputed cos/sin ([rotary_dim/2], magnitude folded in).
void rotate_head(float* x, const float* cs, const float* sn, int half) {
  for (int i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cs[i] - b * sn[i];
    x[i + half] = b * cs[i] + a * sn[i];
  }
}

}  // namespace

void Model::Impl::forward(const ModelConfig& c, PagedKVCache& cache, std::span<const SeqId> row_seq, int64_t first_pos,
                          std::span<const int32_t> tokens, bool decode, bool update_policy, AttentionPolicy& policy,
                          ThreadPool& pool, float* logits, bool all_rows, ForwardStats& stats) {
  const auto t_start = Clock::now();
  const int64_t n = int64_t(tokens.size());
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim, V = c.vocab_size;
  const int nh = c.num_heads, nkv = c.num_kv_heads, G = nh / nkv;
  const int64_t qw = int64_t(nh) * hd, kw = int64_t(nkv) * hd;
  const AttentionConfig& ac = policy.config();
  MP_CHECK(ac.num_q_heads == nh && ac.num_kv_heads == nkv && ac.head_dim == hd,
           "model: attention policy '{}' is shaped for {} q / {} kv heads of {}, the model has {} / {} of {}",
           policy.name(), ac.num_q_heads, ac.num_kv_heads, ac.head_dim, nh, nkv, hd);
  const auto& kc = cache.config();
  MP_CHECK(kc.num_layers == c.num_layers && kc.num_kv_heads == nkv && kc.head_dim == hd,
           "model: KV cache is shaped for {} layers / {} kv heads of {}, the model has {} / {} of {}", kc.num_layers,
           kc.num_kv_heads, kc.head_dim, c.num_layers, nkv, hd);
  for (int32_t t : tokens)
    MP_CHECK(t >= 0 && t < V, "model: token id {} outside the vocabulary [0, {})", t, V);

  ForwardScratch& s = scratch;
  float* x = ensure(s.x, size_t(n * H));
  float* h = ensure(s.h, size_t(n * std::max(H, qw)));
  float* q = ensure(s.q, size_t(n * qw));
  float* k = ensure(s.k, size_t(n * kw));
  float* v = ensure(s.v, size_t(n * kw));
  float* att = ensure(s.att, size_t(n * qw));
  float* gate = ensure(s.gate, size_t(n * I));
  float* up = ensure(s.up, size_t(n * I));
  float* out = ensure(s.out, size_t(n * H));
  const int half = rope.config().rotary_dim / 2;
  float* cs = ensure(s.cos, size_t(n * half));
  float* sn = ensure(s.sin, size_t(n * half));
  if (s.pos.size() < size_t(n)) s.pos.resize(size_t(n));

  // Positions: extend the cache first (one page table for every layer).
  if (decode) {
    for (int64_t r = 0; r < n; ++r) s.pos[r] = cache.extend(row_seq[size_t(r)], 1);
  } else {
    MP_CHECK(row_seq.size() == 1, "prefill: one sequence at a time");
    const int64_t p0 = cache.extend(row_seq[0], n);
    MP_CHECK(first_pos < 0 || p0 == first_pos, "prefill: cache position {} differs from the expected {}", p0, first_pos);
    for (int64_t r = 0; r < n; ++r) s.pos[r] = p0 + r;
  }
  // cos/sin per row, as Rope::apply computes them (angle in double, magnitude folded in).
  const auto& inv_freq = rope.inv_freq();
  const float mag = rope.magnitude();
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < half; ++i) {
      const double angle = double(s.pos[r]) * inv_freq[size_t(i)];
      cs[r * half + i] = float(std::cos(angle)) * mag;
      sn[r * half + i] = float(std::sin(angle)) * mag;
    }

  // Token embeddings.
  const int64_t embed_row = quant_row_bytes(embed.type, H);
  for_rows(pool, n, [&](int64_t r) {
    dequantize_row(embed.type, static_cast<const std::byte*>(embed.data) + tokens[size_t(r)] * embed_row, x + r * H, H);
  });

  const float scale = ac.softmax_scale();
  const float eps = c.rms_eps;
  double attention_s = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = layers[size_t(l)];
    // Attention block.
    for_rows(pool, n, [&](int64_t r) { rms_norm(x + r * H, L.attn_norm.data(), h + r * H, H, eps); });
    const GemmOutput qkv[] = {{L.wq.matrix(), q}, {L.wk.matrix(), k}, {L.wv.matrix(), v}};
    gemm_group(qkv, h, n, &pool, &s.act, activations);
    for_rows(pool, n, [&](int64_t r) {
      float* qr = q + r * qw;
      float* kr = k + r * kw;
      if (!L.bq.empty()) {
        for (int64_t i = 0; i < qw; ++i) qr[i] += L.bq[size_t(i)];
        for (int64_t i = 0; i < kw; ++i) kr[i] += L.bk[size_t(i)];
        float* vr = v + r * kw;
        for (int64_t i = 0; i < kw; ++i) vr[i] += L.bv[size_t(i)];
      }
      const float* cr = cs + r * half;
      const float* sr = sn + r * half;
      auto head = [&](float* xh, const std::vector<float>& norm) {
        if (permuted_qk) {
          float tmp[1024];
          unpermute_head(xh, tmp, int(hd));
        }
        if (!norm.empty()) rms_norm(xh, norm.data(), xh, hd, eps);
        if (!observer) rotate_head(xh, cr, sr, half);
      };
      for (int g = 0; g < nh; ++g) head(qr + g * hd, L.q_norm);
      for (int g = 0; g < nkv; ++g) head(kr + g * hd, L.k_norm);
    });
    if (observer) {
      // The observer sees q and k before RoPE, so the rotation runs as a second pass.
      observer->on_qkv({l, decode, row_seq, std::span<const int64_t>(s.pos.data(), size_t(n)), q, k, v});
      for_rows(pool, n, [&](int64_t r) {
        for (int g = 0; g < nh; ++g) rotate_head(q + r * qw + g * hd, cs + r * half, sn + r * half, half);
        for (int g = 0; g < nkv; ++g) rotate_head(k + r * kw + g * hd, cs + r * half, sn + r * half, half);
      });
    }

    // K (rotated) and V into the cache, then attention.
    const auto t_att = Clock::now();
    if (decode) {
      for (int64_t r = 0; r < n; ++r) cache.write(row_seq[size_t(r)], l, s.pos[r], 1, k + r * kw, v + r * kw);
      policy.update(cache, l, row_seq, pool);
      policy.decode(cache, l, row_seq, q, att, pool);
      const DecodeStats& ds = policy.last_stats();
      stats.policy.exact_tokens += ds.exact_tokens;
      stats.policy.selected_tokens += ds.selected_tokens;
      stats.policy.centroids_scored += ds.centroids_scored;
      stats.policy.pseudo_tokens += ds.pseudo_tokens;
      stats.policy.bytes_read += ds.bytes_read;
    } else {
      const SeqId seq = row_seq[0];
      cache.write(seq, l, s.pos[0], n, k, v);
      // Dense causal attention of every prompt row over everything cached up to it.
      const KVLayerView kv = cache.layer_view(l);
      const int32_t* table = cache.page_table(seq).data();
      if (s.states.size() < size_t(pool.size())) s.states.resize(size_t(pool.size()));
      pool.parallel_for(n * nkv, [&](int64_t item, int thread) {
        const int64_t r = item / nkv;
        const int kh = int(item % nkv);
        kernels::SoftmaxState& st = s.states[size_t(thread)].resize(G, int(hd));
        st.reset();
        const int64_t off = r * qw + int64_t(kh) * G * hd;
        kernels::attend_range(kv, table, kh, 0, s.pos[r] + 1, q + off, scale, st);
        kernels::finalize(st, att + off);
      });
      if (update_policy) policy.update(cache, l, row_seq, pool);
    }
    attention_s += seconds_since(t_att);

    gemm(L.wo.matrix(), att, n, out, &pool, &s.act, activations);
    for (int64_t i = 0; i < n * H; ++i) x[i] += out[i];

    // MLP block: x += down(silu(gate(h)) * up(h)).
    for_rows(pool, n, [&](int64_t r) { rms_norm(x + r * H, L.ffn_norm.data(), h + r * H, H, eps); });
    const GemmOutput gate_up[] = {{L.gate.matrix(), gate}, {L.up.matrix(), up}};
    gemm_group(gate_up, h, n, &pool, &s.act, activations);
    for_rows(pool, n, [&](int64_t r) {
      float* gr = gate + r * I;
      const float* ur = up + r * I;
      for (int64_t i = 0; i < I; ++i) gr[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
    });
    gemm(L.down.matrix(), gate, n, out, &pool, &s.act, activations);
    for (int64_t i = 0; i < n * H; ++i) x[i] += out[i];
  }

  // Final norm and LM head, for the rows asked for.
  if (logits) {
    const int64_t r0 = all_rows ? 0 : n - 1;
    const int64_t rows = n - r0;
    for_rows(pool, rows, [&](int64_t r) { rms_norm(x + (r0 + r) * H, output_norm.data(), h + r * H, H, eps); });
    gemm(output.matrix(), h, rows, logits, &pool, &s.act, activations);
  }

  const double total = seconds_since(t_start);
  stats.attention_seconds += attention_s;
  if (decode) {
    stats.decode_seconds += total;
    stats.decode_tokens += n;
  } else {
    stats.prefill_seconds += total;
    stats.prefill_tokens += n;
  }
}

}  // namespace multipole
