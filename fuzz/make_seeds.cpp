// Writes the seed corpora of the fuzzers: small valid files built with the project's own
// writers, so that fuzzing starts from inputs that get past the first checks.
//   make_seeds OUT_DIR   ->  OUT_DIR/{safetensors,gguf,tokenizer_json}/*
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "multipole/io/gguf.hpp"
#include "multipole/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using namespace multipole;

// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
// bytes for the code points 256, 257, ... in byte order.
std::vector<uint32_t> byte_code_points() {
  std::vector<uint32_t> cp(256);
  uint32_t extra = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    cp[b] = printable ? b : extra++;
  }
  return cp;
}

std::string utf8(uint32_t c) {
  std::string s;
  if (c < 0x80) {
    s += char(c);
  } else if (c < 0x800) {
    s += char(0xC0 | (c >> 6));
    s += char(0x80 | (c & 0x3F));
  } else {
    s += char(0xE0 | (c >> 12));
    s += char(0x80 | ((c >> 6) & 0x3F));
    s += char(0x80 | (c & 0x3F));
  }
  return s;
}

void safetensors_seeds(const fs::path& dir) {
  const std::vector<float> x = {1.5f, -2.0f, 0.25f, 3.0f, -0.5f, 8.0f};
  {
    SafetensorsWriter w;
    w.add("q", {1, 2, 3}, x.data());
    w.add("k", {3, 2}, x.data(), DType::BF16);
    w.add("v", {6}, x.data(), DType::F16);
    w.set_metadata("rope_theta", "10000");
    w.write((dir / "qkv.safetensors").string());
  }
  {
    SafetensorsWriter w;
    const int32_t ids[3] = {7, -1, 42};
    w.add_raw("ids", SafetensorsDType::I32, {3}, std::as_bytes(std::span(ids)));
    const uint8_t flags[2] = {1, 0};
    w.add_raw("flags", SafetensorsDType::BOOL, {2}, std::as_bytes(std::span(flags)));
    w.add("scalar", {}, x.data());
    w.write((dir / "raw.safetensors").string());
  }
  {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    w.write((dir / "empty.safetensors").string());
  }
}

void gguf_seeds(const fs::path& dir) {
  {
    // A tiny byte-level BPE vocabulary: the 256 GPT-2 byte characters are not needed for
    // loading, a handful of tokens and merges exercise the same code.
    GGUFWriter w;
    w.set_string("general.architecture", "llama");
    w.set_u32("llama.block_count", 1);
    w.set_f32("llama.rope.freq_base", 10000.0f);
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string("tokenizer.ggml.pre", "qwen2");
    // Token id = byte for the 256 byte tokens, then two merges and a control token.
    std::vector<std::string> tokens;
    for (uint32_t c : byte_code_points()) tokens.push_back(utf8(c));
    for (const char* t : {"ab", "abc", "<|im_start|>"}) tokens.emplace_back(t);
    w.set_string_array("tokenizer.ggml.tokens", tokens);
    std::vector<int32_t> types(tokens.size(), 1);
    types.back() = 3;
    w.set_i32_array("tokenizer.ggml.token_type", types);
    const std::vector<std::string> merges = {"a b", "ab c"};
    w.set_string_array("tokenizer.ggml.merges", merges);
    w.set_u32("tokenizer.ggml.bos_token_id", 258);
    w.set_bool("tokenizer.ggml.add_bos_token", false);
    w.write((dir / "tokenizer.gguf").string());
  }
  {
    GGUFWriter w(64);
    w.set_u8("u8", 3);
    w.set_i32("i32", -5);
    w.set_u64("u64", 1ull << 40);
    w.set_i64("i64", -(1ll << 40));
    w.set_f64("f64", 0.5);
    const std::vector<float> fa = {1.0f, 2.0f};
    w.set_f32_array("f32s", fa);
    const std::vector<float> x = {1.0f, -2.0f, 3.0f, 4.0f};
    w.add_tensor("t.f32", GGMLType::F32, {2, 2}, std::as_bytes(std::span(x)));
    const std::vector<std::byte> q8(34, std::byte{0x11});  // one Q8_0 block of 32
    w.add_tensor("t.q8_0", GGMLType::Q8_0, {32}, q8);
    const std::vector<std::byte> q4(20, std::byte{0x22});  // one Q4_1 block of 32
    w.add_tensor("t.q4_1", GGMLType::Q4_1, {32, 1}, q4);
    w.write((dir / "tensors.gguf").string());
  }
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

void tokenizer_json_seeds(const fs::path& dir) {
  // Token id = byte for the 256 byte tokens (written as \u escapes), then two merges.
  const std::vector<uint32_t> cps = byte_code_points();
  std::string vocab = "{";
  for (uint32_t b = 0; b < 256; ++b) {
    char entry[32];
    std::snprintf(entry, sizeof entry, "\"\\u%04x\": %u, ", cps[b], b);
    vocab += entry;
  }
  vocab += R"("ab": 256, "abc": 257})";
  const std::string model = R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": ["a b", ["ab", "c"]]})";
  write_text(dir / "minimal.json",
             R"({"model": )" + model + R"(, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}})");
  write_text(dir / "full.json", R"({"version": "1.0", "added_tokens": [{"id": 258, "content": "<x>", "special": true},)"
                                R"( {"id": 259, "content": "<think>", "special": false, "lstrip": true}],)"
                                R"( "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]},)"
                                R"( "pre_tokenizer": {"type": "Sequence", "pretokenizers": [)"
                                R"({"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},)"
                                R"( {"type": "Digits", "individual_digits": true},)"
                                R"( {"type": "ByteLevel", "add_prefix_space": true, "use_regex": false}]},)"
                                R"( "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}},)"
                                R"( {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<x>": {"id": "<x>", "ids": [258]}}},)"
                                R"( "decoder": {"type": "ByteLevel"}, "model": )" + model + "}");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  for (const char* sub : {"safetensors", "gguf", "tokenizer_json"}) fs::create_directories(out / sub);
  safetensors_seeds(out / "safetensors");
  gguf_seeds(out / "gguf");
  tokenizer_json_seeds(out / "tokenizer_json");
  return 0;
}
