#pragma once
// GGUF files (llama.cpp's format), versions 2 and 3, little-endian:
//   "GGUF", u32 version, u64 tensor_count, u64 kv_count,
//   kv_count x (string key, u32 value type, value),
//   tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset),
//   padding to general.alignment (default 32), then the data section.
// A string is a u64 byte length and the bytes. Tensor offsets are relative to the data
// section and multiples of the alignment; dims[0] is the fastest-varying (contiguous) one.
// The file is mmapped and validated completely on open (every count, length, offset and
// size against the file), so a bad file fails with a message instead of a wild read later.
// Metadata strings and tensor data are views into the mapping: they live as long as the
// GGUFFile.
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/core/mapped_file.hpp"

namespace multipole {

// Value types of the metadata (numbers as in the format).
enum class GGUFType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7,
  String = 8, Array = 9, U64 = 10, I64 = 11, F64 = 12,
};
std::string_view gguf_type_name(GGUFType t);  // "u32", "string", "array", ...; "?" if unknown

// Tensor storage types (ggml_type numbers). Unknown numbers stay representable so that
// messages can name them.
enum class GGMLType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
  IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

// Block layout of a ggml type: `block_size` elements are stored in `block_bytes` bytes.
struct GGMLTypeTraits {
  std::string_view name;  // "F32", "Q4_K", ...
  uint32_t block_size = 0;
  uint32_t block_bytes = 0;
};
// nullopt for numbers this reader does not know (removed or newer types).
std::optional<GGMLTypeTraits> ggml_type_traits(GGMLType t);
std::string ggml_type_name(GGMLType t);  // "Q4_K", or "type 123" when unknown
// Bytes of `n_elements` elements stored as `t`; throws if `t` is unknown or n_elements is
// not a whole number of blocks.
uint64_t ggml_nbytes(GGMLType t, uint64_t n_elements);

// One metadata value. Scalars are widened to the three numeric kinds below; arrays of
// numbers/bools keep their raw little-endian bytes (read with the typed getters of
// GGUFFile), arrays of strings are views into the mapping. Nested arrays are rejected.
struct GGUFValue {
  GGUFType type = GGUFType::U8;
  uint64_t u = 0;          // U8..U64 and Bool (0/1)
  int64_t i = 0;           // I8..I64
  double f = 0;            // F32, F64
  std::string_view s;      // String
  GGUFType elem_type = GGUFType::U8;      // Array: element type
  uint64_t count = 0;                     // Array: number of elements
  std::span<const std::byte> raw;         // Array of numbers/bools: the elements' bytes
  std::vector<std::string_view> strings;  // Array of strings

  bool is_integer() const;  // U8..I64 (not Bool)
};

struct GGUFTensor {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order: dims[0] is contiguous
  GGMLType type = GGMLType::F32;
  uint64_t offset = 0;             // relative to the data section
  uint64_t n_bytes = 0;            // from the type's block layout
  std::span<const std::byte> data;  // inside the mapping; aligned as the file says

  uint64_t numel() const;
  std::string dims_string() const;  // "[4096, 32000]" (ggml order)
};

class GGUFFile {
 public:
  // Maps and validates the file; throws multipole::Error naming the file, the key or tensor,
  // the value and the limit at fault.
  explicit GGUFFile(const std::string& path);

  const std::string& path() const { return file_.path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data section
  size_t file_size() const { return file_.size(); }

  // Metadata, keyed by name (sorted).
  const std::map<std::string, GGUFValue, std::less<>>& metadata() const { return metadata_; }
  bool has(std::string_view key) const { return find(key) != nullptr; }
  const GGUFValue* find(std::string_view key) const;  // nullptr if absent
  const GGUFValue& get(std::string_view key) const;   // throws if absent

  // Typed getters: throw naming the file, key, wanted and actual type when absent or of a
  // type that does not convert exactly (any integer type converts if its value fits).
  std::string_view get_string(std::string_view key) const;
  uint64_t get_uint(std::string_view key) const;
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;  // F32, F64 or any integer type
  bool get_bool(std::string_view key) const;
  // Same, with a fallback when the key is absent (a key of the wrong type still throws).
  std::string_view get_string(std::string_view key, std::string_view fallback) const;
  uint64_t get_uint(std::string_view key, uint64_t fallback) const;
  int64_t get_int(std::string_view key, int64_t fallback) const;
  double get_float(std::string_view key, double fallback) const;
  bool get_bool(std::string_view key, bool fallback) const;
  // Arrays: strings, any integer element type, any float element type (or integers).
  std::span<const std::string_view> get_string_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;
  std::vector<double> get_float_array(std::string_view key) const;
  uint64_t get_array_size(std::string_view key) const;

  // Tensors in file order.
  const std::vector<GGUFTensor>& tensors() const { return tensors_; }
  const GGUFTensor* find_tensor(std::string_view name) const;  // nullptr if absent
  const GGUFTensor& tensor(std::string_view name) const;       // throws if absent

 private:
  const GGUFValue& expect(std::string_view key, std::string_view wanted) const;
  MappedFile file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GGUFValue, std::less<>> metadata_;
  std::vector<GGUFTensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// Builds a GGUF v3 file in memory (tests write tiny checkpoints and tokenizers with it).
// Metadata keeps insertion order (setting a key again replaces its value); tensors are laid
// out in the order added, each at a multiple of the alignment.
class GGUFWriter {
 public:
  explicit GGUFWriter(uint32_t alignment = 32);  // != 32 also writes general.alignment

  void set_u8(std::string key, uint8_t v);
  void set_u32(std::string key, uint32_t v);
  void set_i32(std::string key, int32_t v);
  void set_u64(std::string key, uint64_t v);
  void set_i64(std::string key, int64_t v);
  void set_f32(std::string key, float v);
  void set_f64(std::string key, double v);
  void set_bool(std::string key, bool v);
  void set_string(std::string key, std::string_view v);
  void set_string_array(std::string key, std::span<const std::string> v);
  void set_i32_array(std::string key, std::span<const int32_t> v);
  void set_f32_array(std::string key, std::span<const float> v);

  // data: the tensor's bytes in `type`'s block layout, ggml_nbytes(type, numel) of them;
  // dims in ggml order (dims[0] contiguous). Throws on a size mismatch or a repeated name.
  void add_tensor(std::string name, GGMLType type, std::vector<uint64_t> dims, std::span<const std::byte> data);

  std::vector<std::byte> bytes() const;
  void write(const std::string& path) const;  // atomically (temporary file, then rename)

 private:
  struct Entry {
    std::string key;
    std::vector<std::byte> value;  // u32 type, then the value as stored in the file
  };
  struct TensorEntry {
    std::string name;
    GGMLType type;
    std::vector<uint64_t> dims;
    std::vector<std::byte> data;
  };
  void set(std::string key, std::vector<std::byte> value);
  uint32_t alignment_;
  std::vector<Entry> entries_;
  std::vector<TensorEntry> tensors_;
};

}  // namespace multipole
