#pragma once
// Random-weight tiny checkpoints of each family, written by the tests in both formats, and
// a deliberately naive float64 forward of the same weights to check ours against.
//
// The writers follow the formats' descriptions, not our readers: the safetensors side uses
// the io layer's writer with Hugging Face tensor names + a config.json; the GGUF side is a
// little writer below (v3, F32/F16/Q8_0 tensors) that permutes the Q/K rows of Llama
// checkpoints exactly as llama.cpp's converter does, so our un-permutation is tested.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "multipole/core/dtype.hpp"
#include "multipole/io/safetensors.hpp"

namespace tiny {

struct Config {
  std::string family = "llama";  // llama, qwen2, qwen3
  int hidden = 64, inter = 96, layers = 2, heads = 4, kv_heads = 2, head_dim = 16, vocab = 101;
  double theta = 10000.0, eps = 1e-5;
  bool tied = false, bias = false, qk_norm = false;
  int context = 256;
  int bos = 1, eos = 2;
};

inline Config family_config(const std::string& family) {
  Config c;
  c.family = family;
  if (family == "qwen2") c.bias = true, c.theta = 1e6;
  if (family == "qwen3") c.qk_norm = true, c.tied = true, c.head_dim = 32;  // q width 128 != hidden 64
  return c;
}

struct Layer {
  std::vector<float> attn_norm, wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm, ffn_norm, gate, up, down;
};

struct Weights {
  Config c;
  std::vector<float> embed, lm_head, final_norm;  // [V, H], [V, H] (empty when tied), [H]
  std::vector<Layer> layers;
};

inline Weights random_weights(const Config& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uni = [&](size_t n, double a, double center = 0) {
    std::uniform_real_distribution<double> d(-a, a);
    std::vector<float> v(n);
    for (float& x : v) x = float(center + d(rng));
    return v;
  };
  const size_t H = c.hidden, I = c.inter, qw = size_t(c.heads) * c.head_dim, kw = size_t(c.kv_heads) * c.head_dim;
  Weights w;
  w.c = c;
  w.embed = uni(size_t(c.vocab) * H, 1.0);
  if (!c.tied) w.lm_head = uni(size_t(c.vocab) * H, 1.5 / std::sqrt(double(H)));
  w.final_norm = uni(H, 0.2, 1.0);
  for (int l = 0; l < c.layers; ++l) {
    Layer L;
    L.attn_norm = uni(H, 0.2, 1.0);
    L.ffn_norm = uni(H, 0.2, 1.0);
    L.wq = uni(qw * H, 2.0 / std::sqrt(double(H)));
    L.wk = uni(kw * H, 2.0 / std::sqrt(double(H)));
    L.wv = uni(kw * H, 1.5 / std::sqrt(double(H)));
    L.wo = uni(H * qw, 1.5 / std::sqrt(double(qw)));
    L.gate = uni(I * H, 1.5 / std::sqrt(double(H)));
    L.up = uni(I * H, 1.5 / std::sqrt(double(H)));
    L.down = uni(H * I, 1.5 / std::sqrt(double(I)));
    if (c.bias) L.bq = uni(qw, 0.5), L.bk = uni(kw, 0.5), L.bv = uni(kw, 0.5);
    if (c.qk_norm) L.q_norm = uni(c.head_dim, 0.3, 1.0), L.k_norm = uni(c.head_dim, 0.3, 1.0);
    w.layers.push_back(std::move(L));
  }
  return w;
}

// Rounds every weight matrix through a storage type (the reference then uses what is stored).
inline void round_through(Weights& w, multipole::DType t) {
  auto r = [&](std::vector<float>& v) {
    for (float& x : v)
      x = t == multipole::DType::BF16 ? multipole::bf16_to_f32(multipole::f32_to_bf16(x))
          : t == multipole::DType::F16 ? multipole::f16_to_f32(multipole::f32_to_f16(x))
                                        : x;
  };
  r(w.embed), r(w.lm_head);
  for (Layer& L : w.layers) r(L.wq), r(L.wk), r(L.wv), r(L.wo), r(L.gate), r(L.up), r(L.down);
}

// ---------------------------------------------------------------- naive float64 forward

// Logits [tokens.size()][vocab] of every position, attention dense and causal.
inline std::vector<std::vector<double>> reference_logits(const Weights& w, const std::vector<int32_t>& tokens) {
  const Config& c = w.c;
  const int H = c.hidden, I = c.inter, hd = c.head_dim, nh = c.heads, nkv = c.kv_heads, half = hd / 2;
  const int qw = nh * hd, kw = nkv * hd;
  auto matvec = [](const std::vector<float>& W, const std::vector<double>& x, int rows, int cols) {
    std::vector<double> y(rows, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < cols; ++k) y[r] += double(W[size_t(r) * cols + k]) * x[k];
    return y;
  };
  auto rmsnorm = [&](const double* x, const std::vector<float>& g, int n) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    double inv = 1.0 / std::sqrt(ss / n + c.eps);
    std::vector<double> y(n);
    for (int i = 0; i < n; ++i) y[i] = x[i] * inv * g[i];
    return y;
  };
  auto rope = [&](double* x, int pos) {  // rotate-half: channel i pairs with i + d/2
    for (int i = 0; i < half; ++i) {
      double a = pos * std::pow(c.theta, -2.0 * i / hd);
      double x0 = x[i], x1 = x[i + half];
      x[i] = x0 * std::cos(a) - x1 * std::sin(a);
      x[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
    }
  };
  std::vector<std::vector<std::vector<double>>> K(c.layers), V(c.layers);  // [layer][pos][kw]
  std::vector<std::vector<double>> out;
  for (size_t t = 0; t < tokens.size(); ++t) {
    std::vector<double> x(H);
    for (int i = 0; i < H; ++i) x[i] = w.embed[size_t(tokens[t]) * H + i];
    for (int l = 0; l < c.layers; ++l) {
      const Layer& L = w.layers[l];
      std::vector<double> h = rmsnorm(x.data(), L.attn_norm, H);
      std::vector<double> q = matvec(L.wq, h, qw, H), k = matvec(L.wk, h, kw, H), v = matvec(L.wv, h, kw, H);
      if (c.bias) {
        for (int i = 0; i < qw; ++i) q[i] += L.bq[i];
        for (int i = 0; i < kw; ++i) k[i] += L.bk[i], v[i] += L.bv[i];
      }
      for (int g = 0; g < nh; ++g) {
        if (c.qk_norm) {
          auto n = rmsnorm(&q[size_t(g) * hd], L.q_norm, hd);
          std::copy(n.begin(), n.end(), q.begin() + size_t(g) * hd);
        }
        rope(&q[size_t(g) * hd], int(t));
      }
      for (int g = 0; g < nkv; ++g) {
        if (c.qk_norm) {
          auto n = rmsnorm(&k[size_t(g) * hd], L.k_norm, hd);
          std::copy(n.begin(), n.end(), k.begin() + size_t(g) * hd);
        }
        rope(&k[size_t(g) * hd], int(t));
      }
      K[l].push_back(k);
      V[l].push_back(v);
      std::vector<double> att(qw, 0.0);
      for (int g = 0; g < nh; ++g) {
        const int kh = g / (nh / nkv);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (size_t u = 0; u <= t; ++u) {
          double d = 0;
          for (int i = 0; i < hd; ++i) d += q[size_t(g) * hd + i] * K[l][u][size_t(kh) * hd + i];
          s[u] = d / std::sqrt(double(hd));
          mx = std::max(mx, s[u]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (size_t u = 0; u <= t; ++u)
          for (int i = 0; i < hd; ++i) att[size_t(g) * hd + i] += s[u] / sum * V[l][u][size_t(kh) * hd + i];
      }
      std::vector<double> o = matvec(L.wo, att, H, qw);
      for (int i = 0; i < H; ++i) x[i] += o[i];
      std::vector<double> h2 = rmsnorm(x.data(), L.ffn_norm, H);
      std::vector<double> gt = matvec(L.gate, h2, I, H), up = matvec(L.up, h2, I, H);
      for (int i = 0; i < I; ++i) gt[i] = gt[i] / (1.0 + std::exp(-gt[i])) * up[i];
      std::vector<double> d = matvec(L.down, gt, H, I);
      for (int i = 0; i < H; ++i) x[i] += d[i];
    }
    std::vector<double> f = rmsnorm(x.data(), w.final_norm, H);
    out.push_back(matvec(c.tied ? w.embed : w.lm_head, f, c.vocab, H));
  }
  return out;
}

// --------------------------------------------------------------------------- writers

inline std::string config_json(const Config& c) {
  std::string j = "{\n";
  j += "  \"architectures\": [\"X\"],\n";
  j += "  \"model_type\": \"" + c.family + "\",\n";
  j += "  \"hidden_size\": " + std::to_string(c.hidden) + ",\n";
  j += "  \"intermediate_size\": " + std::to_string(c.inter) + ",\n";
  j += "  \"num_hidden_layers\": " + std::to_string(c.layers) + ",\n";
  j += "  \"num_attention_heads\": " + std::to_string(c.heads) + ",\n";
  j += "  \"num_key_value_heads\": " + std::to_string(c.kv_heads) + ",\n";
  j += "  \"head_dim\": " + std::to_string(c.head_dim) + ",\n";
  j += "  \"vocab_size\": " + std::to_string(c.vocab) + ",\n";
  j += "  \"rms_norm_eps\": " + std::to_string(c.eps) + ",\n";
  j += "  \"rope_theta\": " + std::to_string(c.theta) + ",\n";
  j += "  \"rope_scaling\": null,\n";
  j += "  \"hidden_act\": \"silu\",\n";
  j += "  \"max_position_embeddings\": " + std::to_string(c.context) + ",\n";
  j += std::string("  \"tie_word_embeddings\": ") + (c.tied ? "true" : "false") + ",\n";
  if (c.family != "qwen2") j += std::string("  \"attention_bias\": ") + (c.bias ? "true" : "false") + ",\n";
  j += "  \"bos_token_id\": " + std::to_string(c.bos) + ",\n";
  j += "  \"eos_token_id\": " + std::to_string(c.eos) + "\n}\n";
  return j;
}

// A Hugging Face folder: config.json + model.safetensors (matrices in `dtype`, vectors f32).
inline void write_safetensors(const Weights& w, const std::string& dir, multipole::DType dtype = multipole::DType::F32) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const Config& c = w.c;
  const int64_t H = c.hidden, I = c.inter, qw = int64_t(c.heads) * c.head_dim, kw = int64_t(c.kv_heads) * c.head_dim;
  multipole::SafetensorsWriter sw;
  sw.add("model.embed_tokens.weight", {c.vocab, H}, w.embed.data(), dtype);
  if (!c.tied) sw.add("lm_head.weight", {c.vocab, H}, w.lm_head.data(), dtype);
  sw.add("model.norm.weight", {H}, w.final_norm.data());
  for (int l = 0; l < c.layers; ++l) {
    const Layer& L = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    sw.add(p + "input_layernorm.weight", {H}, L.attn_norm.data());
    sw.add(p + "post_attention_layernorm.weight", {H}, L.ffn_norm.data());
    sw.add(p + "self_attn.q_proj.weight", {qw, H}, L.wq.data(), dtype);
    sw.add(p + "self_attn.k_proj.weight", {kw, H}, L.wk.data(), dtype);
    sw.add(p + "self_attn.v_proj.weight", {kw, H}, L.wv.data(), dtype);
    sw.add(p + "self_attn.o_proj.weight", {H, qw}, L.wo.data(), dtype);
    sw.add(p + "mlp.gate_proj.weight", {I, H}, L.gate.data(), dtype);
    sw.add(p + "mlp.up_proj.weight", {I, H}, L.up.data(), dtype);
    sw.add(p + "mlp.down_proj.weight", {H, I}, L.down.data(), dtype);
    if (c.bias) {
      sw.add(p + "self_attn.q_proj.bias", {qw}, L.bq.data());
      sw.add(p + "self_attn.k_proj.bias", {kw}, L.bk.data());
      sw.add(p + "self_attn.v_proj.bias", {kw}, L.bv.data());
    }
    if (c.qk_norm) {
      sw.add(p + "self_attn.q_norm.weight", {c.head_dim}, L.q_norm.data());
      sw.add(p + "self_attn.k_norm.weight", {c.head_dim}, L.k_norm.data());
    }
  }
  sw.write(dir + "/model.safetensors");
  std::ofstream(dir + "/config.json") << config_json(c);
}

// GGUF v3 bytes, built field by field from the format description.
class GGUFBuilder {
 public:
  enum Type : uint32_t { U32 = 4, I32 = 5, F32 = 6, Bool = 7, String = 8, Array = 9 };
  void kv_u32(const std::string& k, uint32_t v) { key(k, U32), pod(v), ++n_kv_; }
  void kv_f32(const std::string& k, float v) { key(k, F32), pod(v), ++n_kv_; }
  void kv_str(const std::string& k, const std::string& v) { key(k, String), str(v), ++n_kv_; }
  void kv_bool(const std::string& k, bool v) { key(k, Bool), pod(uint8_t(v)), ++n_kv_; }
  // ggml_type 0 = F32, 1 = F16, 8 = Q8_0. values: rows x cols (row-major), dims [cols, rows].
  void tensor(const std::string& name, const std::vector<float>& values, int64_t rows, int64_t cols, uint32_t type) {
    std::vector<uint8_t> data;
    if (type == 0) {
      data.resize(values.size() * 4);
      std::memcpy(data.data(), values.data(), data.size());
    } else if (type == 1) {
      for (float x : values) {
        uint16_t h = multipole::f32_to_f16(x);
        data.push_back(uint8_t(h)), data.push_back(uint8_t(h >> 8));
      }
    } else {  // Q8_0: per 32 values an f16 scale d = max|x| / 127 and int8 q = round(x / d)
      for (size_t b = 0; b < values.size(); b += 32) {
        float amax = 0;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(values[b + i]));
        const float d = amax / 127.0f;
        const uint16_t dh = multipole::f32_to_f16(d);
        data.push_back(uint8_t(dh)), data.push_back(uint8_t(dh >> 8));
        const float id = d ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; ++i) data.push_back(uint8_t(int8_t(std::lround(values[b + i] * id))));
      }
    }
    tensors_.push_back({name, rows, cols, type, std::move(data)});
  }
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out;
    auto put = [&](const void* p, size_t n) { out.insert(out.end(), (const uint8_t*)p, (const uint8_t*)p + n); };
    auto put64 = [&](uint64_t v) { put(&v, 8); };
    put("GGUF", 4);
    uint32_t version = 3;
    put(&version, 4);
    put64(tensors_.size());
    put64(n_kv_);
    out.insert(out.end(), kv_.begin(), kv_.end());
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      put64(t.name.size()), put(t.name.data(), t.name.size());
      const bool vec = t.rows == 1;
      uint32_t nd = vec ? 1 : 2;
      put(&nd, 4);
      put64(uint64_t(t.cols));
      if (!vec) put64(uint64_t(t.rows));
      put(&t.type, 4);
      put64(offset);
      offsets.push_back(offset);
      offset += (t.data.size() + 31) / 32 * 32;
    }
    out.resize((out.size() + 31) / 32 * 32, 0);
    const size_t base = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      out.resize(base + offsets[i], 0);
      out.insert(out.end(), tensors_[i].data.begin(), tensors_[i].data.end());
    }
    out.resize((out.size() + 31) / 32 * 32, 0);
    return out;
  }
  void write(const std::string& path) const {
    auto b = bytes();
    std::ofstream(path, std::ios::binary).write((const char*)b.data(), std::streamsize(b.size()));
  }

 private:
  struct T {
    std::string name;
    int64_t rows, cols;
    uint32_t type;
    std::vector<uint8_t> data;
  };
  template <class V> void pod(V v) { kv_.insert(kv_.end(), (uint8_t*)&v, (uint8_t*)&v + sizeof(V)); }
  void str(const std::string& s) { pod(uint64_t(s.size())), kv_.insert(kv_.end(), s.begin(), s.end()); }
  void key(const std::string& k, uint32_t type) { str(k), pod(type); }
  std::vector<uint8_t> kv_;
  uint64_t n_kv_ = 0;
  std::vector<T> tensors_;
};

// llama.cpp's converter (LlamaModel.permute): per head, rows (j, i) -> (i, j), i.e. HF row
// j * d/2 + i goes to row 2i + j, so that GGML's interleaved RoPE sees pairs (2i, 2i+1).
inline std::vector<float> permute_rows(const std::vector<float>& w, int heads, int head_dim, int cols) {
  std::vector<float> out(w.size());
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h)
    for (int j = 0; j < 2; ++j)
      for (int i = 0; i < half; ++i)
        std::memcpy(&out[(size_t(h) * head_dim + 2 * i + j) * cols], &w[(size_t(h) * head_dim + j * half + i) * cols],
                    size_t(cols) * 4);
  return out;
}

// The tiny model as a GGUF file (llama.cpp tensor names and metadata keys). Matrices in
// `type` (0 F32, 1 F16, 8 Q8_0), vectors F32.
inline GGUFBuilder gguf_builder(const Weights& w, uint32_t type = 0) {
  const Config& c = w.c;
  const std::string a = c.family;
  GGUFBuilder g;
  g.kv_str("general.architecture", a);
  g.kv_str("general.name", "tiny " + a);
  g.kv_u32(a + ".block_count", uint32_t(c.layers));
  g.kv_u32(a + ".context_length", uint32_t(c.context));
  g.kv_u32(a + ".embedding_length", uint32_t(c.hidden));
  g.kv_u32(a + ".feed_forward_length", uint32_t(c.inter));
  g.kv_u32(a + ".attention.head_count", uint32_t(c.heads));
  g.kv_u32(a + ".attention.head_count_kv", uint32_t(c.kv_heads));
  g.kv_u32(a + ".attention.key_length", uint32_t(c.head_dim));
  g.kv_u32(a + ".attention.value_length", uint32_t(c.head_dim));
  g.kv_f32(a + ".rope.freq_base", float(c.theta));
  g.kv_f32(a + ".attention.layer_norm_rms_epsilon", float(c.eps));
  g.kv_u32(a + ".vocab_size", uint32_t(c.vocab));
  g.kv_u32("tokenizer.ggml.bos_token_id", uint32_t(c.bos));
  g.kv_u32("tokenizer.ggml.eos_token_id", uint32_t(c.eos));
  const bool permute = a == "llama";
  const int H = c.hidden, I = c.inter, qw = c.heads * c.head_dim, kw = c.kv_heads * c.head_dim;
  g.tensor("token_embd.weight", w.embed, c.vocab, H, type);
  if (!c.tied) g.tensor("output.weight", w.lm_head, c.vocab, H, type);
  g.tensor("output_norm.weight", w.final_norm, 1, H, 0);
  for (int l = 0; l < c.layers; ++l) {
    const Layer& L = w.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    g.tensor(p + "attn_norm.weight", L.attn_norm, 1, H, 0);
    g.tensor(p + "ffn_norm.weight", L.ffn_norm, 1, H, 0);
    g.tensor(p + "attn_q.weight", permute ? permute_rows(L.wq, c.heads, c.head_dim, H) : L.wq, qw, H, type);
    g.tensor(p + "attn_k.weight", permute ? permute_rows(L.wk, c.kv_heads, c.head_dim, H) : L.wk, kw, H, type);
    g.tensor(p + "attn_v.weight", L.wv, kw, H, type);
    g.tensor(p + "attn_output.weight", L.wo, H, qw, type);
    g.tensor(p + "ffn_gate.weight", L.gate, I, H, type);
    g.tensor(p + "ffn_up.weight", L.up, I, H, type);
    g.tensor(p + "ffn_down.weight", L.down, H, I, type);
    if (c.bias) {
      g.tensor(p + "attn_q.bias", permute ? permute_rows(L.bq, c.heads, c.head_dim, 1) : L.bq, 1, qw, 0);
      g.tensor(p + "attn_k.bias", permute ? permute_rows(L.bk, c.kv_heads, c.head_dim, 1) : L.bk, 1, kw, 0);
      g.tensor(p + "attn_v.bias", L.bv, 1, kw, 0);
    }
    if (c.qk_norm) {
      g.tensor(p + "attn_q_norm.weight", L.q_norm, 1, c.head_dim, 0);
      g.tensor(p + "attn_k_norm.weight", L.k_norm, 1, c.head_dim, 0);
    }
  }
  return g;
}

// Q8_0 as the writer stores it, decoded by the test itself (the reference's view of it).
inline void round_through_q8_0(Weights& w) {
  auto r = [](std::vector<float>& v) {
    for (size_t b = 0; b < v.size(); b += 32) {
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[b + i]));
      const float d = multipole::f16_to_f32(multipole::f32_to_f16(amax / 127.0f));
      const float id = amax / 127.0f ? 1.0f / (amax / 127.0f) : 0.0f;
      for (int i = 0; i < 32; ++i) v[b + i] = d * float(int8_t(std::lround(v[b + i] * id)));
    }
  };
  r(w.embed), r(w.lm_head);
  for (Layer& L : w.layers) r(L.wq), r(L.wk), r(L.wv), r(L.wo), r(L.gate), r(L.up), r(L.down);
}

inline std::string temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("multipole-model-test-" + std::to_string(::getpid()) + "-" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

}  // namespace tiny
