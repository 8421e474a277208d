// The flags both worker kinds share (model, pool, device, listen address, registry),
// written once; each worker's main.cc adds its engine's.
#pragma once

#include "absl/status/status.h"
#include "common/process/process_flags.h"
#include "common/worker/worker_options.h"

namespace kvrelay::process {

// Fills `o` from the shared worker flags and `p` (security, metrics registry).
// INVALID_ARGUMENT naming the flag for a bad value.
absl::Status ApplyWorkerFlags(const Process& p, worker::WorkerOptions& o);

}  // namespace kvrelay::process
