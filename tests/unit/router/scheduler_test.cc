#include "router/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/prefix_index.h"

namespace kvrelay::router {
namespace {

using ::testing::HasSubstr;

constexpr int kB = 16;

WorkerLoadView W(int slot, int64_t active = 0, int64_t running = 0, uint64_t last_chosen = 0) {
  WorkerLoadView w;
  w.slot = slot;
  w.id = absl::StrCat("w", slot);
  w.num_blocks = 1000;
  w.active_blocks = active;
  w.running = running;
  w.last_chosen = last_chosen;
  return w;
}

WorkerLoadView P(int slot, int64_t queued_tokens = 0) {
  WorkerLoadView w = W(slot);
  w.queued_prefill_tokens = queued_tokens;
  return w;
}

RouteDecision Route(const SchedulerOptions& o, int64_t prompt_tokens,
                    const std::vector<int32_t>& overlaps, const std::vector<WorkerLoadView>& d,
                    const std::vector<WorkerLoadView>& p, const std::vector<int>& excluded = {}) {
  auto r = ChooseRoute(o, prompt_tokens, kB, overlaps, d, p, excluded);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : RouteDecision{};
}

TEST(SchedulerTest, PrefersTheWorkerWithThePrefix) {
  // 1024 tokens = 64 blocks. D: slot 0 cost 64, slot 1 cost 64-40 = 24. Uncached on D:
  // 1024 - 40*16 = 384 >= 256 -> remote. P: slot 2 cost 64, slot 3 cost 64-10 = 54.
  const RouteDecision r = Route({}, 1024, {0, 40, 0, 10}, {W(0), W(1)}, {P(2), P(3)});
  EXPECT_EQ(r.decode_slot, 1);
  EXPECT_EQ(r.decode_overlap_blocks, 40);
  EXPECT_EQ(r.uncached_tokens, 384);
  EXPECT_EQ(r.prefill_slot, 3);
  EXPECT_EQ(r.prefill_overlap_blocks, 10);
  EXPECT_EQ(r.max_overlap_blocks, 40);
}

TEST(SchedulerTest, SkipsWorkersOverTheBusyThreshold) {
  SchedulerOptions o;
  o.overlap_weight = 100;  // make the prefix dominate the cost
  // Slot 1: cost 100*(64-40) + 960 = 3360 < slot 0: 100*64 = 6400, but 960/1000 = 0.96 > 0.95.
  EXPECT_EQ(Route(o, 1024, {0, 40}, {W(0), W(1, 960)}, {}).decode_slot, 0);
  // 950/1000 is not over 0.95.
  EXPECT_EQ(Route(o, 1024, {0, 40}, {W(0), W(1, 950)}, {}).decode_slot, 1);
  // A waiting queue over decode_max_waiting (64) is busy too.
  WorkerLoadView queued = W(1);
  queued.waiting = 65;
  EXPECT_EQ(Route(o, 1024, {0, 40}, {W(0), queued}, {}).decode_slot, 0);
  queued.waiting = 64;
  EXPECT_EQ(Route(o, 1024, {0, 40}, {W(0), queued}, {}).decode_slot, 1);
  // A worker without a pool counts as full.
  WorkerLoadView no_pool = W(1);
  no_pool.num_blocks = 0;
  EXPECT_EQ(Route(o, 1024, {0, 40}, {W(0), no_pool}, {}).decode_slot, 0);
}

TEST(SchedulerTest, AllBusyStillRoutesToTheLowestCost) {
  // Both over 0.95: slot 0 cost 64 + 990 = 1054, slot 1 cost 24 + 999 = 1023.
  const RouteDecision r = Route({}, 1024, {0, 40}, {W(0, 990), W(1, 999)}, {});
  EXPECT_EQ(r.decode_slot, 1);
  // A non-busy worker wins over a cheaper busy one.
  EXPECT_EQ(Route({}, 1024, {0, 40}, {W(0, 990), W(1, 999), W(2, 900)}, {}).decode_slot, 2);
}

TEST(SchedulerTest, LoadOutweighsSmallOverlaps) {
  // 64 blocks. weight 1: slot 0 = (64-10) + 100 = 154, slot 1 = 64 + 50 = 114,
  //                      slot 2 = (64-60) + 170 = 174  -> slot 1.
  const std::vector<WorkerLoadView> d = {W(0, 100), W(1, 50), W(2, 170)};
  const std::vector<int32_t> ov = {10, 0, 60};
  SchedulerOptions o;
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 1);
  // weight 3: slot 0 = 3*54 + 100 = 262, slot 1 = 3*64 + 50 = 242, slot 2 = 3*4 + 170 = 182.
  o.overlap_weight = 3;
  const RouteDecision r = Route(o, 1024, ov, d, {});
  EXPECT_EQ(r.decode_slot, 2);
  EXPECT_EQ(r.decode_overlap_blocks, 60);
  // weight 0: load only.
  o.overlap_weight = 0;
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 1);
}

TEST(SchedulerTest, BalanceGuardSkipsWorkersFarAboveTheMeanLoad) {
  // 64 blocks, weight 8: slot 2 holds 60 blocks of the prompt but carries 300 active
  // blocks; mean load (0 + 100 + 300) / 3 = 133.3.
  SchedulerOptions o;
  o.overlap_weight = 8;
  const std::vector<WorkerLoadView> d = {W(0, 0), W(1, 100), W(2, 300)};
  const std::vector<int32_t> ov = {0, 0, 60};
  // Off: slot 2 = 8*4 + 300 = 332 beats slot 0 = 8*64 = 512.
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 2);
  // Ratio 2: 300 > 266.7, skipped: slot 0.
  o.decode_max_load_ratio = 2;
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 0);
  // Ratio 2.5: 300 <= 333.3, allowed again.
  o.decode_max_load_ratio = 2.5;
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 2);
  // Like busy workers, those over the limit are still chosen when nobody else is left.
  // Ratio 1 (limit 133.3): slot 1 (100) is within it, slot 2 is not.
  o.decode_max_load_ratio = 1;
  EXPECT_EQ(Route(o, 1024, ov, d, {}).decode_slot, 0);
  EXPECT_EQ(Route(o, 1024, ov, d, {}, {0}).decode_slot, 1);
  EXPECT_EQ(Route(o, 1024, ov, d, {}, {0, 1}).decode_slot, 2);
  // The fast path agrees.
  FleetOrder fleet(o);
  for (const auto& w : d) ASSERT_TRUE(fleet.Set(w, true).ok());
  EXPECT_EQ(fleet.decode_load_sum(), 400);
  PrefixIndex index;
  std::vector<uint64_t> prompt(64);
  for (int i = 0; i < 64; ++i) prompt[i] = 500 + i;
  ASSERT_TRUE(index.Store(2, absl::MakeConstSpan(prompt).first(60)).ok());
  OverlapResult r;
  index.Overlaps(prompt, &r);
  for (double ratio : {0.0, 2.0, 2.5, 1.0}) {
    o.decode_max_load_ratio = ratio;
    for (const std::vector<int>& ex :
         {std::vector<int>{}, std::vector<int>{0}, std::vector<int>{0, 1}}) {
      auto fast = ChooseRouteFast(o, 1024, kB, r, fleet, ex);
      ASSERT_TRUE(fast.ok()) << fast.status();
      EXPECT_EQ(fast->decode_slot, Route(o, 1024, ov, d, {}, ex).decode_slot) << ratio;
    }
  }
  fleet.Erase(2);
  EXPECT_EQ(fleet.decode_load_sum(), 100);
}

TEST(SchedulerTest, TiesBreakOnRunningThenLastChosenThenSlot) {
  // Equal cost everywhere.
  EXPECT_EQ(Route({}, 1024, {}, {W(0, 0, 3), W(1, 0, 1), W(2, 0, 2)}, {}).decode_slot, 1);
  EXPECT_EQ(Route({}, 1024, {}, {W(0, 0, 1, 5), W(1, 0, 1, 3), W(2, 0, 1, 9)}, {}).decode_slot, 1);
  EXPECT_EQ(Route({}, 1024, {}, {W(2), W(1), W(0)}, {}).decode_slot, 0);
  // Cost beats the tie-breaks.
  EXPECT_EQ(Route({}, 1024, {}, {W(0, 1, 0, 0), W(1, 0, 9, 9)}, {}).decode_slot, 1);
}

TEST(SchedulerTest, IdenticalRequestsSpreadRoundRobin) {
  std::vector<WorkerLoadView> d = {W(0), W(1), W(2)};
  std::vector<WorkerLoadView> p = {P(3), P(4)};
  uint64_t counter = 0;
  std::vector<int> ds, ps;
  for (int i = 0; i < 6; ++i) {
    const RouteDecision r = Route({}, 4096, {}, d, p);
    ds.push_back(r.decode_slot);
    ps.push_back(r.prefill_slot);
    // The router's bookkeeping: the chosen workers get the next counter value.
    for (auto& w : d) {
      if (w.slot == r.decode_slot) w.last_chosen = ++counter;
    }
    for (auto& w : p) {
      if (w.slot == r.prefill_slot) w.last_chosen = ++counter;
    }
  }
  EXPECT_EQ(ds, (std::vector<int>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(ps, (std::vector<int>{3, 4, 3, 4, 3, 4}));
}

TEST(SchedulerTest, ExcludedDecodeSlots) {
  const std::vector<WorkerLoadView> d = {W(0), W(1), W(2)};
  const std::vector<int32_t> ov = {0, 40, 20};
  EXPECT_EQ(Route({}, 1024, ov, d, {}, {1}).decode_slot, 2);
  EXPECT_EQ(Route({}, 1024, ov, d, {}, {1, 2}).decode_slot, 0);
  // Excluding slots that are not decode workers changes nothing.
  EXPECT_EQ(Route({}, 1024, ov, d, {}, {7}).decode_slot, 1);
  auto r = ChooseRoute({}, 1024, kB, ov, d, {}, std::vector<int>{0, 1, 2});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("excluded"));
}

TEST(SchedulerTest, NoDecodeWorkersIsUnavailable) {
  auto r = ChooseRoute({}, 1024, kB, {}, {}, std::vector<WorkerLoadView>{P(0)}, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
}

TEST(SchedulerTest, LocalPrefillNeedsFewUncachedTokensAndLowRatio) {
  const std::vector<WorkerLoadView> d = {W(0)};
  const std::vector<WorkerLoadView> p = {P(1)};
  // 1000 tokens, 60 blocks on D: uncached 40 < 256 and 0.04 < 0.5 -> local.
  RouteDecision r = Route({}, 1000, {60}, d, p);
  EXPECT_EQ(r.uncached_tokens, 40);
  EXPECT_EQ(r.prefill_slot, -1);
  EXPECT_EQ(r.prefill_overlap_blocks, 0);
  // 200 tokens, nothing cached: 200 < 256 -> local (a short cold prompt).
  r = Route({}, 200, {0}, d, p);
  EXPECT_EQ(r.uncached_tokens, 200);
  EXPECT_EQ(r.prefill_slot, -1);
  // 200 tokens, 8 blocks cached: uncached 72, ratio 0.36 -> local.
  r = Route({}, 200, {8}, d, p);
  EXPECT_EQ(r.uncached_tokens, 72);
  EXPECT_EQ(r.prefill_slot, -1);
  // 10000 tokens, 600 blocks cached: uncached 400 >= 256 though ratio is 0.04 -> remote.
  r = Route({}, 10000, {600}, d, p);
  EXPECT_EQ(r.uncached_tokens, 400);
  EXPECT_EQ(r.prefill_slot, 1);
  // The token bound is strict: 4096 - 240*16 = 256 -> remote; 241 blocks -> 240 -> local.
  EXPECT_EQ(Route({}, 4096, {240}, d, p).prefill_slot, 1);
  EXPECT_EQ(Route({}, 4096, {241}, d, p).prefill_slot, -1);
  // The ratio (off by default) keeps mostly-cached prompts local too, strictly:
  // 1000 tokens, 30 blocks cached -> 520 uncached, 0.52 -> remote; 32 -> 488, 0.488 -> local.
  SchedulerOptions ratio;
  ratio.local_prefill_max_ratio = 0.5;
  EXPECT_EQ(Route(ratio, 1000, {30}, d, p).prefill_slot, 1);
  EXPECT_EQ(Route(ratio, 1000, {32}, d, p).prefill_slot, -1);
  EXPECT_EQ(Route({}, 1000, {32}, d, p).prefill_slot, 1);
}

TEST(SchedulerTest, FullPromptHitStillComputesTheLastToken) {
  const RouteDecision r = Route({}, 1024, {64}, {W(0)}, {P(1)});
  EXPECT_EQ(r.decode_overlap_blocks, 64);
  EXPECT_EQ(r.uncached_tokens, 1);
  EXPECT_EQ(r.prefill_slot, -1);
}

TEST(SchedulerTest, ShortColdPromptsPrefillLocallyLongOnesRemotely) {
  EXPECT_EQ(Route({}, 200, {}, {W(0)}, {P(1)}).prefill_slot, -1);
  EXPECT_EQ(Route({}, 300, {}, {W(0)}, {P(1)}).prefill_slot, 1);  // 300 >= 256
}

TEST(SchedulerTest, NoUsablePrefillWorkerMeansLocal) {
  // A long cold prompt would go remote ...
  EXPECT_EQ(Route({}, 8192, {}, {W(0)}, {P(1)}).prefill_slot, 1);
  // ... but with no prefill worker up D prefills it ...
  RouteDecision r = Route({}, 8192, {}, {W(0)}, {});
  EXPECT_EQ(r.decode_slot, 0);
  EXPECT_EQ(r.prefill_slot, -1);
  EXPECT_EQ(r.uncached_tokens, 8192);
  // ... and the same when every prefill worker's queue is over the limit (65536 tokens).
  EXPECT_EQ(Route({}, 8192, {}, {W(0)}, {P(1, 65537), P(2, 70000)}).prefill_slot, -1);
  EXPECT_EQ(Route({}, 8192, {}, {W(0)}, {P(1, 65537), P(2, 65536)}).prefill_slot, 2);
}

TEST(SchedulerTest, PrefillCostCountsQueuedTokensInBlocks) {
  // 64 blocks. P slot 1: 64 + 320/16 = 84. P slot 2: (64-30) + 1024/16 = 98 -> slot 1.
  RouteDecision r = Route({}, 1024, {0, 0, 30}, {W(0)}, {P(1, 320), P(2, 1024)});
  EXPECT_EQ(r.prefill_slot, 1);
  EXPECT_EQ(r.prefill_overlap_blocks, 0);
  EXPECT_EQ(r.max_overlap_blocks, 30);
  // Queue 480 tokens on slot 1: 64 + 30 = 94 < 98 still; 800: 64 + 50 = 114 > 98.
  EXPECT_EQ(Route({}, 1024, {0, 0, 30}, {W(0)}, {P(1, 480), P(2, 1024)}).prefill_slot, 1);
  r = Route({}, 1024, {0, 0, 30}, {W(0)}, {P(1, 800), P(2, 1024)});
  EXPECT_EQ(r.prefill_slot, 2);
  EXPECT_EQ(r.prefill_overlap_blocks, 30);
}

TEST(SchedulerTest, OverlapsAreClampedAndMissingSlotsCountZero) {
  // 100 tokens = 6 full blocks; an overlap of 50 is clamped to 6. Slot 5 is past the
  // overlaps span: overlap 0.
  const RouteDecision r = Route({}, 100, {50}, {W(5), W(0, 5)}, {});
  // slot 0: (6-6) + 5 = 5; slot 5: 6 + 0 = 6.
  EXPECT_EQ(r.decode_slot, 0);
  EXPECT_EQ(r.decode_overlap_blocks, 6);
  EXPECT_EQ(r.uncached_tokens, 4);
  EXPECT_EQ(r.max_overlap_blocks, 6);
  EXPECT_EQ(Route({}, 100, {-3}, {W(0)}, {}).decode_overlap_blocks, 0);
}

TEST(SchedulerTest, BadInput) {
  const std::vector<WorkerLoadView> d = {W(0)};
  EXPECT_EQ(ChooseRoute({}, 0, kB, {}, d, {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseRoute({}, 100, 0, {}, d, {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<WorkerLoadView> bad = {W(-1)};
  EXPECT_EQ(ChooseRoute({}, 100, kB, {}, bad, {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseRoute({}, 100, kB, {}, d, bad, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  SchedulerOptions o;
  o.overlap_weight = -1;
  auto r = ChooseRoute(o, 100, kB, {}, d, {}, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("overlap_weight"));
}

TEST(SchedulerTest, ValidateNamesTheBadOption) {
  EXPECT_TRUE(Validate(SchedulerOptions{}).ok());
  struct Case {
    const char* name;
    void (*set)(SchedulerOptions*);
  };
  const Case cases[] = {
      {"overlap_weight", [](SchedulerOptions* o) { o->overlap_weight = -0.5; }},
      {"overlap_weight",
       [](SchedulerOptions* o) { o->overlap_weight = std::numeric_limits<double>::quiet_NaN(); }},
      {"overlap_weight",
       [](SchedulerOptions* o) { o->overlap_weight = std::numeric_limits<double>::infinity(); }},
      {"decode_busy_threshold", [](SchedulerOptions* o) { o->decode_busy_threshold = -0.1; }},
      {"decode_max_waiting", [](SchedulerOptions* o) { o->decode_max_waiting = -1; }},
      {"prefill_max_queued_tokens", [](SchedulerOptions* o) { o->prefill_max_queued_tokens = -1; }},
      {"local_prefill_max_tokens", [](SchedulerOptions* o) { o->local_prefill_max_tokens = -1; }},
      {"local_prefill_max_ratio",
       [](SchedulerOptions* o) { o->local_prefill_max_ratio = std::nan(""); }},
      {"decode_max_load_ratio", [](SchedulerOptions* o) { o->decode_max_load_ratio = -1; }},
      {"decode_max_load_ratio", [](SchedulerOptions* o) { o->decode_max_load_ratio = 0.5; }},
  };
  for (const Case& c : cases) {
    SchedulerOptions o;
    c.set(&o);
    const absl::Status s = Validate(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(s.message(), HasSubstr(c.name));
  }
  // Zero is allowed everywhere (e.g. weight 0 = load only, max_tokens 0 = never local).
  SchedulerOptions zero{0, 0, 0, 0, 0, 0};
  EXPECT_TRUE(Validate(zero).ok());
}

// ---- FleetOrder / ChooseRouteFast ----------------------------------------------------

// The fast path over the same inputs as the dense one: an index where slot s holds the
// first overlaps[s] blocks of `hashes`, and a fleet order of `d` and `p`.
struct FastInputs {
  PrefixIndex index;
  OverlapResult overlaps;
  FleetOrder fleet;
  explicit FastInputs(const SchedulerOptions& o) : fleet(o) {}
};

std::unique_ptr<FastInputs> MakeFast(const SchedulerOptions& o, const std::vector<uint64_t>& hashes,
                                     const std::vector<int32_t>& overlaps,
                                     const std::vector<WorkerLoadView>& d,
                                     const std::vector<WorkerLoadView>& p) {
  auto f = std::make_unique<FastInputs>(o);
  for (size_t s = 0; s < overlaps.size(); ++s) {
    const size_t n = std::min<size_t>(std::max(overlaps[s], 0), hashes.size());
    EXPECT_TRUE(f->index.Store(static_cast<int>(s), absl::MakeConstSpan(hashes).first(n)).ok());
  }
  f->index.Overlaps(hashes, &f->overlaps);
  for (const auto& w : d) EXPECT_TRUE(f->fleet.Set(w, true).ok());
  for (const auto& w : p) EXPECT_TRUE(f->fleet.Set(w, false).ok());
  return f;
}

std::vector<uint64_t> Chain(size_t n) {
  std::vector<uint64_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = 0x9e3779b97f4a7c15ull * (i + 1);
  return h;
}

TEST(SchedulerTest, FastPathMatchesOnTheHandWrittenCases) {
  const std::vector<uint64_t> h = Chain(64);
  auto f = MakeFast({}, h, {0, 40, 0, 10}, {W(0), W(1)}, {P(2), P(3)});
  auto r = ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->decode_slot, 1);
  EXPECT_EQ(r->decode_overlap_blocks, 40);
  EXPECT_EQ(r->uncached_tokens, 384);
  EXPECT_EQ(r->prefill_slot, 3);
  EXPECT_EQ(r->prefill_overlap_blocks, 10);
  EXPECT_EQ(r->max_overlap_blocks, 40);

  // Busy workers are skipped while another is not busy; chosen when all are.
  SchedulerOptions o;
  o.overlap_weight = 100;
  f = MakeFast(o, h, {0, 40}, {W(0), W(1, 960)}, {});
  EXPECT_EQ(ChooseRouteFast(o, 1024, kB, f->overlaps, f->fleet, {})->decode_slot, 0);
  f = MakeFast({}, h, {0, 40}, {W(0, 990), W(1, 999)}, {});
  EXPECT_EQ(ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, {})->decode_slot, 1);

  // Ties: fewest running, then least recently chosen, then slot.
  f = MakeFast({}, h, {}, {W(0, 0, 1, 5), W(1, 0, 1, 3), W(2, 0, 1, 9)}, {});
  EXPECT_EQ(ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, {})->decode_slot, 1);

  // Exclusions, and nobody left.
  f = MakeFast({}, h, {0, 40, 20}, {W(0), W(1), W(2)}, {});
  EXPECT_EQ(ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, std::vector<int>{1})->decode_slot,
            2);
  r = ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, std::vector<int>{0, 1, 2});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("all 3 decode workers are excluded"));
  f = MakeFast({}, h, {}, {}, {P(0)});
  r = ChooseRouteFast({}, 1024, kB, f->overlaps, f->fleet, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("no decode worker is up"));

  // Bad input, and a busy rule the order was not built with.
  EXPECT_EQ(ChooseRouteFast({}, 0, kB, f->overlaps, f->fleet, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseRouteFast({}, 100, 0, f->overlaps, f->fleet, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  SchedulerOptions other;
  other.decode_busy_threshold = 0.5;
  EXPECT_EQ(ChooseRouteFast(other, 100, kB, f->overlaps, f->fleet, {}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A block a worker holds only in a lower tier costs host_hit_cost / disk_hit_cost of a
// recompute: a pool hit beats a host hit beats a disk hit beats a miss, and both paths
// decide the same.
TEST(SchedulerTest, LowerTierHitsCostBetweenAPoolHitAndAMiss) {
  const std::vector<uint64_t> h = Chain(64);
  SchedulerOptions o;  // host 0.05, disk 0.2 of a recompute
  // Slots 0..3 hold the first 40 blocks: in the pool, in host memory, on disk; slot 3
  // holds nothing but is idle, slot 4 is the prefill worker.
  PrefixIndex index;
  ASSERT_TRUE(index.Store(0, absl::MakeConstSpan(h).first(40), PrefixIndex::kPool).ok());
  ASSERT_TRUE(index.Store(1, absl::MakeConstSpan(h).first(40), PrefixIndex::kHost).ok());
  ASSERT_TRUE(index.Store(2, absl::MakeConstSpan(h).first(40), PrefixIndex::kDisk).ok());
  auto split = [&](int slot, int32_t ov) { return index.Split(slot, h, ov); };
  std::vector<int32_t> dense(5);
  index.Overlaps(h, absl::MakeSpan(dense));
  EXPECT_EQ(dense, (std::vector<int32_t>{40, 40, 40, 0, 0}));
  OverlapResult sparse;
  index.Overlaps(h, &sparse);
  auto decide = [&](const std::vector<WorkerLoadView>& d) {
    FleetOrder fleet(o);
    for (const auto& w : d) EXPECT_TRUE(fleet.Set(w, true).ok());
    auto slow = ChooseRoute(o, 1024, kB, dense, d, {}, {}, split);
    auto fast = ChooseRouteFast(o, 1024, kB, sparse, fleet, {}, split);
    EXPECT_TRUE(slow.ok() && fast.ok());
    EXPECT_EQ(slow->decode_slot, fast->decode_slot);
    EXPECT_EQ(slow->decode_overlap_blocks, fast->decode_overlap_blocks);
    return *slow;
  };
  RouteDecision r = decide({W(0, 5), W(1, 3), W(2), W(3)});
  EXPECT_EQ(r.decode_slot, 0);  // 0 + 5 < 40 x 0.05 + 3 = 5 (tie: fewer running wins) ...
  r = decide({W(0, 10), W(1, 3), W(2), W(3)});
  EXPECT_EQ(r.decode_slot, 1);  // ... 10 > 2 + 3: the host hit wins
  EXPECT_EQ(r.decode_split.host, 40);
  EXPECT_EQ(r.decode_split.pool, 0);
  EXPECT_EQ(r.decode_overlap_blocks, 40);  // reloaded, not recomputed: counts as cached
  EXPECT_EQ(r.uncached_tokens, 384);
  r = decide({W(0, 10), W(1, 10), W(2, 1), W(3)});
  EXPECT_EQ(r.decode_slot, 2);  // 8 + 1 < 2 + 10
  EXPECT_EQ(r.decode_split.disk, 40);
  r = decide({W(0, 50), W(1, 50), W(2, 30), W(3, 0)});
  EXPECT_EQ(r.decode_slot, 2);  // 8 + 30 < 64 + 0: a disk hit still beats a miss
  r = decide({W(0, 50), W(1, 50), W(2, 40), W(3, 0)});
  EXPECT_EQ(r.decode_slot, 3);
  EXPECT_EQ(r.max_overlap_blocks, 40);
  EXPECT_EQ(r.max_overlap_split.pool + r.max_overlap_split.host + r.max_overlap_split.disk, 40);
  // At cost 1 a lower-tier hit is worth no more than a miss.
  o.host_hit_cost = o.disk_hit_cost = 1;
  r = decide({W(1, 3), W(3, 0)});
  EXPECT_EQ(r.decode_slot, 3);
}

TEST(SchedulerTest, TierCostsMustBeFractions) {
  SchedulerOptions o;
  o.host_hit_cost = 1.5;
  EXPECT_THAT(Validate(o).message(), HasSubstr("host_hit_cost"));
  o.host_hit_cost = 0.1;
  o.disk_hit_cost = -1;
  EXPECT_THAT(Validate(o).message(), HasSubstr("disk_hit_cost"));
}

TEST(SchedulerTest, FleetOrderSetUpdatesAndErases) {
  FleetOrder f;
  EXPECT_TRUE(f.SameBusyRule(SchedulerOptions{}));
  SchedulerOptions o;
  o.decode_max_waiting = 3;
  EXPECT_FALSE(f.SameBusyRule(o));
  EXPECT_EQ(f.Set(W(-1), true).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(f.Set(W(3), true).ok());
  ASSERT_TRUE(f.Set(W(9000), true).ok());  // slots far apart are fine
  EXPECT_EQ(f.decode_size(), 2u);
  ASSERT_TRUE(f.Set(W(3), false).ok());  // another role: moved, not duplicated
  EXPECT_EQ(f.decode_size(), 1u);
  EXPECT_EQ(f.prefill_size(), 1u);
  EXPECT_TRUE(f.Contains(3));
  f.Erase(3);
  f.Erase(3);
  f.Erase(-4);
  f.Erase(123456);
  EXPECT_FALSE(f.Contains(3));
  EXPECT_EQ(f.prefill_size(), 0u);
  EXPECT_EQ(f.decode_size(), 1u);
  // Updated loads move the worker in the order: the lighter one wins.
  ASSERT_TRUE(f.Set(W(1, 50), true).ok());
  ASSERT_TRUE(f.Set(W(9000, 60), true).ok());
  OverlapResult none;
  EXPECT_EQ(ChooseRouteFast({}, 1024, kB, none, f, {})->decode_slot, 1);
  ASSERT_TRUE(f.Set(W(1, 70), true).ok());
  EXPECT_EQ(ChooseRouteFast({}, 1024, kB, none, f, {})->decode_slot, 9000);
}

// The fast path is ChooseRoute: random fleets (loads drawn from small ranges so ties are
// common, busy and over-limit workers, exclusions), random indexes (blocks held by one,
// a few or most workers, so the sparse result has listed slots and bitmap levels) and
// random options; every decision and every error must be the same.
TEST(SchedulerTest, FastPathEqualsChooseRouteOnRandomFleets) {
  std::mt19937_64 rng(424242);
  auto pick = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  int decisions = 0, remote = 0, busy_chosen = 0, listed_won = 0, level_won = 0, guarded = 0;
  for (int round = 0; round < 400; ++round) {
    SchedulerOptions o;
    const double weights[] = {0, 0.5, 1, 1, 3, 100};
    o.overlap_weight = weights[pick(6)];
    o.decode_busy_threshold = pick(4) == 0 ? 0.5 : 0.95;
    o.decode_max_waiting = pick(3) == 0 ? 1 : 64;
    o.prefill_max_queued_tokens = pick(2) ? 65536 : 300;
    o.local_prefill_max_tokens = pick(2) ? 256 : 0;
    o.local_prefill_max_ratio = pick(3) == 0 ? 0.5 : 0;
    const double ratios[] = {0, 0, 1, 1.25, 2};
    o.decode_max_load_ratio = ratios[pick(5)];

    // A fleet of up to ~600 slots (sometimes a handful), roles mixed, slots shuffled.
    const int n_slots =
        pick(4) == 0 ? 1 + static_cast<int>(pick(6)) : 50 + static_cast<int>(pick(550));
    std::vector<int> slots(n_slots + 10);
    for (size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<int>(i);
    std::shuffle(slots.begin(), slots.end(), rng);
    slots.resize(n_slots);  // some slot numbers are unused (dead or never registered)
    const int64_t load_range = pick(2) ? 4 : 2000;
    std::vector<WorkerLoadView> d, p;
    for (int s : slots) {
      WorkerLoadView w;
      w.slot = s;
      w.id = absl::StrCat("w", s);
      w.num_blocks = pick(20) == 0 ? 0 : 1000;
      w.active_blocks = pick(load_range) + (pick(10) == 0 ? 900 : 0);
      w.running = pick(3);
      w.waiting = pick(4);
      w.queued_prefill_tokens = pick(load_range) * (pick(4) == 0 ? 200 : 1);
      w.last_chosen = static_cast<uint64_t>(pick(4));
      (pick(4) == 0 ? p : d).push_back(w);
    }

    // The index: a shared system prompt most workers hold, conversations on a few.
    FastInputs f(o);
    const int chain_len = 1 + static_cast<int>(pick(40));
    std::vector<std::vector<uint64_t>> chains(4);
    for (auto& c : chains) {
      for (int i = 0; i < chain_len; ++i) c.push_back(rng());
    }
    for (size_t c = 1; c < chains.size(); ++c) {
      const int shared = static_cast<int>(pick(chain_len + 1));
      std::copy(chains[0].begin(), chains[0].begin() + shared, chains[c].begin());
    }
    for (int s : slots) {
      for (size_t c = 0; c < chains.size(); ++c) {
        const int share = c == 0 ? 80 : 3;
        if (pick(100) >= share) continue;
        const int len = static_cast<int>(pick(chain_len + 1));
        ASSERT_TRUE(f.index.Store(s, absl::MakeConstSpan(chains[c]).first(len)).ok());
      }
    }
    for (const auto& w : d) ASSERT_TRUE(f.fleet.Set(w, true).ok());
    for (const auto& w : p) ASSERT_TRUE(f.fleet.Set(w, false).ok());

    std::vector<int32_t> dense;
    for (int q = 0; q < 30; ++q) {
      std::vector<uint64_t> prompt = chains[pick(chains.size())];
      prompt.resize(pick(chain_len + 1));
      if (pick(2)) prompt.push_back(rng());
      const int64_t blocks = static_cast<int64_t>(prompt.size()) + pick(3) - 1;
      const int64_t tokens = std::max<int64_t>(1, blocks * kB + pick(kB)) * (pick(30) == 0 ? 0 : 1);
      std::vector<int> excluded;
      if (pick(3) == 0) {
        for (int k = static_cast<int>(pick(4)); k > 0; --k)
          excluded.push_back(slots[pick(n_slots)]);
      }
      if (pick(40) == 0) {
        for (const auto& w : d) excluded.push_back(w.slot);  // everyone
      }
      f.index.Overlaps(prompt, &f.overlaps);
      dense.assign(n_slots + 10, -1);
      f.index.Overlaps(prompt, absl::MakeSpan(dense));
      const auto want = ChooseRoute(o, tokens, kB, dense, d, p, excluded);
      const auto got = ChooseRouteFast(o, tokens, kB, f.overlaps, f.fleet, excluded);
      ASSERT_EQ(got.status().code(), want.status().code())
          << "round " << round << " q " << q << ": " << got.status() << " vs " << want.status();
      if (!want.ok()) {
        EXPECT_EQ(got.status().message(), want.status().message());
        continue;
      }
      SCOPED_TRACE(absl::StrCat("round ", round, " q ", q));
      ASSERT_EQ(got->decode_slot, want->decode_slot);
      ASSERT_EQ(got->prefill_slot, want->prefill_slot);
      ASSERT_EQ(got->decode_overlap_blocks, want->decode_overlap_blocks);
      ASSERT_EQ(got->prefill_overlap_blocks, want->prefill_overlap_blocks);
      ASSERT_EQ(got->uncached_tokens, want->uncached_tokens);
      ASSERT_EQ(got->max_overlap_blocks, want->max_overlap_blocks);
      ++decisions;
      remote += want->prefill_slot >= 0;
      for (const auto& w : d) {
        if (w.slot == want->decode_slot) {
          WorkerLoadView copy = w;
          busy_chosen += (copy.num_blocks <= 0 ||
                          static_cast<double>(copy.active_blocks) / copy.num_blocks >
                              o.decode_busy_threshold ||
                          copy.waiting > o.decode_max_waiting);
        }
      }
      if (o.decode_max_load_ratio > 0) {
        int64_t sum = 0;
        for (const auto& w : d) sum += w.active_blocks;
        for (const auto& w : d) {
          // The guard passed over a less loaded worker that held more of the prompt.
          const bool over = static_cast<double>(w.active_blocks) >
                            o.decode_max_load_ratio * static_cast<double>(sum) / d.size();
          guarded +=
              over && w.slot != want->decode_slot && dense[w.slot] > want->decode_overlap_blocks;
        }
      }
      if (f.overlaps.IsListed(want->decode_slot)) {
        ++listed_won;
      } else if (want->decode_overlap_blocks > 0) {
        ++level_won;
      }
    }
  }
  // The cases the fast path distinguishes all happened.
  EXPECT_GT(decisions, 5000);
  EXPECT_GT(remote, 100);
  EXPECT_GT(busy_chosen, 50);
  EXPECT_GT(listed_won, 100);
  EXPECT_GT(level_won, 100);
  EXPECT_GT(guarded, 100);
}

}  // namespace
}  // namespace kvrelay::router
