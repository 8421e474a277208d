#include "common/kvcache/kv_pool.h"

#include <sys/mman.h>

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvrelay::kvcache {

absl::StatusOr<std::unique_ptr<KvPool>> KvPool::Create(const kernels::PagedKvLayout& layout,
                                                       int64_t num_blocks) {
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
  for (int32_t b = 0; b < num_blocks; ++b) pool->free_.insert(pool->free_.end(), b);
  return pool;
}

KvPool::~KvPool() {
  if (view_.base != nullptr) ::munmap(view_.base, bytes_);
}

absl::StatusOr<std::vector<int32_t>> KvPool::Allocate(int64_t n) {
  if (n < 0) return absl::InvalidArgumentError("kv pool: negative block count");
  if (n > num_free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("kv pool: need ", n, " blocks, ", num_free(), " free of ", num_blocks()));
  }
  std::vector<int32_t> out;
  out.reserve(n);
  // First run of n consecutive free ids, if any.
  int32_t run_start = -1, run_len = 0, prev = -2;
  for (int32_t b : free_) {
    if (b == prev + 1) {
      ++run_len;
    } else {
      run_start = b;
      run_len = 1;
    }
    prev = b;
    if (run_len == n) break;
  }
  if (n > 0 && run_len == n) {
    for (int32_t b = run_start; b < run_start + n; ++b) {
      free_.erase(b);
      out.push_back(b);
    }
    return out;
  }
  while (static_cast<int64_t>(out.size()) < n) {
    out.push_back(*free_.begin());
    free_.erase(free_.begin());
  }
  return out;
}

void KvPool::Free(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) free_.insert(b);
}

}  // namespace kvrelay::kvcache
