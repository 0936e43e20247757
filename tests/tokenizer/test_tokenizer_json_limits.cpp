// A tokenizer.json (or tokenizer_config.json) nested absurdly deep is refused with a message
// instead of overflowing the stack (regressions found by fuzz/tokenizer_json_fuzzer: a
// merges entry or a "type" nested 200000 deep crashed the error message's dump()).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "io/temp_dir.hpp"
#include "test_errors.hpp"
#include "multipole/core/error.hpp"
#include "multipole/tokenizer/tokenizer.hpp"

using namespace multipole;
using multipole::test_util::TempDir;

namespace {

using multipole::test::error_of;
std::string nested(int depth) { return multipole::test::nested_json(depth); }

// A loadable byte-level tokenizer.json with `merge` as its only merge and `type` as the
// model type (both JSON text).
std::string tokenizer_json(const std::string& merge, const std::string& type = "\"BPE\"") {
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    // GPT-2's byte map: printable Latin-1 stands for itself, the rest for 256, 257, ...
    static int extra = 0;
    if (b == 0) extra = 256;
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    char entry[32];
    std::snprintf(entry, sizeof entry, "\"\\u%04x\": %d, ", printable ? b : extra++, b);
    vocab += entry;
  }
  vocab += R"("ab": 256)";
  return R"({"model": {"type": )" + type + R"(, "vocab": {)" + vocab + R"(}, "merges": [)" + merge +
         R"(]}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}})";
}

}  // namespace

TEST(TokenizerJsonLimits, DeepDocumentsAreErrors) {
  // The shallow document loads, so the errors below come from the nesting alone.
  const Tokenizer ok = Tokenizer::from_json(tokenizer_json("\"a b\""), "ok.json");
  EXPECT_EQ(ok.encode("ab"), (std::vector<int32_t>{256}));
  const std::string deep = nested(200000);
  EXPECT_NE(error_of([&] { Tokenizer::from_json(tokenizer_json(deep), "t.json"); })
                .find("t.json: JSON nested deeper than 128 levels"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Tokenizer::from_json(tokenizer_json("\"a b\"", deep), "t.json"); })
                .find("t.json: JSON nested deeper"),
            std::string::npos);
  // tokenizer_config.json next to a good tokenizer.json.
  TempDir dir;
  std::ofstream(dir.file("tokenizer.json")) << tokenizer_json("\"a b\"");
  std::ofstream(dir.file("tokenizer_config.json")) << R"({"bos_token": )" << deep << "}";
  EXPECT_NE(error_of([&] { Tokenizer::load(dir.path.string()); })
                .find("tokenizer_config.json: JSON nested deeper"),
            std::string::npos);
}
