#pragma once
// Captures attention traces (io/trace.hpp) from a real generation: the pre-RoPE q, k, v of
// chosen layers of one sequence, as `multipole generate --dump-trace` writes them for
// `multipole attn`. Set it as the model's ForwardObserver, prefill the prompt, decode, then
// write. Keys and values are kept for every position (prompt and generated); queries only for
// the decode steps, so query t belongs to position N - T + t as the trace format says. The
// trace carries the model's full RoPE (rope_theta, rotary_dim, rope_scaling).
#include <cstdint>
#include <string>
#include <vector>

#include "multipole/io/trace.hpp"
#include "multipole/model/model.hpp"

namespace multipole {

class TraceCapture : public ForwardObserver {
 public:
  // layers: distinct layer indices of `model` (throws naming one out of range).
  TraceCapture(const Model& model, std::vector<int> layers);

  // Follows the first sequence it sees and ignores the others. Rows must arrive in position
  // order, the prompt (prefill) before any decode step.
  void on_qkv(const QKVRows& rows) override;

  const std::vector<int>& layers() const { return layers_; }
  int64_t tokens() const { return tokens_; }        // N so far
  int64_t generated() const { return generated_; }  // T so far (decode steps)

  // The trace of one captured layer; throws when no decode step was seen (a trace needs at
  // least one query) or the rows broke the order above.
  Trace trace(int layer) const;
  // Writes every captured layer's trace (q, k, v stored as `dtype`) to
  // trace_layer_path(file, layer); returns the paths written.
  std::vector<std::string> write(const std::string& file, DType dtype = DType::F32) const;

 private:
  struct LayerData {
    std::vector<float> q, k, v;
  };
  const Model& model_;
  std::vector<int> layers_;
  std::vector<int> slot_;  // per model layer: index into data_, or -1
  std::vector<LayerData> data_;
  SeqId seq_ = -1;
  int64_t tokens_ = 0, generated_ = 0;
  std::string error_;  // first order violation, reported by trace()
};

// The layers of a --layers list for a model of `num_layers`: "" gives the first and the last
// layer, "all" every layer, else comma-separated indices (negative ones count from the end,
// -1 the last). Throws naming the entry at fault.
std::vector<int> parse_trace_layers(const std::string& list, int num_layers);

// One file per layer: FILE with a trailing ".safetensors" removed, then ".L<layer>.safetensors"
// (FILE = out/run.safetensors, layer 3 -> out/run.L3.safetensors).
std::string trace_layer_path(const std::string& file, int layer);

}  // namespace multipole
