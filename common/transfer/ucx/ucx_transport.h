// KvTransport over UCX (UCP): RMA puts into a peer's registered pool (DESIGN §4).
//
// One UCP context and worker per transport, driven by one progress thread that makes
// every UCX call (the worker is single-threaded; other threads hand it work through a
// queue and an eventfd). The thread sleeps on the worker's event fd when idle, so a
// receiver costs no CPU yet still progresses the emulated RMA that TCP needs.
// Pools are registered once with ucp_mem_map (AllocatePool lets UCX allocate them:
// shared-memory puts then run at memcpy speed); endpoints and unpacked rkeys are
// cached per peer; endpoints use UCP_ERR_HANDLING_MODE_PEER so a dead peer fails
// operations instead of hanging them. Puts are split into chunks with a bounded
// number in flight, followed by ucp_ep_flush_nbx for remote completion.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/transfer/kv_transport.h"

namespace kvrelay::transfer {

struct UcxTransportOptions {
  // How often UCX checks that peers are alive (UCX_KEEPALIVE_INTERVAL, unless the
  // environment sets it): a peer that dies without closing its sockets (shared
  // memory) is detected within about this time.
  absl::Duration keepalive_interval = absl::Seconds(1);
};

// UNAVAILABLE when UCX cannot start (no usable transport).
absl::StatusOr<std::unique_ptr<KvTransport>> NewUcxTransport(
    const UcxTransportOptions& options = {});

// The transport named for the lane that carries RMA (else active messages) in the
// text of ucp_ep_print_info: "posix", "sysv", "cma", "tcp", "rc_mlx5", ... Exposed
// for tests.
std::string TransportFromEpInfo(const std::string& info);

// Whether the text of ucp_context_print_info lists a shared-memory transport (posix,
// sysv, cma, xpmem, knem) among its resources. Exposed for tests.
bool HasSharedMemoryTransport(const std::string& context_info);

}  // namespace kvrelay::transfer
