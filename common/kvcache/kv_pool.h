// The paged KV pool: one allocation of num_blocks blocks in the DESIGN §3 layout.
// Which blocks are in use is the business of BlockAllocator / PrefixCache.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/paged_kv.h"

namespace kvrelay::kvcache {

class KvPool {
 public:
  // INVALID_ARGUMENT when the geometry is empty; RESOURCE_EXHAUSTED when memory can't be had.
  static absl::StatusOr<std::unique_ptr<KvPool>> Create(const kernels::PagedKvLayout& layout,
                                                        int64_t num_blocks);
  // A pool over memory someone else owns (e.g. registered with a KV transport, so
  // peers can write into it): at least num_blocks * block_bytes bytes at `base`, which
  // must outlive the pool. Same checks as Create, plus INVALID_ARGUMENT when the
  // memory is too small. `memory` says where it is (device memory for a CUDA backend: the
  // pool's bytes are then only touched through that backend).
  static absl::StatusOr<std::unique_ptr<KvPool>> Wrap(
      const kernels::PagedKvLayout& layout, int64_t num_blocks, uint8_t* base, size_t bytes,
      kernels::MemoryKind memory = kernels::MemoryKind::kHost);
  // The checks Create and Wrap make of the geometry (INVALID_ARGUMENT saying what is wrong).
  static absl::Status CheckGeometry(const kernels::PagedKvLayout& layout, int64_t num_blocks);
  ~KvPool();
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  const kernels::PagedKvView& view() const { return view_; }
  const kernels::PagedKvLayout& layout() const { return view_.layout; }
  int64_t num_blocks() const { return view_.num_blocks; }
  size_t bytes() const { return bytes_; }

 private:
  KvPool() = default;
  kernels::PagedKvView view_;
  size_t bytes_ = 0;
  bool owned_ = true;
};

// Blocks needed to hold `tokens` tokens.
inline int64_t BlocksFor(int64_t tokens, int block_size) {
  return (tokens + block_size - 1) / block_size;
}

}  // namespace kvrelay::kvcache
