#include "common/rpc/keepalive.h"

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/registry.grpc.pb.h"

namespace kvrelay::rpc {
namespace {

// A channel with keepalive pings reaches a server that allows them, and both ends
// accept each other's settings (a server that did not allow them would answer the
// pings of an idle connection with GOAWAY; that takes minutes to show, so this test
// checks the wiring: the call works and the channel stays READY).
TEST(KeepaliveTest, InternalChannelTalksToAnInternalServer) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  AllowInternalKeepalive(builder);
  v1::Registry::CallbackService service;  // a server needs one service; health answers
  builder.RegisterService(&service);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  std::shared_ptr<grpc::Channel> channel =
      CreateInternalChannel("127.0.0.1:" + std::to_string(port), Security());
  ASSERT_TRUE(
      channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30)));
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice empty;  // HealthCheckRequest{} is zero bytes
  grpc::ByteBuffer request(&empty, 1), response;
  grpc::Status status;
  bool done = false;
  std::mutex mu;
  std::condition_variable cv;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> l(mu);
                   status = s;
                   done = true;
                   cv.notify_all();
                 });
  std::unique_lock<std::mutex> l(mu);
  ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(30), [&] { return done; }));
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
  server->Shutdown(std::chrono::system_clock::now());
}

}  // namespace
}  // namespace kvrelay::rpc
