#include "attention/selection.hpp"

#include <utility>

#include "multipole/core/error.hpp"

namespace multipole {

// Why this equals the greedy over a full sort. Order the candidates by (importance desc,
// index asc); greedy-with-skip walks that order with remaining budget R and takes a cluster
// iff its size <= R.
//  1. Let P be the longest prefix whose sizes sum to <= R. Greedy takes all of P (each fits
//     in turn) and then meets b, the element after P, with R' = R - sum(P) < size(b): b is
//     skipped.
//  2. From then on the remaining budget never exceeds R', since it only shrinks. Any later
//     cluster with size > R' can never fit, so greedy skips it whatever its place; dropping
//     those clusters does not change what greedy takes.
//  3. So greedy on the whole order = P followed by greedy, with budget R', on the clusters
//     after b whose size is <= R' (in the same relative order). That is a smaller instance
//     of the same problem: repeat. Each round drops at least b, so it terminates; when the
//     longest fitting prefix is everything, greedy takes everything left.
// P is found without sorting by a weighted quickselect: partition around a pivot; if the
// part before the pivot overflows R the prefix ends inside it, otherwise take that part
// (and the pivot, if it fits) and continue after it. Expected O(n) per round.
SelectionResult select_clusters(const float* importance, const int32_t* sizes, int64_t n, int64_t budget,
                                int32_t* selected, SelectionScratch& scratch) {
  MP_CHECK(n >= 0 && budget >= 0, "select_clusters: {} clusters and budget {} must be >= 0", n, budget);
  auto before = [importance](int32_t a, int32_t b) {
    return importance[a] > importance[b] || (importance[a] == importance[b] && a < b);
  };
  if (scratch.items.size() < size_t(n)) scratch.items.resize(size_t(n));
  int32_t* items = scratch.items.data();
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    MP_CHECK(sizes[i] >= 0, "select_clusters: cluster {} has size {}", i, sizes[i]);
    if (sizes[i] <= budget) items[m++] = int32_t(i);
  }
  SelectionResult result;
  int64_t remaining = budget;
  while (m > 0) {
    int64_t lo = 0, hi = m, acc = 0;
    // Invariant: items[0, lo) are the top-lo of the order and fit (acc = their sizes);
    // items[lo, hi) come next; items[hi] (hi < m) is the immediate successor of [0, hi).
    while (lo < hi) {
      // Median of three as pivot, moved to hi - 1.
      int64_t mid = lo + (hi - lo) / 2;
      int64_t a = lo, b = mid, c = hi - 1;
      if (before(items[b], items[a])) std::swap(a, b);
      if (before(items[c], items[b])) {
        b = c;
        if (before(items[b], items[a])) b = a;
      }
      std::swap(items[b], items[hi - 1]);
      const int32_t pivot = items[hi - 1];
      int64_t p = lo, part = 0;
      for (int64_t j = lo; j < hi - 1; ++j)
        if (before(items[j], pivot)) {
          part += sizes[items[j]];
          std::swap(items[p++], items[j]);
        }
      std::swap(items[p], items[hi - 1]);
      if (acc + part > remaining) {
        hi = p;  // the prefix ends before the pivot, which is now the successor
      } else if (acc + part + sizes[pivot] > remaining) {
        acc += part;
        lo = hi = p;  // the pivot is the first cluster that does not fit
      } else {
        acc += part + sizes[pivot];
        lo = p + 1;
      }
    }
    for (int64_t i = 0; i < lo; ++i) selected[result.count++] = items[i];
    result.tokens += acc;
    remaining -= acc;
    if (lo == m) break;
    // Drop the blocking cluster items[lo] and every later one that can no longer fit.
    int64_t kept = 0;
    for (int64_t i = lo + 1; i < m; ++i)
      if (sizes[items[i]] <= remaining) items[kept++] = items[i];
    m = kept;
  }
  return result;
}

}  // namespace multipole
