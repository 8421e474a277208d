// KvTransport by memcpy between pools of one process: the stand-in for UCX in unit
// tests of the layers above. Same contract as the UCX transport (validation, chunking,
// timeouts, cancellation, notices, peer failure = the peer transport destroyed); the
// copy runs on the transport's own thread.
#pragma once

#include <memory>

#include "common/transfer/kv_transport.h"

namespace kvrelay::transfer {

// A new transport with its own address in this process.
std::unique_ptr<KvTransport> NewLocalTransport();

}  // namespace kvrelay::transfer
