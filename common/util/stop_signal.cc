#include "common/util/stop_signal.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvrelay {
namespace {

int stop_pipe[2] = {-1, -1};

void OnStopSignal(int sig) {
  const char c = static_cast<char>(sig);
  (void)!::write(stop_pipe[1], &c, 1);
}

}  // namespace

absl::Status InstallStopSignals() {
  if (stop_pipe[0] < 0 && ::pipe(stop_pipe) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  return absl::OkStatus();
}

int WaitForStopSignal() {
  char sig = 0;
  while (::read(stop_pipe[0], &sig, 1) < 0 && errno == EINTR) {
  }
  return sig;
}

}  // namespace kvrelay
