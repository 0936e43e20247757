#include "multipole/cuda/cluster_index.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "cuda/launch.hpp"
#include "multipole/attention/cluster_index.hpp"
#include "multipole/core/error.hpp"

namespace multipole::cuda {

namespace {

// Slots and member-list room of one entry: the used sizes, or the capacity when given.
struct Room {
  int coarse = 0, fine = 0;
  int64_t children = 0, tokens = 0;
};
Room room(std::span<const DeviceEntryShape> capacity, size_t e, int fine, int coarse, int64_t tokens) {
  Room r{coarse, fine, coarse > 0 ? fine : 0, tokens};
  if (e < capacity.size() && (capacity[e].fine_capacity > 0 || capacity[e].coarse_capacity > 0)) {
    const auto& k = capacity[e];
    r.coarse = std::max(coarse, k.coarse_capacity);
    r.fine = std::max(fine, k.fine_capacity);
    r.children = r.coarse > 0 ? r.fine : 0;
    r.tokens = std::max(tokens, k.token_capacity);
  }
  return r;
}

}  // namespace

HostClusterLevel host_cluster_level(const ClusterIndex& index) {
  HostClusterLevel h;
  h.clustered_end = index.end();
  if (index.num_levels() == 0) return h;
  const ClusterLevel& l0 = index.level(0);
  h.key_centroids = l0.keys;
  h.value_centroids = l0.values;
  h.sizes = l0.sizes;
  h.member_offsets = l0.offsets.empty() ? std::vector<int32_t>{0} : l0.offsets;
  h.members = l0.members;
  MP_CHECK(index.num_levels() <= 2, "cluster index: {} levels; the device decode takes at most 2", index.num_levels());
  if (index.num_levels() == 2) {
    const ClusterLevel& l1 = index.level(1);
    h.coarse_key_centroids = l1.keys;
    h.coarse_value_centroids = l1.values;
    h.coarse_sizes = l1.sizes;
    h.coarse_child_offsets = l1.offsets.empty() ? std::vector<int32_t>{0} : l1.offsets;
    h.coarse_children = l1.members;
  }
  return h;
}

std::vector<int64_t> position_sums(const HostClusterLevel& x) {
  const size_t C = x.sizes.size(), Cc = x.coarse_sizes.size();
  std::vector<int64_t> sums(Cc + C, 0);
  for (size_t i = 0; i < C; ++i)
    for (int32_t k = x.member_offsets[i]; k < x.member_offsets[i + 1]; ++k) sums[Cc + i] += x.members[size_t(k)];
  for (size_t i = 0; i < Cc; ++i)
    for (int32_t k = x.coarse_child_offsets[i]; k < x.coarse_child_offsets[i + 1]; ++k)
      sums[i] += sums[Cc + size_t(x.coarse_children[size_t(k)])];
  return sums;
}

DeviceClusterIndex::DeviceClusterIndex(int head_dim, int num_kv_heads, DType key_dtype, DType value_dtype,
                                       std::span<const HostClusterLevel> entries,
                                       std::span<const DeviceEntryShape> capacity)
    : head_dim_(head_dim), num_kv_heads_(num_kv_heads), key_dtype_(key_dtype), value_dtype_(value_dtype) {
  MP_CHECK(head_dim > 0 && head_dim % 8 == 0, "cluster index: head_dim {} must be a positive multiple of 8", head_dim);
  MP_CHECK(num_kv_heads > 0, "cluster index: num_kv_heads {} must be > 0", num_kv_heads);
  MP_CHECK(value_dtype == DType::BF16 || value_dtype == DType::F16, "cluster index: value dtype {} must be bf16 or f16",
           dtype_name(value_dtype));
  MP_CHECK(key_dtype == DType::F32 || key_dtype == value_dtype,
           "cluster index: key centroid dtype {} must be f32 or the value dtype {}", dtype_name(key_dtype),
           dtype_name(value_dtype));
  MP_CHECK(!entries.empty() && entries.size() % size_t(num_kv_heads) == 0,
           "cluster index: {} entries is not a positive multiple of {} KV heads", entries.size(), num_kv_heads);
  MP_CHECK(capacity.empty() || capacity.size() == entries.size(), "cluster index: {} capacities for {} entries",
           capacity.size(), entries.size());
  const size_t d = size_t(head_dim);
  int64_t clusters = 0, members = 0;
  const bool on_device = std::all_of(entries.begin(), entries.end(), [](const HostClusterLevel& x) {
    return x.key_centroids.empty() && x.value_centroids.empty() && x.coarse_key_centroids.empty() &&
           x.coarse_value_centroids.empty();
  });
  for (size_t e = 0; e < entries.size(); ++e) {
    const auto& x = entries[e];
    const size_t C = x.sizes.size();
    MP_CHECK(on_device || (x.key_centroids.size() == C * d && x.value_centroids.size() == C * d),
             "cluster index: entry {} has {} sizes but {} key and {} value centroid floats (expected {} x {})", e, C,
             x.key_centroids.size(), x.value_centroids.size(), C, d);
    MP_CHECK(x.member_offsets.size() == C + 1 && x.member_offsets[0] == 0,
             "cluster index: entry {} member_offsets has {} entries starting at {}, expected {} starting at 0", e,
             x.member_offsets.size(), x.member_offsets.empty() ? -1 : x.member_offsets[0], C + 1);
    MP_CHECK(x.clustered_end >= 0 && x.clustered_end <= std::numeric_limits<int32_t>::max(),
             "cluster index: entry {} clustered_end {} out of range", e, x.clustered_end);
    for (size_t i = 0; i < C; ++i)
      MP_CHECK(x.sizes[i] >= 0 && x.member_offsets[i + 1] - x.member_offsets[i] == x.sizes[i],
               "cluster index: entry {} cluster {} has size {} but {} members", e, i, x.sizes[i],
               x.member_offsets[i + 1] - x.member_offsets[i]);
    MP_CHECK(int64_t(x.members.size()) == x.member_offsets[C],
             "cluster index: entry {} has {} members, offsets say {}", e, x.members.size(), x.member_offsets[C]);
    // Centroids must be finite: a kernel may read an unselected or empty cluster's and weigh it by 0.
    for (const auto& [name, v] : {std::pair{"key_centroids", &x.key_centroids}, std::pair{"value_centroids", &x.value_centroids},
                                  std::pair{"coarse_key_centroids", &x.coarse_key_centroids},
                                  std::pair{"coarse_value_centroids", &x.coarse_value_centroids}}) {
      const auto bad = std::find_if(v->begin(), v->end(), [](float f) { return !std::isfinite(f); });
      MP_CHECK(bad == v->end(), "cluster index: entry {} {}[{}] (cluster {}, dim {}) is {}: not finite", e, name,
               bad - v->begin(), (bad - v->begin()) / int64_t(d), (bad - v->begin()) % int64_t(d), *bad);
    }
    for (size_t k = 0; k < x.members.size(); ++k)
      MP_CHECK(x.members[k] >= 0 && x.members[k] < x.clustered_end,
               "cluster index: entry {} member {} is position {}, outside [0, clustered_end={})", e, k, x.members[k],
               x.clustered_end);
    const size_t Cc = x.coarse_sizes.size();
    MP_CHECK(on_device || (x.coarse_key_centroids.size() == Cc * d && x.coarse_value_centroids.size() == Cc * d),
             "cluster index: entry {} has {} coarse sizes but {} key and {} value centroid floats (expected {} x {})", e,
             Cc, x.coarse_key_centroids.size(), x.coarse_value_centroids.size(), Cc, d);
    if (Cc > 0) {
      MP_CHECK(x.coarse_child_offsets.size() == Cc + 1 && x.coarse_child_offsets[0] == 0 &&
                   x.coarse_child_offsets[Cc] == int32_t(x.coarse_children.size()) && x.coarse_children.size() == C,
               "cluster index: entry {} coarse child offsets ({} entries) must run from 0 to the {} children, one "
               "per fine cluster ({})",
               e, x.coarse_child_offsets.size(), x.coarse_children.size(), C);
      std::vector<uint8_t> seen(C, 0);
      for (size_t i = 0; i < Cc; ++i) {
        MP_CHECK(x.coarse_child_offsets[i + 1] >= x.coarse_child_offsets[i],
                 "cluster index: entry {} coarse cluster {} has negative child count", e, i);
        int64_t under = 0;
        for (int32_t k = x.coarse_child_offsets[i]; k < x.coarse_child_offsets[i + 1]; ++k) {
          const int32_t c = x.coarse_children[size_t(k)];
          MP_CHECK(c >= 0 && size_t(c) < C && !seen[size_t(c)],
                   "cluster index: entry {} coarse cluster {} child {} is not a fresh fine cluster id in [0, {})", e, i,
                   c, C);
          seen[size_t(c)] = 1;
          under += x.sizes[size_t(c)];
        }
        MP_CHECK(under == x.coarse_sizes[i], "cluster index: entry {} coarse cluster {} has size {} but its children hold {}",
                 e, i, x.coarse_sizes[i], under);
      }
    } else {
      MP_CHECK(x.coarse_child_offsets.size() <= 1 && x.coarse_children.empty(),
               "cluster index: entry {} has coarse children but no coarse clusters", e);
    }
    if (!capacity.empty()) {
      const auto& k = capacity[e];
      MP_CHECK(k.fine_capacity >= int64_t(C) && k.token_capacity >= int64_t(x.members.size()) &&
                   (k.coarse_capacity == 0 ? Cc == 0 : k.coarse_capacity > int64_t(Cc)),
               "cluster index: entry {} capacity (fine {}, coarse {}, tokens {}) below its {} fine, {} coarse (+1 "
               "placeholder), {} tokens",
               e, k.fine_capacity, k.coarse_capacity, k.token_capacity, C, Cc, x.members.size());
    }
    const Room r = room(capacity, e, int(C), int(Cc), int64_t(x.members.size()));
    clusters += r.fine + r.coarse;
    members += r.children + r.tokens;
    max_clusters_ = std::max(max_clusters_, int(C) + r.coarse);
    max_coarse_ = std::max(max_coarse_, r.coarse);
  }
  MP_CHECK(clusters < std::numeric_limits<int32_t>::max() && members < std::numeric_limits<int32_t>::max(),
           "cluster index: {} clusters / {} members exceed the 2^31 limit", clusters, members);
  total_clusters_ = clusters;

  const size_t ksize = dtype_size(key_dtype), vsize = dtype_size(value_dtype);
  std::vector<std::byte> keys, values;
  if (!on_device) {
    keys.resize(size_t(clusters) * d * ksize);
    values.resize(size_t(clusters) * d * vsize);
  }
  std::vector<int32_t> sizes, begin, mem;
  std::vector<int64_t> psums;
  sizes.reserve(size_t(clusters));
  psums.reserve(size_t(clusters));
  begin.reserve(size_t(clusters));
  mem.reserve(size_t(members));
  int64_t c0 = 0;
  for (size_t e = 0; e < entries.size(); ++e) {
    const auto& x = entries[e];
    const size_t Cc = x.coarse_sizes.size(), C = x.sizes.size();
    const Room r = room(capacity, e, int(C), int(Cc), int64_t(x.members.size()));
    entry_begin_.push_back(int32_t(c0));
    member_base_.push_back(int64_t(mem.size()));
    entry_count_.push_back(int32_t(r.coarse + C));
    entry_end_.push_back(int32_t(x.clustered_end));
    entry_coarse_.push_back(r.coarse);
    entry_cap_.push_back(r.coarse + r.fine);
    if (Cc && !on_device) {
      convert_from_f32(x.coarse_key_centroids.data(), key_dtype, keys.data() + size_t(c0) * d * ksize, Cc * d);
      convert_from_f32(x.coarse_value_centroids.data(), value_dtype, values.data() + size_t(c0) * d * vsize, Cc * d);
    }
    // Position sums, 0 for the coarse placeholders and the spare fine slots.
    const std::vector<int64_t> sums = position_sums(x);
    psums.insert(psums.end(), sums.begin(), sums.begin() + int64_t(Cc));
    psums.resize(psums.size() + size_t(r.coarse) - Cc, 0);
    psums.insert(psums.end(), sums.begin() + int64_t(Cc), sums.end());
    psums.resize(psums.size() + size_t(r.fine) - C, 0);
    const int32_t m0 = int32_t(mem.size());
    for (size_t i = 0; i < size_t(r.coarse); ++i) {  // placeholders (size 0): lists start at the used end
      sizes.push_back(i < Cc ? x.coarse_sizes[i] : 0);
      begin.push_back(m0 + (i < Cc ? x.coarse_child_offsets[i] : int32_t(x.coarse_children.size())));
    }
    // Coarse child lists first, so that member_begin[coarse i + 1] ends coarse i's list.
    mem.insert(mem.end(), x.coarse_children.begin(), x.coarse_children.end());
    mem.resize(size_t(m0 + r.children), 0);
    c0 += r.coarse;
    if (C && !on_device) {
      convert_from_f32(x.key_centroids.data(), key_dtype, keys.data() + size_t(c0) * d * ksize, C * d);
      convert_from_f32(x.value_centroids.data(), value_dtype, values.data() + size_t(c0) * d * vsize, C * d);
    }
    const int32_t m1 = int32_t(mem.size());
    for (size_t i = 0; i < size_t(r.fine); ++i) {
      sizes.push_back(i < C ? x.sizes[i] : 0);
      begin.push_back(m1 + (i < C ? x.member_offsets[i] : int32_t(x.members.size())));
    }
    mem.insert(mem.end(), x.members.begin(), x.members.end());
    mem.resize(size_t(m1 + r.tokens), 0);
    c0 += r.fine;
  }
  auto put = [](DeviceBuffer& buf, const void* src, size_t bytes) {
    buf.reserve(std::max<size_t>(bytes, 16));
    buf.upload(src, bytes);
  };
  keys_.reserve(std::max<size_t>(size_t(clusters) * d * ksize, 16));
  values_.reserve(std::max<size_t>(size_t(clusters) * d * vsize, 16));
  if (!on_device) {
    keys_.upload(keys.data(), keys.size());
    values_.upload(values.data(), values.size());
  } else {
    keys_.memset(0);  // the slots no producer writes (placeholders) read as zero vectors
    values_.memset(0);
  }
  put(sizes_, sizes.data(), sizes.size() * 4);
  put(member_begin_, begin.data(), begin.size() * 4);
  put(members_, mem.data(), mem.size() * 4);
  put(position_sums_, psums.data(), psums.size() * 8);
  position_sums_ok_ = true;
  put(d_entry_begin_, entry_begin_.data(), entry_begin_.size() * 4);
  put(d_entry_count_, entry_count_.data(), entry_count_.size() * 4);
  put(d_entry_end_, entry_end_.data(), entry_end_.size() * 4);
  put(d_entry_coarse_, entry_coarse_.data(), entry_coarse_.size() * 4);
}

DeviceClusterIndex::DeviceClusterIndex(int head_dim, int num_kv_heads, DType key_dtype, DType value_dtype,
                                       std::span<const DeviceEntryShape> shapes)
    : head_dim_(head_dim), num_kv_heads_(num_kv_heads), key_dtype_(key_dtype), value_dtype_(value_dtype) {
  MP_CHECK(head_dim > 0 && head_dim % 8 == 0, "cluster index: head_dim {} must be a positive multiple of 8", head_dim);
  MP_CHECK(num_kv_heads > 0 && !shapes.empty() && shapes.size() % size_t(num_kv_heads) == 0,
           "cluster index: {} entries is not a positive multiple of {} KV heads", shapes.size(), num_kv_heads);
  MP_CHECK(value_dtype == DType::BF16 || value_dtype == DType::F16, "cluster index: value dtype {} must be bf16 or f16",
           dtype_name(value_dtype));
  MP_CHECK(key_dtype == DType::F32 || key_dtype == value_dtype,
           "cluster index: key centroid dtype {} must be f32 or the value dtype {}", dtype_name(key_dtype),
           dtype_name(value_dtype));
  int64_t clusters = 0, members = 0;
  for (size_t e = 0; e < shapes.size(); ++e) {
    const auto& x = shapes[e];
    MP_CHECK(x.fine >= 0 && x.coarse >= 0 && x.tokens >= 0 && x.clustered_end >= x.tokens &&
                 x.clustered_end <= std::numeric_limits<int32_t>::max() && (x.coarse == 0 || x.fine > 0),
             "cluster index: entry {} shape (fine {}, coarse {}, tokens {}, clustered_end {}) is inconsistent", e,
             x.fine, x.coarse, x.tokens, x.clustered_end);
    MP_CHECK((x.fine_capacity == 0 && x.coarse_capacity == 0) ||
                 (x.fine_capacity >= x.fine && x.token_capacity >= x.tokens &&
                  (x.coarse_capacity == 0 ? x.coarse == 0 : x.coarse_capacity > x.coarse)),
             "cluster index: entry {} capacity (fine {}, coarse {}, tokens {}) below its {} fine, {} coarse (+1 "
             "placeholder), {} tokens",
             e, x.fine_capacity, x.coarse_capacity, x.token_capacity, x.fine, x.coarse, x.tokens);
    const Room r = room(shapes, e, x.fine, x.coarse, x.tokens);
    entry_begin_.push_back(int32_t(clusters));
    entry_count_.push_back(x.fine + r.coarse);
    entry_end_.push_back(int32_t(x.clustered_end));
    entry_coarse_.push_back(r.coarse);
    entry_cap_.push_back(r.coarse + r.fine);
    member_base_.push_back(members);
    clusters += r.fine + r.coarse;
    members += r.tokens + r.children;
    max_clusters_ = std::max(max_clusters_, x.fine + r.coarse);
    max_coarse_ = std::max(max_coarse_, r.coarse);
  }
  MP_CHECK(clusters < std::numeric_limits<int32_t>::max() && members < std::numeric_limits<int32_t>::max(),
           "cluster index: {} clusters / {} members exceed the 2^31 limit", clusters, members);
  total_clusters_ = clusters;
  const size_t d = size_t(head_dim);
  keys_.reserve(std::max<size_t>(size_t(clusters) * d * dtype_size(key_dtype), 16));
  values_.reserve(std::max<size_t>(size_t(clusters) * d * dtype_size(value_dtype), 16));
  keys_.memset(0);  // the slots the producer leaves (placeholders, spare room) read as zero vectors
  values_.memset(0);
  sizes_.reserve(std::max<size_t>(size_t(clusters) * 4, 16));
  member_begin_.reserve(std::max<size_t>(size_t(clusters) * 4, 16));
  members_.reserve(std::max<size_t>(size_t(members) * 4, 16));
  position_sums_.reserve(std::max<size_t>(size_t(clusters) * 8, 16));
  position_sums_.memset(0);
  auto put = [](DeviceBuffer& buf, const std::vector<int32_t>& v) {
    buf.reserve(std::max<size_t>(v.size() * 4, 16));
    buf.upload(v.data(), v.size() * 4);
  };
  put(d_entry_begin_, entry_begin_);
  put(d_entry_count_, entry_count_);
  put(d_entry_end_, entry_end_);
  put(d_entry_coarse_, entry_coarse_);
}

DeviceClusterTarget DeviceClusterIndex::target() {
  DeviceClusterTarget t;
  t.key_centroids = keys_.data();
  t.value_centroids = values_.data();
  t.sizes = sizes_.as<int32_t>();
  t.member_begin = member_begin_.as<int32_t>();
  t.members = members_.as<int32_t>();
  position_sums_ok_ = false;  // the producer may move members
  t.entry_count = d_entry_count_.as<int32_t>();
  t.entry_end = d_entry_end_.as<int32_t>();
  return t;
}

void DeviceClusterIndex::sync_entries() {
  synchronize();
  d_entry_count_.download(entry_count_.data(), entry_count_.size() * 4);
  d_entry_end_.download(entry_end_.data(), entry_end_.size() * 4);
  max_clusters_ = 0;
  for (size_t e = 0; e < entry_count_.size(); ++e) {
    MP_CHECK(entry_count_[e] <= entry_cap_[e], "cluster index: entry {} holds {} clusters, beyond its capacity {}", e,
             entry_count_[e], entry_cap_[e]);
    max_clusters_ = std::max(max_clusters_, entry_count_[e]);
  }
}

DeviceClusterView DeviceClusterIndex::view() const {
  DeviceClusterView v;
  v.key_centroids = keys_.data();
  v.value_centroids = values_.data();
  v.sizes = sizes_.as<const int32_t>();
  v.member_begin = member_begin_.as<const int32_t>();
  v.members = members_.as<const int32_t>();
  v.entry_begin = d_entry_begin_.as<const int32_t>();
  v.entry_count = d_entry_count_.as<const int32_t>();
  v.entry_end = d_entry_end_.as<const int32_t>();
  v.entry_coarse = d_entry_coarse_.as<const int32_t>();
  v.position_sums = position_sums_.as<const int64_t>();
  v.key_dtype = key_dtype_;
  v.value_dtype = value_dtype_;
  return v;
}

void DeviceClusterIndex::refresh_position_sums(Stream stream) {
  const int most_slots = entry_cap_.empty() ? 0 : *std::max_element(entry_cap_.begin(), entry_cap_.end());
  detail::launch_position_sums(view(), position_sums_.as<int64_t>(), entries(), most_slots, stream);
  position_sums_ok_ = true;
}

void DeviceClusterIndex::fill_random_centroids(uint64_t seed) {
  detail::launch_fill_random(keys_.data(), total_clusters_ * head_dim_, key_dtype_, seed, nullptr);
  detail::launch_fill_random(values_.data(), total_clusters_ * head_dim_, value_dtype_, seed + 1, nullptr);
  synchronize();
}

int64_t DeviceClusterIndex::centroid_bytes() const {
  return total_clusters_ * head_dim_ * int64_t(dtype_size(key_dtype_) + dtype_size(value_dtype_));
}

}  // namespace multipole::cuda
