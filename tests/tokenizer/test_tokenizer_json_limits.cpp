// A tokenizer.json (or tokenizer_config.json) nested absurdly deep, or with a token id that is
// not an int32, is refused with a message (regressions found by fuzz/tokenizer_json_fuzzer: a
// merges entry or a "type" nested 200000 deep crashed the error message's dump(); an added
// token id of 2.5e19 was cast to int, undefined behaviour).
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
// model type (both JSON text); `extra` adds top-level members (", \"key\": value").
std::string tokenizer_json(const std::string& merge, const std::string& type = "\"BPE\"",
                           const std::string& extra = "") {
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
         R"(]}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})" + extra +
         "}";
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

TEST(TokenizerJsonLimits, TokenIdsOutsideInt32AreErrors) {
  const auto added = [](const std::string& id) {
    return R"(, "added_tokens": [{"id": )" + id + R"(, "content": "<x>", "special": true}])";
  };
  const auto templ = [](const std::string& id) {
    return R"(, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}},)"
           R"( {"Sequence": {"id": "A"}}], "special_tokens": {"<s>": {"ids": [)" + id + "]}}}";
  };
  const auto bert = [](const std::string& id) {
    return R"(, "post_processor": {"type": "BertProcessing", "cls": ["<s>", )" + id + R"(], "sep": ["</s>", 2]})";
  };
  // In range, each form loads (so the errors below come from the id alone).
  for (const std::string& extra : {added("257"), templ("7"), bert("0")})
    EXPECT_NO_THROW(Tokenizer::from_json(tokenizer_json("\"a b\"", "\"BPE\"", extra), "t.json")) << extra;
  struct Case {
    std::string extra, field;
  };
  for (const char* bad : {"2.50001e+19", "1.5", "-1", "2147483648", "18446744073709551615", "\"3\""}) {
    for (const Case& c : {Case{added(bad), "added_tokens[].id"},
                          Case{templ(bad), "post_processor.special_tokens['<s>'].ids"},
                          Case{bert(bad), "post_processor.cls[1]"}}) {
      const std::string err =
          error_of([&] { Tokenizer::from_json(tokenizer_json("\"a b\"", "\"BPE\"", c.extra), "t.json"); });
      EXPECT_NE(err.find("t.json: " + c.field + " = "), std::string::npos) << bad << ": " << err;
      EXPECT_NE(err.find("is not a valid token id"), std::string::npos) << bad << ": " << err;
    }
  }
  std::string vocab_float = tokenizer_json("\"a b\"");
  vocab_float.replace(vocab_float.find(R"("ab": 256)"), 9, R"("ab": 256.0)");
  EXPECT_NE(error_of([&] { Tokenizer::from_json(vocab_float, "t.json"); })
                .find("t.json: model.vocab['ab'] = 256.0 is not a valid token id"),
            std::string::npos);
}
