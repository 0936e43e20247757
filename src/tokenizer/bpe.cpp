#include "tokenizer/bpe.hpp"

#include <functional>
#include <queue>

#include "multipole/core/error.hpp"

namespace multipole {

BpeModel::BpeModel(std::string source, const std::array<int32_t, 256>& byte_token, const std::vector<Merge>& merges,
                   std::unordered_map<std::string, int32_t> raw_to_id, bool ignore_merges)
    : source_(std::move(source)), byte_token_(byte_token), raw_to_id_(std::move(raw_to_id)),
      ignore_merges_(ignore_merges) {
  ranks_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r)  // a repeated pair keeps its first (best) rank
    ranks_.emplace(key(merges[r].left, merges[r].right), Rank{int32_t(r), merges[r].result});
}

int32_t BpeModel::find(std::string_view bytes) const {
  auto it = raw_to_id_.find(std::string(bytes));
  return it == raw_to_id_.end() ? -1 : it->second;
}

void BpeModel::encode(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (word.size() == 1) {
    merge_word(word, out);
    return;
  }
  if (ignore_merges_) {
    int32_t id = find(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  std::string key_text(word);
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(key_text);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  merge_word(word, out);
  std::vector<int32_t> ids(out.begin() + std::ptrdiff_t(start), out.end());
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() >= kCacheLimit) cache_.clear();
  cache_.emplace(std::move(key_text), std::move(ids));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  const int n = int(word.size());
  const size_t un = word.size();
  std::vector<int32_t> id(un, 0);
  std::vector<int> prev(un), next(un);
  for (int i = 0; i < n; ++i) {
    const unsigned char b = static_cast<unsigned char>(word[size_t(i)]);
    id[size_t(i)] = byte_token_[b];
    if (id[size_t(i)] < 0) fail("{}: the vocabulary has no token for byte 0x{:02X}", source_, unsigned(b));
    prev[size_t(i)] = i - 1;
    next[size_t(i)] = i + 1 < n ? i + 1 : -1;
  }
  // Candidate merges keyed (rank << 32 | left position): the best rank first, ties to the
  // leftmost pair, as in Hugging Face tokenizers and llama.cpp. Entries go stale when a
  // neighbour merges; they are checked when popped instead of being removed.
  std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap;
  auto push = [&](int left) {
    const int right = next[size_t(left)];
    if (right < 0) return;
    if (const Rank* r = lookup(id[size_t(left)], id[size_t(right)]))
      heap.push((uint64_t(uint32_t(r->rank)) << 32) | uint32_t(left));
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<char> alive(un, 1);
  while (!heap.empty()) {
    const uint64_t top = heap.top();
    heap.pop();
    const int left = int(uint32_t(top));
    const int32_t rank = int32_t(top >> 32);
    if (!alive[size_t(left)]) continue;
    const int right = next[size_t(left)];
    if (right < 0) continue;
    const Rank* r = lookup(id[size_t(left)], id[size_t(right)]);
    if (!r || r->rank != rank) continue;  // stale: a neighbour changed since it was queued
    id[size_t(left)] = r->result;
    alive[size_t(right)] = 0;
    next[size_t(left)] = next[size_t(right)];
    if (next[size_t(left)] >= 0) prev[size_t(next[size_t(left)])] = left;
    if (prev[size_t(left)] >= 0) push(prev[size_t(left)]);
    push(left);
  }
  for (int i = 0; i >= 0; i = next[size_t(i)]) out.push_back(id[size_t(i)]);
}

}  // namespace multipole
