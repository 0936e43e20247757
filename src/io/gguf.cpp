#include "multipole/io/gguf.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include <fmt/format.h>

#include "multipole/core/error.hpp"
#include "multipole/io/safetensors.hpp"  // write_file_atomic

namespace multipole {

namespace {

constexpr uint64_t kDefaultAlignment = 32;
constexpr uint64_t kMaxAlignment = uint64_t(1) << 30;
constexpr size_t kMaxTensorName = 63;  // ggml keeps names in char[64]
constexpr uint32_t kMaxDims = 4;       // GGML_MAX_DIMS
// Smallest encodings, used to bound counts by the bytes left before allocating anything.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;             // empty key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;  // empty name, n_dims=0, type, offset

// Bytes of one scalar of type t; 0 for strings/arrays/unknown.
size_t scalar_size(GGUFType t) {
  switch (t) {
    case GGUFType::U8: case GGUFType::I8: case GGUFType::Bool: return 1;
    case GGUFType::U16: case GGUFType::I16: return 2;
    case GGUFType::U32: case GGUFType::I32: case GGUFType::F32: return 4;
    case GGUFType::U64: case GGUFType::I64: case GGUFType::F64: return 8;
    default: return 0;
  }
}

bool known_type(uint32_t t) { return t <= uint32_t(GGUFType::F64); }

bool is_unsigned(GGUFType t) {
  return t == GGUFType::U8 || t == GGUFType::U16 || t == GGUFType::U32 || t == GGUFType::U64;
}
bool is_signed(GGUFType t) {
  return t == GGUFType::I8 || t == GGUFType::I16 || t == GGUFType::I32 || t == GGUFType::I64;
}
bool is_float(GGUFType t) { return t == GGUFType::F32 || t == GGUFType::F64; }

// Reads one little-endian scalar of type t from p (scalar_size(t) bytes) into v.
void decode_scalar(GGUFType t, const std::byte* p, GGUFValue& v) {
  auto load = [p](auto x) {
    std::memcpy(&x, p, sizeof(x));
    return x;
  };
  v.type = t;
  switch (t) {
    case GGUFType::U8: v.u = load(uint8_t{}); break;
    case GGUFType::U16: v.u = load(uint16_t{}); break;
    case GGUFType::U32: v.u = load(uint32_t{}); break;
    case GGUFType::U64: v.u = load(uint64_t{}); break;
    case GGUFType::Bool: v.u = load(uint8_t{}); break;
    case GGUFType::I8: v.i = load(int8_t{}); break;
    case GGUFType::I16: v.i = load(int16_t{}); break;
    case GGUFType::I32: v.i = load(int32_t{}); break;
    case GGUFType::I64: v.i = load(int64_t{}); break;
    case GGUFType::F32: v.f = load(float{}); break;
    case GGUFType::F64: v.f = load(double{}); break;
    default: break;
  }
}

std::string describe(const GGUFValue& v) {
  switch (v.type) {
    case GGUFType::String: {
      std::string_view s = v.s.substr(0, 40);
      return fmt::format("string \"{}{}\"", s, v.s.size() > s.size() ? "..." : "");
    }
    case GGUFType::Array: return fmt::format("array of {} {}", v.count, gguf_type_name(v.elem_type));
    case GGUFType::Bool: return fmt::format("bool {}", v.u != 0);
    default:
      if (is_unsigned(v.type)) return fmt::format("{} {}", gguf_type_name(v.type), v.u);
      if (is_signed(v.type)) return fmt::format("{} {}", gguf_type_name(v.type), v.i);
      return fmt::format("{} {}", gguf_type_name(v.type), v.f);
  }
}

// Bounds-checked cursor over the mapped file; every read names what it was reading.
class Cursor {
 public:
  Cursor(const std::byte* base, size_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }
  const std::byte* here() const { return base_ + pos_; }

  template <class What>
  void need(uint64_t n, const What& what) const {
    if (n > left())
      fail("{}: truncated: {} needs {} bytes at offset {}, but the file ends at {}", path_, what(), n, pos_, size_);
  }
  template <class T, class What>
  T read(const What& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  template <class What>
  std::string_view read_string(const What& what) {
    uint64_t n = read<uint64_t>([&] { return fmt::format("the length of {}", what()); });
    if (n > left())
      fail("{}: {}: string length {} exceeds the {} bytes left in the file (offset {})", path_, what(), n, left(), pos_);
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), size_t(n));
    pos_ += size_t(n);
    return s;
  }
  void skip(size_t n) { pos_ += n; }

 private:
  const std::byte* base_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

}  // namespace

std::string_view gguf_type_name(GGUFType t) {
  switch (t) {
    case GGUFType::U8: return "u8";
    case GGUFType::I8: return "i8";
    case GGUFType::U16: return "u16";
    case GGUFType::I16: return "i16";
    case GGUFType::U32: return "u32";
    case GGUFType::I32: return "i32";
    case GGUFType::F32: return "f32";
    case GGUFType::Bool: return "bool";
    case GGUFType::String: return "string";
    case GGUFType::Array: return "array";
    case GGUFType::U64: return "u64";
    case GGUFType::I64: return "i64";
    case GGUFType::F64: return "f64";
  }
  return "?";
}

std::optional<GGMLTypeTraits> ggml_type_traits(GGMLType t) {
  // Block sizes and bytes as in ggml's block_* structs (QK_K = 256).
  switch (t) {
    case GGMLType::F32: return GGMLTypeTraits{"F32", 1, 4};
    case GGMLType::F16: return GGMLTypeTraits{"F16", 1, 2};
    case GGMLType::BF16: return GGMLTypeTraits{"BF16", 1, 2};
    case GGMLType::F64: return GGMLTypeTraits{"F64", 1, 8};
    case GGMLType::I8: return GGMLTypeTraits{"I8", 1, 1};
    case GGMLType::I16: return GGMLTypeTraits{"I16", 1, 2};
    case GGMLType::I32: return GGMLTypeTraits{"I32", 1, 4};
    case GGMLType::I64: return GGMLTypeTraits{"I64", 1, 8};
    case GGMLType::Q4_0: return GGMLTypeTraits{"Q4_0", 32, 2 + 16};
    case GGMLType::Q4_1: return GGMLTypeTraits{"Q4_1", 32, 2 + 2 + 16};
    case GGMLType::Q5_0: return GGMLTypeTraits{"Q5_0", 32, 2 + 4 + 16};
    case GGMLType::Q5_1: return GGMLTypeTraits{"Q5_1", 32, 2 + 2 + 4 + 16};
    case GGMLType::Q8_0: return GGMLTypeTraits{"Q8_0", 32, 2 + 32};
    case GGMLType::Q8_1: return GGMLTypeTraits{"Q8_1", 32, 2 + 2 + 32};
    case GGMLType::Q2_K: return GGMLTypeTraits{"Q2_K", 256, 16 + 64 + 2 + 2};
    case GGMLType::Q3_K: return GGMLTypeTraits{"Q3_K", 256, 32 + 64 + 12 + 2};
    case GGMLType::Q4_K: return GGMLTypeTraits{"Q4_K", 256, 2 + 2 + 12 + 128};
    case GGMLType::Q5_K: return GGMLTypeTraits{"Q5_K", 256, 2 + 2 + 12 + 32 + 128};
    case GGMLType::Q6_K: return GGMLTypeTraits{"Q6_K", 256, 128 + 64 + 16 + 2};
    case GGMLType::Q8_K: return GGMLTypeTraits{"Q8_K", 256, 4 + 256 + 32};
    case GGMLType::IQ2_XXS: return GGMLTypeTraits{"IQ2_XXS", 256, 2 + 64};
    case GGMLType::IQ2_XS: return GGMLTypeTraits{"IQ2_XS", 256, 2 + 64 + 8};
    case GGMLType::IQ3_XXS: return GGMLTypeTraits{"IQ3_XXS", 256, 2 + 96};
    case GGMLType::IQ1_S: return GGMLTypeTraits{"IQ1_S", 256, 2 + 32 + 16};
    case GGMLType::IQ4_NL: return GGMLTypeTraits{"IQ4_NL", 32, 2 + 16};
    case GGMLType::IQ3_S: return GGMLTypeTraits{"IQ3_S", 256, 2 + 64 + 8 + 32 + 4};
    case GGMLType::IQ2_S: return GGMLTypeTraits{"IQ2_S", 256, 2 + 64 + 8 + 8};
    case GGMLType::IQ4_XS: return GGMLTypeTraits{"IQ4_XS", 256, 2 + 2 + 4 + 128};
    case GGMLType::IQ1_M: return GGMLTypeTraits{"IQ1_M", 256, 32 + 16 + 8};
    case GGMLType::TQ1_0: return GGMLTypeTraits{"TQ1_0", 256, 48 + 4 + 2};
    case GGMLType::TQ2_0: return GGMLTypeTraits{"TQ2_0", 256, 64 + 2};
    case GGMLType::MXFP4: return GGMLTypeTraits{"MXFP4", 32, 1 + 16};
  }
  return std::nullopt;
}

std::string ggml_type_name(GGMLType t) {
  auto traits = ggml_type_traits(t);
  return traits ? std::string(traits->name) : fmt::format("type {}", uint32_t(t));
}

uint64_t ggml_nbytes(GGMLType t, uint64_t n_elements) {
  auto traits = ggml_type_traits(t);
  if (!traits) fail("unknown ggml type {}", uint32_t(t));
  if (n_elements % traits->block_size != 0)
    fail("{} elements are not a whole number of {} blocks of {}", n_elements, traits->name, traits->block_size);
  uint64_t bytes;
  if (__builtin_mul_overflow(n_elements / traits->block_size, uint64_t(traits->block_bytes), &bytes))
    fail("{} elements of {} overflow 64-bit byte counts", n_elements, traits->name);
  return bytes;
}

bool GGUFValue::is_integer() const { return is_unsigned(type) || is_signed(type); }

uint64_t GGUFTensor::numel() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;  // validated on load not to overflow
  return n;
}

std::string GGUFTensor::dims_string() const { return fmt::format("[{}]", fmt::join(dims, ", ")); }

GGUFFile::GGUFFile(const std::string& path) : file_(path) {
  const std::string& p = file_.path();
  Cursor in(file_.data(), file_.size(), p);
  auto what = [](const char* s) { return [s] { return std::string(s); }; };

  // Header.
  if (file_.size() < 4 || std::memcmp(file_.data(), "GGUF", 4) != 0)
    fail("{}: not a GGUF file (the first 4 bytes are not \"GGUF\"; the file has {} bytes)", p, file_.size());
  in.skip(4);
  version_ = in.read<uint32_t>(what("the version"));
  if (version_ == 0x02000000u || version_ == 0x03000000u)
    fail("{}: big-endian GGUF files are not supported", p);
  if (version_ < 2 || version_ > 3) fail("{}: GGUF version {} is not supported (2 or 3)", p, version_);
  const uint64_t n_tensors = in.read<uint64_t>(what("the tensor count"));
  const uint64_t n_kv = in.read<uint64_t>(what("the metadata count"));
  if (n_kv > in.left() / kMinKvBytes)
    fail("{}: metadata count {} cannot fit in the {} bytes left (each entry takes at least {} bytes)", p, n_kv,
         in.left(), kMinKvBytes);
  if (n_tensors > in.left() / kMinTensorInfoBytes)
    fail("{}: tensor count {} cannot fit in the {} bytes left (each entry takes at least {} bytes)", p, n_tensors,
         in.left(), kMinTensorInfoBytes);

  // Metadata.
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string_view key = in.read_string([&] { return fmt::format("metadata key #{}", k); });
    auto at_key = [&] { return fmt::format("metadata key '{}'", key); };
    if (key.empty()) fail("{}: metadata key #{} is empty", p, k);
    if (metadata_.count(key)) fail("{}: metadata key '{}' appears twice", p, key);
    const uint32_t type = in.read<uint32_t>([&] { return fmt::format("the type of {}", at_key()); });
    if (!known_type(type)) fail("{}: {} has unknown value type {} (0..12)", p, at_key(), type);
    GGUFValue v;
    v.type = GGUFType(type);
    if (v.type == GGUFType::String) {
      v.s = in.read_string(at_key);
    } else if (v.type == GGUFType::Array) {
      const uint32_t et = in.read<uint32_t>([&] { return fmt::format("the element type of {}", at_key()); });
      if (et == uint32_t(GGUFType::Array)) fail("{}: {} is a nested array (not supported)", p, at_key());
      if (!known_type(et)) fail("{}: {} has unknown array element type {} (0..12)", p, at_key(), et);
      v.elem_type = GGUFType(et);
      v.count = in.read<uint64_t>([&] { return fmt::format("the element count of {}", at_key()); });
      const uint64_t min_elem = v.elem_type == GGUFType::String ? 8 : scalar_size(v.elem_type);
      if (v.count > in.left() / min_elem)
        fail("{}: {} has {} {} elements, which cannot fit in the {} bytes left", p, at_key(), v.count,
             gguf_type_name(v.elem_type), in.left());
      if (v.elem_type == GGUFType::String) {
        v.strings.reserve(size_t(v.count));
        for (uint64_t j = 0; j < v.count; ++j)
          v.strings.push_back(in.read_string([&] { return fmt::format("{} element {}", at_key(), j); }));
      } else {
        const size_t bytes = size_t(v.count) * min_elem;
        v.raw = {in.here(), bytes};
        if (v.elem_type == GGUFType::Bool) {
          for (size_t j = 0; j < bytes; ++j)
            if (uint8_t(v.raw[j]) > 1)
              fail("{}: {} element {} is bool {} (must be 0 or 1)", p, at_key(), j, uint8_t(v.raw[j]));
        }
        in.skip(bytes);
      }
    } else {
      const size_t n = scalar_size(v.type);
      in.need(n, at_key);
      decode_scalar(v.type, in.here(), v);
      if (v.type == GGUFType::Bool && v.u > 1) fail("{}: {} is bool {} (must be 0 or 1)", p, at_key(), v.u);
      in.skip(n);
    }
    metadata_.emplace(std::string(key), std::move(v));
  }

  // Alignment.
  if (const GGUFValue* a = find("general.alignment")) {
    if (!is_unsigned(a->type))
      fail("{}: general.alignment is {}, wanted an unsigned integer", p, describe(*a));
    if (a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > kMaxAlignment)
      fail("{}: general.alignment = {} is not a power of two in [1, {}]", p, a->u, kMaxAlignment);
    alignment_ = a->u;
  } else {
    alignment_ = kDefaultAlignment;
  }

  // Tensor table.
  if (n_tensors > in.left() / kMinTensorInfoBytes)
    fail("{}: tensor count {} cannot fit in the {} bytes left after the metadata (each entry takes at least {} bytes)",
         p, n_tensors, in.left(), kMinTensorInfoBytes);
  tensors_.reserve(size_t(n_tensors));
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GGUFTensor info;
    std::string_view name = in.read_string([&] { return fmt::format("the name of tensor #{}", t); });
    if (name.empty()) fail("{}: tensor #{} has an empty name", p, t);
    if (name.size() > kMaxTensorName)
      fail("{}: tensor #{} name has {} bytes (at most {})", p, t, name.size(), kMaxTensorName);
    info.name = std::string(name);
    auto at_tensor = [&] { return fmt::format("tensor '{}'", info.name); };
    if (tensor_index_.count(info.name)) fail("{}: tensor '{}' appears twice", p, info.name);
    const uint32_t n_dims = in.read<uint32_t>([&] { return fmt::format("the dimension count of {}", at_tensor()); });
    if (n_dims > kMaxDims) fail("{}: {} has {} dimensions (at most {})", p, at_tensor(), n_dims, kMaxDims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = in.read<uint64_t>([&] { return fmt::format("dimension {} of {}", d, at_tensor()); });
      if (dim > uint64_t(std::numeric_limits<int64_t>::max()) || __builtin_mul_overflow(numel, dim, &numel) ||
          numel > uint64_t(std::numeric_limits<int64_t>::max()))
        fail("{}: {} dimension {} = {} makes the element count overflow", p, at_tensor(), d, dim);
      info.dims.push_back(dim);
    }
    const uint32_t type = in.read<uint32_t>([&] { return fmt::format("the type of {}", at_tensor()); });
    info.type = GGMLType(type);
    auto traits = ggml_type_traits(info.type);
    if (!traits) fail("{}: {} has unknown ggml type {}", p, at_tensor(), type);
    const uint64_t dim0 = n_dims ? info.dims[0] : 1;
    if (dim0 % traits->block_size != 0)
      fail("{}: {} dimension 0 = {} is not a multiple of the {} block size {}", p, at_tensor(), dim0, traits->name,
           traits->block_size);
    if (__builtin_mul_overflow(numel / traits->block_size, uint64_t(traits->block_bytes), &info.n_bytes))
      fail("{}: {} of {} {} elements overflows 64-bit byte counts", p, at_tensor(), numel, traits->name);
    info.offset = in.read<uint64_t>([&] { return fmt::format("the offset of {}", at_tensor()); });
    if (info.offset % alignment_ != 0)
      fail("{}: {} offset {} is not a multiple of the alignment {}", p, at_tensor(), info.offset, alignment_);
    tensor_index_.emplace(info.name, tensors_.size());
    tensors_.push_back(std::move(info));
  }

  // Data section: starts at the next multiple of the alignment. A file without tensors may
  // end before it (vocab-only files do).
  const uint64_t table_end = in.pos();
  data_offset_ = (table_end + alignment_ - 1) / alignment_ * alignment_;
  if (tensors_.empty()) return;
  if (data_offset_ > file_.size())
    fail("{}: the data section starts at {} (offset {} aligned to {}), past the end of the file ({} bytes)", p,
         data_offset_, table_end, alignment_, file_.size());
  const uint64_t data_size = file_.size() - data_offset_;
  for (GGUFTensor& t : tensors_) {
    if (t.offset > data_size || t.n_bytes > data_size - t.offset)
      fail("{}: tensor '{}' ({} {}, {} bytes at data offset {}) ends past the data section ({} bytes)", p, t.name,
           ggml_type_name(t.type), t.dims_string(), t.n_bytes, t.offset, data_size);
    t.data = {file_.data() + data_offset_ + t.offset, size_t(t.n_bytes)};
  }
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const GGUFTensor& a = tensors_[order[k - 1]];
    const GGUFTensor& b = tensors_[order[k]];
    if (a.offset + a.n_bytes > b.offset)
      fail("{}: tensors '{}' (bytes {}..{}) and '{}' (bytes {}..{}) overlap in the data section", p, a.name, a.offset,
           a.offset + a.n_bytes, b.name, b.offset, b.offset + b.n_bytes);
  }
}

const GGUFValue* GGUFFile::find(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GGUFValue& GGUFFile::get(std::string_view key) const { return expect(key, "a value"); }

const GGUFValue& GGUFFile::expect(std::string_view key, std::string_view wanted) const {
  const GGUFValue* v = find(key);
  if (!v) fail("{}: metadata key '{}' is missing (wanted {})", path(), key, wanted);
  return *v;
}

std::string_view GGUFFile::get_string(std::string_view key) const {
  const GGUFValue& v = expect(key, "a string");
  if (v.type != GGUFType::String) fail("{}: metadata key '{}' is {}, wanted a string", path(), key, describe(v));
  return v.s;
}

uint64_t GGUFFile::get_uint(std::string_view key) const {
  const GGUFValue& v = expect(key, "an unsigned integer");
  if (is_unsigned(v.type)) return v.u;
  if (is_signed(v.type) && v.i >= 0) return uint64_t(v.i);
  fail("{}: metadata key '{}' is {}, wanted an unsigned integer", path(), key, describe(v));
}

int64_t GGUFFile::get_int(std::string_view key) const {
  const GGUFValue& v = expect(key, "an integer");
  if (is_signed(v.type)) return v.i;
  if (is_unsigned(v.type) && v.u <= uint64_t(std::numeric_limits<int64_t>::max())) return int64_t(v.u);
  fail("{}: metadata key '{}' is {}, wanted a signed 64-bit integer", path(), key, describe(v));
}

double GGUFFile::get_float(std::string_view key) const {
  const GGUFValue& v = expect(key, "a number");
  if (is_float(v.type)) return v.f;
  if (is_unsigned(v.type)) return double(v.u);
  if (is_signed(v.type)) return double(v.i);
  fail("{}: metadata key '{}' is {}, wanted a number", path(), key, describe(v));
}

bool GGUFFile::get_bool(std::string_view key) const {
  const GGUFValue& v = expect(key, "a bool");
  if (v.type != GGUFType::Bool) fail("{}: metadata key '{}' is {}, wanted a bool", path(), key, describe(v));
  return v.u != 0;
}

std::string_view GGUFFile::get_string(std::string_view key, std::string_view fallback) const {
  return has(key) ? get_string(key) : fallback;
}
uint64_t GGUFFile::get_uint(std::string_view key, uint64_t fallback) const {
  return has(key) ? get_uint(key) : fallback;
}
int64_t GGUFFile::get_int(std::string_view key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }
double GGUFFile::get_float(std::string_view key, double fallback) const {
  return has(key) ? get_float(key) : fallback;
}
bool GGUFFile::get_bool(std::string_view key, bool fallback) const { return has(key) ? get_bool(key) : fallback; }

std::span<const std::string_view> GGUFFile::get_string_array(std::string_view key) const {
  const GGUFValue& v = expect(key, "an array of strings");
  if (v.type != GGUFType::Array || v.elem_type != GGUFType::String)
    fail("{}: metadata key '{}' is {}, wanted an array of strings", path(), key, describe(v));
  return v.strings;
}

namespace {

// Calls fn(index, element) for each element of a numeric array value.
template <class Fn>
void for_each_element(const GGUFValue& v, Fn&& fn) {
  const size_t w = scalar_size(v.elem_type);
  GGUFValue e;
  for (size_t j = 0; j < size_t(v.count); ++j) {
    decode_scalar(v.elem_type, v.raw.data() + j * w, e);
    fn(j, e);
  }
}

}  // namespace

std::vector<int64_t> GGUFFile::get_int_array(std::string_view key) const {
  const GGUFValue& v = expect(key, "an array of integers");
  if (v.type != GGUFType::Array || !(is_unsigned(v.elem_type) || is_signed(v.elem_type)))
    fail("{}: metadata key '{}' is {}, wanted an array of integers", path(), key, describe(v));
  std::vector<int64_t> out(size_t(v.count));
  for_each_element(v, [&](size_t j, const GGUFValue& e) {
    if (is_unsigned(e.type) && e.u > uint64_t(std::numeric_limits<int64_t>::max()))
      fail("{}: metadata key '{}' element {} = {} does not fit a signed 64-bit integer", path(), key, j, e.u);
    out[j] = is_signed(e.type) ? e.i : int64_t(e.u);
  });
  return out;
}

std::vector<double> GGUFFile::get_float_array(std::string_view key) const {
  const GGUFValue& v = expect(key, "an array of numbers");
  if (v.type != GGUFType::Array || !(is_float(v.elem_type) || is_unsigned(v.elem_type) || is_signed(v.elem_type)))
    fail("{}: metadata key '{}' is {}, wanted an array of numbers", path(), key, describe(v));
  std::vector<double> out(size_t(v.count));
  for_each_element(v, [&](size_t j, const GGUFValue& e) {
    out[j] = is_float(e.type) ? e.f : is_signed(e.type) ? double(e.i) : double(e.u);
  });
  return out;
}

uint64_t GGUFFile::get_array_size(std::string_view key) const {
  const GGUFValue& v = expect(key, "an array");
  if (v.type != GGUFType::Array) fail("{}: metadata key '{}' is {}, wanted an array", path(), key, describe(v));
  return v.count;
}

const GGUFTensor* GGUFFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GGUFTensor& GGUFFile::tensor(std::string_view name) const {
  const GGUFTensor* t = find_tensor(name);
  if (!t) fail("{}: no tensor named '{}' ({} tensors in the file)", path(), name, tensors_.size());
  return *t;
}

// ---------------------------------------------------------------------------------------
// Writer

namespace {

template <class T>
void put(std::vector<std::byte>& out, T v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

void put_string(std::vector<std::byte>& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

template <class T>
std::vector<std::byte> scalar_value(GGUFType t, T v) {
  std::vector<std::byte> out;
  put<uint32_t>(out, uint32_t(t));
  put<T>(out, v);
  return out;
}

template <class T>
std::vector<std::byte> array_value(GGUFType elem, std::span<const T> v) {
  std::vector<std::byte> out;
  put<uint32_t>(out, uint32_t(GGUFType::Array));
  put<uint32_t>(out, uint32_t(elem));
  put<uint64_t>(out, v.size());
  for (const T& x : v) put<T>(out, x);
  return out;
}

}  // namespace

GGUFWriter::GGUFWriter(uint32_t alignment) : alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    fail("GGUFWriter: alignment {} is not a power of two", alignment);
  if (alignment != kDefaultAlignment) set_u32("general.alignment", alignment);
}

void GGUFWriter::set(std::string key, std::vector<std::byte> value) {
  for (Entry& e : entries_)
    if (e.key == key) {
      e.value = std::move(value);
      return;
    }
  entries_.push_back({std::move(key), std::move(value)});
}

void GGUFWriter::set_u8(std::string key, uint8_t v) { set(std::move(key), scalar_value(GGUFType::U8, v)); }
void GGUFWriter::set_u32(std::string key, uint32_t v) { set(std::move(key), scalar_value(GGUFType::U32, v)); }
void GGUFWriter::set_i32(std::string key, int32_t v) { set(std::move(key), scalar_value(GGUFType::I32, v)); }
void GGUFWriter::set_u64(std::string key, uint64_t v) { set(std::move(key), scalar_value(GGUFType::U64, v)); }
void GGUFWriter::set_i64(std::string key, int64_t v) { set(std::move(key), scalar_value(GGUFType::I64, v)); }
void GGUFWriter::set_f32(std::string key, float v) { set(std::move(key), scalar_value(GGUFType::F32, v)); }
void GGUFWriter::set_f64(std::string key, double v) { set(std::move(key), scalar_value(GGUFType::F64, v)); }
void GGUFWriter::set_bool(std::string key, bool v) {
  set(std::move(key), scalar_value(GGUFType::Bool, uint8_t(v ? 1 : 0)));
}

void GGUFWriter::set_string(std::string key, std::string_view v) {
  std::vector<std::byte> out;
  put<uint32_t>(out, uint32_t(GGUFType::String));
  put_string(out, v);
  set(std::move(key), std::move(out));
}

void GGUFWriter::set_string_array(std::string key, std::span<const std::string> v) {
  std::vector<std::byte> out;
  put<uint32_t>(out, uint32_t(GGUFType::Array));
  put<uint32_t>(out, uint32_t(GGUFType::String));
  put<uint64_t>(out, v.size());
  for (const std::string& s : v) put_string(out, s);
  set(std::move(key), std::move(out));
}

void GGUFWriter::set_i32_array(std::string key, std::span<const int32_t> v) {
  set(std::move(key), array_value(GGUFType::I32, v));
}

void GGUFWriter::set_f32_array(std::string key, std::span<const float> v) {
  set(std::move(key), array_value(GGUFType::F32, v));
}

void GGUFWriter::add_tensor(std::string name, GGMLType type, std::vector<uint64_t> dims,
                            std::span<const std::byte> data) {
  if (name.empty() || name.size() > kMaxTensorName)
    fail("GGUFWriter: tensor name '{}' must have 1 to {} bytes", name, kMaxTensorName);
  if (dims.size() > kMaxDims) fail("GGUFWriter: tensor '{}' has {} dimensions (at most {})", name, dims.size(), kMaxDims);
  for (const TensorEntry& t : tensors_)
    if (t.name == name) fail("GGUFWriter: tensor '{}' added twice", name);
  uint64_t numel = 1;
  for (uint64_t d : dims) numel *= d;
  const auto traits = ggml_type_traits(type);
  if (!traits) fail("GGUFWriter: tensor '{}' has unknown ggml type {}", name, uint32_t(type));
  if (!dims.empty() && dims[0] % traits->block_size != 0)
    fail("GGUFWriter: tensor '{}' dimension 0 = {} is not a whole number of {} blocks of {}", name, dims[0],
         traits->name, traits->block_size);
  const uint64_t want = ggml_nbytes(type, numel);
  if (data.size() != want)
    fail("GGUFWriter: tensor '{}' ({} {}) needs {} bytes, got {}", name, ggml_type_name(type), fmt::join(dims, "x"),
         want, data.size());
  tensors_.push_back({std::move(name), type, std::move(dims), {data.begin(), data.end()}});
}

std::vector<std::byte> GGUFWriter::bytes() const {
  std::vector<std::byte> out;
  put<uint32_t>(out, 0x46554747u);  // "GGUF"
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, entries_.size());
  for (const Entry& e : entries_) {
    put_string(out, e.key);
    out.insert(out.end(), e.value.begin(), e.value.end());
  }
  auto padded = [&](uint64_t n) { return (n + alignment_ - 1) / alignment_ * alignment_; };
  uint64_t offset = 0;
  for (const TensorEntry& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, uint32_t(t.dims.size()));
    for (uint64_t d : t.dims) put<uint64_t>(out, d);
    put<uint32_t>(out, uint32_t(t.type));
    put<uint64_t>(out, offset);
    offset += padded(t.data.size());
  }
  out.resize(padded(out.size()));
  for (const TensorEntry& t : tensors_) {
    out.insert(out.end(), t.data.begin(), t.data.end());
    out.resize(padded(out.size()));
  }
  return out;
}

void GGUFWriter::write(const std::string& path) const {
  const std::vector<std::byte> data = bytes();
  const std::span<const std::byte> pieces[] = {data};
  write_file_atomic(path, pieces);
}

}  // namespace multipole
