#include "common/kvcache/kv_pool.h"

#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

kernels::PagedKvLayout Layout(kernels::DType dt = kernels::DType::kF32) {
  kernels::PagedKvLayout l;
  l.dtype = dt;
  l.num_layers = 2;
  l.block_size = 4;
  l.num_kv_heads = 2;
  l.head_dim = 8;
  return l;
}

TEST(KvPoolTest, SizesFollowTheLayout) {
  auto pool = KvPool::Create(Layout(), 10);
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ((*pool)->layout().block_bytes(), 2u * 2 * 4 * 2 * 8 * 4);
  EXPECT_EQ((*pool)->bytes(), (*pool)->layout().block_bytes() * 10);
  EXPECT_EQ((*pool)->num_free(), 10);
  auto i8 = KvPool::Create(Layout(kernels::DType::kI8), 1);
  ASSERT_TRUE(i8.ok());
  // int8: data + one f32 scale per (token, kv head) per segment.
  EXPECT_EQ((*i8)->layout().block_bytes(), 2u * 2 * (4 * 2 * 8 + 4 * 2 * 4));
}

TEST(KvPoolTest, PrefersContiguousRuns) {
  auto pool = std::move(*KvPool::Create(Layout(), 10));
  auto a = *pool->Allocate(3);
  EXPECT_EQ(a, (std::vector<int32_t>{0, 1, 2}));
  auto b = *pool->Allocate(2);
  EXPECT_EQ(b, (std::vector<int32_t>{3, 4}));
  pool->Free({1});
  pool->Free({3, 4});
  // 1 is a hole; 3..9 is the first run of 4.
  EXPECT_EQ(*pool->Allocate(4), (std::vector<int32_t>{3, 4, 5, 6}));
  // No run of 4 left (1, 7, 8, 9): falls back to the lowest free ids.
  EXPECT_EQ(*pool->Allocate(4), (std::vector<int32_t>{1, 7, 8, 9}));
  EXPECT_EQ(pool->num_free(), 0);
}

TEST(KvPoolTest, ExhaustionIsAnErrorNotACrash) {
  auto pool = std::move(*KvPool::Create(Layout(), 4));
  auto r = pool->Allocate(5);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool->num_free(), 4);
  EXPECT_EQ(pool->Allocate(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvPoolTest, RejectsEmptyGeometry) {
  EXPECT_EQ(KvPool::Create(Layout(), 0).status().code(), absl::StatusCode::kInvalidArgument);
  kernels::PagedKvLayout l = Layout();
  l.head_dim = 0;
  EXPECT_EQ(KvPool::Create(l, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvPoolTest, RejectsBlockCountsThatWouldOverflow) {
  for (int64_t n : {int64_t{1} << 31, int64_t{1} << 48, int64_t{1} << 62}) {
    auto pool = KvPool::Create(Layout(), n);
    EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument) << n;
    EXPECT_NE(pool.status().message().find("too large"), std::string::npos);
  }
}

TEST(KvPoolTest, BlocksFor) {
  EXPECT_EQ(BlocksFor(0, 16), 0);
  EXPECT_EQ(BlocksFor(1, 16), 1);
  EXPECT_EQ(BlocksFor(16, 16), 1);
  EXPECT_EQ(BlocksFor(17, 16), 2);
}

}  // namespace
}  // namespace kvrelay::kvcache
