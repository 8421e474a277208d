// Disaggregated serving with real processes on 127.0.0.1: kvrelay-prefill computes the
// prompt's KV and pushes it over UCX into a decode worker, which generates. Outputs are
// checked against the real single-process `kvrelay generate`.
#include <signal.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "decode_worker/decode_worker.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prefill_worker/prefill_worker.h"
#include "tests/testing/decode_client.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::RandomPrompt;

constexpr int kBlock = 16;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

uint64_t BlockBytes() { return testing::TinyBlockBytes(kBlock); }

using Reply = testing::DecodeReply;

v1::DecodeRequest Remote(const std::string& id, const std::vector<int32_t>& prompt, int max_tokens,
                         const std::string& prefill_address) {
  v1::DecodeRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_token_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  r.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
  r.mutable_plan()->set_prefill_address(prefill_address);
  return r;
}

Reply Generate(v1::DecodeWorker::Stub& stub, const v1::DecodeRequest& req) {
  return testing::DecodeGenerate(stub, req);
}

std::unique_ptr<v1::DecodeWorker::Stub> Stub(int port) {
  return v1::DecodeWorker::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
}

testing::WorkerProcess StartPrefill(const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"--model",     ModelDir(), "--threads",       "1",
                                   "--kv_blocks", "256",      "--prefill_chunk", "24"};
  args.insert(args.end(), extra.begin(), extra.end());
  return testing::StartWorker("kvrelay-prefill", args);
}

testing::WorkerProcess StartDecode() {
  return testing::StartWorker("kvrelay-decode",
                              {"--model", ModelDir(), "--threads", "1", "--kv_blocks", "256"});
}

TEST(DisaggregatedProcessTest, RemotePrefillIsExactAndSendsOnlyMissingBlocks) {
  testing::WorkerProcess p = StartPrefill();
  testing::WorkerProcess d1 = StartDecode(), d2 = StartDecode();
  ASSERT_TRUE(p.process && d1.process && d2.process);
  auto s1 = Stub(d1.port), s2 = Stub(d2.port);
  // Short, exactly block-aligned, long (several prefill chunks on the prefill worker).
  for (int n : {5, 32, 100}) {
    const auto prompt = RandomPrompt(n, 300 + n);
    const Reply r = Generate(*s1, Remote("a" + std::to_string(n), prompt, 8, p.address()));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, testing::CliGenerate(ModelDir(), prompt, 8)) << n << " tokens";
    EXPECT_EQ(r.usage.prefill_mode(), v1::PREFILL_MODE_REMOTE);
    EXPECT_EQ(r.usage.cached_tokens(), 0);
    EXPECT_EQ(r.usage.transfer_bytes(), ((n + kBlock - 1) / kBlock) * BlockBytes());
    EXPECT_FALSE(r.usage.transport().empty());
  }
  const auto prompt = RandomPrompt(100, 1400);  // not one of the prompts above
  const auto want = testing::CliGenerate(ModelDir(), prompt, 8);
  // First time: everything computed on the prefill worker and sent (7 blocks).
  Reply r = Generate(*s1, Remote("b1", prompt, 8, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.usage.transfer_bytes(), 7 * BlockBytes());
  // A prefix hit on the decode worker: only the block it lacks is sent.
  r = Generate(*s1, Remote("b2", prompt, 8, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.usage.cached_tokens(), 96);
  EXPECT_EQ(r.usage.transfer_bytes(), 1 * BlockBytes());
  // A prefix hit on the prefill worker only (another decode worker): P reuses 96
  // tokens, D still gets all 7 blocks.
  r = Generate(*s2, Remote("b3", prompt, 8, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.usage.cached_tokens(), 0);
  EXPECT_EQ(r.usage.prefill_cached_tokens(), 96);
  EXPECT_EQ(r.usage.transfer_bytes(), 7 * BlockBytes());
}

TEST(DisaggregatedProcessTest, ConcurrentRemoteRequestsAreExact) {
  testing::WorkerProcess p = StartPrefill();
  testing::WorkerProcess d = StartDecode();
  ASSERT_TRUE(p.process && d.process);
  auto stub = Stub(d.port);
  const int kN = 8;
  std::vector<Reply> replies(kN);
  std::vector<std::thread> clients;
  for (int i = 0; i < kN; ++i) {
    clients.emplace_back([&, i] {
      replies[i] = Generate(*stub, Remote("c" + std::to_string(i),
                                          RandomPrompt(10 + 13 * i, 500 + i), 10, p.address()));
    });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(replies[i].status.ok()) << i << ": " << replies[i].status.error_message();
    EXPECT_EQ(replies[i].tokens,
              testing::CliGenerate(ModelDir(), RandomPrompt(10 + 13 * i, 500 + i), 10))
        << "request " << i;
    EXPECT_EQ(replies[i].usage.prefill_mode(), v1::PREFILL_MODE_REMOTE);
  }
}

// Waits (bounded) until the decode worker holds no block and quarantines none.
bool WaitForBaseline(decode::DecodeWorker& d) {
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  while (absl::Now() < deadline) {
    if (d.cache().counts().in_use == 0 && d.engine().stats().quarantined_blocks == 0) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

TEST(DisaggregatedProcessTest, PrefillWorkerKilledFallsBackToLocalAndReclaimsTheBlocks) {
  // A slow prefill worker (one token per forward pass) that is killed while it works.
  testing::WorkerProcess p = StartPrefill({"--prefill_chunk", "1"});
  ASSERT_TRUE(p.process);
  decode::DecodeWorkerOptions o;
  o.model_dir = ModelDir();
  o.kv.kv_blocks = 128;
  o.threads = 1;
  auto d = decode::DecodeWorker::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  auto stub = Stub((*d)->port());
  const auto prompt = RandomPrompt(400, 77);
  const auto want = testing::CliGenerate(ModelDir(), prompt, 6);
  Reply r;
  std::thread client([&] { r = Generate(*stub, Remote("k", prompt, 6, p.address())); });
  // Once the decode worker has asked for the prefill (its blocks are leased), kill P.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  while ((*d)->engine().stats().remote_prefills == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  p.process->Kill(SIGKILL);
  p.process->Wait(testing::kProcessTimeout);
  client.join();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, want);  // the same tokens, prefilled locally
  EXPECT_EQ(r.usage.prefill_mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_EQ((*d)->engine().stats().remote_prefill_failures, 1);
  // The lease's blocks come back once the prefill worker is known to be gone.
  EXPECT_TRUE(WaitForBaseline(**d));
  (*d)->Shutdown(absl::Seconds(5));
}

TEST(DisaggregatedProcessTest, ClientCancelDuringRemotePrefillReleasesEverything) {
  testing::WorkerProcess p = StartPrefill({"--prefill_chunk", "1"});
  ASSERT_TRUE(p.process);
  decode::DecodeWorkerOptions o;
  o.model_dir = ModelDir();
  o.kv.kv_blocks = 128;
  o.threads = 1;
  auto d = decode::DecodeWorker::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  auto stub = Stub((*d)->port());
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, Remote("x", RandomPrompt(400, 78), 6, p.address()));
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  while ((*d)->engine().stats().remote_prefills == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ctx.TryCancel();
  v1::DecodeResponse m;
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The prefill worker acknowledges the abort; every block comes back on both sides.
  EXPECT_TRUE(WaitForBaseline(**d));
  // The prefill worker still serves.
  const auto prompt = RandomPrompt(20, 79);
  const Reply r = Generate(*stub, Remote("y", prompt, 4, p.address()));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, testing::CliGenerate(ModelDir(), prompt, 4));
  EXPECT_EQ(r.usage.prefill_mode(), v1::PREFILL_MODE_REMOTE);
  (*d)->Shutdown(absl::Seconds(5));
}

// Both workers in this process (real gRPC and UCX on loopback) so that both sides'
// block accounting can be read: requests cancelled at random points (before the first
// token, during the remote prefill, mid-decode) leave nothing held on either side.
TEST(DisaggregatedProcessTest, RandomCancelsReturnBothWorkersToTheirBaseline) {
  prefill::PrefillWorkerOptions po;
  po.model_dir = ModelDir();
  po.kv.kv_blocks = 256;
  po.threads = 1;
  po.engine.prefill_chunk = 4;  // slow enough to be cancelled mid-transfer
  auto p = prefill::PrefillWorker::Start(po);
  ASSERT_TRUE(p.ok()) << p.status();
  decode::DecodeWorkerOptions o;
  o.model_dir = ModelDir();
  o.kv.kv_blocks = 256;
  o.threads = 1;
  auto d = decode::DecodeWorker::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  auto stub = Stub((*d)->port());
  const std::string p_address = "127.0.0.1:" + std::to_string((*p)->port());
  std::mt19937 rng(2026);
  int cancelled = 0, completed = 0;
  for (int i = 0; i < 12; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    const int messages_before_cancel = static_cast<int>(rng() % 4);  // 0: before any token
    auto reader = stub->Generate(
        &ctx, Remote("r" + std::to_string(i), RandomPrompt(60 + 17 * i, 900 + i), 40, p_address));
    v1::DecodeResponse m;
    int got = 0;
    if (messages_before_cancel == 0) ctx.TryCancel();
    while (reader->Read(&m)) {
      if (++got == messages_before_cancel) ctx.TryCancel();
    }
    const grpc::Status st = reader->Finish();
    if (st.ok()) {
      ++completed;
    } else {
      EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
      ++cancelled;
    }
    EXPECT_TRUE(WaitForBaseline(**d)) << "request " << i;
    // The prefill worker keeps only its prefix cache.
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while ((*p)->cache().counts().in_use != 0 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_EQ((*p)->cache().counts().in_use, 0) << "request " << i;
  }
  EXPECT_GT(cancelled, 0);
  (*d)->Shutdown(absl::Seconds(5));
  (*p)->Shutdown(absl::Seconds(5));
}

// Fault injection: a prefill worker that answers OK without writing the KV and with
// wrong checksums (what corruption in flight looks like to the decode worker).
class CorruptPrefillWorker final : public v1::PrefillWorker::CallbackService {
 public:
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp) override {
    resp->set_first_token(1);
    resp->mutable_first_logprobs()->set_token_id(1);
    for (int i = 0; i < req->destination_blocks_size(); ++i) resp->add_block_checksums(12345);
    calls_++;
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
  std::atomic<int> calls_{0};
};

TEST(DisaggregatedProcessTest, ChecksumMismatchIsNeverDecoded) {
  CorruptPrefillWorker fake;
  grpc::ServerBuilder builder;
  int fake_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &fake_port);
  builder.RegisterService(&fake);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_TRUE(server && fake_port > 0);
  decode::DecodeWorkerOptions o;
  o.model_dir = ModelDir();
  o.kv.kv_blocks = 64;
  o.threads = 1;
  auto d = decode::DecodeWorker::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  auto stub = Stub((*d)->port());
  const auto prompt = RandomPrompt(40, 81);
  const Reply r =
      Generate(*stub, Remote("bad-kv", prompt, 6, "127.0.0.1:" + std::to_string(fake_port)));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(fake.calls_.load(), 1);
  // The mismatch was caught: the prompt was prefilled locally and the output is exact
  // (the fake's first token 1 was not used).
  EXPECT_EQ(r.usage.prefill_mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_EQ(r.tokens, testing::CliGenerate(ModelDir(), prompt, 6));
  EXPECT_EQ((*d)->engine().stats().remote_prefill_failures, 1);
  EXPECT_TRUE(WaitForBaseline(**d));
  (*d)->Shutdown(absl::Seconds(5));
  server->Shutdown();
}

TEST(DisaggregatedProcessTest, BadPrefillRequestsAreInvalidArgument) {
  testing::WorkerProcess p = StartPrefill();
  ASSERT_TRUE(p.process);
  auto stub = v1::PrefillWorker::NewStub(
      grpc::CreateChannel(p.address(), grpc::InsecureChannelCredentials()));
  auto call = [&](const v1::PrefillRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::PrefillResponse resp;
    return stub->Prefill(&ctx, req, &resp);
  };
  v1::PrefillRequest req;
  EXPECT_EQ(call(req).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(call(req).error_message(), ::testing::HasSubstr("request_id is required"));
  req.set_request_id("r");
  req.add_prompt_token_ids(1);
  EXPECT_THAT(call(req).error_message(), ::testing::HasSubstr("destination is required"));
  req.mutable_destination()->set_transport("ucx");
  EXPECT_THAT(call(req).error_message(), ::testing::HasSubstr("destination.peer_address"));
  v1::AbortRequest abort;
  v1::AbortResponse abort_resp;
  grpc::ClientContext ctx;
  abort.set_request_id("nothing-like-this");
  ASSERT_TRUE(stub->Abort(&ctx, abort, &abort_resp).ok());
  EXPECT_FALSE(abort_resp.found());
}

}  // namespace
}  // namespace kvrelay
