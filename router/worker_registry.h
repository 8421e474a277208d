// The router's view of the fleet (DESIGN §5): every registered worker with its last
// load report, and the global prefix index fed by the workers' KV events. Pure state,
// no gRPC: RegistryService calls it for each stream message, the generation service
// reads it to route. Thread-safe.
//
// Built for fleets of thousands of workers: slots are allocated as workers arrive (up
// to max_workers), and a routing decision (Route) costs the same at 10 workers as at
// 10,000 -- the prefix index answers sparsely and the workers are kept in load order
// (FleetOrder), so nothing is copied or scanned per worker. View() still copies the
// whole fleet, for tests and diagnostics only.
//
// A worker's index entries are trusted only while its event stream is in step: events
// are applied when they continue exactly where the last one left off (same
// incarnation, next seq). A gap, an unknown incarnation or a new registration drops the
// worker's entries and asks for a snapshot; until it arrives the worker counts as
// holding nothing (a routing miss costs a recompute, a wrong hit would cost more). A
// worker whose stream ends or that misses its heartbeat deadline is dead: its entries
// leave the index at once.
//
// Metrics (DESIGN §7), in the registry given (or a private one), updated where the state
// changes:
//   kvrelay_router_index_blocks              gauge: distinct block hashes in the index
//   kvrelay_router_index_resyncs_total       counter: snapshots applied (after a
//                                            registration, a gap or a revival)
//   kvrelay_router_kv_events_total           counter: KV events applied
//   kvrelay_router_workers{role,state}       gauge: role prefill | decode, state alive | dead
//   kvrelay_router_worker_deaths_total{reason}  counter: disconnected | heartbeat_timeout
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvrelay/v1/registry.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "router/prefix_index.h"
#include "router/scheduler.h"

namespace kvrelay::router {

struct RegistryOptions {
  std::string router_id = "router";
  std::string model_id;  // workers of another model are refused
  int block_size = 16;   // ... and of another block size
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration heartbeat_timeout = absl::Seconds(5);  // silent this long: dead
  // Slots (live and dead workers remembered); registrations beyond are refused.
  int max_workers = PrefixIndex::kDefaultMaxWorkers;
  // The routing options Route() will be called with. Only the busy rule
  // (decode_busy_threshold, decode_max_waiting) is used here: it is part of each decode
  // worker's place in the load order. Route() with another busy rule still decides
  // correctly, by copying the whole fleet (slow at scale).
  SchedulerOptions scheduler;
};

// Every alive worker and the overlap of every slot, copied under the lock (O(workers)).
struct FleetView {
  std::vector<int32_t> overlaps;  // by slot
  std::vector<WorkerLoadView> decode;
  std::vector<WorkerLoadView> prefill;
};

struct WorkerRef {
  std::string id;
  std::string address;
};

class WorkerRegistry {
 public:
  // `metrics`: the registry this one's metrics join (nullptr: a private one).
  explicit WorkerRegistry(RegistryOptions options,
                          std::shared_ptr<prometheus::Registry> metrics = nullptr);

  const RegistryOptions& options() const { return options_; }

  // --- the streams (one id per Connect call) ---
  uint64_t NewConnection();
  // FAILED_PRECONDITION for another model or block size, INVALID_ARGUMENT for an
  // incomplete registration, RESOURCE_EXHAUSTED when every slot is taken by a live
  // worker. OK: the connection now speaks for that worker (an older one no longer does).
  absl::Status OnRegister(uint64_t conn, const v1::WorkerRegistration& r, absl::Time now);
  // False when the worker must send a snapshot (it was expired and is back).
  bool OnLoad(uint64_t conn, const v1::LoadReport& load, absl::Time now);
  // False when the worker must send a snapshot (ask it once; later events are ignored
  // until the snapshot comes).
  bool OnEvents(uint64_t conn, const v1::KvEventBatchMsg& batch, absl::Time now);
  void OnSnapshot(uint64_t conn, const v1::KvSnapshotMsg& snapshot, absl::Time now);
  void OnDisconnect(uint64_t conn);
  // Marks workers silent for longer than heartbeat_timeout dead (entries dropped); how
  // many. A dead worker whose stream is still open comes back with its next message
  // and is asked for a snapshot.
  int ExpireSilent(absl::Time now);

  // --- routing ---
  // ChooseRoute over the alive workers for a prompt of prompt_tokens tokens whose full
  // blocks hash to prompt_hashes; errors as ChooseRoute's. Cost independent of the
  // number of workers (ChooseRouteFast) when options has the registry's busy rule.
  absl::StatusOr<RouteDecision> Route(const SchedulerOptions& options,
                                      absl::Span<const uint64_t> prompt_hashes,
                                      int64_t prompt_tokens,
                                      absl::Span<const int> excluded_decode_slots) const;
  // The whole fleet (tests, diagnostics): O(workers).
  FleetView View(absl::Span<const uint64_t> prompt_hashes) const;
  int32_t MaxOverlap(absl::Span<const uint64_t> prompt_hashes) const;
  // Records a routing decision: tie-break order, and the load this router has put on
  // the chosen workers until NoteDone. A worker's load counts as the larger of its
  // report and this router's requests on it: reports lag (and miss what was routed
  // since), while other routers' requests only show in reports.
  void NoteChosen(int decode_slot, int prefill_slot, int64_t blocks, int64_t prefill_tokens);
  void NoteDone(int decode_slot, int prefill_slot, int64_t blocks, int64_t prefill_tokens);
  std::optional<WorkerRef> Worker(int slot) const;  // alive workers only
  int Alive(v1::WorkerRole role) const;

  v1::ListWorkersResponse List() const;

  // Bytes held by the prefix index's containers (PrefixIndex::MemoryBytes; O(index)).
  size_t IndexMemoryBytes() const;
  // Distinct block hashes in the index.
  size_t IndexBlocks() const;

 private:
  struct Entry {
    bool used = false;
    v1::WorkerRegistration reg;
    v1::LoadReport load;
    uint64_t conn = 0;
    bool alive = false;
    absl::Time last_heard;
    bool synced = false;              // index entries match the worker's cache
    bool snapshot_requested = false;  // waiting for a snapshot
    uint64_t next_seq = 1;
    uint64_t applied_seq = 0;
    int64_t pending_blocks = 0;  // KV blocks of this router's requests running here
    int64_t pending_tokens = 0;  // prompt tokens of this router's remote prefills here
    uint64_t last_chosen = 0;
  };

  struct Metrics {
    explicit Metrics(prometheus::Registry& r);
    prometheus::Gauge* index_blocks;
    prometheus::Counter* resyncs;
    prometheus::Counter* kv_events;
    prometheus::Gauge* workers[2][2];  // [decode?][alive?]
    prometheus::Counter* deaths_disconnected;
    prometheus::Counter* deaths_heartbeat;
  };

  // The worker this connection speaks for (alive again if it had expired: then
  // *revived is set and a snapshot must be asked for), or nullptr.
  Entry* ForConn(uint64_t conn, absl::Time now, bool* revived) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MarkDead(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds (+1) or removes (-1) a used entry from the per role/state counts.
  void Count(const Entry& e, int delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The workers{role,state} gauges from the counts (after a registration or a death).
  void UpdateWorkerGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The slot's place in the load order after its liveness or load changed.
  void Reorder(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  FleetView ViewLocked(absl::Span<const uint64_t> prompt_hashes) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void UpdateIndexGauge() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    m_.index_blocks->Set(static_cast<double>(index_.size()));
  }
  // The slot's load as routing sees it (id left empty unless with_id).
  WorkerLoadView ViewOf(int slot, bool with_id = true) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const RegistryOptions options_;
  const std::shared_ptr<prometheus::Registry> metrics_registry_;  // owns what m_ points to
  const Metrics m_;
  mutable absl::Mutex mu_;
  uint64_t next_conn_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t choices_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Entry> slots_ ABSL_GUARDED_BY(mu_);                 // grows to options_.max_workers
  int64_t counts_[2][2] ABSL_GUARDED_BY(mu_) = {{0, 0}, {0, 0}};  // [decode?][alive?]
  absl::flat_hash_map<std::string, int> by_id_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, int> by_conn_ ABSL_GUARDED_BY(mu_);
  PrefixIndex index_ ABSL_GUARDED_BY(mu_);
  FleetOrder fleet_ ABSL_GUARDED_BY(mu_);  // the alive workers
};

}  // namespace kvrelay::router
