#include "prefill_worker/prefill_worker.h"

#include <algorithm>
#include <map>
#include <string>
#include <thread>

#include "absl/synchronization/notification.h"
#include "common/rpc/convert.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/test_models.h"

namespace kvrelay::prefill {
namespace {

using ::testing::HasSubstr;

PrefillWorkerOptions Options() {
  PrefillWorkerOptions o;
  o.model_dir = testing::ModelDir(testing::TinyVariants()[0]);
  o.kv.kv_blocks = 64;
  o.threads = 1;
  return o;
}

using ::kvrelay::testing::Metric;

TEST(PrefillWorkerTest, BadOptionsNameTheOption) {
  PrefillWorkerOptions o = Options();
  o.model_dir.clear();
  EXPECT_THAT(PrefillWorker::Start(o).status().message(), HasSubstr("--model"));
  o = Options();
  o.kv.kv_dtype = "f7";
  EXPECT_THAT(PrefillWorker::Start(o).status().message(), HasSubstr("--kv-dtype"));
  o = Options();
  o.engine.prefill_chunk = 0;
  EXPECT_THAT(PrefillWorker::Start(o).status().message(), HasSubstr("--prefill_chunk"));
  o = Options();
  o.device = "npu";
  absl::Status s = PrefillWorker::Start(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--device"));
  o = Options();
  o.threads = -1;
  EXPECT_THAT(PrefillWorker::Start(o).status().message(), HasSubstr("--threads"));
}

TEST(PrefillWorkerTest, ShutdownLetsARunningPrefillFinish) {
  PrefillWorkerOptions o = Options();
  o.engine.prefill_chunk = 1;  // 400 forward passes: still running at shutdown
  o.metrics = std::make_shared<prometheus::Registry>();
  const prometheus::Registry& reg = *o.metrics;
  auto w = PrefillWorker::Start(o);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->metrics(), o.metrics);
  // The destination: a pool on another UCX transport in this process.
  auto transport = transfer::NewUcxTransport();
  ASSERT_TRUE(transport.ok()) << transport.status();
  auto kv =
      worker::CreateKvStore(**transport, testing::LoadedModel(testing::TinyVariants()[0]), o.kv);
  ASSERT_TRUE(kv.ok()) << kv.status();
  v1::PrefillRequest req;
  req.set_request_id("drain");
  for (int i = 0; i < 400; ++i) req.add_prompt_token_ids(i % 300);
  *req.mutable_destination() = rpc::ToProto(kv->memory->descriptor());
  for (int b = 0; b < 25; ++b) req.add_destination_blocks(b);
  req.set_model_id(BaseName(o.model_dir));
  req.set_block_size(16);
  req.set_kv_dtype("f32");
  auto stub = v1::PrefillWorker::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*w)->port()), grpc::InsecureChannelCredentials()));
  {  // A bad call first: counted by its code.
    grpc::ClientContext bad_ctx;
    v1::PrefillResponse bad_resp;
    EXPECT_EQ(stub->Prefill(&bad_ctx, v1::PrefillRequest(), &bad_resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::PrefillResponse resp;
  absl::Notification done;
  grpc::Status status;
  stub->async()->Prefill(&ctx, &req, &resp, [&](grpc::Status s) {
    status = s;
    done.Notify();
  });
  // Shut down while the call is in progress (it holds the call count above zero).
  while ((*w)->engine().queued() != 0 || (*w)->cache().counts().in_use == 0) {
    if (done.HasBeenNotified()) break;
    std::this_thread::yield();
  }
  (*w)->Shutdown(absl::Seconds(120));
  done.WaitForNotification();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(resp.block_checksums_size(), 25);
  EXPECT_EQ(resp.stats().computed_tokens(), 400);
  // The metrics (DESIGN §7): both calls by code; the job's tokens, duration and transfer,
  // labelled with the UCX transport that carried it.
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_requests_total", {{"code", "OK"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_requests_total", {{"code", "INVALID_ARGUMENT"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_requests_total"), 2);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_computed_tokens_total"), 400);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_seconds"), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_bytes_total"),
            static_cast<double>(resp.stats().transfer_bytes()));
  EXPECT_GT(resp.stats().transfer_bytes(), 0u);
  EXPECT_EQ(
      Metric(reg, "kvrelay_kv_transfer_bytes_total", {{"transport", resp.stats().transport()}}),
      static_cast<double>(resp.stats().transfer_bytes()));
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_puts_total"),
            static_cast<double>(resp.stats().puts()));
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_seconds"), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_failures_total"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_prefill_queue_depth"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks"), 64);
  w->reset();
  kv->pool.reset();
  kv->memory.reset();
}

}  // namespace
}  // namespace kvrelay::prefill
