#include "decode_worker/decode_worker.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "prefill_worker/prefill_worker.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"
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

using ::kvrelay::testing::Metric;

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
  o = Options();
  o.device = "npu";
  absl::Status s = DecodeWorker::Start(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--device"));
  o = Options();
  o.threads = -1;
  EXPECT_THAT(DecodeWorker::Start(o).status().message(), HasSubstr("--threads"));
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
  // Without options.metrics the worker keeps its series in a registry of its own.
  ASSERT_NE((*w)->metrics(), nullptr);
  EXPECT_EQ(Metric(*(*w)->metrics(), "kvrelay_decode_requests_total", {{"code", "OK"}}), 1);
  EXPECT_EQ(Metric(*(*w)->metrics(), "kvrelay_decode_generated_tokens_total"), 4);
  (*w)->Shutdown(absl::Seconds(5));
  (*w)->Shutdown(absl::Seconds(5));  // idempotent
}

// Fault injection: a prefill worker that answers OK without writing any KV and with
// wrong checksums (what corruption in flight looks like to the decode worker).
class CorruptPrefillWorker final : public v1::PrefillWorker::CallbackService {
 public:
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp) override {
    resp->set_first_token(1);
    resp->mutable_first_logprobs()->set_token_id(1);
    for (int i = 0; i < req->destination_blocks_size(); ++i) resp->add_block_checksums(12345);
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const v1::AbortRequest*,
                                  v1::AbortResponse* resp) override {
    resp->set_found(false);
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }
};

v1::DecodeRequest Remote(const std::string& id, const std::vector<int32_t>& prompt,
                         const std::string& prefill_address) {
  v1::DecodeRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_token_ids(t);
  r.mutable_sampling()->set_max_tokens(4);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
  r.mutable_plan()->set_prefill_address(prefill_address);
  return r;
}

std::vector<int32_t> Tokens(int n, int seed) {
  std::vector<int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = (i * 7 + seed * 13) % 300;
  return p;
}

// Runs a Generate call to the end; the number of tokens streamed, or -1 if it failed.
int Generate(v1::DecodeWorker::Stub& stub, const v1::DecodeRequest& r, grpc::Status* status) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&ctx, r);
  v1::DecodeResponse m;
  int tokens = 0;
  while (reader->Read(&m)) tokens += m.token_ids_size();
  *status = reader->Finish();
  return status->ok() ? tokens : -1;
}

// The decode worker's Prometheus series after real requests over gRPC: calls counted by
// status code; remote prefills by result (ok from a real prefill worker in this process,
// checksum_mismatch from a fake that writes nothing, failed where nothing listens,
// cancelled by the client); the KV bytes received and the corrupt blocks; generated,
// prompt and cached tokens; and the KV block gauges covering the whole pool.
TEST(DecodeWorkerTest, MetricsCountRequestsRemotePrefillsAndChecksumFailures) {
  prefill::PrefillWorkerOptions po;
  po.model_dir = testing::ModelDir(testing::TinyVariants()[0]);
  po.kv.kv_blocks = 64;
  po.threads = 1;
  po.engine.prefill_chunk = 1;  // slow enough to be cancelled while it runs
  auto p = prefill::PrefillWorker::Start(po);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string p_address = "127.0.0.1:" + std::to_string((*p)->port());
  CorruptPrefillWorker fake;
  grpc::ServerBuilder builder;
  int fake_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &fake_port);
  builder.RegisterService(&fake);
  std::unique_ptr<grpc::Server> fake_server = builder.BuildAndStart();
  ASSERT_TRUE(fake_server && fake_port > 0);

  DecodeWorkerOptions o = Options();
  o.metrics = std::make_shared<prometheus::Registry>();
  const prometheus::Registry& reg = *o.metrics;
  auto w = DecodeWorker::Start(o);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->metrics(), o.metrics);
  auto stub = v1::DecodeWorker::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*w)->port()), grpc::InsecureChannelCredentials()));
  const double block_bytes = static_cast<double>(testing::LoadedModel(testing::TinyVariants()[0])
                                                     .KvLayout(kernels::DType::kF32, 16)
                                                     .block_bytes());
  grpc::Status st;

  // Remote prefill of 40 tokens: 3 blocks arrive.
  EXPECT_EQ(Generate(*stub, Remote("ok1", Tokens(40, 1), p_address), &st), 4) << st.error_message();
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total", {{"result", "ok"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_received_bytes_total"), 3 * block_bytes);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_received_bytes_total", {{"transport", "unknown"}}),
            -1);  // labelled with the transport the prefill worker used
  // Again: 2 blocks are cached here, only the last one is sent.
  EXPECT_EQ(Generate(*stub, Remote("ok2", Tokens(40, 1), p_address), &st), 4) << st.error_message();
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total", {{"result", "ok"}}), 2);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_transfer_received_bytes_total"), 4 * block_bytes);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_cached_tokens_total"), 32);
  // Corrupt KV: all 3 blocks mismatch; prefilled here instead.
  const std::string fake_address = "127.0.0.1:" + std::to_string(fake_port);
  EXPECT_EQ(Generate(*stub, Remote("bad", Tokens(40, 2), fake_address), &st), 4)
      << st.error_message();
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total", {{"result", "checksum_mismatch"}}),
            1);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_checksum_failures_total"), 3);
  // Nothing listens there: the call fails; prefilled here instead.
  EXPECT_EQ(Generate(*stub, Remote("gone", Tokens(40, 3), "127.0.0.1:1"), &st), 4)
      << st.error_message();
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total", {{"result", "failed"}}), 1);
  // A bad request.
  v1::DecodeRequest empty = Remote("empty", {}, p_address);
  EXPECT_EQ(Generate(*stub, empty, &st), -1);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Cancelled by the client while the prefill worker computes 400 tokens one at a time.
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, Remote("cancel", Tokens(400, 4), p_address));
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while ((*w)->engine().stats().remote_prefills < 5 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    ctx.TryCancel();
    v1::DecodeResponse m;
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The quarantined blocks come back once the prefill worker acknowledges the abort.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (((*w)->engine().stats().quarantined_blocks != 0 || (*w)->cache().counts().in_use != 0) &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total", {{"result", "cancelled"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_remote_prefills_total"), 5);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_requests_total", {{"code", "OK"}}), 4);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_requests_total", {{"code", "INVALID_ARGUMENT"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_requests_total", {{"code", "CANCELLED"}}), 1);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_requests_total"), 6);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_generated_tokens_total"), 16);
  EXPECT_EQ(Metric(reg, "kvrelay_decode_prompt_tokens_total"), 4 * 40 + 400);
  EXPECT_GT(Metric(reg, "kvrelay_decode_steps_total"), 0);
  EXPECT_GT(Metric(reg, "kvrelay_decode_batch_sequences"), 0);

  (*w)->Shutdown(absl::Seconds(5));
  w->reset();  // the engine's loop has ended: the gauges are final
  EXPECT_EQ(Metric(reg, "kvrelay_decode_quarantined_blocks"), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks", {{"state", "in_use"}}), 0);
  EXPECT_EQ(Metric(reg, "kvrelay_kv_blocks"), 64);
  (*p)->Shutdown(absl::Seconds(5));
  fake_server->Shutdown();
}

}  // namespace
}  // namespace kvrelay::decode
