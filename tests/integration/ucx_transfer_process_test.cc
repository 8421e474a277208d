// Two real processes moving KV over UCX on this host: this test process and
// kvrelay_transfer_peer, with UCX_TLS=shm and with UCX_TLS=tcp (UCX_NET_DEVICES=lo).
// Covers byte-exact delivery of random block runs, coalescing, checksums catching
// corruption, peers killed mid-transfer on either side, and cancellation.
#include <signal.h>
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "common/transfer/checksum.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/subprocess.h"

namespace kvrelay::transfer {
namespace {

using testing::Subprocess;

constexpr absl::Duration kReply = absl::Seconds(120);  // generous: loaded 2-core CI

struct Done {
  int code = -1;
  uint64_t bytes = 0;
  int64_t puts = 0;
  std::string transport;
  std::vector<int32_t> maybe_written;
};

std::string Csv(const std::vector<int32_t>& v) { return v.empty() ? "-" : absl::StrJoin(v, ","); }

std::vector<int32_t> ParseInts(absl::string_view csv) {
  std::vector<int32_t> out;
  if (csv == "-") return out;
  for (absl::string_view s : absl::StrSplit(csv, ',')) {
    int32_t v;
    if (absl::SimpleAtoi(s, &v)) out.push_back(v);
  }
  return out;
}

std::vector<uint64_t> ParseHex(absl::string_view csv) {
  std::vector<uint64_t> out;
  if (csv == "-") return out;
  for (absl::string_view s : absl::StrSplit(csv, ',')) {
    uint64_t v;
    if (absl::SimpleHexAtoi(s, &v)) out.push_back(v);
  }
  return out;
}

class UcxProcessTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    env_ = {absl::StrCat("UCX_TLS=", GetParam())};
    if (GetParam() == "tcp") env_.push_back("UCX_NET_DEVICES=lo");
    for (const std::string& e : env_) {
      const size_t eq = e.find('=');
      ::setenv(e.substr(0, eq).c_str(), e.substr(eq + 1).c_str(), 1);
    }
    auto t = NewUcxTransport();
    ASSERT_TRUE(t.ok()) << t.status();
    transport_ = std::move(*t);
  }
  void TearDown() override {
    pool_.reset();
    transport_.reset();
    ::unsetenv("UCX_TLS");
    ::unsetenv("UCX_NET_DEVICES");
  }

  // Starts a peer with its own pool; fills in *descriptor from its READY line.
  std::optional<Subprocess> StartPeer(int64_t blocks, uint64_t block_bytes, uint64_t fill,
                                      PoolDescriptor* descriptor) {
    auto p = Subprocess::Start(
        {testing::SiblingBinary("kvrelay_transfer_peer"), "--blocks", absl::StrCat(blocks),
         "--block-bytes", absl::StrCat(block_bytes), "--fill", absl::StrCat(fill)},
        env_);
    if (!p) return p;
    auto line = p->ReadLine(kReply);
    if (!line || line->rfind("READY ", 0) != 0) {
      ADD_FAILURE() << "peer did not start: " << line.value_or("<nothing>");
      return std::nullopt;
    }
    auto d = DecodeDescriptor(line->substr(6));
    if (!d.ok()) {
      ADD_FAILURE() << d.status();
      return std::nullopt;
    }
    *descriptor = *d;
    return p;
  }

  void MakePool(int64_t blocks, uint64_t block_bytes, uint64_t fill) {
    auto pool = transport_->AllocatePool(block_bytes, blocks);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    std::mt19937_64 rng(fill);
    for (uint64_t i = 0; i + 8 <= pool_->size(); i += 8) {
      const uint64_t v = fill == 0 ? 0 : rng();
      std::memcpy(pool_->data() + i, &v, 8);
    }
  }

  // Reads lines until DONE (skipping STARTED).
  static std::optional<Done> ReadDone(Subprocess& p) {
    for (;;) {
      auto line = p.ReadLine(kReply);
      if (!line) return std::nullopt;
      if (*line == "STARTED") continue;
      std::vector<std::string> f = absl::StrSplit(*line, ' ');
      if (f.size() != 6 || f[0] != "DONE") {
        ADD_FAILURE() << "unexpected: " << *line;
        return std::nullopt;
      }
      Done d;
      (void)absl::SimpleAtoi(f[1], &d.code);
      (void)absl::SimpleAtoi(f[2], &d.bytes);
      (void)absl::SimpleAtoi(f[3], &d.puts);
      d.transport = f[4];
      d.maybe_written = ParseInts(f[5]);
      return d;
    }
  }

  static std::string WriteCommand(const std::vector<int32_t>& src, const std::vector<int32_t>& dst,
                                  uint64_t chunk, int64_t timeout_ms, uint64_t tag,
                                  const PoolDescriptor& d) {
    return absl::StrCat("WRITE ", Csv(src), " ", Csv(dst), " ", chunk, " ", timeout_ms, " ", tag,
                        " ", EncodeDescriptor(d));
  }

  std::vector<std::string> env_;
  std::unique_ptr<KvTransport> transport_;
  std::unique_ptr<RegisteredMemory> pool_;
};

// Random runs of blocks: pairs (src, dst), destinations distinct.
void RandomRuns(std::mt19937& rng, int64_t blocks, std::vector<int32_t>* src,
                std::vector<int32_t>* dst) {
  std::set<int32_t> used;
  const int runs = 1 + static_cast<int>(rng() % 6);
  for (int r = 0; r < runs; ++r) {
    const int len = 1 + static_cast<int>(rng() % 16);
    const int32_t s = static_cast<int32_t>(rng() % (blocks - len));
    const int32_t d = static_cast<int32_t>(rng() % (blocks - len));
    bool clash = false;
    for (int i = 0; i < len; ++i) clash |= used.count(d + i) != 0;
    if (clash) continue;
    for (int i = 0; i < len; ++i) {
      src->push_back(s + i);
      dst->push_back(d + i);
      used.insert(d + i);
    }
  }
}

TEST_P(UcxProcessTest, RandomRunsArriveByteExactAndCoalesced) {
  constexpr int64_t kBlocks = 256;
  constexpr uint64_t kBlockBytes = 16 << 10;
  MakePool(kBlocks, kBlockBytes, 0);  // this process receives
  PoolDescriptor peer;
  auto p = StartPeer(kBlocks, kBlockBytes, 7, &peer);
  ASSERT_TRUE(p);
  std::mt19937 rng(11);
  for (int round = 0; round < 8; ++round) {
    std::vector<int32_t> src, dst;
    RandomRuns(rng, kBlocks, &src, &dst);
    const uint64_t chunk = round % 2 == 0 ? (1 << 20) : 3 * kBlockBytes;
    ASSERT_TRUE(p->WriteLine(WriteCommand(src, dst, chunk, 60000, 0, pool_->descriptor())));
    auto done = ReadDone(*p);
    ASSERT_TRUE(done);
    ASSERT_EQ(done->code, 0) << "round " << round;
    EXPECT_EQ(done->bytes, src.size() * kBlockBytes);
    int64_t expected_puts = 0;
    const std::vector<WriteRange> ranges = *CoalesceBlocks(src, dst, kBlockBytes);
    for (const WriteRange& r : ranges) {
      expected_puts += static_cast<int64_t>((r.length + chunk - 1) / chunk);
    }
    EXPECT_EQ(done->puts, expected_puts);
    ASSERT_TRUE(p->WriteLine("SUMS " + Csv(src)));
    auto sums = p->ReadLine(kReply);
    ASSERT_TRUE(sums && sums->rfind("SUMS ", 0) == 0);
    EXPECT_TRUE(
        VerifyBlockChecksums(pool_->data(), kBlockBytes, dst, ParseHex(sums->substr(5))).ok())
        << "round " << round;
  }
  // Blocks 10..41 (512 KiB) are one range: one put per chunk, not one per block.
  std::vector<int32_t> src, dst;
  for (int b = 10; b <= 41; ++b) {
    src.push_back(b);
    dst.push_back(b + 100);
  }
  ASSERT_TRUE(p->WriteLine(WriteCommand(src, dst, 1 << 20, 60000, 0, pool_->descriptor())));
  auto one = ReadDone(*p);
  ASSERT_TRUE(one && one->code == 0);
  EXPECT_EQ(one->puts, 1);
  ASSERT_TRUE(p->WriteLine(WriteCommand(src, dst, 128 << 10, 60000, 0, pool_->descriptor())));
  auto four = ReadDone(*p);
  ASSERT_TRUE(four && four->code == 0);
  EXPECT_EQ(four->puts, 4);
  // The transport that carried the data is reported.
  if (GetParam() == "tcp") {
    EXPECT_EQ(one->transport, "tcp");
  } else {
    EXPECT_THAT(one->transport, ::testing::AnyOf("posix", "sysv", "cma", "xpmem"));
  }
  p->WriteLine("QUIT");
  EXPECT_TRUE(p->Wait(kReply).has_value());
}

TEST_P(UcxProcessTest, ChecksumsFromTheNoticeCatchCorruption) {
  constexpr uint64_t kBlockBytes = 8 << 10;
  MakePool(64, kBlockBytes, 0);
  PoolDescriptor peer;
  auto p = StartPeer(64, kBlockBytes, 3, &peer);
  ASSERT_TRUE(p);
  const std::vector<int32_t> src = {5, 6, 7, 30}, dst = {40, 41, 42, 9};
  ASSERT_TRUE(p->WriteLine(WriteCommand(src, dst, 1 << 20, 60000, 1234, pool_->descriptor())));
  auto notice = transport_->WaitNotice(peer.peer_address, 1234, kReply);
  ASSERT_TRUE(notice.ok()) << notice.status();
  const std::vector<uint64_t> sums = ParseHex(*notice);
  EXPECT_TRUE(VerifyBlockChecksums(pool_->data(), kBlockBytes, dst, sums).ok());
  pool_->data()[41 * kBlockBytes + 100] ^= 0x10;  // one flipped bit after the transfer
  const absl::Status bad = VerifyBlockChecksums(pool_->data(), kBlockBytes, dst, sums);
  EXPECT_EQ(bad.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(bad.message(), ::testing::HasSubstr(": 41"));
  auto done = ReadDone(*p);
  ASSERT_TRUE(done && done->code == 0);
}

TEST_P(UcxProcessTest, ReceiverKilledMidTransferFailsTheSenderWithinTheTimeout) {
  constexpr uint64_t kBlockBytes = 1 << 20;
  constexpr int64_t kBlocks = 512;  // 512 MiB: still moving when the receiver dies
  MakePool(kBlocks, kBlockBytes, 5);
  PoolDescriptor peer;
  auto p = StartPeer(kBlocks, kBlockBytes, 0, &peer);
  ASSERT_TRUE(p);
  TransferOptions o;
  o.timeout = absl::Seconds(30);
  o.chunk_bytes = 256 << 10;
  o.max_in_flight = 4;
  std::vector<int32_t> all(kBlocks);
  for (int i = 0; i < kBlocks; ++i) all[i] = i;
  // A first transfer connects to the peer, so the big one starts moving at once.
  ASSERT_TRUE(WriteAndWait(*transport_, *pool_, peer, {{0, 0, kBlockBytes}}, o).status.ok());
  absl::Notification done;
  TransferResult result;
  const auto t0 = std::chrono::steady_clock::now();
  auto id = transport_->Write(*pool_, peer, *CoalesceBlocks(all, all, kBlockBytes), o,
                              [&](TransferResult r) {
                                result = std::move(r);
                                done.Notify();
                              });
  ASSERT_TRUE(id.ok());
  p->Kill(SIGKILL);
  ASSERT_TRUE(p->Wait(kReply).has_value());
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(o.timeout + absl::Seconds(30)))
      << "the sender hung";
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Over shared memory puts into a dead process's pages raise no error; the transport
  // watches the receiver's process and fails the transfer all the same.
  EXPECT_THAT(result.status.code(),
              ::testing::AnyOf(absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded))
      << result.status;
  EXPECT_LT(result.stats.bytes, kBlocks * kBlockBytes);
  EXPECT_LT(s, absl::ToDoubleSeconds(o.timeout) + 10);
  // Once the peer is known dead, new transfers to it fail instead of hanging.
  TransferOptions quick;
  quick.timeout = absl::Seconds(10);
  TransferResult again = WriteAndWait(*transport_, *pool_, peer, {{0, 0, kBlockBytes}}, quick);
  EXPECT_EQ(again.status.code(), absl::StatusCode::kUnavailable) << again.status;
}

TEST_P(UcxProcessTest, SenderKilledFailsTheWaitingReceiver) {
  constexpr uint64_t kBlockBytes = 1 << 20;
  constexpr int64_t kBlocks = 256;
  MakePool(kBlocks, kBlockBytes, 0);
  PoolDescriptor peer;
  auto p = StartPeer(kBlocks, kBlockBytes, 9, &peer);
  ASSERT_TRUE(p);
  // A first transfer (with its notice) completes, so both endpoints are wired up before
  // the sender dies. UCX 1.13 aborts the process (an assertion fixed upstream in UCX
  // PR #8175) when a peer dies while a tcp wireup reply to it is still pending.
  ASSERT_TRUE(p->WriteLine(WriteCommand({0}, {0}, 1 << 20, 60000, 76, pool_->descriptor())));
  auto first = ReadDone(*p);
  ASSERT_TRUE(first && first->code == 0);
  ASSERT_TRUE(transport_->WaitNotice(peer.peer_address, 76, kReply).ok());
  ASSERT_TRUE(transport_->Flush(peer, kReply).ok());  // this side's endpoint too
  // The receiver starts waiting (and watching the sender) before the sender dies.
  absl::Notification waited;
  absl::StatusOr<std::string> notice;
  double waited_s = 0;
  std::thread waiter([&] {
    const auto t0 = std::chrono::steady_clock::now();
    notice = transport_->WaitNotice(peer.peer_address, 77, absl::Seconds(60));
    waited_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    waited.Notify();
  });
  std::vector<int32_t> all(kBlocks);
  for (int i = 0; i < kBlocks; ++i) all[i] = i;
  ASSERT_TRUE(p->WriteLine(WriteCommand(all, all, 64 << 10, 60000, 0, pool_->descriptor())));
  auto started = p->ReadLine(kReply);
  EXPECT_EQ(started, std::optional<std::string>("STARTED"));
  if (GetParam() == "tcp") {
    // Over tcp UCX 1.13 emulates puts in software: the receiver acknowledges each one,
    // and an acknowledgement to a sender that has just died aborts the receiving
    // process inside UCX (ucp_put_handler: "unexpected error: Endpoint timeout"). So
    // here the sender dies after its data and before its notice; over shm (one-sided)
    // it dies mid-transfer.
    auto data = ReadDone(*p);
    ASSERT_TRUE(data && data->code == 0);
  }
  p->Kill(SIGKILL);
  ASSERT_TRUE(p->Wait(kReply).has_value());
  waiter.join();
  EXPECT_EQ(notice.status().code(), absl::StatusCode::kUnavailable) << notice.status();
  EXPECT_LT(waited_s, 50.0) << "the receiver only gave up at its timeout";
}

TEST_P(UcxProcessTest, CancelReturnsPromptlyAndNamesWhatMayBeWritten) {
  constexpr uint64_t kBlockBytes = 256 << 10;
  constexpr int64_t kBlocks = 512;  // 128 MiB
  MakePool(kBlocks, kBlockBytes, 21);
  PoolDescriptor peer;
  auto p = StartPeer(kBlocks, kBlockBytes, 0, &peer);
  ASSERT_TRUE(p);
  TransferOptions o;
  o.chunk_bytes = 16 << 10;
  o.max_in_flight = 1;
  std::vector<int32_t> src(kBlocks), dst(kBlocks);
  for (int i = 0; i < kBlocks; ++i) {
    src[i] = i;
    dst[i] = kBlocks - 1 - i;  // no two consecutive: one range per block
  }
  // On a loaded machine a transfer may finish before Cancel() reaches it (shm puts are
  // fast): then clear the receiver and try again. One cancelled attempt is required.
  TransferResult result;
  bool cancelled = false;
  for (int attempt = 0; attempt < 20 && !cancelled; ++attempt) {
    ASSERT_TRUE(p->WriteLine("ZERO"));
    ASSERT_EQ(p->ReadLine(kReply), std::optional<std::string>("ZEROED"));
    absl::Notification done;
    auto id = transport_->Write(*pool_, peer, *CoalesceBlocks(src, dst, kBlockBytes), o,
                                [&](TransferResult r) {
                                  result = std::move(r);
                                  done.Notify();
                                });
    ASSERT_TRUE(id.ok());
    const auto t0 = std::chrono::steady_clock::now();
    cancelled = transport_->Cancel(*id);
    const double cancel_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    done.WaitForNotification();
    EXPECT_LT(cancel_s, 5.0);
    if (!cancelled) {
      EXPECT_TRUE(result.status.ok()) << result.status;
    }
  }
  ASSERT_TRUE(cancelled) << "every transfer finished before it could be cancelled";
  EXPECT_EQ(result.status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(result.stats.bytes, kBlocks * kBlockBytes);
  // After everything issued has landed, only blocks named as maybe written differ
  // from zero on the receiver.
  ASSERT_TRUE(transport_->Flush(peer, kReply).ok());
  const std::vector<int32_t> maybe = DestinationBlocks(result.maybe_written, kBlockBytes);
  ASSERT_TRUE(p->WriteLine("NONZERO " + Csv(dst)));
  auto line = p->ReadLine(kReply);
  ASSERT_TRUE(line && line->rfind("NONZERO ", 0) == 0);
  for (int32_t b : ParseInts(line->substr(8))) {
    EXPECT_TRUE(std::binary_search(maybe.begin(), maybe.end(), b))
        << "block " << b << " was written but not reported";
  }
  p->WriteLine("QUIT");
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxProcessTest, ::testing::Values("shm", "tcp"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace kvrelay::transfer
