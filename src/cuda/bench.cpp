#include "multipole/cuda/bench.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <string_view>

#include "cuda/check.hpp"
#include "cuda/host_setup.hpp"
#include "cuda/launch.hpp"
#include "cuda/phase_clock.hpp"
#include "multipole/core/error.hpp"
#include "multipole/cuda/decode.hpp"
#include "multipole/cuda/kmeans.hpp"
#include "multipole/cuda/sparse_baselines.hpp"

namespace multipole::cuda {

namespace {

constexpr int kFusedCtas = detail::FusedStepLimits::kCtasPerEntry;  // CTAs of an entry in the one-launch step

// CTAs a multipole step of `dec` launches for E entries (the bench rows' `ctas`).
int step_ctas(const CudaDecoder& dec, int64_t E) {
  return dec.plan_info().fused ? int(E) * kFusedCtas : dec.plan_info().mp_ctas;
}

// Device time between two points of a stream (a pair of events).
class StreamSpan {
 public:
  StreamSpan() {
    MP_CUDA_CHECK(cudaEventCreate(&a_));
    MP_CUDA_CHECK(cudaEventCreate(&b_));
  }
  ~StreamSpan() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  StreamSpan(const StreamSpan&) = delete;
  StreamSpan& operator=(const StreamSpan&) = delete;
  void begin(cudaStream_t s) { MP_CUDA_CHECK(cudaEventRecord(a_, s)); }
  void end(cudaStream_t s) { MP_CUDA_CHECK(cudaEventRecord(b_, s)); }
  // Waits for the end; microseconds.
  double us() const {
    MP_CUDA_CHECK(cudaEventSynchronize(b_));
    float ms = 0;
    MP_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return 1e3 * double(ms);
  }

 private:
  cudaEvent_t a_ = nullptr, b_ = nullptr;
};

// Median time of `step` in microseconds: warm-up, then (graph replay or direct launches)
// each timed step preceded by an L2 flush. Diagnostics: MULTIPOLE_BENCH_FLUSH=none times
// the steps back to back instead, with their code and data left in the caches.
template <class Step>
double time_step(const Step& step, const CudaBenchOptions& o, cudaStream_t s, DeviceBuffer& flush, bool read_flush) {
  static const bool no_flush = [] {
    const char* f = std::getenv("MULTIPOLE_BENCH_FLUSH");
    return f && std::string_view(f) == "none";
  }();
  for (int i = 0; i < o.warmup; ++i) step(s);
  MP_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  if (o.graph) {
    MP_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    step(s);
    MP_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    MP_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    MP_CUDA_CHECK(cudaGraphLaunch(exec, s));  // upload
  }
  std::vector<cudaEvent_t> ev(2 * size_t(o.iterations));
  for (auto& e : ev) MP_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < o.iterations; ++i) {
    if (no_flush) {
      // back to back: nothing between the steps
    } else if (read_flush) {
      detail::launch_read_flush(flush.data(), flush.size() - 4096, reinterpret_cast<uint32_t*>(static_cast<char*>(flush.data()) + flush.size() - 4096), s);
    } else {
      MP_CUDA_CHECK(cudaMemsetAsync(flush.data(), i & 0xff, flush.size() - 4096, s));
    }
    MP_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
    if (exec)
      MP_CUDA_CHECK(cudaGraphLaunch(exec, s));
    else
      step(s);
    MP_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
  }
  MP_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<float> ms(o.iterations);
  for (int i = 0; i < o.iterations; ++i) MP_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) cudaEventDestroy(e);
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return double(ms[ms.size() / 2]) * 1e3;
}

// Diagnostics (MULTIPOLE_SELECT_PROFILE set): per-phase cycles of the two-level selection
// kernel, thread 0 of each CTA (one per entry), over `iterations` flushed steps: the mean
// over CTAs, and the slowest CTA's (a batch-1 step waits for it); printed to stderr.
// A kernel's phase-clock slots (PhaseClock) from the device, `blocks` buffers of
// kPhaseClockSlots: their sum, the CTAs that finished, and the clock in cycles per ns
// (cycles of phases [0, phases) over their ns).
struct PhaseClockReadout {
  std::vector<unsigned long long> v, blocks;  // summed slots; every block's slots
  double ctas = 1, ghz = 1;
};
PhaseClockReadout read_phase_clock(const DeviceBuffer& prof, int phases, int blocks = 1) {
  PhaseClockReadout r;
  const size_t S = detail::kPhaseClockSlots;
  r.blocks.resize(S * size_t(blocks));
  prof.download(r.blocks.data(), r.blocks.size() * sizeof(unsigned long long));
  r.v.assign(S, 0);
  for (size_t i = 0; i < r.blocks.size(); ++i) r.v[i % S] += r.blocks[i];
  r.ctas = double(std::max<unsigned long long>(r.v[detail::kPhaseClockCtas], 1));
  unsigned long long cyc = 0;
  for (int k = 0; k < phases; ++k) cyc += r.v[size_t(k)];
  if (r.v[detail::kPhaseClockNs] > 0) r.ghz = double(cyc) / double(r.v[detail::kPhaseClockNs]);
  return r;
}

// `iterations` flushed multipole steps of dec with a zeroed phase-clock buffer of `blocks` x
// kPhaseClockSlots handed to it by install(dec, buffer) (install(dec, nullptr) after them).
template <class Install>
DeviceBuffer profiled_steps(CudaDecoder& dec, const Install& install, int blocks, const DeviceKVCache& dev,
                            const DeviceClusterIndex& index, const float* q, const float* qs, float* out,
                            const CudaBenchOptions& o, cudaStream_t s, DeviceBuffer& flush) {
  DeviceBuffer prof(size_t(detail::kPhaseClockSlots) * size_t(blocks) * sizeof(unsigned long long));
  prof.memset(0);
  install(dec, prof.as<unsigned long long>());
  for (int i = 0; i < o.iterations; ++i) {
    MP_CUDA_CHECK(cudaMemsetAsync(flush.data(), i & 0xff, flush.size() - 4096, s));
    dec.multipole(dev, 0, index, q, qs, out, s);
  }
  MP_CUDA_CHECK(cudaStreamSynchronize(s));
  install(dec, nullptr);
  return prof;
}

void profile_select(CudaDecoder& dec, const DeviceKVCache& dev, const DeviceClusterIndex& index, const float* q,
                    const float* qs, float* out, const CudaBenchOptions& o, cudaStream_t s, DeviceBuffer& flush, int B,
                    int64_t ctx) {
  const int E = index.entries();
  const size_t S = detail::kPhaseClockSlots;
  const DeviceBuffer prof = profiled_steps(
      dec, [](CudaDecoder& d, unsigned long long* p) { d.set_select_profile(p); }, E, dev, index, q, qs, out, o, s,
      flush);
  const auto r = read_phase_clock(prof, 20, E);
  const auto& v = r.v;
  int slow = 0;  // the entry whose CTAs took longest over the iterations
  for (int e = 1; e < E; ++e)
    if (r.blocks[e * S + detail::kPhaseClockNs] > r.blocks[slow * S + detail::kPhaseClockNs]) slow = e;
  const unsigned long long* w = r.blocks.data() + slow * S;
  const double it = std::max(1, o.iterations);
  static const char* names[20] = {"prologue", "coarse-imp", "coarse-radix", "coarse-ties", "coarse-walk",
                                  "far-list", "", "mark", "compact", "score:wait", "frontier", "fine-imp",
                                  "fine-radix", "fine-ties", "fine-walk", "fine-far", "exact", " score:loads",
                                  " score:math", ""};
  std::fprintf(stderr,
               "select-profile B=%d ctx=%lld CTAs/step=%.0f kernel(thread 0): mean %.2f us, slowest (entry %d) %.2f us; "
               "clock=%.2f GHz\n",
               B, static_cast<long long>(ctx), r.ctas / it, double(v[detail::kPhaseClockNs]) / r.ctas * 1e-3, slow,
               double(w[detail::kPhaseClockNs]) / it * 1e-3, r.ghz);
  std::fprintf(stderr, "  %-13s %8s %8s %9s\n", "phase", "mean us", "slow us", "slow cyc");
  for (int k = 0; k < 19; ++k)
    if (names[k][0] != 0)
      std::fprintf(stderr, "  %-13s %8.2f %8.2f %9.0f\n", names[k], double(v[size_t(k)]) / r.ctas / r.ghz * 1e-3,
                   double(w[k]) / it / r.ghz * 1e-3, double(w[k]) / it);
  std::fprintf(stderr,
               "  per CTA (mean / slowest): tail picks coarse %.2f / %.0f, fine %.2f / %.0f (+1000: one-warp walk, +2000: sorted), "
               "candidates %.1f / %.0f, coarse %.1f / %.0f\n",
               double(v[20]) / r.ctas, double(w[20]) / it, double(v[21]) / r.ctas, double(w[21]) / it,
               double(v[22]) / r.ctas, double(w[22]) / it, double(v[24]) / r.ctas, double(w[24]) / it);
}

// Diagnostics (with MULTIPOLE_STEP_PROFILE): where a one-launch step's time goes outside its
// CTAs, for the profiled kernel as it is and returning at entry (the launch's own cost): the
// median of `iterations` flushed steps of the device time between events around the graph
// replay (as the bench's rows) and around a direct launch, the kernel's span (first CTA start
// to last CTA end, globaltimer) and the spread of its CTAs' starts and ends; printed to stderr.
void print_step_span(const char* what, CudaDecoder& dec, const DeviceKVCache& dev, const DeviceClusterIndex& index,
                     const float* q, const float* qs, float* out, const CudaBenchOptions& o, cudaStream_t s,
                     DeviceBuffer& flush) {
  const size_t S = detail::kPhaseClockSlots;
  const int ctas = index.entries() * kFusedCtas;
  DeviceBuffer prof(S * size_t(ctas) * sizeof(unsigned long long));
  unsigned long long* slots = prof.as<unsigned long long>();
  const auto step = [&](cudaStream_t st) { dec.multipole(dev, 0, index, q, qs, out, st); };
  const auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  static_assert(detail::kSpanFirstEnd == detail::kSpanFirstStart + 1 &&
                detail::kSpanLastStart == detail::kSpanFirstStart + 2 && detail::kSpanLastEnd == detail::kSpanFirstStart + 3);
  for (const bool at_entry : {false, true}) {
    prof.memset(0);
    dec.set_step_profile(slots, at_entry);
    const double graph_us = time_step(step, o, s, flush, false);
    std::vector<double> direct, span, starts, ends;
    StreamSpan ev;
    for (int i = 0; i < o.iterations; ++i) {
      // The span slots: the firsts (start, end) to ~0, the lasts to 0 (a CTA returning at entry
      // records none); then the flush, as the bench's.
      static const unsigned long long init[4] = {~0ull, ~0ull, 0, 0};
      if (!at_entry)
        MP_CUDA_CHECK(cudaMemcpyAsync(slots + detail::kSpanFirstStart, init, sizeof init, cudaMemcpyHostToDevice, s));
      MP_CUDA_CHECK(cudaMemsetAsync(flush.data(), i & 0xff, flush.size() - 4096, s));
      ev.begin(s);
      step(s);
      ev.end(s);
      direct.push_back(ev.us());
      if (at_entry) continue;
      unsigned long long t[4];
      prof.download(t, sizeof t, detail::kSpanFirstStart * sizeof(unsigned long long));
      span.push_back(1e-3 * double(t[3] - t[0])), starts.push_back(1e-3 * double(t[2] - t[0]));
      ends.push_back(1e-3 * double(t[3] - t[1]));
    }
    dec.set_step_profile(nullptr);
    if (at_entry) {
      std::fprintf(stderr, "step-span %s (returning at entry): events around graph %.2f us, around direct launch %.2f\n",
                   what, graph_us, median(direct));
      continue;
    }
    std::fprintf(stderr,
                 "step-span %s: events around graph %.2f us, around direct launch %.2f; kernel span %.2f "
                 "(CTA starts spread %.2f, ends spread %.2f)\n",
                 what, graph_us, median(direct), median(span), median(starts), median(ends));
    // The last launch's geometry: per cluster (entry) its SMs and its CTAs' end after the first start.
    std::vector<unsigned long long> v(S * size_t(ctas));
    prof.download(v.data(), v.size() * sizeof(unsigned long long));
    unsigned long long first = ~0ull;
    std::map<unsigned long long, int> on_sm;
    for (int c = 0; c < ctas; ++c) first = std::min(first, v[c * S + detail::kCtaStart]), ++on_sm[v[c * S + detail::kCtaSm]];
    int shared = 0;
    for (const auto& [sm, n] : on_sm) shared += n > 1;
    std::fprintf(stderr, "  last launch: %d CTAs on %zu SMs (%d SMs hold more than one)\n", ctas, on_sm.size(), shared);
    for (int e = 0; e < index.entries(); ++e) {
      std::string sms;
      double end_lo = 1e30, end_hi = 0;
      for (int c = kFusedCtas * e; c < kFusedCtas * (e + 1); ++c) {
        if (!sms.empty()) sms += ',';
        sms += std::to_string(v[c * S + detail::kCtaSm]);
        const double end = 1e-3 * double(v[c * S + detail::kCtaEnd] - first);
        end_lo = std::min(end_lo, end), end_hi = std::max(end_hi, end);
      }
      std::fprintf(stderr, "  entry %d: ends %.2f-%.2f us after the first start; SMs %s\n", e, end_lo, end_hi, sms.c_str());
    }
  }
}

// Diagnostics (MULTIPOLE_STEP_PROFILE set, the step in one launch): per-phase time of the
// one-launch step over `iterations` flushed steps, thread 0 of each of its CTAs: the mean over
// CTAs and the slowest CTA's; printed to stderr. Barrier waits count in the phase they end.
void profile_fused_step(const char* what, CudaDecoder& dec, const DeviceKVCache& dev, const DeviceClusterIndex& index,
                        const float* q, const float* qs, float* out, const CudaBenchOptions& o, cudaStream_t s,
                        DeviceBuffer& flush, int B, int64_t ctx) {
  constexpr int kPhases = 14;
  const int ctas = index.entries() * kFusedCtas;
  const size_t S = detail::kPhaseClockSlots;
  const DeviceBuffer prof = profiled_steps(
      dec, [](CudaDecoder& d, unsigned long long* p) { d.set_step_profile(p); }, ctas, dev, index, q, qs, out, o, s,
      flush);
  const auto r = read_phase_clock(prof, kPhases, ctas);
  int slow = 0;
  for (int c = 1; c < ctas; ++c)
    if (r.blocks[c * S + detail::kPhaseClockNs] > r.blocks[slow * S + detail::kPhaseClockNs]) slow = c;
  const unsigned long long* w = r.blocks.data() + slow * S;
  const double it = std::max(1, o.iterations);
  static const char* names[kPhases] = {"prologue", "coarse-score", "barrier-1", "coarse-norm", "coarse-select",
                                       "candidates", "cand-score", "barrier-2", "frontier", "fine-select",
                                       "rows-issued", "far-field", "exact-join", "merge"};
  std::fprintf(stderr,
               "step-profile %s B=%d ctx=%lld: kernel(thread 0) mean %.2f us, slowest CTA (%d) %.2f us; clock=%.2f GHz\n",
               what, B, static_cast<long long>(ctx), double(r.v[detail::kPhaseClockNs]) / r.ctas * 1e-3, slow,
               double(w[detail::kPhaseClockNs]) / it * 1e-3, r.ghz);
  for (int k = 0; k < kPhases; ++k)
    std::fprintf(stderr, "  %-13s mean %6.2f us  slowest CTA %6.2f us\n", names[k],
                 double(r.v[size_t(k)]) / r.ctas / r.ghz * 1e-3, double(w[k]) / it / r.ghz * 1e-3);
  // Slots after the phases, per selection: picks, picks taken at once, cycles of the walk's rounds;
  // after those, per selection, cycles of the radix passes and of the listing of the picks taken at once.
  const auto us = [&](double cycles, double n) { return cycles / n / r.ghz * 1e-3; };
  for (int sel = 0; sel < 2; ++sel) {
    const size_t k = size_t(kPhases + 3 * sel), t = size_t(kPhases + 6 + 2 * sel);
    std::fprintf(stderr,
                 "  %s selection: picks mean %.1f (%.1f at once), radix %.2f us, listing %.2f us, walk %.2f us; "
                 "slowest CTA %.1f (%.1f), %.2f, %.2f, %.2f us\n",
                 sel == 0 ? "coarse" : "fine", double(r.v[k]) / r.ctas, double(r.v[k + 1]) / r.ctas,
                 us(double(r.v[t]), r.ctas), us(double(r.v[t + 1]), r.ctas), us(double(r.v[k + 2]), r.ctas),
                 double(w[k]) / it, double(w[k + 1]) / it, us(double(w[t]), it), us(double(w[t + 1]), it),
                 us(double(w[k + 2]), it));
  }
  print_step_span(what, dec, dev, index, q, qs, out, o, s, flush);
}

// Diagnostics (MULTIPOLE_UPDATE_PROFILE set): per-phase time of the online update kernel
// (thread 0 of each CTA, averaged over CTAs) from the phase-clock slots; printed to stderr.
void print_update_profile(const char* what, const DeviceBuffer& prof, int B, int64_t ctx) {
  constexpr int kSlots = 12;
  const auto [v, blocks, ctas, ghz] = read_phase_clock(prof, kSlots);
  static const char* names[kSlots] = {"load",    "first-round", "rounds",      "lists",  "stats", "token-lists",
                                      "parents", "child-lists", "coarse", "norms", "distances", "argmin"};
  std::fprintf(stderr, "update-profile %s B=%d ctx=%lld CTA launches=%.0f kernel(thread 0)=%.2f us clock=%.2f GHz\n",
               what, B, static_cast<long long>(ctx), ctas, double(v[detail::kPhaseClockNs]) / ctas * 1e-3, ghz);
  for (int k = 0; k < kSlots; ++k)
    std::fprintf(stderr, "  %-12s %9.0f cycles %8.2f us\n", names[k], double(v[size_t(k)]) / ctas,
                 double(v[size_t(k)]) / ctas / ghz * 1e-3);
}

// How the plan runs a multipole step (stderr).
void print_plan(const char* what, const CudaDecoder& dec, int B, int Hkv, int64_t ctx) {
  const DecodePlanInfo& p = dec.plan_info();
  std::string how;
  if (!p.fused) {
    how = std::string("three launches (one launch: ") + p.fused_why + ")";
  } else {
    const std::string bound = std::to_string(p.fused_candidate_bound);
    how = !p.hierarchical      ? "one launch"
          : !p.fused_fallback ? "one launch (at most " + bound + " candidates)"
                              : "one launch, then selection and attention for entries over 512 candidates (the index "
                                "allows " + bound + ")";
    // Entries past the clusters held at once start as the first end.
    const int entries = B * Hkv, at_once = std::max(p.fused_clusters_at_once, 1);
    if (entries > at_once)
      how += ", " + std::to_string(entries) + " clusters in " + std::to_string((entries + at_once - 1) / at_once) +
             " waves of " + std::to_string(at_once);
  }
  std::fprintf(stderr, "bench: b%d %lld tokens, %s: %s\n", B, static_cast<long long>(ctx), what, how.c_str());
}

// Diagnostics (MULTIPOLE_INDEX_STATS set): shape of an index and of what one step of `dec`
// selected on it, summed over the batch's entries; printed to stderr.
void print_index_stats(const char* name, const CudaDecoder& dec, const DeviceClusterIndex& index,
                       const std::vector<HostClusterLevel>& host, int budget) {
  const auto far = dec.far_sizes();
  const auto exact = dec.exact_counts();
  std::vector<int> fine, coarse, kids;
  int64_t far_fine = 0, far_coarse = 0, exact_sum = 0, big_tokens = 0, tokens = 0;
  for (int e = 0; e < index.entries(); ++e) {
    const int64_t c0 = index.entry_first_cluster(e), cc = index.entry_coarse(e);
    for (int64_t i = c0; i < c0 + index.entry_clusters(e); ++i)
      (i < c0 + cc ? far_coarse : far_fine) += far[size_t(i)] > 0;
    exact_sum += exact[size_t(e)];
  }
  for (const auto& h : host) {
    for (int n : h.sizes) {
      fine.push_back(n);
      tokens += n;
      if (n > budget) big_tokens += n;
    }
    for (int n : h.coarse_sizes) coarse.push_back(n);
    for (size_t c = 0; c + 1 < h.coarse_child_offsets.size(); ++c)
      kids.push_back(h.coarse_child_offsets[c + 1] - h.coarse_child_offsets[c]);
  }
  auto q = [](std::vector<int> v, double f) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(f * double(v.size())))];
  };
  const double E = std::max(1, index.entries()), He = std::max<double>(1, double(host.size()));
  std::fprintf(stderr,
               "index-stats %s: per entry: clusters %.0f (coarse %.0f), far list coarse %.1f + fine %.1f, exact "
               "rows %.1f; plan: score CTAs %d, attention CTAs %d, chunk %d\n",
               name, double(index.total_clusters()) / E, double(index.max_coarse()), double(far_coarse) / E,
               double(far_fine) / E, double(exact_sum) / E, dec.plan_info().score_ctas, dec.plan_info().mp_ctas,
               dec.plan_info().mp_chunk);
  if (!host.empty())
    std::fprintf(stderr,
                 "  (%zu entries) fine sizes p10 %d p50 %d p90 %d p99 %d max %d, empty %.1f%%, tokens in clusters > "
                 "budget %.1f%%; coarse sizes p10 %d p50 %d p90 %d max %d; children per coarse p50 %d p90 %d max %d\n",
                 host.size(), q(fine, 0.1), q(fine, 0.5), q(fine, 0.9), q(fine, 0.99), q(fine, 1.0),
                 100.0 * double(std::count(fine.begin(), fine.end(), 0)) / std::max<double>(1, double(fine.size())),
                 100.0 * double(big_tokens) / std::max<double>(1, double(tokens)), q(coarse, 0.1), q(coarse, 0.5),
                 q(coarse, 0.9), q(coarse, 1.0), q(kids, 0.5), q(kids, 0.9), q(kids, 1.0));
  (void)He;
}

}  // namespace

AttentionConfig CudaBenchOptions::attention_config() const {
  AttentionConfig ac;
  ac.num_q_heads = q_heads;
  ac.num_kv_heads = kv_heads;
  ac.head_dim = head_dim;
  ac.rope.head_dim = head_dim;
  ac.budget = budget;
  ac.coarse_budget = coarse_budget;
  ac.cluster.tokens_per_centroid = {tokens_per_centroid};
  return ac;
}

void CudaBenchOptions::validate() const {
  MP_CHECK(!batches.empty() && !contexts.empty(), "bench: --batch and --context need values");
  for (int b : batches) MP_CHECK(b > 0, "bench: batch {} must be > 0", b);
  for (int64_t c : contexts) MP_CHECK(c > 0, "bench: context {} must be > 0", c);
  MP_CHECK(detail::is_kernel_head_dim(head_dim), "bench: --head-dim {} must be 64 or 128 (the CUDA kernels' head dims)",
           head_dim);
  MP_CHECK(iterations > 0 && warmup >= 0, "bench: iterations {} must be > 0 and warmup {} >= 0", iterations, warmup);
  MP_CHECK(rerank_tokens == 0 || rerank_tokens > budget,
           "bench: --rerank-tokens {} must be 0 (4 x the budget) or above --budget {}", rerank_tokens, budget);
  attention_config().validate();
}

std::vector<CudaBenchRow> run_cuda_attention_bench(const CudaBenchOptions& o,
                                                   const std::function<void(const CudaBenchRow&)>& on_row) {
  o.validate();
  MP_CHECK(device_count() > 0, "bench: no CUDA device");
  const AttentionConfig ac = o.attention_config();
  const int Hkv = o.kv_heads, D = o.head_dim, Hq = o.q_heads, G = ac.group_size();
  cudaStream_t stream;
  MP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer flush((size_t(256) << 20) + 4096);  // last 4 KB: sink of the read flush
  std::vector<CudaBenchRow> rows;
  std::mt19937_64 rng(o.seed);

  for (int B : o.batches)
    for (int64_t ctx : o.contexts) {
      KVCacheConfig kc;
      kc.num_layers = 1;
      kc.num_kv_heads = Hkv;
      kc.head_dim = D;
      kc.page_size = o.page_size;
      kc.dtype = o.dtype;
      kc.max_tokens = int64_t(B) * (ctx + o.page_size);
      DeviceKVCache dev(kc, B);
      // Scattered pages, as a cache that has served many requests would hand out (or in order).
      std::vector<int32_t> perm(size_t(dev.num_pages()));
      std::iota(perm.begin(), perm.end(), 0);
      if (o.scattered_pages) std::shuffle(perm.begin(), perm.end(), rng);
      const int64_t pages_per_seq = (ctx + o.page_size - 1) / o.page_size;
      std::vector<SeqId> seqs;
      for (int b = 0; b < B; ++b) {
        seqs.push_back(b);
        dev.set_sequence(b, std::span<const int32_t>(perm.data() + b * pages_per_seq, size_t(pages_per_seq)), ctx);
      }
      dev.flush_tables();
      detail::launch_fill_random(dev.key_pool(0), dev.pool_bytes() / 2, o.dtype, rng(), nullptr);
      detail::launch_fill_random(dev.value_pool(0), dev.pool_bytes() / 2, o.dtype, rng(), nullptr);

      std::vector<HostClusterLevel> entries;
      const int64_t end = ac.middle_end(ctx), s0 = std::min<int64_t>(ac.cluster.sinks, end);
      const int lo = std::max(1, o.tokens_per_centroid / 2), span = o.tokens_per_centroid + 1;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hkv; ++h) {
          HostClusterLevel e;
          e.clustered_end = end;
          e.member_offsets.push_back(0);
          for (int64_t p = s0; p < end;) {
            const int n = int(std::min<int64_t>(lo + int64_t(rng() % span), end - p));
            for (int k = 0; k < n; ++k) e.members.push_back(int32_t(p + k));
            e.sizes.push_back(n);
            e.member_offsets.push_back(int32_t(e.members.size()));
            p += n;
          }
          entries.push_back(std::move(e));
        }
      DeviceClusterIndex flat_index(D, Hkv, o.key_dtype, o.dtype, entries);
      flat_index.fill_random_centroids(rng());
      // Coarse level: consecutive fine clusters until ~coarse_tokens_per_centroid tokens.
      if (o.coarse_tokens_per_centroid > 0)
        for (auto& e : entries) {
          e.coarse_child_offsets.push_back(0);
          int under = 0;
          for (int c = 0; c < e.num_clusters(); ++c) {
            e.coarse_children.push_back(c);
            under += e.sizes[size_t(c)];
            if (under >= o.coarse_tokens_per_centroid || c + 1 == e.num_clusters()) {
              e.coarse_sizes.push_back(under);
              e.coarse_child_offsets.push_back(int32_t(e.coarse_children.size()));
              under = 0;
            }
          }
        }
      DeviceClusterIndex index(D, Hkv, o.key_dtype, o.dtype, entries);
      index.fill_random_centroids(rng());
      const bool stats = std::getenv("MULTIPOLE_INDEX_STATS") != nullptr;
      std::vector<HostClusterLevel> synth_host;
      if (stats)
        for (int k = 0; k < std::min<int>(int(entries.size()), 8); ++k) synth_host.push_back(entries[size_t(k)]);
      entries.clear();

      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> hq(size_t(B) * Hq * D), hqs(hq.size());
      for (auto& x : hq) x = nd(rng);
      for (auto& x : hqs) x = nd(rng);
      DeviceBuffer q(hq.size() * 4), qs(hq.size() * 4), out(hq.size() * 4);
      q.upload(hq.data(), hq.size() * 4);
      qs.upload(hqs.data(), hqs.size() * 4);

      CudaDecoder dec(ac), flat(ac);
      dec.plan(dev, seqs, &index);
      print_plan("multipole", dec, B, Hkv, ctx);
      flat.plan(dev, seqs, &flat_index);
      if (index.hierarchical()) print_plan("mp-1level", flat, B, Hkv, ctx);
      AttentionConfig sqc = ac;
      sqc.multipole_far_field = false;
      CudaDecoder squeezed(sqc);
      squeezed.plan(dev, seqs, &index);
      const float *pq = q.as<float>(), *pqs = qs.as<float>();
      float* po = out.as<float>();

      // Bytes each variant must read. (The timed steps do not record far sizes.)
      dec.set_record_far_sizes(true);
      dec.multipole(dev, 0, index, pq, pqs, po, stream);
      MP_CUDA_CHECK(cudaStreamSynchronize(stream));
      const auto counts = dec.exact_counts();
      const int64_t exact = std::accumulate(counts.begin(), counts.end(), int64_t(0));
      const int64_t row = int64_t(D) * int64_t(dtype_size(o.dtype));
      // Clusters read: one level, all; two levels, the coarse ones and the fine candidates
      // (approximated by the far-field fine clusters plus budget / 8 selected ones).
      // Prescored (small batches): every key centroid is scored.
      int64_t C = flat_index.total_clusters(), Ck = C;
      if (index.hierarchical()) {
        const auto far = dec.far_sizes();
        int64_t coarse = 0, fine_far = 0;
        for (int e = 0; e < B * Hkv; ++e) {
          const int64_t c0 = index.entry_first_cluster(e), cc = index.entry_coarse(e);
          coarse += cc;
          for (int64_t i = c0 + cc; i < c0 + index.entry_clusters(e); ++i) fine_far += far[size_t(i)] > 0;
        }
        C = coarse + fine_far + int64_t(B) * Hkv * (o.budget / 8);
        Ck = dec.plan_info().prescored ? index.total_clusters() : C;
      }
      dec.set_record_far_sizes(false);
      const int64_t kbytes = Ck * D * int64_t(dtype_size(o.key_dtype)), vbytes = C * row;
      const int64_t lists = C * (4 + 4 + 4) + Ck * G * 4 * 2;  // sizes, far sizes, member starts, scores w+r
      const int64_t dense_bytes = int64_t(B) * Hkv * ctx * row * 2;
      const int64_t mp_bytes = kbytes + vbytes + lists + exact * (2 * row + 4);
      const int64_t Cf = flat_index.total_clusters();
      const int64_t flat_bytes = Cf * D * int64_t(dtype_size(o.key_dtype) + dtype_size(o.dtype)) +
                                 Cf * (12 + G * 8) + exact * (2 * row + 4);

      const int dense_ctas = dec.plan_info().dense_ctas;
      double dense_us = 0;
      auto emit = [&](const std::string& name, auto step, int64_t bytes, int launches, int ctas) {
        const double us = time_step(step, o, stream, flush, false);
        const double us_clean = time_step(step, o, stream, flush, true);
        if (name == "dense") dense_us = us;
        CudaBenchRow r;
        r.batch = B;
        r.context = ctx;
        r.variant = name;
        r.us = us;
        r.us_clean = us_clean;
        r.ratio_to_dense = dense_us > 0 ? dense_us / us : 0;
        r.bytes = bytes;
        r.gbps = double(bytes) / (us * 1e-6) / 1e9;
        r.launches = launches;
        r.ctas = ctas;
        rows.push_back(r);
        if (on_row) on_row(r);
      };
      emit("dense", [&](cudaStream_t s) { dec.dense(dev, 0, pq, po, s); }, dense_bytes, CudaDecoder::kDenseLaunches,
           dense_ctas);
      // "multipole": the step as the plan chooses it (one launch where fused_step.cuh holds);
      // "mp-3launch" beside it: the three-kernel step on the same index (emit_three).
      const int E = B * Hkv;
      // Re-ranking's candidates (mp-rerank, mp-1level-rerank) and its bytes: each pick member's key
      // row, member id and page id.
      const int rerank_tokens = o.rerank_tokens > 0 ? o.rerank_tokens : 4 * o.budget;
      const int64_t rerank_bytes = int64_t(E) * rerank_tokens * (row + 8);
      // cfg: ac, or another config.
      const auto emit_three = [&](const std::string& name, const DeviceClusterIndex& idx, int64_t bytes,
                                  const AttentionConfig* cfg = nullptr) {
        CudaDecoder three(cfg ? *cfg : ac);
        three.set_fused(false);
        three.plan(dev, seqs, &idx);
        emit(name, [&](cudaStream_t s) { three.multipole(dev, 0, idx, pq, pqs, po, s); }, bytes,
             three.multipole_launches(), three.plan_info().mp_ctas);
      };
      emit("multipole", [&](cudaStream_t s) { dec.multipole(dev, 0, index, pq, pqs, po, s); }, mp_bytes,
           dec.multipole_launches(), step_ctas(dec, E));
      if (dec.plan_info().fused) emit_three("mp-3launch", index, mp_bytes);
      if (dec.plan_info().fused && std::getenv("MULTIPOLE_STEP_PROFILE"))
        profile_fused_step("synthetic", dec, dev, index, pq, pqs, po, o, stream, flush, B, ctx);
      if (index.hierarchical() && !dec.plan_info().fused && std::getenv("MULTIPOLE_SELECT_PROFILE"))
        profile_select(dec, dev, index, pq, pqs, po, o, stream, flush, B, ctx);
      emit("squeezed", [&](cudaStream_t s) { squeezed.multipole(dev, 0, index, pq, pqs, po, s); }, mp_bytes - vbytes,
           squeezed.multipole_launches(), step_ctas(squeezed, E));
      {
        // The far field at real positions: the far clusters' key centroids rotated to their mean
        // positions and scored against q, in the one-launch step where it holds, else between the
        // three-kernel step's selection and attention (bytes: each far cluster's key row, position
        // sum and G logits, written and read); mp-far-real-3launch beside a one-launch row.
        AttentionConfig fr = ac;
        fr.far_field_real_positions = true;
        CudaDecoder far_real(fr);
        far_real.plan(dev, seqs, &index);
        const int64_t far = int64_t(B) * Hkv * far_real.plan_info().far_items;
        const int64_t extra = far * (D * int64_t(dtype_size(o.key_dtype)) + 8 + G * 8);
        emit("mp-far-real", [&](cudaStream_t s) { far_real.multipole(dev, 0, index, pq, pqs, po, s); },
             mp_bytes + extra, far_real.multipole_launches(), step_ctas(far_real, E));
        if (far_real.plan_info().fused) emit_three("mp-far-real-3launch", index, mp_bytes + extra, &fr);
      }
      {
        // Re-ranking picks worth rerank_tokens (in the one-launch step where it holds, with
        // mp-rerank-3launch beside it: three kernels and one launch more; compare with multipole
        // and mp-3launch).
        AttentionConfig rr = ac;
        rr.rerank_tokens = rerank_tokens;
        CudaDecoder rerank(rr);
        rerank.plan(dev, seqs, &index);
        emit("mp-rerank", [&](cudaStream_t s) { rerank.multipole(dev, 0, index, pq, pqs, po, s); },
             mp_bytes + rerank_bytes, rerank.multipole_launches(), step_ctas(rerank, E));
        if (rerank.plan_info().fused) emit_three("mp-rerank-3launch", index, mp_bytes + rerank_bytes, &rr);
      }
      {
        // GPU baselines on the same cache: quest (page bounds built before timing; its
        // per-step metadata update timed on its own) and oracle-topk. Bytes: quest reads
        // the page bounds, writes and reads a score per page, then the exact rows; oracle
        // reads every middle key, writes and reads G logits and the importance (~4 radix
        // passes) per key, then the exact rows.
        CudaSparseDecoder quest(ac, SparseBaseline::Quest), oracle(ac, SparseBaseline::OracleTopk);
        quest.plan(dev, seqs);
        oracle.plan(dev, seqs);
        quest.build_metadata(dev, 0, stream);
        auto exact_rows = [&](CudaSparseDecoder& d) {
          d.decode(dev, 0, pq, po, stream);
          int64_t n = 0;
          for (const auto& e : d.exact_positions()) n += int64_t(e.size());
          MP_CHECK(d.error_flags() == 0, "bench: {} flagged errors {}", &d == &quest ? "quest" : "oracle-topk",
                   d.error_flags());
          return n;
        };
        const int64_t E = int64_t(B) * Hkv, M = end - s0, P = ac.quest_page_size, pages = (M + P - 1) / P;
        const int64_t quest_bytes = E * pages * (2 * row + 8) + exact_rows(quest) * (2 * row + 4);
        const int64_t oracle_bytes = E * M * (row + G * 8 + 4 * 5) + exact_rows(oracle) * (2 * row + 4);
        emit("quest", [&](cudaStream_t s) { quest.decode(dev, 0, pq, po, s); }, quest_bytes,
             CudaSparseDecoder::kDecodeLaunches, quest.select_ctas() + int(E) + quest.attend_ctas());
        emit("quest-meta-update", [&](cudaStream_t s) { quest.update_metadata(dev, 0, s); },
             E * ((ac.cluster.window + P - 1) / P + 1) * P * row, CudaSparseDecoder::kUpdateLaunches,
             int(E) * ((ac.cluster.window + int(P) - 1) / int(P) + 1));
        emit("oracle-topk", [&](cudaStream_t s) { oracle.decode(dev, 0, pq, po, s); }, oracle_bytes,
             CudaSparseDecoder::kDecodeLaunches, oracle.select_ctas() + int(E) + oracle.attend_ctas());
        if (o.stages) {
          emit("quest-score", [&](cudaStream_t s) { quest.decode(dev, 0, pq, po, s, 1); }, E * pages * (2 * row + 4),
               1, quest.select_ctas());
          emit("quest-score+select", [&](cudaStream_t s) { quest.decode(dev, 0, pq, po, s, 2); },
               E * pages * (2 * row + 8), 2, quest.select_ctas() + int(E));
          emit("oracle-logits", [&](cudaStream_t s) { oracle.decode(dev, 0, pq, po, s, 1); }, E * M * (row + G * 4), 1,
               oracle.select_ctas());
          emit("oracle-logits+select", [&](cudaStream_t s) { oracle.decode(dev, 0, pq, po, s, 2); },
               E * M * (row + G * 8 + 4 * 5), 2, oracle.select_ctas() + int(E));
        }
      }
      if (index.hierarchical()) {
        emit("mp-1level", [&](cudaStream_t s) { flat.multipole(dev, 0, flat_index, pq, pqs, po, s); }, flat_bytes,
             flat.multipole_launches(), step_ctas(flat, E));
        if (flat.plan_info().fused) emit_three("mp-1level-3launch", flat_index, flat_bytes);
        AttentionConfig frr = ac;  // one level re-ranked: the most accurate setting (evaluation.md, H50-H51)
        frr.rerank_tokens = rerank_tokens;
        CudaDecoder flat_rerank(frr);
        flat_rerank.plan(dev, seqs, &flat_index);
        emit("mp-1level-rerank", [&](cudaStream_t s) { flat_rerank.multipole(dev, 0, flat_index, pq, pqs, po, s); },
             flat_bytes + rerank_bytes, flat_rerank.multipole_launches(), step_ctas(flat_rerank, E));
        if (flat.plan_info().fused && std::getenv("MULTIPOLE_STEP_PROFILE"))
          profile_fused_step("synthetic-1level", flat, dev, flat_index, pq, pqs, po, o, stream, flush, B, ctx);
      }
      if (o.stages) {
        emit("mp-score", [&](cudaStream_t s) { dec.multipole(dev, 0, index, pq, pqs, po, s, 1); },
             kbytes + C * (4 + G * 4), 1, dec.plan_info().score_ctas);
        emit("mp-score+select", [&](cudaStream_t s) { dec.multipole(dev, 0, index, pq, pqs, po, s, 2); },
             kbytes + lists, 2, dec.plan_info().score_ctas + B * Hkv);
        emit("mp-attend", [&](cudaStream_t s) { dec.multipole(dev, 0, index, pq, pqs, po, s, 4); },
             vbytes + exact * (2 * row + 4) + C * (4 + G * 4), 1, dec.plan_info().mp_ctas);
      }
      MP_CHECK(dec.error_flags() == 0, "bench: exact set overflow (flags {})", dec.error_flags());
      if (stats) {
        dec.set_record_far_sizes(true);
        dec.multipole(dev, 0, index, pq, pqs, po, stream);
        print_index_stats("synthetic", dec, index, synth_host, o.budget);
      }
      if (o.kmeans) {
        // Prefill clustering of the whole batch (B x Hkv entries), blocks and levels as the
        // CPU index; wall time of build() + the GPU work it enqueues.
        AttentionConfig kc2 = ac;
        kc2.cluster.tokens_per_centroid = {o.tokens_per_centroid};
        if (o.coarse_tokens_per_centroid > 0) kc2.cluster.tokens_per_centroid.push_back(o.coarse_tokens_per_centroid);
        kc2.cluster.block_size = o.block_size;
        kc2.cluster.prefill_iterations = o.prefill_iterations;
        const Rope rope(kc2.rope);
        const std::vector<int64_t> ends(size_t(B), kc2.middle_end(ctx));
        DeviceKMeans km;
        std::vector<double> ms;
        for (int run = 0; run <= std::max(1, o.kmeans_runs); ++run) {  // run 0: warm-up (allocations)
          StreamSpan span;
          MP_CUDA_CHECK(cudaStreamSynchronize(stream));
          span.begin(stream);
          km.build(dev, 0, seqs, ends, kc2, rope, o.key_dtype, stream);
          span.end(stream);
          if (run > 0) ms.push_back(span.us() * 1e-3);
        }
        std::sort(ms.begin(), ms.end());
        km.set_profile(true);  // one more build, with an event after each launch: time per stage
        km.build(dev, 0, seqs, ends, kc2, rope, o.key_dtype, stream);
        const auto stages = km.stage_ms();
        km.set_profile(false);
        CudaBenchRow r;
        r.batch = B;
        r.context = ctx;
        r.variant = "kmeans-prefill";
        r.us = ms[ms.size() / 2] * 1e3;
        r.us_clean = r.us;
        r.bytes = int64_t(B) * Hkv * (end - s0) * row * 2;  // keys and values read once from the cache
        r.gbps = double(r.bytes) / (r.us * 1e-6) / 1e9;
        r.launches = km.launches();
        r.ratio_to_dense = dense_us > 0 ? dense_us / r.us : 0;
        rows.push_back(r);
        if (on_row) on_row(r);
        for (const auto& [name, t] : stages) {
          CudaBenchRow sr;
          sr.batch = B;
          sr.context = ctx;
          sr.variant = "km:" + name;
          sr.us = sr.us_clean = t * 1e3;
          rows.push_back(sr);
          if (on_row) on_row(sr);
        }
        CudaDecoder kdec(ac);
        kdec.plan(dev, seqs, &km.index());
        emit("mp-kmeans-index",
             [&](cudaStream_t s) { kdec.multipole(dev, 0, km.index(), pq, pqs, po, s); }, mp_bytes,
             kdec.multipole_launches(), step_ctas(kdec, int64_t(B) * Hkv));
        print_plan("k-means index", kdec, B, Hkv, ctx);
        if (kdec.plan_info().fused && std::getenv("MULTIPOLE_STEP_PROFILE"))
          profile_fused_step("gpu-kmeans", kdec, dev, km.index(), pq, pqs, po, o, stream, flush, B, ctx);
        if (kdec.plan_info().fused_fallback) {
          // The one-launch kernel alone: what the two kernels behind it cost when they have nothing to do.
          emit("mp-km-1launch", [&](cudaStream_t s) { kdec.multipole(dev, 0, km.index(), pq, pqs, po, s, 5); }, 0, 1,
               B * Hkv * kFusedCtas);
          kdec.multipole(dev, 0, km.index(), pq, pqs, po, stream);
          const auto left = kdec.fused_fallbacks();
          std::fprintf(stderr, "bench: b%d %lld tokens: the k-means index's last step left %lld of %zu entries to the "
                       "kernels behind it\n", B, static_cast<long long>(ctx),
                       static_cast<long long>(std::count(left.begin(), left.end(), 1)), left.size());
        }
        if (kdec.plan_info().fused) emit_three("mp-km-3launch", km.index(), mp_bytes);
        if (o.stages) {
          emit("mp-km-score", [&](cudaStream_t s) { kdec.multipole(dev, 0, km.index(), pq, pqs, po, s, 1); }, 0, 1,
               kdec.plan_info().score_ctas);
          emit("mp-km-score+select",
               [&](cudaStream_t s) { kdec.multipole(dev, 0, km.index(), pq, pqs, po, s, 2); }, 0, 2,
               kdec.plan_info().score_ctas + B * Hkv);
          emit("mp-km-attend", [&](cudaStream_t s) { kdec.multipole(dev, 0, km.index(), pq, pqs, po, s, 4); }, 0, 1,
               kdec.plan_info().mp_ctas);
        }
        if (std::getenv("MULTIPOLE_SELECT_PROFILE"))
          profile_select(kdec, dev, km.index(), pq, pqs, po, o, stream, flush, B, ctx);
        if (stats) {
          std::vector<HostClusterLevel> km_host;
          for (int k = 0; k < std::min(B * Hkv, 8); ++k) km_host.push_back(km.download(k));
          kdec.set_record_far_sizes(true);
          kdec.multipole(dev, 0, km.index(), pq, pqs, po, stream);
          print_index_stats("gpu-kmeans", kdec, km.index(), km_host, o.budget);
        }
        MP_CHECK(kdec.error_flags() == 0, "bench: exact set overflow on the k-means index (flags {})",
                 kdec.error_flags());
        {
          // Online update (DeviceKMeans::append) of the W tokens past the prefill's end, which
          // join its last block: here nearly full, the dearest update of a block's life (the
          // mean over a block's life is lower). Rows: per update (all B x Hkv entries) and per
          // generated token (compare with mp-kmeans-index); a fresh prefill before each run.
          DeviceKMeans upd;
          const bool uprof = std::getenv("MULTIPOLE_UPDATE_PROFILE") != nullptr;
          DeviceBuffer prof(detail::kPhaseClockSlots * sizeof(unsigned long long));
          const int W = kc2.cluster.window;
          // A fresh prefill up to `start`, then `updates` appends of W tokens; time per update.
          // Wall time (host and device as they overlap), or with `gpu` the device's alone, as in
          // a decode loop where the update queues behind a step: the stream is kept busy by
          // k-means steps while the appends are issued, and events time the descriptor upload
          // and the kernel. slots: the kernel's phase clock (or null). cfg: kc2, or another config.
          auto run_updates = [&](int64_t start, int updates, unsigned long long* slots, bool gpu,
                                 const AttentionConfig* cfg = nullptr) {
            const AttentionConfig& uc = cfg ? *cfg : kc2;
            std::vector<int64_t> at(size_t(B), start);
            upd.build(dev, 0, seqs, at, uc, rope, o.key_dtype, stream, int64_t(updates) * W);
            MP_CUDA_CHECK(cudaStreamSynchronize(stream));
            upd.set_update_profile(slots);
            StreamSpan span;
            if (gpu) {
              for (int i = 0; i < 8; ++i) kdec.multipole(dev, 0, km.index(), pq, pqs, po, stream);  // >= ~300 us
              span.begin(stream);
            }
            const auto t0 = std::chrono::steady_clock::now();
            for (int u = 0; u < updates; ++u) {
              for (auto& e : at) e = std::min<int64_t>(ctx, e + W);
              upd.append(dev, at, uc, stream);
            }
            if (gpu) span.end(stream);
            MP_CUDA_CHECK(cudaStreamSynchronize(stream));
            const double wall = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            const double us = gpu ? span.us() : wall;
            upd.set_update_profile(nullptr);
            return us / updates;
          };
          std::vector<double> ums, gms;
          for (int run = 0; run <= std::max(1, o.kmeans_runs); ++run) {
            const double us = run_updates(ends[0], 1, nullptr, false), gus = run_updates(ends[0], 1, nullptr, true);
            if (run > 0) ums.push_back(us), gms.push_back(gus);
          }
          std::sort(ums.begin(), ums.end());
          std::sort(gms.begin(), gms.end());
          if (uprof) {  // one more dearest update, with the phase clock
            prof.memset(0);
            run_updates(ends[0], 1, prof.as<unsigned long long>(), false);
            print_update_profile("dearest", prof, B, ctx);
          }
          auto emit_update = [&](const char* name, double us) {
            CudaBenchRow ur;
            ur.batch = B;
            ur.context = ctx;
            ur.variant = name;
            ur.us = ur.us_clean = us;
            ur.launches = upd.update_launches();
            ur.ctas = B * Hkv * upd.update_split();
            rows.push_back(ur);
            if (on_row) on_row(ur);
          };
          emit_update("kmeans-update", ums[ums.size() / 2]);
          emit_update("kmeans-upd/token", ums[ums.size() / 2] / W);
          emit_update("kmeans-update-gpu", gms[gms.size() / 2]);
          emit_update("kmeans-upd/tok-gpu", gms[gms.size() / 2] / W);
          {
            // The same update keeping the index's position sums (the far field at real positions
            // reads them): one launch more over every slot.
            AttentionConfig with_sums = kc2;
            with_sums.far_field_real_positions = true;
            std::vector<double> sms;
            for (int run = 0; run <= std::max(1, o.kmeans_runs); ++run) {
              const double us = run_updates(ends[0], 1, nullptr, true, &with_sums);
              if (run > 0) sms.push_back(us);
            }
            std::sort(sms.begin(), sms.end());
            emit_update("kmeans-update-sums-gpu", sms[sms.size() / 2]);
          }
          // Amortised over a block's life: the updates of block_size / W consecutive windows
          // (one block's worth of tokens, so every fill level of the open block once), after
          // a prefill that ends that many tokens earlier. Mean per update and per token.
          const int life = std::max(1, kc2.cluster.block_size / W);
          const int64_t life_start = ends[0] - int64_t(life) * W;
          if (life_start > kc2.cluster.sinks + kc2.cluster.block_size) {
            const double mean = run_updates(life_start, life, nullptr, false);
            emit_update("kmeans-update-life", mean);
            emit_update("kmeans-upd/tok-life", mean / W);
            emit_update("kmeans-upd/tok-life-gpu", run_updates(life_start, life, nullptr, true) / W);
            if (uprof) {  // the same block's life again, with the phase clock
              prof.memset(0);
              run_updates(life_start, life, prof.as<unsigned long long>(), false);
              print_update_profile("block-life", prof, B, ctx);
            }
          }
        }
      }
    }
  cudaStreamDestroy(stream);
  return rows;
}

}  // namespace multipole::cuda
