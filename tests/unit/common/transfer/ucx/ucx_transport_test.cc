// UCX transport between two transports (two UCP contexts and workers) of one process.
// The two-process tests (shm and tcp, killed peers) are in
// tests/integration/ucx_transfer_process_test.cc.
#include "common/transfer/ucx/ucx_transport.h"

#include <cstring>
#include <random>

#include "absl/synchronization/notification.h"
#include "common/transfer/checksum.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::transfer {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kBlock = 4096;

struct Pair {
  std::unique_ptr<KvTransport> sender, receiver;
  std::unique_ptr<RegisteredMemory> src, dst;
};

Pair MakePair(int64_t blocks = 64) {
  Pair p;
  auto s = NewUcxTransport();
  auto r = NewUcxTransport();
  EXPECT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(r.ok()) << r.status();
  p.sender = std::move(*s);
  p.receiver = std::move(*r);
  auto src = p.sender->AllocatePool(kBlock, blocks);
  auto dst = p.receiver->AllocatePool(kBlock, blocks);
  EXPECT_TRUE(src.ok()) << src.status();
  EXPECT_TRUE(dst.ok()) << dst.status();
  p.src = std::move(*src);
  p.dst = std::move(*dst);
  std::mt19937_64 rng(42);
  for (uint64_t i = 0; i < p.src->size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(p.src->data() + i, &v, 8);
  }
  std::memset(p.dst->data(), 0, p.dst->size());
  return p;
}

TEST(UcxTransportTest, TransportFromEpInfo) {
  const std::string tcp =
      "#\n# UCP endpoint \n#\n#               peer: <no debug data>\n"
      "#                 lane[0]:  1:tcp/lo.0 md[1]                -> md[1]/tcp/sysdev[255] am "
      "am_bw#0 keepalive wireup\n#\n#                  rma_bw: mds rndv_rkey_size 9\n";
  EXPECT_EQ(TransportFromEpInfo(tcp), "tcp");
  const std::string shm =
      "#                 lane[0]:  3:sysv/memory.0 md[3]  -> md[3]/sysv/sysdev[255] am am_bw#0\n"
      "#                 lane[1]:  4:posix/memory.0 md[4] -> md[4]/posix/sysdev[255] rma_bw#0 "
      "keepalive\n";
  EXPECT_EQ(TransportFromEpInfo(shm), "posix");
  EXPECT_EQ(TransportFromEpInfo("nothing"), "");
}

TEST(UcxTransportTest, HasSharedMemoryTransport) {
  const std::string all =
      "#      resource 0  :  md 0  dev 0  flags -- self/memory0\n"
      "#      resource 1  :  md 1  dev 1  flags -- tcp/lo\n"
      "#      resource 3  :  md 2  dev 3  flags -- sysv/memory\n"
      "#      resource 4  :  md 3  dev 3  flags -- posix/memory\n";
  EXPECT_TRUE(HasSharedMemoryTransport(all));
  EXPECT_TRUE(HasSharedMemoryTransport("#      resource 5  :  md 4  dev 3  flags -- cma/memory\n"));
  const std::string tcp_only =
      "#            md 0  :  component 0  tcp \n"
      "#      resource 0  :  md 0  dev 0  flags -- tcp/lo\n"
      "#      resource 1  :  md 0  dev 1  flags -- tcp/eth0\n";
  EXPECT_FALSE(HasSharedMemoryTransport(tcp_only));
  EXPECT_FALSE(HasSharedMemoryTransport(""));
}

TEST(UcxTransportTest, WritesAreByteExactAndCoalesced) {
  Pair p = MakePair();
  auto ranges = *CoalesceBlocks({10, 11, 12, 13, 40, 2}, {0, 1, 2, 3, 5, 60}, kBlock);
  ASSERT_EQ(ranges.size(), 3u);
  TransferOptions o;
  o.chunk_bytes = 2 * kBlock;
  TransferResult r = WriteAndWait(*p.sender, *p.src, p.dst->descriptor(), ranges, o);
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.stats.bytes, 6 * kBlock);
  EXPECT_EQ(r.stats.puts, 2 + 1 + 1);  // the 4-block range in 2 chunks
  EXPECT_FALSE(r.stats.transport.empty());
  for (auto [s, d] : std::vector<std::pair<int, int>>{{10, 0}, {13, 3}, {40, 5}, {2, 60}}) {
    EXPECT_EQ(std::memcmp(p.src->data() + s * kBlock, p.dst->data() + d * kBlock, kBlock), 0)
        << s << "->" << d;
  }
  std::vector<uint8_t> zero(kBlock, 0);
  EXPECT_EQ(std::memcmp(p.dst->data() + 4 * kBlock, zero.data(), kBlock), 0);  // untouched
  EXPECT_TRUE(p.sender->Flush(p.dst->descriptor(), absl::Seconds(30)).ok());
}

TEST(UcxTransportTest, NoticeArrivesAfterTheData) {
  Pair p = MakePair();
  const std::vector<int32_t> blocks = {7, 8, 9};
  const std::vector<uint64_t> sums = BlockChecksums(p.src->data(), kBlock, blocks);
  TransferOptions o;
  o.notice_tag = 99;
  o.notice.assign(reinterpret_cast<const char*>(sums.data()), sums.size() * 8);
  TransferResult r = WriteAndWait(*p.sender, *p.src, p.dst->descriptor(),
                                  *CoalesceBlocks(blocks, blocks, kBlock), o);
  ASSERT_TRUE(r.status.ok()) << r.status;
  auto notice = p.receiver->WaitNotice(p.sender->address(), 99, absl::Seconds(30));
  ASSERT_TRUE(notice.ok()) << notice.status();
  std::vector<uint64_t> got(notice->size() / 8);
  std::memcpy(got.data(), notice->data(), notice->size());
  EXPECT_TRUE(VerifyBlockChecksums(p.dst->data(), kBlock, blocks, got).ok());
  // Another tag never arrives.
  EXPECT_EQ(
      p.receiver->WaitNotice(p.sender->address(), 100, absl::Milliseconds(50)).status().code(),
      absl::StatusCode::kDeadlineExceeded);
}

TEST(UcxTransportTest, BadRequestsAreInvalidArgumentAndSendNothing) {
  Pair p = MakePair(8);
  TransferOptions o;
  auto bad = [&](std::vector<WriteRange> ranges, const PoolDescriptor& d) {
    return p.sender->Write(*p.src, d, std::move(ranges), o, nullptr).status();
  };
  const PoolDescriptor& d = p.dst->descriptor();
  EXPECT_THAT(bad({{0, 8 * kBlock, 1}}, d).message(), HasSubstr("outside the destination"));
  EXPECT_THAT(bad({{8 * kBlock - 1, 0, 2}}, d).message(), HasSubstr("outside the source"));
  EXPECT_THAT(bad({{0, 0, kBlock}, {kBlock, kBlock - 1, 2}}, d).message(), HasSubstr("overlap"));
  PoolDescriptor local = d;
  local.transport = "local";
  EXPECT_EQ(bad({{0, 0, 1}}, local).code(), absl::StatusCode::kInvalidArgument);
  // A pool of another transport is not a valid source.
  auto foreign = p.receiver->AllocatePool(kBlock, 1);
  ASSERT_TRUE(foreign.ok());
  EXPECT_EQ(p.sender->Write(**foreign, d, {{0, 0, 1}}, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.chunk_bytes = 0;
  EXPECT_EQ(bad({{0, 0, 1}}, d).code(), absl::StatusCode::kInvalidArgument);
  foreign->reset();
}

TEST(UcxTransportTest, CancelEndsTheTransferAndNamesTouchedRanges) {
  Pair p = MakePair(256);
  // Many small chunks with one in flight: the transfer is still running when cancelled
  // (or, on a very fast machine, already done: then Cancel says so).
  TransferOptions o;
  o.chunk_bytes = 64;
  o.max_in_flight = 1;
  absl::Notification done;
  TransferResult result;
  auto id = p.sender->Write(*p.src, p.dst->descriptor(), {{0, 0, 256 * kBlock}}, o,
                            [&](TransferResult r) {
                              result = std::move(r);
                              done.Notify();
                            });
  ASSERT_TRUE(id.ok());
  const bool cancelled = p.sender->Cancel(*id);
  done.WaitForNotification();
  if (cancelled) {
    EXPECT_EQ(result.status.code(), absl::StatusCode::kCancelled);
    EXPECT_LE(result.maybe_written.size(), 1u);
    // Whatever is not named as maybe written is untouched, even once every request
    // issued before the cancel has landed.
    ASSERT_TRUE(p.sender->Flush(p.dst->descriptor(), absl::Seconds(30)).ok());
    if (result.maybe_written.empty()) {
      const std::vector<uint8_t> zero(p.dst->size(), 0);
      EXPECT_EQ(std::memcmp(p.dst->data(), zero.data(), zero.size()), 0);
    }
  } else {
    EXPECT_TRUE(result.status.ok());
  }
  EXPECT_FALSE(p.sender->Cancel(*id));  // already ended
}

TEST(UcxTransportTest, UnreachablePeerFailsWithoutHanging) {
  Pair p = MakePair(4);
  PoolDescriptor d = p.dst->descriptor();
  p.dst.reset();
  p.receiver.reset();  // the peer is gone
  TransferOptions o;
  o.timeout = absl::Seconds(20);
  TransferResult r = WriteAndWait(*p.sender, *p.src, d, {{0, 0, kBlock}}, o);
  // Depending on the transport UCX reports the failure or the deadline passes; either
  // way the transfer ends with an error.
  EXPECT_FALSE(r.status.ok());
}

}  // namespace
}  // namespace kvrelay::transfer
