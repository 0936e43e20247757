#pragma once
// Budgeted cluster selection shared by the CPU policy and the CUDA port: clusters are taken
// greedily in decreasing importance (ties: lower index first); a cluster whose size does
// not fit in what is left of the budget is skipped and the next one tried, so the budget is
// filled whenever the clusters allow. Implemented without sorting all clusters (selection.cpp
// proves the equivalence with the greedy over a full sort).
#include <cstdint>
#include <vector>

namespace multipole {

struct SelectionScratch {
  std::vector<int32_t> items;  // [n]
};

struct SelectionResult {
  int64_t count = 0;   // clusters selected
  int64_t tokens = 0;  // sum of their sizes, <= budget
};

// Greedy-with-skip selection under `budget` tokens.
//   importance: [n] finite
//   sizes:      [n] >= 0 (tokens per cluster)
//   selected:   [n] out; the first `count` entries are the chosen indices, in no particular order
SelectionResult select_clusters(const float* importance, const int32_t* sizes, int64_t n, int64_t budget,
                                int32_t* selected, SelectionScratch& scratch);

}  // namespace multipole
