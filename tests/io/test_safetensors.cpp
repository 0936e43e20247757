#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/io/safetensors.hpp"
#include "io/temp_dir.hpp"

using namespace multipole;
using multipole::test_util::TempDir;
namespace fs = std::filesystem;

namespace {

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// 8-byte little-endian length written byte by byte, the header text, then the data.
std::vector<uint8_t> make_file(const std::string& header, const std::vector<uint8_t>& data, uint64_t len = ~0ull) {
  if (len == ~0ull) len = header.size();
  std::vector<uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(len >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A tensor entry of a header.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                  uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(b) + "," + std::to_string(e) + "]}";
}

}  // namespace

TEST(Safetensors, DTypeTable) {
  EXPECT_EQ(safetensors_dtype_size(SafetensorsDType::F64), 8u);
  EXPECT_EQ(safetensors_dtype_size(SafetensorsDType::BF16), 2u);
  EXPECT_EQ(safetensors_dtype_size(SafetensorsDType::U8), 1u);
  EXPECT_EQ(safetensors_dtype_size(SafetensorsDType::I32), 4u);
  for (const char* n : {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                        "I64", "U64", "F64"}) {
    auto t = parse_safetensors_dtype(n);
    ASSERT_TRUE(t.has_value()) << n;
    EXPECT_EQ(safetensors_dtype_name(*t), n);
  }
  EXPECT_FALSE(parse_safetensors_dtype("f32").has_value());
  EXPECT_FALSE(parse_safetensors_dtype("F33").has_value());
}

TEST(Safetensors, WriterRoundTrip) {
  TempDir dir;
  // Values exactly representable in f16 and bf16, so every storage type must round-trip exactly.
  std::vector<float> a = {1.5f, -2.0f, 0.25f, 3.0f, -0.125f, 6.0f};
  std::vector<float> b = {0.5f, -1.0f, 2.0f, 4.0f, -8.0f};
  std::vector<float> c = {1.0f, 2.0f, -3.0f, 0.75f, 1.25f, -0.5f};
  std::vector<int64_t> ids = {-7, 1ll << 40};
  SafetensorsWriter w;
  w.add("a.f32", {2, 3}, a.data(), DType::F32);
  w.add("b.f16", {5}, b.data(), DType::F16);
  w.add("c.bf16", {3, 1, 2}, c.data(), DType::BF16);
  w.add_raw("ids", SafetensorsDType::I64, {2}, std::as_bytes(std::span(ids)));
  w.add("empty", {0, 4}, nullptr, DType::F32);
  w.set_metadata("rope_theta", "10000");
  w.set_metadata("note", "h\u00e9llo \"quoted\"");
  const std::string path = dir.file("x.safetensors");
  w.write(path);
  // Only the final file is left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()), 1);

  SafetensorsFile f(path);
  EXPECT_EQ(f.data_offset() % 8, 0u);
  ASSERT_EQ(f.tensors().size(), 5u);
  EXPECT_EQ(f.tensors()[0].name, "a.f32");  // sorted by name
  EXPECT_EQ(f.metadata("rope_theta"), "10000");
  EXPECT_EQ(f.metadata("note"), "h\u00e9llo \"quoted\"");
  EXPECT_FALSE(f.metadata("absent").has_value());

  const auto& ta = f.tensor("a.f32");
  EXPECT_EQ(ta.dtype, SafetensorsDType::F32);
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ta.to_f32(), a);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ta.bytes.data()) % 8, 0u);
  TensorView v = ta.view();
  EXPECT_EQ(v.rank, 2);
  EXPECT_EQ(v.dtype, DType::F32);
  EXPECT_EQ(*reinterpret_cast<const float*>(v.element({1, 2})), 6.0f);

  const auto& tb = f.tensor("b.f16");
  EXPECT_EQ(tb.dtype, SafetensorsDType::F16);
  EXPECT_EQ(tb.to_f32(), b);
  // f16 bits of 0.5 are 0x3800, independent of the converter.
  uint16_t bits;
  std::memcpy(&bits, tb.bytes.data(), 2);
  EXPECT_EQ(bits, 0x3800);

  const auto& tc = f.tensor("c.bf16");
  EXPECT_EQ(tc.dtype, SafetensorsDType::BF16);
  EXPECT_EQ(tc.shape, (std::vector<int64_t>{3, 1, 2}));
  EXPECT_EQ(tc.to_f32(), c);
  std::memcpy(&bits, tc.bytes.data(), 2);
  EXPECT_EQ(bits, 0x3F80);  // bf16 1.0

  const auto& ti = f.tensor("ids");
  ASSERT_EQ(ti.bytes.size(), 16u);
  int64_t got[2];
  std::memcpy(got, ti.bytes.data(), 16);
  EXPECT_EQ(got[0], -7);
  EXPECT_EQ(got[1], 1ll << 40);
  EXPECT_THROW(ti.to_f32(), Error);
  EXPECT_THROW(ti.view(), Error);

  EXPECT_EQ(f.tensor("empty").numel(), 0);
  EXPECT_TRUE(f.tensor("empty").to_f32().empty());
  EXPECT_EQ(f.find("nope"), nullptr);
  try {
    f.tensor("nope");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }

  // Overwriting replaces the file atomically.
  SafetensorsWriter w2;
  w2.add("only", {1}, a.data());
  w2.write(path);
  EXPECT_EQ(SafetensorsFile(path).tensors().size(), 1u);
}

TEST(Safetensors, WriterRejectsBadInput) {
  SafetensorsWriter w;
  float x = 1;
  w.add("t", {1}, &x);
  EXPECT_THROW(w.add("t", {1}, &x), Error);
  EXPECT_THROW(w.add("", {1}, &x), Error);
  EXPECT_THROW(w.add("__metadata__", {1}, &x), Error);
  EXPECT_THROW(w.add("neg", {-1}, &x), Error);
  std::vector<std::byte> three(3);
  EXPECT_THROW(w.add_raw("raw", SafetensorsDType::F32, {1}, three), Error);
  TempDir dir;
  EXPECT_THROW(w.write(dir.file("no/such/folder/x.safetensors")), Error);
}

// Built byte by byte, independent of the writer: unpadded header, so the data is unaligned.
TEST(Safetensors, ReadsHandBuiltFile) {
  TempDir dir;
  std::string header = "{" + entry("b", "F32", "[2]", 0, 8) + "," + entry("a", "BF16", "[2,1]", 8, 12) + "," +
                       entry("z", "U8", "[3]", 12, 15) + ",\"__metadata__\":{\"k\":\"v\"}}";
  std::vector<uint8_t> data = {0x00, 0x00, 0xC0, 0x3F,   // f32 1.5
                               0x00, 0x00, 0x00, 0xC0,   // f32 -2.0
                               0x40, 0x40, 0x00, 0xBF,   // bf16 3.0, -0.5
                               1,    2,    255};
  // Trailing spaces are allowed padding of the header.
  for (std::string h : {header, header + "   "}) {
    const std::string path = dir.file("hand.safetensors");
    write_bytes(path, make_file(h, data));
    SafetensorsFile f(path);
    EXPECT_EQ(f.data_offset(), 8 + h.size());
    EXPECT_EQ(f.tensor("b").to_f32(), (std::vector<float>{1.5f, -2.0f}));
    EXPECT_EQ(f.tensor("a").to_f32(), (std::vector<float>{3.0f, -0.5f}));
    EXPECT_EQ(f.tensor("a").shape, (std::vector<int64_t>{2, 1}));
    const auto& z = f.tensor("z");
    ASSERT_EQ(z.bytes.size(), 3u);
    EXPECT_EQ(uint8_t(z.bytes[2]), 255);
    EXPECT_EQ(f.metadata("k"), "v");
    // A view over unaligned f32 data is refused rather than handed out.
    if (f.data_offset() % 4 != 0) {
      EXPECT_THROW(f.tensor("b").view(), Error);
    }
  }
}

TEST(Safetensors, EmptyHeaderIsValid) {
  TempDir dir;
  write_bytes(dir.file("e"), make_file("{}", {}));
  SafetensorsFile f(dir.file("e"));
  EXPECT_TRUE(f.tensors().empty());
}

TEST(Safetensors, MalformedFilesThrowNamingTheProblem) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::vector<uint8_t> d12(12, 0);
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
    const char* expect;
  };
  const std::string ok = entry("t", "F32", "[3]", 0, 12);
  std::vector<Case> cases = {
      {"empty file", {}, "too short"},
      {"5 bytes", {1, 0, 0, 0, 0}, "too short"},
      {"huge header length", make_file("{" + ok + "}", d12, 1ull << 40), "exceeds the limit"},
      {"header length max", make_file("{" + ok + "}", d12, ~0ull - 1), "exceeds the limit"},
      {"header past EOF", make_file("{" + ok + "}", d12, 200), "runs past the end"},
      {"header length 0", make_file("", d12, 0), "too short for a JSON object"},
      {"not JSON", make_file("{\"t\": [", d12), "invalid JSON"},
      {"garbage after JSON", make_file("{}xyz", {}), "invalid JSON"},
      {"not an object", make_file("[1,2]", {}), "does not start with"},
      {"entry not an object", make_file("{\"t\": 5}", {}), "expected an object"},
      {"unknown dtype", make_file("{" + entry("t", "F33", "[3]", 0, 12) + "}", d12), "unknown dtype 'F33'"},
      {"dtype not a string", make_file("{\"t\":{\"dtype\":1,\"shape\":[],\"data_offsets\":[0,0]}}", {}),
       "dtype is a number"},
      {"missing dtype", make_file("{\"t\":{\"shape\":[3],\"data_offsets\":[0,12]}}", d12), "missing field 'dtype'"},
      {"missing shape", make_file("{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,12]}}", d12),
       "missing field 'shape'"},
      {"missing offsets", make_file("{\"t\":{\"dtype\":\"F32\",\"shape\":[3]}}", d12),
       "missing field 'data_offsets'"},
      {"unknown field", make_file("{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12],\"x\":1}}", d12),
       "unknown field 'x'"},
      {"negative shape", make_file("{" + entry("t", "F32", "[-3]", 0, 12) + "}", d12), "shape[0] is -3"},
      {"fractional shape", make_file("{" + entry("t", "F32", "[1.5]", 0, 12) + "}", d12), "non-negative integer"},
      {"shape not an array", make_file("{" + entry("t", "F32", "3", 0, 12) + "}", d12), "shape is a number"},
      {"shape overflow", make_file("{" + entry("t", "F32", "[4294967296,4294967296]", 0, 12) + "}", d12),
       "overflows"},
      {"shape/offset mismatch", make_file("{" + entry("t", "F32", "[2]", 0, 12) + "}", d12), "needs 8"},
      {"offsets past EOF", make_file("{" + entry("t", "F32", "[250]", 0, 1000) + "}", d12),
       "exceeds the data section"},
      {"begin > end", make_file("{" + entry("t", "F32", "[0]", 8, 4) + "}", d12), "begin > end"},
      {"offsets arity", make_file("{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0]}}", d12),
       "expected [begin, end]"},
      {"negative offset", make_file("{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[-4,8]}}", d12),
       "data_offsets[0] is -4"},
      {"overlap", make_file("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}", d12),
       "overlap"},
      {"hole", make_file("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}", d12),
       "belong to no tensor"},
      {"trailing data", make_file("{" + entry("a", "F32", "[2]", 0, 8) + "}", d12), "after the last tensor"},
      {"non-string metadata", make_file("{" + ok + ",\"__metadata__\":{\"theta\":10000}}", d12),
       "metadata values must be strings"},
      {"metadata not an object", make_file("{" + ok + ",\"__metadata__\":[\"a\"]}", d12), "__metadata__ is an array"},
  };
  for (const auto& c : cases) {
    write_bytes(path, c.bytes);
    std::string msg = error_of(path);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": got '" << msg << "'";
    EXPECT_NE(msg.find(path), std::string::npos) << c.what << ": message does not name the file: " << msg;
  }
  // Tensor-level problems name the tensor too.
  write_bytes(path, make_file("{" + entry("layer.0.k", "F32", "[2]", 0, 12) + "}", d12));
  EXPECT_NE(error_of(path).find("'layer.0.k'"), std::string::npos);
  EXPECT_NE(error_of(dir.file("missing.safetensors")).find("missing.safetensors"), std::string::npos);
  EXPECT_NE(error_of(dir.path.string()).find("not a regular file"), std::string::npos);
}

TEST(Safetensors, TruncatedAnywhereThrows) {
  TempDir dir;
  std::vector<float> a(7, 1.0f);
  SafetensorsWriter w;
  w.add("a", {7}, a.data());
  w.add("b", {3}, a.data(), DType::BF16);
  w.set_metadata("m", "x");
  const std::string full = dir.file("full"), cut = dir.file("cut");
  w.write(full);
  std::ifstream in(full, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 60u);
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_bytes(cut, std::vector<uint8_t>(bytes.begin(), bytes.begin() + n));
    EXPECT_FALSE(error_of(cut).empty()) << "truncated to " << n << " of " << bytes.size() << " bytes was accepted";
  }
  write_bytes(cut, bytes);
  EXPECT_EQ(error_of(cut), "");
}

// Random byte mutations of a valid file: every outcome is a valid file or a multipole::Error,
// never a crash (this also runs under ASan/UBSan).
TEST(Safetensors, RandomMutationsNeverCrash) {
  TempDir dir;
  std::vector<float> a(24), b(10);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i) - 3;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 0.5f * float(i);
  SafetensorsWriter w;
  w.add("q", {2, 3, 4}, a.data());
  w.add("k", {10}, b.data(), DType::F16);
  w.add("v", {5, 2}, b.data(), DType::BF16);
  w.set_metadata("rope_theta", "10000");
  const std::string base_path = dir.file("base"), path = dir.file("mut");
  w.write(base_path);
  std::ifstream in(base_path, std::ios::binary);
  const std::vector<uint8_t> base((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_end;
  std::memcpy(&header_end, base.data(), 8);
  header_end += 8;

  std::mt19937_64 rng(20250613);
  int accepted = 0, rejected = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::vector<uint8_t> m = base;
    const int edits = 1 + int(rng() % 6);
    for (int e = 0; e < edits; ++e) {
      // Mostly the length field and the header, where the parsing is.
      size_t pos = rng() % 10 < 8 ? rng() % header_end : rng() % m.size();
      switch (rng() % 4) {
        case 0: m[pos] = uint8_t(rng()); break;
        case 1: m[pos] ^= uint8_t(1u << (rng() % 8)); break;
        case 2: m[pos] = "{}[]\",:0123456789-.e "[rng() % 22]; break;
        case 3: m.resize(rng() % m.size() + 1); break;
      }
      if (m.empty()) break;
    }
    write_bytes(path, m);
    try {
      SafetensorsFile f(path);
      double sum = 0;
      for (const auto& t : f.tensors()) {
        if (!to_core_dtype(t.dtype)) continue;
        for (float x : t.to_f32()) sum += std::isfinite(x) ? x : 0;
      }
      EXPECT_TRUE(std::isfinite(sum));
      ++accepted;
    } catch (const Error& e) {
      EXPECT_GT(std::strlen(e.what()), 10u);
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1000);  // most mutations must be caught
}

TEST(Safetensors, ShardedCheckpoint) {
  TempDir dir;
  std::vector<float> x = {1, 2, 3, 4};
  SafetensorsWriter s1, s2;
  s1.add("model.embed", {2, 2}, x.data());
  s1.add("model.layers.0.w", {4}, x.data(), DType::BF16);
  s2.add("model.layers.1.w", {1, 4}, x.data(), DType::F16);
  s2.add("lm_head", {4}, x.data());
  s2.add("unlisted", {1}, x.data());  // not in the weight map: not part of the namespace
  s1.write(dir.file("model-00001-of-00002.safetensors"));
  s2.write(dir.file("model-00002-of-00002.safetensors"));
  const std::string index = R"({"metadata": {"total_size": 44, "format": "pt"},
    "weight_map": {"model.embed": "model-00001-of-00002.safetensors",
                   "model.layers.0.w": "model-00001-of-00002.safetensors",
                   "model.layers.1.w": "model-00002-of-00002.safetensors",
                   "lm_head": "model-00002-of-00002.safetensors"}})";
  write_bytes(dir.file("model.safetensors.index.json"), std::vector<uint8_t>(index.begin(), index.end()));

  for (const std::string& p : {dir.path.string(), dir.file("model.safetensors.index.json")}) {
    SafetensorsCheckpoint ck(p);
    EXPECT_EQ(ck.files().size(), 2u);
    EXPECT_EQ(ck.size(), 4u);
    auto names = ck.names();
    EXPECT_EQ(names.front(), "lm_head");
    EXPECT_EQ(ck.tensor("model.layers.1.w").shape, (std::vector<int64_t>{1, 4}));
    EXPECT_EQ(ck.tensor("model.layers.1.w").to_f32(), x);
    EXPECT_EQ(ck.tensor("model.layers.0.w").to_f32(), x);
    EXPECT_NE(ck.tensor("lm_head").file.find("00002"), std::string::npos);
    EXPECT_EQ(ck.find("unlisted"), nullptr);
    EXPECT_THROW(ck.tensor("unlisted"), Error);
    EXPECT_EQ(ck.metadata().at("total_size"), "44");
    EXPECT_EQ(ck.metadata().at("format"), "pt");
  }
  // A single file reads through the same class.
  SafetensorsCheckpoint single(dir.file("model-00002-of-00002.safetensors"));
  EXPECT_EQ(single.size(), 3u);

  auto index_error = [&](const std::string& text) -> std::string {
    const std::string p = dir.file("bad.index.json");
    write_bytes(p, std::vector<uint8_t>(text.begin(), text.end()));
    try {
      SafetensorsCheckpoint ck(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(index_error(R"({"weight_map": {"x": "model-00001-of-00002.safetensors"}})").find("no such tensor"),
            std::string::npos);
  EXPECT_NE(index_error(R"({"weight_map": {"x": "absent.safetensors"}})").find("absent.safetensors"),
            std::string::npos);
  EXPECT_NE(index_error(R"({"weight_map": {"x": "../escape.safetensors"}})").find("inside the checkpoint"),
            std::string::npos);
  EXPECT_NE(index_error(R"({"weight_map": {"x": 3}})").find("weight_map['x'] is a number"), std::string::npos);
  EXPECT_NE(index_error(R"({"weight_map": {}})").find("non-empty"), std::string::npos);
  EXPECT_NE(index_error(R"({"metadata": {}})").find("missing 'weight_map'"), std::string::npos);
  EXPECT_NE(index_error(R"({"weight_map": )").find("invalid JSON"), std::string::npos);
  TempDir empty;
  fs::create_directories(empty.path / "sub");
  try {
    SafetensorsCheckpoint ck((empty.path / "sub").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("neither"), std::string::npos);
  }
}
