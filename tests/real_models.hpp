#pragma once
// Where the real models fetched by scripts/fetch-models.sh live ($MULTIPOLE_MODEL_CACHE, or
// .cache/models in the source tree).
#include <cstdlib>
#include <filesystem>
#include <string>

namespace multipole::test {

// Path of the default real model, SmolLM2-135M-Instruct Q4_1 (whether or not it is there).
inline std::string smollm2_file() {
  const char* cache = std::getenv("MULTIPOLE_MODEL_CACHE");
  const std::filesystem::path dir =
      cache ? std::filesystem::path(cache) : std::filesystem::path(MULTIPOLE_SOURCE_DIR) / ".cache" / "models";
  return (dir / "SmolLM2-135M-Instruct.Q4_1.gguf").string();
}

}  // namespace multipole::test
