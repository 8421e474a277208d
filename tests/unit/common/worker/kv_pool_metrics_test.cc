#include "common/worker/kv_pool_metrics.h"

#include <memory>

#include "common/kvcache/block_hash.h"
#include "gtest/gtest.h"
#include "tests/testing/metric_values.h"

namespace kvrelay::worker {
namespace {

using testing::Metric;

TEST(KvPoolMetricsTest, BlocksByStateAndEvictionsFollowThePool) {
  kvcache::PrefixCache::Options options;
  options.num_blocks = 4;
  options.block_size = 2;
  auto cache = kvcache::PrefixCache::Create(options);
  ASSERT_TRUE(cache.ok()) << cache.status();
  prometheus::Registry registry;
  KvPoolMetrics metrics(registry, "sequences");
  metrics.Update((*cache)->counts());
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "free"}}), 4);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "cached_free"}}), 0);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_evictions_total"), 0);  // present before any

  // Three cached blocks, released: cached-free.
  const uint64_t root = kvcache::RootHash("m", "");
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6};
  const std::vector<uint64_t> hashes = kvcache::BlockHashes(root, tokens, 2);
  auto blocks = (*cache)->Allocate(3);
  ASSERT_TRUE(blocks.ok());
  metrics.Update((*cache)->counts());
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "in_use"}}), 3);
  (*cache)->Store(std::nullopt, *blocks, hashes, tokens);
  (*cache)->Release(*blocks);
  metrics.Update((*cache)->counts());
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "free"}}), 1);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "cached_free"}}), 3);

  // Three new blocks: one free, two evicted; counted once however often Update runs.
  auto more = (*cache)->Allocate(3);
  ASSERT_TRUE(more.ok());
  metrics.Update((*cache)->counts());
  metrics.Update((*cache)->counts());
  EXPECT_EQ(Metric(registry, "kvrelay_kv_evictions_total"), 2);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "in_use"}}), 3);
  EXPECT_EQ(Metric(registry, "kvrelay_kv_blocks", {{"state", "cached_free"}}), 1);
  (*cache)->Release(*more);
}

}  // namespace
}  // namespace kvrelay::worker
