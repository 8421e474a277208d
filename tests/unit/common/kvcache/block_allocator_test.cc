#include "common/kvcache/block_allocator.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

BlockAllocator Make(int64_t n) {
  auto a = BlockAllocator::Create(n);
  EXPECT_TRUE(a.ok()) << a.status();
  return std::move(*a);
}

std::vector<int32_t> Alloc(BlockAllocator& a, int64_t n, int32_t hint = -1,
                           std::vector<int32_t>* evicted = nullptr) {
  auto r = a.Allocate(n, hint, evicted);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::vector<int32_t>{};
}

std::vector<int32_t> Range(int32_t start, int32_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

TEST(BlockAllocatorTest, RejectsBadSizes) {
  EXPECT_EQ(BlockAllocator::Create(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BlockAllocator::Create(-3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BlockAllocator::Create(int64_t{1} << 31).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto a = Make(4);
  EXPECT_EQ(a.Allocate(-1, -1, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(a.Allocate(0, -1, nullptr)->empty());
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, FreshPoolGivesOneContiguousRun) {
  auto a = Make(64);
  EXPECT_EQ(Alloc(a, 10), Range(0, 10));
  EXPECT_EQ(Alloc(a, 5), Range(10, 5));
  const BlockCounts c = a.counts();
  EXPECT_EQ(c.total, 64);
  EXPECT_EQ(c.in_use, 15);
  EXPECT_EQ(c.free, 49);
  EXPECT_EQ(c.cached_free, 0);
  EXPECT_EQ(a.free_runs(), 1);
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, PrefersTheSmallestRunThatHoldsEverything) {
  auto a = Make(40);
  auto all = Alloc(a, 40);
  // Free runs: [2,5) len 3, [10,18) len 8, [25,31) len 6.
  a.Release(Range(2, 3));
  a.Release(Range(10, 8));
  a.Release(Range(25, 6));
  EXPECT_EQ(a.free_runs(), 3);
  EXPECT_EQ(Alloc(a, 5), Range(25, 5));  // best fit: the 6-run, not the 8-run
  EXPECT_EQ(Alloc(a, 3), Range(2, 3));   // exact fit
  EXPECT_EQ(Alloc(a, 8), Range(10, 8));
  EXPECT_EQ(a.counts().free, 1);
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, HintGrowsASequenceInPlace) {
  auto a = Make(32);
  auto first = Alloc(a, 4);               // 0..3
  auto other = Alloc(a, 4);               // 4..7
  a.Release(other);                       // free: [4,32)
  auto small = Alloc(a, 2, /*hint=*/-1);  // best fit takes 4,5
  EXPECT_EQ(small, Range(4, 2));
  a.Release(small);
  EXPECT_EQ(Alloc(a, 3, /*hint=*/4), Range(4, 3));  // continues block 3
  // A hint that is not the start of a free run is ignored.
  EXPECT_EQ(Alloc(a, 2, /*hint=*/9), Range(7, 2));
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, HintRunShorterThanRequestIsTakenFirst) {
  auto a = Make(20);
  auto all = Alloc(a, 20);
  a.Release(Range(5, 2));   // [5,7)
  a.Release(Range(12, 6));  // [12,18)
  auto got = Alloc(a, 4, /*hint=*/5);
  // 5,6 from the hint run, then the best fit for the remaining 2: [12,14).
  EXPECT_EQ(got, (std::vector<int32_t>{5, 6, 12, 13}));
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, FragmentedPoolServesLongestRunsFirst) {
  auto a = Make(30);
  Alloc(a, 30);
  a.Release(Range(0, 2));
  a.Release(Range(5, 4));
  a.Release(Range(12, 1));
  a.Release(Range(20, 3));
  auto got = Alloc(a, 8);
  EXPECT_EQ(got, (std::vector<int32_t>{5, 6, 7, 8, 20, 21, 22, 0}));
  EXPECT_EQ(a.counts().free, 2);
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, ReleasedNeighboursMergeIntoOneRun) {
  auto a = Make(16);
  auto x = Alloc(a, 16);
  for (int32_t b : {3, 5, 4, 7, 6}) a.Release({b});
  EXPECT_EQ(a.free_runs(), 1);  // [3,8)
  EXPECT_EQ(Alloc(a, 5), Range(3, 5));
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, RefcountsKeepSharedBlocksInUse) {
  auto a = Make(8);
  auto x = Alloc(a, 3);
  a.Ref(x[0]);
  a.Ref(x[0]);
  EXPECT_EQ(a.refcount(x[0]), 3);
  a.Release(x);
  EXPECT_EQ(a.refcount(x[0]), 2);
  EXPECT_EQ(a.refcount(x[1]), 0);
  EXPECT_EQ(a.counts().in_use, 1);
  a.Release({x[0], x[0]});
  EXPECT_EQ(a.counts().in_use, 0);
  EXPECT_EQ(a.counts().free, 8);
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, CachedBlocksBecomeCachedFreeAndTailIsEvictedFirst) {
  auto a = Make(8);
  auto seq = Alloc(a, 4);  // 0..3
  for (int32_t b : seq) a.SetCached(b, true);
  a.Release(seq);  // tail first into the LRU
  EXPECT_EQ(a.LruOrder(), (std::vector<int32_t>{3, 2, 1, 0}));
  EXPECT_EQ(a.counts().cached_free, 4);
  EXPECT_EQ(a.counts().free, 4);

  // Free blocks suffice: nothing evicted.
  std::vector<int32_t> evicted;
  auto four = Alloc(a, 4, -1, &evicted);
  EXPECT_EQ(four, Range(4, 4));
  EXPECT_TRUE(evicted.empty());
  EXPECT_EQ(a.counts().cached_free, 4);

  // Two more: evicts exactly two, tail first.
  auto two = Alloc(a, 2, -1, &evicted);
  EXPECT_EQ(evicted, (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(two.size(), 2u);
  EXPECT_FALSE(a.cached(2));
  EXPECT_FALSE(a.cached(3));
  EXPECT_EQ(a.LruOrder(), (std::vector<int32_t>{1, 0}));
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, RefOnCachedFreeBlockTakesItOutOfTheLru) {
  auto a = Make(4);
  auto x = Alloc(a, 2);
  a.SetCached(x[0], true);
  a.SetCached(x[1], true);
  a.Release(x);
  a.Ref(x[1]);
  EXPECT_EQ(a.LruOrder(), (std::vector<int32_t>{x[0]}));
  EXPECT_EQ(a.counts().in_use, 1);
  EXPECT_EQ(a.counts().cached_free, 1);
  // Only x[0] and the two free blocks are available; x[1] is never evicted.
  std::vector<int32_t> evicted;
  auto got = Alloc(a, 3, -1, &evicted);
  EXPECT_EQ(evicted, (std::vector<int32_t>{x[0]}));
  EXPECT_EQ(std::count(got.begin(), got.end(), x[1]), 0);
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, RefOnFreeBlockCutsItOutOfItsRun) {
  auto a = Make(10);
  a.Ref(4);
  EXPECT_EQ(a.refcount(4), 1);
  EXPECT_EQ(a.free_runs(), 2);  // [0,4) and [5,10)
  EXPECT_EQ(a.counts().free, 9);
  EXPECT_TRUE(a.Validate().ok());
  auto got = Alloc(a, 9);
  EXPECT_EQ(std::count(got.begin(), got.end(), 4), 0);
  a.Release({4});
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, ExhaustionChangesNothing) {
  auto a = Make(6);
  auto x = Alloc(a, 4);
  a.SetCached(x[3], true);
  a.Release({x[3]});  // one cached-free, two free, three in use
  auto r = a.Allocate(4, -1, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("need 4 blocks"), std::string::npos) << r.status();
  const BlockCounts c = a.counts();
  EXPECT_EQ(c.in_use, 3);
  EXPECT_EQ(c.cached_free, 1);
  EXPECT_EQ(c.free, 2);
  EXPECT_TRUE(a.cached(x[3]));
  EXPECT_TRUE(a.Validate().ok());
}

TEST(BlockAllocatorTest, UncachingACachedFreeBlockFreesIt) {
  auto a = Make(4);
  auto x = Alloc(a, 1);
  a.SetCached(x[0], true);
  a.Release(x);
  EXPECT_EQ(a.counts().cached_free, 1);
  a.SetCached(x[0], false);
  EXPECT_EQ(a.counts().cached_free, 0);
  EXPECT_EQ(a.counts().free, 4);
  EXPECT_EQ(a.free_runs(), 1);
  EXPECT_TRUE(a.Validate().ok());
}

// Seeded random operations against a simple model of the expected state; the
// allocator's own invariants are checked after every step.
TEST(BlockAllocatorTest, RandomizedOperationsKeepEveryInvariant) {
  constexpr int32_t kBlocks = 97;
  auto a = Make(kBlocks);
  std::mt19937_64 rng(20261122);
  std::vector<std::vector<int32_t>> held;  // each entry: one reference per block
  std::vector<int32_t> ref(kBlocks, 0);
  std::vector<bool> cached(kBlocks, false);
  int allocs = 0, evictions = 0, exhausted = 0;
  for (int step = 0; step < 100000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    if (op < 4) {  // allocate
      const int64_t n = 1 + static_cast<int64_t>(rng() % 12);
      int64_t available = 0;
      for (int32_t b = 0; b < kBlocks; ++b) available += ref[b] == 0;
      const int32_t hint = rng() % 3 == 0 ? static_cast<int32_t>(rng() % kBlocks) : -1;
      std::vector<int32_t> evicted;
      auto r = a.Allocate(n, hint, &evicted);
      if (n > available) {
        ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << step;
        ASSERT_TRUE(evicted.empty());
        ++exhausted;
      } else {
        ASSERT_TRUE(r.ok()) << step << " " << r.status();
        ASSERT_EQ(static_cast<int64_t>(r->size()), n);
        // Evicts only what was needed, and only cached blocks nobody holds.
        int64_t free_before = 0;
        for (int32_t b = 0; b < kBlocks; ++b) free_before += ref[b] == 0 && !cached[b];
        ASSERT_EQ(static_cast<int64_t>(evicted.size()), std::max<int64_t>(0, n - free_before));
        for (int32_t b : evicted) {
          ASSERT_TRUE(cached[b] && ref[b] == 0) << "evicted block " << b;
          cached[b] = false;
        }
        for (int32_t b : *r) {
          ASSERT_EQ(ref[b], 0) << "block " << b << " handed out twice";
          ASSERT_FALSE(cached[b]) << "cached block " << b << " reused without eviction";
          ref[b] = 1;
        }
        held.push_back(*r);
        ++allocs;
        evictions += static_cast<int>(evicted.size());
      }
    } else if (op < 7 && !held.empty()) {  // release a holder
      const size_t i = rng() % held.size();
      a.Release(held[i]);
      for (int32_t b : held[i]) --ref[b];
      held[i] = std::move(held.back());
      held.pop_back();
    } else if (op < 8 && !held.empty()) {  // cache some held blocks
      const auto& h = held[rng() % held.size()];
      for (int32_t b : h) {
        if (rng() % 2 == 0) {
          a.SetCached(b, true);
          cached[b] = true;
        }
      }
    } else if (op < 9) {  // share a block: in use or cached-free (a prefix hit)
      const int32_t b = static_cast<int32_t>(rng() % kBlocks);
      if (ref[b] > 0 || cached[b]) {
        a.Ref(b);
        ++ref[b];
        held.push_back({b});
      }
    } else {  // uncache a random block
      const int32_t b = static_cast<int32_t>(rng() % kBlocks);
      a.SetCached(b, false);
      cached[b] = false;
    }
    const absl::Status v = a.Validate();
    ASSERT_TRUE(v.ok()) << "step " << step << ": " << v;
    BlockCounts want;
    for (int32_t b = 0; b < kBlocks; ++b) {
      ASSERT_EQ(a.refcount(b), ref[b]) << "step " << step << " block " << b;
      ASSERT_EQ(a.cached(b), cached[b]) << "step " << step << " block " << b;
      if (ref[b] > 0) {
        ++want.in_use;
      } else if (cached[b]) {
        ++want.cached_free;
      } else {
        ++want.free;
      }
    }
    const BlockCounts c = a.counts();
    ASSERT_EQ(c.in_use, want.in_use) << step;
    ASSERT_EQ(c.cached_free, want.cached_free) << step;
    ASSERT_EQ(c.free, want.free) << step;
  }
  // The run exercised every path.
  EXPECT_GT(allocs, 10000);
  EXPECT_GT(evictions, 1000);
  EXPECT_GT(exhausted, 100);
}

}  // namespace
}  // namespace kvrelay::kvcache
