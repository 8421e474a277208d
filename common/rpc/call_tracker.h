// Counts a service's calls in progress, so a server can wait until every call has
// sent its status before it closes connections (graceful shutdown).
#pragma once

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvrelay::rpc {

class CallTracker {
 public:
  void Started() {
    absl::MutexLock l(&mu_);
    ++active_;
  }
  void Done() {
    absl::MutexLock l(&mu_);
    --active_;
  }
  int64_t active() const {
    absl::MutexLock l(&mu_);
    return active_;
  }
  // True once no call is in progress; false if some still are after `timeout`.
  bool WaitIdle(absl::Duration timeout) {
    absl::MutexLock l(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return active_ == 0; };
    return mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
  }

 private:
  mutable absl::Mutex mu_;
  int64_t active_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrelay::rpc
