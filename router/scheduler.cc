#include "router/scheduler.h"

#include <algorithm>
#include <cmath>
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

bool DecodeBusy(const SchedulerOptions& o, const WorkerLoadView& w) {
  // A worker that reported no pool cannot take a request; treat it as full.
  if (w.num_blocks <= 0) return true;
  const double used = static_cast<double>(w.active_blocks) / static_cast<double>(w.num_blocks);
  return used > o.decode_busy_threshold || w.waiting > o.decode_max_waiting;
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
  return s;  // Update keeps the first error
}

absl::StatusOr<RouteDecision> ChooseRoute(const SchedulerOptions& options, int64_t prompt_tokens,
                                          int block_size, absl::Span<const int32_t> overlaps,
                                          absl::Span<const WorkerLoadView> decode_workers,
                                          absl::Span<const WorkerLoadView> prefill_workers,
                                          absl::Span<const int> excluded_decode_slots) {
  if (absl::Status s = Validate(options); !s.ok()) return s;
  if (prompt_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_tokens must be > 0, got ", prompt_tokens));
  }
  if (block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("block_size must be > 0, got ", block_size));
  }
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
  for (int32_t v : overlaps) d.max_overlap_blocks = std::max(d.max_overlap_blocks, clamp(v));

  // ---- Decode worker.
  Best idle, busy;
  for (const WorkerLoadView& w : decode_workers) {
    if (std::find(excluded_decode_slots.begin(), excluded_decode_slots.end(), w.slot) !=
        excluded_decode_slots.end()) {
      continue;
    }
    Candidate c;
    c.worker = &w;
    c.overlap = overlap_of(w.slot);
    c.cost = options.overlap_weight * static_cast<double>(prompt_blocks - c.overlap) +
             static_cast<double>(w.active_blocks);
    (DecodeBusy(options, w) ? busy : idle).Offer(c);
  }
  if (!idle.found && !busy.found) {
    return absl::UnavailableError(
        decode_workers.empty()
            ? "no decode worker is up"
            : absl::StrCat("all ", decode_workers.size(), " decode workers are excluded"));
  }
  const Candidate& dc = idle.found ? idle.c : busy.c;
  d.decode_slot = dc.worker->slot;
  d.decode_overlap_blocks = dc.overlap;
  d.uncached_tokens =
      std::max<int64_t>(1, prompt_tokens - static_cast<int64_t>(dc.overlap) * block_size);

  // ---- Local or remote prefill.
  const bool few_uncached =
      d.uncached_tokens < options.local_prefill_max_tokens ||
      static_cast<double>(d.uncached_tokens) / static_cast<double>(prompt_tokens) <
          options.local_prefill_max_ratio;
  if (few_uncached) return d;

  Best p;
  for (const WorkerLoadView& w : prefill_workers) {
    if (w.queued_prefill_tokens > options.prefill_max_queued_tokens) continue;
    Candidate c;
    c.worker = &w;
    c.overlap = overlap_of(w.slot);
    c.cost = options.overlap_weight * static_cast<double>(prompt_blocks - c.overlap) +
             static_cast<double>(w.queued_prefill_tokens) / static_cast<double>(block_size);
    p.Offer(c);
  }
  if (p.found) {  // otherwise no P is usable: D prefills locally
    d.prefill_slot = p.c.worker->slot;
    d.prefill_overlap_blocks = p.c.overlap;
  }
  return d;
}

}  // namespace kvrelay::router
