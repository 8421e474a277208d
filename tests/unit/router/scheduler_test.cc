#include "router/scheduler.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

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

}  // namespace
}  // namespace kvrelay::router
