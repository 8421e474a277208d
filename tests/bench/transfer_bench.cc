// KV transfer bandwidth and latency between two processes over UCX (DESIGN §4).
//
//   build/bin/transfer_bench [--tls shm|tcp] [--block-bytes N] [--total-mib M] [--reps R]
//                            [--chunk-kib K]
//
// This process is the sender; build/bin/kvrelay_transfer_peer is the receiver. M MiB
// of KV move as runs of 1, 4, 16 and 64 consecutive blocks (destination runs placed
// so that no two merge), and the time of each whole transfer (issue to remote
// completion) is compared with memcpy of the same runs in this process, measured in
// the same run. Then the latency of writing one block.
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "tests/bench/bench_util.h"
#include "tests/testing/subprocess.h"

namespace kvrelay::bench {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Run(int argc, char** argv) {
  std::string tls = "shm";
  uint64_t block_bytes = 256 << 10;  // 16 tokens of a Llama-3.2-1B-shaped bf16 KV
  int64_t total_mib = 64;
  int reps = 7;
  int64_t chunk_kib = static_cast<int64_t>(transfer::TransferOptions().chunk_bytes >> 10);
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i];
    if (f == "--tls") tls = argv[i + 1];
    if (f == "--block-bytes") (void)absl::SimpleAtoi(argv[i + 1], &block_bytes);
    if (f == "--total-mib") (void)absl::SimpleAtoi(argv[i + 1], &total_mib);
    if (f == "--reps") (void)absl::SimpleAtoi(argv[i + 1], &reps);
    if (f == "--chunk-kib") (void)absl::SimpleAtoi(argv[i + 1], &chunk_kib);
  }
  ::setenv("UCX_TLS", tls.c_str(), 1);
  if (tls == "tcp") ::setenv("UCX_NET_DEVICES", "lo", 1);
  const int64_t blocks = (total_mib << 20) / static_cast<int64_t>(block_bytes);

  auto transport = transfer::NewUcxTransport();
  if (!transport.ok()) {
    std::fprintf(stderr, "%s\n", transport.status().ToString().c_str());
    return 1;
  }
  auto src = (*transport)->AllocatePool(block_bytes, blocks);
  if (!src.ok()) {
    std::fprintf(stderr, "%s\n", src.status().ToString().c_str());
    return 1;
  }
  std::mt19937_64 rng(1);
  for (uint64_t i = 0; i + 8 <= (*src)->size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy((*src)->data() + i, &v, 8);
  }
  auto peer = testing::Subprocess::Start({testing::SiblingBinary("kvrelay_transfer_peer"),
                                          "--blocks", absl::StrCat(blocks), "--block-bytes",
                                          absl::StrCat(block_bytes), "--fill", "0"});
  if (!peer) {
    std::fprintf(stderr, "cannot start kvrelay_transfer_peer\n");
    return 1;
  }
  auto ready = peer->ReadLine(absl::Seconds(60));
  if (!ready || ready->rfind("READY ", 0) != 0) {
    std::fprintf(stderr, "peer did not start\n");
    return 1;
  }
  const transfer::PoolDescriptor dst = *transfer::DecodeDescriptor(ready->substr(6));
  std::vector<uint8_t> copy_dst((*src)->size(), 0);

  transfer::TransferOptions o;
  o.timeout = absl::Seconds(120);
  o.chunk_bytes = static_cast<uint64_t>(chunk_kib) << 10;
  // Warm-up: connect and touch every destination page once.
  std::vector<int32_t> all(blocks);
  for (int64_t i = 0; i < blocks; ++i) all[i] = static_cast<int32_t>(i);
  auto warm = transfer::WriteAndWait(**transport, **src, dst,
                                     *transfer::CoalesceBlocks(all, all, block_bytes), o);
  if (!warm.status.ok()) {
    std::fprintf(stderr, "warm-up: %s\n", warm.status.ToString().c_str());
    return 1;
  }
  std::printf("tls %s, transport %s, %ld MiB as blocks of %lu KiB, chunk %lu KiB, %d reps\n",
              tls.c_str(), warm.stats.transport.c_str(), static_cast<long>(total_mib),
              static_cast<unsigned long>(block_bytes >> 10),
              static_cast<unsigned long>(o.chunk_bytes >> 10), reps);
  std::printf("%-6s %-10s %-7s %-6s %-14s %-14s %s\n", "run", "run bytes", "ranges", "puts",
              "transfer GB/s", "memcpy GB/s", "ratio");
  for (int run : {1, 4, 16, 64}) {
    // Runs of `run` blocks; the destination runs in reverse order, so none merge.
    std::vector<int32_t> dsts(blocks);
    const int64_t nruns = blocks / run;
    for (int64_t r = 0; r < nruns; ++r) {
      for (int k = 0; k < run; ++k) {
        dsts[r * run + k] = static_cast<int32_t>((nruns - 1 - r) * run + k);
      }
    }
    const auto ranges = *transfer::CoalesceBlocks(all, dsts, block_bytes);
    std::vector<double> xfer, mem;
    int64_t puts = 0;
    for (int rep = 0; rep < reps; ++rep) {
      const double t0 = NowSeconds();
      auto r = transfer::WriteAndWait(**transport, **src, dst, ranges, o);
      xfer.push_back(NowSeconds() - t0);
      if (!r.status.ok()) {
        std::fprintf(stderr, "transfer: %s\n", r.status.ToString().c_str());
        return 1;
      }
      puts = r.stats.puts;
      const double t1 = NowSeconds();
      for (const auto& w : ranges) {
        std::memcpy(copy_dst.data() + w.dst_offset, (*src)->data() + w.src_offset, w.length);
      }
      mem.push_back(NowSeconds() - t1);
    }
    const double bytes = static_cast<double>(blocks) * block_bytes;
    const double x = bytes / Median(xfer) / 1e9, m = bytes / Median(mem) / 1e9;
    std::printf("%-6d %-10s %-7zu %-6ld %-14.2f %-14.2f %.2f\n", run,
                absl::StrCat(run * block_bytes >> 10, " KiB").c_str(), ranges.size(),
                static_cast<long>(puts), x, m, x / m);
  }
  // Latency of one block, issue to remote completion.
  std::vector<double> lat;
  for (int i = 0; i < 200; ++i) {
    const int32_t b = static_cast<int32_t>(i % blocks);
    const double t0 = NowSeconds();
    auto r = transfer::WriteAndWait(**transport, **src, dst,
                                    *transfer::CoalesceBlocks({b}, {b}, block_bytes), o);
    lat.push_back(NowSeconds() - t0);
    if (!r.status.ok()) return 1;
  }
  std::sort(lat.begin(), lat.end());
  std::printf("one %lu KiB block: median %.1f us, p90 %.1f us\n",
              static_cast<unsigned long>(block_bytes >> 10), lat[lat.size() / 2] * 1e6,
              lat[lat.size() * 9 / 10] * 1e6);
  peer->WriteLine("QUIT");
  peer->Wait(absl::Seconds(30));
  src->reset();
  return 0;
}

}  // namespace
}  // namespace kvrelay::bench

int main(int argc, char** argv) { return kvrelay::bench::Run(argc, argv); }
