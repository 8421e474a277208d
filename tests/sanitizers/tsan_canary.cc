// tools/tsan.sh's check of its own set-up (built with -DKVRELAY_TSAN=ON only):
//   tsan_canary         locks, waits and notifies through absl::Mutex, CondVar-style
//                       Await and Notification the way kvrelay does: must be clean, which
//                       it is only when the instrumented Abseil is the one loaded;
//   tsan_canary --race  the same, plus one unguarded write: ThreadSanitizer must report
//                       it, so the suppressions (tsan.supp) hide nothing of ours.
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace {

absl::Mutex mu;
int guarded ABSL_GUARDED_BY(mu) = 0;
int racy = 0;

}  // namespace

int main(int argc, char** argv) {
  const bool race = argc > 1 && std::strcmp(argv[1], "--race") == 0;
  absl::Notification started;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      if (t == 0) started.Notify();
      for (int i = 0; i < 2000; ++i) {
        absl::MutexLock l(&mu);
        ++guarded;
      }
      if (race) ++racy;  // the bug the canary plants
    });
  }
  started.WaitForNotification();
  {
    absl::MutexLock l(&mu);
    mu.Await(absl::Condition(
        +[](int* g) { return *g == 8000; }, &guarded));
  }
  for (auto& t : threads) t.join();
  absl::MutexLock l(&mu);
  std::printf("tsan_canary: %d %d\n", guarded, racy);
  return guarded == 8000 ? 0 : 1;
}
