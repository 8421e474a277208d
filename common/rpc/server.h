// Starting a gRPC server the way every kvrelay process does (DESIGN §8): the standard
// health service, the keepalive internal clients use, the port's credentials
// (rpc/security.h), then the services.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/rpc/security.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace kvrelay::rpc {

struct ServerSpec {
  std::string listen;  // host:port; port 0 picks a free one
  Security security;
  // The port also serves clients without a certificate (the router's public API).
  bool public_port = false;
  int max_receive_bytes = -1;  // -1: gRPC's default (4 MiB)
  std::vector<grpc::Service*> services;
};

// The started server and its port; UNAVAILABLE "cannot listen on ..." when the address
// cannot be had.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartServer(const ServerSpec& spec, int* port);

}  // namespace kvrelay::rpc
