#include "router/worker_registry.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvrelay::router {

WorkerRegistry::Metrics::Metrics(prometheus::Registry& r) {
  index_blocks = &prometheus::BuildGauge()
                      .Name("kvrelay_router_index_blocks")
                      .Help("Distinct KV block hashes in the router's prefix index")
                      .Register(r)
                      .Add({});
  resyncs = &prometheus::BuildCounter()
                 .Name("kvrelay_router_index_resyncs_total")
                 .Help(
                     "Worker cache snapshots applied to the prefix index (after a "
                     "registration, a gap in the event sequence or a revival)")
                 .Register(r)
                 .Add({});
  kv_events = &prometheus::BuildCounter()
                   .Name("kvrelay_router_kv_events_total")
                   .Help("Workers' KV cache events applied to the prefix index")
                   .Register(r)
                   .Add({});
  auto& workers_family = prometheus::BuildGauge()
                             .Name("kvrelay_router_workers")
                             .Help("Workers registered with this router by role and state")
                             .Register(r);
  for (int decode = 0; decode < 2; ++decode) {
    for (int alive = 0; alive < 2; ++alive) {
      workers[decode][alive] = &workers_family.Add(
          {{"role", decode ? "decode" : "prefill"}, {"state", alive ? "alive" : "dead"}});
    }
  }
  auto& deaths = prometheus::BuildCounter()
                     .Name("kvrelay_router_worker_deaths_total")
                     .Help(
                         "Workers declared dead: their registry stream ended (disconnected) "
                         "or they missed the heartbeat deadline (heartbeat_timeout)")
                     .Register(r);
  deaths_disconnected = &deaths.Add({{"reason", "disconnected"}});
  deaths_heartbeat = &deaths.Add({{"reason", "heartbeat_timeout"}});
}

WorkerRegistry::WorkerRegistry(RegistryOptions options,
                               std::shared_ptr<prometheus::Registry> metrics)
    : options_(std::move(options)),
      metrics_registry_(metrics != nullptr ? std::move(metrics)
                                           : std::make_shared<prometheus::Registry>()),
      m_(*metrics_registry_),
      index_(options_.max_workers),
      fleet_(options_.scheduler) {}

void WorkerRegistry::Count(const Entry& e, int delta) {
  if (e.used) counts_[e.reg.role() == v1::WORKER_ROLE_DECODE ? 1 : 0][e.alive ? 1 : 0] += delta;
}

void WorkerRegistry::UpdateWorkerGauges() {
  for (int decode = 0; decode < 2; ++decode) {
    for (int alive = 0; alive < 2; ++alive) {
      m_.workers[decode][alive]->Set(static_cast<double>(counts_[decode][alive]));
    }
  }
}

void WorkerRegistry::Reorder(int slot) {
  const Entry& e = slots_[slot];
  if (!e.alive) {
    fleet_.Erase(slot);
    return;
  }
  (void)fleet_.Set(ViewOf(slot, /*with_id=*/false),  // slot >= 0: cannot fail
                   e.reg.role() == v1::WORKER_ROLE_DECODE);
}

uint64_t WorkerRegistry::NewConnection() {
  absl::MutexLock l(&mu_);
  return next_conn_++;
}

absl::Status WorkerRegistry::OnRegister(uint64_t conn, const v1::WorkerRegistration& r,
                                        absl::Time now) {
  if (r.worker_id().empty()) return absl::InvalidArgumentError("register.worker_id is empty");
  if (r.role() != v1::WORKER_ROLE_PREFILL && r.role() != v1::WORKER_ROLE_DECODE) {
    return absl::InvalidArgumentError("register.role must be WORKER_ROLE_PREFILL or _DECODE");
  }
  if (r.address().empty()) return absl::InvalidArgumentError("register.address is empty");
  if (r.num_blocks() < 1) return absl::InvalidArgumentError("register.num_blocks must be >= 1");
  if (r.model_id() != options_.model_id) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", r.worker_id(), " serves model '",
                                                      r.model_id(), "'; this router serves '",
                                                      options_.model_id, "'"));
  }
  if (r.block_size() != options_.block_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", r.worker_id(), " uses block size ", r.block_size(),
                     "; this router hashes blocks of ", options_.block_size));
  }
  absl::MutexLock l(&mu_);
  int slot = -1;
  if (auto it = by_id_.find(r.worker_id()); it != by_id_.end()) {
    slot = it->second;
  } else {
    if (static_cast<int>(slots_.size()) < std::min(options_.max_workers, index_.max_workers())) {
      slot = static_cast<int>(slots_.size());
      slots_.emplace_back();
    }
    // Full: reuse the slot of a dead worker (a scan, but only once max_workers workers
    // have registered).
    for (int s = 0; s < static_cast<int>(slots_.size()) && slot < 0; ++s) {
      if (!slots_[s].alive) {
        by_id_.erase(slots_[s].reg.worker_id());
        slot = s;
      }
    }
    if (slot < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("this router tracks at most ", slots_.size(), " workers (--max_workers)"));
    }
    by_id_[r.worker_id()] = slot;
  }
  Entry& e = slots_[slot];
  if (e.used && e.conn != conn) by_conn_.erase(e.conn);  // the newer stream wins
  (void)index_.ClearWorker(slot);
  Count(e, -1);
  e = Entry();
  e.used = true;
  e.reg = r;
  e.conn = conn;
  e.alive = true;
  e.last_heard = now;
  e.snapshot_requested = true;  // a worker sends its snapshot right after registering
  Count(e, +1);
  by_conn_[conn] = slot;
  Reorder(slot);
  UpdateIndexGauge();
  UpdateWorkerGauges();
  return absl::OkStatus();
}

WorkerRegistry::Entry* WorkerRegistry::ForConn(uint64_t conn, absl::Time now, bool* revived) {
  *revived = false;
  auto it = by_conn_.find(conn);
  if (it == by_conn_.end()) return nullptr;
  Entry& e = slots_[it->second];
  if (e.conn != conn) return nullptr;
  if (!e.alive) {  // expired, but its stream is still open: it is back
    Count(e, -1);
    e.alive = true;
    Count(e, +1);
    e.synced = false;
    e.snapshot_requested = false;
    *revived = true;
    Reorder(it->second);
    UpdateWorkerGauges();
  }
  e.last_heard = now;
  return &e;
}

bool WorkerRegistry::OnLoad(uint64_t conn, const v1::LoadReport& load, absl::Time now) {
  absl::MutexLock l(&mu_);
  bool revived = false;
  Entry* e = ForConn(conn, now, &revived);
  if (e == nullptr) return true;
  e->load = load;
  Reorder(by_conn_[conn]);
  if (revived) {
    e->snapshot_requested = true;
    return false;
  }
  return true;
}

bool WorkerRegistry::OnEvents(uint64_t conn, const v1::KvEventBatchMsg& batch, absl::Time now) {
  absl::MutexLock l(&mu_);
  bool revived = false;
  Entry* e = ForConn(conn, now, &revived);
  if (e == nullptr) return true;
  const int slot = by_conn_[conn];
  if (!e->synced) {
    if (e->snapshot_requested) return true;  // asked already; wait for it
    e->snapshot_requested = true;
    return false;
  }
  if (batch.events().empty()) return true;
  if (batch.incarnation() != e->reg.incarnation() || batch.events(0).seq() != e->next_seq) {
    (void)index_.ClearWorker(slot);  // out of step: trust nothing until the snapshot
    e->synced = false;
    e->snapshot_requested = true;
    UpdateIndexGauge();
    return false;
  }
  for (const v1::KvEventMsg& ev : batch.events()) {
    absl::Span<const uint64_t> hashes(ev.hashes().data(), ev.hashes().size());
    PrefixIndex::Tier tier = PrefixIndex::kPool;
    if (ev.tier() == v1::KV_TIER_HOST) tier = PrefixIndex::kHost;
    if (ev.tier() == v1::KV_TIER_DISK) tier = PrefixIndex::kDisk;
    const bool known_tier = ev.tier() == v1::KV_TIER_POOL || tier != PrefixIndex::kPool;
    switch (known_tier ? ev.type() : v1::KvEventMsg::TYPE_UNSPECIFIED) {
      case v1::KvEventMsg::TYPE_STORED:
        (void)index_.Store(slot, hashes, tier);
        break;
      case v1::KvEventMsg::TYPE_REMOVED:
        (void)index_.Remove(slot, hashes, tier);
        break;
      case v1::KvEventMsg::TYPE_CLEARED:
        (void)index_.ClearTier(slot, tier);
        break;
      default:
        break;  // a newer worker's event type: ignore it
    }
    e->applied_seq = ev.seq();
    e->next_seq = ev.seq() + 1;
  }
  m_.kv_events->Increment(static_cast<double>(batch.events_size()));
  UpdateIndexGauge();
  return true;
}

void WorkerRegistry::OnSnapshot(uint64_t conn, const v1::KvSnapshotMsg& snapshot, absl::Time now) {
  absl::MutexLock l(&mu_);
  bool revived = false;
  Entry* e = ForConn(conn, now, &revived);
  if (e == nullptr) return;
  const int slot = by_conn_[conn];
  if (snapshot.incarnation() != e->reg.incarnation()) return;  // not the registered pool
  auto span = [](const google::protobuf::RepeatedField<uint64_t>& f) {
    return absl::Span<const uint64_t>(f.data(), f.size());
  };
  (void)index_.ReplaceWorker(slot, span(snapshot.hashes()), span(snapshot.host_hashes()),
                             span(snapshot.disk_hashes()));
  e->synced = true;
  e->snapshot_requested = false;
  e->applied_seq = snapshot.seq();
  e->next_seq = snapshot.seq() + 1;
  m_.resyncs->Increment();
  UpdateIndexGauge();
}

void WorkerRegistry::MarkDead(int slot) {
  Entry& e = slots_[slot];
  Count(e, -1);
  e.alive = false;
  Count(e, +1);
  fleet_.Erase(slot);
  e.synced = false;
  e.snapshot_requested = false;
  e.load = v1::LoadReport();
  (void)index_.ClearWorker(slot);
  UpdateIndexGauge();
  UpdateWorkerGauges();
}

void WorkerRegistry::OnDisconnect(uint64_t conn) {
  absl::MutexLock l(&mu_);
  auto it = by_conn_.find(conn);
  if (it == by_conn_.end()) return;
  const int slot = it->second;
  by_conn_.erase(it);
  if (slots_[slot].alive && slots_[slot].conn == conn) {
    MarkDead(slot);
    m_.deaths_disconnected->Increment();
  }
}

int WorkerRegistry::ExpireSilent(absl::Time now) {
  absl::MutexLock l(&mu_);
  int n = 0;
  for (int s = 0; s < static_cast<int>(slots_.size()); ++s) {
    Entry& e = slots_[s];
    if (e.alive && now - e.last_heard > options_.heartbeat_timeout) {
      MarkDead(s);  // the connection stays mapped: a later message revives the worker
      m_.deaths_heartbeat->Increment();
      ++n;
    }
  }
  return n;
}

WorkerLoadView WorkerRegistry::ViewOf(int slot, bool with_id) const {
  const Entry& e = slots_[slot];
  WorkerLoadView v;
  v.slot = slot;
  if (with_id) v.id = e.reg.worker_id();
  v.num_blocks = e.reg.num_blocks();
  v.active_blocks = std::max(e.load.active_blocks(), e.pending_blocks);
  v.running = e.load.running();
  v.waiting = e.load.waiting();
  v.queued_prefill_tokens = std::max(e.load.queued_prefill_tokens(), e.pending_tokens);
  v.last_chosen = e.last_chosen;
  return v;
}

absl::StatusOr<RouteDecision> WorkerRegistry::Route(const SchedulerOptions& options,
                                                    absl::Span<const uint64_t> prompt_hashes,
                                                    int64_t prompt_tokens,
                                                    absl::Span<const int> excluded) const {
  // Per thread, so concurrent decisions under the reader lock reuse their own buffers.
  thread_local OverlapResult overlaps;
  absl::ReaderMutexLock l(&mu_);
  auto split = [&](int slot, int32_t overlap) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return index_.Split(slot, prompt_hashes, overlap);  // (under the reader lock)
  };
  if (!fleet_.SameBusyRule(options)) {
    // The load order was built for another busy rule: decide over a copy of the fleet.
    const FleetView v = ViewLocked(prompt_hashes);
    return ChooseRoute(options, prompt_tokens, options_.block_size, v.overlaps, v.decode, v.prefill,
                       excluded, split);
  }
  index_.Overlaps(prompt_hashes, &overlaps);
  return ChooseRouteFast(options, prompt_tokens, options_.block_size, overlaps, fleet_, excluded,
                         split);
}

FleetView WorkerRegistry::View(absl::Span<const uint64_t> prompt_hashes) const {
  absl::ReaderMutexLock l(&mu_);
  return ViewLocked(prompt_hashes);
}

FleetView WorkerRegistry::ViewLocked(absl::Span<const uint64_t> prompt_hashes) const {
  FleetView v;
  v.overlaps.assign(slots_.size(), 0);
  index_.Overlaps(prompt_hashes, absl::MakeSpan(v.overlaps));
  for (int s = 0; s < static_cast<int>(slots_.size()); ++s) {
    const Entry& e = slots_[s];
    if (!e.alive) continue;
    (e.reg.role() == v1::WORKER_ROLE_DECODE ? v.decode : v.prefill).push_back(ViewOf(s));
  }
  return v;
}

int32_t WorkerRegistry::MaxOverlap(absl::Span<const uint64_t> prompt_hashes) const {
  absl::ReaderMutexLock l(&mu_);
  return index_.MaxOverlap(prompt_hashes);
}

void WorkerRegistry::NoteChosen(int decode_slot, int prefill_slot, int64_t blocks,
                                int64_t prefill_tokens) {
  absl::MutexLock l(&mu_);
  ++choices_;
  if (decode_slot >= 0 && decode_slot < static_cast<int>(slots_.size())) {
    slots_[decode_slot].last_chosen = choices_;
    slots_[decode_slot].pending_blocks += blocks;
    Reorder(decode_slot);
  }
  if (prefill_slot >= 0 && prefill_slot < static_cast<int>(slots_.size())) {
    slots_[prefill_slot].last_chosen = choices_;
    slots_[prefill_slot].pending_tokens += prefill_tokens;
    Reorder(prefill_slot);
  }
}

void WorkerRegistry::NoteDone(int decode_slot, int prefill_slot, int64_t blocks,
                              int64_t prefill_tokens) {
  absl::MutexLock l(&mu_);
  if (decode_slot >= 0 && decode_slot < static_cast<int>(slots_.size())) {
    Entry& e = slots_[decode_slot];
    e.pending_blocks = std::max<int64_t>(0, e.pending_blocks - blocks);
    Reorder(decode_slot);
  }
  if (prefill_slot >= 0 && prefill_slot < static_cast<int>(slots_.size())) {
    Entry& e = slots_[prefill_slot];
    e.pending_tokens = std::max<int64_t>(0, e.pending_tokens - prefill_tokens);
    Reorder(prefill_slot);
  }
}

std::optional<WorkerRef> WorkerRegistry::Worker(int slot) const {
  absl::ReaderMutexLock l(&mu_);
  if (slot < 0 || slot >= static_cast<int>(slots_.size()) || !slots_[slot].alive) {
    return std::nullopt;
  }
  return WorkerRef{slots_[slot].reg.worker_id(), slots_[slot].reg.address()};
}

int WorkerRegistry::Alive(v1::WorkerRole role) const {
  absl::ReaderMutexLock l(&mu_);
  if (role != v1::WORKER_ROLE_DECODE && role != v1::WORKER_ROLE_PREFILL) return 0;
  return static_cast<int>(counts_[role == v1::WORKER_ROLE_DECODE ? 1 : 0][1]);
}

v1::ListWorkersResponse WorkerRegistry::List() const {
  absl::ReaderMutexLock l(&mu_);
  v1::ListWorkersResponse out;
  for (int s = 0; s < static_cast<int>(slots_.size()); ++s) {
    const Entry& e = slots_[s];
    if (!e.used) continue;
    v1::WorkerStatus* w = out.add_workers();
    *w->mutable_registration() = e.reg;
    w->set_alive(e.alive);
    *w->mutable_load() = e.load;
    w->set_indexed_blocks(index_.blocks(s));
    w->set_applied_seq(e.applied_seq);
    w->set_synced(e.synced);
  }
  out.set_index_blocks(static_cast<int64_t>(index_.size()));
  return out;
}

size_t WorkerRegistry::IndexMemoryBytes() const {
  absl::ReaderMutexLock l(&mu_);
  return index_.MemoryBytes();
}

size_t WorkerRegistry::IndexBlocks() const {
  absl::ReaderMutexLock l(&mu_);
  return index_.size();
}

}  // namespace kvrelay::router
