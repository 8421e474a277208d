#include "common/rpc/server.h"

#include <chrono>

#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/registry.grpc.pb.h"

namespace kvrelay::rpc {
namespace {

TEST(StartServerTest, ServesHealthOnAFreePort) {
  v1::Registry::CallbackService service;
  ServerSpec spec;
  spec.listen = "127.0.0.1:0";
  spec.services = {&service};
  int port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartServer(spec, &port);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT(port, 0);
  // The standard health service answers (DESIGN §8).
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::ByteBuffer response;
  grpc::GenericStub generic(channel);
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);
  grpc::CompletionQueue cq;
  auto call = generic.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
  (*server)->Shutdown(std::chrono::system_clock::now());
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST(StartServerTest, AnAddressItCannotHaveIsUnavailable) {
  v1::Registry::CallbackService service;
  ServerSpec spec;
  spec.listen = "256.0.0.1:0";
  spec.services = {&service};
  int port = 0;
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartServer(spec, &port);
  ASSERT_FALSE(server.ok());
  EXPECT_TRUE(absl::IsUnavailable(server.status()));
  EXPECT_THAT(server.status().message(), ::testing::HasSubstr("cannot listen on 256.0.0.1:0"));
}

}  // namespace
}  // namespace kvrelay::rpc
