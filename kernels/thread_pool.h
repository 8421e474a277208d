// The CPU thread pool the ops run on. ParallelFor splits [0, n) into contiguous
// chunks; the caller's thread takes part. Work partitioning never changes what an
// op computes per element, so results do not depend on the number of threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvrelay::kernels {

class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency(). Workers are named
  // "kvr-pool-<i>"; the caller of ParallelFor is the remaining thread.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) over disjoint chunks covering [0, n), each at least
  // `min_chunk` long (except the last), and returns when all are done. Concurrent
  // callers are serialised. Not reentrant: fn must not call ParallelFor on this pool.
  void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop();
  void RunChunks(const std::function<void(int64_t, int64_t)>& fn, int64_t n, int64_t chunk);

  int num_threads_;
  std::vector<std::thread> workers_;
  absl::Mutex call_mu_;  // held for a whole ParallelFor; serialises callers
  absl::Mutex mu_;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int active_workers_ ABSL_GUARDED_BY(mu_) = 0;
  const std::function<void(int64_t, int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t n_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t chunk_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int64_t> next_{0};  // next unclaimed index of the current job
};

}  // namespace kvrelay::kernels
