// HTTP/2 keepalive between kvrelay's own processes. Without it a peer that vanishes
// without closing its connections (node loss, network partition, a stopped process) is
// only noticed when TCP gives up, minutes later: a router would wait that long on a
// decode worker's stream instead of migrating the request, and a worker would keep
// writing to a router that is gone instead of redialling its replacement.
#pragma once

#include <memory>
#include <string>

#include "common/rpc/security.h"
#include "grpcpp/channel.h"
#include "grpcpp/server_builder.h"

namespace kvrelay::rpc {

// Pings every 10 s, even with no call open; a ping unanswered for 5 s fails the
// connection (and every call on it, with UNAVAILABLE). `security`: TLS and the
// cluster token of this process (rpc/security.h).
std::shared_ptr<grpc::Channel> CreateInternalChannel(const std::string& address,
                                                     const Security& security);

// Lets clients ping that often (by default servers answer frequent pings on an idle
// connection with GOAWAY "too_many_pings").
void AllowInternalKeepalive(grpc::ServerBuilder& builder);

}  // namespace kvrelay::rpc
