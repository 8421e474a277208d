// The disk tier's block file header (issue 19): a worker parses every file in its
// --kv_disk_dir at start-up and again on reload, so DecodeDiskBlockHeader must take any
// bytes. Inputs with an odd first byte are decoded as they are; the others build a header
// from the input (hash, parent, tokens), which must decode back to itself, and then decode
// it again with one byte changed (which must be refused or decode to a valid header).
#include <cstdint>
#include <cstring>
#include <string>

#include "common/kvcache/block_hash.h"
#include "common/kvcache/disk_block.h"

namespace {

kvrelay::kvcache::DiskBlockIdentity Identity() {
  kvrelay::kvcache::DiskBlockIdentity id;
  id.model_id = "m";
  id.layout.dtype = kvrelay::kernels::DType::kF32;
  id.layout.num_layers = 2;
  id.layout.block_size = 4;
  id.layout.num_kv_heads = 2;
  id.layout.head_dim = 64;
  return id;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvrelay::kvcache;
  static const DiskBlockIdentity id = Identity();
  if (size == 0) return 0;
  if (data[0] & 1) {
    (void)DecodeDiskBlockHeader(id, std::string(reinterpret_cast<const char*>(data + 1), size - 1));
    return 0;
  }
  uint8_t buf[32] = {0};
  std::memcpy(buf, data + 1, std::min<size_t>(size - 1, sizeof(buf)));
  DiskBlockHeader h;
  h.tokens.resize(4);
  std::memcpy(h.tokens.data(), buf, 16);
  uint64_t parent = 0;
  std::memcpy(&parent, buf + 16, 8);
  std::memcpy(&h.checksum, buf + 24, 8);
  if (buf[0] & 2) h.parent = parent;
  h.hash = h.parent ? ChainHash(*h.parent, h.tokens) : parent ^ 0x5bd1e995;
  auto bytes = EncodeDiskBlockHeader(id, h);
  if (!bytes.ok()) __builtin_trap();
  auto back = DecodeDiskBlockHeader(id, *bytes);
  if (!back.ok() || back->hash != h.hash || back->parent != h.parent || back->tokens != h.tokens ||
      back->checksum != h.checksum) {
    __builtin_trap();
  }
  if (size > 33) {
    std::string bad = *bytes;
    bad[data[33] % bad.size()] ^= static_cast<char>(data[size - 1] | 1);
    (void)DecodeDiskBlockHeader(id, bad);
  }
  return 0;
}
