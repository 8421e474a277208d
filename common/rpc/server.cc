#include "common/rpc/server.h"

#include "absl/strings/str_cat.h"
#include "common/rpc/keepalive.h"
#include "grpcpp/health_check_service_interface.h"

namespace kvrelay::rpc {

absl::StatusOr<std::unique_ptr<grpc::Server>> StartServer(const ServerSpec& spec, int* port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  AllowInternalKeepalive(builder);
  *port = 0;
  builder.AddListeningPort(spec.listen, spec.security.ServerCredentials(spec.public_port), port);
  if (spec.max_receive_bytes >= 0) builder.SetMaxReceiveMessageSize(spec.max_receive_bytes);
  for (grpc::Service* s : spec.services) builder.RegisterService(s);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", spec.listen));
  }
  return server;
}

}  // namespace kvrelay::rpc
