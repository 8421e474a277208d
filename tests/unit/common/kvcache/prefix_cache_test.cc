#include "common/kvcache/prefix_cache.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "common/kvcache/block_hash.h"
#include "gtest/gtest.h"

namespace kvrelay::kvcache {
namespace {

constexpr int kB = 4;

std::unique_ptr<PrefixCache> Cache(int64_t blocks, size_t log_capacity = 4096) {
  PrefixCache::Options o;
  o.num_blocks = blocks;
  o.block_size = kB;
  o.incarnation = 42;
  o.event_log_capacity = log_capacity;
  auto c = PrefixCache::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(*c);
}

std::vector<int32_t> Tokens(int n, int32_t first = 100) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Allocates, stores and keeps (refcount 1) the full blocks of `tokens`.
std::vector<int32_t> StoreNew(PrefixCache* c, uint64_t root, const std::vector<int32_t>& tokens) {
  const auto hashes = BlockHashes(root, tokens, kB);
  auto blocks = c->Allocate(static_cast<int64_t>(hashes.size()));
  EXPECT_TRUE(blocks.ok()) << blocks.status();
  c->Store(std::nullopt, *blocks, hashes, tokens);
  return *blocks;
}

TEST(PrefixCacheTest, RejectsBadOptions) {
  PrefixCache::Options o;
  o.num_blocks = 0;
  EXPECT_EQ(PrefixCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.num_blocks = 8;
  o.block_size = 0;
  EXPECT_EQ(PrefixCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// The lower tiers' hooks (issue 19): Store reports the newly cached runs to the listener
// once its lock is released; tier events join the stream and the snapshot.
TEST(PrefixCacheTest, StoreListenerSeesNewlyCachedRunsOnly) {
  auto c = Cache(8);
  std::vector<StoredRun> runs;
  c->SetStoreListener([&](const StoredRun& r) {
    EXPECT_EQ(c->counts().cached, c->counts().cached);  // the lock is free here
    runs.push_back(r);
  });
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<uint64_t> hashes = BlockHashes(RootHash("m", ""), tokens, kB);
  auto blocks = c->Allocate(2);
  ASSERT_TRUE(blocks.ok());
  c->Store(std::nullopt, *blocks, hashes, tokens);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_FALSE(runs[0].parent.has_value());
  EXPECT_EQ(runs[0].blocks, *blocks);
  EXPECT_EQ(runs[0].hashes, hashes);
  EXPECT_EQ(runs[0].tokens, tokens);
  // The same blocks computed again elsewhere: nothing new, nothing reported.
  auto again = c->Allocate(2);
  c->Store(std::nullopt, *again, hashes, tokens);
  EXPECT_EQ(runs.size(), 1u);
  // Ref pins: a pinned block is in use until its extra reference goes.
  c->Ref(*blocks);
  c->Release(*blocks);
  c->Release(*again);
  EXPECT_EQ(c->counts().in_use, 2);
  c->Release(*blocks);
  EXPECT_EQ(c->counts().in_use, 0);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, TierEventsJoinTheStreamAndTheSnapshot) {
  auto c = Cache(8);
  ASSERT_TRUE(c->RecordTierEvent(KvTier::kHost, KvEvent::Type::kStored, std::nullopt, {5, 6}).ok());
  ASSERT_TRUE(c->RecordTierEvent(KvTier::kDisk, KvEvent::Type::kStored, 6, {7}).ok());
  ASSERT_TRUE(c->RecordTierEvent(KvTier::kHost, KvEvent::Type::kRemoved, std::nullopt, {5}).ok());
  EXPECT_EQ(c->RecordTierEvent(KvTier::kPool, KvEvent::Type::kStored, std::nullopt, {1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->RecordTierEvent(KvTier::kHost, KvEvent::Type::kCleared, std::nullopt, {}).code(),
            absl::StatusCode::kInvalidArgument);
  const KvEventBatch b = c->ReadEvents(1, 10);
  ASSERT_EQ(b.events.size(), 3u);
  EXPECT_EQ(b.events[0].tier, KvTier::kHost);
  EXPECT_EQ(b.events[1].tier, KvTier::kDisk);
  EXPECT_EQ(b.events[1].parent_hash, 6u);
  EXPECT_EQ(DebugString(b.events[2]), "#3 host removed([5])");
  EXPECT_EQ(c->tier_blocks(KvTier::kHost), 1);
  EXPECT_EQ(c->tier_blocks(KvTier::kDisk), 1);
  const KvSnapshot snap = c->Snapshot();
  EXPECT_EQ(snap.seq, 3u);
  ASSERT_EQ(snap.blocks.size(), 2u);
  for (const CachedBlockInfo& i : snap.blocks) {
    if (i.hash == 6) {
      EXPECT_EQ(i.tier, KvTier::kHost);
      EXPECT_EQ(i.parent_hash, 5u);  // the chain of its stored event
    } else {
      EXPECT_EQ(i.hash, 7u);
      EXPECT_EQ(i.tier, KvTier::kDisk);
    }
  }
  // A replica of the pool skips the lower tiers' events and entries.
  KvEventReplica r;
  r.ApplySnapshot(snap);
  EXPECT_TRUE(r.hashes().empty());
  EXPECT_EQ(r.next_seq(), 4u);
}

TEST(PrefixCacheTest, LookupReturnsLongestRunOfLeadingFullBlocks) {
  auto c = Cache(16);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(12);  // 3 blocks
  const auto blocks = StoreNew(c.get(), root, t);
  EXPECT_EQ(c->counts().cached, 3);

  auto probe = Tokens(14);  // same 3 blocks + a partial block
  EXPECT_EQ(c->Lookup(BlockHashes(root, probe, kB), probe), 3);
  probe[9] = 7;  // change block 2
  EXPECT_EQ(c->Lookup(BlockHashes(root, probe, kB), probe), 2);
  probe[0] = 7;  // change block 0: nothing matches after it either
  EXPECT_EQ(c->Lookup(BlockHashes(root, probe, kB), probe), 0);
  // Fewer hashes than blocks bounds the answer.
  EXPECT_EQ(c->Lookup(BlockHashes(root, t, kB), t), 3);
  const auto h = BlockHashes(root, t, kB);
  EXPECT_EQ(c->Lookup(absl::MakeSpan(h).subspan(0, 1), t), 1);
  c->Release(blocks);
}

TEST(PrefixCacheTest, HashHitWithDifferentTokensIsAMiss) {
  // A colliding hash (simulated: the same hash values with other tokens) must not hit.
  auto c = Cache(8);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(8);
  const auto h = BlockHashes(root, t, kB);
  auto blocks = StoreNew(c.get(), root, t);
  auto other = t;
  other[5] = -1;
  EXPECT_EQ(c->Lookup(h, other), 1);
  other[0] = -1;
  EXPECT_EQ(c->Lookup(h, other), 0);
  c->Release(blocks);
}

TEST(PrefixCacheTest, HashHitWithDifferentParentIsAMiss) {
  auto c = Cache(8);
  const auto t = Tokens(8);
  // Store block 1 under hash 222 chained to parent 111.
  auto b = c->Allocate(2);
  ASSERT_TRUE(b.ok());
  const std::vector<uint64_t> stored = {111, 222};
  c->Store(std::nullopt, *b, stored, t);
  EXPECT_EQ(c->Lookup(stored, t), 2);
  // Another chain start with block 0's tokens under hash 555; then hash 222 with the
  // right tokens is found, but its recorded parent is 111, not 555: only 1 block hits.
  auto b1 = c->Allocate(1);
  ASSERT_TRUE(b1.ok());
  c->Store(std::nullopt, *b1, std::vector<uint64_t>{555}, t);
  const std::vector<uint64_t> wrong_parent = {555, 222};
  EXPECT_EQ(c->Lookup(wrong_parent, t), 1);
  // A chain stored under an explicit parent does not hit as a chain start.
  auto b2 = c->Allocate(1);
  ASSERT_TRUE(b2.ok());
  const std::vector<int32_t> t2 = Tokens(4, 500);
  c->Store(uint64_t{777}, *b2, std::vector<uint64_t>{333}, t2);
  EXPECT_EQ(c->Lookup(std::vector<uint64_t>{333}, t2), 0);
  c->Release(*b);
  c->Release(*b1);
  c->Release(*b2);
}

TEST(PrefixCacheTest, DifferentSaltOrModelNeverHits) {
  auto c = Cache(16);
  const auto t = Tokens(16);
  auto blocks = StoreNew(c.get(), RootHash("model-a", "tenant-1"), t);
  EXPECT_EQ(c->Lookup(BlockHashes(RootHash("model-a", "tenant-1"), t, kB), t), 4);
  EXPECT_EQ(c->Lookup(BlockHashes(RootHash("model-a", "tenant-2"), t, kB), t), 0);
  EXPECT_EQ(c->Lookup(BlockHashes(RootHash("model-a", ""), t, kB), t), 0);
  EXPECT_EQ(c->Lookup(BlockHashes(RootHash("model-b", "tenant-1"), t, kB), t), 0);
  c->Release(blocks);
}

TEST(PrefixCacheTest, AcquireReferencesHitsSoTheyAreNeverEvicted) {
  auto c = Cache(4);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(8);
  auto blocks = StoreNew(c.get(), root, t);
  c->Release(blocks);
  EXPECT_EQ(c->counts().cached_free, 2);

  const auto h = BlockHashes(root, t, kB);
  auto hit = c->Acquire(h, t);
  EXPECT_EQ(hit, blocks);
  EXPECT_EQ(c->counts().in_use, 2);
  EXPECT_EQ(c->counts().cached_free, 0);
  // Only the 2 free blocks can be handed out; the acquired ones are safe.
  EXPECT_EQ(c->Allocate(3).status().code(), absl::StatusCode::kResourceExhausted);
  auto two = c->Allocate(2);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(c->Lookup(h, t), 2);
  c->Release(*two);
  c->Release(hit);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, EvictionOnlyWhenNeededAndTailFirst) {
  auto c = Cache(6);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(16);  // 4 blocks
  const auto h = BlockHashes(root, t, kB);
  auto blocks = StoreNew(c.get(), root, t);
  c->Release(blocks);
  const uint64_t seq_before = c->ReadEvents(1, 100).next_seq;

  auto two = c->Allocate(2);  // exactly the free blocks: no eviction
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(c->counts().cached, 4);
  EXPECT_EQ(c->counts().evicted, 0);
  EXPECT_EQ(c->ReadEvents(1, 100).next_seq, seq_before);

  auto one = c->Allocate(1);  // evicts the chain's last block
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(c->counts().cached, 3);
  EXPECT_EQ(c->counts().evicted, 1);
  EXPECT_EQ(c->Lookup(h, t), 3);
  const KvEventBatch ev = c->ReadEvents(seq_before, 100);
  ASSERT_EQ(ev.events.size(), 1u);
  EXPECT_EQ(ev.events[0].type, KvEvent::Type::kRemoved);
  EXPECT_EQ(ev.events[0].hashes, std::vector<uint64_t>{h[3]});
  c->Release(*two);
  c->Release(*one);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, LookupDoesNotRefreshTheLru) {
  auto c = Cache(4);
  const uint64_t root = RootHash("m", "");
  const auto a = Tokens(4, 1), b = Tokens(4, 50);
  auto ba = StoreNew(c.get(), root, a);
  c->Release(ba);
  auto bb = StoreNew(c.get(), root, b);
  c->Release(bb);
  // a is the least recently released; looking it up must not change that.
  EXPECT_EQ(c->Lookup(BlockHashes(root, a, kB), a), 1);
  auto three = c->Allocate(3);  // 2 free + evicts one: a
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(c->Lookup(BlockHashes(root, a, kB), a), 0);
  EXPECT_EQ(c->Lookup(BlockHashes(root, b, kB), b), 1);
  c->Release(*three);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, DuplicateBlocksStayUncachedAndAreFreedOnRelease) {
  auto c = Cache(8);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(8);
  auto first = StoreNew(c.get(), root, t);
  const uint64_t before = c->ReadEvents(1, 100).next_seq;
  // A second sequence computed the same blocks concurrently.
  auto second = StoreNew(c.get(), root, t);
  EXPECT_EQ(c->counts().cached, 2);
  EXPECT_EQ(c->ReadEvents(1, 100).next_seq, before);  // no event for duplicates
  c->Release(second);
  EXPECT_EQ(c->counts().free, 6);  // the duplicates are free again
  EXPECT_EQ(c->counts().in_use, 2);
  c->Release(first);
  EXPECT_EQ(c->counts().cached_free, 2);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, StoreEmitsOneStoredEventPerRunOfNewBlocks) {
  auto c = Cache(16);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(8);
  auto head = StoreNew(c.get(), root, t);  // blocks 0,1 of the chain
  const auto longer = Tokens(20);          // 5 blocks, first 2 already cached
  const auto h = BlockHashes(root, longer, kB);
  auto seq = c->Acquire(h, longer);
  ASSERT_EQ(seq.size(), 2u);
  auto more = c->Allocate(3, seq.back() + 1);
  ASSERT_TRUE(more.ok());
  seq.insert(seq.end(), more->begin(), more->end());
  const uint64_t from = c->ReadEvents(1, 100).next_seq;
  c->Store(std::nullopt, seq, h, longer);
  const KvEventBatch ev = c->ReadEvents(from, 100);
  ASSERT_EQ(ev.events.size(), 1u);
  EXPECT_EQ(ev.events[0].type, KvEvent::Type::kStored);
  ASSERT_TRUE(ev.events[0].parent_hash.has_value());
  EXPECT_EQ(*ev.events[0].parent_hash, h[1]);
  EXPECT_EQ(ev.events[0].hashes, (std::vector<uint64_t>{h[2], h[3], h[4]}));
  EXPECT_EQ(c->Lookup(h, longer), 5);
  c->Release(seq);
  c->Release(head);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, ClearForgetsEverythingButRunningSequencesKeepTheirBlocks) {
  auto c = Cache(8);
  const uint64_t root = RootHash("m", "");
  const auto a = Tokens(8, 1), b = Tokens(8, 50);
  auto ba = StoreNew(c.get(), root, a);
  c->Release(ba);
  auto bb = StoreNew(c.get(), root, b);  // still held
  c->Clear();
  PrefixCacheCounts n = c->counts();
  EXPECT_EQ(n.cached, 0);
  EXPECT_EQ(n.in_use, 2);
  EXPECT_EQ(n.cached_free, 0);
  EXPECT_EQ(n.free, 6);
  EXPECT_EQ(c->Lookup(BlockHashes(root, a, kB), a), 0);
  EXPECT_EQ(c->Lookup(BlockHashes(root, b, kB), b), 0);
  const KvEventBatch ev = c->ReadEvents(c->Snapshot().seq, 1);
  ASSERT_EQ(ev.events.size(), 1u);
  EXPECT_EQ(ev.events[0].type, KvEvent::Type::kCleared);
  c->Release(bb);
  EXPECT_EQ(c->counts().free, 8);
  EXPECT_TRUE(c->Validate().ok());
}

TEST(PrefixCacheTest, SnapshotListsEveryCachedBlockWithItsParent) {
  auto c = Cache(8);
  const uint64_t root = RootHash("m", "");
  const auto t = Tokens(12);
  const auto h = BlockHashes(root, t, kB);
  auto blocks = StoreNew(c.get(), root, t);
  const KvSnapshot s = c->Snapshot();
  EXPECT_EQ(s.incarnation, 42u);
  EXPECT_EQ(s.seq, 1u);
  ASSERT_EQ(s.blocks.size(), 3u);
  std::map<uint64_t, std::optional<uint64_t>> got;
  for (const auto& b : s.blocks) got[b.hash] = b.parent_hash;
  EXPECT_EQ(got.at(h[0]), std::nullopt);
  EXPECT_EQ(got.at(h[1]), std::optional<uint64_t>(h[0]));
  EXPECT_EQ(got.at(h[2]), std::optional<uint64_t>(h[1]));
  c->Release(blocks);
}

TEST(PrefixCacheTest, ConcurrentReadersSeeConsistentCounts) {
  auto c = Cache(64);
  const uint64_t root = RootHash("m", "");
  std::atomic<bool> done{false};
  std::thread reader([&] {
    while (!done.load()) {
      const PrefixCacheCounts n = c->counts();
      ASSERT_EQ(n.free + n.in_use + n.cached_free, 64);
      (void)c->Snapshot();
      (void)c->ReadEvents(1, 16);
    }
  });
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    auto t = Tokens(4 * (1 + static_cast<int>(rng() % 4)), static_cast<int32_t>(rng() % 64));
    auto blocks = StoreNew(c.get(), root, t);
    c->Release(blocks);
  }
  done = true;
  reader.join();
  EXPECT_TRUE(c->Validate().ok());
}

// Seeded random workload of sequences sharing prefixes on a pool smaller than the
// working set: lookups, acquires, allocations (with eviction), stores, releases and
// clears, with the cache's structures and the expected accounting checked after every
// step, and every hit checked against the tokens it was stored with.
TEST(PrefixCacheTest, RandomizedWorkloadKeepsEveryInvariant) {
  constexpr int64_t kBlocks = 48;
  auto c = Cache(kBlocks, /*log_capacity=*/64);
  std::mt19937_64 rng(123456789);
  const uint64_t roots[2] = {RootHash("m", ""), RootHash("m", "salt")};
  // A few shared "system prompts" so sequences share prefixes.
  std::vector<std::vector<int32_t>> prefixes;
  for (int i = 0; i < 4; ++i) prefixes.push_back(Tokens(4 * (1 + i), 1000 * i));

  struct Seq {
    uint64_t root;
    std::vector<int32_t> tokens;
    std::vector<uint64_t> hashes;
    std::vector<int32_t> blocks;  // one reference each
    bool stored = false;
  };
  std::vector<Seq> running;
  // What every block id holds for the caller: the tokens it was computed for.
  std::map<int32_t, std::vector<int32_t>> content;
  int64_t ops = 0, hits = 0, evicted_hits = 0, exhausted = 0;
  while (ops < 100000) {
    const int op = static_cast<int>(rng() % 10);
    if (op < 4 && running.size() < 12) {  // start a sequence: lookup + acquire + allocate
      Seq s;
      s.root = roots[rng() % 2];
      s.tokens = prefixes[rng() % prefixes.size()];
      const int extra = static_cast<int>(rng() % 14);
      for (int i = 0; i < extra; ++i) s.tokens.push_back(static_cast<int32_t>(rng() % 3));
      s.hashes = BlockHashes(s.root, s.tokens, kB);
      const int64_t looked = c->Lookup(s.hashes, s.tokens);
      s.blocks = c->Acquire(s.hashes, s.tokens);
      ASSERT_EQ(static_cast<int64_t>(s.blocks.size()), looked);
      for (size_t i = 0; i < s.blocks.size(); ++i) {  // a hit holds exactly these tokens
        const std::vector<int32_t> want(s.tokens.begin() + i * kB, s.tokens.begin() + (i + 1) * kB);
        ASSERT_EQ(content.at(s.blocks[i]), want) << "op " << ops;
      }
      hits += looked;
      const int64_t need = static_cast<int64_t>(s.hashes.size()) - looked;
      const PrefixCacheCounts before = c->counts();
      auto more = c->Allocate(need, s.blocks.empty() ? -1 : s.blocks.back() + 1);
      if (!more.ok()) {
        ASSERT_EQ(more.status().code(), absl::StatusCode::kResourceExhausted);
        ASSERT_GT(need, before.free + before.cached_free);
        const PrefixCacheCounts after = c->counts();
        ASSERT_EQ(after.free, before.free);
        ASSERT_EQ(after.cached, before.cached);
        c->Release(s.blocks);
        ++exhausted;
      } else {
        const int64_t evicted = std::max<int64_t>(0, need - before.free);
        ASSERT_EQ(c->counts().cached, before.cached - evicted) << "op " << ops;
        evicted_hits += evicted;
        for (size_t i = 0; i < more->size(); ++i) {
          const size_t k = s.blocks.size() + i;
          content[(*more)[i]] =
              std::vector<int32_t>(s.tokens.begin() + k * kB, s.tokens.begin() + (k + 1) * kB);
        }
        s.blocks.insert(s.blocks.end(), more->begin(), more->end());
        running.push_back(std::move(s));
      }
    } else if (op < 6 && !running.empty()) {  // a sequence finishes its prefill: store
      Seq& s = running[rng() % running.size()];
      if (!s.stored) {
        c->Store(std::nullopt, s.blocks, s.hashes, s.tokens);
        s.stored = true;
        ASSERT_EQ(c->Lookup(s.hashes, s.tokens), static_cast<int64_t>(s.hashes.size()));
      }
    } else if (op < 9 && !running.empty()) {  // a sequence ends
      const size_t i = rng() % running.size();
      c->Release(running[i].blocks);
      running[i] = std::move(running.back());
      running.pop_back();
    } else if (op == 9 && rng() % 50 == 0) {
      c->Clear();
    }
    ++ops;
    const absl::Status v = c->Validate();
    ASSERT_TRUE(v.ok()) << "op " << ops << ": " << v;
    int64_t held = 0;
    std::set<int32_t> distinct;
    for (const Seq& s : running) {
      for (int32_t b : s.blocks) distinct.insert(b);
      held += static_cast<int64_t>(s.blocks.size());
    }
    const PrefixCacheCounts n = c->counts();
    ASSERT_EQ(n.in_use, static_cast<int64_t>(distinct.size())) << "op " << ops;
    ASSERT_EQ(n.free + n.in_use + n.cached_free, kBlocks);
    ASSERT_LE(n.cached, n.in_use + n.cached_free);
  }
  for (const Seq& s : running) c->Release(s.blocks);
  const PrefixCacheCounts n = c->counts();
  EXPECT_EQ(n.in_use, 0);
  EXPECT_EQ(n.cached_free, n.cached);
  EXPECT_GT(hits, 10000);
  EXPECT_GT(evicted_hits, 1000);
  EXPECT_GT(exhausted, 10);
}

}  // namespace
}  // namespace kvrelay::kvcache
