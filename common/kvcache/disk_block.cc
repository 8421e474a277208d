#include "common/kvcache/disk_block.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/kvcache/block_hash.h"
#include "xxhash.h"

namespace kvrelay::kvcache {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'R', 'B', 'L', 'K', 0, 1};
constexpr uint32_t kVersion = 1;
constexpr size_t kFixed = 76;  // bytes before the model id

template <typename T>
void Put(std::string* out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out->append(b, sizeof(T));
}

template <typename T>
T Get(absl::string_view bytes, size_t offset) {
  T v;
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  return v;
}

}  // namespace

size_t DiskBlockHeaderBytes(const DiskBlockIdentity& id) {
  return kFixed + id.model_id.size() + sizeof(int32_t) * id.layout.block_size + sizeof(uint64_t);
}

absl::StatusOr<std::string> EncodeDiskBlockHeader(const DiskBlockIdentity& id,
                                                  const DiskBlockHeader& h) {
  const kernels::PagedKvLayout& l = id.layout;
  if (static_cast<int64_t>(h.tokens.size()) != l.block_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk block: ", h.tokens.size(), " token ids for a block of ", l.block_size));
  }
  std::string out;
  out.reserve(DiskBlockHeaderBytes(id));
  out.append(kMagic, sizeof(kMagic));
  Put<uint32_t>(&out, kVersion);
  Put<uint32_t>(&out, static_cast<uint32_t>(DiskBlockHeaderBytes(id)));
  Put<uint64_t>(&out, h.hash);
  Put<uint64_t>(&out, h.parent.value_or(0));
  Put<uint32_t>(&out, h.parent.has_value() ? 1 : 0);
  Put<uint32_t>(&out, static_cast<uint32_t>(l.dtype));
  Put<int32_t>(&out, l.num_layers);
  Put<int32_t>(&out, l.block_size);
  Put<int32_t>(&out, l.num_kv_heads);
  Put<int32_t>(&out, l.head_dim);
  Put<uint64_t>(&out, l.block_bytes());
  Put<uint64_t>(&out, h.checksum);
  Put<uint32_t>(&out, static_cast<uint32_t>(id.model_id.size()));
  out.append(id.model_id);
  for (int32_t t : h.tokens) Put<int32_t>(&out, t);
  Put<uint64_t>(&out, XXH3_64bits(out.data(), out.size()));
  return out;
}

absl::StatusOr<DiskBlockHeader> DecodeDiskBlockHeader(const DiskBlockIdentity& expect,
                                                      absl::string_view bytes) {
  auto bad = [](auto... why) {
    return absl::InvalidArgumentError(absl::StrCat("not a kvrelay KV block file: ", why...));
  };
  if (bytes.size() < kFixed) return bad("shorter than a header");
  if (std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) return bad("bad magic");
  if (const uint32_t v = Get<uint32_t>(bytes, 8); v != kVersion) {
    return bad("format version ", v, " (this build reads ", kVersion, ")");
  }
  const uint32_t header_bytes = Get<uint32_t>(bytes, 12);
  const uint32_t model_len = Get<uint32_t>(bytes, 72);
  const int32_t block_size = Get<int32_t>(bytes, 44);
  if (block_size <= 0 || model_len > 4096 ||
      header_bytes !=
          kFixed + model_len + sizeof(int32_t) * static_cast<uint64_t>(block_size) + 8 ||
      bytes.size() < header_bytes) {
    return bad("inconsistent header size");
  }
  if (Get<uint64_t>(bytes, header_bytes - 8) != XXH3_64bits(bytes.data(), header_bytes - 8)) {
    return bad("header checksum mismatch");
  }
  const absl::string_view model(bytes.data() + kFixed, model_len);
  kernels::PagedKvLayout l;
  l.dtype = static_cast<kernels::DType>(Get<uint32_t>(bytes, 36));
  l.num_layers = Get<int32_t>(bytes, 40);
  l.block_size = block_size;
  l.num_kv_heads = Get<int32_t>(bytes, 48);
  l.head_dim = Get<int32_t>(bytes, 52);
  const kernels::PagedKvLayout& e = expect.layout;
  if (model != expect.model_id || l.dtype != e.dtype || l.num_layers != e.num_layers ||
      l.block_size != e.block_size || l.num_kv_heads != e.num_kv_heads ||
      l.head_dim != e.head_dim || Get<uint64_t>(bytes, 56) != e.block_bytes()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "KV block of model '%s' (dtype %d, %d layers, block %d, %d kv heads x %d) does not "
        "fit this pool (model '%s', dtype %d, %d layers, block %d, %d kv heads x %d)",
        std::string(model), static_cast<int>(l.dtype), l.num_layers, l.block_size, l.num_kv_heads,
        l.head_dim, expect.model_id, static_cast<int>(e.dtype), e.num_layers, e.block_size,
        e.num_kv_heads, e.head_dim));
  }
  DiskBlockHeader h;
  h.hash = Get<uint64_t>(bytes, 16);
  if (Get<uint32_t>(bytes, 32) != 0) h.parent = Get<uint64_t>(bytes, 24);
  h.checksum = Get<uint64_t>(bytes, 64);
  h.tokens.resize(static_cast<size_t>(block_size));
  std::memcpy(h.tokens.data(), bytes.data() + kFixed + model_len, sizeof(int32_t) * block_size);
  // A chained block's hash follows from its parent and tokens (a first block's root
  // depends on the cache_salt, which is not stored).
  if (h.parent.has_value() && ChainHash(*h.parent, h.tokens) != h.hash) {
    return absl::DataLossError("KV block file: its hash does not match its parent and tokens");
  }
  return h;
}

std::string DiskBlockFileName(uint64_t hash) { return absl::StrFormat("%016x.kvb", hash); }

std::optional<uint64_t> ParseDiskBlockFileName(absl::string_view name) {
  if (name.size() != 20 || name.substr(16) != ".kvb") return std::nullopt;
  uint64_t v = 0;
  for (char c : name.substr(0, 16)) {
    int d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else {
      return std::nullopt;
    }
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

}  // namespace kvrelay::kvcache
