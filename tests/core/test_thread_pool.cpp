#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <stdexcept>
#include <vector>

#define MULTIPOLE_DEFINE_ALLOCATION_COUNTER
#include "allocation_counter.hpp"
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

// A loop body that captures more than std::function stores inline (here 5 references)
// still runs without a heap allocation: decode runs hundreds of these loops per token.
TEST(ThreadPool, LoopDoesNotAllocate) {
#ifndef MULTIPOLE_COUNT_ALLOCATIONS
  GTEST_SKIP() << "allocation counting is off under ASan";
#else
  ThreadPool pool(2);
  std::vector<std::atomic<int>> hits(64);
  int64_t a = 1, b = 2, c = 3, d = 4;
  auto body = [&](int64_t t, int) { hits[size_t(t)] += int(a + b + c + d); };
  pool.parallel_for(64, body);  // warm
  multipole::test::allocations = 0;
  multipole::test::counting = true;
  for (int round = 0; round < 10; ++round) pool.parallel_for(64, body);
  multipole::test::counting = false;
  EXPECT_EQ(multipole::test::allocations.load(), 0);
  for (auto& h : hits) EXPECT_EQ(h.load(), 11 * 10);
  // The counter works: a std::function holding the same body allocates.
  multipole::test::allocations = 0;
  multipole::test::counting = true;
  auto* heavy = new std::function<void(int64_t, int)>(body);
  multipole::test::counting = false;
  delete heavy;
  EXPECT_GE(multipole::test::allocations.load(), 2);
#endif
}
