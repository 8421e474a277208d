#include "router/worker_registry.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"

namespace kvrelay::router {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1000000);

RegistryOptions Opts() {
  RegistryOptions o;
  o.router_id = "r1";
  o.model_id = "tiny";
  o.block_size = 16;
  o.heartbeat_timeout = absl::Seconds(5);
  return o;
}

v1::WorkerRegistration Reg(const std::string& id, uint64_t incarnation = 11,
                           v1::WorkerRole role = v1::WORKER_ROLE_DECODE) {
  v1::WorkerRegistration r;
  r.set_worker_id(id);
  r.set_role(role);
  r.set_address(absl::StrCat(id, ".local:50051"));
  r.set_model_id("tiny");
  r.set_block_size(16);
  r.set_num_blocks(100);
  r.set_incarnation(incarnation);
  r.set_kv_dtype("f32");
  return r;
}

v1::KvSnapshotMsg Snap(uint64_t incarnation, uint64_t seq, const std::vector<uint64_t>& hashes) {
  v1::KvSnapshotMsg s;
  s.set_incarnation(incarnation);
  s.set_seq(seq);
  for (uint64_t h : hashes) s.add_hashes(h);
  return s;
}

v1::KvEventMsg Ev(v1::KvEventMsg::Type type, uint64_t seq, const std::vector<uint64_t>& hashes) {
  v1::KvEventMsg e;
  e.set_type(type);
  e.set_seq(seq);
  for (uint64_t h : hashes) e.add_hashes(h);
  return e;
}

v1::KvEventBatchMsg Batch(uint64_t incarnation, const std::vector<v1::KvEventMsg>& events) {
  v1::KvEventBatchMsg b;
  b.set_incarnation(incarnation);
  for (const v1::KvEventMsg& e : events) *b.add_events() = e;
  return b;
}

v1::KvEventBatchMsg Stored(uint64_t incarnation, uint64_t seq, const std::vector<uint64_t>& h) {
  return Batch(incarnation, {Ev(v1::KvEventMsg::TYPE_STORED, seq, h)});
}

// The worker status of `id` in List() (fails the test when absent).
v1::WorkerStatus StatusOf(const WorkerRegistry& reg, const std::string& id) {
  v1::ListWorkersResponse l = reg.List();
  for (const v1::WorkerStatus& w : l.workers()) {
    if (w.registration().worker_id() == id) return w;
  }
  ADD_FAILURE() << "worker " << id << " not listed";
  return v1::WorkerStatus();
}

// The slot of the (alive) worker `id`, -1 when not in the view.
int SlotOf(const WorkerRegistry& reg, const std::string& id) {
  FleetView v = reg.View({});
  for (const auto* list : {&v.decode, &v.prefill}) {
    for (const WorkerLoadView& w : *list) {
      if (w.id == id) return w.slot;
    }
  }
  return -1;
}

int32_t OverlapOf(const WorkerRegistry& reg, int slot, const std::vector<uint64_t>& hashes) {
  FleetView v = reg.View(hashes);
  EXPECT_GE(slot, 0);
  EXPECT_LT(slot, static_cast<int>(v.overlaps.size()));
  if (slot < 0 || slot >= static_cast<int>(v.overlaps.size())) return -1;
  return v.overlaps[slot];
}

const std::vector<uint64_t> kChain = {101, 102, 103, 104};

using ::kvrelay::testing::Metric;

TEST(WorkerRegistryTest, RegistrationValidation) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();

  v1::WorkerRegistration r = Reg("");
  absl::Status s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("worker_id"));

  r = Reg("w");
  r.set_role(v1::WORKER_ROLE_UNSPECIFIED);
  s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("role"));

  r = Reg("w");
  r.clear_address();
  s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("address"));

  r = Reg("w");
  r.set_num_blocks(0);
  s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("num_blocks"));

  r = Reg("w");
  r.set_model_id("other-model");
  s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("other-model"));

  r = Reg("w");
  r.set_block_size(32);
  s = reg.OnRegister(c, r, kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("32"));

  // Nothing refused was registered.
  EXPECT_EQ(reg.List().workers_size(), 0);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 0);

  ASSERT_TRUE(reg.OnRegister(c, Reg("w"), kT0).ok());
  ASSERT_EQ(reg.List().workers_size(), 1);
  const v1::WorkerStatus w = StatusOf(reg, "w");
  EXPECT_TRUE(w.alive());
  EXPECT_FALSE(w.synced());
  EXPECT_EQ(w.applied_seq(), 0u);
  EXPECT_EQ(w.registration().address(), "w.local:50051");
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 1);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_PREFILL), 0);
  const int slot = SlotOf(reg, "w");
  ASSERT_GE(slot, 0);
  std::optional<WorkerRef> ref = reg.Worker(slot);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->id, "w");
  EXPECT_EQ(ref->address, "w.local:50051");
  EXPECT_FALSE(reg.Worker(-1).has_value());
  EXPECT_FALSE(reg.Worker(slot + 1).has_value());  // never registered
  EXPECT_FALSE(reg.Worker(1 << 20).has_value());
}

TEST(WorkerRegistryTest, EventsBeforeTheFirstSnapshotAreIgnored) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 7), kT0).ok());
  const int slot = SlotOf(reg, "w");
  ASSERT_GE(slot, 0);

  // The worker sends its snapshot right after registering: events that arrive before
  // it are dropped without asking for a second snapshot.
  EXPECT_TRUE(reg.OnEvents(c, Stored(7, 1, {1, 2}), kT0));
  EXPECT_TRUE(reg.OnEvents(c, Stored(7, 2, {3}), kT0));
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 0);
  EXPECT_EQ(OverlapOf(reg, slot, {1, 2}), 0);
  EXPECT_FALSE(StatusOf(reg, "w").synced());

  // A snapshot of another incarnation is not this pool's.
  reg.OnSnapshot(c, Snap(8, 2, {1, 2, 3}), kT0);
  EXPECT_FALSE(StatusOf(reg, "w").synced());
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 0);

  reg.OnSnapshot(c, Snap(7, 2, {1, 2, 3}), kT0);
  v1::WorkerStatus w = StatusOf(reg, "w");
  EXPECT_TRUE(w.synced());
  EXPECT_EQ(w.indexed_blocks(), 3);
  EXPECT_EQ(w.applied_seq(), 2u);
  EXPECT_EQ(OverlapOf(reg, slot, {1, 2, 3, 4}), 3);
  EXPECT_EQ(reg.MaxOverlap({1, 2, 3, 4}), 3);

  // Now events continuing at seq 3 apply.
  EXPECT_TRUE(reg.OnEvents(c, Stored(7, 3, {4}), kT0));
  w = StatusOf(reg, "w");
  EXPECT_EQ(w.indexed_blocks(), 4);
  EXPECT_EQ(w.applied_seq(), 3u);
  EXPECT_EQ(OverlapOf(reg, slot, {1, 2, 3, 4}), 4);
  // An empty batch changes nothing and needs nothing.
  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {}), kT0));
  EXPECT_EQ(StatusOf(reg, "w").applied_seq(), 3u);
}

TEST(WorkerRegistryTest, StoredRemovedClearedSemantics) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 7), kT0).ok());
  const int slot = SlotOf(reg, "w");
  reg.OnSnapshot(c, Snap(7, 0, {}), kT0);
  ASSERT_TRUE(StatusOf(reg, "w").synced());
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);

  // One batch, several events in order.
  EXPECT_TRUE(reg.OnEvents(
      c,
      Batch(7, {Ev(v1::KvEventMsg::TYPE_STORED, 1, {101, 102}),
                Ev(v1::KvEventMsg::TYPE_STORED, 2, {103, 104}),
                Ev(v1::KvEventMsg::TYPE_STORED, 3, {102})}),  // already held: no change
      kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 4);
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 4);
  EXPECT_EQ(StatusOf(reg, "w").applied_seq(), 3u);
  EXPECT_EQ(reg.List().index_blocks(), 4);

  // The tail evicted: the overlap is the leading run still held.
  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {Ev(v1::KvEventMsg::TYPE_REMOVED, 4, {104})}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 3);
  // A block in the middle evicted: the leading run stops before it.
  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {Ev(v1::KvEventMsg::TYPE_REMOVED, 5, {102})}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 1);
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 2);  // 101, 103
  // Removing something not held is harmless.
  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {Ev(v1::KvEventMsg::TYPE_REMOVED, 6, {999})}), kT0));
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 2);
  // An unknown event type is skipped but its seq counts.
  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {Ev(v1::KvEventMsg::TYPE_UNSPECIFIED, 7, {555})}), kT0));
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 2);
  EXPECT_EQ(StatusOf(reg, "w").applied_seq(), 7u);

  EXPECT_TRUE(reg.OnEvents(c, Batch(7, {Ev(v1::KvEventMsg::TYPE_CLEARED, 8, {})}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
  v1::WorkerStatus w = StatusOf(reg, "w");
  EXPECT_EQ(w.indexed_blocks(), 0);
  EXPECT_EQ(w.applied_seq(), 8u);
  EXPECT_TRUE(w.synced());  // a cleared event is in step, not a resync
  EXPECT_EQ(reg.List().index_blocks(), 0);

  // Still in step after clearing.
  EXPECT_TRUE(reg.OnEvents(c, Stored(7, 9, {101}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 1);
}

// Tier events and snapshots (issue 19): a block the pool evicted but a lower tier holds
// stays in the index; the route says where the overlap lies.
TEST(WorkerRegistryTest, TierEventsAndSnapshotsKeepLowerTierBlocks) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 7), kT0).ok());
  const int slot = SlotOf(reg, "w");
  v1::KvSnapshotMsg snap = Snap(7, 0, {101});
  snap.add_host_hashes(101);
  snap.add_host_hashes(102);
  snap.add_disk_hashes(103);
  reg.OnSnapshot(c, snap, kT0);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 3);
  auto tiered = [](v1::KvEventMsg e, v1::KvTier t) {
    e.set_tier(t);
    return e;
  };
  EXPECT_TRUE(
      reg.OnEvents(c,
                   Batch(7, {Ev(v1::KvEventMsg::TYPE_REMOVED, 1, {101}),  // the pool evicts 101 ...
                             tiered(Ev(v1::KvEventMsg::TYPE_STORED, 2, {104}), v1::KV_TIER_DISK)}),
                   kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 4);  // ... the host tier still holds it
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 4);
  const std::vector<uint64_t> prompt(kChain.begin(), kChain.begin() + 4);
  auto d = reg.Route(Opts().scheduler, prompt, 5 * 16, {});
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->decode_overlap_blocks, 4);
  EXPECT_EQ(d->decode_split.pool, 0);
  EXPECT_EQ(d->decode_split.host, 2);
  EXPECT_EQ(d->decode_split.disk, 2);
  // A pool `cleared` event leaves the lower tiers; removing from the host tier does not
  // touch the disk's.
  EXPECT_TRUE(reg.OnEvents(
      c,
      Batch(7, {Ev(v1::KvEventMsg::TYPE_CLEARED, 3, {}),
                tiered(Ev(v1::KvEventMsg::TYPE_REMOVED, 4, {101, 103}), v1::KV_TIER_HOST)}),
      kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);         // 101 is gone everywhere
  EXPECT_EQ(StatusOf(reg, "w").indexed_blocks(), 3);  // 102 (host), 103, 104 (disk)
  // A tier this router does not know is skipped (its seq still counts).
  EXPECT_TRUE(reg.OnEvents(
      c, Batch(7, {tiered(Ev(v1::KvEventMsg::TYPE_STORED, 5, {101}), static_cast<v1::KvTier>(9))}),
      kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
  EXPECT_EQ(StatusOf(reg, "w").applied_seq(), 5u);
}

TEST(WorkerRegistryTest, GapOrOtherIncarnationNeedsSnapshotAndDropsEntries) {
  for (const bool gap : {true, false}) {
    SCOPED_TRACE(gap ? "seq gap" : "other incarnation");
    WorkerRegistry reg(Opts());
    const uint64_t c = reg.NewConnection();
    ASSERT_TRUE(reg.OnRegister(c, Reg("w", 7), kT0).ok());
    const int slot = SlotOf(reg, "w");
    reg.OnSnapshot(c, Snap(7, 4, {101, 102}), kT0);
    ASSERT_EQ(OverlapOf(reg, slot, kChain), 2);

    const v1::KvEventBatchMsg bad = gap ? Stored(7, 6, {103}) : Stored(8, 5, {103});
    EXPECT_FALSE(reg.OnEvents(c, bad, kT0)) << "a snapshot must be requested";
    // Out of step: the worker holds nothing as far as routing is concerned.
    EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
    v1::WorkerStatus w = StatusOf(reg, "w");
    EXPECT_EQ(w.indexed_blocks(), 0);
    EXPECT_FALSE(w.synced());
    EXPECT_TRUE(w.alive());
    EXPECT_EQ(reg.List().index_blocks(), 0);

    // Asked once: later events (even ones that would have been in step) are ignored
    // without asking again.
    EXPECT_TRUE(reg.OnEvents(c, Stored(7, 5, {103}), kT0));
    EXPECT_TRUE(reg.OnEvents(c, Stored(7, 7, {104}), kT0));
    EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);

    reg.OnSnapshot(c, Snap(7, 7, {101, 102, 103}), kT0);
    w = StatusOf(reg, "w");
    EXPECT_TRUE(w.synced());
    EXPECT_EQ(w.indexed_blocks(), 3);
    EXPECT_EQ(w.applied_seq(), 7u);
    EXPECT_EQ(OverlapOf(reg, slot, kChain), 3);
    EXPECT_TRUE(reg.OnEvents(c, Stored(7, 8, {104}), kT0));
    EXPECT_EQ(OverlapOf(reg, slot, kChain), 4);
  }
}

TEST(WorkerRegistryTest, OldOrRepeatedSeqIsAGap) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 7), kT0).ok());
  const int slot = SlotOf(reg, "w");
  reg.OnSnapshot(c, Snap(7, 4, {101}), kT0);
  EXPECT_TRUE(reg.OnEvents(c, Stored(7, 5, {102}), kT0));
  // seq 5 again (a replay) cannot be applied on top of seq 5.
  EXPECT_FALSE(reg.OnEvents(c, Stored(7, 5, {102}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
}

TEST(WorkerRegistryTest, OtherWorkersKeepTheirEntriesOnAGap) {
  WorkerRegistry reg(Opts());
  const uint64_t a = reg.NewConnection();
  const uint64_t b = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a, Reg("a", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(b, Reg("b", 2), kT0).ok());
  const int sa = SlotOf(reg, "a"), sb = SlotOf(reg, "b");
  ASSERT_NE(sa, sb);
  reg.OnSnapshot(a, Snap(1, 0, {101, 102}), kT0);
  reg.OnSnapshot(b, Snap(2, 0, {101, 102, 103}), kT0);
  EXPECT_EQ(reg.List().index_blocks(), 3);
  EXPECT_FALSE(reg.OnEvents(a, Stored(1, 9, {}), kT0));
  EXPECT_EQ(OverlapOf(reg, sa, kChain), 0);
  EXPECT_EQ(OverlapOf(reg, sb, kChain), 3);
  EXPECT_EQ(reg.List().index_blocks(), 3);
  EXPECT_EQ(reg.MaxOverlap(kChain), 3);
}

TEST(WorkerRegistryTest, DisconnectMarksDeadAndDropsEntries) {
  WorkerRegistry reg(Opts());
  const uint64_t a = reg.NewConnection();
  const uint64_t b = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a, Reg("a", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(b, Reg("b", 2, v1::WORKER_ROLE_PREFILL), kT0).ok());
  const int sa = SlotOf(reg, "a");
  reg.OnSnapshot(a, Snap(1, 0, {101, 102}), kT0);
  reg.OnSnapshot(b, Snap(2, 0, {101}), kT0);
  v1::LoadReport load;
  load.set_running(3);
  load.set_active_blocks(9);
  reg.OnLoad(a, load, kT0);
  ASSERT_EQ(StatusOf(reg, "a").load().running(), 3);

  reg.OnDisconnect(a);
  v1::WorkerStatus w = StatusOf(reg, "a");
  EXPECT_FALSE(w.alive());
  EXPECT_EQ(w.indexed_blocks(), 0);
  EXPECT_FALSE(w.synced());
  EXPECT_EQ(w.load().running(), 0);  // a dead worker's load is forgotten
  EXPECT_EQ(OverlapOf(reg, sa, kChain), 0);
  EXPECT_FALSE(reg.Worker(sa).has_value());
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 0);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_PREFILL), 1);
  FleetView v = reg.View(kChain);
  EXPECT_TRUE(v.decode.empty());
  ASSERT_EQ(v.prefill.size(), 1u);
  EXPECT_EQ(v.prefill[0].id, "b");
  EXPECT_EQ(reg.List().index_blocks(), 1);  // b's block only

  // Messages on the closed connection change nothing.
  EXPECT_TRUE(reg.OnEvents(a, Stored(1, 1, {103}), kT0));
  reg.OnSnapshot(a, Snap(1, 5, {101, 102, 103}), kT0);
  reg.OnLoad(a, load, kT0);
  w = StatusOf(reg, "a");
  EXPECT_FALSE(w.alive());
  EXPECT_EQ(w.indexed_blocks(), 0);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 0);
  reg.OnDisconnect(a);  // twice: harmless
  reg.OnDisconnect(12345);
  EXPECT_TRUE(StatusOf(reg, "b").alive());
}

TEST(WorkerRegistryTest, ExpireSilentUsesTheInjectedClock) {
  WorkerRegistry reg(Opts());  // heartbeat_timeout 5 s
  const uint64_t a = reg.NewConnection();
  const uint64_t b = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a, Reg("a", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(b, Reg("b", 2), kT0).ok());
  const int sa = SlotOf(reg, "a");
  reg.OnSnapshot(a, Snap(1, 0, {101, 102}), kT0);
  reg.OnSnapshot(b, Snap(2, 0, {101}), kT0);

  // b keeps talking (load reports, events, snapshots all count as heard from).
  reg.OnLoad(b, v1::LoadReport(), kT0 + absl::Seconds(3));
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(5)), 0);  // exactly the timeout: not yet
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(6)), 1);  // a: silent 6 s
  v1::WorkerStatus w = StatusOf(reg, "a");
  EXPECT_FALSE(w.alive());
  EXPECT_EQ(w.indexed_blocks(), 0);
  EXPECT_EQ(OverlapOf(reg, sa, kChain), 0);
  EXPECT_TRUE(StatusOf(reg, "b").alive());
  EXPECT_EQ(StatusOf(reg, "b").indexed_blocks(), 1);
  // A dead worker is not expired again.
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(7)), 0);

  EXPECT_TRUE(reg.OnEvents(b, Stored(2, 1, {102}), kT0 + absl::Seconds(7)));
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(12)), 0);
  reg.OnSnapshot(b, Snap(2, 1, {101, 102}), kT0 + absl::Seconds(12));
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(17)), 0);
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(18)), 1);
  EXPECT_FALSE(StatusOf(reg, "b").alive());
  EXPECT_EQ(reg.List().index_blocks(), 0);
  // Its stream is still open: its next message brings it back, without index entries
  // until the snapshot it is asked for.
  EXPECT_FALSE(reg.OnLoad(b, v1::LoadReport(), kT0 + absl::Seconds(19)));  // send a snapshot
  EXPECT_TRUE(StatusOf(reg, "b").alive());
  EXPECT_FALSE(StatusOf(reg, "b").synced());
  EXPECT_EQ(StatusOf(reg, "b").indexed_blocks(), 0);
  reg.OnSnapshot(b, Snap(2, 1, {101, 102}), kT0 + absl::Seconds(19));
  EXPECT_TRUE(StatusOf(reg, "b").synced());
  EXPECT_EQ(StatusOf(reg, "b").indexed_blocks(), 2);
}

TEST(WorkerRegistryTest, NewIncarnationClearsOldEntriesAndKeepsTheSlot) {
  WorkerRegistry reg(Opts());
  const uint64_t old_conn = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(old_conn, Reg("w", 1), kT0).ok());
  const int slot = SlotOf(reg, "w");
  reg.OnSnapshot(old_conn, Snap(1, 3, {101, 102, 103}), kT0);
  ASSERT_EQ(OverlapOf(reg, slot, kChain), 3);
  // Another worker so that a reassigned slot would show.
  const uint64_t other = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(other, Reg("x", 9), kT0).ok());

  // The worker process restarted: a new connection registers a new incarnation before
  // the router noticed the old stream is gone.
  const uint64_t new_conn = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(new_conn, Reg("w", 2), kT0).ok());
  EXPECT_EQ(SlotOf(reg, "w"), slot);
  EXPECT_EQ(reg.List().workers_size(), 2);
  v1::WorkerStatus w = StatusOf(reg, "w");
  EXPECT_TRUE(w.alive());
  EXPECT_FALSE(w.synced());
  EXPECT_EQ(w.indexed_blocks(), 0);
  EXPECT_EQ(w.applied_seq(), 0u);
  EXPECT_EQ(w.registration().incarnation(), 2u);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);

  // A snapshot of the old incarnation does not count for the new one.
  reg.OnSnapshot(new_conn, Snap(1, 3, {101, 102, 103}), kT0);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
  reg.OnSnapshot(new_conn, Snap(2, 0, {101}), kT0);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 1);

  // The old connection's late close does not kill the restarted worker.
  reg.OnDisconnect(old_conn);
  EXPECT_TRUE(StatusOf(reg, "w").alive());
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 1);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 2);
}

TEST(WorkerRegistryTest, ReregistrationOnTheSameConnectionResyncs) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 1), kT0).ok());
  const int slot = SlotOf(reg, "w");
  reg.OnSnapshot(c, Snap(1, 3, {101, 102}), kT0);
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 5), kT0).ok());
  EXPECT_EQ(SlotOf(reg, "w"), slot);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);
  EXPECT_EQ(reg.List().workers_size(), 1);
  reg.OnSnapshot(c, Snap(5, 0, {101}), kT0);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 1);
}

TEST(WorkerRegistryTest, NewerConnectionTakesOver) {
  WorkerRegistry reg(Opts());
  const uint64_t old_conn = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(old_conn, Reg("w", 1), kT0).ok());
  const int slot = SlotOf(reg, "w");
  reg.OnSnapshot(old_conn, Snap(1, 2, {101, 102}), kT0);

  // Same incarnation (the worker redialled): the newer stream speaks for it.
  const uint64_t new_conn = reg.NewConnection();
  ASSERT_NE(new_conn, old_conn);
  ASSERT_TRUE(reg.OnRegister(new_conn, Reg("w", 1), kT0).ok());
  EXPECT_EQ(SlotOf(reg, "w"), slot);
  reg.OnSnapshot(new_conn, Snap(1, 2, {101, 102}), kT0);
  ASSERT_EQ(OverlapOf(reg, slot, kChain), 2);

  // The old stream's messages are ignored: events (even in step), snapshots, load.
  EXPECT_TRUE(reg.OnEvents(old_conn, Stored(1, 3, {103}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 2);
  EXPECT_TRUE(reg.OnEvents(old_conn, Stored(1, 99, {103}), kT0));  // no resync asked either
  EXPECT_TRUE(StatusOf(reg, "w").synced());
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 2);
  reg.OnSnapshot(old_conn, Snap(1, 9, {}), kT0);
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 2);
  v1::LoadReport load;
  load.set_running(42);
  reg.OnLoad(old_conn, load, kT0);
  EXPECT_EQ(StatusOf(reg, "w").load().running(), 0);

  // ... and its disconnect does not kill the worker.
  reg.OnDisconnect(old_conn);
  EXPECT_TRUE(StatusOf(reg, "w").alive());
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 2);

  // The new stream keeps working.
  EXPECT_TRUE(reg.OnEvents(new_conn, Stored(1, 3, {103}), kT0));
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 3);
  reg.OnDisconnect(new_conn);
  EXPECT_FALSE(StatusOf(reg, "w").alive());
  EXPECT_EQ(OverlapOf(reg, slot, kChain), 0);

  // A dead worker coming back (same id) gets its slot again.
  const uint64_t third = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(third, Reg("w", 1), kT0).ok());
  EXPECT_EQ(SlotOf(reg, "w"), slot);
  EXPECT_EQ(reg.List().workers_size(), 1);
}

// The load of a worker counts as the larger of its last report and what this router
// routed to it and has not released yet (NoteChosen ... NoteDone): reports lag, and
// other routers' requests only show in reports.
TEST(WorkerRegistryTest, NoteChosenAddsLoadUntilNoteDone) {
  WorkerRegistry reg(Opts());
  const uint64_t d = reg.NewConnection();
  const uint64_t p = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(d, Reg("d", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(p, Reg("p", 2, v1::WORKER_ROLE_PREFILL), kT0).ok());
  const int sd = SlotOf(reg, "d"), sp = SlotOf(reg, "p");
  v1::LoadReport dl;
  dl.set_active_blocks(10);
  dl.set_running(2);
  dl.set_waiting(1);
  reg.OnLoad(d, dl, kT0);
  v1::LoadReport pl;
  pl.set_queued_prefill_tokens(100);
  reg.OnLoad(p, pl, kT0);

  FleetView v = reg.View({});
  ASSERT_EQ(v.decode.size(), 1u);
  ASSERT_EQ(v.prefill.size(), 1u);
  EXPECT_EQ(v.decode[0].slot, sd);
  EXPECT_EQ(v.decode[0].id, "d");
  EXPECT_EQ(v.decode[0].num_blocks, 100);
  EXPECT_EQ(v.decode[0].active_blocks, 10);
  EXPECT_EQ(v.decode[0].running, 2);
  EXPECT_EQ(v.decode[0].waiting, 1);
  EXPECT_EQ(v.decode[0].last_chosen, 0u);
  EXPECT_EQ(v.prefill[0].slot, sp);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 100);

  // Below the report: the report already says more.
  reg.NoteChosen(sd, sp, 5, 64);
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 10);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 100);
  const uint64_t first = v.decode[0].last_chosen;
  EXPECT_GT(first, 0u);
  EXPECT_EQ(v.prefill[0].last_chosen, first);

  // Above it: this router's own requests count.
  reg.NoteChosen(sd, sp, 20, 100);  // pending: 25 blocks, 164 tokens
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 25);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 164);
  const uint64_t second = v.decode[0].last_chosen;
  EXPECT_GT(second, first);

  reg.NoteChosen(sd, -1, 3, 0);  // local prefill: the prefill worker is not touched
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 28);
  EXPECT_GT(v.decode[0].last_chosen, second);
  EXPECT_EQ(v.prefill[0].last_chosen, second);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 164);

  // Out-of-range slots are ignored.
  reg.NoteChosen(-5, 1 << 20, 1000, 1000);
  reg.NoteDone(-5, 1 << 20, 1000, 1000);
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 28);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 164);

  // A later report does not forget what this router still has running there...
  dl.set_active_blocks(12);
  reg.OnLoad(d, dl, kT0);
  EXPECT_EQ(reg.View({}).decode[0].active_blocks, 28);
  // ... but a larger one wins.
  dl.set_active_blocks(40);
  reg.OnLoad(d, dl, kT0);
  EXPECT_EQ(reg.View({}).decode[0].active_blocks, 40);
  dl.set_active_blocks(12);
  reg.OnLoad(d, dl, kT0);

  // Finished requests release their share; never below zero.
  reg.NoteDone(sd, sp, 20, 100);  // pending: 8 blocks, 64 tokens
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 12);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 100);
  pl.set_queued_prefill_tokens(0);
  reg.OnLoad(p, pl, kT0);
  EXPECT_EQ(reg.View({}).prefill[0].queued_prefill_tokens, 64);
  reg.NoteDone(sd, sp, 1000, 1000);
  dl.set_active_blocks(0);
  reg.OnLoad(d, dl, kT0);
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 0);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 0);
  reg.NoteChosen(sd, sp, 2, 7);  // the clamp left nothing negative behind
  v = reg.View({});
  EXPECT_EQ(v.decode[0].active_blocks, 2);
  EXPECT_EQ(v.prefill[0].queued_prefill_tokens, 7);
}

TEST(WorkerRegistryTest, FullRegistryRefusesAndReusesDeadSlots) {
  constexpr int kMax = 256;
  RegistryOptions o = Opts();
  o.max_workers = kMax;
  WorkerRegistry reg(o);
  std::vector<uint64_t> conns;
  for (int i = 0; i < kMax; ++i) {
    conns.push_back(reg.NewConnection());
    ASSERT_TRUE(reg.OnRegister(conns.back(), Reg(absl::StrCat("w", i), i + 1), kT0).ok()) << i;
  }
  const uint64_t extra = reg.NewConnection();
  absl::Status s = reg.OnRegister(extra, Reg("late", 1), kT0);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(s.message(), HasSubstr("256"));

  const int dead_slot = SlotOf(reg, "w7");
  reg.OnDisconnect(conns[7]);
  ASSERT_TRUE(reg.OnRegister(extra, Reg("late", 1), kT0).ok());
  EXPECT_EQ(SlotOf(reg, "late"), dead_slot);
  EXPECT_EQ(reg.List().workers_size(), kMax);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), kMax);
  // Full again.
  EXPECT_EQ(reg.OnRegister(reg.NewConnection(), Reg("later", 1), kT0).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(WorkerRegistryTest, DefaultRegistryTracksThousandsOfWorkers) {
  WorkerRegistry reg(Opts());
  EXPECT_GE(reg.options().max_workers, 10000);
  constexpr int kWorkers = 3000;
  for (int i = 0; i < kWorkers; ++i) {
    const uint64_t c = reg.NewConnection();
    ASSERT_TRUE(reg.OnRegister(c, Reg(absl::StrCat("w", i), i + 1), kT0).ok()) << i;
    reg.OnSnapshot(c, Snap(i + 1, 0, {101, 102, static_cast<uint64_t>(1000 + i)}), kT0);
  }
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), kWorkers);
  EXPECT_EQ(reg.IndexBlocks(), 2u + kWorkers);
  EXPECT_GT(reg.IndexMemoryBytes(), 0u);
  const int last = SlotOf(reg, absl::StrCat("w", kWorkers - 1));
  EXPECT_EQ(last, kWorkers - 1);
  EXPECT_EQ(OverlapOf(reg, last, {101, 102, 1000 + kWorkers - 1}), 3);
  auto d = reg.Route(SchedulerOptions(), {101, 102, 1000 + kWorkers - 1}, 48, {});
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->decode_slot, last);
  EXPECT_EQ(d->decode_overlap_blocks, 3);
}

// Route() decides as ChooseRoute over View() -- through the load order kept up to date
// by registrations, load reports, NoteChosen/NoteDone and deaths -- and, with another
// busy rule than the registry's, over the copied view itself.
TEST(WorkerRegistryTest, RouteEqualsChooseRouteOverTheView) {
  std::mt19937_64 rng(99);
  auto pick = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  RegistryOptions o = Opts();
  o.heartbeat_timeout = absl::Hours(1);
  WorkerRegistry reg(o);
  constexpr int kWorkers = 400;
  std::vector<uint64_t> conns(kWorkers);
  std::vector<std::vector<uint64_t>> chains(6);
  for (auto& c : chains) {
    for (int i = 0; i < 20; ++i) c.push_back(rng());
  }
  for (size_t c = 1; c < chains.size(); ++c) {
    std::copy(chains[0].begin(), chains[0].begin() + 5, chains[c].begin());
  }
  auto connect = [&](int i) {
    conns[i] = reg.NewConnection();
    const auto role = i % 5 == 0 ? v1::WORKER_ROLE_PREFILL : v1::WORKER_ROLE_DECODE;
    ASSERT_TRUE(reg.OnRegister(conns[i], Reg(absl::StrCat("w", i), 1, role), kT0).ok());
    std::vector<uint64_t> held;
    for (const auto& c : chains) {
      if (pick(100) < (c == chains[0] ? 90 : 5)) {
        held.insert(held.end(), c.begin(), c.begin() + pick(21));
      }
    }
    reg.OnSnapshot(conns[i], Snap(1, 0, held), kT0);
  };
  for (int i = 0; i < kWorkers; ++i) connect(i);
  SchedulerOptions other;  // a different busy rule: the slow path
  other.decode_busy_threshold = 0.5;
  int checked = 0;
  for (int step = 0; step < 3000; ++step) {
    const int i = static_cast<int>(pick(kWorkers));
    const int kind = static_cast<int>(pick(100));
    if (kind < 40) {
      v1::LoadReport l;
      l.set_active_blocks(pick(2) ? pick(5) : pick(100));
      l.set_running(pick(3));
      l.set_waiting(pick(70));
      l.set_queued_prefill_tokens(pick(2) ? pick(3) : pick(70000));
      reg.OnLoad(conns[i], l, kT0);
    } else if (kind < 55) {
      reg.NoteChosen(i, static_cast<int>(pick(kWorkers)), pick(30), pick(500));
    } else if (kind < 65) {
      reg.NoteDone(i, static_cast<int>(pick(kWorkers)), pick(30), pick(500));
    } else if (kind < 67) {
      reg.OnDisconnect(conns[i]);
    } else if (kind < 69) {
      connect(i);  // back, or registered again
    } else {
      std::vector<uint64_t> prompt = chains[pick(chains.size())];
      prompt.resize(pick(21));
      prompt.push_back(rng());
      const int64_t tokens = static_cast<int64_t>(prompt.size()) * 16 + pick(16);
      std::vector<int> excluded;
      if (pick(4) == 0) excluded.push_back(static_cast<int>(pick(kWorkers)));
      for (const SchedulerOptions& so : {SchedulerOptions(), other}) {
        const FleetView v = reg.View(prompt);
        const auto want = ChooseRoute(so, tokens, 16, v.overlaps, v.decode, v.prefill, excluded);
        const auto got = reg.Route(so, prompt, tokens, excluded);
        ASSERT_EQ(got.status().code(), want.status().code()) << "step " << step;
        if (!want.ok()) continue;
        ASSERT_EQ(got->decode_slot, want->decode_slot) << "step " << step;
        ASSERT_EQ(got->prefill_slot, want->prefill_slot) << "step " << step;
        ASSERT_EQ(got->decode_overlap_blocks, want->decode_overlap_blocks) << "step " << step;
        ASSERT_EQ(got->prefill_overlap_blocks, want->prefill_overlap_blocks) << "step " << step;
        ASSERT_EQ(got->uncached_tokens, want->uncached_tokens) << "step " << step;
        ASSERT_EQ(got->max_overlap_blocks, want->max_overlap_blocks) << "step " << step;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(WorkerRegistryTest, RouteSkipsDeadWorkers) {
  WorkerRegistry reg(Opts());
  const uint64_t a = reg.NewConnection();
  const uint64_t b = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a, Reg("a", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(b, Reg("b", 2), kT0).ok());
  reg.OnSnapshot(a, Snap(1, 0, kChain), kT0);
  auto d = reg.Route(SchedulerOptions(), kChain, 64, {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->decode_slot, SlotOf(reg, "a"));
  const int sb = SlotOf(reg, "b");
  reg.OnDisconnect(a);
  d = reg.Route(SchedulerOptions(), kChain, 64, {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->decode_slot, sb);
  EXPECT_EQ(d->max_overlap_blocks, 0);
  EXPECT_EQ(reg.Route(SchedulerOptions(), kChain, 64, std::vector<int>{sb}).status().code(),
            absl::StatusCode::kUnavailable);
  reg.OnDisconnect(b);
  d = reg.Route(SchedulerOptions(), kChain, 64, {});
  EXPECT_EQ(d.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(d.status().message(), HasSubstr("no decode worker is up"));
  // Expired workers leave the order too, and come back with their next message.
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("c", 3), kT0).ok());
  EXPECT_TRUE(reg.Route(SchedulerOptions(), kChain, 64, {}).ok());
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(6)), 1);
  EXPECT_EQ(reg.Route(SchedulerOptions(), kChain, 64, {}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_FALSE(reg.OnLoad(c, v1::LoadReport(), kT0 + absl::Seconds(7)));
  EXPECT_TRUE(reg.Route(SchedulerOptions(), kChain, 64, {}).ok());
}

TEST(WorkerRegistryTest, AliveCountsFollowRoleChanges) {
  WorkerRegistry reg(Opts());
  const uint64_t c = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 1), kT0).ok());
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 1);
  ASSERT_TRUE(reg.OnRegister(c, Reg("w", 2, v1::WORKER_ROLE_PREFILL), kT0).ok());
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_DECODE), 0);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_PREFILL), 1);
  EXPECT_EQ(reg.Alive(v1::WORKER_ROLE_UNSPECIFIED), 0);
  FleetView v = reg.View({});
  EXPECT_TRUE(v.decode.empty());
  EXPECT_EQ(v.prefill.size(), 1u);
  // A prefill worker is never D.
  EXPECT_EQ(reg.Route(SchedulerOptions(), kChain, 64, {}).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(WorkerRegistryTest, MetricsFollowWorkersAndTheIndex) {
  auto metrics = std::make_shared<prometheus::Registry>();
  WorkerRegistry reg(Opts(), metrics);
  auto m = [&](const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    return Metric(*metrics, name, labels);
  };
  auto workers = [&](const std::string& role, const std::string& state) {
    return m("kvrelay_router_workers", {{"role", role}, {"state", state}});
  };
  auto deaths = [&](const std::string& reason) {
    return m("kvrelay_router_worker_deaths_total", {{"reason", reason}});
  };
  // Every series exists from the start.
  EXPECT_EQ(workers("decode", "alive"), 0);
  EXPECT_EQ(workers("prefill", "dead"), 0);
  EXPECT_EQ(deaths("disconnected"), 0);
  EXPECT_EQ(deaths("heartbeat_timeout"), 0);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 0);
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 0);
  EXPECT_EQ(m("kvrelay_router_kv_events_total"), 0);

  const uint64_t a = reg.NewConnection();
  const uint64_t b = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a, Reg("a", 1), kT0).ok());
  ASSERT_TRUE(reg.OnRegister(b, Reg("b", 2, v1::WORKER_ROLE_PREFILL), kT0).ok());
  EXPECT_EQ(workers("decode", "alive"), 1);
  EXPECT_EQ(workers("prefill", "alive"), 1);
  EXPECT_EQ(workers("decode", "dead"), 0);
  EXPECT_EQ(workers("prefill", "dead"), 0);

  // Snapshots (one per registration) and events; the index counts distinct hashes.
  reg.OnSnapshot(a, Snap(1, 0, {101, 102}), kT0);
  reg.OnSnapshot(b, Snap(2, 0, {101}), kT0);
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 2);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 2);
  EXPECT_TRUE(reg.OnEvents(a,
                           Batch(1, {Ev(v1::KvEventMsg::TYPE_STORED, 1, {103}),
                                     Ev(v1::KvEventMsg::TYPE_STORED, 2, {104})}),
                           kT0));
  EXPECT_EQ(m("kvrelay_router_kv_events_total"), 2);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 4);
  EXPECT_TRUE(reg.OnEvents(a, Batch(1, {Ev(v1::KvEventMsg::TYPE_REMOVED, 3, {104})}), kT0));
  EXPECT_EQ(m("kvrelay_router_kv_events_total"), 3);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 3);

  // A gap: a's entries leave (101 stays: b holds it), nothing is applied, and the
  // snapshot it asks for is a resync.
  EXPECT_FALSE(reg.OnEvents(a, Stored(1, 9, {105}), kT0));
  EXPECT_EQ(m("kvrelay_router_kv_events_total"), 3);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 1);
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 2);
  reg.OnSnapshot(a, Snap(1, 9, {101, 102, 103, 105}), kT0);
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 3);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 4);
  // A snapshot of another incarnation is not applied: no resync.
  reg.OnSnapshot(a, Snap(7, 9, {}), kT0);
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 3);

  // a's stream ends: dead, disconnected; its blocks leave.
  reg.OnDisconnect(a);
  EXPECT_EQ(workers("decode", "alive"), 0);
  EXPECT_EQ(workers("decode", "dead"), 1);
  EXPECT_EQ(deaths("disconnected"), 1);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 1);
  reg.OnDisconnect(a);  // again: not another death
  EXPECT_EQ(deaths("disconnected"), 1);

  // b goes silent: dead, heartbeat_timeout.
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(6)), 1);
  EXPECT_EQ(workers("prefill", "alive"), 0);
  EXPECT_EQ(workers("prefill", "dead"), 1);
  EXPECT_EQ(deaths("heartbeat_timeout"), 1);
  EXPECT_EQ(deaths("disconnected"), 1);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 0);
  EXPECT_EQ(reg.ExpireSilent(kT0 + absl::Seconds(20)), 0);
  EXPECT_EQ(deaths("heartbeat_timeout"), 1);

  // b speaks again on its open stream: alive, and resynced by the snapshot it is asked for.
  EXPECT_FALSE(reg.OnLoad(b, v1::LoadReport(), kT0 + absl::Seconds(21)));
  EXPECT_EQ(workers("prefill", "alive"), 1);
  EXPECT_EQ(workers("prefill", "dead"), 0);
  reg.OnSnapshot(b, Snap(2, 0, {101}), kT0 + absl::Seconds(21));
  EXPECT_EQ(m("kvrelay_router_index_resyncs_total"), 4);
  EXPECT_EQ(m("kvrelay_router_index_blocks"), 1);

  // a comes back (a new incarnation): its slot is alive again.
  const uint64_t a2 = reg.NewConnection();
  ASSERT_TRUE(reg.OnRegister(a2, Reg("a", 3), kT0 + absl::Seconds(21)).ok());
  EXPECT_EQ(workers("decode", "alive"), 1);
  EXPECT_EQ(workers("decode", "dead"), 0);
}

}  // namespace
}  // namespace kvrelay::router
