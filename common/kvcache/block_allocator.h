// Block ids of one KV pool: reference counts, free runs, and the LRU of cached blocks
// nobody uses. Every block is in exactly one state:
//   free         refcount 0, holds nothing reusable;
//   in use       refcount > 0 (some running sequences hold it; it may also be cached);
//   cached-free  refcount 0 but its KV is in the prefix cache; reusable until evicted.
// Allocation takes free blocks, preferring contiguous runs (a request's KV then moves in
// few large pieces), and evicts cached-free blocks, least recently released first, only
// when too few blocks are free. Not thread-safe (PrefixCache serialises access).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvrelay::kvcache {

struct BlockCounts {
  int64_t total = 0;
  int64_t free = 0;
  int64_t in_use = 0;
  int64_t cached_free = 0;
};

class BlockAllocator {
 public:
  // INVALID_ARGUMENT unless 0 < num_blocks < 2^31.
  static absl::StatusOr<BlockAllocator> Create(int64_t num_blocks);

  // n blocks with refcount 1. Prefers the free run that starts at `hint` (pass the id
  // after a sequence's last block so it grows in place; -1 for none), then the smallest
  // free run that holds all of them, then the longest runs first. Evicts cached-free
  // blocks (LRU first) only when fewer than n are free, appending their ids to *evicted
  // (the caller drops them from its cache). RESOURCE_EXHAUSTED, with nothing changed,
  // when free + cached-free < n; INVALID_ARGUMENT when n < 0.
  absl::StatusOr<std::vector<int32_t>> Allocate(int64_t n, int32_t hint,
                                                std::vector<int32_t>* evicted);

  // +1 reference. A cached-free block leaves the LRU and is in use again; a free one
  // leaves the free runs.
  void Ref(int32_t block);
  // -1 reference on each block, last block first: a sequence's tail enters the LRU
  // before its head, so it is evicted first. At 0 a cached block becomes cached-free
  // (most recently used), any other block free.
  void Release(absl::Span<const int32_t> blocks);

  // Marks whether a block's KV is in the prefix cache. Uncaching a cached-free block
  // frees it.
  void SetCached(int32_t block, bool cached);

  int32_t refcount(int32_t block) const { return refcount_[block]; }
  bool cached(int32_t block) const { return cached_[block]; }
  bool valid(int32_t block) const { return block >= 0 && block < num_blocks_; }
  int32_t num_blocks() const { return num_blocks_; }
  BlockCounts counts() const;
  // Cached-free blocks, least recently released first (the eviction order).
  std::vector<int32_t> LruOrder() const;
  // Number of maximal runs of consecutive free ids.
  int64_t free_runs() const { return static_cast<int64_t>(runs_.size()); }

  // Recomputes every count and structure from the per-block state; INTERNAL naming the
  // first inconsistency. O(num_blocks): for tests and debug checks.
  absl::Status Validate() const;

 private:
  explicit BlockAllocator(int32_t num_blocks);
  void AddFree(int32_t block);                 // merges with neighbouring runs
  void TakeFromRun(int32_t start, int32_t k);  // first k ids of the run at start
  void LruPushBack(int32_t block);
  void LruRemove(int32_t block);

  int32_t num_blocks_;
  std::vector<int32_t> refcount_;
  std::vector<bool> cached_;
  std::map<int32_t, int32_t> runs_;               // free runs: start -> length
  std::set<std::pair<int32_t, int32_t>> by_len_;  // (length, start) of every free run
  int64_t free_ = 0;
  int64_t in_use_ = 0;
  int64_t cached_free_ = 0;
  // LRU of cached-free blocks: intrusive list, sentinel at index num_blocks_.
  std::vector<int32_t> prev_, next_;
};

}  // namespace kvrelay::kvcache
