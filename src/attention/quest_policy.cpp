// Quest (Tang et al. 2024) as a baseline: the middle region is cut into pages of
// quest_page_size tokens starting at position `sinks`; each page keeps the per-channel
// min and max of its (post-RoPE) keys. A page's bound for query head g is
// sum_c max(q_c min_c, q_c max_c) >= q.k of every key in it; the group scores a page by the
// max bound over its heads and attends the top floor(budget / page) pages exactly, with the
// sinks and the local window.
//
// Selection rule (the tests re-implement it): candidates are the full pages of the middle
// region plus its partial last page if any (fewer tokens, so the budget still holds); the
// top min(candidates, floor(budget / page)) by score, ties to the lower page index.
#include <algorithm>
#include <limits>
#include <numeric>
#include <unordered_map>

#include "attention/cpu_decode_common.hpp"
#include "attention/policies.hpp"

namespace multipole {

namespace {

class QuestPolicy final : public AttentionPolicy {
 public:
  explicit QuestPolicy(const AttentionConfig& config) : AttentionPolicy(config) {}
  std::string_view name() const override { return "quest"; }

  void forget(SeqId seq) override { seqs_.erase(seq); }

  void update(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, ThreadPool& pool) override {
    const auto& kc = cache.config();
    MP_CHECK(kc.num_kv_heads == config_.num_kv_heads && kc.head_dim == config_.head_dim,
             "quest: cache shape ({} KV heads, head_dim {}) differs from the config's ({}, {})", kc.num_kv_heads,
             kc.head_dim, config_.num_kv_heads, config_.head_dim);
    MP_CHECK(layer >= 0 && layer < kc.num_layers, "quest: layer {} out of range [0, {})", layer, kc.num_layers);
    const int heads = config_.num_kv_heads, d = config_.head_dim, P = config_.quest_page_size;
    // Bookkeeping and allocation first, serially; the parallel part only fills bounds.
    jobs_.clear();
    for (size_t b = 0; b < seqs.size(); ++b) {
      auto& layers = seqs_[seqs[b]];
      if (layers.empty()) layers.resize(size_t(kc.num_layers));
      Summary& s = layers[size_t(layer)];
      if (s.bounds.empty()) s.bounds.resize(size_t(heads));
      const Region r = region(cache.length(seqs[b]));
      MP_CHECK(r.full >= s.full_pages,
               "quest: sequence {} shrank below its {} summarised pages; call forget() when a sequence is freed",
               seqs[b], s.full_pages);
      if (r.full == s.full_pages && r.tail == s.tail_tokens) continue;  // the middle region did not move
      const int64_t slots = r.full + (r.tail > 0);
      for (auto& v : s.bounds) cpu::grow(v, size_t(slots) * 2 * d * dtype_size(kc.dtype));
      jobs_.push_back({seqs[b], &s, s.full_pages, r});
      s.full_pages = r.full;
      s.tail_tokens = r.tail;
    }
    if (jobs_.empty()) return;
    scratch_.ensure(pool.size());
    pool.parallel_for(int64_t(jobs_.size()) * heads, [&](int64_t task, int thread) {
      const Job& job = jobs_[size_t(task / heads)];
      const int h = int(task % heads);
      float* keys = cpu::grow(scratch_[thread].keys, size_t(P + 2) * d);
      std::byte* bounds = job.summary->bounds[size_t(h)].data();
      // New full pages, then the partial last page (recomputed: it is < one page). Min and
      // max of stored keys are values of the storage type, so they are stored in it exactly.
      auto summarise = [&](int64_t page, int64_t n) {
        cache.read_keys(job.seq, layer, h, job.region.sinks + page * P, n, keys);
        float* lo = keys + int64_t(P) * d;
        float* hi = lo + d;
        std::copy(keys, keys + d, lo);
        std::copy(keys, keys + d, hi);
        for (int64_t t = 1; t < n; ++t)
          for (int c = 0; c < d; ++c) {
            lo[c] = std::min(lo[c], keys[t * d + c]);
            hi[c] = std::max(hi[c], keys[t * d + c]);
          }
        convert_from_f32(lo, kc.dtype, bounds + page * 2 * d * dtype_size(kc.dtype), size_t(2) * d);
      };
      for (int64_t page = job.first_new; page < job.region.full; ++page) summarise(page, P);
      if (job.region.tail > 0) summarise(job.region.full, job.region.tail);
    });
  }

  void decode(const PagedKVCache& cache, int layer, std::span<const SeqId> seqs, const float* q, float* out,
              ThreadPool& pool) override {
    cpu::check_decode_args(name(), config_, cache, layer, seqs, q, out);
    const int heads = config_.num_kv_heads, G = config_.group_size(), d = config_.head_dim, P = config_.quest_page_size;
    const KVLayerView kv = cache.layer_view(layer);
    const float scale = config_.softmax_scale();
    const int64_t max_pages = config_.budget / P;

    summaries_.resize(seqs.size());
    for (size_t b = 0; b < seqs.size(); ++b) {
      const Region r = region(cache.length(seqs[b]));
      summaries_[b] = nullptr;
      if (r.full + r.tail == 0) continue;
      auto it = seqs_.find(seqs[b]);
      const Summary* s = it == seqs_.end() || it->second.empty() ? nullptr : &it->second[size_t(layer)];
      MP_CHECK(s && s->full_pages == r.full && s->tail_tokens == r.tail,
               "quest: sequence {} layer {} is not indexed up to its {} middle tokens; call update() before decode()",
               seqs[b], layer, r.full * P + r.tail);
      summaries_[b] = s;
    }
    // Every thread's scratch is sized here, serially, for the largest sequence: which thread
    // runs which task varies, and the parallel part must not allocate.
    const int64_t max_len = cpu::longest_sequence(cache, seqs);
    const int64_t max_pages_seq = region(max_len).full + 1;
    scratch_.ensure(pool.size());
    for (int i = 0; i < pool.size(); ++i) {
      Scratch& sc = scratch_[i];
      cpu::grow(sc.pages, size_t(max_pages_seq));
      cpu::grow(sc.scores, size_t(max_pages_seq) * (G + 1));
      cpu::grow(sc.qsplit, size_t(G) * 2 * d);
      cpu::grow(sc.selected, size_t(max_len));
      cpu::grow(sc.positions, size_t(max_len));
      sc.state.resize(G, d);
    }
    stats_parts_.assign(size_t(pool.size()), DecodeStats{});

    pool.parallel_for(int64_t(seqs.size()) * heads, [&](int64_t task, int thread) {
      const int64_t b = task / heads;
      const int h = int(task % heads);
      Scratch& sc = scratch_[thread];
      DecodeStats& st = stats_parts_[size_t(thread)];
      const int64_t len = cache.length(seqs[b]);
      const Region r = region(len);
      const int64_t candidates = r.full + (r.tail > 0);
      const float* qg = q + (b * config_.num_q_heads + int64_t(h) * G) * d;

      int32_t* chosen = cpu::grow(sc.pages, size_t(candidates));
      int64_t picked = candidates;
      std::iota(chosen, chosen + candidates, 0);
      if (candidates > max_pages) {
        float* score = cpu::grow(sc.scores, size_t(candidates) * (G + 1));
        score_pages(summaries_[b]->bounds[size_t(h)].data(), kv.dtype, candidates, qg, G, d,
                    cpu::grow(sc.qsplit, size_t(G) * 2 * d), score + candidates, score);
        std::nth_element(chosen, chosen + max_pages, chosen + candidates, [score](int32_t a, int32_t c) {
          return score[a] > score[c] || (score[a] == score[c] && a < c);
        });
        picked = max_pages;
        std::sort(chosen, chosen + picked);
        st.centroids_scored += candidates;
        st.bytes_read += candidates * 2 * kv.token_bytes;
      }
      int32_t* sel = cpu::grow(sc.selected, size_t(picked) * P);
      int64_t n = 0;
      for (int64_t i = 0; i < picked; ++i) {
        const int64_t begin = r.sinks + int64_t(chosen[i]) * P, end = std::min(begin + P, r.middle_end);
        for (int64_t p = begin; p < end; ++p) sel[n++] = int32_t(p);
      }
      cpu::attend_selected(kv, cache.page_table(seqs[b]).data(), h, r.sinks, r.middle_end, len, {sel, size_t(n)}, qg,
                           G, scale, out + (b * config_.num_q_heads + int64_t(h) * G) * d, sc.state, sc.positions, st);
    });
    stats_ = cpu::sum_stats(stats_parts_);
  }

 private:
  struct Region {
    int64_t sinks, middle_end, full, tail;  // full pages and tokens of the partial last page
  };
  Region region(int64_t length) const {
    Region r;
    r.sinks = std::min<int64_t>(config_.cluster.sinks, length);
    r.middle_end = config_.middle_end(length);
    const int64_t tokens = r.middle_end - r.sinks;
    r.full = tokens / config_.quest_page_size;
    r.tail = tokens % config_.quest_page_size;
    return r;
  }

  // score[i] = max_g sum_c max(q_gc lo_ic, q_gc hi_ic) for pages i of bounds [pages][lo|hi][d]
  // (stored as `type`).
  // As lo <= hi, max(q lo, q hi) = min(q, 0) lo + max(q, 0) hi: a dot product of the page's
  // [lo | hi] with [min(q, 0) | max(q, 0)], which the logit kernel computes.
  //   q: [G, d]; qsplit: scratch [G, 2d]; all: scratch [G, pages]
  static void score_pages(const std::byte* bounds, DType type, int64_t pages, const float* q, int G, int d, float* qsplit, float* all,
                          float* score) {
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < d; ++c) {
        qsplit[g * 2 * d + c] = std::min(q[g * d + c], 0.0f);
        qsplit[g * 2 * d + d + c] = std::max(q[g * d + c], 0.0f);
      }
    kernels::score_rows_typed(bounds, type, nullptr, pages, qsplit, G, 2 * d, 1.0f, all);
    std::copy(all, all + pages, score);
    for (int g = 1; g < G; ++g)
      for (int64_t i = 0; i < pages; ++i) score[i] = std::max(score[i], all[g * pages + i]);
  }

  struct Summary {
    int64_t full_pages = 0;
    int64_t tail_tokens = 0;
    std::vector<std::vector<std::byte>> bounds;  // per KV head: [pages (+1 partial), lo|hi, d] in the KV dtype
  };
  struct Job {
    SeqId seq;
    Summary* summary;
    int64_t first_new;
    Region region;
  };
  struct Scratch {
    std::vector<float> keys, scores, qsplit;
    std::vector<int32_t> pages, selected, positions;
    kernels::OwnedState state;
  };
  std::unordered_map<SeqId, std::vector<Summary>> seqs_;  // per sequence, per layer
  std::vector<Job> jobs_;
  std::vector<const Summary*> summaries_;
  std::vector<DecodeStats> stats_parts_;
  cpu::PerThread<Scratch> scratch_;
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_quest_policy(const AttentionConfig& config) {
  return std::make_unique<QuestPolicy>(config);
}

}  // namespace multipole
