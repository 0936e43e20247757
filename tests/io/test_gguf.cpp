// GGUF reader: real vocab-only files from llama.cpp, files written byte by byte here (the
// writer below follows the format description, not our reader), and malformed files, which
// must all fail with multipole::Error (never a crash: this runs under ASan too).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/io/gguf.hpp"
#include "test_scale.hpp"

using namespace multipole;
namespace fs = std::filesystem;

namespace {

using multipole::test::small_scale;

// Little-endian byte builder for hand-made GGUF files.
struct Bytes {
  std::vector<uint8_t> b;
  template <class T>
  Bytes& raw(T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
    return *this;
  }
  Bytes& u32(uint32_t v) { return raw(v); }
  Bytes& u64(uint64_t v) { return raw(v); }
  Bytes& str(std::string_view s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& pad_to(size_t alignment) {
    while (b.size() % alignment) b.push_back(0);
    return *this;
  }
  size_t size() const { return b.size(); }
};

// GGUF value type numbers, written out here rather than taken from the header under test.
enum : uint32_t { kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kStr, kArr, kU64, kI64, kF64 };

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("mp_gguf_test_" + std::to_string(::getpid()) + "_" +
                                         std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string write(const std::string& name, const std::vector<uint8_t>& bytes, size_t n = size_t(-1)) const {
    std::string p = (path_ / name).string();
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(std::min(n, bytes.size())));
    return p;
  }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type;
  uint64_t bytes;  // computed by hand from ggml's block layouts
};

// A valid v3 file: metadata of every type, then tensors of several ggml types laid out
// back to back (each padded to the alignment) with random contents; the file ends exactly
// at the last tensor's last byte, so every shorter prefix is invalid.
struct Sample {
  Bytes file;
  std::vector<TensorSpec> tensors;
  std::vector<uint64_t> offsets;   // relative to the data section
  size_t data_offset = 0;
  // Byte positions of interesting fields, for targeted corruption.
  size_t pos_n_tensors = 0, pos_n_kv = 0, pos_first_key_len = 0, pos_array_count = 0;
  std::vector<size_t> pos_tensor_offset, pos_tensor_type, pos_tensor_ndims;
};

Sample make_sample(uint32_t alignment = 32, bool set_alignment = false) {
  Sample s;
  // Q4_0 = 18 bytes / 32, Q4_1 = 20 / 32, Q8_0 = 34 / 32, Q4_K = 144 / 256, Q6_K = 210 / 256.
  s.tensors = {
      {"token_embd.weight", {8, 3}, 0, 8 * 3 * 4},            // F32
      {"blk.0.attn_q.weight", {16, 2}, 1, 16 * 2 * 2},        // F16
      {"blk.0.attn_k.weight", {4, 2, 3}, 30, 4 * 2 * 3 * 2},  // BF16
      {"blk.0.ffn_up.weight", {64, 2}, 8, 2 * 2 * 34},        // Q8_0
      {"blk.0.ffn_gate.weight", {32, 3}, 2, 3 * 18},          // Q4_0
      {"blk.0.ffn_down.weight", {96}, 3, 3 * 20},             // Q4_1
      {"blk.0.attn_v.weight", {256, 2}, 12, 2 * 144},         // Q4_K
      {"output.weight", {512, 1, 1, 2}, 14, 4 * 210},         // Q6_K
  };
  Bytes& b = s.file;
  b.raw<uint32_t>(0x46554747);  // "GGUF"
  b.u32(3);
  s.pos_n_tensors = b.size();
  b.u64(s.tensors.size());
  s.pos_n_kv = b.size();
  const uint64_t n_kv = 17 + (set_alignment ? 1 : 0);
  b.u64(n_kv);
  s.pos_first_key_len = b.size();
  b.str("general.architecture").u32(kStr).str("llama");
  b.str("t.u8").u32(kU8).raw<uint8_t>(200);
  b.str("t.i8").u32(kI8).raw<int8_t>(-100);
  b.str("t.u16").u32(kU16).raw<uint16_t>(60000);
  b.str("t.i16").u32(kI16).raw<int16_t>(-30000);
  b.str("t.u32").u32(kU32).raw<uint32_t>(4000000000u);
  b.str("t.i32").u32(kI32).raw<int32_t>(-2000000000);
  b.str("t.f32").u32(kF32).raw<float>(0.25f);
  b.str("t.bool").u32(kBool).raw<uint8_t>(1);
  b.str("t.u64").u32(kU64).raw<uint64_t>(uint64_t(1) << 40);
  b.str("t.i64").u32(kI64).raw<int64_t>(-(int64_t(1) << 40));
  b.str("t.f64").u32(kF64).raw<double>(-1.5);
  b.str("t.empty_string").u32(kStr).str("");
  b.str("t.strings").u32(kArr).u32(kStr);
  s.pos_array_count = b.size();
  b.u64(3).str("a").str("").str("ĠĠ hello");
  b.str("t.i32s").u32(kArr).u32(kI32).u64(4).raw<int32_t>(1).raw<int32_t>(-2).raw<int32_t>(3).raw<int32_t>(1 << 30);
  b.str("t.f32s").u32(kArr).u32(kF32).u64(2).raw<float>(1.5f).raw<float>(-0.5f);
  b.str("t.empty_array").u32(kArr).u32(kU8).u64(0);
  if (set_alignment) b.str("general.alignment").u32(kU32).u32(alignment);
  uint64_t off = 0;
  for (const TensorSpec& t : s.tensors) {
    b.str(t.name);
    s.pos_tensor_ndims.push_back(b.size());
    b.u32(uint32_t(t.dims.size()));
    for (uint64_t d : t.dims) b.u64(d);
    s.pos_tensor_type.push_back(b.size());
    b.u32(t.type);
    s.pos_tensor_offset.push_back(b.size());
    b.u64(off);
    s.offsets.push_back(off);
    off += (t.bytes + alignment - 1) / alignment * alignment;
  }
  b.pad_to(alignment);
  s.data_offset = b.size();
  std::mt19937 rng(7);
  for (size_t k = 0; k < s.tensors.size(); ++k) {
    b.b.resize(s.data_offset + s.offsets[k]);
    for (uint64_t j = 0; j < s.tensors[k].bytes; ++j) b.b.push_back(uint8_t(rng()));
  }
  return s;
}

template <class T>
void patch(std::vector<uint8_t>& b, size_t pos, T v) {
  std::memcpy(b.data() + pos, &v, sizeof(T));
}

// Loads bytes as a GGUF file and returns the error message ("" if it loaded).
std::string load_error(const TempDir& dir, const std::vector<uint8_t>& bytes, size_t n = size_t(-1)) {
  std::string path = dir.write("f.gguf", bytes, n);
  try {
    GGUFFile f(path);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

}  // namespace

TEST(GGUF, TypeTraitsMatchGgmlBlockLayouts) {
  struct Want { GGMLType t; uint32_t block, bytes; };
  // Sizes of ggml's block_* structs, written out by hand.
  const Want wants[] = {{GGMLType::F32, 1, 4},     {GGMLType::F16, 1, 2},     {GGMLType::BF16, 1, 2},
                        {GGMLType::Q8_0, 32, 34},  {GGMLType::Q4_0, 32, 18},  {GGMLType::Q4_1, 32, 20},
                        {GGMLType::Q5_0, 32, 22},  {GGMLType::Q5_1, 32, 24},  {GGMLType::Q2_K, 256, 84},
                        {GGMLType::Q3_K, 256, 110}, {GGMLType::Q4_K, 256, 144}, {GGMLType::Q5_K, 256, 176},
                        {GGMLType::Q6_K, 256, 210}, {GGMLType::Q8_K, 256, 292}, {GGMLType::IQ4_NL, 32, 18},
                        {GGMLType::IQ4_XS, 256, 136}};
  for (const Want& w : wants) {
    auto tr = ggml_type_traits(w.t);
    ASSERT_TRUE(tr.has_value()) << uint32_t(w.t);
    EXPECT_EQ(tr->block_size, w.block) << tr->name;
    EXPECT_EQ(tr->block_bytes, w.bytes) << tr->name;
  }
  EXPECT_EQ(ggml_nbytes(GGMLType::Q4_K, 4096 * 2), 2u * 16 * 144);
  EXPECT_FALSE(ggml_type_traits(GGMLType(4)).has_value());  // Q4_2, removed from ggml
  EXPECT_EQ(ggml_type_name(GGMLType(1000)), "type 1000");
  EXPECT_THROW(ggml_nbytes(GGMLType::Q4_K, 100), Error);
}

TEST(GGUF, ReadsVocabOnlyFiles) {
  struct Want {
    const char* file;
    const char* arch;
    const char* pre;
    uint64_t n_tokens, n_merges, bos;
  };
  // Counts from the files' headers, read with an independent script.
  const Want wants[] = {{"ggml-vocab-gpt-2.gguf", "gpt2", "gpt-2", 50257, 50000, 50256},
                        {"ggml-vocab-llama-bpe.gguf", "llama", "llama-bpe", 128256, 280147, 128000},
                        {"ggml-vocab-qwen2.gguf", "qwen2", "qwen2", 151936, 151387, 151643}};
  for (const Want& w : wants) {
    SCOPED_TRACE(w.file);
    GGUFFile f(std::string(MULTIPOLE_SHARED_DIR) + "/assets/vocab-tests/" + w.file);
    EXPECT_EQ(f.version(), 3u);
    EXPECT_EQ(f.alignment(), 32u);
    EXPECT_TRUE(f.tensors().empty());
    EXPECT_EQ(f.get_string("general.architecture"), w.arch);
    EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
    EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), w.pre);
    auto tokens = f.get_string_array("tokenizer.ggml.tokens");
    ASSERT_EQ(tokens.size(), w.n_tokens);
    EXPECT_EQ(tokens[0], "!");
    EXPECT_EQ(f.get_string_array("tokenizer.ggml.merges").size(), w.n_merges);
    EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type").size(), w.n_tokens);
    EXPECT_EQ(f.get_uint("tokenizer.ggml.bos_token_id"), w.bos);
    EXPECT_EQ(f.get_array_size("tokenizer.ggml.tokens"), w.n_tokens);
    EXPECT_EQ(f.get_uint("general.file_type"), 1u);
    EXPECT_GT(f.get_float(std::string(w.arch) + ".attention.head_count"), 0.0);
  }
  GGUFFile gpt2(std::string(MULTIPOLE_SHARED_DIR) + "/assets/vocab-tests/ggml-vocab-gpt-2.gguf");
  EXPECT_NEAR(gpt2.get_float("gpt2.attention.layer_norm_epsilon"), 1e-5, 1e-12);
  EXPECT_EQ(gpt2.get_uint("gpt2.context_length"), 1024u);
  EXPECT_EQ(gpt2.get_string_array("tokenizer.ggml.tokens")[50256], "<|endoftext|>");
  EXPECT_EQ(gpt2.get_string_array("tokenizer.ggml.merges")[0], "Ġ t");
}

TEST(GGUF, ReadsHandWrittenFile) {
  TempDir dir;
  for (uint32_t alignment : {32u, 64u, 8u}) {
    SCOPED_TRACE(alignment);
    Sample s = make_sample(alignment, alignment != 32);
    GGUFFile f(dir.write("ok.gguf", s.file.b));
    EXPECT_EQ(f.version(), 3u);
    EXPECT_EQ(f.alignment(), alignment);
    EXPECT_EQ(f.data_offset(), s.data_offset);
    EXPECT_EQ(f.get_string("general.architecture"), "llama");
    EXPECT_EQ(f.get_uint("t.u8"), 200u);
    EXPECT_EQ(f.get_int("t.i8"), -100);
    EXPECT_EQ(f.get_uint("t.u16"), 60000u);
    EXPECT_EQ(f.get_int("t.i16"), -30000);
    EXPECT_EQ(f.get_uint("t.u32"), 4000000000u);
    EXPECT_EQ(f.get_int("t.u32"), 4000000000);
    EXPECT_EQ(f.get_int("t.i32"), -2000000000);
    EXPECT_EQ(f.get_float("t.f32"), 0.25);
    EXPECT_TRUE(f.get_bool("t.bool"));
    EXPECT_EQ(f.get_uint("t.u64"), uint64_t(1) << 40);
    EXPECT_EQ(f.get_int("t.i64"), -(int64_t(1) << 40));
    EXPECT_EQ(f.get_float("t.f64"), -1.5);
    EXPECT_EQ(f.get_float("t.i32"), -2000000000.0);
    EXPECT_EQ(f.get_string("t.empty_string"), "");
    auto strs = f.get_string_array("t.strings");
    ASSERT_EQ(strs.size(), 3u);
    EXPECT_EQ(strs[0], "a");
    EXPECT_EQ(strs[1], "");
    EXPECT_EQ(strs[2], "ĠĠ hello");
    EXPECT_EQ(f.get_int_array("t.i32s"), (std::vector<int64_t>{1, -2, 3, 1 << 30}));
    EXPECT_EQ(f.get_float_array("t.f32s"), (std::vector<double>{1.5, -0.5}));
    EXPECT_EQ(f.get_float_array("t.i32s"), (std::vector<double>{1, -2, 3, 1 << 30}));
    EXPECT_EQ(f.get_array_size("t.empty_array"), 0u);
    EXPECT_TRUE(f.get_int_array("t.empty_array").empty());
    // Fallbacks apply to absent keys only.
    EXPECT_EQ(f.get_uint("absent", 7), 7u);
    EXPECT_EQ(f.get_string("absent", "x"), "x");
    EXPECT_FALSE(f.get_bool("absent", false));

    ASSERT_EQ(f.tensors().size(), s.tensors.size());
    for (size_t k = 0; k < s.tensors.size(); ++k) {
      const TensorSpec& want = s.tensors[k];
      const GGUFTensor& t = f.tensors()[k];
      SCOPED_TRACE(want.name);
      EXPECT_EQ(t.name, want.name);
      EXPECT_EQ(t.dims, want.dims);
      EXPECT_EQ(uint32_t(t.type), want.type);
      EXPECT_EQ(t.offset, s.offsets[k]);
      EXPECT_EQ(t.n_bytes, want.bytes);
      ASSERT_EQ(t.data.size(), want.bytes);
      EXPECT_EQ(std::memcmp(t.data.data(), s.file.b.data() + s.data_offset + s.offsets[k], want.bytes), 0);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data.data()) % alignment, 0u);
      EXPECT_EQ(&f.tensor(want.name), &t);
    }
    EXPECT_EQ(f.tensor("output.weight").numel(), 1024u);
    EXPECT_EQ(f.tensor("output.weight").dims_string(), "[512, 1, 1, 2]");
    EXPECT_EQ(f.find_tensor("missing"), nullptr);
  }
  // Version 2 has the same layout.
  Sample s = make_sample();
  patch<uint32_t>(s.file.b, 4, 2);
  GGUFFile v2(dir.write("v2.gguf", s.file.b));
  EXPECT_EQ(v2.version(), 2u);
  EXPECT_EQ(v2.tensors().size(), s.tensors.size());
}

TEST(GGUF, TypedGettersNameKeyAndTypes) {
  TempDir dir;
  Sample s = make_sample();
  GGUFFile f(dir.write("ok.gguf", s.file.b));
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::string m = message([&] { f.get_string("t.u32"); });
  EXPECT_NE(m.find("t.u32"), std::string::npos) << m;
  EXPECT_NE(m.find("u32 4000000000"), std::string::npos) << m;
  EXPECT_NE(m.find("wanted a string"), std::string::npos) << m;
  m = message([&] { f.get_uint("t.i8"); });
  EXPECT_NE(m.find("i8 -100"), std::string::npos) << m;
  m = message([&] { f.get_uint("nope"); });
  EXPECT_NE(m.find("'nope' is missing"), std::string::npos) << m;
  EXPECT_NE(m.find(f.path()), std::string::npos) << m;
  EXPECT_THROW(f.get_bool("t.u8"), Error);
  EXPECT_THROW(f.get_string_array("t.i32s"), Error);
  EXPECT_THROW(f.get_int_array("t.strings"), Error);
  EXPECT_THROW(f.get_int_array("t.f32s"), Error);
  EXPECT_THROW(f.get_float("t.strings"), Error);
  EXPECT_THROW(f.get_int("t.strings"), Error);
  EXPECT_THROW(f.get_uint("t.bool"), Error);
  EXPECT_THROW(f.get_uint("t.strings", 1), Error) << "present with a wrong type";
  EXPECT_THROW(f.get_string("t.u8", "x"), Error);
  EXPECT_THROW(f.tensor("missing"), Error);
}

TEST(GGUF, EveryTruncationFails) {
  TempDir dir;
  Sample s = make_sample();
  const size_t n = s.file.size();
  // Shrink one file in place: every prefix through the tables, then steps through the data.
  const std::string path = dir.write("cut.gguf", s.file.b);
  EXPECT_EQ(load_error(dir, s.file.b), "");
  const size_t data_step = small_scale() ? 61 : 7;
  for (size_t len = n; len-- > 0;) {
    if (len > s.data_offset && (n - len) % data_step != 1) continue;
    ASSERT_EQ(::truncate(path.c_str(), off_t(len)), 0);
    try {
      GGUFFile f(path);
      ADD_FAILURE() << "prefix of " << len << " of " << n << " bytes loaded";
    } catch (const Error&) {
    }
  }
}

TEST(GGUF, MalformedHeadersFailWithNamedLimits) {
  TempDir dir;
  const Sample s = make_sample();
  auto expect_error = [&](std::vector<uint8_t> bytes, const std::string& needle) {
    std::string err = load_error(dir, bytes);
    EXPECT_NE(err.find(needle), std::string::npos) << "wanted '" << needle << "' in: " << err;
  };
  auto b = s.file.b;
  expect_error({'G', 'G', 'U'}, "not a GGUF file");
  b[0] = 'X';
  expect_error(b, "not a GGUF file");
  b = s.file.b;
  patch<uint32_t>(b, 4, 1);
  expect_error(b, "version 1 is not supported");
  patch<uint32_t>(b, 4, 0x03000000u);
  expect_error(b, "big-endian");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_n_kv, uint64_t(1) << 60);
  expect_error(b, "metadata count 1152921504606846976 cannot fit");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_n_tensors, ~uint64_t(0));
  expect_error(b, "tensor count 18446744073709551615 cannot fit");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_first_key_len, uint64_t(1) << 63);
  expect_error(b, "string length 9223372036854775808 exceeds");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_first_key_len, b.size());
  expect_error(b, "exceeds");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_array_count, uint64_t(1) << 62);
  expect_error(b, "cannot fit");
  // Unknown value type: the type field follows the 20-byte key "general.architecture".
  b = s.file.b;
  const size_t type_pos = s.pos_first_key_len + 8 + 20;
  patch<uint32_t>(b, type_pos, 13);
  expect_error(b, "unknown value type 13");
  // A nested array.
  b = s.file.b;
  patch<uint32_t>(b, s.pos_array_count - 4, kArr);
  expect_error(b, "nested array");
  // Tensor fields.
  b = s.file.b;
  patch<uint64_t>(b, s.pos_tensor_offset[1], s.offsets[1] + 4);
  expect_error(b, "offset " + std::to_string(s.offsets[1] + 4) + " is not a multiple of the alignment 32");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_tensor_offset[2], s.offsets[1]);
  expect_error(b, "overlap");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_tensor_offset[0], uint64_t(1) << 40);
  expect_error(b, "ends past the data section");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_tensor_offset.back(), ~uint64_t(31));
  expect_error(b, "ends past the data section");
  b = s.file.b;
  patch<uint32_t>(b, s.pos_tensor_type[3], 1000);
  expect_error(b, "unknown ggml type 1000");
  b = s.file.b;
  patch<uint32_t>(b, s.pos_tensor_type[3], 4);  // Q4_2 no longer exists
  expect_error(b, "unknown ggml type 4");
  b = s.file.b;
  patch<uint32_t>(b, s.pos_tensor_type[0], 12);  // Q4_K needs dims[0] % 256 == 0
  expect_error(b, "dimension 0 = 8 is not a multiple of the Q4_K block size 256");
  b = s.file.b;
  patch<uint32_t>(b, s.pos_tensor_ndims[0], 5);
  expect_error(b, "5 dimensions (at most 4)");
  b = s.file.b;
  patch<uint64_t>(b, s.pos_tensor_ndims[0] + 4, uint64_t(1) << 62);
  patch<uint64_t>(b, s.pos_tensor_ndims[0] + 12, uint64_t(1) << 62);
  expect_error(b, "overflow");
}

TEST(GGUF, SemanticErrors) {
  TempDir dir;
  auto header = [](uint64_t n_tensors, uint64_t n_kv) {
    Bytes b;
    b.raw<uint32_t>(0x46554747).u32(3).u64(n_tensors).u64(n_kv);
    return b;
  };
  auto expect_error = [&](const Bytes& b, const std::string& needle) {
    std::string err = load_error(dir, b.b);
    EXPECT_NE(err.find(needle), std::string::npos) << "wanted '" << needle << "' in: " << err;
  };
  {
    Bytes b = header(0, 2);
    b.str("a").u32(kU8).raw<uint8_t>(1).str("a").u32(kU8).raw<uint8_t>(2);
    expect_error(b, "'a' appears twice");
  }
  {
    Bytes b = header(0, 1);
    b.str("a").u32(kBool).raw<uint8_t>(2);
    expect_error(b, "bool 2 (must be 0 or 1)");
  }
  {
    Bytes b = header(0, 1);
    b.str("").u32(kU8).raw<uint8_t>(1);
    expect_error(b, "empty");
  }
  for (uint32_t bad : {0u, 3u, 48u}) {
    Bytes b = header(0, 1);
    b.str("general.alignment").u32(kU32).u32(bad);
    expect_error(b, "general.alignment = " + std::to_string(bad) + " is not a power of two");
  }
  {
    Bytes b = header(0, 1);
    b.str("general.alignment").u32(kStr).str("32");
    expect_error(b, "general.alignment is string");
  }
  {
    Bytes b = header(2, 0);
    for (int k = 0; k < 2; ++k) b.str("w").u32(1).u64(32).u32(0).u64(0);
    b.pad_to(32);
    b.b.resize(b.size() + 256);
    expect_error(b, "tensor 'w' appears twice");
  }
  {
    Bytes b = header(1, 0);
    b.str(std::string(64, 'x')).u32(1).u64(32).u32(0).u64(0);
    b.pad_to(32);
    b.b.resize(b.size() + 128);
    expect_error(b, "name has 64 bytes (at most 63)");
  }
  {
    // A tensor whose data section would start past the end of the file.
    Bytes b = header(1, 0);
    b.str("w").u32(1).u64(0).u32(0).u64(0);
    expect_error(b, "past the end of the file");
  }
  {
    // Zero-element tensor at the very end of the data section is fine.
    Bytes b = header(1, 0);
    b.str("w").u32(2).u64(0).u64(7).u32(0).u64(0);
    b.pad_to(32);
    std::string path = dir.write("zero.gguf", b.b);
    GGUFFile f(path);
    EXPECT_EQ(f.tensor("w").n_bytes, 0u);
  }
}

TEST(GGUF, RandomCorruptionNeverCrashes) {
  TempDir dir;
  const Sample s = make_sample();
  std::mt19937 rng(1234);
  const int iterations = small_scale() ? 150 : 600;
  int loaded = 0;
  for (int it = 0; it < iterations; ++it) {
    auto b = s.file.b;
    const int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      size_t pos = rng() % b.size();
      // Bias towards the header and tables, where the structure lives.
      if (rng() % 4 != 0) pos = rng() % s.data_offset;
      b[pos] = uint8_t(rng() % 3 == 0 ? 0xff : rng());
    }
    std::string path = dir.write("fuzz.gguf", b);
    try {
      GGUFFile f(path);
      // Whatever loaded must be internally consistent.
      for (const GGUFTensor& t : f.tensors()) {
        ASSERT_LE(f.data_offset() + t.offset + t.n_bytes, f.file_size());
        ASSERT_EQ(t.n_bytes, ggml_nbytes(t.type, t.numel()));
      }
      ++loaded;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(loaded, 0);  // flips in tensor data leave the file valid
}

TEST(GGUF, WriterRoundTrip) {
  GGUFWriter w(64);
  w.set_string("general.architecture", "qwen3");
  w.set_u32("qwen3.block_count", 2);
  w.set_i64("t.i64", -5);
  w.set_f32("t.f32", 0.5f);
  w.set_f64("t.f64", 2.25);
  w.set_bool("t.bool", true);
  w.set_u32("qwen3.block_count", 3);  // replaces
  const std::vector<std::string> toks = {"a", "", "Ġb"};
  w.set_string_array("tokenizer.ggml.tokens", toks);
  const std::vector<int32_t> types = {1, 3, 1};
  w.set_i32_array("tokenizer.ggml.token_type", types);
  std::vector<std::byte> f32(4 * 10 * 4), q4k(144 * 2);
  for (size_t k = 0; k < f32.size(); ++k) f32[k] = std::byte(k);
  for (size_t k = 0; k < q4k.size(); ++k) q4k[k] = std::byte(255 - k % 256);
  w.add_tensor("a", GGMLType::F32, {4, 10}, f32);
  w.add_tensor("b", GGMLType::Q4_K, {512}, q4k);
  EXPECT_THROW(w.add_tensor("c", GGMLType::Q4_K, {100}, q4k), Error);
  EXPECT_THROW(w.add_tensor("a", GGMLType::F32, {4, 10}, f32), Error);
  EXPECT_THROW(w.add_tensor("d", GGMLType::F32, {4, 11}, f32), Error);
  EXPECT_THROW(w.add_tensor("e", GGMLType(4), {32}, q4k), Error);
  const std::string path = (fs::temp_directory_path() / ("mp_gguf_writer_" + std::to_string(::getpid()))).string();
  w.write(path);
  GGUFFile f(path);
  fs::remove(path);
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.get_string("general.architecture"), "qwen3");
  EXPECT_EQ(f.get_uint("qwen3.block_count"), 3u);
  EXPECT_EQ(f.get_int("t.i64"), -5);
  EXPECT_EQ(f.get_float("t.f32"), 0.5);
  EXPECT_EQ(f.get_float("t.f64"), 2.25);
  EXPECT_TRUE(f.get_bool("t.bool"));
  auto got = f.get_string_array("tokenizer.ggml.tokens");
  EXPECT_EQ(std::vector<std::string>(got.begin(), got.end()), toks);
  EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type"), (std::vector<int64_t>{1, 3, 1}));
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.tensor("a").dims, (std::vector<uint64_t>{4, 10}));
  EXPECT_EQ(f.tensor("b").type, GGMLType::Q4_K);
  EXPECT_EQ(f.tensor("b").offset % 64, 0u);
  EXPECT_TRUE(std::equal(f32.begin(), f32.end(), f.tensor("a").data.begin()));
  EXPECT_TRUE(std::equal(q4k.begin(), q4k.end(), f.tensor("b").data.begin()));
}
