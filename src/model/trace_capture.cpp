#include "multipole/model/trace_capture.hpp"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>

#include "multipole/core/error.hpp"

namespace multipole {

TraceCapture::TraceCapture(const Model& model, std::vector<int> layers) : model_(model), layers_(std::move(layers)) {
  const int L = model.config().num_layers;
  MP_CHECK(!layers_.empty(), "trace capture: no layers chosen");
  slot_.assign(size_t(L), -1);
  for (int l : layers_) {
    MP_CHECK(l >= 0 && l < L, "trace capture: layer {} is outside the model's layers [0, {})", l, L);
    MP_CHECK(slot_[size_t(l)] < 0, "trace capture: layer {} is listed twice", l);
    slot_[size_t(l)] = int(data_.size());
    data_.emplace_back();
  }
}

void TraceCapture::on_qkv(const QKVRows& r) {
  if (!error_.empty() || r.layer < 0 || r.layer >= int(slot_.size())) return;
  const ModelConfig& c = model_.config();
  const int64_t qw = int64_t(c.num_heads) * c.head_dim, kw = int64_t(c.num_kv_heads) * c.head_dim;
  // Positions are counted on the first layer of every forward (each forward visits all).
  const bool first_layer = r.layer == 0;
  for (int64_t row = 0; row < r.rows(); ++row) {
    if (seq_ < 0) seq_ = r.seq(row);
    if (r.seq(row) != seq_) continue;
    const int64_t pos = r.positions[size_t(row)];
    if (first_layer) {
      if (pos != tokens_) {
        error_ = fmt::format("position {} arrived when {} positions were captured (rows must come in order)", pos,
                             tokens_);
        return;
      }
      if (!r.decode && generated_ > 0) {
        error_ = fmt::format("a prefill at position {} came after {} decode steps; a trace holds one prompt, then "
                             "generated tokens",
                             pos, generated_);
        return;
      }
      ++tokens_;
      if (r.decode) ++generated_;
    }
    const int s = slot_[size_t(r.layer)];
    if (s < 0) continue;
    LayerData& d = data_[size_t(s)];
    d.k.insert(d.k.end(), r.k + row * kw, r.k + (row + 1) * kw);
    d.v.insert(d.v.end(), r.v + row * kw, r.v + (row + 1) * kw);
    if (r.decode) d.q.insert(d.q.end(), r.q + row * qw, r.q + (row + 1) * qw);
  }
}

Trace TraceCapture::trace(int layer) const {
  MP_CHECK(error_.empty(), "trace capture: {}", error_);
  MP_CHECK(layer >= 0 && layer < int(slot_.size()) && slot_[size_t(layer)] >= 0,
           "trace capture: layer {} was not captured", layer);
  MP_CHECK(generated_ >= 1,
           "trace capture: no decode step was captured ({} prompt tokens); a trace needs at least one generated "
           "token fed back (generate 2 or more)",
           tokens_);
  const ModelConfig& c = model_.config();
  const LayerData& d = data_[size_t(slot_[size_t(layer)])];
  Trace t;
  t.tokens = tokens_;
  t.generated = generated_;
  t.num_q_heads = c.num_heads;
  t.num_kv_heads = c.num_kv_heads;
  t.head_dim = int(c.head_dim);
  t.q = d.q;
  t.k = d.k;
  t.v = d.v;
  t.rope = model_.attention_config().rope;
  t.metadata["model"] = model_.path();
  t.metadata["architecture"] = c.architecture;
  t.metadata["layer"] = std::to_string(layer);
  t.validate(fmt::format("trace capture of layer {}", layer));
  return t;
}

std::vector<std::string> TraceCapture::write(const std::string& file, DType dtype) const {
  std::vector<std::string> paths;
  for (int l : layers_) {
    paths.push_back(trace_layer_path(file, l));
    write_trace(paths.back(), trace(l), dtype);
  }
  return paths;
}

std::vector<int> parse_trace_layers(const std::string& list, int num_layers) {
  std::vector<int> out;
  if (list.empty()) {
    out = {0};
    if (num_layers > 1) out.push_back(num_layers - 1);
    return out;
  }
  if (list == "all") {
    for (int l = 0; l < num_layers; ++l) out.push_back(l);
    return out;
  }
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    const std::string word = list.substr(start, end - start);
    int v = 0;
    auto [p, ec] = std::from_chars(word.data(), word.data() + word.size(), v);
    MP_CHECK(ec == std::errc() && p == word.data() + word.size() && !word.empty(),
             "--layers: '{}' is not a layer index (give e.g. 0,5,-1 or all)", word);
    const int l = v < 0 ? num_layers + v : v;
    MP_CHECK(l >= 0 && l < num_layers, "--layers: layer {} is outside the model's {} layers", v, num_layers);
    if (std::find(out.begin(), out.end(), l) == out.end()) out.push_back(l);
    start = end + 1;
  }
  return out;
}

std::string trace_layer_path(const std::string& file, int layer) {
  constexpr std::string_view ext = ".safetensors";
  std::string stem = file;
  if (stem.size() > ext.size() && stem.compare(stem.size() - ext.size(), ext.size(), ext) == 0)
    stem.resize(stem.size() - ext.size());
  return fmt::format("{}.L{}{}", stem, layer, ext);
}

}  // namespace multipole
