// The file format of one KV block in the disk tier (common/worker/kv_tiers.h): a header
// that names what the block is and what it was computed for, then the block's bytes in
// the pool layout (DESIGN §3). One file per block, named by its chained hash, so a
// restarted worker finds its blocks again, and anything written for another model,
// dtype or block geometry is recognised and ignored.
//
//   offset  size  field (little-endian)
//   0       8     magic "KVRBLK\0\1"
//   8       4     format version (1)
//   12      4     header bytes (this header, including the trailing checksum)
//   16      8     block hash
//   24      8     parent hash (0 when the block starts a chain)
//   32      4     has parent (0 | 1)
//   36      4     kv dtype (kernels::DType)
//   40      4x4   num_layers, block_size, num_kv_heads, head_dim
//   56      8     block bytes (the data that follows the header)
//   64      8     XXH3-64 of the data (the transfer checksum, common/transfer/checksum.h)
//   72      4     model id length m
//   76      m     model id
//   76+m    4xB   the block's token ids (B = block_size)
//   ...     8     XXH3-64 of every header byte before it
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/paged_kv.h"

namespace kvrelay::kvcache {

// What every block of one pool shares: a block only fits a pool of the same identity.
struct DiskBlockIdentity {
  std::string model_id;
  kernels::PagedKvLayout layout;
};

struct DiskBlockHeader {
  uint64_t hash = 0;
  std::optional<uint64_t> parent;
  std::vector<int32_t> tokens;  // block_size token ids
  uint64_t checksum = 0;        // of the data
};

// Header bytes for blocks of `id` (the same for every block of a pool).
size_t DiskBlockHeaderBytes(const DiskBlockIdentity& id);
// The header of `h`; INVALID_ARGUMENT when h.tokens is not block_size long.
absl::StatusOr<std::string> EncodeDiskBlockHeader(const DiskBlockIdentity& id,
                                                  const DiskBlockHeader& h);
// Parses the header at the start of `bytes` (at least DiskBlockHeaderBytes(expect)).
//   INVALID_ARGUMENT  not a block file of this format (short, bad magic, version, size, or
//                     header checksum);
//   FAILED_PRECONDITION  a valid block of another model, dtype or geometry;
//   DATA_LOSS         the hash does not follow from parent and tokens (a chained block).
absl::StatusOr<DiskBlockHeader> DecodeDiskBlockHeader(const DiskBlockIdentity& expect,
                                                      absl::string_view bytes);
// "<16 hex digits>.kvb".
std::string DiskBlockFileName(uint64_t hash);
// The hash a file name names; nullopt for any other name.
std::optional<uint64_t> ParseDiskBlockFileName(absl::string_view name);

}  // namespace kvrelay::kvcache
