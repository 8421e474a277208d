#include "common/transfer/kv_transport.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::transfer {
namespace {

using ::testing::HasSubstr;

TEST(KvTransportTest, ConsecutiveBlocksCoalesceIntoOneRange) {
  std::vector<int32_t> src, dst;
  for (int b = 10; b <= 41; ++b) {
    src.push_back(b);
    dst.push_back(b + 90);
  }
  auto r = CoalesceBlocks(src, dst, 100);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<WriteRange>{{1000, 10000, 3200}}));
}

TEST(KvTransportTest, BreaksWhereEitherSideJumps) {
  auto r = CoalesceBlocks({1, 2, 3, 7, 8}, {5, 6, 9, 10, 11}, 10);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<WriteRange>{{10, 50, 20}, {30, 90, 10}, {70, 100, 20}}));
  EXPECT_TRUE(CoalesceBlocks({}, {}, 10)->empty());
  EXPECT_EQ(CoalesceBlocks({1}, {}, 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CoalesceBlocks({-1}, {0}, 10).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvTransportTest, DestinationBlocks) {
  EXPECT_EQ(DestinationBlocks({{0, 50, 20}, {0, 95, 10}, {0, 0, 5}}, 10),
            (std::vector<int32_t>{0, 5, 6, 9, 10}));
  EXPECT_TRUE(DestinationBlocks({}, 10).empty());
}

TEST(KvTransportTest, ValidateRanges) {
  EXPECT_TRUE(ValidateRanges({{0, 0, 10}, {10, 10, 10}}, 20, 20).ok());
  EXPECT_THAT(ValidateRanges({{0, 0, 0}}, 20, 20).message(), HasSubstr("empty"));
  EXPECT_THAT(ValidateRanges({{15, 0, 10}}, 20, 20).message(), HasSubstr("outside the source"));
  EXPECT_THAT(ValidateRanges({{0, 15, 10}}, 20, 20).message(),
              HasSubstr("outside the destination"));
  EXPECT_THAT(ValidateRanges({{0, 0, 10}, {10, 5, 10}}, 20, 20).message(), HasSubstr("overlap"));
  // Offsets near 2^64 do not wrap around the bounds check.
  EXPECT_FALSE(ValidateRanges({{~0ull - 5, 0, 10}}, 20, 20).ok());
}

TEST(KvTransportTest, DescriptorRoundTrip) {
  PoolDescriptor d;
  d.transport = "ucx";
  d.peer_address = std::string("\0\x01\xffworker", 9);
  d.rkey = std::string("\x7f\0rk", 4);
  d.base_address = 0x7f0012345000;
  d.bytes = 1 << 20;
  d.memory_type = MemoryType::kCuda;
  d.block_bytes = 4096;
  d.num_blocks = 256;
  auto back = DecodeDescriptor(EncodeDescriptor(d));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->transport, d.transport);
  EXPECT_EQ(back->peer_address, d.peer_address);
  EXPECT_EQ(back->rkey, d.rkey);
  EXPECT_EQ(back->base_address, d.base_address);
  EXPECT_EQ(back->bytes, d.bytes);
  EXPECT_EQ(back->memory_type, MemoryType::kCuda);
  EXPECT_EQ(back->block_bytes, 4096u);
  EXPECT_EQ(back->num_blocks, 256);
}

TEST(KvTransportTest, BadDescriptorsAreInvalidArgument) {
  for (const char* text :
       {"", "[]", "{}", "not json",
        R"({"transport":"ucx","peer_address":"!!","rkey":"","base_address":1,"bytes":10,)"
        R"("memory_type":"host","block_bytes":1,"num_blocks":1})",
        R"({"transport":"ucx","peer_address":"","rkey":"","base_address":1,"bytes":10,)"
        R"("memory_type":"tpu","block_bytes":1,"num_blocks":1})",
        R"({"transport":"ucx","peer_address":"","rkey":"","base_address":-1,"bytes":10,)"
        R"("memory_type":"host","block_bytes":1,"num_blocks":1})",
        R"({"transport":"ucx","peer_address":"","rkey":"","base_address":1,"bytes":10,)"
        R"("memory_type":"host","block_bytes":4,"num_blocks":3})"}) {
    auto d = DecodeDescriptor(text);
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(d.status().message(), HasSubstr("pool descriptor")) << text;
  }
}

}  // namespace
}  // namespace kvrelay::transfer
