// Waiting on a condition in tests: poll `pred` every few milliseconds, bounded in time,
// for states that have no event to wait on (another process's registry, a router's view).
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvrelay::testing {

// True once `pred()` holds; false if it still does not after `timeout`.
template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout = absl::Seconds(60)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!pred()) {
    if (absl::Now() > deadline) return pred();
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

}  // namespace kvrelay::testing
