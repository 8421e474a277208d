// Router (the process object) in one process: its option checks, the standard health
// service following the registered decode workers, and graceful shutdown. A FAKE decode
// worker (an in-process DecodeWorker server whose calls wait until the test releases
// them) registers through a real rpc::RegistryClient. Every wait is bounded. The metrics
// go to the registry RouterOptions names.
#include "router/router.h"

#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/kvcache/prefix_cache.h"
#include "common/rpc/registry_client.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/test_models.h"
#include "tests/testing/wait.h"

namespace kvrelay::router {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

constexpr absl::Duration kWait = absl::Seconds(60);
constexpr int kBlock = 16;

std::chrono::system_clock::time_point In(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(d);
}

using ::kvrelay::testing::WaitFor;

const std::string& ModelDir() {
  static const std::string* dir = new std::string(testing::ModelDir(testing::TinyVariants()[0]));
  return *dir;
}

RouterOptions Options() {
  RouterOptions o;
  o.model_dir = ModelDir();
  o.block_size = kBlock;
  o.heartbeat_timeout = absl::Seconds(120);  // a loaded machine must not expire the fake
  return o;
}

using ::kvrelay::testing::Metric;

// A decode worker whose every call streams `tokens` and finishes ("length") once the
// test releases it, or ends when cancelled.
class FakeWorker final : public v1::DecodeWorker::CallbackService {
 public:
  class Call final : public grpc::ServerWriteReactor<v1::DecodeResponse> {
   public:
    explicit Call(FakeWorker* w) : w_(w) {}

    bool Write(const v1::DecodeResponse& m) {
      {
        absl::MutexLock l(&w_->mu_);
        if (cancelled_) return false;
        msg_ = m;
        writing_ = true;
      }
      StartWrite(&msg_);
      absl::MutexLock l(&w_->mu_);
      auto written = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(w_->mu_) { return !writing_; };
      return w_->mu_.AwaitWithTimeout(absl::Condition(&written), kWait) && write_ok_;
    }
    // True once released; false when cancelled first (or kWait passed).
    bool WaitRelease() {
      absl::MutexLock l(&w_->mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(w_->mu_) {
        return w_->released_ || cancelled_;
      };
      w_->mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
      return w_->released_ && !cancelled_;
    }

    void OnCancel() override {
      absl::MutexLock l(&w_->mu_);
      if (!cancelled_) ++w_->cancelled_calls_;
      cancelled_ = true;
    }
    void OnWriteDone(bool ok) override {
      absl::MutexLock l(&w_->mu_);
      writing_ = false;
      write_ok_ = ok;
    }
    void OnDone() override {}

   private:
    FakeWorker* w_;
    v1::DecodeResponse msg_;
    bool writing_ ABSL_GUARDED_BY(w_->mu_) = false;
    bool write_ok_ ABSL_GUARDED_BY(w_->mu_) = false;
    bool cancelled_ ABSL_GUARDED_BY(w_->mu_) = false;
  };

  FakeWorker(std::string id, std::vector<int32_t> tokens)
      : id_(std::move(id)), tokens_(std::move(tokens)) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    kvcache::PrefixCache::Options o;
    o.num_blocks = 64;
    o.block_size = kBlock;
    o.incarnation = kvcache::NewIncarnationId();
    auto cache = kvcache::PrefixCache::Create(o);
    EXPECT_TRUE(cache.ok()) << cache.status();
    if (cache.ok()) cache_ = *std::move(cache);
  }
  ~FakeWorker() override {
    StopRegistration();
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now());
      server_->Wait();
    }
    for (std::thread& t : threads_) t.join();
  }

  bool ok() const { return server_ != nullptr && port_ > 0 && cache_ != nullptr; }

  absl::Status Register(const std::string& router, v1::WorkerRole role, const std::string& model) {
    rpc::RegistryClientOptions o;
    o.routers = {router};
    v1::WorkerRegistration& r = o.registration;
    r.set_worker_id(id_);
    r.set_role(role);
    r.set_address(absl::StrCat("127.0.0.1:", port_));
    r.set_model_id(model);
    r.set_block_size(kBlock);
    r.set_num_blocks(cache_->num_blocks());
    r.set_incarnation(cache_->incarnation());
    r.set_kv_dtype("f32");
    o.reconnect_min = absl::Milliseconds(20);
    o.reconnect_max = absl::Milliseconds(200);
    registration_ = std::make_unique<rpc::RegistryClient>(std::move(o), cache_.get(), [this] {
      v1::LoadReport l;
      l.set_free_blocks(cache_->counts().free);
      return l;
    });
    return registration_->Start();
  }
  void StopRegistration() {
    if (registration_ != nullptr) registration_->Stop();
  }

  void Release() {
    absl::MutexLock l(&mu_);
    released_ = true;
  }
  bool WaitCalls(int n) const {
    absl::MutexLock l(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
  }
  bool WaitCancelledCalls(int n) const {
    absl::MutexLock l(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return cancelled_calls_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
  }

  grpc::ServerWriteReactor<v1::DecodeResponse>* Generate(
      grpc::CallbackServerContext* /*ctx*/, const v1::DecodeRequest* request) override {
    auto call = std::make_unique<Call>(this);
    Call* c = call.get();
    absl::MutexLock l(&mu_);
    ++calls_;
    reactors_.push_back(std::move(call));
    threads_.emplace_back([this, c, resumed = request->resumed_tokens()] {
      if (!c->WaitRelease()) return c->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "gone"));
      for (int32_t id : tokens_) {
        v1::DecodeResponse m;
        m.add_token_ids(id);
        if (!c->Write(m)) return c->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "gone"));
      }
      v1::DecodeResponse f;
      f.set_finish_reason("length");
      f.mutable_usage()->set_completion_tokens(resumed + static_cast<int64_t>(tokens_.size()));
      f.mutable_usage()->set_prefill_mode(v1::PREFILL_MODE_LOCAL);
      c->Write(f);
      c->Finish(grpc::Status::OK);
    });
    return c;
  }

 private:
  const std::string id_;
  const std::vector<int32_t> tokens_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<kvcache::PrefixCache> cache_;
  std::unique_ptr<rpc::RegistryClient> registration_;
  mutable absl::Mutex mu_;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  int cancelled_calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::unique_ptr<Call>> reactors_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

// grpc.health.v1.Health/Check for `service` through a generic call: the RPC's status
// and the answer's status field (1 SERVING, 2 NOT_SERVING; 0 when absent).
struct Health {
  grpc::Status rpc;
  int serving = -1;
};
Health CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  std::string wire = {0x0a, static_cast<char>(service.size())};  // field 1, length-delimited
  wire += service;
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  grpc::Slice slice(wire);
  grpc::ByteBuffer request(&slice, 1), response;
  Health h;
  absl::Notification done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      h.rpc = std::move(s);
                      done.Notify();
                    });
  done.WaitForNotification();  // bounded by the call's deadline
  if (!h.rpc.ok()) return h;
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  h.serving = 0;
  if (bytes.size() == 2 && bytes[0] == 0x08) h.serving = bytes[1];
  return h;
}

constexpr int kServing = 1;
constexpr int kNotServing = 2;
constexpr char kService[] = "kvrelay.v1.Generation";

struct Result {
  grpc::Status status;
  std::vector<int32_t> tokens;
  v1::Final final;
};
Result Generate(v1::Generation::Stub* stub, const std::vector<int32_t>& prompt, int max_tokens,
                absl::Duration timeout = kWait) {
  v1::GenerateRequest req;
  for (int32_t id : prompt) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(timeout));
  auto reader = stub->Generate(&ctx, req);
  Result r;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    r.tokens.insert(r.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.has_final()) r.final = m.final();
  }
  r.status = reader->Finish();
  return r;
}

TEST(RouterTest, StartRejectsBadOptions) {
  struct Case {
    std::string name;
    std::function<void(RouterOptions&)> change;
    absl::StatusCode code;
    std::string names;  // in the message
  };
  const std::vector<Case> cases = {
      {"max_running 0", [](RouterOptions& o) { o.generation.max_running = 0; },
       absl::StatusCode::kInvalidArgument, "--max_running"},
      {"max_queued 0", [](RouterOptions& o) { o.generation.max_queued = 0; },
       absl::StatusCode::kInvalidArgument, "--max_queued"},
      {"migration_limit -1", [](RouterOptions& o) { o.generation.migration_limit = -1; },
       absl::StatusCode::kInvalidArgument, "--migration_limit"},
      {"heartbeat timeout = interval",
       [](RouterOptions& o) {
         o.heartbeat_interval = absl::Seconds(1);
         o.heartbeat_timeout = absl::Seconds(1);
       },
       absl::StatusCode::kInvalidArgument, "--heartbeat_timeout_ms"},
      {"heartbeat timeout < interval",
       [](RouterOptions& o) {
         o.heartbeat_interval = absl::Seconds(2);
         o.heartbeat_timeout = absl::Seconds(1);
       },
       absl::StatusCode::kInvalidArgument, "--heartbeat_interval_ms"},
      {"heartbeat interval 0",
       [](RouterOptions& o) { o.heartbeat_interval = absl::ZeroDuration(); },
       absl::StatusCode::kInvalidArgument, "--heartbeat_interval_ms"},
      {"overlap_weight -1", [](RouterOptions& o) { o.generation.scheduler.overlap_weight = -1; },
       absl::StatusCode::kInvalidArgument, "overlap_weight"},
      {"local_prefill_max_ratio NaN",
       [](RouterOptions& o) {
         o.generation.scheduler.local_prefill_max_ratio = std::numeric_limits<double>::quiet_NaN();
       },
       absl::StatusCode::kInvalidArgument, "local_prefill_max_ratio"},
      {"decode_max_waiting -1",
       [](RouterOptions& o) { o.generation.scheduler.decode_max_waiting = -1; },
       absl::StatusCode::kInvalidArgument, "decode_max_waiting"},
      {"max_request_bytes 100", [](RouterOptions& o) { o.max_request_bytes = 100; },
       absl::StatusCode::kInvalidArgument, "--max_request_bytes"},
      {"no model dir", [](RouterOptions& o) { o.model_dir.clear(); },
       absl::StatusCode::kInvalidArgument, "--model"},
      {"block_size 0", [](RouterOptions& o) { o.block_size = 0; },
       absl::StatusCode::kInvalidArgument, "--block_size"},
      {"unknown chat format", [](RouterOptions& o) { o.chat_format = "no-such-format"; },
       absl::StatusCode::kInvalidArgument, "--chat_format"},
      {"bad listen address", [](RouterOptions& o) { o.listen = "[::1:0"; },
       absl::StatusCode::kUnavailable, "cannot listen on [::1:0"},
      // A folder that does not exist: the loader's error, naming the file it looked for.
      {"missing model dir", [](RouterOptions& o) { o.model_dir = ModelDir() + "-missing"; },
       absl::StatusCode::kNotFound, "-missing/config.json"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    RouterOptions o = Options();
    c.change(o);
    absl::StatusOr<std::unique_ptr<Router>> r = Router::Start(o);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), c.code) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.names));
  }
  // The defaults start.
  absl::StatusOr<std::unique_ptr<Router>> r = Router::Start(Options());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT((*r)->port(), 0);
  EXPECT_EQ((*r)->model().model_id, "llama_gqa");
}

TEST(RouterTest, HealthIsServingWhileADecodeWorkerIsRegistered) {
  RouterOptions o = Options();
  o.metrics = std::make_shared<prometheus::Registry>();
  auto workers = [&](const std::string& role, const std::string& state) {
    return Metric(*o.metrics, "kvrelay_router_workers", {{"role", role}, {"state", state}});
  };
  absl::StatusOr<std::unique_ptr<Router>> started = Router::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  Router& router = **started;
  const std::string address = absl::StrCat("127.0.0.1:", router.port());
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto status_is = [&](int want) {
    return WaitFor([&] {
      const Health h = CheckHealth(channel, kService);
      return h.rpc.ok() && h.serving == want;
    });
  };
  Health h = CheckHealth(channel, kService);
  ASSERT_TRUE(h.rpc.ok()) << h.rpc.error_code() << " " << h.rpc.error_message();
  EXPECT_EQ(h.serving, kNotServing) << "no decode worker yet";

  // A prefill worker alone serves no request.
  FakeWorker prefill("fake-p", {});
  ASSERT_TRUE(prefill.ok());
  ASSERT_TRUE(prefill.Register(address, v1::WORKER_ROLE_PREFILL, router.model().model_id).ok());
  ASSERT_TRUE(WaitFor([&] { return router.registry().Alive(v1::WORKER_ROLE_PREFILL) == 1; }));
  h = CheckHealth(channel, kService);
  EXPECT_TRUE(h.rpc.ok());
  EXPECT_EQ(h.serving, kNotServing);

  {
    FakeWorker decode("fake-d", {});
    ASSERT_TRUE(decode.ok());
    ASSERT_TRUE(decode.Register(address, v1::WORKER_ROLE_DECODE, router.model().model_id).ok());
    EXPECT_TRUE(status_is(kServing)) << router.registry().List().ShortDebugString();
    EXPECT_EQ(router.registry().Alive(v1::WORKER_ROLE_DECODE), 1);
    EXPECT_EQ(workers("decode", "alive"), 1);
    EXPECT_EQ(workers("prefill", "alive"), 1);
    decode.StopRegistration();  // the worker goes away
    EXPECT_TRUE(status_is(kNotServing)) << router.registry().List().ShortDebugString();
    EXPECT_EQ(router.registry().Alive(v1::WORKER_ROLE_DECODE), 0);
    EXPECT_EQ(workers("decode", "alive"), 0);
    EXPECT_EQ(workers("decode", "dead"), 1);
    EXPECT_EQ(
        Metric(*o.metrics, "kvrelay_router_worker_deaths_total", {{"reason", "disconnected"}}), 1);
  }
  // ... and comes back.
  FakeWorker again("fake-d", {});
  ASSERT_TRUE(again.Register(address, v1::WORKER_ROLE_DECODE, router.model().model_id).ok());
  EXPECT_TRUE(status_is(kServing));
  EXPECT_EQ(workers("decode", "alive"), 1);
  EXPECT_EQ(workers("decode", "dead"), 0);

  // Shut down: NOT_SERVING (while connections linger) whatever the workers.
  std::thread shutdown([&] { router.Shutdown(absl::Seconds(5), /*linger=*/absl::Seconds(3)); });
  EXPECT_TRUE(status_is(kNotServing));
  shutdown.join();
}

TEST(RouterTest, ShutdownLetsARunningRequestFinishAndRefusesNewOnes) {
  RouterOptions o = Options();
  o.metrics = std::make_shared<prometheus::Registry>();
  auto requests = [&](const std::string& code) {
    return Metric(*o.metrics, "kvrelay_router_requests_total", {{"code", code}});
  };
  absl::StatusOr<std::unique_ptr<Router>> started = Router::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  Router& router = **started;
  const std::string address = absl::StrCat("127.0.0.1:", router.port());
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::Generation::NewStub(channel);
  const std::vector<int32_t> prompt = router.model().tokenizer->Encode("Hello there", true);
  const std::vector<int32_t> out = router.model().tokenizer->Encode(" a reply of tokens", false);
  FakeWorker worker("fake-d", out);
  ASSERT_TRUE(worker.ok());
  ASSERT_TRUE(worker.Register(address, v1::WORKER_ROLE_DECODE, router.model().model_id).ok());
  ASSERT_TRUE(WaitFor([&] { return router.registry().Alive(v1::WORKER_ROLE_DECODE) == 1; }));

  Result running;
  std::thread client([&] { running = Generate(stub.get(), prompt, static_cast<int>(out.size())); });
  ASSERT_TRUE(worker.WaitCalls(1));

  absl::Notification shut_down;
  std::thread shutdown([&] {
    router.Shutdown(/*grace=*/kWait);
    shut_down.Notify();
  });
  // Health goes NOT_SERVING first.
  EXPECT_TRUE(WaitFor([&] {
    const Health h = CheckHealth(channel, kService);
    return h.rpc.ok() && h.serving == kNotServing;
  }));
  // New requests are refused once shutdown began. (A probe that slipped in just before
  // is served, or runs into its own short deadline: try again.)
  bool refused = false;
  const absl::Time deadline = absl::Now() + kWait;
  while (!refused && absl::Now() < deadline) {
    const Result probe = Generate(stub.get(), prompt, 1, absl::Seconds(3));
    if (probe.status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      EXPECT_THAT(probe.status.error_message(), HasSubstr("shutting down"));
      refused = true;
    }
  }
  EXPECT_TRUE(refused);
  EXPECT_FALSE(shut_down.HasBeenNotified()) << "the running request holds the shutdown";

  worker.Release();  // only now does the running request go on
  client.join();
  ASSERT_TRUE(running.status.ok())
      << running.status.error_code() << " " << running.status.error_message();
  EXPECT_THAT(running.tokens, ElementsAreArray(out));
  EXPECT_EQ(running.final.finish_reason(), "length");
  EXPECT_TRUE(shut_down.WaitForNotificationWithTimeout(kWait));
  shutdown.join();
  // In the registry given: the running request, and the refused ones.
  EXPECT_GE(requests("OK"), 1);
  EXPECT_GE(requests("UNAVAILABLE"), 1);
  EXPECT_GE(Metric(*o.metrics, "kvrelay_router_generated_tokens_total"),
            static_cast<double>(out.size()));
  EXPECT_TRUE(WaitFor([&] { return Metric(*o.metrics, "kvrelay_router_requests_running") == 0; }));

  // Stopped: nothing answers any more.
  const Result after = Generate(stub.get(), prompt, 1, absl::Seconds(5));
  EXPECT_EQ(after.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << after.status.error_message();
  router.Shutdown(absl::ZeroDuration());  // again: nothing happens
}

TEST(RouterTest, ShutdownCancelsWhatOutlivesTheGrace) {
  absl::StatusOr<std::unique_ptr<Router>> started = Router::Start(Options());
  ASSERT_TRUE(started.ok()) << started.status();
  Router& router = **started;
  const std::string address = absl::StrCat("127.0.0.1:", router.port());
  auto stub =
      v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  const std::vector<int32_t> prompt = router.model().tokenizer->Encode("Hello there", true);
  FakeWorker worker("fake-d", {});  // never released
  ASSERT_TRUE(worker.ok());
  ASSERT_TRUE(worker.Register(address, v1::WORKER_ROLE_DECODE, router.model().model_id).ok());
  ASSERT_TRUE(WaitFor([&] { return router.registry().Alive(v1::WORKER_ROLE_DECODE) == 1; }));
  Result running;
  std::thread client([&] { running = Generate(stub.get(), prompt, 4); });
  ASSERT_TRUE(worker.WaitCalls(1));
  const absl::Time start = absl::Now();
  router.Shutdown(/*grace=*/absl::Milliseconds(200));
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  client.join();
  EXPECT_FALSE(running.status.ok());
  EXPECT_TRUE(worker.WaitCancelledCalls(1)) << "the worker's call must be cancelled too";
}

}  // namespace
}  // namespace kvrelay::router
