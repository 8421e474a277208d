// The prefix cache of one KV pool (DESIGN §3): block allocation with reference counts,
// hash -> block with the block's token ids kept (a hit needs the tokens to match
// exactly), LRU eviction of cached blocks nobody uses, and the KV event stream.
// Thread-safe: the engine allocates and stores on its thread while the events and
// snapshots are read from others.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/kvcache/block_allocator.h"
#include "common/kvcache/kv_events.h"

namespace kvrelay::kvcache {

struct PrefixCacheCounts : BlockCounts {
  int64_t cached = 0;   // blocks with a hash (in use or cached-free)
  int64_t evicted = 0;  // cached blocks evicted to make room, since creation (cumulative)
};

// Blocks that one Store call newly cached, a chain continuing `parent`.
struct StoredRun {
  std::optional<uint64_t> parent;
  std::vector<int32_t> blocks;
  std::vector<uint64_t> hashes;
  std::vector<int32_t> tokens;  // blocks.size() x block_size
};

class PrefixCache {
 public:
  struct Options {
    int64_t num_blocks = 0;
    int block_size = 16;
    uint64_t incarnation = 0;  // new on every start; see NewIncarnationId()
    size_t event_log_capacity = 4096;
  };
  // INVALID_ARGUMENT on a bad block count or block size.
  static absl::StatusOr<std::unique_ptr<PrefixCache>> Create(const Options& options);

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  uint64_t incarnation() const { return incarnation_; }

  // Number of leading full blocks of `tokens` that are cached: block i is a hit when
  // hashes[i] (its chained hash) is cached, its parent hash is hashes[i-1] (or none for
  // i = 0) and its token ids equal tokens[i*B, (i+1)*B). At most hashes.size() blocks.
  // Changes nothing.
  int64_t Lookup(absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens) const;

  // As Lookup, and takes a reference on each hit block (it is then in use and cannot
  // be evicted until released). Returns their ids in order.
  std::vector<int32_t> Acquire(absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens);

  // n new blocks (refcount 1), preferring the run starting at `hint`; evicts cached
  // blocks nobody uses (LRU first; a `removed` event) only if too few are free.
  // RESOURCE_EXHAUSTED when even eviction cannot provide n.
  absl::StatusOr<std::vector<int32_t>> Allocate(int64_t n, int32_t hint = -1);

  // Registers computed full blocks: blocks[i] holds tokens[i*B, (i+1)*B) and has hash
  // hashes[i]; the chain continues `parent` (nullopt: it starts at the root). Blocks
  // must be in use by the caller. A hash already cached (another sequence computed the
  // same block first) leaves that block uncached: it is freed on release. Emits one
  // `stored` event per run of newly cached blocks.
  void Store(std::optional<uint64_t> parent, absl::Span<const int32_t> blocks,
             absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens);

  // +1 reference on each block (blocks the caller already holds: e.g. the tier store pins
  // the blocks a StoreListener reports while it copies them down). Release drops it.
  void Ref(absl::Span<const int32_t> blocks);

  // Called, on the thread that called Store and after the cache's lock is released, with
  // the runs of blocks each Store newly cached (while the caller still holds them). Set
  // once, before the cache is used (the lower tiers' offload hook; null: none).
  using StoreListener = std::function<void(const StoredRun&)>;
  void SetStoreListener(StoreListener listener);

  // A lower tier (host, disk) now holds (kStored) or no longer holds (kRemoved) these
  // blocks: the event joins the pool's stream, and snapshots list the tier's blocks.
  // `parent` is the chain parent of hashes[0] (kStored; each later hash's parent is the
  // one before it). INVALID_ARGUMENT for the pool tier or a kCleared event.
  absl::Status RecordTierEvent(KvTier tier, KvEvent::Type type, std::optional<uint64_t> parent,
                               absl::Span<const uint64_t> hashes);
  // Blocks a tier holds as its events said (the pool: cached blocks).
  int64_t tier_blocks(KvTier tier) const;

  // Drops one reference on each block, last first (a sequence's tail is evicted before
  // its head). Cached blocks stay reusable; others become free.
  void Release(absl::Span<const int32_t> blocks);

  // Forgets every cached block (`cleared` event). Blocks in use stay with their
  // sequences and are freed when released.
  void Clear();

  PrefixCacheCounts counts() const;
  KvEventBatch ReadEvents(uint64_t from_seq, size_t max_events) const;
  // The seq of the last event written (0 before the first).
  uint64_t last_event_seq() const;
  KvSnapshot Snapshot() const;

  // Checks allocator and cache structures against each other (tests; O(num_blocks)).
  absl::Status Validate() const;

 private:
  PrefixCache(const Options& options, BlockAllocator allocator);
  int64_t LookupLocked(absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens,
                       std::vector<int32_t>* hits) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Uncache(int32_t block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StoreLocked(std::optional<uint64_t> parent, absl::Span<const int32_t> blocks,
                   absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens,
                   std::vector<StoredRun>* runs) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int block_size_;
  const int64_t num_blocks_;
  const uint64_t incarnation_;

  mutable absl::Mutex mu_;
  BlockAllocator alloc_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, int32_t> by_hash_ ABSL_GUARDED_BY(mu_);
  // Per block, meaningful while alloc_.cached(block):
  std::vector<uint64_t> hash_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> parent_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> has_parent_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);  // num_blocks x block_size
  KvEventLog log_ ABSL_GUARDED_BY(mu_);
  int64_t evicted_ ABSL_GUARDED_BY(mu_) = 0;
  // The lower tiers' blocks as their events said (hash -> chain parent), for snapshots.
  absl::flat_hash_map<uint64_t, std::optional<uint64_t>> tier_blocks_[kNumKvTiers] ABSL_GUARDED_BY(
      mu_);
  StoreListener listener_;  // set before use, then only read
};

// A random 64-bit id for a pool's incarnation (non-zero).
uint64_t NewIncarnationId();

}  // namespace kvrelay::kvcache
