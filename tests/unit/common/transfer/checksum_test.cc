#include "common/transfer/checksum.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "xxhash.h"

namespace kvrelay::transfer {
namespace {

TEST(ChecksumTest, OneXxh3PerBlock) {
  std::vector<uint8_t> pool(4 * 64);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<uint8_t>(i * 7);
  const auto sums = BlockChecksums(pool.data(), 64, {3, 1});
  ASSERT_EQ(sums.size(), 2u);
  EXPECT_EQ(sums[0], XXH3_64bits(pool.data() + 3 * 64, 64));
  EXPECT_EQ(sums[1], XXH3_64bits(pool.data() + 64, 64));
  EXPECT_TRUE(VerifyBlockChecksums(pool.data(), 64, {3, 1}, sums).ok());
}

TEST(ChecksumTest, CorruptionIsDataLossNamingTheBlocks) {
  std::vector<uint8_t> pool(8 * 32, 5);
  const std::vector<int32_t> blocks = {0, 2, 5, 7};
  const auto sums = BlockChecksums(pool.data(), 32, blocks);
  pool[5 * 32 + 31] ^= 1;  // one bit in block 5
  pool[7 * 32] ^= 0x80;    // one bit in block 7
  const absl::Status s = VerifyBlockChecksums(pool.data(), 32, blocks, sums);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("2 of 4 blocks: 5, 7"));
  EXPECT_EQ(VerifyBlockChecksums(pool.data(), 32, blocks, {1, 2}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChecksumTest, CompareChecksumsComputedElsewhere) {
  const std::vector<int32_t> blocks = {4, 9, 2};
  const std::vector<uint64_t> want = {11, 22, 33};
  EXPECT_TRUE(CompareBlockChecksums(blocks, want, want).ok());
  const absl::Status s = CompareBlockChecksums(blocks, {11, 0, 33}, want);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("1 of 3 blocks: 9"));
  EXPECT_EQ(CompareBlockChecksums(blocks, {11, 22}, want).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CompareBlockChecksums(blocks, want, {1}).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvrelay::transfer
