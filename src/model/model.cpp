// Loading a checkpoint: GGUF file or Hugging Face safetensors folder, bound to the shared
// transformer weights layout. Big matrices stay in the mapping; every tensor is checked for
// presence, shape and dtype before the first forward.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/json_integer.hpp"
#include "model/model_impl.hpp"
#include "multipole/core/error.hpp"

namespace multipole {

namespace fs = std::filesystem;

int64_t Weight::bytes() const { return rows * quant_row_bytes(type, cols); }

bool is_gguf_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[4] = {};
  return f && f.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  MP_CHECK(f, "{}: cannot open", p.string());
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Which tensor of the shared layout, and its name in each format ("{}" = layer index).
enum class Role { Embed, OutputNorm, Output, AttnNorm, Q, K, V, O, QBias, KBias, VBias, QNorm, KNorm, FfnNorm, Gate, Up, Down };
struct RoleNames {
  Role role;
  const char* gguf;
  const char* hf;
};
constexpr RoleNames kNames[] = {
    {Role::Embed, "token_embd.weight", "model.embed_tokens.weight"},
    {Role::OutputNorm, "output_norm.weight", "model.norm.weight"},
    {Role::Output, "output.weight", "lm_head.weight"},
    {Role::AttnNorm, "blk.{}.attn_norm.weight", "model.layers.{}.input_layernorm.weight"},
    {Role::Q, "blk.{}.attn_q.weight", "model.layers.{}.self_attn.q_proj.weight"},
    {Role::K, "blk.{}.attn_k.weight", "model.layers.{}.self_attn.k_proj.weight"},
    {Role::V, "blk.{}.attn_v.weight", "model.layers.{}.self_attn.v_proj.weight"},
    {Role::O, "blk.{}.attn_output.weight", "model.layers.{}.self_attn.o_proj.weight"},
    {Role::QBias, "blk.{}.attn_q.bias", "model.layers.{}.self_attn.q_proj.bias"},
    {Role::KBias, "blk.{}.attn_k.bias", "model.layers.{}.self_attn.k_proj.bias"},
    {Role::VBias, "blk.{}.attn_v.bias", "model.layers.{}.self_attn.v_proj.bias"},
    {Role::QNorm, "blk.{}.attn_q_norm.weight", "model.layers.{}.self_attn.q_norm.weight"},
    {Role::KNorm, "blk.{}.attn_k_norm.weight", "model.layers.{}.self_attn.k_norm.weight"},
    {Role::FfnNorm, "blk.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight"},
    {Role::Gate, "blk.{}.ffn_gate.weight", "model.layers.{}.mlp.gate_proj.weight"},
    {Role::Up, "blk.{}.ffn_up.weight", "model.layers.{}.mlp.up_proj.weight"},
    {Role::Down, "blk.{}.ffn_down.weight", "model.layers.{}.mlp.down_proj.weight"},
};

// Finds tensors by role in either format and checks them against the expected shape.
class Binder {
 public:
  Binder(const GGUFFile* gguf, const SafetensorsCheckpoint* st, std::string source)
      : gguf_(gguf), st_(st), source_(std::move(source)) {}

  std::string name(Role role, int layer) const {
    for (const RoleNames& n : kNames)
      if (n.role == role) return fmt::format(fmt::runtime(gguf_ ? n.gguf : n.hf), layer);
    fail("model: unknown tensor role");
  }
  bool has(Role role, int layer = 0) const {
    const std::string n = name(role, layer);
    return gguf_ ? gguf_->find_tensor(n) != nullptr : st_->find(n) != nullptr;
  }

  // A matrix W [rows, cols] kept in the mapping.
  Weight matrix(Role role, int layer, int64_t rows, int64_t cols) const {
    Weight w = locate(role, layer, 2);
    MP_CHECK(w.rows == rows && w.cols == cols, "{}: tensor '{}' has shape [{}, {}], expected [{}, {}]", source_, w.name,
             w.rows, w.cols, rows, cols);
    const QuantTraits t = quant_traits(w.type);
    MP_CHECK(cols % t.block_size == 0, "{}: tensor '{}' ({}) has {} columns, not a multiple of its block size {}",
             source_, w.name, t.name, cols, t.block_size);
    const int64_t align = t.block_size == 1 ? t.block_bytes : 1;
    MP_CHECK(reinterpret_cast<uintptr_t>(w.data) % align == 0, "{}: tensor '{}' data is not aligned to {} bytes",
             source_, w.name, align);
    return w;
  }
  // A vector [n] converted to f32.
  std::vector<float> vector(Role role, int layer, int64_t n) const {
    Weight w = locate(role, layer, 1);
    MP_CHECK(w.cols == n, "{}: tensor '{}' has {} elements, expected {}", source_, w.name, w.cols, n);
    std::vector<float> out(static_cast<size_t>(n));
    if (st_) {
      st_->tensor(w.name).to_f32(out.data());
    } else {
      const QuantTraits t = quant_traits(w.type);
      MP_CHECK(n % t.block_size == 0, "{}: tensor '{}' ({}) has {} elements, not a multiple of its block size {}",
               source_, w.name, t.name, n, t.block_size);
      dequantize_row(w.type, w.data, out.data(), n);
    }
    for (float v : out)
      MP_CHECK(std::isfinite(v), "{}: tensor '{}' holds a non-finite value", source_, w.name);
    return out;
  }

 private:
  Weight locate(Role role, int layer, int rank) const {
    Weight w;
    w.name = name(role, layer);
    if (gguf_) {
      const GGUFTensor* t = gguf_->find_tensor(w.name);
      MP_CHECK(t, "{}: missing tensor '{}'", source_, w.name);
      auto q = quant_type_from_ggml(uint32_t(t->type));
      MP_CHECK(q, "{}: tensor '{}' has type {}, which has no kernels here", source_, w.name, ggml_type_name(t->type));
      MP_CHECK(int(t->dims.size()) == rank, "{}: tensor '{}' has dims {}, expected {} dimension(s)", source_, w.name,
               t->dims_string(), rank);
      w.type = *q;
      w.cols = int64_t(t->dims[0]);
      w.rows = rank == 2 ? int64_t(t->dims[1]) : 1;
      w.data = t->data.data();
    } else {
      const SafetensorsTensor* t = st_->find(w.name);
      MP_CHECK(t, "{}: missing tensor '{}'", source_, w.name);
      MP_CHECK(t->rank() == rank, "{}: tensor '{}' has shape {}, expected {} dimension(s)", source_, w.name,
               t->shape_string(), rank);
      switch (t->dtype) {
        case SafetensorsDType::F32: w.type = QuantType::F32; break;
        case SafetensorsDType::F16: w.type = QuantType::F16; break;
        case SafetensorsDType::BF16: w.type = QuantType::BF16; break;
        default:
          fail("{}: tensor '{}' has dtype {} (supported: F32, F16, BF16)", source_, w.name,
               safetensors_dtype_name(t->dtype));
      }
      w.cols = t->shape.back();
      w.rows = rank == 2 ? t->shape[0] : 1;
      w.data = t->bytes.data();
    }
    return w;
  }

  const GGUFFile* gguf_;
  const SafetensorsCheckpoint* st_;
  std::string source_;
};

std::vector<TensorInfo> list_tensors(const GGUFFile* gguf, const SafetensorsCheckpoint* st) {
  std::vector<TensorInfo> out;
  if (gguf) {
    for (const GGUFTensor& t : gguf->tensors()) {
      TensorInfo i{t.name, ggml_type_name(t.type), {}, int64_t(t.n_bytes)};
      for (auto it = t.dims.rbegin(); it != t.dims.rend(); ++it) i.shape.push_back(int64_t(*it));
      out.push_back(std::move(i));
    }
  } else {
    for (std::string_view n : st->names()) {
      const SafetensorsTensor& t = st->tensor(n);
      out.push_back({t.name, std::string(safetensors_dtype_name(t.dtype)), t.shape, int64_t(t.end - t.begin)});
    }
  }
  return out;
}

}  // namespace

Model::Model() : impl_(std::make_unique<Impl>()) {}
Model::~Model() = default;

const GGUFFile* Model::gguf() const { return impl_->gguf.get(); }

std::unique_ptr<Model> Model::load(const std::string& path, const ModelLoadOptions& options) {
  std::unique_ptr<Model> m(new Model());
  Impl& im = *m->impl_;
  m->path_ = path;
  std::error_code ec;
  MP_CHECK(fs::exists(path, ec), "{}: no such file or folder", path);
  std::string source = path;
  if (fs::is_regular_file(path, ec) && is_gguf_file(path)) {
    m->format_ = "gguf";
    im.gguf = std::make_unique<GGUFFile>(path);
    m->config_ = model_config_from_gguf(*im.gguf);
    im.spec = model::find_family_gguf(m->config_.architecture);
  } else {
    // A folder, a .safetensors file or an index: config.json sits in the same folder.
    const fs::path dir = fs::is_directory(path, ec) ? fs::path(path) : fs::path(path).parent_path();
    const fs::path cfg = dir / "config.json";
    MP_CHECK(fs::exists(cfg, ec),
             "{}: not a GGUF file, and no config.json in {} (a Hugging Face model folder needs config.json and "
             "*.safetensors)",
             path, dir.string());
    m->format_ = "safetensors";
    m->config_ = model_config_from_hf_json(read_text(cfg), cfg.string());
    // generation_config.json lists the end-of-turn tokens of chat models.
    if (const fs::path gen = dir / "generation_config.json"; fs::exists(gen, ec)) {
      auto j = nlohmann::json::parse(read_text(gen), nullptr, false);
      if (j.is_object()) {
        auto add = [&](const nlohmann::json& e) {
          const std::optional<int64_t> id = json_int64(e);
          if (!id || *id < 0 || *id >= m->config_.vocab_size) return;
          for (int32_t x : m->config_.eos_ids)
            if (x == *id) return;
          m->config_.eos_ids.push_back(int32_t(*id));
        };
        if (auto it = j.find("eos_token_id"); it != j.end()) {
          if (it->is_array())
            for (const auto& e : *it) add(e);
          else
            add(*it);
        }
      }
    }
    im.safetensors = std::make_unique<SafetensorsCheckpoint>(fs::is_directory(path, ec) ? dir.string() : path);
    im.spec = model::find_family_hf(m->config_.architecture);
    source = im.safetensors->path();
  }
  m->tensors_ = list_tensors(im.gguf.get(), im.safetensors.get());
  im.permuted_qk = im.gguf && im.spec->gguf_permuted_qk;
  im.rope = Rope(m->config_.rope);
  if (!options.bind_weights) return m;

  const ModelConfig& c = m->config_;
  const Binder b(im.gguf.get(), im.safetensors.get(), source);
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t qw = int64_t(c.num_heads) * hd, kw = int64_t(c.num_kv_heads) * hd;
  im.embed = b.matrix(Role::Embed, 0, c.vocab_size, H);
  im.output_norm = b.vector(Role::OutputNorm, 0, H);
  if (!c.tied_embeddings || b.has(Role::Output)) {
    MP_CHECK(b.has(Role::Output), "{}: missing tensor '{}' (tie_word_embeddings is false)", source,
             b.name(Role::Output, 0));
    im.output = b.matrix(Role::Output, 0, c.vocab_size, H);
  } else {
    im.output = im.embed;
  }
  im.layers.resize(size_t(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = im.layers[size_t(l)];
    L.attn_norm = b.vector(Role::AttnNorm, l, H);
    L.ffn_norm = b.vector(Role::FfnNorm, l, H);
    L.wq = b.matrix(Role::Q, l, qw, H);
    L.wk = b.matrix(Role::K, l, kw, H);
    L.wv = b.matrix(Role::V, l, kw, H);
    L.wo = b.matrix(Role::O, l, H, qw);
    L.gate = b.matrix(Role::Gate, l, I, H);
    L.up = b.matrix(Role::Up, l, I, H);
    L.down = b.matrix(Role::Down, l, H, I);
    if (c.qkv_bias) {
      L.bq = b.vector(Role::QBias, l, qw);
      L.bk = b.vector(Role::KBias, l, kw);
      L.bv = b.vector(Role::VBias, l, kw);
    }
    if (c.qk_norm) {
      L.q_norm = b.vector(Role::QNorm, l, hd);
      L.k_norm = b.vector(Role::KNorm, l, hd);
    }
  }
  return m;
}

int64_t Model::weight_bytes() const {
  const Impl& im = *impl_;
  int64_t total = im.output.bytes();
  for (const LayerWeights& L : im.layers)
    for (const Weight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.gate, &L.up, &L.down}) total += w->bytes();
  return total;
}

AttentionConfig Model::attention_config() const {
  AttentionConfig a;
  a.num_q_heads = config_.num_heads;
  a.num_kv_heads = config_.num_kv_heads;
  a.head_dim = config_.head_dim;
  a.rope = config_.rope;
  return a;
}

KVCacheConfig Model::kv_cache_config(int64_t max_tokens, DType dtype, int page_size) const {
  KVCacheConfig k;
  k.num_layers = config_.num_layers;
  k.num_kv_heads = config_.num_kv_heads;
  k.head_dim = config_.head_dim;
  k.page_size = page_size;
  k.dtype = dtype;
  k.max_tokens = max_tokens;
  return k;
}

void Model::set_prefill_chunk(int tokens) {
  MP_CHECK(tokens >= 1 && tokens <= 65536, "model: prefill chunk {} must be in [1, 65536]", tokens);
  impl_->prefill_chunk = tokens;
}

void Model::set_prefill_progress(PrefillProgress progress) { impl_->prefill_progress = std::move(progress); }

void Model::set_observer(ForwardObserver* observer) { impl_->observer = observer; }

void Model::set_activation_precision(ActivationPrecision precision) { impl_->activations = precision; }

void Model::prefill(PagedKVCache& cache, SeqId seq, std::span<const int32_t> tokens, AttentionPolicy& policy,
                    ThreadPool& pool, float* logits, float* all_logits) {
  MP_CHECK(!impl_->layers.empty(), "{}: the model was loaded without its weights", path_);
  MP_CHECK(!tokens.empty(), "prefill: no tokens");
  const int64_t V = config_.vocab_size;
  const size_t chunk = size_t(impl_->prefill_chunk);
  for (size_t s = 0; s < tokens.size(); s += chunk) {
    const size_t n = std::min(chunk, tokens.size() - s);
    const bool last = s + n == tokens.size();
    const SeqId seqs[1] = {seq};
    const int64_t first = cache.length(seq);
    float* out = all_logits ? all_logits + int64_t(s) * V : (last ? logits : nullptr);
    // The policy indexes the prompt after its last chunk only (see model.hpp).
    impl_->forward(config_, cache, seqs, first, tokens.subspan(s, n), false, last, policy, pool, out,
                   all_logits != nullptr, stats_);
    if (all_logits && last && logits) std::memcpy(logits, all_logits + int64_t(tokens.size() - 1) * V, size_t(V) * 4);
    if (impl_->prefill_progress) impl_->prefill_progress(int64_t(s + n), int64_t(tokens.size()));
  }
}

void Model::decode(PagedKVCache& cache, std::span<const SeqId> seqs, std::span<const int32_t> tokens,
                   AttentionPolicy& policy, ThreadPool& pool, float* logits) {
  MP_CHECK(!impl_->layers.empty(), "{}: the model was loaded without its weights", path_);
  MP_CHECK(seqs.size() == tokens.size(), "decode: {} sequences but {} tokens", seqs.size(), tokens.size());
  if (seqs.empty()) return;
  impl_->forward(config_, cache, seqs, -1, tokens, true, true, policy, pool, logits, true, stats_);
}

}  // namespace multipole
