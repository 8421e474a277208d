#include "common/kvcache/kv_pool.h"

#include <sys/mman.h>

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvrelay::kvcache {

absl::Status KvPool::CheckGeometry(const kernels::PagedKvLayout& layout, int64_t num_blocks) {
  if (layout.num_layers <= 0 || layout.block_size <= 0 || layout.num_kv_heads <= 0 ||
      layout.head_dim <= 0) {
    return absl::InvalidArgumentError(
        "kv pool: layers, block_size, kv_heads and head_dim must be > 0");
  }
  if (num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv pool: num_blocks must be > 0, got ", num_blocks));
  }
  if (num_blocks > std::numeric_limits<int32_t>::max() ||
      static_cast<uint64_t>(num_blocks) >
          std::numeric_limits<size_t>::max() / layout.block_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("kv pool: num_blocks ", num_blocks,
                                                   " is too large (block ids are 32-bit and ",
                                                   layout.block_bytes(), " bytes each)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<KvPool>> KvPool::Create(const kernels::PagedKvLayout& layout,
                                                       int64_t num_blocks) {
  if (absl::Status s = CheckGeometry(layout, num_blocks); !s.ok()) return s;
  std::unique_ptr<KvPool> pool(new KvPool());
  pool->bytes_ = layout.block_bytes() * static_cast<size_t>(num_blocks);
  // Anonymous mapping: page aligned, zero filled, pages committed on first touch.
  void* p =
      ::mmap(nullptr, pool->bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("kv pool: cannot map ", pool->bytes_, " bytes for ", num_blocks, " blocks"));
  }
  pool->view_.layout = layout;
  pool->view_.base = static_cast<uint8_t*>(p);
  pool->view_.num_blocks = num_blocks;
  return pool;
}

absl::StatusOr<std::unique_ptr<KvPool>> KvPool::Wrap(const kernels::PagedKvLayout& layout,
                                                     int64_t num_blocks, uint8_t* base,
                                                     size_t bytes, kernels::MemoryKind memory) {
  if (absl::Status s = CheckGeometry(layout, num_blocks); !s.ok()) return s;
  const size_t need = layout.block_bytes() * static_cast<size_t>(num_blocks);
  if (base == nullptr || bytes < need) {
    return absl::InvalidArgumentError(absl::StrCat("kv pool: ", num_blocks, " blocks need ", need,
                                                   " bytes; the memory given has ", bytes));
  }
  std::unique_ptr<KvPool> pool(new KvPool());
  pool->bytes_ = need;
  pool->owned_ = false;
  pool->view_.layout = layout;
  pool->view_.base = base;
  pool->view_.num_blocks = num_blocks;
  pool->view_.memory = memory;
  return pool;
}

KvPool::~KvPool() {
  if (owned_ && view_.base != nullptr) ::munmap(view_.base, bytes_);
}

}  // namespace kvrelay::kvcache
