// The real kvrelay-decode binary serving gRPC on 127.0.0.1, driven by a test client,
// checked against the real `kvrelay generate` (single process) on the same model.
#include <signal.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/processes.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using ::testing::HasSubstr;
using testing::SiblingBinary;
using testing::Subprocess;

using testing::kProcessTimeout;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

std::vector<int32_t> CliGenerate(const std::vector<int32_t>& prompt, int max_tokens) {
  return testing::CliGenerate(ModelDir(), prompt, max_tokens);
}

std::vector<int32_t> Prompt(int n, uint32_t seed) { return testing::RandomPrompt(n, seed); }

class DecodeWorkerProcessTest : public ::testing::Test {
 protected:
  void Start(const std::vector<std::string>& flags) {
    std::vector<std::string> args = {"--model", ModelDir(), "--threads", "1"};
    args.insert(args.end(), flags.begin(), flags.end());
    testing::WorkerProcess w = testing::StartWorker("kvrelay-decode", args);
    ASSERT_TRUE(w.process);
    worker_.emplace(std::move(*w.process));
    port_ = w.port;
    channel_ = grpc::CreateChannel(w.address(), grpc::InsecureChannelCredentials());
    stub_ = v1::DecodeWorker::NewStub(channel_);
  }

  struct Reply {
    grpc::Status status;
    std::vector<int32_t> tokens;
    std::vector<v1::DecodeResponse> messages;
  };

  v1::DecodeRequest Request(const std::string& id, const std::vector<int32_t>& prompt,
                            int max_tokens) {
    v1::DecodeRequest r;
    r.set_request_id(id);
    for (int32_t t : prompt) r.add_prompt_token_ids(t);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }

  Reply Generate(const v1::DecodeRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    Reply out;
    auto reader = stub_->Generate(&ctx, req);
    v1::DecodeResponse m;
    while (reader->Read(&m)) {
      out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
      out.messages.push_back(m);
    }
    out.status = reader->Finish();
    return out;
  }

  std::optional<Subprocess> worker_;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DecodeWorker::Stub> stub_;
};

TEST_F(DecodeWorkerProcessTest, GreedyOutputsMatchKvrelayGenerate) {
  Start({"--kv_blocks", "256", "--prefill_chunk", "24"});
  // Short, exactly block-aligned (32 = 2 blocks of 16), long (several prefill chunks).
  for (int n : {5, 32, 100}) {
    const std::vector<int32_t> prompt = Prompt(n, static_cast<uint32_t>(n));
    const Reply r = Generate(Request("req-" + std::to_string(n), prompt, 10));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, CliGenerate(prompt, 10)) << "prompt of " << n << " tokens";
    // One message per token, then the final one with the finish reason and usage.
    ASSERT_EQ(r.messages.size(), 11u);
    const v1::DecodeResponse& last = r.messages.back();
    EXPECT_EQ(last.finish_reason(), "length");
    EXPECT_EQ(last.usage().prompt_tokens(), n);
    EXPECT_EQ(last.usage().completion_tokens(), 10);
    EXPECT_EQ(last.usage().prefill_mode(), v1::PREFILL_MODE_LOCAL);
  }
  // The same prompt again hits the decode worker's prefix cache and stays identical.
  const std::vector<int32_t> prompt = Prompt(100, 100);
  const Reply again = Generate(Request("again", prompt, 10));
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.messages.back().usage().cached_tokens(), 96);
  EXPECT_EQ(again.tokens, CliGenerate(prompt, 10));
}

TEST_F(DecodeWorkerProcessTest, ConcurrentRequestsAreBatchedAndExact) {
  Start({"--kv_blocks", "256", "--prefill_chunk", "32"});
  const int kN = 8;
  std::vector<Reply> replies(kN);
  std::vector<std::thread> clients;
  for (int i = 0; i < kN; ++i) {
    clients.emplace_back([this, i, &replies] {
      replies[i] = Generate(Request("c" + std::to_string(i), Prompt(10 + 11 * i, 50 + i), 12));
    });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(replies[i].status.ok()) << i << ": " << replies[i].status.error_message();
    EXPECT_EQ(replies[i].tokens, CliGenerate(Prompt(10 + 11 * i, 50 + i), 12)) << "request " << i;
  }
}

TEST_F(DecodeWorkerProcessTest, SmallPoolPreemptsAndStaysExact) {
  // 24 blocks of 4 tokens; each request (30 prompt + 60 generated tokens) needs 23, so
  // any two running together preempt one another. All calls start before any is read.
  // Preemption needs two requests in the engine at once: on a loaded machine the server may
  // finish one request (a few ms) before the next stream reaches it, so a round without any
  // is tried again (up to 5 rounds, new prompts each); every round must be exact.
  Start({"--kv_blocks", "24", "--block_size", "4", "--prefill_chunk", "8"});
  const int kN = 6;
  int64_t preemptions = 0;
  for (int round = 0; round < 5 && preemptions == 0; ++round) {
    std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
    std::vector<std::unique_ptr<grpc::ClientReader<v1::DecodeResponse>>> readers;
    const int seed = 900 + 10 * round;
    for (int i = 0; i < kN; ++i) {
      ctxs.push_back(std::make_unique<grpc::ClientContext>());
      ctxs.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      readers.push_back(stub_->Generate(
          ctxs.back().get(), Request("p" + std::to_string(round) + "-" + std::to_string(i),
                                     Prompt(30, seed + i), 60)));
    }
    for (int i = 0; i < kN; ++i) {
      std::vector<int32_t> tokens;
      v1::DecodeResponse m, last;
      while (readers[i]->Read(&m)) {
        tokens.insert(tokens.end(), m.token_ids().begin(), m.token_ids().end());
        last = m;
      }
      const grpc::Status st = readers[i]->Finish();
      ASSERT_TRUE(st.ok()) << i << ": " << st.error_message();
      EXPECT_EQ(tokens, CliGenerate(Prompt(30, seed + i), 60))
          << "round " << round << " request " << i;
      preemptions += last.usage().preemptions();
    }
  }
  EXPECT_GT(preemptions, 0);
}

TEST_F(DecodeWorkerProcessTest, BadRequestsAreInvalidArgumentNamingTheField) {
  Start({"--kv_blocks", "64"});
  v1::DecodeRequest r = Request("", {1, 2, 3}, 4);
  Reply out = Generate(r);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("request_id is required"));
  r = Request("x", {}, 4);
  out = Generate(r);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("prompt_token_ids is empty"));
  r = Request("x", {1, 2, 1 << 30}, 4);
  out = Generate(r);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("prompt token 2"));
  r = Request("x", {1, 2}, 4);
  r.mutable_sampling()->set_top_p(1.5f);
  out = Generate(r);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(out.status.error_message(), HasSubstr("sampling.top_p"));
  // The worker still serves afterwards.
  EXPECT_TRUE(Generate(Request("ok", {1, 2, 3}, 3)).status.ok());
}

TEST_F(DecodeWorkerProcessTest, ClientCancelAndHealthAndGracefulShutdown) {
  Start({"--kv_blocks", "64"});
  // Health: the standard service answers SERVING.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::ByteBuffer req_bb, resp_bb;
    // grpc.health.v1.HealthCheckRequest{service: ""} serialises to zero bytes.
    grpc::GenericStub generic(channel_);
    grpc::Status st;
    absl::Notification done;
    grpc::Slice empty;
    req_bb = grpc::ByteBuffer(&empty, 1);
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req_bb, &resp_bb,
                      [&](grpc::Status s) {
                        st = s;
                        done.Notify();
                      });
    done.WaitForNotification();
    ASSERT_TRUE(st.ok()) << st.error_message();
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp_bb.Dump(&slices).ok());
    std::string bytes;
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING
  }
  // Cancel after the first token of a long generation: the stream ends CANCELLED.
  {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, Request("long", Prompt(20, 1), 100000));
    v1::DecodeResponse m;
    ASSERT_TRUE(reader->Read(&m));
    ctx.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // Graceful shutdown: a running request completes after SIGTERM, then the process exits 0.
  std::vector<int32_t> prompt = Prompt(12, 2);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub_->Generate(&ctx, Request("drain", prompt, 400));
  v1::DecodeResponse m;
  ASSERT_TRUE(reader->Read(&m));  // running
  std::vector<int32_t> tokens(m.token_ids().begin(), m.token_ids().end());
  worker_->Kill(SIGTERM);
  while (reader->Read(&m)) tokens.insert(tokens.end(), m.token_ids().begin(), m.token_ids().end());
  const grpc::Status drained = reader->Finish();
  EXPECT_TRUE(drained.ok()) << drained.error_code() << " " << drained.error_message();
  EXPECT_EQ(tokens.size(), 400u);
  auto status = worker_->Wait(kProcessTimeout);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

}  // namespace
}  // namespace kvrelay
