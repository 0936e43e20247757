// Budgeted cluster selection (selection.hpp) against the naive greedy over a full sort.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "attention/selection.hpp"
#include "multipole/core/error.hpp"
#include "reference_multipole.hpp"

using namespace multipole;

namespace {

std::vector<int64_t> run(const std::vector<float>& imp, const std::vector<int32_t>& sizes, int64_t budget,
                         SelectionResult* result = nullptr) {
  SelectionScratch scratch;
  std::vector<int32_t> out(imp.size() + 1, -1);
  SelectionResult r = select_clusters(imp.data(), sizes.data(), int64_t(imp.size()), budget, out.data(), scratch);
  if (result) *result = r;
  std::vector<int64_t> chosen(out.begin(), out.begin() + r.count);
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

std::vector<int64_t> naive(const std::vector<float>& imp, const std::vector<int32_t>& sizes, int64_t budget) {
  std::vector<double> importance(imp.begin(), imp.end());
  std::vector<int64_t> s(sizes.begin(), sizes.end()), ids(imp.size());
  std::iota(ids.begin(), ids.end(), int64_t(0));
  return reference::greedy_select(importance, s, ids, budget);
}

TEST(Selection, MatchesSortedGreedyOnRandomInputs) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = int(rng() % 200);
    std::vector<float> imp(static_cast<size_t>(n));
    std::vector<int32_t> sizes(static_cast<size_t>(n));
    const int shape = trial % 4;
    for (int i = 0; i < n; ++i) {
      // Importances with many exact ties (shape 1), sizes from tiny to huge and skewed.
      imp[size_t(i)] = shape == 1 ? float(rng() % 5) : std::uniform_real_distribution<float>(0, 1)(rng);
      sizes[size_t(i)] = shape == 2 ? int32_t(1 + rng() % 3)
                         : shape == 3 ? int32_t(rng() % 4 == 0 ? 200 + rng() % 800 : rng() % 20)
                                      : int32_t(rng() % 64);
    }
    const int64_t budget = int64_t(rng() % 600);
    SelectionResult r;
    const auto got = run(imp, sizes, budget, &r);
    const auto want = naive(imp, sizes, budget);
    ASSERT_EQ(got, want) << "trial " << trial << " n " << n << " budget " << budget;
    int64_t tokens = 0;
    for (int64_t i : got) tokens += sizes[size_t(i)];
    EXPECT_EQ(r.tokens, tokens);
    EXPECT_LE(tokens, budget);
    // Filled: no unselected cluster would still fit.
    for (int i = 0; i < n; ++i) {
      if (!std::binary_search(got.begin(), got.end(), int64_t(i))) {
        EXPECT_GT(sizes[size_t(i)], budget - tokens);
      }
    }
  }
}

TEST(Selection, SkipsAClusterThatDoesNotFitAndFillsTheBudget) {
  // The most important cluster is too big: a stop-at-first-misfit rule would select nothing.
  std::vector<float> imp = {0.9f, 0.5f, 0.4f, 0.3f, 0.2f};
  std::vector<int32_t> sizes = {500, 60, 50, 40, 8};
  EXPECT_EQ(run(imp, sizes, 128), (std::vector<int64_t>{1, 2, 4}));  // 60 + 50 + 8; 40 no longer fits
  EXPECT_EQ(run(imp, sizes, 1000), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(run(imp, sizes, 0), (std::vector<int64_t>{}));
  EXPECT_EQ(run(imp, sizes, 7), (std::vector<int64_t>{}));
  EXPECT_EQ(run(imp, sizes, 8), (std::vector<int64_t>{4}));
}

TEST(Selection, TiesGoToTheLowerIndexAndEmptyInputWorks) {
  std::vector<float> imp(6, 1.0f);
  std::vector<int32_t> sizes(6, 10);
  EXPECT_EQ(run(imp, sizes, 35), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(run({}, {}, 100), (std::vector<int64_t>{}));
}

TEST(Selection, RejectsNegativeSizesAndBudget) {
  SelectionScratch scratch;
  int32_t out[2];
  float imp[2] = {1, 2};
  int32_t bad[2] = {1, -3};
  EXPECT_THROW(select_clusters(imp, bad, 2, 10, out, scratch), Error);
  int32_t ok[2] = {1, 3};
  EXPECT_THROW(select_clusters(imp, ok, 2, -1, out, scratch), Error);
}

TEST(Selection, LargeSortedInputMatchesTheNaiveRule) {
  // 100K clusters already in order and sizes 1..32: nothing degenerates (e.g. quadratic rounds,
  // which would show as a slow test, not a failure) and the picks equal the naive rule's.
  std::mt19937 rng(3);
  const int n = 100000;
  std::vector<float> imp(n);
  std::vector<int32_t> sizes(n);
  for (int i = 0; i < n; ++i) {
    imp[i] = float(n - i);  // already sorted: bad for naive pivots
    sizes[i] = int32_t(1 + rng() % 32);
  }
  const auto got = run(imp, sizes, 5000);
  EXPECT_EQ(got, naive(imp, sizes, 5000));
}

}  // namespace
