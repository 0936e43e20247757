#pragma once
// Safetensors files: an 8-byte little-endian header length, a JSON header
//   {"<name>": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}
// then the data section, which the tensors must cover exactly (no holes, no overlaps, as the
// format requires). Files are mmapped and validated completely before any tensor is handed
// out, so a bad file fails with a message instead of a wild read later. A sharded checkpoint
// (model.safetensors.index.json) reads as one tensor namespace.
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/core/dtype.hpp"
#include "multipole/core/mapped_file.hpp"
#include "multipole/core/tensor.hpp"

namespace multipole {

// Every dtype of the safetensors format. Only F32/F16/BF16 convert to the core DType.
enum class SafetensorsDType : uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

size_t safetensors_dtype_size(SafetensorsDType t);
std::string_view safetensors_dtype_name(SafetensorsDType t);  // "F32", "BF16", ...
std::optional<SafetensorsDType> parse_safetensors_dtype(std::string_view name);
std::optional<DType> to_core_dtype(SafetensorsDType t);
SafetensorsDType to_safetensors_dtype(DType t);

using StringMap = std::map<std::string, std::string, std::less<>>;

struct SafetensorsTensor {
  std::string file;  // path of the file holding it (for messages)
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;       // data_offsets, relative to the data section
  std::span<const std::byte> bytes;  // the data, inside the file's mapping (maybe unaligned)

  int64_t numel() const;
  int rank() const { return int(shape.size()); }
  std::string shape_string() const;  // "[2, 8, 128]"
  // A read-only view (never write through it); needs F32/F16/BF16, rank <= 4 and data
  // aligned to the element size. Throws naming the file and tensor otherwise.
  TensorView view() const;
  // Converts the whole tensor to f32 (F32/F16/BF16 only; any alignment).
  //   out: numel() floats
  void to_f32(float* out) const;
  std::vector<float> to_f32() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the file; throws multipole::Error naming the file, tensor, field,
  // value and limit at fault.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return file_.path(); }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data section
  // Tensors sorted by name.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* find(std::string_view name) const;  // nullptr if absent
  const SafetensorsTensor& tensor(std::string_view name) const;  // throws if absent
  const StringMap& metadata() const { return metadata_; }
  std::optional<std::string_view> metadata(std::string_view key) const;

 private:
  MappedFile file_;
  uint64_t data_offset_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  StringMap metadata_;
};

// One namespace over a single file or the shards listed by a model.safetensors.index.json
// ({"metadata": {...}, "weight_map": {"<tensor>": "<shard file>"}}).
class SafetensorsCheckpoint {
 public:
  // path: a .safetensors file, a *.index.json, or a folder holding
  // model.safetensors.index.json or model.safetensors. Every shard is validated; every
  // tensor of the weight map must be in the shard it names.
  explicit SafetensorsCheckpoint(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsFile>& files() const { return files_; }
  size_t size() const { return by_name_.size(); }
  std::vector<std::string_view> names() const;  // sorted
  const SafetensorsTensor* find(std::string_view name) const;
  const SafetensorsTensor& tensor(std::string_view name) const;
  // The index's "metadata" (values that are not strings in their JSON text, e.g.
  // "total_size": "123"), or the single file's __metadata__.
  const StringMap& metadata() const { return metadata_; }

 private:
  std::string path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, const SafetensorsTensor*, std::less<>> by_name_;
  StringMap metadata_;
};

// Builds a safetensors file in memory and writes it atomically (temporary file in the same
// folder, then rename). The data section starts 8-byte aligned; tensors are laid out by
// decreasing element size (those whose size is a multiple of 8 bytes first), so every tensor
// is aligned to its element size, and to 8 bytes when the ones before it allow, with no holes.
class SafetensorsWriter {
 public:
  // Copies `data` (numel(shape) floats) converted to `dtype` (F32, F16 or BF16).
  void add(std::string name, std::vector<int64_t> shape, const float* data, DType dtype = DType::F32);
  // Copies raw little-endian bytes already in `dtype`; data.size() must be numel x size.
  void add_raw(std::string name, SafetensorsDType dtype, std::vector<int64_t> shape, std::span<const std::byte> data);
  void set_metadata(std::string key, std::string value);
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    SafetensorsDType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> data;
  };
  Entry& new_entry(std::string name, SafetensorsDType dtype, std::vector<int64_t> shape);
  std::vector<Entry> entries_;
  StringMap metadata_;
};

// Writes bytes to `path` atomically (PATH.tmp.<pid> then rename); throws naming the path.
void write_file_atomic(const std::string& path, std::span<const std::span<const std::byte>> pieces);

}  // namespace multipole
