// Deeply nested JSON in untrusted files is refused with a message instead of overflowing the
// stack (regressions found by fuzz/safetensors_fuzzer: a data_offsets or __metadata__ value
// nested 200000 deep crashed the error message's dump()).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include "io/temp_dir.hpp"
#include "test_errors.hpp"
#include "multipole/core/error.hpp"
#include "multipole/io/json_limits.hpp"
#include "multipole/io/safetensors.hpp"
#include "multipole/io/trace.hpp"

using namespace multipole;
using multipole::test_util::TempDir;

namespace {

using multipole::test::error_of;
std::string nested(int depth) { return multipole::test::nested_json(depth); }

// A safetensors file whose header is `header` followed by `data_bytes` zero bytes.
std::string write_safetensors(const TempDir& dir, const std::string& name, const std::string& header,
                              size_t data_bytes) {
  const std::string path = dir.file(name);
  const uint64_t n = header.size();
  char len[8];
  std::memcpy(len, &n, 8);
  std::ofstream f(path, std::ios::binary);
  f.write(len, 8);
  f << header << std::string(data_bytes, '\0');
  return path;
}

}  // namespace

TEST(JsonLimits, CountsOnlyBracketsOutsideStrings) {
  EXPECT_NO_THROW(check_json_depth(nested(kMaxJsonDepth), "x"));
  EXPECT_NE(error_of([] { check_json_depth(nested(kMaxJsonDepth + 1), "doc.json"); })
                .find("doc.json: JSON nested deeper than 128 levels (at byte 128)"),
            std::string::npos);
  // Brackets inside strings, escaped quotes included, are text.
  const std::string in_string = "{\"a\": \"" + nested(1000) + "\\\"" + nested(1000) + "\"}";
  EXPECT_NO_THROW(check_json_depth(in_string, "x"));
  EXPECT_NE(error_of([] { check_json_depth("[\"\\\\\"" + nested(200), "y"); }).find("y: JSON nested deeper"),
            std::string::npos);
  EXPECT_NE(error_of([] { check_json_depth("{\"a\": " + nested(3) + "}", "z", 3); }).find("deeper than 3 levels"),
            std::string::npos);
}

TEST(JsonLimits, DeepSafetensorsHeaderIsAnError) {
  TempDir dir;
  const std::string deep = nested(200000);
  const std::string p1 = write_safetensors(
      dir, "offsets.safetensors", R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": )" + deep + "}}", 4);
  EXPECT_NE(error_of([&] { SafetensorsFile f(p1); }).find("JSON nested deeper than 128 levels"), std::string::npos);
  const std::string p2 = write_safetensors(
      dir, "meta.safetensors",
      R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": )" + deep + "}}", 4);
  EXPECT_NE(error_of([&] { SafetensorsFile f(p2); }).find(p2 + ": safetensors header: JSON nested deeper"),
            std::string::npos);
  // A sharded index goes through the same check.
  const std::string index = dir.file("model.safetensors.index.json");
  std::ofstream(index) << R"({"metadata": )" << deep << R"(, "weight_map": {}})";
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint c(index); }).find("JSON nested deeper"), std::string::npos);
}

TEST(JsonLimits, DeepRopeScalingIsAnError) {
  RopeConfig rope;
  EXPECT_NE(error_of([&] { apply_rope_scaling(R"({"rope_type": )" + nested(100000) + "}", rope, "trace t"); })
                .find("trace t: JSON nested deeper"),
            std::string::npos);
}
