// `multipole inspect MODEL`: architecture, config, tensors with dtypes, shapes and sizes, and
// whether the weights bind (every tensor present, right shape, a type we can run).
#include <cstdio>
#include <map>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "multipole/core/error.hpp"
#include "multipole/model/model.hpp"

namespace multipole::cli {

namespace {

using json = nlohmann::json;

struct InspectArgs {
  std::string model;
  bool json = false;
  bool no_tensors = false;
};

std::string rope_scaling_name(RopeConfig::Scaling s) {
  switch (s) {
    case RopeConfig::Scaling::None: return "none";
    case RopeConfig::Scaling::Linear: return "linear";
    case RopeConfig::Scaling::Llama3: return "llama3";
    case RopeConfig::Scaling::Yarn: return "yarn";
  }
  return "?";
}

void run_inspect(const InspectArgs& a) {
  std::unique_ptr<Model> model = Model::load(a.model, {.bind_weights = false});
  const ModelConfig& c = model->config();
  // Binding checks every tensor the forward needs; report instead of failing.
  std::string bind_error;
  int64_t weight_bytes = 0;
  try {
    auto full = Model::load(a.model);
    weight_bytes = full->weight_bytes();
  } catch (const Error& e) {
    bind_error = e.what();
  }
  int64_t total = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> by_type;  // dtype -> (count, bytes)
  for (const TensorInfo& t : model->tensors()) {
    total += t.bytes;
    auto& e = by_type[t.dtype];
    ++e.first;
    e.second += t.bytes;
  }

  if (a.json) {
    json j;
    j["path"] = model->path();
    j["format"] = model->format();
    j["name"] = c.name;
    j["architecture"] = c.architecture;
    j["family"] = model_family_name(c.family);
    j["config"] = {{"hidden_size", c.hidden_size},
                   {"intermediate_size", c.intermediate_size},
                   {"num_layers", c.num_layers},
                   {"num_heads", c.num_heads},
                   {"num_kv_heads", c.num_kv_heads},
                   {"head_dim", c.head_dim},
                   {"vocab_size", c.vocab_size},
                   {"rms_eps", c.rms_eps},
                   {"rope_theta", c.rope.theta},
                   {"rope_dim", c.rope.rotary_dim ? c.rope.rotary_dim : c.head_dim},
                   {"rope_scaling", rope_scaling_name(c.rope.scaling)},
                   {"rope_factor", c.rope.factor},
                   {"tied_embeddings", c.tied_embeddings},
                   {"qkv_bias", c.qkv_bias},
                   {"qk_norm", c.qk_norm},
                   {"context_length", c.context_length},
                   {"eos_ids", c.eos_ids}};
    if (c.bos_id) j["config"]["bos_id"] = *c.bos_id;
    j["runnable"] = bind_error.empty();
    if (!bind_error.empty()) j["error"] = bind_error;
    j["total_bytes"] = total;
    j["weight_bytes_per_token"] = weight_bytes;
    for (const auto& [type, e] : by_type) j["dtypes"][type] = {{"tensors", e.first}, {"bytes", e.second}};
    if (!a.no_tensors) {
      j["tensors"] = json::array();
      for (const TensorInfo& t : model->tensors())
        j["tensors"].push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"bytes", t.bytes}});
    }
    std::string out = j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
    return;
  }
  std::string out;
  out += fmt::format("{} ({})\n", model->path(), model->format());
  if (!c.name.empty()) out += fmt::format("name:          {}\n", c.name);
  out += fmt::format("architecture:  {} (family {})\n", c.architecture, model_family_name(c.family));
  out += fmt::format("layers:        {}   hidden {}   intermediate {}   vocab {}\n", c.num_layers, c.hidden_size,
                     c.intermediate_size, c.vocab_size);
  out += fmt::format("attention:     {} q heads, {} kv heads, head_dim {}{}{}\n", c.num_heads, c.num_kv_heads,
                     c.head_dim, c.qkv_bias ? ", qkv bias" : "", c.qk_norm ? ", q/k norm" : "");
  out += fmt::format("rope:          theta {}, dim {}, scaling {}{}\n", c.rope.theta,
                     c.rope.rotary_dim ? c.rope.rotary_dim : c.head_dim, rope_scaling_name(c.rope.scaling),
                     c.rope.scaling == RopeConfig::Scaling::None ? "" : fmt::format(" x{}", c.rope.factor));
  out += fmt::format("context:       {} tokens   rms_eps {}   tied embeddings {}\n", c.context_length, c.rms_eps,
                     c.tied_embeddings ? "yes" : "no");
  out += fmt::format("tokens:        bos {}   eos {}\n", c.bos_id ? std::to_string(*c.bos_id) : "-",
                     fmt::join(c.eos_ids, ", "));
  out += fmt::format("size:          {:.1f} MiB in {} tensors", total / 1048576.0, model->tensors().size());
  for (const auto& [type, e] : by_type) out += fmt::format("; {} x{} {:.1f} MiB", type, e.first, e.second / 1048576.0);
  out += "\n";
  out += bind_error.empty() ? fmt::format("runnable:      yes ({:.1f} MiB read per decoded token)\n",
                                          weight_bytes / 1048576.0)
                            : fmt::format("runnable:      no: {}\n", bind_error);
  if (!a.no_tensors) {
    out += "\n";
    for (const TensorInfo& t : model->tensors())
      out += fmt::format("{:<48} {:<6} [{}] {}\n", t.name, t.dtype, fmt::join(t.shape, ", "), t.bytes);
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
}

}  // namespace

void add_inspect_command(CLI::App& app) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand("inspect", "Describe a model: architecture, tensors, dtypes and sizes");
  cmd->add_option("model", args->model, "GGUF file or folder with config.json + *.safetensors")->required();
  cmd->add_flag("--json", args->json, "Print JSON");
  cmd->add_flag("--no-tensors", args->no_tensors, "Leave out the tensor list");
  cmd->callback([args] { run_inspect(*args); });
}

}  // namespace multipole::cli
