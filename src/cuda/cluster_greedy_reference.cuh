#pragma once
// The one-launch step's greedy rule (cluster_greedy.cuh) on the host: the reference of the CUDA
// tests and the selection labs, kept out of the kernels' header.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "cuda/cluster_greedy.cuh"

namespace multipole::cuda::detail::cluster_step {

// The rule on the host, the reference of the tests and the labs: keys[0, n) (pick_key's, 0 for
// none) in decreasing order, each taken when its size fits the room left of `budget`. Returns the
// taken keys' indices as bits ((n + 31) / 32 words) and their count.
inline std::pair<std::vector<uint32_t>, int> host_greedy(const unsigned long long* keys, int n, int budget) {
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] > keys[b]; });
  std::vector<uint32_t> bits(size_t(n + 31) / 32, 0u);
  int room = budget, picks = 0;
  for (const int i : order) {
    const unsigned long long k = keys[i];
    if (k == 0 || key_size(k) > room) continue;
    const int j = key_index(k);
    bits[size_t(j / 32)] |= 1u << (j % 32);
    room -= key_size(k), ++picks;
  }
  return {bits, picks};
}

}  // namespace multipole::cuda::detail::cluster_step
