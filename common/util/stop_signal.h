// SIGTERM / SIGINT handling for the service binaries: the handler only writes the signal
// number to a pipe (any thread may take a signal, since gRPC starts threads before main
// could mask it) and the main thread waits on the pipe, then shuts down in order.
#pragma once

#include "absl/status/status.h"

namespace kvrelay {

// Installs the handlers. INTERNAL if the pipe cannot be made.
absl::Status InstallStopSignals();

// Blocks until SIGTERM or SIGINT arrives; returns its number.
int WaitForStopSignal();

}  // namespace kvrelay
