#include "router/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace kvrelay::router {
namespace {

absl::Status CheckNonNegative(const char* name, double v) {
  if (!std::isfinite(v) || v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SchedulerOptions.", name, " must be finite and >= 0, got ", v));
  }
  return absl::OkStatus();
}

absl::Status CheckNonNegative(const char* name, int64_t v) {
  if (v < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SchedulerOptions.", name, " must be >= 0, got ", v));
  }
  return absl::OkStatus();
}

// A worker under consideration; `better` orders by cost, then the documented tie-breaks.
struct Candidate {
  const WorkerLoadView* worker = nullptr;
  int32_t overlap = 0;
  double cost = 0;
};

bool Better(const Candidate& a, const Candidate& b) {
  return std::make_tuple(a.cost, a.worker->running, a.worker->last_chosen, a.worker->slot) <
         std::make_tuple(b.cost, b.worker->running, b.worker->last_chosen, b.worker->slot);
}

// Keeps the best of the offered candidates.
struct Best {
  Candidate c;
  bool found = false;
  void Offer(const Candidate& x) {
    if (!found || Better(x, c)) {
      c = x;
      found = true;
    }
  }
};

// The balance guard's limit on active_blocks (+inf when off): ratio x sum / n.
double LoadLimit(const SchedulerOptions& o, int64_t load_sum, size_t n) {
  if (o.decode_max_load_ratio <= 0 || n == 0) return std::numeric_limits<double>::infinity();
  return o.decode_max_load_ratio * static_cast<double>(load_sum) / static_cast<double>(n);
}

bool DecodeBusy(const SchedulerOptions& o, const WorkerLoadView& w) {
  // A worker that reported no pool cannot take a request; treat it as full.
  if (w.num_blocks <= 0) return true;
  const double used = static_cast<double>(w.active_blocks) / static_cast<double>(w.num_blocks);
  return used > o.decode_busy_threshold || w.waiting > o.decode_max_waiting;
}

absl::Status CheckPrompt(int64_t prompt_tokens, int block_size) {
  if (prompt_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_tokens must be > 0, got ", prompt_tokens));
  }
  if (block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("block_size must be > 0, got ", block_size));
  }
  return absl::OkStatus();
}

// Records D's part of the decision; true when D prefills locally because few of the
// prompt's tokens are uncached there (the rule in scheduler.h).
bool SetDecodeAndPrefillLocally(const SchedulerOptions& o, int slot, int32_t overlap,
                                int64_t prompt_tokens, int block_size, RouteDecision* d) {
  d->decode_slot = slot;
  d->decode_overlap_blocks = overlap;
  d->uncached_tokens =
      std::max<int64_t>(1, prompt_tokens - static_cast<int64_t>(overlap) * block_size);
  return d->uncached_tokens < o.local_prefill_max_tokens ||
         static_cast<double>(d->uncached_tokens) / static_cast<double>(prompt_tokens) <
             o.local_prefill_max_ratio;
}

bool IsExcluded(absl::Span<const int> excluded, int slot) {
  return std::find(excluded.begin(), excluded.end(), slot) != excluded.end();
}

PrefixIndex::TierSplit AllInPool(int, int32_t overlap) {
  PrefixIndex::TierSplit s;
  s.pool = overlap;
  return s;
}

// The recompute-equivalent blocks a worker still costs: the blocks it does not hold, plus
// the priced lower-tier ones. Pool-only overlaps give exactly (prompt_blocks - overlap).
double MissingBlocks(const SchedulerOptions& o, int64_t prompt_blocks, int32_t overlap,
                     const PrefixIndex::TierSplit& split) {
  double missing = static_cast<double>(prompt_blocks - overlap);
  if (split.host > 0) missing += o.host_hit_cost * split.host;
  if (split.disk > 0) missing += o.disk_hit_cost * split.disk;
  return missing;
}

}  // namespace

absl::Status Validate(const SchedulerOptions& o) {
  absl::Status s;
  s.Update(CheckNonNegative("overlap_weight", o.overlap_weight));
  s.Update(CheckNonNegative("decode_busy_threshold", o.decode_busy_threshold));
  s.Update(CheckNonNegative("decode_max_waiting", o.decode_max_waiting));
  s.Update(CheckNonNegative("prefill_max_queued_tokens", o.prefill_max_queued_tokens));
  s.Update(CheckNonNegative("local_prefill_max_tokens", o.local_prefill_max_tokens));
  s.Update(CheckNonNegative("local_prefill_max_ratio", o.local_prefill_max_ratio));
  s.Update(CheckNonNegative("decode_max_load_ratio", o.decode_max_load_ratio));
  s.Update(CheckNonNegative("host_hit_cost", o.host_hit_cost));
  s.Update(CheckNonNegative("disk_hit_cost", o.disk_hit_cost));
  if (s.ok() && (o.host_hit_cost > 1 || o.disk_hit_cost > 1)) {
    s = absl::InvalidArgumentError(
        absl::StrCat("SchedulerOptions.host_hit_cost and disk_hit_cost must be in [0, 1], got ",
                     o.host_hit_cost, " and ", o.disk_hit_cost));
  }
  if (s.ok() && o.decode_max_load_ratio > 0 && o.decode_max_load_ratio < 1) {
    s = absl::InvalidArgumentError(
        absl::StrCat("SchedulerOptions.decode_max_load_ratio must be 0 (off) or >= 1, got ",
                     o.decode_max_load_ratio));
  }
  return s;  // Update keeps the first error
}

absl::StatusOr<RouteDecision> ChooseRoute(const SchedulerOptions& options, int64_t prompt_tokens,
                                          int block_size, absl::Span<const int32_t> overlaps,
                                          absl::Span<const WorkerLoadView> decode_workers,
                                          absl::Span<const WorkerLoadView> prefill_workers,
                                          absl::Span<const int> excluded_decode_slots) {
  return ChooseRoute(options, prompt_tokens, block_size, overlaps, decode_workers, prefill_workers,
                     excluded_decode_slots, AllInPool);
}

absl::StatusOr<RouteDecision> ChooseRoute(const SchedulerOptions& options, int64_t prompt_tokens,
                                          int block_size, absl::Span<const int32_t> overlaps,
                                          absl::Span<const WorkerLoadView> decode_workers,
                                          absl::Span<const WorkerLoadView> prefill_workers,
                                          absl::Span<const int> excluded_decode_slots,
                                          TierSplitFn split) {
  if (absl::Status s = Validate(options); !s.ok()) return s;
  if (absl::Status s = CheckPrompt(prompt_tokens, block_size); !s.ok()) return s;
  for (const auto* list : {&decode_workers, &prefill_workers}) {
    for (const WorkerLoadView& w : *list) {
      if (w.slot < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("worker '", w.id, "' has negative slot ", w.slot));
      }
    }
  }

  const int64_t prompt_blocks = prompt_tokens / block_size;
  // The index may know blocks beyond this prompt's full blocks only through a caller
  // bug (hashes of a longer prompt); clamping keeps the costs meaningful regardless.
  auto clamp = [&](int32_t v) {
    return static_cast<int32_t>(std::clamp<int64_t>(v, 0, prompt_blocks));
  };
  auto overlap_of = [&](int slot) {
    return static_cast<size_t>(slot) < overlaps.size() ? clamp(overlaps[slot]) : 0;
  };

  RouteDecision d;
  for (size_t i = 0; i < overlaps.size(); ++i) {
    if (clamp(overlaps[i]) > d.max_overlap_blocks) {
      d.max_overlap_blocks = clamp(overlaps[i]);
      d.max_overlap_split = split(static_cast<int>(i), d.max_overlap_blocks);
    }
  }

  // ---- Decode worker.
  int64_t load_sum = 0;
  for (const WorkerLoadView& w : decode_workers) load_sum += w.active_blocks;
  const double load_limit = LoadLimit(options, load_sum, decode_workers.size());
  Best idle, busy;
  for (const WorkerLoadView& w : decode_workers) {
    if (IsExcluded(excluded_decode_slots, w.slot)) continue;
    Candidate c;
    c.worker = &w;
    c.overlap = overlap_of(w.slot);
    c.cost = options.overlap_weight *
                 MissingBlocks(options, prompt_blocks, c.overlap,
                               c.overlap > 0 ? split(w.slot, c.overlap) : AllInPool(0, 0)) +
             static_cast<double>(w.active_blocks);
    const bool over = static_cast<double>(w.active_blocks) > load_limit;
    (DecodeBusy(options, w) || over ? busy : idle).Offer(c);
  }
  if (!idle.found && !busy.found) {
    return absl::UnavailableError(
        decode_workers.empty()
            ? "no decode worker is up"
            : absl::StrCat("all ", decode_workers.size(), " decode workers are excluded"));
  }
  const Candidate& dc = idle.found ? idle.c : busy.c;
  // ---- Local or remote prefill.
  if (dc.overlap > 0) d.decode_split = split(dc.worker->slot, dc.overlap);
  if (SetDecodeAndPrefillLocally(options, dc.worker->slot, dc.overlap, prompt_tokens, block_size,
                                 &d)) {
    return d;
  }

  Best p;
  for (const WorkerLoadView& w : prefill_workers) {
    if (w.queued_prefill_tokens > options.prefill_max_queued_tokens) continue;
    Candidate c;
    c.worker = &w;
    c.overlap = overlap_of(w.slot);
    c.cost = options.overlap_weight *
                 MissingBlocks(options, prompt_blocks, c.overlap,
                               c.overlap > 0 ? split(w.slot, c.overlap) : AllInPool(0, 0)) +
             static_cast<double>(w.queued_prefill_tokens) / static_cast<double>(block_size);
    p.Offer(c);
  }
  if (p.found) {  // otherwise no P is usable: D prefills locally
    d.prefill_slot = p.c.worker->slot;
    d.prefill_overlap_blocks = p.c.overlap;
    if (p.c.overlap > 0) d.prefill_split = split(p.c.worker->slot, p.c.overlap);
  }
  return d;
}

// ---- FleetOrder / ChooseRouteFast --------------------------------------------------------

bool FleetOrder::Key::operator<(const Key& o) const {
  return std::tie(busy, load, running, last_chosen, slot) <
         std::tie(o.busy, o.load, o.running, o.last_chosen, o.slot);
}

FleetOrder::FleetOrder(const SchedulerOptions& busy_rule)
    : busy_threshold_(busy_rule.decode_busy_threshold),
      max_waiting_(busy_rule.decode_max_waiting) {}

bool FleetOrder::SameBusyRule(const SchedulerOptions& o) const {
  return o.decode_busy_threshold == busy_threshold_ && o.decode_max_waiting == max_waiting_;
}

absl::Status FleetOrder::Set(const WorkerLoadView& w, bool decode) {
  if (w.slot < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker '", w.id, "' has negative slot ", w.slot));
  }
  if (static_cast<size_t>(w.slot) >= by_slot_.size()) by_slot_.resize(w.slot + 1);
  Worker& e = by_slot_[w.slot];
  if (e.present) {
    (e.decode ? decode_ : prefill_).erase(e.key);
    if (e.decode) decode_load_sum_ -= e.key.load;
  }
  SchedulerOptions rule;
  rule.decode_busy_threshold = busy_threshold_;
  rule.decode_max_waiting = max_waiting_;
  e.present = true;
  e.decode = decode;
  e.key.busy = decode && DecodeBusy(rule, w);
  e.key.load = decode ? w.active_blocks : w.queued_prefill_tokens;
  e.key.running = w.running;
  e.key.last_chosen = w.last_chosen;
  e.key.slot = w.slot;
  (decode ? decode_ : prefill_).insert(e.key);
  if (decode) decode_load_sum_ += e.key.load;
  return absl::OkStatus();
}

void FleetOrder::Erase(int slot) {
  if (slot < 0 || static_cast<size_t>(slot) >= by_slot_.size()) return;
  Worker& e = by_slot_[slot];
  if (!e.present) return;
  (e.decode ? decode_ : prefill_).erase(e.key);
  if (e.decode) decode_load_sum_ -= e.key.load;
  e.present = false;
}

bool FleetOrder::Contains(int slot) const { return Get(slot) != nullptr; }

namespace {

// ChooseRoute's Candidate/Better over FleetOrder keys.
struct FastCandidate {
  int32_t slot = -1;
  int32_t overlap = 0;
  double cost = 0;
  int64_t running = 0;
  uint64_t last_chosen = 0;
};

// (running, last_chosen, slot) before the candidate's: with an equal cost, it would win.
template <typename K>
bool TieBefore(const K& k, const FastCandidate& c) {
  return std::make_tuple(k.running, k.last_chosen, k.slot) <
         std::make_tuple(c.running, c.last_chosen, c.slot);
}

struct FastBest {
  FastCandidate c;
  bool found = false;
  void Offer(const FastCandidate& x) {
    if (!found || std::make_tuple(x.cost, x.running, x.last_chosen, x.slot) <
                      std::make_tuple(c.cost, c.running, c.last_chosen, c.slot)) {
      c = x;
      found = true;
    }
  }
};

}  // namespace

absl::StatusOr<RouteDecision> ChooseRouteFast(const SchedulerOptions& options,
                                              int64_t prompt_tokens, int block_size,
                                              const OverlapResult& overlaps,
                                              const FleetOrder& fleet,
                                              absl::Span<const int> excluded_decode_slots) {
  return ChooseRouteFast(options, prompt_tokens, block_size, overlaps, fleet, excluded_decode_slots,
                         AllInPool);
}

absl::StatusOr<RouteDecision> ChooseRouteFast(const SchedulerOptions& options,
                                              int64_t prompt_tokens, int block_size,
                                              const OverlapResult& overlaps,
                                              const FleetOrder& fleet,
                                              absl::Span<const int> excluded_decode_slots,
                                              TierSplitFn split) {
  if (absl::Status s = Validate(options); !s.ok()) return s;
  if (absl::Status s = CheckPrompt(prompt_tokens, block_size); !s.ok()) return s;
  if (!fleet.SameBusyRule(options)) {
    return absl::FailedPreconditionError(
        "the fleet order was built for another decode_busy_threshold / decode_max_waiting");
  }
  using Key = FleetOrder::Key;
  const int64_t prompt_blocks = prompt_tokens / block_size;
  auto clamp = [&](int32_t v) {
    return static_cast<int32_t>(std::clamp<int64_t>(v, 0, prompt_blocks));
  };
  const double w = options.overlap_weight;
  const double bs = static_cast<double>(block_size);
  // The same expressions as ChooseRoute's, so that equal inputs give bit-equal costs.
  // slot < 0: the lower bound of an unlisted worker (overlap `bound`, all in its pool).
  auto missing = [&](int slot, int32_t overlap) {
    return MissingBlocks(options, prompt_blocks, overlap,
                         overlap > 0 && slot >= 0 ? split(slot, overlap) : AllInPool(0, 0));
  };
  auto decode_cost = [&](int slot, int32_t overlap, int64_t active) {
    return w * missing(slot, overlap) + static_cast<double>(active);
  };
  auto prefill_cost = [&](int slot, int32_t overlap, int64_t queued) {
    return w * missing(slot, overlap) + static_cast<double>(queued) / bs;
  };
  auto candidate = [](const Key& k, int32_t overlap, double cost) {
    return FastCandidate{k.slot, overlap, cost, k.running, k.last_chosen};
  };
  // Every worker that is not listed has overlap <= bound.
  const int32_t bound = clamp(overlaps.level_depth());

  // Walks [it, end) in key order, offering the workers that are neither listed (the
  // caller offered those) nor passed over, until no later worker can beat `best`.
  // lower(k) is the least cost a worker with key k can have (overlap `bound`); it never
  // decreases along the order. stop(k): k and every later worker are unusable.
  auto walk = [&](const absl::btree_set<Key>& set, absl::btree_set<Key>::const_iterator it,
                  absl::btree_set<Key>::const_iterator end, FastBest& best, auto lower, auto cost,
                  auto stop, auto pass) {
    while (it != end) {
      const Key& k = *it;
      if (stop(k)) break;
      if (best.found) {
        const double lb = lower(k);
        if (lb > best.c.cost) break;
        if (lb == best.c.cost && !TieBefore(k, best.c)) {
          // Nobody else with this load can win either: their tie-breaks come later.
          it = set.upper_bound(Key{k.busy, k.load, std::numeric_limits<int64_t>::max(),
                                   std::numeric_limits<uint64_t>::max(),
                                   std::numeric_limits<int32_t>::max()});
          continue;
        }
      }
      if (!pass(k) && !overlaps.IsListed(k.slot)) {
        const int32_t ov = clamp(overlaps.Of(k.slot));
        best.Offer(candidate(k, ov, cost(ov, k)));
      }
      ++it;
    }
  };
  auto never = [](const Key&) { return false; };

  RouteDecision d;
  d.max_overlap_blocks = clamp(overlaps.max());
  if (d.max_overlap_blocks > 0) {  // a worker holding the longest prefix: listed, or deepest level
    int argmax = -1;
    for (const OverlapResult::Listed& l : overlaps.listed()) {
      if (clamp(l.overlap) == d.max_overlap_blocks) {
        argmax = l.slot;
        break;
      }
    }
    for (int i = overlaps.num_levels() - 1; argmax < 0 && i >= 0; --i) {
      const absl::Span<const uint64_t> bits = overlaps.level_bits(i);
      for (size_t w = 0; w < bits.size() && argmax < 0; ++w) {
        if (bits[w] != 0) argmax = static_cast<int>(w * 64 + __builtin_ctzll(bits[w]));
      }
    }
    if (argmax >= 0) d.max_overlap_split = split(argmax, d.max_overlap_blocks);
  }

  // ---- Decode worker.
  // Over the balance guard's limit counts as busy. Along the order the non-busy workers
  // within the limit come first (loads ascend), then those over it, then the busy ones.
  const double load_limit = LoadLimit(options, fleet.decode_load_sum_, fleet.decode_.size());
  auto over = [&](const Key& k) { return static_cast<double>(k.load) > load_limit; };
  FastBest idle, busy;
  for (const OverlapResult::Listed& l : overlaps.listed()) {
    const FleetOrder::Worker* e = fleet.Get(l.slot);
    if (e == nullptr || !e->decode || IsExcluded(excluded_decode_slots, l.slot)) continue;
    const int32_t ov = clamp(l.overlap);
    (e->key.busy || over(e->key) ? busy : idle)
        .Offer(candidate(e->key, ov, decode_cost(l.slot, ov, e->key.load)));
  }
  {
    auto lower = [&](const Key& k) { return decode_cost(-1, bound, k.load); };
    auto cost = [&](int32_t ov, const Key& k) { return decode_cost(k.slot, ov, k.load); };
    auto excluded = [&](const Key& k) { return IsExcluded(excluded_decode_slots, k.slot); };
    const auto& set = fleet.decode_;
    const auto split = set.lower_bound(Key{true, std::numeric_limits<int64_t>::min(),
                                           std::numeric_limits<int64_t>::min(), 0,
                                           std::numeric_limits<int32_t>::min()});
    walk(set, set.begin(), split, idle, lower, cost, over, excluded);
    if (!idle.found) {
      // The fallback tier: the non-busy workers over the limit, then the busy ones (two
      // walks: the lower bound only grows within each).
      if (std::isfinite(load_limit)) {
        // Loads are integers: over the limit <=> load >= floor(limit) + 1.
        const auto first_over = set.lower_bound(
            Key{false, static_cast<int64_t>(std::floor(load_limit)) + 1,
                std::numeric_limits<int64_t>::min(), 0, std::numeric_limits<int32_t>::min()});
        walk(set, first_over, split, busy, lower, cost, never, excluded);
      }
      walk(set, split, set.end(), busy, lower, cost, never, excluded);
    }
  }
  if (!idle.found && !busy.found) {
    return absl::UnavailableError(
        fleet.decode_.empty()
            ? "no decode worker is up"
            : absl::StrCat("all ", fleet.decode_.size(), " decode workers are excluded"));
  }
  const FastCandidate& dc = idle.found ? idle.c : busy.c;
  // ---- Local or remote prefill (the same rule as ChooseRoute's).
  if (dc.overlap > 0) d.decode_split = split(dc.slot, dc.overlap);
  if (SetDecodeAndPrefillLocally(options, dc.slot, dc.overlap, prompt_tokens, block_size, &d)) {
    return d;
  }

  FastBest p;
  for (const OverlapResult::Listed& l : overlaps.listed()) {
    const FleetOrder::Worker* e = fleet.Get(l.slot);
    if (e == nullptr || e->decode || e->key.load > options.prefill_max_queued_tokens) continue;
    const int32_t ov = clamp(l.overlap);
    p.Offer(candidate(e->key, ov, prefill_cost(l.slot, ov, e->key.load)));
  }
  // Queued tokens ascend along the order: the first worker over the limit ends the walk.
  walk(
      fleet.prefill_, fleet.prefill_.begin(), fleet.prefill_.end(), p,
      [&](const Key& k) { return prefill_cost(-1, bound, k.load); },
      [&](int32_t ov, const Key& k) { return prefill_cost(k.slot, ov, k.load); },
      [&](const Key& k) { return k.load > options.prefill_max_queued_tokens; }, never);
  if (p.found) {  // otherwise no P is usable: D prefills locally
    d.prefill_slot = p.c.slot;
    d.prefill_overlap_blocks = p.c.overlap;
    if (p.c.overlap > 0) d.prefill_split = split(p.c.slot, p.c.overlap);
  }
  return d;
}

}  // namespace kvrelay::router
