// The lower tiers of a worker's KV cache (DESIGN §3): a host-memory tier and a disk tier
// under the primary pool, as Dynamo's KV block manager, LMCache and SGLang's HiCache keep
// them. Long multi-turn and agent prefixes come back minutes after the pool evicted them;
// reloading their KV costs a copy instead of a prefill.
//
//   offload  Every block the pool's prefix cache newly caches (PrefixCache::StoreListener)
//            is pinned in the pool and copied to the host tier by the store's own thread,
//            off the engine's step loop; the pin is dropped once the copy is made, so the
//            pool can evict the block at will and its KV survives below (write-through,
//            like vLLM's CPU offloading connector and LMCache). A block the host tier
//            evicts (LRU) goes down to the disk tier; one the disk tier evicts is dropped.
//            With a disk tier and no host tier, blocks are written straight to disk.
//            When too many pool blocks wait for their copy (a backlog), or a tier is full
//            of pinned blocks, or a disk write fails (a full disk), the offload is skipped
//            and counted: never an error for a request.
//   reload   Lookup finds the longest run of a prompt's next blocks that a lower tier
//            holds with the same chained hashes and the same token ids (exact reuse: the
//            hash names model_id + cache_salt, so tenants never share), and pins them.
//            Reload copies them into pool blocks the caller reserved, on the store's
//            thread, verifying each block's XXH3 checksum (the transfer checksum) on the
//            way: a corrupt block (and every block after it) is dropped from its tier and
//            recomputed by the caller, never used. A disk hit is promoted to the host tier.
//   disk     One file per block, "<hash>.kvb" in --kv_disk_dir (common/kvcache/disk_block.h:
//            a header naming model, dtype and block geometry, then the bytes). A worker
//            that starts on a folder of blocks indexes every file that fits its pool
//            (LRU order by modification time) and ignores the rest; files are written as
//            "<hash>.tmp" and renamed, so a crash leaves no half block behind.
//   events   Each tier change is a `stored`/`removed` event with its tier in the pool's
//            KV event stream (PrefixCache::RecordTierEvent), so the router's index knows
//            what each worker holds where.
//
// One thread does every copy and file operation; Lookup, Reload and the offload hook may
// be called from any thread. Copies go through the model's backend (memcpy on CPU; on a
// CUDA backend, copies between device and host memory).
//
// Series (in options.metrics):
//   kvrelay_kv_tier_blocks{tier}, kvrelay_kv_tier_bytes{tier},
//   kvrelay_kv_tier_capacity_bytes{tier}                      (tier: host | disk)
//   kvrelay_kv_tier_offload_bytes_total{tier}, kvrelay_kv_tier_offload_seconds{tier}
//   kvrelay_kv_tier_reload_bytes_total{tier}, kvrelay_kv_tier_reload_seconds
//   kvrelay_kv_tier_hits_total{tier}           blocks reused from the tier
//   kvrelay_kv_tier_evictions_total{tier}
//   kvrelay_kv_tier_offload_skipped_total{tier,reason}  backlog | full | write_error
//   kvrelay_kv_tier_corrupt_blocks_total{tier}          failed their checksum on reload
//   kvrelay_kv_tier_ignored_files_total                 disk files of another model/geometry
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/kvcache/disk_block.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "kernels/backend.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvrelay::worker {

struct KvTierOptions {
  uint64_t host_bytes = 0;  // --kv_host_bytes; 0: no host tier
  std::string disk_dir;     // --kv_disk_dir; empty: no disk tier
  uint64_t disk_bytes = 0;  // --kv_disk_bytes; required with disk_dir
  std::string model_id;     // written into (and checked against) disk block headers
  // Pool blocks pinned while they wait for their copy down; offloads beyond are skipped.
  // 0: a quarter of the pool.
  int64_t max_pending_offload_blocks = 0;
  std::shared_ptr<prometheus::Registry> metrics;  // null: a registry of the store's own

  bool enabled() const { return host_bytes > 0 || !disk_dir.empty(); }
};

struct KvTierCounts {
  int64_t blocks = 0;
  int64_t capacity_blocks = 0;
  int64_t pinned = 0;
};

struct KvTierStats {
  int64_t offloaded[2] = {0, 0};  // blocks written to host, disk
  int64_t reloaded[2] = {0, 0};   // blocks reused from host, disk
  int64_t skipped = 0;            // offloads skipped (backlog, full, write error)
  int64_t write_errors = 0;       // of which disk writes that failed
  int64_t corrupt = 0;            // blocks that failed their checksum on reload
  int64_t ignored_files = 0;      // disk files of another model or geometry
};

class KvTierStore {
 public:
  // Pinned lower-tier blocks for one reload (from Lookup). Unpinned by Reload, or when
  // dropped unused.
  class ReloadPlan {
   public:
    ReloadPlan() = default;
    ReloadPlan(ReloadPlan&& o) noexcept;
    ReloadPlan& operator=(ReloadPlan&& o) noexcept;
    ReloadPlan(const ReloadPlan&) = delete;
    ReloadPlan& operator=(const ReloadPlan&) = delete;
    ~ReloadPlan();
    int64_t size() const { return static_cast<int64_t>(items_.size()); }
    bool empty() const { return items_.empty(); }

   private:
    friend class KvTierStore;
    struct Item {
      kvcache::KvTier tier;
      uint64_t hash;
    };
    KvTierStore* store_ = nullptr;
    std::vector<Item> items_;
  };

  struct ReloadResult {
    int64_t loaded = 0;  // leading blocks of the plan now in the destination blocks
    int64_t from_host = 0, from_disk = 0;
    double seconds = 0;
  };

  // INVALID_ARGUMENT naming the flag when a tier cannot hold a single block or
  // --kv_disk_dir comes without --kv_disk_bytes; the file system's error when the disk
  // folder cannot be made. Indexes the blocks already in the disk folder (a `stored`
  // event each) and hooks offloading into `cache` (its StoreListener). `pool`, `cache` and
  // `backend` must outlive the store.
  static absl::StatusOr<std::unique_ptr<KvTierStore>> Create(const KvTierOptions& options,
                                                             kvcache::KvPool* pool,
                                                             kvcache::PrefixCache* cache,
                                                             kernels::Backend* backend);
  // Finishes queued reloads, drops queued offloads (their pool blocks unpinned), stops.
  ~KvTierStore();
  KvTierStore(const KvTierStore&) = delete;
  KvTierStore& operator=(const KvTierStore&) = delete;

  // The longest run of `hashes` (the chain continuing `parent`; nullopt: from the root)
  // held by a lower tier, each block's token ids equal to tokens[i*B, (i+1)*B), pinned.
  ReloadPlan Lookup(std::optional<uint64_t> parent, absl::Span<const uint64_t> hashes,
                    absl::Span<const int32_t> tokens);
  // Copies the plan's blocks into the pool blocks `dest` (at least plan.size() of them,
  // reserved by the caller and not touched by it until `done`), on the store's thread.
  // `done` runs there, once, with how many leading blocks arrived intact.
  void Reload(ReloadPlan plan, std::vector<int32_t> dest,
              std::function<void(const ReloadResult&)> done);
  // Reload, waiting for the result (a prefill worker's job thread).
  ReloadResult ReloadNow(ReloadPlan plan, std::vector<int32_t> dest);

  // Waits until every offload and reload queued so far is done (tests, benchmarks).
  void WaitIdle();

  KvTierCounts counts(kvcache::KvTier tier) const;
  KvTierStats stats() const;

 private:
  struct Entry {
    std::optional<uint64_t> parent;
    std::vector<int32_t> tokens;
    uint64_t checksum = 0;
    int32_t slot = -1;  // host tier: the arena slot
    int pins = 0;
    std::list<uint64_t>::iterator lru;
  };
  struct Tier {
    absl::flat_hash_map<uint64_t, Entry> map;
    std::list<uint64_t> lru;  // front: least recently used
    int64_t capacity = 0;     // blocks
    int64_t pinned = 0;
  };
  struct OffloadJob {
    kvcache::StoredRun run;
  };
  struct ReloadJob {
    ReloadPlan plan;
    std::vector<int32_t> dest;
    std::function<void(const ReloadResult&)> done;
  };
  struct Metrics;

  KvTierStore(const KvTierOptions& options, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
              kernels::Backend* backend, int64_t host_slots, int64_t disk_files);
  absl::Status ScanDisk();
  void OnStored(const kvcache::StoredRun& run);  // the cache's StoreListener
  void Loop();
  void RunOffload(OffloadJob& job);
  void RunReload(ReloadJob& job);
  // Puts one block (its bytes in host memory) into the host tier, demoting the least
  // recently used unpinned block to disk when the tier is full. False when skipped.
  bool PutHost(uint64_t hash, const Entry& meta, const uint8_t* data);
  // Writes one block to the disk tier, evicting the least recently used unpinned files
  // to make room. False when skipped (full of pinned blocks, or the write failed).
  bool PutDisk(uint64_t hash, const Entry& meta, const uint8_t* data);
  absl::Status WriteBlockFile(uint64_t hash, const Entry& meta, const uint8_t* data);
  // Reads and checks one disk block into `data`; DATA_LOSS when it is not the block `meta`
  // describes or its bytes fail the checksum.
  absl::Status ReadBlockFile(uint64_t hash, const Entry& meta, uint8_t* data);
  void Unpin(const ReloadPlan& plan);
  void Touch(Tier& t, Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes an entry (its `removed` event; a host slot goes back to the free list; a
  // disk file is named in *unlink for the caller to delete outside the lock).
  void Erase(kvcache::KvTier tier, uint64_t hash, std::vector<std::string>* unlink)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The least recently used unpinned entry of a tier, if any.
  std::optional<uint64_t> Victim(const Tier& t) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void RecordEvent(kvcache::KvTier tier, kvcache::KvEvent::Type type,
                   std::optional<uint64_t> parent, uint64_t hash);
  void UpdateGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string PathOf(uint64_t hash) const;
  Tier& tier(kvcache::KvTier t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return t == kvcache::KvTier::kHost ? host_ : disk_;
  }

  const KvTierOptions options_;
  kvcache::KvPool* const pool_;
  kvcache::PrefixCache* const cache_;
  kernels::Backend* const backend_;
  const uint64_t block_bytes_;
  const int64_t host_slots_, disk_files_;  // the tiers' capacities (0: no such tier)
  const kvcache::DiskBlockIdentity identity_;
  const size_t header_bytes_;
  const int64_t max_pending_;
  const std::shared_ptr<prometheus::Registry> registry_;
  const std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<uint8_t[]> arena_;  // host tier: host_.capacity slots of block_bytes_
  std::vector<uint8_t> scratch_;      // tier thread: one block (disk reads, disk-only offload)

  mutable absl::Mutex mu_;
  Tier host_ ABSL_GUARDED_BY(mu_);
  Tier disk_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> free_slots_ ABSL_GUARDED_BY(mu_);
  std::deque<OffloadJob> offloads_ ABSL_GUARDED_BY(mu_);
  std::deque<ReloadJob> reloads_ ABSL_GUARDED_BY(mu_);
  int64_t pending_pool_blocks_ ABSL_GUARDED_BY(mu_) = 0;  // pinned for queued offloads
  int64_t busy_ ABSL_GUARDED_BY(mu_) = 0;                 // jobs taken, not yet done
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  KvTierStats stats_ ABSL_GUARDED_BY(mu_);
  bool write_error_logged_ ABSL_GUARDED_BY(mu_) = false;

  std::thread thread_;
};

}  // namespace kvrelay::worker
