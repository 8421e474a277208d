// The router's global prefix index (DESIGN §3, §5): chained block hash -> the set of
// worker slots whose prefix cache holds that block, fed by the workers' KV events and
// snapshots. For a prompt's block hashes it answers how many LEADING blocks each
// worker already holds (its overlap). Because hashes are chained, a hit on block i is
// only useful when blocks 0..i-1 also hit on the same worker, so the lookup stops at
// the first block no candidate still holds.
//
// Workers are small integer slots 0..max_workers-1 (the registry assigns them). The
// index must serve fleets of thousands of workers at ~100k lookups/s, so neither its
// memory nor a lookup may grow with the fleet:
//   - A hash's holders are a HolderSet: up to 3 slots inline (most blocks are held by
//     one or two workers), a sorted heap array for more, and a bitmap over the slots in
//     use once the array would be larger than the bitmap (a system prompt every worker
//     caches). Memory per block is ~40-60 bytes whatever the fleet size (measured by
//     router_sim; MemoryBytes() counts it).
//   - Overlaps() returns a sparse OverlapResult: the exact overlap of every slot that
//     holds the first block(s) when few do ("listed"), and, for leading blocks held by
//     many, the nested sets of slots still matching as bitmaps ("levels"). Its cost is
//     one probe per block plus work proportional to the holders of the probed blocks
//     (a bitmap AND per block for widely shared ones), never a pass over every slot.
//
// Not thread-safe: the router serialises access with its own absl::Mutex (events are
// applied under the writer lock, routing decisions read under the reader lock; every
// const method is safe to call concurrently with other const methods).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvrelay::router {

// The overlap of every slot with one prompt, as PrefixIndex::Overlaps leaves it. A slot's
// overlap is either listed explicitly or implied by the levels:
//   listed(): (slot, overlap) for the slots followed one by one (every slot whose
//             overlap is deeper than the deepest level);
//   levels:   (depth d, bitmap A_d) with A_d = the slots holding blocks 0..d-1, nested
//             (deeper levels are subsets), recorded only where some slot drops out. A
//             slot that is not listed has overlap = the deepest level containing it (0 if
//             none).
// Reused across lookups so a routing decision allocates nothing once warm.
class OverlapResult {
 public:
  struct Listed {
    int32_t slot;
    int32_t overlap;
  };

  // The exact leading-block overlap of `slot` (0 for slots holding nothing or out of range).
  int32_t Of(int slot) const;
  // Whether `slot` is in listed().
  bool IsListed(int slot) const;
  // The longest leading run any single slot holds.
  int32_t max() const { return max_; }
  // Every slot with overlap > level_depth(), with its overlap, sorted by slot.
  absl::Span<const Listed> listed() const { return listed_; }
  // The largest overlap of any slot that is NOT listed (0 without levels).
  int32_t level_depth() const { return num_levels_ > 0 ? levels_[num_levels_ - 1].depth : 0; }
  int num_levels() const { return num_levels_; }
  int32_t level_depth(int i) const { return levels_[i].depth; }
  absl::Span<const uint64_t> level_bits(int i) const { return levels_[i].bits; }

  // Writes the overlap of every slot s < out.size() to out[s] (0 for the rest). O(out.size()).
  void Fill(absl::Span<int32_t> out) const;

 private:
  friend class PrefixIndex;
  struct Level {
    int32_t depth = 0;
    std::vector<uint64_t> bits;
  };
  void Clear();
  // A new deepest level (its bits are filled by the caller).
  Level& PushLevel(int32_t depth);

  std::vector<Listed> listed_;
  std::vector<Level> levels_;  // [0, num_levels_) in use; the rest keep their buffers
  int num_levels_ = 0;
  int32_t max_ = 0;
  // Lookup scratch: the candidates still matching, as a bitmap or a sorted list.
  std::vector<uint64_t> alive_;
  std::vector<uint32_t> cand_, next_;
};

class PrefixIndex {
 public:
  static constexpr int kDefaultMaxWorkers = 16384;

  // Slots are [0, max_workers) (max_workers >= 1; smaller values are raised to 1).
  explicit PrefixIndex(int max_workers = kDefaultMaxWorkers);
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;
  PrefixIndex(PrefixIndex&&) = default;
  PrefixIndex& operator=(PrefixIndex&&) = default;

  int max_workers() const { return max_workers_; }

  // The mutators return INVALID_ARGUMENT (and change nothing) when `slot` is not in
  // [0, max_workers); otherwise they cannot fail.

  // Where a worker holds a block (the KV event's tier): its KV pool, or the host-memory
  // or disk tier below it (common/worker/kv_tiers.h). A slot holds a block when any of
  // its tiers does; overlaps count blocks held in any tier, and Split tells how many of
  // them sit in each (the scheduler prices a lower-tier hit between a pool hit and a
  // recompute).
  enum Tier : int { kPool = 0, kHost = 1, kDisk = 2 };
  static constexpr int kNumTiers = 3;

  // `slot` now holds these blocks in `tier` (a `stored` event). Hashes it already holds
  // there are ignored.
  absl::Status Store(int slot, absl::Span<const uint64_t> hashes, Tier tier = kPool);
  // `slot` no longer holds these blocks in `tier` (a `removed` event). Hashes it does not
  // hold are ignored: events may race a snapshot, and a missing block is already the
  // desired state.
  absl::Status Remove(int slot, absl::Span<const uint64_t> hashes, Tier tier = kPool);
  // Forgets the blocks `slot` holds in `tier` (a `cleared` event: the pool's).
  absl::Status ClearTier(int slot, Tier tier);
  // Forgets every block of `slot` in every tier (the worker died or restarted).
  absl::Status ClearWorker(int slot);
  // `slot` holds exactly these blocks (a snapshot): ClearWorker + Store per tier.
  absl::Status ReplaceWorker(int slot, absl::Span<const uint64_t> pool,
                             absl::Span<const uint64_t> host = {},
                             absl::Span<const uint64_t> disk = {});

  // Number of blocks `slot` holds in any tier (0 for a slot out of range).
  int64_t blocks(int slot) const;
  // Number of blocks `slot` holds in `tier`.
  int64_t tier_blocks(int slot, Tier tier) const;
  // Of the first `overlap` blocks of prompt_hashes (which `slot` holds, e.g. its overlap),
  // how many it holds in its pool, and of the others how many in the host tier (the rest:
  // on disk). O(overlap) probes of the slot's own table, none when the slot has nothing
  // below its pool.
  struct TierSplit {
    int32_t pool = 0;
    int32_t host = 0;
    int32_t disk = 0;
  };
  TierSplit Split(int slot, absl::Span<const uint64_t> prompt_hashes, int32_t overlap) const;
  // Number of distinct hashes held by any worker.
  size_t size() const { return holders_.size(); }
  // Number of (slot, hash) pairs: the sum of blocks() over all slots.
  int64_t held() const { return held_; }

  // The hot path: the overlap of every slot with `prompt_hashes` (see OverlapResult).
  // Probes the table once per block and stops at the first block that no slot still
  // matching holds.
  void Overlaps(absl::Span<const uint64_t> prompt_hashes, OverlapResult* out) const;
  // Dense form: out[s] = the overlap of slot s for every s < out.size(). O(out.size()) on
  // top of the lookup; for tests and small fleets.
  void Overlaps(absl::Span<const uint64_t> prompt_hashes, absl::Span<int32_t> out) const;
  // Overlap of one slot (0 for a slot out of range).
  int32_t Overlap(int slot, absl::Span<const uint64_t> prompt_hashes) const;
  // The longest leading run of prompt_hashes held by any single worker.
  int32_t MaxOverlap(absl::Span<const uint64_t> prompt_hashes) const;

  // Bytes the index's containers hold (tables at their capacity, holder arrays and
  // bitmaps, the per-slot sets), computed from their sizes; excludes allocator overhead.
  size_t MemoryBytes() const;

 private:
  // The slots holding one block. 16 bytes: up to kInline slots in place, else a sorted
  // array or a bitmap on the heap. Slots are stored as uint32.
  class HolderSet {
   public:
    HolderSet() = default;
    HolderSet(const HolderSet&) = delete;
    HolderSet& operator=(const HolderSet&) = delete;
    HolderSet(HolderSet&& o) noexcept;
    HolderSet& operator=(HolderSet&& o) noexcept;
    ~HolderSet() { Free(); }

    uint32_t size() const { return meta_ & kCountMask; }
    bool empty() const { return size() == 0; }
    bool is_bitmap() const { return mode() == kBitmap; }
    bool Contains(uint32_t slot) const;
    // `slot` must not be present / must be present. `words` is the index's bitmap width
    // (slots in use / 64, rounded up): the set turns into a bitmap when an array would
    // be larger than that, and back into an array when it falls well below.
    void Insert(uint32_t slot, uint32_t words);
    void Erase(uint32_t slot, uint32_t words);
    // The sorted slots (array and inline modes only).
    absl::Span<const uint32_t> slots() const;
    // The bitmap (bitmap mode only); may be shorter than the index's width.
    absl::Span<const uint64_t> bits() const;
    // Calls f(slot) for every holder in increasing order.
    template <typename F>
    void ForEach(F f) const;
    size_t HeapBytes() const;

   private:
    static constexpr uint32_t kInline = 3;
    static constexpr uint32_t kCountMask = (1u << 30) - 1;
    enum Mode : uint32_t { kInlineMode = 0, kArray = 1u << 30, kBitmap = 2u << 30 };
    Mode mode() const { return static_cast<Mode>(meta_ & ~kCountMask); }
    void SetMeta(Mode m, uint32_t n) { meta_ = static_cast<uint32_t>(m) | n; }
    // Heap modes: w_[0] is the capacity (array: slots, bitmap: words) and w_[1..2] the
    // pointer (memcpy'd: w_ is only 4-byte aligned, which keeps the set at 16 bytes).
    void* heap() const;
    void SetHeap(void* p, uint32_t capacity);
    uint32_t capacity() const { return w_[0]; }
    void Free();
    void ToBitmap(uint32_t words);
    void ToArray();

    uint32_t meta_ = 0;         // count | mode
    uint32_t w_[kInline] = {};  // inline: the slots; heap: capacity + pointer
  };
  static_assert(sizeof(void*) <= 2 * sizeof(uint32_t), "the heap pointer must fit in w_[1..2]");

  absl::Status CheckSlot(int slot) const;
  // Removes `slot` from the holders of `hash`; erases the entry when nobody is left.
  void DropFromHolders(int slot, uint64_t hash);

  int max_workers_;
  // Width of the holder bitmaps: enough words for every slot that ever held a block.
  uint32_t words_ = 1;
  absl::flat_hash_map<uint64_t, HolderSet> holders_;
  // Per-slot tables hash -> bit mask of the tiers holding it (grown to the highest slot
  // used), so a worker's blocks can be counted and dropped without scanning the whole
  // table; and per slot the blocks of each tier.
  std::vector<absl::flat_hash_map<uint64_t, uint8_t>> by_slot_;
  std::vector<std::array<int64_t, kNumTiers>> tier_count_;
  int64_t held_ = 0;
};

}  // namespace kvrelay::router
