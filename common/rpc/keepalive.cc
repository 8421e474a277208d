#include "common/rpc/keepalive.h"

#include <utility>

#include "grpc/grpc.h"
#include "grpcpp/support/channel_arguments.h"

namespace kvrelay::rpc {

namespace {
constexpr int kPingIntervalMs = 10000;
constexpr int kPingTimeoutMs = 5000;
}  // namespace

std::shared_ptr<grpc::Channel> CreateInternalChannel(const std::string& address,
                                                     const Security& security) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, kPingIntervalMs);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kPingTimeoutMs);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);  // keep pinging an idle connection
  return security.CreateChannel(address, std::move(args));
}

void AllowInternalKeepalive(grpc::ServerBuilder& builder) {
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             kPingIntervalMs / 2);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);  // never GOAWAY for pings
}

}  // namespace kvrelay::rpc
