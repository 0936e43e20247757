#include "multipole/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>

#include <nlohmann/json.hpp>

#include "multipole/core/error.hpp"
#include "multipole/io/json_limits.hpp"

namespace multipole {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; so must the host be");

namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeInfo {
  SafetensorsDType type;
  std::string_view name;
  size_t size;
};
constexpr std::array<DTypeInfo, 15> kDTypes = {{
    {SafetensorsDType::BOOL, "BOOL", 1},   {SafetensorsDType::U8, "U8", 1},
    {SafetensorsDType::I8, "I8", 1},       {SafetensorsDType::F8_E5M2, "F8_E5M2", 1},
    {SafetensorsDType::F8_E4M3, "F8_E4M3", 1}, {SafetensorsDType::I16, "I16", 2},
    {SafetensorsDType::U16, "U16", 2},     {SafetensorsDType::F16, "F16", 2},
    {SafetensorsDType::BF16, "BF16", 2},   {SafetensorsDType::I32, "I32", 4},
    {SafetensorsDType::U32, "U32", 4},     {SafetensorsDType::F32, "F32", 4},
    {SafetensorsDType::I64, "I64", 8},     {SafetensorsDType::U64, "U64", 8},
    {SafetensorsDType::F64, "F64", 8},
}};

const DTypeInfo& info(SafetensorsDType t) { return kDTypes[size_t(t)]; }

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A JSON value's type for messages ("a string", "a number", ...).
std::string_view json_kind(const json& v) {
  if (v.is_string()) return "a string";
  if (v.is_number()) return "a number";
  if (v.is_boolean()) return "a boolean";
  if (v.is_null()) return "null";
  if (v.is_array()) return "an array";
  return "an object";
}

// A non-negative JSON integer; `what` names it in messages.
uint64_t json_uint(const json& v, const std::string& where, std::string_view what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) fail("{}: {} is {}, must be >= 0", where, what, v.get<int64_t>());
  fail("{}: {} is {} ({}), expected a non-negative integer", where, what, json_kind(v), v.dump());
}

json parse_json(std::string_view text, const std::string& where) {
  check_json_depth(text, where);
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", where, e.what());
  }
}

SafetensorsTensor parse_tensor(const std::string& path, const std::string& name, const json& v, uint64_t data_size) {
  const std::string where = fmt::format("{}: tensor '{}'", path, name);
  MP_CHECK(v.is_object(), "{}: header entry is {}, expected an object with dtype, shape, data_offsets", where,
           json_kind(v));
  for (const auto& [key, _] : v.items())
    MP_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "{}: unknown field '{}' (expected dtype, shape, data_offsets)", where, key);
  SafetensorsTensor t;
  t.file = path;
  t.name = name;

  auto dt = v.find("dtype");
  MP_CHECK(dt != v.end(), "{}: missing field 'dtype'", where);
  MP_CHECK(dt->is_string(), "{}: dtype is {}, expected a string", where, json_kind(*dt));
  auto parsed = parse_safetensors_dtype(dt->get_ref<const std::string&>());
  MP_CHECK(parsed.has_value(), "{}: unknown dtype '{}' (known: BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, "
           "I32, U32, F32, I64, U64, F64)", where, dt->get_ref<const std::string&>());
  t.dtype = *parsed;

  auto sh = v.find("shape");
  MP_CHECK(sh != v.end(), "{}: missing field 'shape'", where);
  MP_CHECK(sh->is_array(), "{}: shape is {}, expected an array of integers", where, json_kind(*sh));
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t i = 0; i < sh->size(); ++i) {
    uint64_t s = json_uint((*sh)[i], where, fmt::format("shape[{}]", i));
    MP_CHECK(s <= uint64_t(std::numeric_limits<int64_t>::max()), "{}: shape[{}] = {} exceeds the limit {}", where, i,
             s, std::numeric_limits<int64_t>::max());
    t.shape.push_back(int64_t(s));
    overflow |= __builtin_mul_overflow(numel, s, &numel);
  }
  const uint64_t esize = safetensors_dtype_size(t.dtype);
  uint64_t bytes = 0;
  overflow |= __builtin_mul_overflow(numel, esize, &bytes);
  MP_CHECK(!overflow, "{}: shape {} x {} bytes overflows 64 bits", where, shape_text(t.shape), esize);

  auto off = v.find("data_offsets");
  MP_CHECK(off != v.end(), "{}: missing field 'data_offsets'", where);
  MP_CHECK(off->is_array() && off->size() == 2, "{}: data_offsets is {}, expected [begin, end]", where, off->dump());
  t.begin = json_uint((*off)[0], where, "data_offsets[0]");
  t.end = json_uint((*off)[1], where, "data_offsets[1]");
  MP_CHECK(t.begin <= t.end, "{}: data_offsets [{}, {}] has begin > end", where, t.begin, t.end);
  MP_CHECK(t.end <= data_size, "{}: data_offsets [{}, {}] end exceeds the data section's {} bytes (file truncated?)",
           where, t.begin, t.end, data_size);
  MP_CHECK(t.end - t.begin == bytes, "{}: data_offsets [{}, {}] hold {} bytes, but shape {} of {} needs {}", where,
           t.begin, t.end, t.end - t.begin, shape_text(t.shape), info(t.dtype).name, bytes);
  return t;
}

}  // namespace

size_t safetensors_dtype_size(SafetensorsDType t) { return info(t).size; }
std::string_view safetensors_dtype_name(SafetensorsDType t) { return info(t).name; }

std::optional<SafetensorsDType> parse_safetensors_dtype(std::string_view name) {
  for (const auto& d : kDTypes)
    if (d.name == name) return d.type;
  return std::nullopt;
}

std::optional<DType> to_core_dtype(SafetensorsDType t) {
  switch (t) {
    case SafetensorsDType::F32: return DType::F32;
    case SafetensorsDType::F16: return DType::F16;
    case SafetensorsDType::BF16: return DType::BF16;
    default: return std::nullopt;
  }
}

SafetensorsDType to_safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32: return SafetensorsDType::F32;
    case DType::F16: return SafetensorsDType::F16;
    case DType::BF16: return SafetensorsDType::BF16;
  }
  fail("dtype {} has no safetensors equivalent", int(t));
}

// ---- SafetensorsTensor

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;  // cannot overflow: checked against the file size
  return n;
}

std::string SafetensorsTensor::shape_string() const { return shape_text(shape); }

TensorView SafetensorsTensor::view() const {
  auto core = to_core_dtype(dtype);
  MP_CHECK(core.has_value(), "{}: tensor '{}' has dtype {}; a view needs F32, F16 or BF16", file, name,
           info(dtype).name);
  MP_CHECK(rank() <= TensorView::kMaxRank, "{}: tensor '{}' has rank {}, above the view limit {}", file, name, rank(),
           TensorView::kMaxRank);
  MP_CHECK(reinterpret_cast<uintptr_t>(bytes.data()) % dtype_size(*core) == 0,
           "{}: tensor '{}' data is not aligned to its {}-byte elements; read it with to_f32()", file, name,
           dtype_size(*core));
  TensorView v;
  v.data = const_cast<std::byte*>(bytes.data());  // read-only mapping: documented as such
  v.dtype = *core;
  v.rank = rank();
  int64_t stride = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.stride[d] = stride;
    stride *= shape[d];
  }
  return v;
}

void SafetensorsTensor::to_f32(float* out) const {
  auto core = to_core_dtype(dtype);
  MP_CHECK(core.has_value(), "{}: tensor '{}' has dtype {}; only F32, F16 and BF16 convert to f32", file, name,
           info(dtype).name);
  const size_t n = size_t(numel()), es = dtype_size(*core);
  if (n == 0) return;  // `out` may be null then
  if (reinterpret_cast<uintptr_t>(bytes.data()) % es == 0) {
    convert_to_f32(bytes.data(), *core, out, n);
    return;
  }
  // Unaligned data (a writer that did not pad): bounce through an aligned buffer.
  alignas(64) std::byte tmp[4096];
  const size_t chunk = sizeof(tmp) / es;
  for (size_t i = 0; i < n; i += chunk) {
    size_t m = std::min(chunk, n - i);
    std::memcpy(tmp, bytes.data() + i * es, m * es);
    convert_to_f32(tmp, *core, out + i, m);
  }
}

std::vector<float> SafetensorsTensor::to_f32() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  to_f32(out.data());
  return out;
}

// ---- SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const size_t size = file_.size();
  MP_CHECK(size >= 8, "{}: {} bytes, too short for a safetensors file (8-byte header length first)", path, size);
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_.data(), 8);
  MP_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the limit {} (not a safetensors file?)", path,
           header_len, kMaxHeaderBytes);
  MP_CHECK(header_len <= size - 8, "{}: header length {} runs past the end of the file ({} bytes after the length)",
           path, header_len, size - 8);
  MP_CHECK(header_len >= 2, "{}: header length {} is too short for a JSON object", path, header_len);
  std::string_view text(reinterpret_cast<const char*>(file_.data()) + 8, header_len);
  MP_CHECK(text[0] == '{', "{}: header does not start with '{{' (not a safetensors file?)", path);
  json header = parse_json(text, path + ": safetensors header");
  MP_CHECK(header.is_object(), "{}: header is {}, expected a JSON object", path, json_kind(header));

  data_offset_ = 8 + header_len;
  const uint64_t data_size = size - data_offset_;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      MP_CHECK(value.is_object(), "{}: __metadata__ is {}, expected an object of strings", path, json_kind(value));
      for (const auto& [mk, mv] : value.items()) {
        MP_CHECK(mv.is_string(), "{}: __metadata__ '{}' is {} ({}); metadata values must be strings", path, mk,
                 json_kind(mv), mv.dump());
        metadata_.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    tensors_.push_back(parse_tensor(path, key, value, data_size));
  }

  // The format requires the tensors to cover the data section exactly: no overlaps, no holes.
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::tie(tensors_[a].begin, tensors_[a].end) < std::tie(tensors_[b].begin, tensors_[b].end);
  });
  uint64_t pos = 0;
  const SafetensorsTensor* prev = nullptr;
  for (size_t i : order) {
    const auto& t = tensors_[i];
    if (t.begin == t.end) continue;  // empty tensors occupy no bytes
    MP_CHECK(t.begin >= pos, "{}: tensor '{}' data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", path, t.name,
             t.begin, t.end, prev->name, prev->begin, prev->end);
    MP_CHECK(t.begin == pos, "{}: data section bytes [{}, {}) before tensor '{}' belong to no tensor (holes are not "
             "allowed)", path, pos, t.begin, t.name);
    pos = t.end;
    prev = &t;
  }
  MP_CHECK(pos == data_size, "{}: data section bytes [{}, {}) after the last tensor belong to no tensor", path, pos,
           data_size);

  for (auto& t : tensors_) t.bytes = {file_.data() + data_offset_ + t.begin, size_t(t.end - t.begin)};
  std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const SafetensorsTensor& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const SafetensorsTensor& SafetensorsFile::tensor(std::string_view name) const {
  const auto* t = find(name);
  if (!t) fail("{}: no tensor named '{}' ({} tensors in the file)", path(), name, tensors_.size());
  return *t;
}

std::optional<std::string_view> SafetensorsFile::metadata(std::string_view key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return std::nullopt;
  return it->second;
}

// ---- SafetensorsCheckpoint

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : path_(path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "model.safetensors.index.json", ec)) {
      p /= "model.safetensors.index.json";
    } else if (fs::exists(p / "model.safetensors", ec)) {
      p /= "model.safetensors";
    } else {
      fail("{}: folder holds neither model.safetensors.index.json nor model.safetensors", path);
    }
  }
  path_ = p.string();
  if (p.extension() != ".json") {
    files_.emplace_back(path_);
    for (const auto& t : files_[0].tensors()) by_name_.emplace(t.name, &t);
    metadata_ = files_[0].metadata();
    return;
  }

  MappedFile index_file(path_);
  MP_CHECK(index_file.size() <= kMaxHeaderBytes, "{}: index of {} bytes exceeds the limit {}", path_,
           index_file.size(), kMaxHeaderBytes);
  std::string_view text(reinterpret_cast<const char*>(index_file.data()), index_file.size());
  json index = parse_json(text, path_);
  MP_CHECK(index.is_object(), "{}: index is {}, expected a JSON object", path_, json_kind(index));
  if (auto m = index.find("metadata"); m != index.end() && !m->is_null()) {
    MP_CHECK(m->is_object(), "{}: 'metadata' is {}, expected an object", path_, json_kind(*m));
    for (const auto& [k, v] : m->items()) metadata_.emplace(k, v.is_string() ? v.get<std::string>() : v.dump());
  }
  auto wm = index.find("weight_map");
  MP_CHECK(wm != index.end(), "{}: missing 'weight_map'", path_);
  MP_CHECK(wm->is_object() && !wm->empty(), "{}: 'weight_map' is {}, expected a non-empty object of tensor -> file",
           path_, wm->is_object() ? "empty" : json_kind(*wm));

  // Shards are opened once each, in name order; a shard file must stay inside the folder.
  std::map<std::string, size_t> shard_index;
  for (const auto& [name, file] : wm->items()) {
    MP_CHECK(file.is_string(), "{}: weight_map['{}'] is {}, expected a file name", path_, name, json_kind(file));
    const auto& f = file.get_ref<const std::string&>();
    fs::path rel(f);
    bool escapes = f.empty() || rel.is_absolute();
    for (const auto& part : rel) escapes |= part == "..";
    MP_CHECK(!escapes, "{}: weight_map['{}'] = '{}' is not a file name inside the checkpoint folder", path_, name, f);
    shard_index.emplace(f, 0);
  }
  files_.reserve(shard_index.size());
  for (auto& [f, i] : shard_index) {
    i = files_.size();
    files_.emplace_back((p.parent_path() / f).string());
  }
  for (const auto& [name, file] : wm->items()) {
    const auto& shard = files_[shard_index.at(file.get<std::string>())];
    const auto* t = shard.find(name);
    MP_CHECK(t != nullptr, "{}: weight_map puts tensor '{}' in {}, which has no such tensor", path_, name,
             shard.path());
    by_name_.emplace(name, t);
  }
}

std::vector<std::string_view> SafetensorsCheckpoint::names() const {
  std::vector<std::string_view> out;
  out.reserve(by_name_.size());
  for (const auto& [name, _] : by_name_) out.push_back(name);
  return out;
}

const SafetensorsTensor* SafetensorsCheckpoint::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const SafetensorsTensor& SafetensorsCheckpoint::tensor(std::string_view name) const {
  const auto* t = find(name);
  if (!t) fail("{}: no tensor named '{}' ({} tensors in the checkpoint)", path_, name, by_name_.size());
  return *t;
}

// ---- SafetensorsWriter

SafetensorsWriter::Entry& SafetensorsWriter::new_entry(std::string name, SafetensorsDType dtype,
                                                       std::vector<int64_t> shape) {
  MP_CHECK(!name.empty() && name != "__metadata__", "safetensors writer: invalid tensor name '{}'", name);
  for (const auto& e : entries_) MP_CHECK(e.name != name, "safetensors writer: tensor '{}' added twice", name);
  uint64_t numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    MP_CHECK(shape[i] >= 0, "safetensors writer: tensor '{}' shape[{}] = {} must be >= 0", name, i, shape[i]);
    MP_CHECK(!__builtin_mul_overflow(numel, uint64_t(shape[i]), &numel), "safetensors writer: tensor '{}' shape {} "
             "overflows", name, shape_text(shape));
  }
  uint64_t bytes = 0;
  MP_CHECK(!__builtin_mul_overflow(numel, safetensors_dtype_size(dtype), &bytes),
           "safetensors writer: tensor '{}' shape {} overflows", name, shape_text(shape));
  std::vector<std::byte> data(bytes);
  return entries_.emplace_back(Entry{std::move(name), dtype, std::move(shape), std::move(data)});
}

void SafetensorsWriter::add(std::string name, std::vector<int64_t> shape, const float* data, DType dtype) {
  auto& e = new_entry(std::move(name), to_safetensors_dtype(dtype), std::move(shape));
  if (!e.data.empty()) convert_from_f32(data, dtype, e.data.data(), e.data.size() / dtype_size(dtype));
}

void SafetensorsWriter::add_raw(std::string name, SafetensorsDType dtype, std::vector<int64_t> shape,
                                std::span<const std::byte> data) {
  auto& e = new_entry(std::move(name), dtype, std::move(shape));
  if (data.size() != e.data.size()) {
    std::string n = e.name;
    size_t need = e.data.size();
    entries_.pop_back();
    fail("safetensors writer: tensor '{}' got {} bytes, its shape and dtype need {}", n, data.size(), need);
  }
  if (!data.empty()) std::memcpy(e.data.data(), data.data(), data.size());
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_.insert_or_assign(std::move(key), std::move(value));
}

void SafetensorsWriter::write(const std::string& path) const {
  // Larger elements first, and within a dtype the tensors that keep 8-byte alignment first.
  std::vector<size_t> order(entries_.size());
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](size_t i) {
    const auto& e = entries_[i];
    return std::make_tuple(-int(safetensors_dtype_size(e.dtype)), e.data.size() % 8 != 0, std::string_view(e.name));
  };
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return key(a) < key(b); });

  json header = json::object();
  uint64_t offset = 0;
  for (size_t i : order) {
    const auto& e = entries_[i];
    header[e.name] = {{"dtype", safetensors_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.data.size()}}};
    offset += e.data.size();
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    fail("{}: cannot encode the safetensors header: {}", path, e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  const uint64_t len = text.size();
  std::array<std::byte, 8> len_bytes;
  std::memcpy(len_bytes.data(), &len, 8);

  std::vector<std::span<const std::byte>> pieces;
  pieces.push_back(len_bytes);
  pieces.push_back(std::as_bytes(std::span(text)));
  for (size_t i : order) pieces.push_back(entries_[i].data);
  write_file_atomic(path, pieces);
}

void write_file_atomic(const std::string& path, std::span<const std::span<const std::byte>> pieces) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("{}: cannot create: {}", tmp, std::strerror(errno));
  auto give_up = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    fail("{}: cannot {}: {}", tmp, what, std::strerror(err));
  };
  for (auto piece : pieces) {
    const std::byte* p = piece.data();
    size_t left = piece.size();
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) give_up("write");
      p += n;
      left -= size_t(n);
    }
  }
  if (::fsync(fd) != 0) give_up("sync");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: cannot close: {}", tmp, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: cannot rename {} to it: {}", path, tmp, std::strerror(err));
  }
}

}  // namespace multipole
