#include "decode_worker/decode_worker.h"

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/test_models.h"

namespace kvrelay::decode {
namespace {

using ::testing::HasSubstr;

DecodeWorkerOptions Options() {
  DecodeWorkerOptions o;
  o.model_dir = testing::ModelDir(testing::TinyVariants()[0]);
  o.kv.kv_blocks = 64;
  o.threads = 1;
  return o;
}

TEST(DecodeWorkerTest, BadOptionsNameTheOption) {
  DecodeWorkerOptions o = Options();
  o.model_dir.clear();
  EXPECT_THAT(DecodeWorker::Start(o).status().message(), HasSubstr("--model"));
  o = Options();
  o.kv.kv_dtype = "f8";
  EXPECT_THAT(DecodeWorker::Start(o).status().message(), HasSubstr("--kv-dtype"));
  o = Options();
  o.kv.block_size = 0;
  EXPECT_THAT(DecodeWorker::Start(o).status().message(), HasSubstr("--block-size"));
  o = Options();
  o.kv.kv_blocks = 0;
  o.kv.kv_bytes = 10;
  EXPECT_THAT(DecodeWorker::Start(o).status().message(), HasSubstr("--kv-bytes"));
  o = Options();
  o.model_dir = "/nonexistent/model";
  EXPECT_FALSE(DecodeWorker::Start(o).ok());
}

TEST(DecodeWorkerTest, ServesOverGrpcAndShutsDown) {
  auto w = DecodeWorker::Start(Options());
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_GT((*w)->port(), 0);
  auto stub = v1::DecodeWorker::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*w)->port()), grpc::InsecureChannelCredentials()));
  v1::DecodeRequest r;
  r.set_request_id("r");
  for (int32_t t : {3, 1, 4, 1, 5}) r.add_prompt_token_ids(t);
  r.mutable_sampling()->set_max_tokens(4);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_sampling()->set_logprobs(2);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, r);
  v1::DecodeResponse m;
  int tokens = 0;
  std::string finish;
  while (reader->Read(&m)) {
    tokens += m.token_ids_size();
    ASSERT_EQ(m.logprobs_size(), m.token_ids_size());
    for (const auto& lp : m.logprobs()) EXPECT_EQ(lp.top_size(), 2);
    if (!m.finish_reason().empty()) finish = m.finish_reason();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 4);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ((*w)->cache().counts().in_use, 0);
  (*w)->Shutdown(absl::Seconds(5));
  (*w)->Shutdown(absl::Seconds(5));  // idempotent
}

}  // namespace
}  // namespace kvrelay::decode
