// Tests for common/worker/kv_store: the pool a worker allocates in transport memory, its
// cache, the flags' errors, and what the worker exports to peers: exactly the pool.
#include "common/worker/kv_store.h"

#include <string>

#include "common/transfer/local/local_transport.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "common/worker/model_runtime.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::worker {
namespace {

using ::testing::HasSubstr;

ModelRuntime Tiny() {
  absl::StatusOr<ModelRuntime> r =
      LoadModelRuntime(testing::ModelDir(testing::TinyVariants().front()), "cpu", 1);
  EXPECT_TRUE(r.ok()) << r.status();
  return *std::move(r);
}

// The descriptor peers get names the pool's bytes and no byte more.
void ExpectExportsExactlyThePool(const KvStore& s, int64_t blocks) {
  const transfer::PoolDescriptor& d = s.memory->descriptor();
  EXPECT_EQ(s.pool->num_blocks(), blocks);
  EXPECT_EQ(d.num_blocks, blocks);
  EXPECT_EQ(d.bytes, d.block_bytes * static_cast<uint64_t>(blocks));
  EXPECT_EQ(d.bytes, s.pool->bytes());
  EXPECT_EQ(d.bytes, s.memory->size());
  EXPECT_EQ(d.base_address, reinterpret_cast<uint64_t>(s.memory->data()));
  EXPECT_EQ(s.cache->num_blocks(), blocks);
}

TEST(KvStoreTest, UcxExportsExactlyThePool) {
  ModelRuntime r = Tiny();
  absl::StatusOr<std::unique_ptr<transfer::KvTransport>> ucx = transfer::NewUcxTransport();
  ASSERT_TRUE(ucx.ok()) << ucx.status();
  KvStoreOptions o;
  o.kv_blocks = 37;
  absl::StatusOr<KvStore> s = CreateKvStore(**ucx, *r.model, o);
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectExportsExactlyThePool(*s, 37);
  EXPECT_FALSE(s->memory->descriptor().rkey.empty());  // a key for this region only
}

TEST(KvStoreTest, KvBytesRoundsDownToWholeBlocks) {
  ModelRuntime r = Tiny();
  std::unique_ptr<transfer::KvTransport> local = transfer::NewLocalTransport();
  KvStoreOptions o;
  o.kv_blocks = 1;
  absl::StatusOr<KvStore> one = CreateKvStore(*local, *r.model, o);
  ASSERT_TRUE(one.ok()) << one.status();
  const uint64_t block = one->memory->descriptor().block_bytes;
  o.kv_blocks = 0;
  o.kv_bytes = 5 * block + block / 2;
  absl::StatusOr<KvStore> s = CreateKvStore(*local, *r.model, o);
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectExportsExactlyThePool(*s, 5);
}

TEST(KvStoreTest, BadSizesNameTheFlag) {
  ModelRuntime r = Tiny();
  std::unique_ptr<transfer::KvTransport> local = transfer::NewLocalTransport();
  KvStoreOptions o;
  o.kv_bytes = 1;
  absl::StatusOr<KvStore> s = CreateKvStore(*local, *r.model, o);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(s.status()));
  EXPECT_THAT(s.status().message(), HasSubstr("--kv-bytes 1 holds no block"));
}

}  // namespace
}  // namespace kvrelay::worker
