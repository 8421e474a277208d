// kvrelay_transfer_peer: one end of the two-process UCX transfer tests. It owns a UCX
// transport and a pool, prints "READY <descriptor>" and then obeys one command per
// stdin line, answering on stdout:
//   WRITE <src csv> <dst csv> <chunk bytes> <timeout ms> <notice tag> <descriptor>
//       -> "STARTED" once issued, then "DONE <status code> <bytes> <puts> <transport>
//          <maybe-written dst blocks csv|->"; with a notice tag the notice carries
//          the source blocks' checksums (hex csv)
//   SUMS <blocks csv>              -> "SUMS <hex csv>"   (checksums of own blocks)
//   NONZERO <blocks csv>           -> "NONZERO <csv|->"  (own blocks not all zero)
//   ZERO                           -> "ZEROED"           (own pool set to zero)
//   WAIT <base64 address> <tag> <timeout ms> -> "NOTICE <status code> <payload|->"
//   QUIT
// Flags: --blocks N --block-bytes B --fill SEED (0: leave the pool zeroed).
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/transfer/checksum.h"
#include "common/transfer/ucx/ucx_transport.h"

namespace kvrelay::transfer {
namespace {

// One whole line on stdout; called from the main and the transport thread.
void Say(const std::string& line) {
  static absl::Mutex mu(absl::kConstInit);
  absl::MutexLock l(&mu);
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

std::vector<int32_t> Ints(const std::string& csv) {
  std::vector<int32_t> out;
  if (csv == "-") return out;
  for (absl::string_view s : absl::StrSplit(csv, ',')) {
    int32_t v = 0;
    if (absl::SimpleAtoi(s, &v)) out.push_back(v);
  }
  return out;
}

std::string Hex(const std::vector<uint64_t>& v) {
  std::vector<std::string> parts;
  for (uint64_t x : v) parts.push_back(absl::StrCat(absl::Hex(x)));
  return parts.empty() ? "-" : absl::StrJoin(parts, ",");
}

int Run(int argc, char** argv) {
  int64_t blocks = 64;
  uint64_t block_bytes = 4096, fill = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--blocks") (void)absl::SimpleAtoi(argv[i + 1], &blocks);
    if (flag == "--block-bytes") (void)absl::SimpleAtoi(argv[i + 1], &block_bytes);
    if (flag == "--fill") (void)absl::SimpleAtoi(argv[i + 1], &fill);
  }
  auto transport = NewUcxTransport();
  if (!transport.ok()) {
    std::cerr << "peer: " << transport.status() << "\n";
    return 1;
  }
  auto pool = (*transport)->AllocatePool(block_bytes, blocks);
  if (!pool.ok()) {
    std::cerr << "peer: " << pool.status() << "\n";
    return 1;
  }
  RegisteredMemory& mem = **pool;
  if (fill != 0) {
    std::mt19937_64 rng(fill);
    for (uint64_t i = 0; i + 8 <= mem.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(mem.data() + i, &v, 8);
    }
  } else {
    std::memset(mem.data(), 0, mem.size());
  }
  Say(absl::StrCat("READY ", EncodeDescriptor(mem.descriptor())));

  for (std::string line; std::getline(std::cin, line);) {
    std::vector<std::string> f = absl::StrSplit(line, absl::MaxSplits(' ', 6));
    if (f.empty()) continue;
    if (f[0] == "QUIT") break;
    if (f[0] == "WRITE" && f.size() == 7) {
      const std::vector<int32_t> src = Ints(f[1]), dst = Ints(f[2]);
      TransferOptions o;
      int64_t timeout_ms = 0;
      (void)absl::SimpleAtoi(f[3], &o.chunk_bytes);
      (void)absl::SimpleAtoi(f[4], &timeout_ms);
      (void)absl::SimpleAtoi(f[5], &o.notice_tag);
      o.timeout = absl::Milliseconds(timeout_ms);
      if (o.notice_tag != 0) o.notice = Hex(BlockChecksums(mem.data(), block_bytes, src));
      auto d = DecodeDescriptor(f[6]);
      auto ranges = CoalesceBlocks(src, dst, block_bytes);
      if (!d.ok() || !ranges.ok()) {
        Say(absl::StrCat("DONE ", static_cast<int>(absl::StatusCode::kInvalidArgument),
                         " 0 0 - -"));
        continue;
      }
      // DONE must follow STARTED, but the callback may run (on the transport's thread)
      // before Write() returns: whichever comes second prints DONE.
      struct Order {
        absl::Mutex mu;
        bool started = false;
        std::string done;
      };
      auto order = std::make_shared<Order>();
      auto id = (*transport)->Write(mem, *d, *ranges, o, [block_bytes, order](TransferResult r) {
        const std::vector<int32_t> maybe = DestinationBlocks(r.maybe_written, block_bytes);
        std::string done =
            absl::StrCat("DONE ", static_cast<int>(r.status.code()), " ", r.stats.bytes, " ",
                         r.stats.puts, " ", (r.stats.transport.empty() ? "-" : r.stats.transport),
                         " ", (maybe.empty() ? "-" : absl::StrJoin(maybe, ",")));
        absl::MutexLock l(&order->mu);
        if (order->started) {
          Say(done);
        } else {
          order->done = std::move(done);
        }
      });
      if (!id.ok()) {
        Say(absl::StrCat("DONE ", static_cast<int>(id.status().code()), " 0 0 - -"));
      } else {
        absl::MutexLock l(&order->mu);
        Say("STARTED");
        order->started = true;
        if (!order->done.empty()) Say(order->done);
      }
    } else if (f[0] == "SUMS" && f.size() == 2) {
      Say(absl::StrCat("SUMS ", Hex(BlockChecksums(mem.data(), block_bytes, Ints(f[1])))));
    } else if (f[0] == "ZERO") {
      std::memset(mem.data(), 0, mem.size());
      Say("ZEROED");
    } else if (f[0] == "NONZERO" && f.size() == 2) {
      std::vector<int32_t> nonzero;
      for (int32_t b : Ints(f[1])) {
        const uint8_t* p = mem.data() + static_cast<uint64_t>(b) * block_bytes;
        for (uint64_t i = 0; i < block_bytes; ++i) {
          if (p[i] != 0) {
            nonzero.push_back(b);
            break;
          }
        }
      }
      Say(absl::StrCat("NONZERO ", (nonzero.empty() ? "-" : absl::StrJoin(nonzero, ","))));
    } else if (f[0] == "WAIT" && f.size() == 4) {
      std::string address;
      uint64_t tag = 0;
      int64_t timeout_ms = 0;
      (void)absl::Base64Unescape(f[1], &address);
      (void)absl::SimpleAtoi(f[2], &tag);
      (void)absl::SimpleAtoi(f[3], &timeout_ms);
      auto n = (*transport)->WaitNotice(address, tag, absl::Milliseconds(timeout_ms));
      Say(absl::StrCat("NOTICE ", static_cast<int>(n.status().code()), " ",
                       (n.ok() && !n->empty() ? *n : "-")));
    } else {
      Say(absl::StrCat("ERROR unknown command"));
    }
  }
  pool->reset();
  return 0;
}

}  // namespace
}  // namespace kvrelay::transfer

int main(int argc, char** argv) { return kvrelay::transfer::Run(argc, argv); }
