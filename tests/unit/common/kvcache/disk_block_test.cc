// Tests for common/kvcache/disk_block: the disk tier's block file header round-trips, and
// every way a file can be wrong is told apart (not ours, another model or geometry, a
// hash that does not follow from its parent).
#include "common/kvcache/disk_block.h"

#include <numeric>
#include <string>

#include "common/kvcache/block_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

using ::testing::HasSubstr;

DiskBlockIdentity Id() {
  DiskBlockIdentity id;
  id.model_id = "tiny-llama";
  id.layout.dtype = kernels::DType::kBF16;
  id.layout.num_layers = 3;
  id.layout.block_size = 4;
  id.layout.num_kv_heads = 2;
  id.layout.head_dim = 8;
  return id;
}

DiskBlockHeader Chained() {
  DiskBlockHeader h;
  h.parent = 0x1234;
  h.tokens = {5, 6, 7, 8};
  h.hash = ChainHash(*h.parent, h.tokens);
  h.checksum = 0xfeed;
  return h;
}

TEST(DiskBlockTest, HeaderRoundTrips) {
  const DiskBlockIdentity id = Id();
  for (bool root : {false, true}) {
    DiskBlockHeader h = Chained();
    if (root) {
      h.parent.reset();
      h.hash = 99;  // a first block's hash depends on the salt: not checked
    }
    absl::StatusOr<std::string> bytes = EncodeDiskBlockHeader(id, h);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(bytes->size(), DiskBlockHeaderBytes(id));
    absl::StatusOr<DiskBlockHeader> back = DecodeDiskBlockHeader(id, *bytes + "data follows");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->hash, h.hash);
    EXPECT_EQ(back->parent, h.parent);
    EXPECT_EQ(back->tokens, h.tokens);
    EXPECT_EQ(back->checksum, h.checksum);
  }
}

TEST(DiskBlockTest, WrongTokenCountIsInvalid) {
  DiskBlockHeader h = Chained();
  h.tokens.pop_back();
  EXPECT_EQ(EncodeDiskBlockHeader(Id(), h).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DiskBlockTest, AnotherModelOrGeometryIsFailedPrecondition) {
  const std::string bytes = *EncodeDiskBlockHeader(Id(), Chained());
  DiskBlockIdentity other = Id();
  other.model_id = "other";
  absl::Status st = DecodeDiskBlockHeader(other, bytes).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("tiny-llama"));
  other = Id();
  other.layout.dtype = kernels::DType::kF16;
  EXPECT_EQ(DecodeDiskBlockHeader(other, bytes).status().code(),
            absl::StatusCode::kFailedPrecondition);
  other = Id();
  other.layout.num_kv_heads = 4;
  EXPECT_EQ(DecodeDiskBlockHeader(other, bytes).status().code(),
            absl::StatusCode::kFailedPrecondition);
  other = Id();
  other.layout.block_size = 8;  // a different header size too
  EXPECT_FALSE(DecodeDiskBlockHeader(other, bytes).ok());
}

TEST(DiskBlockTest, DamagedHeadersAreInvalid) {
  const DiskBlockIdentity id = Id();
  const std::string good = *EncodeDiskBlockHeader(id, Chained());
  EXPECT_EQ(DecodeDiskBlockHeader(id, good.substr(0, 20)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeDiskBlockHeader(id, good.substr(0, good.size() - 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (size_t i = 0; i < good.size(); ++i) {  // every single flipped bit is caught
    std::string bad = good;
    bad[i] ^= 0x10;
    EXPECT_FALSE(DecodeDiskBlockHeader(id, bad).ok()) << "byte " << i;
  }
}

TEST(DiskBlockTest, HashThatDoesNotFollowFromParentIsDataLoss) {
  DiskBlockHeader h = Chained();
  h.hash ^= 1;
  const std::string bytes = *EncodeDiskBlockHeader(Id(), h);
  EXPECT_EQ(DecodeDiskBlockHeader(Id(), bytes).status().code(), absl::StatusCode::kDataLoss);
}

TEST(DiskBlockTest, FileNames) {
  EXPECT_EQ(DiskBlockFileName(0xabc), "0000000000000abc.kvb");
  EXPECT_EQ(ParseDiskBlockFileName("0000000000000abc.kvb"), 0xabcu);
  EXPECT_EQ(ParseDiskBlockFileName(DiskBlockFileName(~0ull)), ~0ull);
  EXPECT_FALSE(ParseDiskBlockFileName("0000000000000abc.tmp").has_value());
  EXPECT_FALSE(ParseDiskBlockFileName("000000000000ABCD.kvb").has_value());
  EXPECT_FALSE(ParseDiskBlockFileName("abc.kvb").has_value());
}

}  // namespace
}  // namespace kvrelay::kvcache
