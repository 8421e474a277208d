#include "common/transfer/local/local_transport.h"

#include <cstring>
#include <random>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::transfer {
namespace {

constexpr uint64_t kBlock = 1024;

struct Pair {
  std::unique_ptr<KvTransport> sender = NewLocalTransport(), receiver = NewLocalTransport();
  std::unique_ptr<RegisteredMemory> src, dst;
  explicit Pair(int64_t blocks) {
    src = std::move(*sender->AllocatePool(kBlock, blocks));
    dst = std::move(*receiver->AllocatePool(kBlock, blocks));
    std::mt19937 rng(3);
    for (uint64_t i = 0; i < src->size(); ++i) src->data()[i] = static_cast<uint8_t>(rng());
  }
};

TEST(LocalTransportTest, ByteExactWithChunkedPutsAndNotice) {
  Pair p(64);
  auto ranges = *CoalesceBlocks({10, 11, 12, 13, 50}, {20, 21, 22, 23, 0}, kBlock);
  TransferOptions o;
  o.chunk_bytes = 3 * kBlock;
  o.notice_tag = 5;
  o.notice = "sums";
  TransferResult r = WriteAndWait(*p.sender, *p.src, p.dst->descriptor(), ranges, o);
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.stats.ranges, 2);
  EXPECT_EQ(r.stats.puts, 3);  // 4 blocks in chunks of 3 + 1 block
  EXPECT_EQ(r.stats.bytes, 5 * kBlock);
  EXPECT_EQ(r.stats.transport, "memcpy");
  EXPECT_EQ(std::memcmp(p.src->data() + 10 * kBlock, p.dst->data() + 20 * kBlock, 4 * kBlock), 0);
  EXPECT_EQ(std::memcmp(p.src->data() + 50 * kBlock, p.dst->data(), kBlock), 0);
  EXPECT_EQ(*p.receiver->WaitNotice(p.sender->address(), 5, absl::Seconds(10)), "sums");
  EXPECT_TRUE(p.sender->Flush(p.dst->descriptor(), absl::Seconds(10)).ok());
}

TEST(LocalTransportTest, BadInputIsInvalidArgument) {
  Pair p(4);
  TransferOptions o;
  EXPECT_EQ(p.sender->Write(*p.src, p.dst->descriptor(), {{0, 4 * kBlock, 1}}, o, nullptr)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  PoolDescriptor ucx = p.dst->descriptor();
  ucx.transport = "ucx";
  EXPECT_EQ(p.sender->Write(*p.src, ucx, {{0, 0, 1}}, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LocalTransportTest, CancelStopsAtAChunkBoundaryAndNamesTouchedRanges) {
  Pair p(1024);
  TransferOptions o;
  o.chunk_bytes = 16;  // ~65k chunks: still running when cancelled
  absl::Notification done;
  TransferResult result;
  auto id = p.sender->Write(*p.src, p.dst->descriptor(),
                            {{0, 0, 512 * kBlock}, {512 * kBlock, 512 * kBlock, 512 * kBlock}}, o,
                            [&](TransferResult r) {
                              result = std::move(r);
                              done.Notify();
                            });
  ASSERT_TRUE(id.ok());
  const bool cancelled = p.sender->Cancel(*id);
  done.WaitForNotification();
  if (cancelled) {
    EXPECT_EQ(result.status.code(), absl::StatusCode::kCancelled);
    EXPECT_LE(result.maybe_written.size(), 2u);
    EXPECT_LT(result.stats.bytes, 1024 * kBlock);
  }
  EXPECT_FALSE(p.sender->Cancel(*id));
}

TEST(LocalTransportTest, GoneReceiverFailsTheTransferAndTheNoticeWait) {
  Pair p(4);
  PoolDescriptor d = p.dst->descriptor();
  const std::string sender_address = p.sender->address();
  p.dst.reset();
  TransferResult r = WriteAndWait(*p.sender, *p.src, d, {{0, 0, kBlock}}, TransferOptions());
  EXPECT_EQ(r.status.code(), absl::StatusCode::kUnavailable);
  // A receiver waiting on a sender that goes away is told so.
  p.src.reset();
  p.sender.reset();
  auto notice = p.receiver->WaitNotice(sender_address, 1, absl::Seconds(30));
  EXPECT_EQ(notice.status().code(), absl::StatusCode::kUnavailable);
}

TEST(LocalTransportTest, TimeoutIsDeadlineExceeded) {
  Pair p(1024);
  TransferOptions o;
  o.chunk_bytes = 1;
  o.timeout = absl::Milliseconds(1);
  TransferResult r =
      WriteAndWait(*p.sender, *p.src, p.dst->descriptor(), {{0, 0, 1024 * kBlock}}, o);
  EXPECT_EQ(r.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(r.maybe_written.size(), 1u);
}

}  // namespace
}  // namespace kvrelay::transfer
