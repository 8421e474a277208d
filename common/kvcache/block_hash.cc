#include "common/kvcache/block_hash.h"

#include <cstring>
#include <string>

#include "xxhash.h"

namespace kvrelay::kvcache {
namespace {

constexpr char kTag[] = "kvrelay/block-hash/v1";

void AppendU64Le(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

bool HostIsLittleEndian() {
  const uint32_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

}  // namespace

uint64_t RootHash(absl::string_view model_id, absl::string_view cache_salt) {
  std::string buf(kTag, sizeof(kTag) - 1);
  AppendU64Le(model_id.size(), &buf);
  buf.append(model_id.data(), model_id.size());
  AppendU64Le(cache_salt.size(), &buf);
  buf.append(cache_salt.data(), cache_salt.size());
  return XXH3_64bits_withSeed(buf.data(), buf.size(), 0);
}

uint64_t ChainHash(uint64_t parent, absl::Span<const int32_t> block_tokens) {
  static const bool kLittle = HostIsLittleEndian();
  if (kLittle) {
    return XXH3_64bits_withSeed(block_tokens.data(), block_tokens.size() * sizeof(int32_t), parent);
  }
  std::vector<unsigned char> le(block_tokens.size() * 4);
  for (size_t i = 0; i < block_tokens.size(); ++i) {
    const uint32_t t = static_cast<uint32_t>(block_tokens[i]);
    for (int k = 0; k < 4; ++k) le[4 * i + k] = static_cast<unsigned char>((t >> (8 * k)) & 0xFF);
  }
  return XXH3_64bits_withSeed(le.data(), le.size(), parent);
}

void ExtendBlockHashes(uint64_t root, absl::Span<const int32_t> tokens, int block_size,
                       std::vector<uint64_t>* hashes) {
  if (block_size <= 0) return;
  const size_t full = tokens.size() / static_cast<size_t>(block_size);
  hashes->reserve(full);
  for (size_t i = hashes->size(); i < full; ++i) {
    const uint64_t parent = i == 0 ? root : (*hashes)[i - 1];
    hashes->push_back(ChainHash(parent, tokens.subspan(i * block_size, block_size)));
  }
}

std::vector<uint64_t> BlockHashes(uint64_t root, absl::Span<const int32_t> tokens, int block_size) {
  std::vector<uint64_t> hashes;
  ExtendBlockHashes(root, tokens, block_size, &hashes);
  return hashes;
}

}  // namespace kvrelay::kvcache
