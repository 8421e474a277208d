// TLS for the CLI's clients of a router (`generate --server`, `bench serve`): --tls-ca
// (the CA the router's certificate is verified against; set: the channel speaks TLS),
// --tls-server-name (the name checked instead of the host dialled), and --tls-cert /
// --tls-key (presented to a port with mutual TLS, e.g. by `kvrelay health`).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "tools/cli/args.h"

namespace kvrelay::cli {

void DeclareClientTlsFlags(Args& args);

// A channel to `server` as the flags say; NOT_FOUND / INVALID_ARGUMENT naming the flag
// for a CA file that cannot be read or is not PEM.
absl::StatusOr<std::shared_ptr<grpc::Channel>> ClientChannel(const Args& args,
                                                             const std::string& server);

}  // namespace kvrelay::cli
