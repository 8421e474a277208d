// KV events (DESIGN §3): what a worker's prefix cache tells the router's index.
//   stored(parent_hash, hashes[])  blocks now cached, a chain continuing parent_hash
//                                  (no parent: the chain starts at the root);
//   removed(hashes[])              blocks evicted;
//   cleared                        everything forgotten.
// Each event names the tier it is about (DESIGN §3; common/worker/kv_tiers.h): the primary
// pool, or the host-memory and disk tiers that evicted blocks are copied down to. A
// `cleared` event is about the pool only.
// Every event carries a per-pool sequence number (1, 2, ...) and the pool's
// incarnation id (new on every start). The EventLog keeps the latest events in a
// bounded ring; a reader that asks for events the log no longer holds is told to take
// a snapshot. EventReplica is the reading side: it applies events and snapshots and
// detects gaps and restarts.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"

namespace kvrelay::kvcache {

// Where a cached block lives. kPool: the worker's primary KV pool (device memory with a
// GPU); kHost, kDisk: the lower tiers.
enum class KvTier { kPool = 0, kHost = 1, kDisk = 2 };
inline constexpr int kNumKvTiers = 3;
const char* KvTierName(KvTier tier);  // "pool", "host", "disk"

struct KvEvent {
  enum class Type { kStored, kRemoved, kCleared };
  Type type = Type::kStored;
  KvTier tier = KvTier::kPool;
  uint64_t seq = 0;
  std::optional<uint64_t> parent_hash;  // kStored only
  std::vector<uint64_t> hashes;         // kStored, kRemoved
};

std::string DebugString(const KvEvent& e);

// Events from one read of the log.
struct KvEventBatch {
  uint64_t incarnation = 0;
  // The log no longer holds from_seq (or never will): take a snapshot and resume from it.
  bool need_snapshot = false;
  std::vector<KvEvent> events;  // consecutive seqs starting at the requested one
  uint64_t next_seq = 0;        // seq to ask for next
};

struct CachedBlockInfo {
  uint64_t hash = 0;
  std::optional<uint64_t> parent_hash;
  KvTier tier = KvTier::kPool;
};

// Every cached block, consistent with the event stream up to and including `seq`.
struct KvSnapshot {
  uint64_t incarnation = 0;
  uint64_t seq = 0;                     // the last event reflected; resume reading at seq + 1
  std::vector<CachedBlockInfo> blocks;  // a hash in several tiers is listed once per tier
};

// Bounded event log. Not thread-safe (PrefixCache serialises access).
class KvEventLog {
 public:
  // capacity >= 1 events kept.
  KvEventLog(uint64_t incarnation, size_t capacity);
  // Assigns the next sequence number; returns it.
  uint64_t Append(KvEvent event);
  // Up to max_events events with seq >= from_seq. need_snapshot when from_seq is older
  // than the oldest event kept or newer than the next one to be written.
  KvEventBatch Read(uint64_t from_seq, size_t max_events) const;
  uint64_t incarnation() const { return incarnation_; }
  uint64_t last_seq() const { return next_seq_ - 1; }

 private:
  uint64_t incarnation_;
  size_t capacity_;
  uint64_t next_seq_ = 1;
  std::deque<KvEvent> events_;  // seqs next_seq_ - size() .. next_seq_ - 1
};

// One reader's copy of a pool's cached hashes (the pool tier's; events and snapshot
// entries of the lower tiers are skipped), kept by applying events.
class KvEventReplica {
 public:
  // Applies a batch. Returns false, changing nothing, when the batch says need_snapshot,
  // comes from another incarnation, or does not continue where the replica is (a gap):
  // the caller then applies a snapshot.
  bool Apply(const KvEventBatch& batch);
  void ApplySnapshot(const KvSnapshot& snapshot);

  bool synced() const { return synced_; }
  uint64_t incarnation() const { return incarnation_; }
  uint64_t next_seq() const { return next_seq_; }
  const absl::flat_hash_set<uint64_t>& hashes() const { return hashes_; }

 private:
  bool synced_ = false;
  uint64_t incarnation_ = 0;
  uint64_t next_seq_ = 1;
  absl::flat_hash_set<uint64_t> hashes_;
};

}  // namespace kvrelay::kvcache
