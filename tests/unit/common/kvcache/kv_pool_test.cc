#include "common/kvcache/kv_pool.h"

#include <vector>

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
  auto i8 = KvPool::Create(Layout(kernels::DType::kI8), 1);
  ASSERT_TRUE(i8.ok());
  // int8: data + one f32 scale per (token, kv head) per segment.
  EXPECT_EQ((*i8)->layout().block_bytes(), 2u * 2 * (4 * 2 * 8 + 4 * 2 * 4));
}

TEST(KvPoolTest, MemoryIsZeroFilledAndWritable) {
  auto pool = std::move(*KvPool::Create(Layout(), 3));
  for (size_t i = 0; i < pool->bytes(); ++i) ASSERT_EQ(pool->view().base[i], 0) << i;
  pool->view().base[pool->bytes() - 1] = 7;  // the whole range is mapped
  EXPECT_EQ(pool->view().num_blocks, 3);
}

TEST(KvPoolTest, WrapsMemoryItDoesNotOwn) {
  const size_t need = Layout().block_bytes() * 4;
  std::vector<uint8_t> mem(need + 7, 9);
  {
    auto pool = KvPool::Wrap(Layout(), 4, mem.data(), mem.size());
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ((*pool)->view().base, mem.data());
    EXPECT_EQ((*pool)->bytes(), need);
    EXPECT_EQ((*pool)->view().memory, kernels::MemoryKind::kHost);
  }
  {
    // Device memory is only described (never touched here): the view says where it is.
    auto pool = KvPool::Wrap(Layout(), 4, mem.data(), mem.size(), kernels::MemoryKind::kCuda);
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ((*pool)->view().memory, kernels::MemoryKind::kCuda);
  }
  EXPECT_EQ(mem[0], 9);  // still ours after the pool is gone
  auto small = KvPool::Wrap(Layout(), 4, mem.data(), need - 1);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPool::Wrap(Layout(), 4, nullptr, need).status().code(),
            absl::StatusCode::kInvalidArgument);
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
