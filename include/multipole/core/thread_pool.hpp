#pragma once
// A fixed pool of worker threads for data-parallel loops. The calling thread takes part,
// so a pool of n threads starts n-1 workers. parallel_for does not allocate. Idle threads
// spin briefly before they sleep, so back-to-back loops (a decode step) skip the futex.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace multipole {

class ThreadPool {
 public:
  // threads <= 0: one per hardware thread.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Runs fn(task, thread) for task in [0, tasks); thread in [0, size()) identifies the
  // executing thread (for per-thread scratch). Tasks are handed out dynamically.
  // Exceptions thrown by fn are rethrown (the first one) after all tasks finish.
  // fn is held by reference: the std::function the workers call wraps one pointer, which
  // it stores inline, so no call allocates whatever fn captures.
  template <class Fn>
  void parallel_for(int64_t tasks, Fn&& fn) {
    run(tasks, [&fn](int64_t task, int thread) { fn(task, thread); });
  }

 private:
  void run(int64_t tasks, const std::function<void(int64_t task, int thread)>& fn);
  void worker_loop(int thread);
  void run_tasks(int thread);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> busy_{0};             // workers still in the current loop
  std::atomic<uint64_t> generation_{0};  // bumped once per parallel_for
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;
  std::mutex error_mutex_;
};

}  // namespace multipole
