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

constexpr int kMax = PrefixIndex::kMaxWorkers;

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
  // Longer than kMaxWorkers: the extra entries are zero.
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
  PrefixIndex idx;
  for (int slot : {-1, kMax, kMax + 100}) {
    EXPECT_EQ(idx.Store(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.Remove(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.ClearWorker(slot).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.ReplaceWorker(slot, {1}).code(), absl::StatusCode::kInvalidArgument) << slot;
    EXPECT_EQ(idx.blocks(slot), 0);
    EXPECT_EQ(idx.Overlap(slot, {1}), 0);
  }
  EXPECT_EQ(idx.size(), 0u);
}

TEST(PrefixIndexTest, AllSlots) {
  PrefixIndex idx;
  // Slot s holds the first s+1 blocks of the chain 1000, 1001, ...: every bit of every
  // mask word is exercised, and each slot drops out at its own position.
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
  // Drop the last slot of each mask word.
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
  std::array<std::set<uint64_t>, kMax> sets_;
};

TEST(PrefixIndexTest, RandomizedAgainstReference) {
  std::mt19937_64 rng(20240611);
  // Slots spread over all mask words, few enough that they collide often.
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

}  // namespace
}  // namespace kvrelay::router
