// The router's routing decision (DESIGN §5) as a pure function of the prompt, the
// prefix overlaps from the PrefixIndex and a snapshot of worker load: which decode
// worker D owns the request, and whether D prefills locally or a prefill worker P
// computes the prompt and ships the KV to D. No clocks, no randomness, no state: the
// caller (the router) supplies load and the tie-break counter, so every case can be
// unit-tested by hand.
//
// Decode worker D:
//   cost(w) = overlap_weight x (prompt_blocks - overlap(w) + tier_cost(w)) + active_blocks(w)
// where overlap(w) counts the leading prompt blocks w holds in any tier of its KV cache,
// and tier_cost(w) = host_hit_cost x (those in its host-memory tier only) + disk_hit_cost x
// (those on its disk only): a lower-tier hit is cheaper than a recompute (cost 1 per
// block) and dearer than a pool hit (0), since the blocks must be copied back up first.
// lowest cost wins. Workers over their busy threshold (active_blocks / num_blocks >
// decode_busy_threshold, or waiting > decode_max_waiting, or active_blocks >
// decode_max_load_ratio x the mean active_blocks of the decode workers when that guard is
// on) are skipped while any worker is not busy; when EVERY candidate is busy the lowest-cost busy
// one is chosen anyway. As in vLLM's and Dynamo's routers, the worker queues the request: load is
// bounded by the router's own admission queue (RESOURCE_EXHAUSTED there), not by refusing to route
// a request that was already admitted.
//
// Prefill worker P (only when the prefill is remote):
//   cost(p) = overlap_weight x (prompt_blocks - overlap(p) + tier_cost(p))
//             + queued_prefill_tokens(p) / block_size
// skipping workers with queued_prefill_tokens > prefill_max_queued_tokens. Unlike D, a
// busy P is never chosen: D can always prefill locally instead.
//
// Ties (equal cost): fewest running sequences, then least recently chosen (smaller
// last_chosen), then smaller slot. The caller bumps last_chosen of the chosen workers,
// which spreads identical requests over identical idle workers round-robin.
//
// Remote or local prefill: local on D when
//   uncached_tokens < local_prefill_max_tokens OR uncached_tokens / prompt_tokens <
//   local_prefill_max_ratio,
// or when no prefill worker is usable (none up, or all busy). DESIGN §5 joins the two
// conditions with AND, which sends every short cold prompt (ratio 1) to a prefill worker:
// a transfer and a second RPC for a few tokens D computes in one step. Short uncached
// prompts prefill locally (Dynamo's rule too); the ratio (off by default) can keep a
// mostly cached long prompt local as well.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "router/prefix_index.h"

namespace kvrelay::router {

struct SchedulerOptions {
  // cost(w) = overlap_weight x (prompt_blocks - overlap(w)) + active_blocks(w).
  double overlap_weight = 1.0;
  // Skip D when active_blocks / num_blocks > this ...
  double decode_busy_threshold = 0.95;
  // ... or when its waiting queue is longer than this.
  int64_t decode_max_waiting = 64;
  // Skip P when its queued prefill tokens exceed this.
  int64_t prefill_max_queued_tokens = 65536;
  // Prefill locally on D when uncached < local_prefill_max_tokens OR
  // uncached / prompt < local_prefill_max_ratio (0: off), or when no P is usable.
  int64_t local_prefill_max_tokens = 256;
  double local_prefill_max_ratio = 0.0;
  // Balance guard (0: off; else >= 1): D is also skipped like a busy worker when its
  // active_blocks exceed this many times the mean over the decode workers, so prefix
  // affinity (a high overlap_weight) cannot pile requests onto the workers that hold
  // popular prefixes. router_sim measures the trade-off (docs/benchmarks.md).
  double decode_max_load_ratio = 0;
  // What a block held only in a worker's host-memory tier / only on its disk tier costs,
  // as a fraction of recomputing it (0: as good as a pool hit; 1: no better than a miss).
  // In [0, 1]. Measured on the CPU here (docs/benchmarks.md, "Tiered KV cache"): a
  // 16-token block of the demo model costs ~2 ms to prefill, ~15 us to reload from host
  // memory (0.007) and 100-140 us from disk with a warm page cache (0.05-0.07). A GPU recomputes
  // ~100x faster while a host-to-device copy costs about as much, so there the ratios are
  // ~10x larger; the defaults sit between the two, and leave room for cold disk reads.
  double host_hit_cost = 0.05;
  double disk_hit_cost = 0.2;
};

// INVALID_ARGUMENT naming the first bad option: every number must be finite and >= 0.
absl::Status Validate(const SchedulerOptions& options);

// One worker's load as last reported (plus the router's tie-break counter).
struct WorkerLoadView {
  int slot = -1;                      // PrefixIndex slot; indexes `overlaps`
  std::string id;                     // for messages only
  int64_t num_blocks = 0;             // KV pool size; <= 0 counts as fully busy
  int64_t active_blocks = 0;          // blocks held by running/waiting sequences
  int64_t running = 0;                // sequences in the running batch (in-flight prefills for P)
  int64_t waiting = 0;                // sequences queued for admission
  int64_t queued_prefill_tokens = 0;  // prompt tokens queued for prefill (P)
  uint64_t last_chosen = 0;           // router counter value when last chosen; smaller = longer ago
};

// How the first `overlap` blocks of the prompt that `slot` holds are split over its
// tiers (PrefixIndex::Split); the scheduler prices the lower-tier ones.
using TierSplitFn = absl::FunctionRef<PrefixIndex::TierSplit(int slot, int32_t overlap)>;

struct RouteDecision {
  int decode_slot = -1;
  int prefill_slot = -1;               // -1: D prefills locally
  int32_t decode_overlap_blocks = 0;   // leading prompt blocks D already holds
  int32_t prefill_overlap_blocks = 0;  // leading prompt blocks P already holds (0 if local)
  // Prompt tokens D must still compute (local) or have transferred (remote):
  // max(1, prompt_tokens - decode_overlap_blocks x block_size), since the last prompt
  // token is always computed to produce the first output token.
  int64_t uncached_tokens = 0;
  int32_t max_overlap_blocks = 0;  // longest prefix held anywhere in the fleet
  // decode_overlap_blocks / prefill_overlap_blocks by tier.
  PrefixIndex::TierSplit decode_split;
  PrefixIndex::TierSplit prefill_split;
  PrefixIndex::TierSplit max_overlap_split;  // of a worker holding max_overlap_blocks
};

// Chooses D, and P or local prefill, for a prompt of `prompt_tokens` tokens split into
// blocks of `block_size` (prompt_blocks = prompt_tokens / block_size full blocks).
// `overlaps[slot]` is the slot's leading-block overlap (PrefixIndex::Overlaps); slots
// beyond overlaps.size() count as 0, values are clamped to [0, prompt_blocks].
// max_overlap_blocks is the largest (clamped) entry of `overlaps`. Decode workers whose
// slot is in `excluded_decode_slots` (e.g. ones that already failed this request) are
// not considered.
// Errors: INVALID_ARGUMENT for bad options, prompt_tokens <= 0, block_size <= 0 or a
// negative worker slot; UNAVAILABLE when no decode worker is left to choose.
// `split` tells where a worker holds its overlap (without it: all in the pool).
absl::StatusOr<RouteDecision> ChooseRoute(const SchedulerOptions& options, int64_t prompt_tokens,
                                          int block_size, absl::Span<const int32_t> overlaps,
                                          absl::Span<const WorkerLoadView> decode_workers,
                                          absl::Span<const WorkerLoadView> prefill_workers,
                                          absl::Span<const int> excluded_decode_slots);
absl::StatusOr<RouteDecision> ChooseRoute(const SchedulerOptions& options, int64_t prompt_tokens,
                                          int block_size, absl::Span<const int32_t> overlaps,
                                          absl::Span<const WorkerLoadView> decode_workers,
                                          absl::Span<const WorkerLoadView> prefill_workers,
                                          absl::Span<const int> excluded_decode_slots,
                                          TierSplitFn split);

// ---- The same decision for large fleets -------------------------------------------------
//
// ChooseRoute looks at every worker, and its caller must copy every worker's load for
// each decision: at thousands of workers that alone is far slower than the ~10 us a
// decision may take. ChooseRouteFast makes the identical decision (a randomized test
// checks it against ChooseRoute) from a sparse OverlapResult and a FleetOrder the router
// keeps up to date, looking only at the workers that hold a prefix of the prompt plus
// the head of the load order:
//   - A worker whose overlap is not listed in the OverlapResult has overlap <= K (the
//     deepest level, 0 when there is none), so its cost is at least
//     overlap_weight x (prompt_blocks - K) + load. Walking the workers in the order
//     (load, running, last_chosen, slot) -- the cost's own tie-break order -- this bound
//     only grows, and the walk stops as soon as it exceeds the best cost found.
//   - The listed workers (few: those holding the leading blocks that few workers hold)
//     are evaluated exactly before the walk, so the walk usually stops after one or two
//     workers.
//   - Busy decode workers come after every non-busy one in the order, so they are only
//     walked when no non-busy worker is left (then the same walk among the busy ones).

// The alive workers by role, ordered by (busy, load, running, last_chosen, slot) where
// load is active_blocks for decode and queued_prefill_tokens for prefill workers. The
// router updates it on every load report, registration, death and routing decision.
// Whether a decode worker is busy depends on decode_busy_threshold and
// decode_max_waiting, which are therefore fixed at construction. Not thread-safe.
class FleetOrder {
 public:
  explicit FleetOrder(const SchedulerOptions& busy_rule = SchedulerOptions());

  // True when `o` has this order's busy rule (otherwise ChooseRouteFast refuses it).
  bool SameBusyRule(const SchedulerOptions& o) const;

  // Adds the worker w.slot, or updates it (also from one role to the other).
  // INVALID_ARGUMENT for a negative slot.
  absl::Status Set(const WorkerLoadView& w, bool decode);
  // Removes the worker (nothing if absent).
  void Erase(int slot);
  bool Contains(int slot) const;
  size_t decode_size() const { return decode_.size(); }
  // Sum of the decode workers' loads (active_blocks), for the balance guard's mean.
  int64_t decode_load_sum() const { return decode_load_sum_; }
  size_t prefill_size() const { return prefill_.size(); }

 private:
  friend absl::StatusOr<RouteDecision> ChooseRouteFast(const SchedulerOptions&, int64_t, int,
                                                       const OverlapResult&, const FleetOrder&,
                                                       absl::Span<const int>, TierSplitFn);
  struct Key {
    bool busy = false;
    int64_t load = 0;
    int64_t running = 0;
    uint64_t last_chosen = 0;
    int32_t slot = 0;
    bool operator<(const Key& o) const;
  };
  struct Worker {
    bool present = false;
    bool decode = false;
    Key key;
  };
  const Worker* Get(int slot) const {
    return slot >= 0 && static_cast<size_t>(slot) < by_slot_.size() && by_slot_[slot].present
               ? &by_slot_[slot]
               : nullptr;
  }

  double busy_threshold_;
  int64_t max_waiting_;
  absl::btree_set<Key> decode_, prefill_;
  int64_t decode_load_sum_ = 0;
  std::vector<Worker> by_slot_;
};

// ChooseRoute's decision for the workers in `fleet` with the overlaps in `overlaps`
// (PrefixIndex::Overlaps of the prompt's block hashes). Errors as ChooseRoute's, plus
// FAILED_PRECONDITION when options' busy rule is not the fleet order's.
// With `split`, lower-tier hits are priced as in ChooseRoute: tier costs only add to a
// worker's cost, so the bound of the walk (overlap <= the deepest level) still holds.
absl::StatusOr<RouteDecision> ChooseRouteFast(const SchedulerOptions& options,
                                              int64_t prompt_tokens, int block_size,
                                              const OverlapResult& overlaps,
                                              const FleetOrder& fleet,
                                              absl::Span<const int> excluded_decode_slots);
absl::StatusOr<RouteDecision> ChooseRouteFast(const SchedulerOptions& options,
                                              int64_t prompt_tokens, int block_size,
                                              const OverlapResult& overlaps,
                                              const FleetOrder& fleet,
                                              absl::Span<const int> excluded_decode_slots,
                                              TierSplitFn split);

}  // namespace kvrelay::router
