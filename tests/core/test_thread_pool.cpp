#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "multipole/core/thread_pool.hpp"

using multipole::ThreadPool;

TEST(ThreadPool, RunsEveryTaskOnce) {
  ThreadPool pool(3);
  for (int round = 0; round < 50; ++round) {
    std::vector<std::atomic<int>> hits(257);
    pool.parallel_for(257, [&](int64_t t, int thread) {
      ASSERT_GE(thread, 0);
      ASSERT_LT(thread, pool.size());
      hits[t]++;
    });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
}

TEST(ThreadPool, RethrowsTaskErrors) {
  ThreadPool pool(2);
  EXPECT_THROW(pool.parallel_for(10, [](int64_t t, int) { if (t == 7) throw std::runtime_error("x"); }),
               std::runtime_error);
  std::atomic<int> n{0};
  pool.parallel_for(5, [&](int64_t, int) { n++; });
  EXPECT_EQ(n.load(), 5);
}
