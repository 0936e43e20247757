#pragma once
// Ranked-merge BPE over bytes. Works on raw bytes: the byte-level spelling of the vocabulary
// is undone once at load time, so encoding never builds mapped strings.
#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace multipole {

class BpeModel {
 public:
  struct Merge {
    int32_t left, right, result;  // token ids; the merge's rank is its index
  };
  // byte_token[b]: id of the one-byte token for byte b, or -1 when the vocabulary lacks it
  // (encoding text with that byte then fails). raw_to_id: every vocabulary token's bytes.
  // ignore_merges: a pre-token that is itself a token is emitted whole (Llama 3).
  BpeModel(std::string source, const std::array<int32_t, 256>& byte_token, const std::vector<Merge>& merges,
           std::unordered_map<std::string, int32_t> raw_to_id, bool ignore_merges);

  // Appends the ids of one pre-token (raw bytes). Thread-safe.
  void encode(std::string_view word, std::vector<int32_t>& out) const;

  // The vocabulary token whose bytes are exactly `bytes`, or -1.
  int32_t find(std::string_view bytes) const;

 private:
  struct Rank {
    int32_t rank, result;
  };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  const Rank* lookup(int32_t a, int32_t b) const {
    auto it = ranks_.find(key(a, b));
    return it == ranks_.end() ? nullptr : &it->second;
  }
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  std::string source_;
  std::array<int32_t, 256> byte_token_;
  std::unordered_map<uint64_t, Rank> ranks_;
  std::unordered_map<std::string, int32_t> raw_to_id_;
  bool ignore_merges_;

  // Words repeat a lot in real text; their merges are cached (bounded, cleared when full).
  static constexpr size_t kCacheLimit = 1 << 18;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace multipole
