#include "common/transfer/checksum.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "xxhash.h"

namespace kvrelay::transfer {

std::vector<uint64_t> BlockChecksums(const uint8_t* base, uint64_t block_bytes,
                                     absl::Span<const int32_t> blocks) {
  std::vector<uint64_t> out;
  out.reserve(blocks.size());
  for (int32_t b : blocks) {
    out.push_back(XXH3_64bits(base + static_cast<uint64_t>(b) * block_bytes, block_bytes));
  }
  return out;
}

absl::Status VerifyBlockChecksums(const uint8_t* base, uint64_t block_bytes,
                                  absl::Span<const int32_t> blocks,
                                  absl::Span<const uint64_t> expected) {
  if (blocks.size() != expected.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("checksums: ", blocks.size(), " blocks but ", expected.size(), " checksums"));
  }
  return CompareBlockChecksums(blocks, BlockChecksums(base, block_bytes, blocks), expected);
}

absl::Status CompareBlockChecksums(absl::Span<const int32_t> blocks, absl::Span<const uint64_t> got,
                                   absl::Span<const uint64_t> expected) {
  if (blocks.size() != expected.size() || blocks.size() != got.size()) {
    return absl::InvalidArgumentError(absl::StrCat("checksums: ", blocks.size(), " blocks but ",
                                                   got.size(), " computed and ", expected.size(),
                                                   " expected checksums"));
  }
  std::vector<int32_t> bad;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (got[i] != expected[i]) bad.push_back(blocks[i]);
  }
  if (bad.empty()) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat("KV checksum mismatch in ", bad.size(), " of ",
                                          blocks.size(), " blocks: ", absl::StrJoin(bad, ", ")));
}

}  // namespace kvrelay::transfer
