#include "common/kvcache/kv_events.h"

#include <cstdio>
#include <random>
#include <vector>

#include "common/kvcache/block_hash.h"
#include "common/kvcache/prefix_cache.h"
#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

KvEvent Stored(std::optional<uint64_t> parent, std::vector<uint64_t> hashes) {
  KvEvent e;
  e.type = KvEvent::Type::kStored;
  e.parent_hash = parent;
  e.hashes = std::move(hashes);
  return e;
}

KvEvent Removed(std::vector<uint64_t> hashes) {
  KvEvent e;
  e.type = KvEvent::Type::kRemoved;
  e.hashes = std::move(hashes);
  return e;
}

KvEvent Cleared() {
  KvEvent e;
  e.type = KvEvent::Type::kCleared;
  return e;
}

absl::flat_hash_set<uint64_t> Hashes(const KvSnapshot& s) {
  absl::flat_hash_set<uint64_t> out;
  for (const auto& b : s.blocks) out.insert(b.hash);
  return out;
}

KvSnapshot Snap(uint64_t incarnation, uint64_t seq, std::vector<uint64_t> hashes) {
  KvSnapshot s;
  s.incarnation = incarnation;
  s.seq = seq;
  for (uint64_t h : hashes) s.blocks.push_back({h, std::nullopt});
  return s;
}

TEST(KvEventLogTest, AssignsConsecutiveSequenceNumbersFromOne) {
  KvEventLog log(9, 16);
  EXPECT_EQ(log.last_seq(), 0u);
  EXPECT_EQ(log.Append(Stored(std::nullopt, {1, 2})), 1u);
  EXPECT_EQ(log.Append(Removed({2})), 2u);
  EXPECT_EQ(log.Append(Cleared()), 3u);
  EXPECT_EQ(log.last_seq(), 3u);
  const KvEventBatch b = log.Read(1, 100);
  EXPECT_EQ(b.incarnation, 9u);
  EXPECT_FALSE(b.need_snapshot);
  ASSERT_EQ(b.events.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(b.events[i].seq, i + 1);
  EXPECT_EQ(b.events[0].type, KvEvent::Type::kStored);
  EXPECT_EQ(b.events[0].hashes, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(b.events[1].type, KvEvent::Type::kRemoved);
  EXPECT_EQ(b.events[2].type, KvEvent::Type::kCleared);
  EXPECT_EQ(b.next_seq, 4u);
  EXPECT_EQ(DebugString(b.events[0]), "#1 stored(root, [1,2])");
  EXPECT_EQ(DebugString(b.events[1]), "#2 removed([2])");
  EXPECT_EQ(DebugString(b.events[2]), "#3 cleared");
}

TEST(KvEventLogTest, ReadsInBatchesAndCatchesUp) {
  KvEventLog log(1, 16);
  for (uint64_t i = 0; i < 5; ++i) log.Append(Stored(i, {i + 100}));
  KvEventBatch b = log.Read(2, 2);
  ASSERT_EQ(b.events.size(), 2u);
  EXPECT_EQ(b.events[0].seq, 2u);
  EXPECT_EQ(b.next_seq, 4u);
  b = log.Read(b.next_seq, 100);
  EXPECT_EQ(b.events.size(), 2u);
  EXPECT_EQ(b.next_seq, 6u);
  // Caught up: no events, no snapshot needed, same position.
  b = log.Read(6, 100);
  EXPECT_FALSE(b.need_snapshot);
  EXPECT_TRUE(b.events.empty());
  EXPECT_EQ(b.next_seq, 6u);
}

TEST(KvEventLogTest, ReaderThatFellBehindIsToldToSnapshot) {
  KvEventLog log(1, 4);
  for (uint64_t i = 0; i < 10; ++i) log.Append(Removed({i}));
  // Events 7..10 are kept.
  EXPECT_TRUE(log.Read(6, 10).need_snapshot);
  EXPECT_TRUE(log.Read(1, 10).need_snapshot);
  EXPECT_TRUE(log.Read(0, 10).need_snapshot);
  EXPECT_TRUE(log.Read(12, 10).need_snapshot);  // from the future (another incarnation)
  const KvEventBatch b = log.Read(7, 10);
  EXPECT_FALSE(b.need_snapshot);
  ASSERT_EQ(b.events.size(), 4u);
  EXPECT_EQ(b.events.front().seq, 7u);
  EXPECT_EQ(b.events.back().seq, 10u);
}

TEST(KvEventReplicaTest, NeedsASnapshotBeforeEvents) {
  KvEventLog log(5, 8);
  log.Append(Stored(std::nullopt, {1}));
  KvEventReplica r;
  EXPECT_FALSE(r.synced());
  EXPECT_FALSE(r.Apply(log.Read(1, 10)));
  r.ApplySnapshot(Snap(5, 0, {}));
  EXPECT_TRUE(r.synced());
  EXPECT_TRUE(r.Apply(log.Read(1, 10)));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{1}));
  EXPECT_EQ(r.next_seq(), 2u);
}

TEST(KvEventReplicaTest, AppliesStoredRemovedCleared) {
  KvEventLog log(5, 8);
  KvEventReplica r;
  r.ApplySnapshot(Snap(5, 0, {}));
  log.Append(Stored(std::nullopt, {1, 2, 3}));
  log.Append(Stored(3, {4}));
  log.Append(Removed({2, 4}));
  ASSERT_TRUE(r.Apply(log.Read(r.next_seq(), 10)));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{1, 3}));
  log.Append(Cleared());
  log.Append(Stored(std::nullopt, {7}));
  ASSERT_TRUE(r.Apply(log.Read(r.next_seq(), 10)));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{7}));
  EXPECT_EQ(r.next_seq(), 6u);
}

TEST(KvEventReplicaTest, RejectsGapsOtherIncarnationsAndSnapshotRequestsUnchanged) {
  KvEventLog log(5, 2);
  KvEventReplica r;
  r.ApplySnapshot(Snap(5, 0, {}));
  log.Append(Stored(std::nullopt, {1}));
  ASSERT_TRUE(r.Apply(log.Read(1, 10)));
  for (uint64_t h = 2; h < 6; ++h) log.Append(Stored(std::nullopt, {h}));
  // The log dropped seq 2: the reader must snapshot; the replica is unchanged.
  const KvEventBatch behind = log.Read(r.next_seq(), 10);
  EXPECT_TRUE(behind.need_snapshot);
  EXPECT_FALSE(r.Apply(behind));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{1}));
  // A batch that starts later than where the replica is (a gap) is refused.
  EXPECT_FALSE(r.Apply(log.Read(4, 10)));
  EXPECT_EQ(r.next_seq(), 2u);
  // A batch from another incarnation (the worker restarted) is refused.
  KvEventLog restarted(6, 8);
  restarted.Append(Stored(std::nullopt, {9}));
  restarted.Append(Stored(std::nullopt, {10}));
  EXPECT_FALSE(r.Apply(restarted.Read(2, 10)));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{1}));
  // A snapshot resynchronises.
  r.ApplySnapshot(Snap(6, 2, {9, 10}));
  EXPECT_EQ(r.incarnation(), 6u);
  restarted.Append(Removed({9}));
  ASSERT_TRUE(r.Apply(restarted.Read(r.next_seq(), 10)));
  EXPECT_EQ(r.hashes(), (absl::flat_hash_set<uint64_t>{10}));
}

TEST(KvEventReplicaTest, IncarnationIdsDiffer) {
  EXPECT_NE(NewIncarnationId(), 0u);
  EXPECT_NE(NewIncarnationId(), NewIncarnationId());
}

// A seeded random workload on a prefix cache with a tiny event log (8 events): a reader
// polls at random moments with random batch sizes, sometimes not for a long while (the
// log overflows: a forced gap), and the worker restarts now and then (new incarnation,
// empty cache). Whenever the reader is in sync, its replica must equal the cache's
// content exactly.
TEST(KvEventReplicaTest, ReplayReproducesTheCacheExactly) {
  constexpr int kB = 4;
  std::mt19937_64 rng(4242);
  auto make_cache = [&](uint64_t incarnation) {
    PrefixCache::Options o;
    o.num_blocks = 40;
    o.block_size = kB;
    o.incarnation = incarnation;
    o.event_log_capacity = 8;
    return std::move(*PrefixCache::Create(o));
  };
  uint64_t incarnation = 1;
  auto cache = make_cache(incarnation);
  KvEventReplica replica;
  std::vector<std::vector<int32_t>> held;
  const uint64_t root = RootHash("m", "");
  int syncs = 0, snapshots = 0, restarts = 0;
  int64_t events_applied = 0;
  for (int step = 0; step < 20000; ++step) {
    const int op = static_cast<int>(rng() % 100);
    if (op < 45) {  // a request: reuse, compute the rest, store
      std::vector<int32_t> tokens(kB * (1 + rng() % 6));
      for (auto& t : tokens) t = static_cast<int32_t>(rng() % 3);
      const auto hashes = BlockHashes(root, tokens, kB);
      auto blocks = cache->Acquire(hashes, tokens);
      auto more = cache->Allocate(static_cast<int64_t>(hashes.size() - blocks.size()));
      if (!more.ok()) {
        cache->Release(blocks);
      } else {
        blocks.insert(blocks.end(), more->begin(), more->end());
        cache->Store(std::nullopt, blocks, hashes, tokens);
        held.push_back(std::move(blocks));
      }
    } else if (op < 85 && !held.empty()) {
      const size_t i = rng() % held.size();
      cache->Release(held[i]);
      held[i] = std::move(held.back());
      held.pop_back();
    } else if (op < 87) {
      cache->Clear();
    } else if (op < 88) {  // the worker restarts: new incarnation, empty cache
      cache = make_cache(++incarnation);
      held.clear();
      ++restarts;
    } else {                         // the reader polls (sometimes it skips polls: see below)
      if (rng() % 4 == 0) continue;  // busy elsewhere: the log may overflow meanwhile
      while (true) {
        const KvEventBatch batch = cache->ReadEvents(replica.next_seq(), 1 + rng() % 5);
        if (!replica.Apply(batch)) {
          replica.ApplySnapshot(cache->Snapshot());
          ++snapshots;
          continue;
        }
        events_applied += static_cast<int64_t>(batch.events.size());
        if (batch.events.empty()) break;
      }
      ++syncs;
      ASSERT_EQ(replica.incarnation(), cache->incarnation());
      ASSERT_EQ(replica.next_seq(), cache->Snapshot().seq + 1);
      ASSERT_EQ(replica.hashes(), Hashes(cache->Snapshot())) << "step " << step;
      ASSERT_EQ(static_cast<int64_t>(replica.hashes().size()), cache->counts().cached);
    }
    ASSERT_TRUE(cache->Validate().ok());
  }
  EXPECT_GT(syncs, 500);
  EXPECT_GT(restarts, 50);
  EXPECT_GT(snapshots, restarts + 100);  // log overflows forced snapshots too
  EXPECT_GT(events_applied, syncs);      // and most syncs replayed events
  std::printf("syncs %d, snapshots %d, restarts %d, events applied %lld\n", syncs, snapshots,
              restarts, static_cast<long long>(events_applied));
}

}  // namespace
}  // namespace kvrelay::kvcache
