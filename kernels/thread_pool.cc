#include "kernels/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <string>
#include <system_error>

namespace kvrelay::kernels {

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads_ = std::max(1, num_threads);
  for (int i = 1; i < num_threads_; ++i) {
    try {
      workers_.emplace_back([this] { WorkerLoop(); });
    } catch (const std::system_error&) {
      // The system would not give us another thread: run with those we have.
      num_threads_ = i;
      break;
    }
    const std::string name = "kvr-pool-" + std::to_string(i);
    pthread_setname_np(workers_.back().native_handle(), name.c_str());
  }
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (auto& t : workers_) t.join();
}

void ThreadPool::RunChunks(const std::function<void(int64_t, int64_t)>& fn, int64_t n,
                           int64_t chunk) {
  for (;;) {
    const int64_t begin = next_.fetch_add(chunk, std::memory_order_relaxed);
    if (begin >= n) break;
    fn(begin, std::min(n, begin + chunk));
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n, chunk;
    {
      absl::MutexLock lock(&mu_);
      const auto ready = [this, &seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || generation_ != seen;
      };
      mu_.Await(absl::Condition(&ready));
      if (stop_) return;
      seen = generation_;
      fn = fn_;
      n = n_;
      chunk = chunk_;
    }
    RunChunks(*fn, n, chunk);
    absl::MutexLock lock(&mu_);
    --active_workers_;
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_chunk,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  // A few chunks per thread: enough to balance a loaded machine, few enough to be cheap.
  const int64_t chunk = std::max(min_chunk, (n + num_threads_ * 4 - 1) / (num_threads_ * 4));
  if (num_threads_ == 1 || n <= chunk) {
    fn(0, n);
    return;
  }
  absl::MutexLock call_lock(&call_mu_);
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    next_.store(0, std::memory_order_relaxed);
    active_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  RunChunks(fn, n, chunk);
  absl::MutexLock lock(&mu_);
  const auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return active_workers_ == 0; };
  mu_.Await(absl::Condition(&done));
  fn_ = nullptr;
}

}  // namespace kvrelay::kernels
