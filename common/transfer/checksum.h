// Per-block KV checksums (DESIGN §4): the sender hashes each block it sends (XXH3-64
// of the block's bytes); the receiver verifies before the blocks are used, so corrupt
// KV is never decoded.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvrelay::transfer {

// Checksum of each listed block of a pool (base + block * block_bytes).
std::vector<uint64_t> BlockChecksums(const uint8_t* base, uint64_t block_bytes,
                                     absl::Span<const int32_t> blocks);

// OK when every block matches its expected checksum. DATA_LOSS naming the mismatched
// blocks otherwise; INVALID_ARGUMENT when the lists differ in length.
absl::Status VerifyBlockChecksums(const uint8_t* base, uint64_t block_bytes,
                                  absl::Span<const int32_t> blocks,
                                  absl::Span<const uint64_t> expected);
// The same over checksums computed elsewhere (got[i]: block blocks[i], e.g. by a GPU
// backend over a pool in device memory).
absl::Status CompareBlockChecksums(absl::Span<const int32_t> blocks, absl::Span<const uint64_t> got,
                                   absl::Span<const uint64_t> expected);

}  // namespace kvrelay::transfer
