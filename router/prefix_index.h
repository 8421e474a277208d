// The router's global prefix index (DESIGN §3, §5): chained block hash -> the set of
// worker slots whose prefix cache holds that block, fed by the workers' KV events and
// snapshots. For a prompt's block hashes it answers, for every worker at once, how many
// LEADING blocks that worker already holds (its overlap). Because hashes are chained, a
// hit on block i is only useful when blocks 0..i-1 also hit on the same worker, so the
// lookup stops at the first block no candidate still holds.
//
// Workers are small integer slots 0..kMaxWorkers-1 (the registry assigns them), so a
// hash's holders are a fixed 256-bit set: Overlaps() is one hash-table probe plus a few
// word ANDs per block, independent of the number of workers.
//
// Not thread-safe: the router serialises access with its own absl::Mutex (events are
// applied under the writer lock, routing decisions read under the reader lock; every
// const method is safe to call concurrently with other const methods).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvrelay::router {

class PrefixIndex {
 public:
  static constexpr int kMaxWorkers = 256;

  PrefixIndex() = default;
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;
  PrefixIndex(PrefixIndex&&) = default;
  PrefixIndex& operator=(PrefixIndex&&) = default;

  // The mutators return INVALID_ARGUMENT (and change nothing) when `slot` is not in
  // [0, kMaxWorkers); otherwise they cannot fail.

  // `slot` now holds these blocks (a `stored` event). Hashes it already holds are ignored.
  absl::Status Store(int slot, absl::Span<const uint64_t> hashes);
  // `slot` no longer holds these blocks (a `removed` event). Hashes it does not hold are
  // ignored: events may race a snapshot, and a missing block is already the desired state.
  absl::Status Remove(int slot, absl::Span<const uint64_t> hashes);
  // Forgets every block of `slot` (a `cleared` event, or the worker died or restarted).
  absl::Status ClearWorker(int slot);
  // `slot` holds exactly these blocks (a snapshot): ClearWorker + Store.
  absl::Status ReplaceWorker(int slot, absl::Span<const uint64_t> hashes);

  // Number of blocks `slot` holds (0 for a slot out of range).
  int64_t blocks(int slot) const;
  // Number of distinct hashes held by any worker.
  size_t size() const { return holders_.size(); }

  // The hot path. For every slot s < out.size(): out[s] = the number of leading
  // prompt_hashes that slot s holds (0 for slots >= kMaxWorkers). Probes the table
  // once per block and stops at the first block that no slot still matching holds.
  void Overlaps(absl::Span<const uint64_t> prompt_hashes, absl::Span<int32_t> out) const;
  // Overlap of one slot (0 for a slot out of range).
  int32_t Overlap(int slot, absl::Span<const uint64_t> prompt_hashes) const;
  // The longest leading run of prompt_hashes held by any single worker.
  int32_t MaxOverlap(absl::Span<const uint64_t> prompt_hashes) const;

 private:
  // Bit s of word s/64 set: slot s holds the block.
  struct Mask {
    std::array<uint64_t, kMaxWorkers / 64> w{};
  };
  static_assert(kMaxWorkers % 64 == 0, "Mask words must cover kMaxWorkers exactly");

  // Clears `slot`'s bit in the holders of `hash`; erases the entry when nobody is left.
  void DropFromHolders(int slot, uint64_t hash);

  absl::flat_hash_map<uint64_t, Mask> holders_;
  // Per-slot hash sets, so a worker's blocks can be counted and dropped without
  // scanning the whole table.
  std::array<absl::flat_hash_set<uint64_t>, kMaxWorkers> by_slot_;
  // Slots holding at least one block: a lookup starts with only these as candidates,
  // so an empty fleet (or one holding nothing) costs no probes at all.
  Mask nonempty_;
};

}  // namespace kvrelay::router
