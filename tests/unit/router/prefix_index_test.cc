#include "router/prefix_index.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::router {
namespace {

using ::testing::ElementsAre;

// The tests' fleet size (an index of exactly this many slots where the bound matters).
constexpr int kMax = 256;

std::vector<int32_t> AllOverlaps(const PrefixIndex& idx, const std::vector<uint64_t>& prompt,
                                 size_t slots) {
  std::vector<int32_t> out(slots, -7);  // garbage: Overlaps must overwrite every entry
  idx.Overlaps(prompt, absl::MakeSpan(out));
  return out;
}

TEST(PrefixIndexTest, EmptyIndex) {
  PrefixIndex idx;
  const std::vector<uint64_t> prompt = {1, 2, 3};
  EXPECT_THAT(AllOverlaps(idx, prompt, 3), ElementsAre(0, 0, 0));
  EXPECT_EQ(idx.MaxOverlap(prompt), 0);
  EXPECT_EQ(idx.Overlap(0, prompt), 0);
  EXPECT_EQ(idx.size(), 0u);
  EXPECT_EQ(idx.blocks(0), 0);
}

// A slot holds a block while any of its tiers does; Split tells which.
TEST(PrefixIndexTest, TiersUnionInOverlapsAndSplitBack) {
  PrefixIndex idx(8);
  const std::vector<uint64_t> chain = {11, 12, 13, 14, 15};
  ASSERT_TRUE(idx.Store(0, {11, 12}, PrefixIndex::kPool).ok());
  ASSERT_TRUE(idx.Store(0, {11, 12, 13}, PrefixIndex::kHost).ok());  // write-through copies
  ASSERT_TRUE(idx.Store(0, {14}, PrefixIndex::kDisk).ok());
  EXPECT_EQ(idx.Overlap(0, chain), 4);
  EXPECT_EQ(idx.blocks(0), 4);
  EXPECT_EQ(idx.held(), 4);
  EXPECT_EQ(idx.tier_blocks(0, PrefixIndex::kHost), 3);
  PrefixIndex::TierSplit s = idx.Split(0, chain, 4);
  EXPECT_EQ(s.pool, 2);
  EXPECT_EQ(s.host, 1);
  EXPECT_EQ(s.disk, 1);
  // The pool evicts 12 (still in host): the slot still holds it.
  ASSERT_TRUE(idx.Remove(0, {12}, PrefixIndex::kPool).ok());
  EXPECT_EQ(idx.Overlap(0, chain), 4);
  s = idx.Split(0, chain, 4);
  EXPECT_EQ(s.pool, 1);
  EXPECT_EQ(s.host, 2);
  // Gone from every tier: gone.
  ASSERT_TRUE(idx.Remove(0, {12}, PrefixIndex::kHost).ok());
  EXPECT_EQ(idx.Overlap(0, chain), 1);
  EXPECT_EQ(idx.blocks(0), 3);
  // A pool `cleared` event leaves the lower tiers.
  ASSERT_TRUE(idx.ClearTier(0, PrefixIndex::kPool).ok());
  EXPECT_EQ(idx.tier_blocks(0, PrefixIndex::kPool), 0);
  EXPECT_EQ(idx.blocks(0), 3);  // 11, 13 (host), 14 (disk)
  ASSERT_TRUE(idx.ClearTier(0, PrefixIndex::kHost).ok());
  EXPECT_EQ(idx.blocks(0), 1);
  ASSERT_TRUE(idx.ReplaceWorker(0, {11}, {12}, {13}).ok());
  EXPECT_EQ(idx.Overlap(0, chain), 3);
  s = idx.Split(0, chain, 3);
  EXPECT_EQ(s.pool, 1);
  EXPECT_EQ(s.host, 1);
  EXPECT_EQ(s.disk, 1);
  ASSERT_TRUE(idx.ClearWorker(0).ok());
  EXPECT_EQ(idx.size(), 0u);
  EXPECT_EQ(idx.held(), 0);
  // A slot with nothing below its pool needs no probe: everything is a pool hit.
  ASSERT_TRUE(idx.Store(1, {11, 12}).ok());
  s = idx.Split(1, chain, 2);
  EXPECT_EQ(s.pool, 2);
}

TEST(PrefixIndexTest, OverlapStopsAtFirstMissingBlock) {
  PrefixIndex idx;
  // Slot 0 holds blocks 1,2,4 (3 evicted): only the leading run 1,2 counts, even though
  // 4 is present. Slot 1 holds all four. Slot 2 holds only 2,3 (no leading block).
  ASSERT_TRUE(idx.Store(0, {1, 2, 4}).ok());
  ASSERT_TRUE(idx.Store(1, {1, 2, 3, 4}).ok());
  ASSERT_TRUE(idx.Store(2, {2, 3}).ok());
  const std::vector<uint64_t> prompt = {1, 2, 3, 4, 5};
  EXPECT_THAT(AllOverlaps(idx, prompt, 4), ElementsAre(2, 4, 0, 0));
  EXPECT_EQ(idx.Overlap(0, prompt), 2);
  EXPECT_EQ(idx.Overlap(1, prompt), 4);
  EXPECT_EQ(idx.Overlap(2, prompt), 0);
  EXPECT_EQ(idx.Overlap(3, prompt), 0);
  EXPECT_EQ(idx.MaxOverlap(prompt), 4);
  EXPECT_EQ(idx.size(), 4u);
  EXPECT_EQ(idx.blocks(0), 3);
  EXPECT_EQ(idx.blocks(1), 4);
  EXPECT_EQ(idx.blocks(2), 2);
}

TEST(PrefixIndexTest, FullPromptHitAndEmptyPrompt) {
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(3, {10, 11, 12}).ok());
  EXPECT_THAT(AllOverlaps(idx, {10, 11, 12}, 4), ElementsAre(0, 0, 0, 3));
  EXPECT_THAT(AllOverlaps(idx, {}, 4), ElementsAre(0, 0, 0, 0));
  EXPECT_EQ(idx.MaxOverlap({10, 11, 12}), 3);
  EXPECT_EQ(idx.MaxOverlap({}), 0);
}

TEST(PrefixIndexTest, OutputShorterThanSlotsIgnoresHigherSlots) {
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(0, {1}).ok());
  ASSERT_TRUE(idx.Store(5, {1, 2}).ok());
  EXPECT_THAT(AllOverlaps(idx, {1, 2}, 2), ElementsAre(1, 0));
  EXPECT_THAT(AllOverlaps(idx, {1, 2}, 0), ElementsAre());
  // Longer than the slots in use: the extra entries are zero.
  std::vector<int32_t> out = AllOverlaps(idx, {1, 2}, kMax + 3);
  EXPECT_EQ(out[5], 2);
  EXPECT_EQ(out[kMax], 0);
  EXPECT_EQ(out[kMax + 2], 0);
}

TEST(PrefixIndexTest, MaxOverlapNeedsOneWorkerForTheWholeRun) {
  PrefixIndex idx;
  // Blocks 1,2 on slot 0 and 3,4 on slot 1: every block is somewhere, but no worker holds
  // more than the first two leading blocks.
  ASSERT_TRUE(idx.Store(0, {1, 2}).ok());
  ASSERT_TRUE(idx.Store(1, {3, 4}).ok());
  EXPECT_EQ(idx.MaxOverlap({1, 2, 3, 4}), 2);
}

TEST(PrefixIndexTest, RemoveIsPerWorker) {
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(0, {1, 2, 3}).ok());
  ASSERT_TRUE(idx.Store(1, {1, 2, 3}).ok());
  ASSERT_TRUE(idx.Remove(0, {2}).ok());
  EXPECT_THAT(AllOverlaps(idx, {1, 2, 3}, 2), ElementsAre(1, 3));
  EXPECT_EQ(idx.size(), 3u);  // slot 1 still holds 2
  EXPECT_EQ(idx.blocks(0), 2);
  // Missing hashes (never stored, or stored only elsewhere) are ignored.
  ASSERT_TRUE(idx.Remove(0, {2, 99}).ok());
  EXPECT_EQ(idx.blocks(0), 2);
  EXPECT_EQ(idx.blocks(1), 3);
  // The last holder's removal drops the hash.
  ASSERT_TRUE(idx.Remove(1, {2}).ok());
  EXPECT_EQ(idx.size(), 2u);
  EXPECT_EQ(idx.MaxOverlap({1, 2, 3}), 1);
  // Storing the same hash twice counts once.
  ASSERT_TRUE(idx.Store(1, {1, 1}).ok());
  EXPECT_EQ(idx.blocks(1), 2);
}

TEST(PrefixIndexTest, ClearWorker) {
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(0, {1, 2, 3}).ok());
  ASSERT_TRUE(idx.Store(1, {1, 2}).ok());
  ASSERT_TRUE(idx.ClearWorker(0).ok());
  EXPECT_EQ(idx.blocks(0), 0);
  EXPECT_EQ(idx.blocks(1), 2);
  EXPECT_EQ(idx.size(), 2u);  // 3 was only on slot 0
  EXPECT_THAT(AllOverlaps(idx, {1, 2, 3}, 2), ElementsAre(0, 2));
  ASSERT_TRUE(idx.ClearWorker(0).ok());  // clearing an empty slot is fine
  ASSERT_TRUE(idx.ClearWorker(1).ok());
  EXPECT_EQ(idx.size(), 0u);
  // The slot is usable again after a clear (a restarted worker).
  ASSERT_TRUE(idx.Store(0, {1}).ok());
  EXPECT_THAT(AllOverlaps(idx, {1, 2, 3}, 2), ElementsAre(1, 0));
}

TEST(PrefixIndexTest, ReplaceWorker) {
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(0, {1, 2, 3}).ok());
  ASSERT_TRUE(idx.Store(1, {1, 2, 3}).ok());
  ASSERT_TRUE(idx.ReplaceWorker(0, {1, 7, 8}).ok());
  EXPECT_EQ(idx.blocks(0), 3);
  EXPECT_EQ(idx.size(), 5u);
  EXPECT_THAT(AllOverlaps(idx, {1, 2, 3}, 2), ElementsAre(1, 3));
  EXPECT_THAT(AllOverlaps(idx, {1, 7, 8}, 2), ElementsAre(3, 1));
  ASSERT_TRUE(idx.ReplaceWorker(1, {}).ok());
  EXPECT_EQ(idx.blocks(1), 0);
  EXPECT_EQ(idx.size(), 3u);
}

TEST(PrefixIndexTest, BadSlotsAreRejected) {
  PrefixIndex idx(kMax);
  EXPECT_EQ(idx.max_workers(), kMax);
  for (int slot : {-1, kMax, kMax + 100}) {
    EXPECT_EQ(idx.Store(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.Remove(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.ClearWorker(slot).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.ReplaceWorker(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.blocks(slot), 0);
    EXPECT_EQ(idx.Overlap(slot, {1}), 0);
  }
  EXPECT_EQ(idx.size(), 0u);
  // The default bound is far beyond 256 workers.
  PrefixIndex big;
  EXPECT_EQ(big.max_workers(), PrefixIndex::kDefaultMaxWorkers);
  EXPECT_GE(PrefixIndex::kDefaultMaxWorkers, 10000);
  ASSERT_TRUE(big.Store(PrefixIndex::kDefaultMaxWorkers - 1, {1}).ok());
  EXPECT_EQ(big.Store(PrefixIndex::kDefaultMaxWorkers, {1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(big.Overlap(PrefixIndex::kDefaultMaxWorkers - 1, {1}), 1);
}

TEST(PrefixIndexTest, AllSlots) {
  PrefixIndex idx;
  // Slot s holds the first s+1 blocks of the chain 1000, 1001, ...: the leading blocks are
  // held by every slot (bitmaps), the last ones by a few (arrays, inline), and each slot
  // drops out at its own position.
  std::vector<uint64_t> chain(kMax + 10);
  for (size_t i = 0; i < chain.size(); ++i) chain[i] = 1000 + i;
  for (int s = 0; s < kMax; ++s) {
    ASSERT_TRUE(idx.Store(s, absl::MakeConstSpan(chain).first(s + 1)).ok());
  }
  std::vector<int32_t> out = AllOverlaps(idx, chain, kMax);
  for (int s = 0; s < kMax; ++s) {
    EXPECT_EQ(out[s], s + 1) << s;
    EXPECT_EQ(idx.Overlap(s, chain), s + 1) << s;
  }
  EXPECT_EQ(idx.MaxOverlap(chain), kMax);
  EXPECT_EQ(idx.size(), static_cast<size_t>(kMax));
  // Drop the last slot of each bitmap word.
  for (int s : {63, 127, 191, 255}) ASSERT_TRUE(idx.ClearWorker(s).ok());
  out = AllOverlaps(idx, chain, kMax);
  EXPECT_EQ(out[62], 63);
  EXPECT_EQ(out[63], 0);
  EXPECT_EQ(out[64], 65);
  EXPECT_EQ(out[254], 255);
  EXPECT_EQ(out[255], 0);
  EXPECT_EQ(idx.MaxOverlap(chain), 255);
  EXPECT_EQ(idx.size(), static_cast<size_t>(kMax - 1));
}

// Naive reference: one std::set per worker.
class Reference {
 public:
  explicit Reference(int slots = kMax) : sets_(slots) {}
  void Store(int s, const std::vector<uint64_t>& h) { sets_[s].insert(h.begin(), h.end()); }
  void Remove(int s, const std::vector<uint64_t>& h) {
    for (uint64_t x : h) sets_[s].erase(x);
  }
  void Clear(int s) { sets_[s].clear(); }
  void Replace(int s, const std::vector<uint64_t>& h) { sets_[s] = {h.begin(), h.end()}; }
  int32_t Overlap(int s, const std::vector<uint64_t>& p) const {
    int32_t i = 0;
    while (i < static_cast<int32_t>(p.size()) && sets_[s].count(p[i])) ++i;
    return i;
  }
  int64_t Blocks(int s) const { return static_cast<int64_t>(sets_[s].size()); }
  size_t Size() const {
    std::set<uint64_t> all;
    for (const auto& s : sets_) all.insert(s.begin(), s.end());
    return all.size();
  }

 private:
  std::vector<std::set<uint64_t>> sets_;
};

TEST(PrefixIndexTest, RandomizedAgainstReference) {
  std::mt19937_64 rng(20240611);
  // Slots spread over several bitmap words, few enough that they collide often.
  const std::vector<int> slots = {0, 1, 2, 63, 64, 65, 130, 200, 254, 255};
  // Hashes come from a few chains over a small universe, so prompts share prefixes with
  // what workers hold and removals hit existing blocks.
  constexpr int kChains = 24, kChainLen = 40;
  std::vector<std::vector<uint64_t>> chains(kChains);
  for (int c = 0; c < kChains; ++c) {
    for (int i = 0; i < kChainLen; ++i) chains[c].push_back(rng());
  }
  // A few chains share their first blocks (a common system prompt).
  for (int c = 1; c < 6; ++c) {
    std::copy(chains[0].begin(), chains[0].begin() + 8, chains[c].begin());
  }
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  // A run [a, b) of a random chain.
  auto run = [&]() {
    const auto& ch = chains[pick(kChains)];
    const int a = pick(kChainLen), b = a + pick(kChainLen - a + 1);
    return std::vector<uint64_t>(ch.begin() + a, ch.begin() + b);
  };

  PrefixIndex idx;
  Reference ref;
  std::vector<int32_t> out(kMax);
  for (int op = 0; op < 50000; ++op) {
    const int s = slots[pick(static_cast<int>(slots.size()))];
    const int kind = pick(100);
    if (kind < 45) {
      const auto h = run();
      ASSERT_TRUE(idx.Store(s, h).ok());
      ref.Store(s, h);
    } else if (kind < 85) {
      auto h = run();
      if (pick(4) == 0) h.push_back(rng());  // a hash nobody holds
      ASSERT_TRUE(idx.Remove(s, h).ok());
      ref.Remove(s, h);
    } else if (kind < 88) {
      ASSERT_TRUE(idx.ClearWorker(s).ok());
      ref.Clear(s);
    } else if (kind < 90) {
      const auto h = run();
      ASSERT_TRUE(idx.ReplaceWorker(s, h).ok());
      ref.Replace(s, h);
    } else {
      // Query: a chain prefix, sometimes with a divergent tail.
      const auto& ch = chains[pick(kChains)];
      std::vector<uint64_t> prompt(ch.begin(), ch.begin() + pick(kChainLen + 1));
      if (pick(3) == 0) prompt.push_back(rng());
      const size_t n_out = pick(2) ? kMax : static_cast<size_t>(pick(kMax));
      out.assign(n_out, -1);
      idx.Overlaps(prompt, absl::MakeSpan(out));
      int32_t best = 0;
      for (int t : slots) {
        const int32_t want = ref.Overlap(t, prompt);
        best = std::max(best, want);
        if (static_cast<size_t>(t) < n_out) {
          ASSERT_EQ(out[t], want) << "op " << op << " slot " << t;
        }
        ASSERT_EQ(idx.Overlap(t, prompt), want) << "op " << op << " slot " << t;
      }
      for (size_t t = 0; t < n_out; ++t) {
        if (std::find(slots.begin(), slots.end(), static_cast<int>(t)) == slots.end()) {
          ASSERT_EQ(out[t], 0) << "op " << op << " unused slot " << t;
        }
      }
      ASSERT_EQ(idx.MaxOverlap(prompt), best) << "op " << op;
    }
    if (op % 97 == 0) {
      for (int t : slots) ASSERT_EQ(idx.blocks(t), ref.Blocks(t)) << "op " << op;
      ASSERT_EQ(idx.size(), ref.Size()) << "op " << op;
    }
  }
  for (int t : slots) EXPECT_EQ(idx.blocks(t), ref.Blocks(t));
  EXPECT_EQ(idx.size(), ref.Size());
}

TEST(PrefixIndexTest, HolderSetsGrowAndShrinkThroughEveryForm) {
  // One block held by 0..1000 slots: inline (<= 3), a sorted array, then a bitmap once
  // the array would be larger than the bitmap over the slots in use, and back.
  constexpr int kSlots = 1000;
  PrefixIndex idx;
  ASSERT_TRUE(idx.Store(kSlots - 1, {7}).ok());  // the bitmap width covers every slot
  std::vector<int> order(kSlots - 1);
  for (int s = 0; s < kSlots - 1; ++s) order[s] = s;
  std::mt19937_64 rng(5);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<bool> held(kSlots, false);
  held[kSlots - 1] = true;
  auto check = [&](int step) {
    std::vector<int32_t> out(kSlots + 5, -1);
    idx.Overlaps({7, 8}, absl::MakeSpan(out));
    for (int s = 0; s < kSlots; ++s) ASSERT_EQ(out[s], held[s] ? 1 : 0) << step << " slot " << s;
    OverlapResult r;
    idx.Overlaps({7, 8}, &r);
    int n = 0;
    for (int s = 0; s < kSlots; ++s) {
      ASSERT_EQ(r.Of(s), held[s] ? 1 : 0) << step << " slot " << s;
      n += held[s];
    }
    EXPECT_EQ(r.max(), n > 0 ? 1 : 0);
    EXPECT_EQ(idx.MaxOverlap({7, 8}), n > 0 ? 1 : 0);
    EXPECT_EQ(idx.held(), n);
  };
  for (size_t i = 0; i < order.size(); ++i) {
    ASSERT_TRUE(idx.Store(order[i], {7}).ok());
    held[order[i]] = true;
    if (i < 8 || i % 97 == 0) check(static_cast<int>(i));
  }
  check(-1);
  EXPECT_EQ(idx.size(), 1u);
  const size_t full = idx.MemoryBytes();
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t i = 0; i < order.size(); ++i) {
    ASSERT_TRUE(idx.Remove(order[i], {7}).ok());
    held[order[i]] = false;
    if (i % 89 == 0 || i + 8 > order.size()) check(static_cast<int>(-2 - i));
  }
  EXPECT_EQ(idx.size(), 1u);  // the first slot still holds it
  EXPECT_LE(idx.MemoryBytes(), full);
  ASSERT_TRUE(idx.Remove(kSlots - 1, {7}).ok());
  EXPECT_EQ(idx.size(), 0u);
  EXPECT_EQ(idx.held(), 0);
}

TEST(PrefixIndexTest, SparseResultListsFewHoldersAndLevelsForMany) {
  // 2000 workers cache a system prompt S of 8 blocks; slots 7 and 9 evicted its last 4
  // blocks; slot 5 also holds a conversation C continuing S.
  constexpr int kSlots = 2000;
  const std::vector<uint64_t> sys = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<uint64_t> conv = {11, 12, 13, 14};
  PrefixIndex idx;
  for (int s = 0; s < kSlots; ++s) ASSERT_TRUE(idx.Store(s, sys).ok());
  ASSERT_TRUE(idx.Remove(7, {5, 6, 7, 8}).ok());
  ASSERT_TRUE(idx.Remove(9, {5, 6, 7, 8}).ok());
  ASSERT_TRUE(idx.Store(5, conv).ok());
  std::vector<uint64_t> prompt = sys;
  prompt.insert(prompt.end(), conv.begin(), conv.end());
  prompt.push_back(999);  // new
  OverlapResult r;
  idx.Overlaps(prompt, &r);
  EXPECT_EQ(r.max(), 12);
  // Only slot 5 goes past the shared prompt: it is followed on its own.
  ASSERT_EQ(r.listed().size(), 1u);
  EXPECT_EQ(r.listed()[0].slot, 5);
  EXPECT_EQ(r.listed()[0].overlap, 12);
  EXPECT_TRUE(r.IsListed(5));
  EXPECT_FALSE(r.IsListed(6));
  // Everyone else: the widely held blocks as nested levels (at 4, where 7 and 9 drop,
  // and at 8, where all but slot 5 drop).
  ASSERT_EQ(r.num_levels(), 2);
  EXPECT_EQ(r.level_depth(0), 4);
  EXPECT_EQ(r.level_depth(1), 8);
  EXPECT_EQ(r.level_depth(), 8);
  EXPECT_EQ(r.Of(5), 12);
  EXPECT_EQ(r.Of(7), 4);
  EXPECT_EQ(r.Of(9), 4);
  EXPECT_EQ(r.Of(0), 8);
  EXPECT_EQ(r.Of(kSlots - 1), 8);
  EXPECT_EQ(r.Of(kSlots), 0);
  EXPECT_EQ(r.Of(-1), 0);
  std::vector<int32_t> dense(kSlots + 1, -1);
  r.Fill(absl::MakeSpan(dense));
  for (int s = 0; s < kSlots; ++s) EXPECT_EQ(dense[s], r.Of(s)) << s;
  EXPECT_EQ(dense[kSlots], 0);

  // A prompt only a few slots start with is listed from the first block.
  r = OverlapResult();
  idx.Overlaps({11, 12}, &r);  // conv's hashes without the prefix: slot 5 holds them
  EXPECT_EQ(r.num_levels(), 0);
  ASSERT_EQ(r.listed().size(), 1u);
  EXPECT_EQ(r.Of(5), 2);
  EXPECT_EQ(r.Of(6), 0);
  // Nothing held: empty.
  idx.Overlaps({12345}, &r);
  EXPECT_EQ(r.max(), 0);
  EXPECT_TRUE(r.listed().empty());
  EXPECT_EQ(r.num_levels(), 0);
}

TEST(PrefixIndexTest, RandomizedManySlotsAgainstReference) {
  // Hundreds of slots and blocks held by large random subsets, so lookups go through the
  // bitmap levels, the switch to following candidates one by one, and back and forth
  // between holder forms as blocks are stored and removed.
  std::mt19937_64 rng(77);
  constexpr int kSlots = 700;
  constexpr int kChains = 12, kChainLen = 24;
  std::vector<std::vector<uint64_t>> chains(kChains);
  for (auto& c : chains) {
    for (int i = 0; i < kChainLen; ++i) c.push_back(rng());
  }
  for (int c = 1; c < 4; ++c)
    std::copy(chains[0].begin(), chains[0].begin() + 6, chains[c].begin());
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  PrefixIndex idx;
  Reference ref(kSlots);
  OverlapResult r;
  std::vector<int32_t> dense;
  for (int op = 0; op < 3000; ++op) {
    const int kind = pick(100);
    const auto& ch = chains[pick(kChains)];
    if (kind < 50) {
      // A random share of the fleet caches a chain prefix (hot chains: most of it).
      const int len = 1 + pick(kChainLen);
      const int share = pick(3) == 0 ? 95 : 5;
      for (int s = 0; s < kSlots; ++s) {
        if (pick(100) < share) {
          std::vector<uint64_t> h(ch.begin(), ch.begin() + len);
          ASSERT_TRUE(idx.Store(s, h).ok());
          ref.Store(s, h);
        }
      }
    } else if (kind < 85) {
      // Tails evicted on some workers, a middle block on others.
      const int a = pick(kChainLen);
      for (int s = 0; s < kSlots; ++s) {
        if (pick(100) < 10) {
          std::vector<uint64_t> h(ch.begin() + a, ch.begin() + (pick(2) ? kChainLen : a + 1));
          ASSERT_TRUE(idx.Remove(s, h).ok());
          ref.Remove(s, h);
        }
      }
    } else if (kind < 88) {
      const int s = pick(kSlots);
      ASSERT_TRUE(idx.ClearWorker(s).ok());
      ref.Clear(s);
    } else {
      std::vector<uint64_t> prompt(ch.begin(), ch.begin() + pick(kChainLen + 1));
      if (pick(3) == 0) prompt.push_back(rng());
      idx.Overlaps(prompt, &r);
      int32_t best = 0;
      for (int s = 0; s < kSlots; ++s) {
        const int32_t want = ref.Overlap(s, prompt);
        best = std::max(best, want);
        ASSERT_EQ(r.Of(s), want) << "op " << op << " slot " << s;
        // Listed: exactly the slots deeper than every level.
        ASSERT_EQ(r.IsListed(s), want > r.level_depth()) << "op " << op << " slot " << s;
      }
      ASSERT_EQ(r.max(), best) << "op " << op;
      ASSERT_EQ(idx.MaxOverlap(prompt), best) << "op " << op;
      for (size_t i = 1; i < r.listed().size(); ++i) {
        ASSERT_LT(r.listed()[i - 1].slot, r.listed()[i].slot);
      }
      dense.assign(kSlots, -1);
      idx.Overlaps(prompt, absl::MakeSpan(dense));
      for (int s = 0; s < kSlots; ++s) ASSERT_EQ(dense[s], r.Of(s)) << "op " << op;
    }
    if (op % 300 == 0) {
      int64_t held = 0;
      for (int s = 0; s < kSlots; ++s) {
        ASSERT_EQ(idx.blocks(s), ref.Blocks(s)) << "op " << op;
        held += ref.Blocks(s);
      }
      ASSERT_EQ(idx.size(), ref.Size()) << "op " << op;
      ASSERT_EQ(idx.held(), held);
    }
  }
}

TEST(PrefixIndexTest, MemoryBytesCountsTheContainers) {
  PrefixIndex idx;
  const size_t empty = idx.MemoryBytes();
  std::vector<uint64_t> chain(10000);
  for (size_t i = 0; i < chain.size(); ++i) chain[i] = 5000 + i;
  ASSERT_TRUE(idx.Store(0, chain).ok());
  const size_t one = idx.MemoryBytes();
  // At least a table entry (8-byte hash + 16-byte holder set) and a per-slot entry per
  // block; at most a few times that (tables are at most 7/8 full, grown by doubling).
  EXPECT_GE(one - empty, chain.size() * (8 + 16 + 8));
  EXPECT_LE(one - empty, chain.size() * (8 + 16 + 8 + 2) * 4);
  ASSERT_TRUE(idx.ClearWorker(0).ok());
  EXPECT_LT(idx.MemoryBytes(), one);
}

}  // namespace
}  // namespace kvrelay::router
