#include "kernels/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace kvrelay::kernels {
namespace {

// Runs one ParallelFor and checks its contract: every index in [0, n) visited exactly once,
// chunks disjoint and contiguous, each at least min_chunk long except one (the last).
void CheckCoverage(ThreadPool& pool, int64_t n, int64_t min_chunk) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  for (auto& h : hits) h.store(0);
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  pool.ParallelFor(n, min_chunk, [&](int64_t b, int64_t e) {
    ASSERT_LE(0, b);
    ASSERT_LT(b, e);
    ASSERT_LE(e, n);
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
    std::lock_guard<std::mutex> lock(mu);
    chunks.emplace_back(b, e);
  });
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1)
        << "index " << i << " n=" << n << " min_chunk=" << min_chunk
        << " threads=" << pool.num_threads();
  }
  if (n == 0) {
    EXPECT_TRUE(chunks.empty());
    return;
  }
  std::sort(chunks.begin(), chunks.end());
  EXPECT_EQ(chunks.front().first, 0);
  EXPECT_EQ(chunks.back().second, n);
  const int64_t mc = std::max<int64_t>(1, min_chunk);
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (c + 1 < chunks.size()) {
      EXPECT_EQ(chunks[c].second, chunks[c + 1].first);
      EXPECT_GE(chunks[c].second - chunks[c].first, mc)
          << "short chunk not last; n=" << n << " min_chunk=" << min_chunk;
    }
  }
}

class ThreadPoolTest : public ::testing::TestWithParam<int> {};

TEST_P(ThreadPoolTest, ReportsThreadCount) {
  ThreadPool pool(GetParam());
  EXPECT_EQ(pool.num_threads(), GetParam());
}

TEST_P(ThreadPoolTest, CoversRangeExactlyOnce) {
  ThreadPool pool(GetParam());
  for (int64_t n : {0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 100, 127, 1000, 4097}) {
    for (int64_t min_chunk : {-3, 0, 1, 2, 3, 4, 7, 16, 64, 1000, 5000}) {
      CheckCoverage(pool, n, min_chunk);
    }
  }
}

TEST_P(ThreadPoolTest, ZeroAndNegativeNDoNotCallFn) {
  ThreadPool pool(GetParam());
  int calls = 0;
  pool.ParallelFor(0, 1, [&](int64_t, int64_t) { ++calls; });
  pool.ParallelFor(-5, 1, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST_P(ThreadPoolTest, ManySmallCallsDoNotDeadlock) {
  ThreadPool pool(GetParam());
  std::atomic<int64_t> total{0};
  int64_t want = 0;
  for (int i = 0; i < 10000; ++i) {
    const int64_t n = 1 + i % 37;
    want += n * (n - 1) / 2;
    pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
      int64_t s = 0;
      for (int64_t j = b; j < e; ++j) s += j;
      total.fetch_add(s);
    });
  }
  EXPECT_EQ(total.load(), want);
}

TEST_P(ThreadPoolTest, ConcurrentCallersAreSerializedCorrectly) {
  ThreadPool pool(GetParam());
  constexpr int kIters = 500;
  constexpr int64_t kN = 257;
  auto caller = [&](int id, std::vector<int64_t>* sums) {
    std::vector<int> hits(kN);
    for (int it = 0; it < kIters; ++it) {
      std::fill(hits.begin(), hits.end(), 0);
      std::atomic<int64_t> sum{0};
      pool.ParallelFor(kN, 1, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          ++hits[static_cast<size_t>(j)];  // each index is owned by exactly one chunk
          sum.fetch_add(j * (id + 1));
        }
      });
      for (int64_t j = 0; j < kN; ++j) ASSERT_EQ(hits[static_cast<size_t>(j)], 1);
      sums->push_back(sum.load());
    }
  };
  std::vector<int64_t> s0, s1;
  std::thread t0(caller, 0, &s0);
  std::thread t1(caller, 1, &s1);
  t0.join();
  t1.join();
  ASSERT_EQ(s0.size(), static_cast<size_t>(kIters));
  ASSERT_EQ(s1.size(), static_cast<size_t>(kIters));
  const int64_t base = kN * (kN - 1) / 2;
  for (int i = 0; i < kIters; ++i) {
    EXPECT_EQ(s0[i], base);
    EXPECT_EQ(s1[i], 2 * base);
  }
}

TEST_P(ThreadPoolTest, UsesCallerThreadAndAtMostNumThreads) {
  ThreadPool pool(GetParam());
  std::mutex mu;
  std::set<std::thread::id> ids;
  for (int i = 0; i < 50; ++i) {
    pool.ParallelFor(1000, 1, [&](int64_t, int64_t) {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
  }
  EXPECT_LE(ids.size(), static_cast<size_t>(GetParam()));
  if (GetParam() == 1) {
    EXPECT_EQ(ids.count(std::this_thread::get_id()), 1u);
  }
}

TEST_P(ThreadPoolTest, DestroyWithIdleWorkers) {
  // Never used.
  { ThreadPool pool(GetParam()); }
  // Used, then idle.
  for (int i = 0; i < 20; ++i) {
    auto pool = std::make_unique<ThreadPool>(GetParam());
    std::atomic<int64_t> count{0};
    pool->ParallelFor(100, 1, [&](int64_t b, int64_t e) { count.fetch_add(e - b); });
    EXPECT_EQ(count.load(), 100);
    pool.reset();
  }
  SUCCEED();
}

INSTANTIATE_TEST_SUITE_P(Threads, ThreadPoolTest, ::testing::Values(1, 2, 3, 8),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "T" + std::to_string(info.param);
                         });

TEST(ThreadPoolDefaultTest, NonPositiveMeansHardwareConcurrency) {
  ThreadPool pool(0);
  EXPECT_GE(pool.num_threads(), 1);
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  if (hw > 0) {
    EXPECT_EQ(pool.num_threads(), hw);
  }
  CheckCoverage(pool, 1000, 1);
  ThreadPool neg(-1);
  EXPECT_GE(neg.num_threads(), 1);
}

}  // namespace
}  // namespace kvrelay::kernels
