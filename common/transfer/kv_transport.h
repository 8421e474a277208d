// KV transfer (DESIGN §4): one small interface to move byte ranges of a local KV pool
// into a peer's pool, implemented over UCX RMA (ucx/) and by memcpy inside one process
// (local/, for tests of the layers above).
//
// The receiver registers its pool and publishes the pool's descriptor; the sender
// writes (source range -> destination range) lists into it with one completion
// callback per transfer, which runs once every byte is remotely complete (or the
// transfer failed, timed out or was cancelled; then it also says which destination
// bytes may have been written in part). A transfer may carry a notice (a tag and a
// payload, e.g. the per-block checksums) delivered to the receiver after the data.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace kvrelay::transfer {

enum class MemoryType { kHost = 0, kCuda = 1 };
const char* MemoryTypeName(MemoryType t);

// What a process publishes so that peers can write into its pool.
struct PoolDescriptor {
  std::string transport;     // "ucx" or "local"
  std::string peer_address;  // the owning transport's address (UCX: worker address bytes)
  std::string rkey;          // UCX: packed remote key
  uint64_t base_address = 0;
  uint64_t bytes = 0;
  MemoryType memory_type = MemoryType::kHost;
  uint64_t block_bytes = 0;  // pool geometry: num_blocks blocks of block_bytes
  int64_t num_blocks = 0;
};

// Text form (JSON, binary fields base64) for RPCs, pipes and logs.
std::string EncodeDescriptor(const PoolDescriptor& d);
// INVALID_ARGUMENT naming what is wrong with the text.
absl::StatusOr<PoolDescriptor> DecodeDescriptor(absl::string_view text);

// A byte range to copy: source offset in the local pool, destination offset in the
// remote pool.
struct WriteRange {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
  bool operator==(const WriteRange& o) const {
    return src_offset == o.src_offset && dst_offset == o.dst_offset && length == o.length;
  }
};

// Ranges for copying src_blocks[i] -> dst_blocks[i], merged wherever both sides are
// consecutive: blocks 10..41 -> 100..131 is one range. INVALID_ARGUMENT when the lists
// differ in length or hold a negative id.
absl::StatusOr<std::vector<WriteRange>> CoalesceBlocks(absl::Span<const int32_t> src_blocks,
                                                       absl::Span<const int32_t> dst_blocks,
                                                       uint64_t block_bytes);

// Destination block ids touched (even in part) by the ranges, ascending, unique.
std::vector<int32_t> DestinationBlocks(absl::Span<const WriteRange> ranges, uint64_t block_bytes);

// OK when every range lies inside both pools and no two destination ranges overlap;
// INVALID_ARGUMENT naming the first bad range otherwise.
absl::Status ValidateRanges(absl::Span<const WriteRange> ranges, uint64_t src_bytes,
                            uint64_t dst_bytes);

struct TransferOptions {
  absl::Duration timeout = absl::Seconds(30);  // whole transfer, issue to remote completion
  // Puts larger than this are split. 512 KiB rather than DESIGN's 1 MiB: measured here
  // (docs/benchmarks.md), UCX's cma shm path reaches ~1.2x memcpy with 512 KiB puts but
  // only 0.75-0.97x with 1 MiB ones; tcp is the same either way.
  uint64_t chunk_bytes = 512 << 10;
  int max_in_flight = 8;  // chunks outstanding at once
  // Delivered to the receiver (WaitNotice) after all data is remotely complete.
  uint64_t notice_tag = 0;  // 0: no notice
  std::string notice;
};

struct TransferStats {
  uint64_t bytes = 0;
  int64_t ranges = 0;  // ranges as given (coalesce them first)
  int64_t puts = 0;    // put operations issued: ranges split into chunks
  double seconds = 0;  // Write() to completion
  std::string
      transport;  // what carried the data: "posix", "sysv", "cma", "tcp", "rc_mlx5", "memcpy", ...
};

struct TransferResult {
  // OK; CANCELLED; DEADLINE_EXCEEDED; UNAVAILABLE (peer failed); INTERNAL (transport error).
  absl::Status status;
  TransferStats stats;
  // When not OK: destination ranges that may hold partly written data (issued, not
  // confirmed). Ranges never issued are untouched and are not listed.
  std::vector<WriteRange> maybe_written;
};

using TransferId = uint64_t;
using TransferCallback = std::function<void(TransferResult)>;

// Pool memory registered with a transport so that peers can write into it.
class RegisteredMemory {
 public:
  virtual ~RegisteredMemory() = default;
  virtual uint8_t* data() const = 0;
  virtual uint64_t size() const = 0;
  virtual const PoolDescriptor& descriptor() const = 0;
};

class KvTransport {
 public:
  virtual ~KvTransport() = default;

  virtual std::string name() const = 0;
  // This transport's address: peers pass it to WaitNotice-style calls.
  virtual std::string address() const = 0;

  // Memory for a pool of num_blocks x block_bytes that peers can write into, allocated by
  // the transport (UCX: lets shared-memory puts run at memcpy speed). Contents are
  // unspecified. Every pool must be destroyed before its transport.
  virtual absl::StatusOr<std::unique_ptr<RegisteredMemory>> AllocatePool(
      uint64_t block_bytes, int64_t num_blocks, MemoryType type = MemoryType::kHost) = 0;
  // Registers existing memory instead.
  virtual absl::StatusOr<std::unique_ptr<RegisteredMemory>> RegisterPool(
      void* base, uint64_t block_bytes, int64_t num_blocks,
      MemoryType type = MemoryType::kHost) = 0;

  // Starts copying `ranges` of `src` (registered with this transport) into the pool
  // described by `dst`. INVALID_ARGUMENT (nothing sent) for ranges outside either pool,
  // overlapping destinations, a descriptor of another transport or bad options.
  // `done` runs exactly once, on the transport's thread, when all bytes are remotely
  // complete (and the notice, if any, was sent) or the transfer ended otherwise.
  virtual absl::StatusOr<TransferId> Write(const RegisteredMemory& src, const PoolDescriptor& dst,
                                           std::vector<WriteRange> ranges,
                                           const TransferOptions& options,
                                           TransferCallback done) = 0;

  // Ends a transfer promptly: `done` runs with CANCELLED and the destination ranges
  // that may have been partly written. False if it had already ended.
  virtual bool Cancel(TransferId id) = 0;

  // Waits until everything written so far to the peer owning `dst` is remotely
  // complete. UNAVAILABLE if the peer failed; DEADLINE_EXCEEDED at the timeout.
  virtual absl::Status Flush(const PoolDescriptor& dst, absl::Duration timeout) = 0;

  // Receiver side: waits for the notice `tag` sent by the transport at
  // `sender_address`; returns its payload. UNAVAILABLE when that peer fails first,
  // DEADLINE_EXCEEDED at the timeout.
  virtual absl::StatusOr<std::string> WaitNotice(const std::string& sender_address, uint64_t tag,
                                                 absl::Duration timeout) = 0;
};

// Blocking helper: runs Write and waits for its result.
TransferResult WriteAndWait(KvTransport& transport, const RegisteredMemory& src,
                            const PoolDescriptor& dst, std::vector<WriteRange> ranges,
                            const TransferOptions& options);

}  // namespace kvrelay::transfer
