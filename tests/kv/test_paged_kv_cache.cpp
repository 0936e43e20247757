#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "multipole/core/error.hpp"
#include "multipole/kv/paged_kv_cache.hpp"

using namespace multipole;

namespace {

// A new sequence of `len` positions holding random K/V in every layer of `cache`.
SeqId add_random_sequence(PagedKVCache& cache, int64_t len, std::mt19937& rng) {
  const KVCacheConfig& c = cache.config();
  std::normal_distribution<float> dist;
  const SeqId s = cache.add_sequence();
  cache.extend(s, len);
  std::vector<float> k(size_t(len) * c.num_kv_heads * c.head_dim), v(k.size());
  for (int layer = 0; layer < c.num_layers; ++layer) {
    for (auto& x : k) x = dist(rng);
    for (auto& x : v) x = dist(rng);
    cache.write(s, layer, 0, len, k.data(), v.data());
  }
  return s;
}

}  // namespace

TEST(PagedKVCache, SequencesOfDifferentLengthsRoundTrip) {
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    KVCacheConfig c{.num_layers = 2, .num_kv_heads = 3, .head_dim = 16, .page_size = 5, .dtype = t, .max_tokens = 400};
    PagedKVCache cache(c);
    std::mt19937 rng(3);
    std::normal_distribution<float> dist;
    std::vector<SeqId> seqs;
    std::vector<std::vector<float>> ks, vs;
    for (int64_t len : {1, 97, 23}) {
      SeqId s = cache.add_sequence();
      seqs.push_back(s);
      std::vector<float> k(len * 3 * 16), v(k.size());
      for (auto& x : k) x = dist(rng);
      for (auto& x : v) x = dist(rng);
      // Grow in uneven pieces to cross page boundaries mid-write.
      for (int64_t done = 0; done < len;) {
        int64_t n = std::min<int64_t>(len - done, 1 + done % 7);
        int64_t pos = cache.extend(s, n);
        ASSERT_EQ(pos, done);
        for (int layer = 0; layer < 2; ++layer)
          cache.write(s, layer, pos, n, k.data() + pos * 48, v.data() + pos * 48);
        done += n;
      }
      ks.push_back(k);
      vs.push_back(v);
    }
    const float tol = t == DType::F32 ? 0 : 1e-2f;
    for (size_t i = 0; i < seqs.size(); ++i) {
      int64_t len = cache.length(seqs[i]);
      std::vector<float> out(len * 16);
      for (int h = 0; h < 3; ++h) {
        cache.read_keys(seqs[i], 1, h, 0, len, out.data());
        for (int64_t p = 0; p < len; ++p)
          for (int j = 0; j < 16; ++j) ASSERT_NEAR(out[p * 16 + j], ks[i][(p * 3 + h) * 16 + j], tol * 4);
        cache.read_values(seqs[i], 0, h, 0, len, out.data());
        for (int64_t p = 0; p < len; ++p)
          for (int j = 0; j < 16; ++j) ASSERT_NEAR(out[p * 16 + j], vs[i][(p * 3 + h) * 16 + j], tol * 4);
      }
    }
  }
}

TEST(PagedKVCache, FreeReturnsPagesAndFullCacheThrows) {
  KVCacheConfig c{.num_layers = 1, .num_kv_heads = 1, .head_dim = 8, .page_size = 4, .dtype = DType::F32, .max_tokens = 16};
  PagedKVCache cache(c);
  SeqId a = cache.add_sequence();
  cache.extend(a, 10);
  EXPECT_EQ(cache.free_pages(), 1);
  SeqId b = cache.add_sequence();
  EXPECT_THROW(cache.extend(b, 5), Error);
  EXPECT_EQ(cache.length(b), 0);  // a failed extend changes nothing
  cache.free_sequence(a);
  EXPECT_EQ(cache.free_pages(), 4);
  EXPECT_NO_THROW(cache.extend(b, 16));
  EXPECT_THROW(cache.length(a), Error);
  std::vector<float> out(8);
  EXPECT_THROW(cache.read_keys(b, 0, 0, 16, 1, out.data()), Error);
  EXPECT_THROW(cache.read_keys(b, 1, 0, 0, 1, out.data()), Error);
}

TEST(PagedKVCache, RejectsBadConfig) {
  EXPECT_THROW(PagedKVCache(KVCacheConfig{.num_layers = 0}), Error);
  EXPECT_THROW(PagedKVCache(KVCacheConfig{.head_dim = 12}), Error);
  EXPECT_THROW(PagedKVCache(KVCacheConfig{.page_size = 0}), Error);
  EXPECT_THROW(PagedKVCache(KVCacheConfig{.max_tokens = -1}), Error);
}

TEST(PagedKVCache, AddCopyTakesAPrefixAsStored) {
  KVCacheConfig c{.num_layers = 2, .num_kv_heads = 3, .head_dim = 16, .page_size = 5, .dtype = DType::BF16, .max_tokens = 200};
  PagedKVCache src(c), dst(c);
  std::mt19937 rng(5);
  const SeqId s = add_random_sequence(src, 23, rng);
  dst.extend(dst.add_sequence(), 7);  // the copy lands on other page ids than the source's
  // Into another cache and into the same one; a prefix ending mid-page and the whole sequence.
  for (auto [into, n] : {std::pair{&dst, int64_t(17)}, {&dst, int64_t(23)}, {&src, int64_t(12)}}) {
    SCOPED_TRACE(n);
    const SeqId copy = into->add_copy(src, s, n);
    ASSERT_EQ(into->length(copy), n);
    std::vector<float> want(size_t(n) * 16), got(want.size());
    for (int layer = 0; layer < 2; ++layer)
      for (int h = 0; h < 3; ++h) {
        src.read_keys(s, layer, h, 0, n, want.data());
        into->read_keys(copy, layer, h, 0, n, got.data());
        EXPECT_EQ(got, want);
        src.read_values(s, layer, h, 0, n, want.data());
        into->read_values(copy, layer, h, 0, n, got.data());
        EXPECT_EQ(got, want);
      }
  }
  EXPECT_EQ(src.length(s), 23);
}

TEST(PagedKVCache, AddCopyRejectsOtherShapesLengthsAndFullCaches) {
  KVCacheConfig c{.num_layers = 1, .num_kv_heads = 2, .head_dim = 8, .page_size = 4, .dtype = DType::F16, .max_tokens = 16};
  PagedKVCache src(c);
  const SeqId s = src.add_sequence();
  src.extend(s, 10);
  KVCacheConfig other = c;
  other.dtype = DType::BF16;
  PagedKVCache wrong(other);
  EXPECT_THROW(
      {
        try {
          wrong.add_copy(src, s, 4);
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("f16"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
  PagedKVCache dst(c);
  EXPECT_THROW(dst.add_copy(src, s, 11), Error);   // past the source's length
  EXPECT_THROW(dst.add_copy(src, s + 1, 1), Error);  // no such sequence
  EXPECT_THROW(src.add_copy(src, s, 10), Error);   // 3 more pages, 1 free
  EXPECT_EQ(src.free_pages(), 1);
  EXPECT_FALSE(src.has_sequence(s + 1));
}

TEST(PagedKVCache, CopyPositionsOverwritesTheRangeAndNothingElse) {
  KVCacheConfig c{.num_layers = 2, .num_kv_heads = 3, .head_dim = 16, .page_size = 5, .dtype = DType::F16, .max_tokens = 200};
  PagedKVCache src(c), dst(c);
  std::mt19937 rng(7);
  // Sequences of 23 positions with different contents, on different page ids.
  src.extend(src.add_sequence(), 3);
  const SeqId s = add_random_sequence(src, 23, rng), d = add_random_sequence(dst, 23, rng);
  // Every (layer, head, K or V) row of a sequence, as f32.
  const auto rows = [](const PagedKVCache& cache, SeqId seq) {
    std::vector<float> out;
    std::vector<float> one(16);
    for (int layer = 0; layer < 2; ++layer)
      for (int h = 0; h < 3; ++h)
        for (int64_t p = 0; p < 23; ++p) {
          cache.read_keys(seq, layer, h, p, 1, one.data());
          out.insert(out.end(), one.begin(), one.end());
          cache.read_values(seq, layer, h, p, 1, one.data());
          out.insert(out.end(), one.begin(), one.end());
        }
    return out;
  };
  const std::vector<float> from = rows(src, s), before = rows(dst, d);
  dst.copy_positions(src, s, d, 7, 12);  // [7, 19): starts and ends mid-page
  const std::vector<float> after = rows(dst, d);
  for (size_t i = 0; i < after.size(); ++i) {
    const int64_t p = int64_t(i / 32 % 23);
    ASSERT_EQ(after[i], p >= 7 && p < 19 ? from[i] : before[i]) << "row " << i / 32 << " position " << p;
  }
  EXPECT_EQ(dst.length(d), 23);
  EXPECT_THROW(dst.copy_positions(src, s, d, 20, 4), Error);  // past both lengths
  const SeqId shorter = dst.add_copy(dst, d, 10);
  EXPECT_THROW(dst.copy_positions(src, s, shorter, 8, 3), Error);  // past the destination's length
  KVCacheConfig other = c;
  other.head_dim = 8;
  PagedKVCache wrong(other);
  const SeqId w = wrong.add_sequence();
  wrong.extend(w, 23);
  EXPECT_THROW(wrong.copy_positions(src, s, w, 0, 1), Error);
}
