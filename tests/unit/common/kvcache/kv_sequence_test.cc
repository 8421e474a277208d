#include "common/kvcache/kv_sequence.h"

#include <numeric>
#include <vector>

#include "common/kvcache/block_hash.h"
#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

std::unique_ptr<PrefixCache> Cache(int64_t blocks, int block_size = 4) {
  PrefixCache::Options o;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.incarnation = 7;
  return std::move(*PrefixCache::Create(o));
}

std::vector<int32_t> Tokens(int n, int32_t first = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Runs one sequence as the engine does: reuse, reserve, "compute", commit; returns
// the number of reused tokens.
int64_t RunSeq(PrefixCache* cache, uint64_t root, const std::vector<int32_t>& tokens) {
  KvSequence seq(cache, root);
  const int64_t cached = seq.AcquirePrefix(tokens);
  EXPECT_TRUE(seq.Reserve(static_cast<int64_t>(tokens.size())).ok());
  seq.Commit(tokens, static_cast<int64_t>(tokens.size()));
  return cached;
}

TEST(KvSequenceTest, SecondRunReusesFullBlocksButNeverTheLastToken) {
  auto cache = Cache(32);
  const uint64_t root = RootHash("m", "");
  EXPECT_EQ(RunSeq(cache.get(), root, Tokens(10)), 0);
  EXPECT_EQ(cache->counts().cached, 2);  // blocks [0,4) and [4,8); 2 tokens uncached
  EXPECT_EQ(cache->counts().in_use, 0);
  EXPECT_EQ(RunSeq(cache.get(), root, Tokens(10)), 8);
  // 12 tokens = 3 full blocks: the last block is recomputed for the logits.
  EXPECT_EQ(RunSeq(cache.get(), root, Tokens(12)), 8);
  EXPECT_EQ(RunSeq(cache.get(), root, Tokens(13)), 12);
  // A longer prompt sharing the first 6 tokens reuses one block.
  std::vector<int32_t> other = Tokens(6);
  for (int i = 0; i < 10; ++i) other.push_back(900 + i);
  EXPECT_EQ(RunSeq(cache.get(), root, other), 4);
  EXPECT_TRUE(cache->Validate().ok());
}

TEST(KvSequenceTest, OtherRootsNeverHit) {
  auto cache = Cache(32);
  RunSeq(cache.get(), RootHash("m", ""), Tokens(20));
  EXPECT_EQ(RunSeq(cache.get(), RootHash("m", "tenant"), Tokens(20)), 0);
  EXPECT_EQ(RunSeq(cache.get(), RootHash("other-model", ""), Tokens(20)), 0);
  EXPECT_EQ(RunSeq(cache.get(), RootHash("m", ""), Tokens(20)), 16);
}

TEST(KvSequenceTest, GrowsInPlaceAndCommitsAsBlocksFill) {
  auto cache = Cache(16);
  const uint64_t root = RootHash("m", "");
  std::vector<int32_t> tokens = Tokens(5);
  KvSequence seq(cache.get(), root);
  EXPECT_EQ(seq.AcquirePrefix(tokens), 0);
  ASSERT_TRUE(seq.Reserve(5).ok());
  seq.Commit(tokens, 5);
  EXPECT_EQ(cache->counts().cached, 1);
  for (int step = 0; step < 11; ++step) {  // decode: one token at a time
    tokens.push_back(500 + step);
    ASSERT_TRUE(seq.Reserve(static_cast<int64_t>(tokens.size())).ok());
    seq.Commit(tokens, static_cast<int64_t>(tokens.size()));
  }
  EXPECT_EQ(seq.blocks(), (std::vector<int32_t>{0, 1, 2, 3}));  // one contiguous run
  EXPECT_EQ(cache->counts().cached, 4);
  EXPECT_EQ(seq.hashes(), BlockHashes(root, tokens, 4));
  // Still held: nothing is cached-free yet, and lookup already sees all 4 blocks.
  EXPECT_EQ(cache->counts().in_use, 4);
  EXPECT_EQ(cache->Lookup(seq.hashes(), tokens), 4);
}

TEST(KvSequenceTest, HeldBlocksAreNeverEvicted) {
  auto cache = Cache(4);
  const uint64_t root = RootHash("m", "");
  KvSequence holder(cache.get(), root);
  const std::vector<int32_t> a = Tokens(8);
  holder.AcquirePrefix(a);
  ASSERT_TRUE(holder.Reserve(8).ok());
  holder.Commit(a, 8);
  // 2 blocks held; a request for 3 more fails and changes nothing.
  KvSequence other(cache.get(), root);
  const std::vector<int32_t> b = Tokens(12, 7000);
  other.AcquirePrefix(b);
  absl::Status s = other.Reserve(12);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_TRUE(other.blocks().empty());
  EXPECT_EQ(cache->Lookup(holder.hashes(), a), 2);
  // 2 blocks fit.
  EXPECT_TRUE(other.Reserve(8).ok());
  EXPECT_EQ(cache->counts().free, 0);
}

TEST(KvSequenceTest, SmallPoolKeepsServingByEvictingIdleBlocks) {
  auto cache = Cache(6);
  const uint64_t root = RootHash("m", "");
  for (int r = 0; r < 50; ++r) {
    const std::vector<int32_t> t = Tokens(17, 1000 * (r % 7));
    KvSequence seq(cache.get(), root);
    seq.AcquirePrefix(t);
    ASSERT_TRUE(seq.Reserve(17).ok()) << r;
    seq.Commit(t, 17);
    ASSERT_TRUE(cache->Validate().ok());
  }
  EXPECT_EQ(cache->counts().in_use, 0);
  EXPECT_LE(cache->counts().cached, 6);
}

TEST(KvSequenceTest, DestructorReleasesEverything) {
  auto cache = Cache(8);
  {
    KvSequence seq(cache.get(), RootHash("m", ""));
    const std::vector<int32_t> t = Tokens(10);
    seq.AcquirePrefix(t);
    ASSERT_TRUE(seq.Reserve(30).ok());
    seq.Commit(t, 10);
    EXPECT_EQ(cache->counts().in_use, 8);
  }
  const PrefixCacheCounts c = cache->counts();
  EXPECT_EQ(c.in_use, 0);
  EXPECT_EQ(c.cached_free, 2);
  EXPECT_EQ(c.free, 6);
}

}  // namespace
}  // namespace kvrelay::kvcache
