#include "common/transfer/kv_transport.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "nlohmann/json.hpp"

namespace kvrelay::transfer {

const char* MemoryTypeName(MemoryType t) { return t == MemoryType::kCuda ? "cuda" : "host"; }

std::string EncodeDescriptor(const PoolDescriptor& d) {
  nlohmann::ordered_json j;
  j["transport"] = d.transport;
  j["peer_address"] = absl::Base64Escape(d.peer_address);
  j["rkey"] = absl::Base64Escape(d.rkey);
  j["base_address"] = d.base_address;
  j["bytes"] = d.bytes;
  j["memory_type"] = MemoryTypeName(d.memory_type);
  j["block_bytes"] = d.block_bytes;
  j["num_blocks"] = d.num_blocks;
  return j.dump();
}

absl::StatusOr<PoolDescriptor> DecodeDescriptor(absl::string_view text) {
  const nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("pool descriptor: not a JSON object");
  }
  PoolDescriptor d;
  auto str = [&](const char* key, std::string* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("pool descriptor: '", key, "' missing"));
    }
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  auto u64 = [&](const char* key, uint64_t* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_unsigned()) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool descriptor: '", key, "' must be a non-negative integer"));
    }
    *out = it->get<uint64_t>();
    return absl::OkStatus();
  };
  std::string peer64, rkey64, mem;
  uint64_t num_blocks = 0;
  for (absl::Status s :
       {str("transport", &d.transport), str("peer_address", &peer64), str("rkey", &rkey64),
        u64("base_address", &d.base_address), u64("bytes", &d.bytes), str("memory_type", &mem),
        u64("block_bytes", &d.block_bytes), u64("num_blocks", &num_blocks)}) {
    if (!s.ok()) return s;
  }
  if (!absl::Base64Unescape(peer64, &d.peer_address) || !absl::Base64Unescape(rkey64, &d.rkey)) {
    return absl::InvalidArgumentError("pool descriptor: peer_address/rkey are not base64");
  }
  if (mem == "host") {
    d.memory_type = MemoryType::kHost;
  } else if (mem == "cuda") {
    d.memory_type = MemoryType::kCuda;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("pool descriptor: memory_type must be host or cuda, got '", mem, "'"));
  }
  d.num_blocks = static_cast<int64_t>(num_blocks);
  if (d.block_bytes == 0 || num_blocks == 0 || d.bytes / d.block_bytes < num_blocks) {
    return absl::InvalidArgumentError(absl::StrCat("pool descriptor: ", num_blocks, " blocks of ",
                                                   d.block_bytes, " bytes do not fit in ", d.bytes,
                                                   " bytes"));
  }
  return d;
}

absl::StatusOr<std::vector<WriteRange>> CoalesceBlocks(absl::Span<const int32_t> src_blocks,
                                                       absl::Span<const int32_t> dst_blocks,
                                                       uint64_t block_bytes) {
  if (src_blocks.size() != dst_blocks.size()) {
    return absl::InvalidArgumentError(absl::StrCat("transfer: ", src_blocks.size(),
                                                   " source blocks but ", dst_blocks.size(),
                                                   " destination blocks"));
  }
  std::vector<WriteRange> out;
  for (size_t i = 0; i < src_blocks.size(); ++i) {
    if (src_blocks[i] < 0 || dst_blocks[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("transfer: negative block id at position ", i));
    }
    const uint64_t s = static_cast<uint64_t>(src_blocks[i]) * block_bytes;
    const uint64_t d = static_cast<uint64_t>(dst_blocks[i]) * block_bytes;
    if (!out.empty() && out.back().src_offset + out.back().length == s &&
        out.back().dst_offset + out.back().length == d) {
      out.back().length += block_bytes;
    } else {
      out.push_back({s, d, block_bytes});
    }
  }
  return out;
}

std::vector<int32_t> DestinationBlocks(absl::Span<const WriteRange> ranges, uint64_t block_bytes) {
  std::vector<int32_t> out;
  if (block_bytes == 0) return out;
  for (const WriteRange& r : ranges) {
    if (r.length == 0) continue;
    const uint64_t first = r.dst_offset / block_bytes;
    const uint64_t last = (r.dst_offset + r.length - 1) / block_bytes;
    for (uint64_t b = first; b <= last; ++b) out.push_back(static_cast<int32_t>(b));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

absl::Status ValidateRanges(absl::Span<const WriteRange> ranges, uint64_t src_bytes,
                            uint64_t dst_bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> dst;  // [start, end)
  for (size_t i = 0; i < ranges.size(); ++i) {
    const WriteRange& r = ranges[i];
    if (r.length == 0) {
      return absl::InvalidArgumentError(absl::StrCat("transfer: range ", i, " is empty"));
    }
    if (r.src_offset > src_bytes || r.length > src_bytes - r.src_offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("transfer: range ", i, " [", r.src_offset, ", +", r.length,
                       ") lies outside the source pool of ", src_bytes, " bytes"));
    }
    if (r.dst_offset > dst_bytes || r.length > dst_bytes - r.dst_offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("transfer: range ", i, " [", r.dst_offset, ", +", r.length,
                       ") lies outside the destination pool of ", dst_bytes, " bytes"));
    }
    dst.emplace_back(r.dst_offset, r.dst_offset + r.length);
  }
  std::sort(dst.begin(), dst.end());
  for (size_t i = 1; i < dst.size(); ++i) {
    if (dst[i].first < dst[i - 1].second) {
      return absl::InvalidArgumentError(
          absl::StrCat("transfer: destination ranges overlap at byte ", dst[i].first));
    }
  }
  return absl::OkStatus();
}

TransferResult WriteAndWait(KvTransport& transport, const RegisteredMemory& src,
                            const PoolDescriptor& dst, std::vector<WriteRange> ranges,
                            const TransferOptions& options) {
  TransferResult result;
  absl::Notification done;
  absl::StatusOr<TransferId> id =
      transport.Write(src, dst, std::move(ranges), options, [&](TransferResult r) {
        result = std::move(r);
        done.Notify();
      });
  if (!id.ok()) {
    result.status = id.status();
    return result;
  }
  done.WaitForNotification();
  return result;
}

}  // namespace kvrelay::transfer
