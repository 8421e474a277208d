// The official `openai` npm client (Node, tests/openai_client; installed by
// tools/install-deps.sh) against kvrelay-router --http_listen with a decode worker: its
// completions and chat completions, streaming and not, equal the gRPC path's greedy text
// for the same prompt; its errors are typed; a stream it abandons leaves no sequence or
// block on the worker.
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/subprocess.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using nlohmann::json;
using testing::MetricSum;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

std::string GrpcText(v1::Generation::Stub* stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  std::string text;
  v1::GenerateResponse m;
  while (reader->Read(&m)) text += m.text();
  const grpc::Status st = reader->Finish();
  EXPECT_TRUE(st.ok()) << st.error_message();
  return text;
}

TEST(OpenAIClientProcessTest, TheOfficialNodeClientGetsTheGrpcPathsText) {
  const std::vector<std::string> metrics = {"--metrics_listen", "127.0.0.1:0"};
  std::vector<std::string> args = {
      "--model", ModelDir(), "--http_listen", "127.0.0.1:0", "--exit_linger_seconds", "0"};
  args.insert(args.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess router = testing::StartWorker("kvrelay-router", args);
  ASSERT_TRUE(router.process && router.http_port > 0);
  std::vector<std::string> w = {"--model",  ModelDir(),       "--threads",
                                "1",        "--kv_blocks",    "256",
                                "--router", router.address(), "--exit_linger_seconds",
                                "0"};
  w.insert(w.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess decode = testing::StartWorker("kvrelay-decode", w);
  ASSERT_TRUE(decode.process);
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials()));
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  for (;;) {
    grpc::ClientContext ctx;
    v1::ListModelsResponse r;
    if (stub->ListModels(&ctx, v1::ListModelsRequest(), &r).ok() &&
        r.models(0).decode_workers() == 1) {
      break;
    }
    ASSERT_LT(absl::Now(), deadline) << "no decode worker";
    absl::SleepFor(absl::Milliseconds(20));
  }

  const std::string prompt = "the quick brown fox";
  v1::GenerateRequest completion;
  completion.set_prompt(prompt);
  completion.mutable_sampling()->set_max_tokens(12);
  completion.mutable_sampling()->set_ignore_eos(true);
  v1::GenerateRequest chat;
  v1::ChatMessage* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content(prompt);
  *chat.mutable_sampling() = completion.sampling();
  const std::string want_completion = GrpcText(stub.get(), completion);
  const std::string want_chat = GrpcText(stub.get(), chat);

  const std::string script =
      std::string(KVRELAY_SOURCE_DIR) + "/tests/openai_client/client_test.mjs";
  std::optional<testing::Subprocess> node = testing::Subprocess::Start(
      {"/usr/bin/node", script, "http://127.0.0.1:" + std::to_string(router.http_port) + "/v1",
       prompt});
  ASSERT_TRUE(node) << "cannot start node";
  const std::optional<std::string> line = node->ReadLine(testing::kProcessTimeout);
  ASSERT_TRUE(line) << "the node client printed nothing (is tests/openai_client installed? "
                       "tools/install-deps.sh runs npm ci there)";
  const std::optional<int> status = node->Wait(testing::kProcessTimeout);
  ASSERT_TRUE(status && *status == 0) << "node exited " << (status ? *status : -1) << ": " << *line;
  const json out = json::parse(*line);
  EXPECT_EQ(out["completion"], want_completion) << *line;
  EXPECT_EQ(out["completion_stream"], want_completion);
  EXPECT_EQ(out["completion_finish"], "length");
  EXPECT_EQ(out["completion_usage"]["completion_tokens"], 12);
  EXPECT_EQ(out["chat"], want_chat);
  EXPECT_EQ(out["chat_role"], "assistant");
  EXPECT_EQ(out["chat_stream"], want_chat);
  EXPECT_EQ(out["chat_stream_usage"]["completion_tokens"], 12);
  EXPECT_EQ(out["error_status"], 400);
  EXPECT_EQ(out["error_param"], "n");

  // The abandoned stream: cancelled on the router, nothing left on the worker.
  std::string r, d;
  while (absl::Now() < deadline) {
    r = testing::ScrapeMetrics(router.metrics_port);
    d = testing::ScrapeMetrics(decode.metrics_port);
    if (MetricSum(r, "kvrelay_router_requests_total", "code=\"CANCELLED\"") == 1 &&
        MetricSum(d, "kvrelay_decode_running_sequences") == 0 &&
        MetricSum(d, "kvrelay_kv_blocks", "state=\"in_use\"") == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(MetricSum(r, "kvrelay_router_requests_total", "code=\"CANCELLED\""), 1) << r;
  EXPECT_EQ(MetricSum(d, "kvrelay_decode_running_sequences"), 0);
  EXPECT_EQ(MetricSum(d, "kvrelay_kv_blocks", "state=\"in_use\""), 0) << d;
}

}  // namespace
}  // namespace kvrelay
