// GenerationService (kvrelay.v1.Generation) in one process: a real Router on 127.0.0.1
// (port 0) over a tiny model folder (only its tokenizer and config are read), a real
// gRPC client of the public API, and FAKE decode workers: in-process DecodeWorker
// servers whose every call runs a script the test writes (stream these tokens then
// finish; stream some then fail; block until released or cancelled). The fakes register
// with the router through a real rpc::RegistryClient over a real kvcache::PrefixCache,
// so the router routes to them exactly as to real workers. Every wait is bounded. The
// router's metrics go to a registry the test reads back (Collect).
#include "router/generation_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/prefix_cache.h"
#include "common/rpc/registry_client.h"
#include "common/tokenizer/tokenizer.h"
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
#include "router/router.h"
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

// Polls `pred` every few ms until it holds or `timeout` passes; the last result.
using ::kvrelay::testing::WaitFor;

const std::string& ModelDir() {
  static const std::string* dir = new std::string(testing::ModelDir(testing::TinyVariants()[0]));
  return *dir;
}

using ::kvrelay::testing::Metric;

// --- the fake decode worker ---

class FakeWorker final : public v1::DecodeWorker::CallbackService {
 public:
  class Call;
  // What one call does; its status ends the call. Runs on a thread of its own.
  using Script = std::function<grpc::Status(Call&)>;

  // One DecodeWorker.Generate call. Owned by the worker until the worker is destroyed.
  class Call final : public grpc::ServerWriteReactor<v1::DecodeResponse> {
   public:
    Call(FakeWorker* worker, grpc::CallbackServerContext* ctx, v1::DecodeRequest request)
        : worker_(worker), ctx_(ctx), request_(std::move(request)) {}

    const v1::DecodeRequest& request() const { return request_; }
    FakeWorker& worker() { return *worker_; }

    // Writes one message and waits until it is sent; false when the call is gone.
    bool Write(const v1::DecodeResponse& m) {
      {
        absl::MutexLock l(&worker_->mu_);
        if (cancelled_) return false;
        msg_ = m;
        writing_ = true;
      }
      StartWrite(&msg_);
      absl::MutexLock l(&worker_->mu_);
      auto written = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mu_) { return !writing_; };
      if (!worker_->mu_.AwaitWithTimeout(absl::Condition(&written), kWait)) return false;
      return write_ok_;
    }
    // One message per token.
    bool WriteTokens(const std::vector<int32_t>& ids) {
      for (int32_t id : ids) {
        v1::DecodeResponse m;
        m.add_token_ids(id);
        if (!Write(m)) return false;
      }
      return true;
    }
    // Waits until the test releases the worker (true) or the call is cancelled (false).
    bool WaitRelease() {
      absl::MutexLock l(&worker_->mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mu_) {
        return worker_->released_ || cancelled_;
      };
      worker_->mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
      return worker_->released_ && !cancelled_;
    }
    // Waits until the caller cancels the call (true), or kWait passes (false).
    bool WaitCancelled() {
      absl::MutexLock l(&worker_->mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_->mu_) { return cancelled_; };
      return worker_->mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
    }

    void OnCancel() override {
      absl::MutexLock l(&worker_->mu_);
      if (!cancelled_) ++worker_->cancelled_calls_;
      cancelled_ = true;
    }
    void OnWriteDone(bool ok) override {
      absl::MutexLock l(&worker_->mu_);
      writing_ = false;
      write_ok_ = ok;
    }
    void OnDone() override {
      absl::MutexLock l(&worker_->mu_);
      done_ = true;
    }

   private:
    FakeWorker* worker_;
    grpc::CallbackServerContext* ctx_;
    const v1::DecodeRequest request_;
    v1::DecodeResponse msg_;  // being written
    bool writing_ ABSL_GUARDED_BY(worker_->mu_) = false;
    bool write_ok_ ABSL_GUARDED_BY(worker_->mu_) = false;
    bool cancelled_ ABSL_GUARDED_BY(worker_->mu_) = false;
    bool done_ ABSL_GUARDED_BY(worker_->mu_) = false;
  };

  FakeWorker(std::string id, Script script) : id_(std::move(id)), script_(std::move(script)) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    kvcache::PrefixCache::Options o;
    o.num_blocks = 256;
    o.block_size = kBlock;
    o.incarnation = kvcache::NewIncarnationId();
    auto cache = kvcache::PrefixCache::Create(o);
    EXPECT_TRUE(cache.ok()) << cache.status();
    if (cache.ok()) cache_ = *std::move(cache);
  }

  ~FakeWorker() override {
    StopRegistration();
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now());  // cancels what is left
      server_->Wait();
    }
    for (std::thread& t : threads_) t.join();
  }

  bool ok() const { return server_ != nullptr && port_ > 0 && cache_ != nullptr; }
  const std::string& id() const { return id_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  kvcache::PrefixCache& cache() { return *cache_; }

  // Registers with the router (a real registry client over the cache).
  absl::Status Register(const std::string& router, v1::WorkerRole role, const std::string& model) {
    rpc::RegistryClientOptions o;
    o.routers = {router};
    v1::WorkerRegistration& r = o.registration;
    r.set_worker_id(id_);
    r.set_role(role);
    r.set_address(address());
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
  // The server goes away: every open call is cancelled (a worker dying).
  void Kill() {
    StopRegistration();
    server_->Shutdown(std::chrono::system_clock::now());
  }

  void SetScript(Script script) {
    absl::MutexLock l(&mu_);
    script_ = std::move(script);
  }
  void Release() {
    absl::MutexLock l(&mu_);
    released_ = true;
  }

  std::vector<v1::DecodeRequest> requests() const {
    absl::MutexLock l(&mu_);
    return requests_;
  }
  std::vector<std::chrono::system_clock::time_point> deadlines() const {
    absl::MutexLock l(&mu_);
    return deadlines_;
  }
  int calls() const {
    absl::MutexLock l(&mu_);
    return static_cast<int>(requests_.size());
  }
  int cancelled_calls() const {
    absl::MutexLock l(&mu_);
    return cancelled_calls_;
  }
  // Bounded waits on the counters.
  bool WaitCalls(int n) const {
    absl::MutexLock l(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return static_cast<int>(requests_.size()) >= n;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
  }
  bool WaitCancelledCalls(int n) const {
    absl::MutexLock l(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return cancelled_calls_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), kWait);
  }

  grpc::ServerWriteReactor<v1::DecodeResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::DecodeRequest* request) override {
    auto call = std::make_unique<Call>(this, ctx, *request);
    Call* c = call.get();
    absl::MutexLock l(&mu_);
    requests_.push_back(*request);
    deadlines_.push_back(ctx->deadline());
    Script script = script_;
    calls_.push_back(std::move(call));
    threads_.emplace_back([c, script] {
      grpc::Status st = script ? script(*c) : grpc::Status::OK;
      c->Finish(st);  // last use of the call on this thread
    });
    return c;
  }

 private:
  const std::string id_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<kvcache::PrefixCache> cache_;
  std::unique_ptr<rpc::RegistryClient> registration_;

  mutable absl::Mutex mu_;
  Script script_ ABSL_GUARDED_BY(mu_);
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  int cancelled_calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<v1::DecodeRequest> requests_ ABSL_GUARDED_BY(mu_);
  std::vector<std::chrono::system_clock::time_point> deadlines_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Call>> calls_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

using Script = FakeWorker::Script;

v1::DecodeResponse FinishMessage(const v1::DecodeRequest& r, int64_t new_tokens,
                                 const std::string& reason) {
  v1::DecodeResponse m;
  m.set_finish_reason(reason);
  v1::DecodeUsage* u = m.mutable_usage();
  u->set_prompt_tokens(r.prompt_token_ids_size() - r.resumed_tokens());
  u->set_completion_tokens(r.resumed_tokens() + new_tokens);
  u->set_prefill_mode(r.plan().mode() == v1::PREFILL_MODE_REMOTE ? v1::PREFILL_MODE_REMOTE
                                                                 : v1::PREFILL_MODE_LOCAL);
  return m;
}

// Streams `ids` (one message each), then finishes with `reason` and a usage.
Script Complete(std::vector<int32_t> ids, std::string reason = "length") {
  return [ids, reason](FakeWorker::Call& c) {
    if (!c.WriteTokens(ids)) return grpc::Status(grpc::StatusCode::CANCELLED, "gone");
    c.Write(FinishMessage(c.request(), static_cast<int64_t>(ids.size()), reason));
    return grpc::Status::OK;
  };
}

// As a real decode worker would: reuses the prompt's leading blocks found in the fake's
// cache (reported as usage.cached_tokens in the final message) and caches the prompt's
// full blocks (KV events reach the router's index), then streams `ids` and finishes.
Script CachingComplete(std::string model_id, std::vector<int32_t> ids) {
  return [model_id, ids](FakeWorker::Call& c) {
    kvcache::PrefixCache& cache = c.worker().cache();
    const std::vector<int32_t> prompt(c.request().prompt_token_ids().begin(),
                                      c.request().prompt_token_ids().end());
    const std::vector<uint64_t> hashes =
        kvcache::BlockHashes(kvcache::RootHash(model_id, c.request().cache_salt()), prompt, kBlock);
    const int64_t hit = cache.Lookup(hashes, prompt);
    const int64_t n = static_cast<int64_t>(hashes.size());
    if (hit < n) {
      absl::StatusOr<std::vector<int32_t>> blocks = cache.Allocate(n - hit);
      if (!blocks.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, "fake cache full");
      cache.Store(hit > 0 ? std::optional<uint64_t>(hashes[hit - 1]) : std::nullopt, *blocks,
                  absl::MakeConstSpan(hashes).subspan(hit),
                  absl::MakeConstSpan(prompt).subspan(hit * kBlock, (n - hit) * kBlock));
      cache.Release(*blocks);
    }
    if (!c.WriteTokens(ids)) return grpc::Status(grpc::StatusCode::CANCELLED, "gone");
    v1::DecodeResponse f = FinishMessage(c.request(), static_cast<int64_t>(ids.size()), "length");
    f.mutable_usage()->set_cached_tokens(hit * kBlock);
    c.Write(f);
    return grpc::Status::OK;
  };
}

// Streams `ids`, then ends the call with `status` (a worker failing mid-stream).
Script FailAfter(std::vector<int32_t> ids, grpc::Status status) {
  return [ids, status](FakeWorker::Call& c) {
    c.WriteTokens(ids);
    return status;
  };
}

// Waits for the test's Release (a cancel ends the call), then runs `then`.
Script AfterRelease(Script then) {
  return [then](FakeWorker::Call& c) {
    if (!c.WaitRelease()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    return then(c);
  };
}

// Streams `ids`, then waits until its caller cancels the call.
Script StreamUntilCancelled(std::vector<int32_t> ids) {
  return [ids](FakeWorker::Call& c) {
    c.WriteTokens(ids);
    c.WaitCancelled();
    return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  };
}

// --- the client ---

struct Result {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  std::string first_request_id;
  int messages = 0;
  int finals = 0;
  bool final_on_last = false;
  v1::Final final;
};

// `on_message` (optional) sees the result so far after each message.
Result ReadAll(grpc::ClientReader<v1::GenerateResponse>* reader,
               const std::function<void(const Result&)>& on_message = nullptr) {
  Result r;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (r.messages == 0) r.first_request_id = m.request_id();
    ++r.messages;
    r.tokens.insert(r.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    r.text += m.text();
    r.final_on_last = m.has_final();
    if (m.has_final()) {
      ++r.finals;
      r.final = m.final();
    }
    if (on_message) on_message(r);
  }
  r.status = reader->Finish();
  return r;
}

// A Generate call on its own thread. The destructor cancels it (a failed test does not
// hang) and joins.
class AsyncGenerate {
 public:
  AsyncGenerate(v1::Generation::Stub* stub, const v1::GenerateRequest& request,
                absl::Duration timeout = kWait) {
    ctx_.set_deadline(In(timeout));
    thread_ = std::thread([this, stub, request] {
      auto reader = stub->Generate(&ctx_, request);
      result_ = ReadAll(reader.get(), [this](const Result& so_far) {
        absl::MutexLock l(&mu_);
        tokens_seen_ = static_cast<int>(so_far.tokens.size());
      });
    });
  }
  // True once the client has received at least n tokens (false after kWait).
  bool WaitTokens(int n) {
    absl::MutexLock l(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return tokens_seen_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), kWait);
  }
  ~AsyncGenerate() {
    ctx_.TryCancel();
    Join();
  }
  const Result& Join() {
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  grpc::ClientContext ctx_;
  Result result_;
  absl::Mutex mu_;
  int tokens_seen_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

v1::GenerateRequest Request(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t id : prompt) r.mutable_token_ids()->add_ids(id);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  return r;
}

std::vector<int32_t> Slice(const std::vector<int32_t>& v, size_t from, size_t to) {
  return std::vector<int32_t>(v.begin() + from, v.begin() + to);
}
std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// --- raw calls (bytes a protobuf library would not serialise) ---

grpc::Status RawUnary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                      const std::string& wire) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(kWait));
  grpc::Slice slice(wire);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::Status status;
  absl::Notification done;
  generic.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  if (!done.WaitForNotificationWithTimeout(kWait + absl::Seconds(10))) {
    ctx.TryCancel();
    done.WaitForNotification();
  }
  return status;
}

// A server-streaming call with one raw request message; its status.
grpc::Status RawServerStreaming(const std::shared_ptr<grpc::Channel>& channel,
                                const std::string& method, const std::string& wire) {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(kWait));
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(&ctx, method, &cq);
  void* tag = nullptr;
  bool ok = false;
  call->StartCall(reinterpret_cast<void*>(1));
  cq.Next(&tag, &ok);
  grpc::Slice slice(wire);
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  cq.Next(&tag, &ok);
  call->WritesDone(reinterpret_cast<void*>(3));
  cq.Next(&tag, &ok);
  grpc::ByteBuffer response;
  do {  // read until the stream ends
    call->Read(&response, reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
  } while (ok);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

// --- the fixture ---

class GenerationServiceTest : public ::testing::Test {
 protected:
  void StartRouter(GenerationOptions generation = GenerationOptions()) {
    RouterOptions o;
    o.model_dir = ModelDir();
    o.block_size = kBlock;
    o.router_id = "router-under-test";
    // Generous: a loaded machine must not expire a healthy fake.
    o.heartbeat_timeout = absl::Seconds(120);
    o.generation = std::move(generation);
    o.metrics = metrics_;
    absl::StatusOr<std::unique_ptr<Router>> r = Router::Start(o);
    ASSERT_TRUE(r.ok()) << r.status();
    router_ = *std::move(r);
    channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Generation::NewStub(channel_);
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", router_->port()); }
  const ModelContext& model() const { return router_->model(); }
  const tokenizer::Tokenizer& tok() const { return *router_->model().tokenizer; }

  // A fake registered with the router, alive there when this returns.
  FakeWorker* AddWorker(const std::string& id, Script script,
                        v1::WorkerRole role = v1::WORKER_ROLE_DECODE) {
    const int before = router_->registry().Alive(role);
    workers_.push_back(std::make_unique<FakeWorker>(id, std::move(script)));
    FakeWorker* w = workers_.back().get();
    EXPECT_TRUE(w->ok());
    absl::Status st = w->Register(address(), role, model().model_id);
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_TRUE(WaitFor([&] { return router_->registry().Alive(role) == before + 1; }))
        << router_->registry().List().ShortDebugString();
    return w;
  }

  int SlotOf(const std::string& id) const {
    FleetView v = router_->registry().View({});
    for (const auto* list : {&v.decode, &v.prefill}) {
      for (const WorkerLoadView& w : *list) {
        if (w.id == id) return w.slot;
      }
    }
    return -1;
  }

  Result Generate(const v1::GenerateRequest& request, absl::Duration timeout = kWait) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(timeout));
    auto reader = stub_->Generate(&ctx, request);
    return ReadAll(reader.get());
  }

  // Text the client must see for `ids` generated after `prompt`.
  std::string TextOf(const std::vector<int32_t>& prompt, const std::vector<int32_t>& ids) const {
    tokenizer::StreamingDetokenizer d(&tok(), /*skip_special_tokens=*/true);
    d.SetPrefix(prompt);
    std::string s;
    for (int32_t id : ids) s += d.Push(id);
    return s + d.Flush();
  }

  std::vector<int32_t> Prompt() const { return tok().Encode("Tell me a story about a cat.", true); }
  // Output tokens: real text, no special token (so no eos among them).
  std::vector<int32_t> Output() const {
    std::vector<int32_t> ids =
        tok().Encode(" Once upon a time there was a little robot who loved to read books", false);
    for (int32_t id : ids) {
      EXPECT_FALSE(tok().IsSpecial(id)) << id;
      for (int eos : model().config.eos_token_ids) EXPECT_NE(id, eos);
    }
    EXPECT_GE(ids.size(), 12u);
    return ids;
  }

  // kvrelay_router_* in the router's registry (see Metric).
  double M(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    return Metric(*metrics_, name, labels);
  }
  double Requests(const std::string& code) const {
    return M("kvrelay_router_requests_total", {{"code", code}});
  }

  std::shared_ptr<prometheus::Registry> metrics_ = std::make_shared<prometheus::Registry>();
  // Declared first, destroyed last: the router goes before its workers.
  std::vector<std::unique_ptr<FakeWorker>> workers_;
  std::unique_ptr<Router> router_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

TEST_F(GenerationServiceTest, StreamsTheWorkersTokensWithUsageAndRoute) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 6);
  FakeWorker* a = AddWorker("fake-a", Complete(out, "length"));
  const std::vector<int32_t> prompt = Prompt();
  v1::GenerateRequest req = Request(prompt, 6);
  req.set_request_id("my-request");
  req.mutable_sampling()->add_stop("never-seen-stop-string");
  const Result r = Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.first_request_id, "my-request");
  EXPECT_THAT(r.tokens, ElementsAreArray(out));
  EXPECT_EQ(r.text, TextOf(prompt, out));
  EXPECT_EQ(r.finals, 1);
  EXPECT_TRUE(r.final_on_last);
  EXPECT_EQ(r.final.finish_reason(), "length");
  EXPECT_EQ(r.final.usage().prompt_tokens(), static_cast<int64_t>(prompt.size()));
  EXPECT_EQ(r.final.usage().completion_tokens(), 6);
  EXPECT_EQ(r.final.route().decode_worker(), "fake-a");
  EXPECT_EQ(r.final.route().migrations(), 0);
  EXPECT_EQ(r.final.route().prefill_mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_GE(r.final.timing().total_seconds(), r.final.timing().ttft_seconds());

  // What the worker got.
  const std::vector<v1::DecodeRequest> got = a->requests();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].request_id(), "my-request");
  EXPECT_THAT(got[0].prompt_token_ids(), ElementsAreArray(prompt));
  EXPECT_EQ(got[0].resumed_tokens(), 0);
  EXPECT_EQ(got[0].plan().mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_EQ(got[0].sampling().max_tokens(), 6u);
  EXPECT_EQ(got[0].sampling().stop_size(), 0) << "stop strings are the router's";
}

TEST_F(GenerationServiceTest, MetricsCountRequestsByCodeLatenciesAndTokens) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  // Every family is there from the start (label values known up front at zero).
  EXPECT_EQ(Requests("OK"), 0);
  EXPECT_EQ(Requests("INVALID_ARGUMENT"), 0);
  EXPECT_EQ(Requests("RESOURCE_EXHAUSTED"), 0);
  EXPECT_EQ(M("kvrelay_router_ttft_seconds"), 0);
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "remote"}}), 0);
  EXPECT_EQ(M("kvrelay_router_requests_running"), 0);
  EXPECT_EQ(M("kvrelay_router_queue_depth"), 0);

  const std::vector<int32_t> out = Slice(Output(), 0, 6);
  AddWorker("fake-a", Complete(out, "length"));
  const std::vector<int32_t> prompt = Prompt();
  const Result ok = Generate(Request(prompt, 6));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  const Result bad = Generate(v1::GenerateRequest());  // no input
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Counted before the client saw the status.
  EXPECT_EQ(Requests("OK"), 1);
  EXPECT_EQ(Requests("INVALID_ARGUMENT"), 1);
  EXPECT_EQ(Requests("UNAVAILABLE"), 0);
  EXPECT_EQ(M("kvrelay_router_ttft_seconds"), 1);
  EXPECT_EQ(M("kvrelay_router_request_duration_seconds"), 1) << "refused calls are not timed";
  EXPECT_EQ(M("kvrelay_router_queue_seconds"), 1);
  EXPECT_EQ(M("kvrelay_router_inter_token_seconds"), 5) << "one per gap between 6 tokens";
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), static_cast<double>(prompt.size()));
  EXPECT_EQ(M("kvrelay_router_generated_tokens_total"), 6);
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "local"}}), 1);
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "remote"}}), 0);
  EXPECT_EQ(M("kvrelay_router_migrations_total"), 0);
  EXPECT_TRUE(WaitFor([&] { return M("kvrelay_router_requests_running") == 0; }));
  EXPECT_EQ(M("kvrelay_router_queue_depth"), 0);
  // The histograms' sums agree with the final message.
  for (const prometheus::MetricFamily& f : metrics_->Collect()) {
    if (f.name == "kvrelay_router_ttft_seconds") {
      ASSERT_EQ(f.metric.size(), 1u);
      EXPECT_NEAR(f.metric[0].histogram.sample_sum, ok.final.timing().ttft_seconds(), 1e-6);
    }
    if (f.name == "kvrelay_router_inter_token_seconds") {
      ASSERT_EQ(f.metric.size(), 1u);
      EXPECT_NEAR(f.metric[0].histogram.sample_sum, 5 * ok.final.timing().mean_itl_seconds(), 1e-6);
    }
  }
}

// The prefix hit rate three ways over the same prompts: available anywhere in the fleet
// (the index), predicted for the chosen worker (the index), delivered (the worker's
// usage.cached_tokens).
TEST_F(GenerationServiceTest, MetricsCountThePrefixHitRateThreeWays) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  FakeWorker* a = AddWorker("fake-a", CachingComplete(model().model_id, Slice(Output(), 0, 2)));
  std::vector<int32_t> prompt;  // 3 full blocks and 5 tokens more
  for (int i = 0; i < 3 * kBlock + 5; ++i) prompt.push_back(30 + (i * 11) % 250);
  const double p = static_cast<double>(prompt.size());

  // Cold: nothing cached anywhere.
  Result r = Generate(Request(prompt, 2));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.usage().cached_tokens(), 0);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), p);
  EXPECT_EQ(M("kvrelay_router_prefix_available_tokens_total"), 0);
  EXPECT_EQ(M("kvrelay_router_prefix_predicted_tokens_total"), 0);
  EXPECT_EQ(M("kvrelay_router_prefix_delivered_tokens_total"), 0);

  // The worker cached the prompt's blocks; once its events reached the index ...
  const std::vector<uint64_t> hashes =
      kvcache::BlockHashes(kvcache::RootHash(model().model_id, ""), prompt, kBlock);
  ASSERT_EQ(hashes.size(), 3u);
  const int slot = SlotOf("fake-a");
  ASSERT_GE(slot, 0);
  ASSERT_TRUE(WaitFor([&] { return router_->registry().View(hashes).overlaps[slot] == 3; }))
      << router_->registry().List().ShortDebugString();
  EXPECT_GE(M("kvrelay_router_kv_events_total"), 1);
  EXPECT_EQ(M("kvrelay_router_index_blocks"), 3);

  // ... the same prompt is a hit three ways.
  r = Generate(Request(prompt, 2));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.usage().cached_tokens(), 3 * kBlock);
  EXPECT_EQ(r.final.route().predicted_cached_tokens(), 3 * kBlock);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), 2 * p);
  EXPECT_EQ(M("kvrelay_router_prefix_available_tokens_total"), 3 * kBlock);
  EXPECT_EQ(M("kvrelay_router_prefix_predicted_tokens_total"), 3 * kBlock);
  EXPECT_EQ(M("kvrelay_router_prefix_delivered_tokens_total"), 3 * kBlock);
  EXPECT_EQ(Requests("OK"), 2);
  EXPECT_EQ(a->calls(), 2);

  // A prompt refused before routing counts in none of them.
  v1::GenerateRequest unknown = Request(prompt, 2);
  unknown.set_model("no-such-model");
  EXPECT_EQ(Generate(unknown).status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Requests("NOT_FOUND"), 1);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), 2 * p);
}

TEST_F(GenerationServiceTest, NoDecodeWorkerIsUnavailable) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const Result r = Generate(Request(Prompt(), 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_EQ(Requests("UNAVAILABLE"), 1);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), 0) << "not routed";
  EXPECT_EQ(M("kvrelay_router_request_duration_seconds"), 1);
  EXPECT_EQ(M("kvrelay_router_ttft_seconds"), 0);
}

TEST_F(GenerationServiceTest, AdmissionQueueIsBounded) {
  GenerationOptions g;
  g.max_running = 1;
  g.max_queued = 1;
  ASSERT_NO_FATAL_FAILURE(StartRouter(g));
  const std::vector<int32_t> out = Slice(Output(), 0, 3);
  FakeWorker* a = AddWorker("fake-a", AfterRelease(Complete(out)));

  v1::GenerateRequest first = Request(Prompt(), 3);
  first.set_request_id("first");
  AsyncGenerate running(stub_.get(), first);
  ASSERT_TRUE(a->WaitCalls(1));  // the only runner serves it (blocked in the worker)

  // Two more: one waits in the queue, the other finds it full. (They travel on their own
  // threads, so which of the two reaches the queue first is not ordered.)
  v1::GenerateRequest second = Request(Prompt(), 3), third = Request(Prompt(), 3);
  second.set_request_id("second");
  third.set_request_id("third");
  AsyncGenerate queued_or_refused_1(stub_.get(), second);
  AsyncGenerate queued_or_refused_2(stub_.get(), third);
  // The refused one ends at once; the admitted one waits for the runner.
  std::vector<const Result*> refused, admitted;
  std::atomic<int> ended{0};
  std::thread t1([&] {
    queued_or_refused_1.Join();
    ++ended;
  });
  std::thread t2([&] {
    queued_or_refused_2.Join();
    ++ended;
  });
  EXPECT_TRUE(WaitFor([&] { return ended.load() >= 1; })) << "a full queue must refuse at once";
  EXPECT_EQ(a->calls(), 1) << "the queued request must not run while the runner is busy";
  a->Release();
  t1.join();
  t2.join();
  for (const Result* r : {&queued_or_refused_1.Join(), &queued_or_refused_2.Join()}) {
    (r->status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ? refused : admitted)
        .push_back(r);
  }
  ASSERT_EQ(refused.size(), 1u);
  ASSERT_EQ(admitted.size(), 1u);
  EXPECT_THAT(refused[0]->status.error_message(), HasSubstr("queue"));
  EXPECT_TRUE(refused[0]->tokens.empty());
  EXPECT_TRUE(admitted[0]->status.ok()) << admitted[0]->status.error_message();
  EXPECT_THAT(admitted[0]->tokens, ElementsAreArray(out));

  const Result& r1 = running.Join();
  EXPECT_TRUE(r1.status.ok()) << r1.status.error_message();
  EXPECT_THAT(r1.tokens, ElementsAreArray(out));
  // The worker saw the first request, then the admitted one; never the refused one.
  const std::vector<v1::DecodeRequest> got = a->requests();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].request_id(), "first");
  EXPECT_EQ(got[1].request_id(), admitted[0]->first_request_id);
  EXPECT_NE(got[1].request_id(), refused[0]->first_request_id);
  EXPECT_EQ(Requests("OK"), 2);
  EXPECT_EQ(Requests("RESOURCE_EXHAUSTED"), 1);
  EXPECT_EQ(M("kvrelay_router_queue_seconds"), 2);
  EXPECT_EQ(M("kvrelay_router_request_duration_seconds"), 2);
}

TEST_F(GenerationServiceTest, MigratesToAnotherWorkerWhenItsWorkerFails) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 8);
  FakeWorker* a = AddWorker(
      "fake-a", AfterRelease(FailAfter(
                    Slice(out, 0, 3), grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake a died"))));
  const std::vector<int32_t> prompt = Prompt();
  v1::GenerateRequest req = Request(prompt, 8);
  req.mutable_sampling()->set_seed(1234);
  AsyncGenerate call(stub_.get(), req);
  ASSERT_TRUE(a->WaitCalls(1));
  // B only now, so A was the only choice.
  FakeWorker* b = AddWorker("fake-b", Complete(Slice(out, 3, 8), "length"));
  a->Release();
  const Result& r = call.Join();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_THAT(r.tokens, ElementsAreArray(out)) << "every token once, in order";
  EXPECT_EQ(r.text, TextOf(prompt, out));
  EXPECT_EQ(r.finals, 1);
  EXPECT_EQ(r.final.finish_reason(), "length");
  EXPECT_EQ(r.final.usage().completion_tokens(), 8);
  EXPECT_EQ(r.final.usage().prompt_tokens(), static_cast<int64_t>(prompt.size()));
  EXPECT_EQ(r.final.route().migrations(), 1);
  EXPECT_EQ(r.final.route().decode_worker(), "fake-b");

  ASSERT_EQ(b->calls(), 1);
  const v1::DecodeRequest moved = b->requests()[0];
  EXPECT_THAT(moved.prompt_token_ids(), ElementsAreArray(Concat(prompt, Slice(out, 0, 3))));
  EXPECT_EQ(moved.resumed_tokens(), 3);
  EXPECT_EQ(moved.plan().mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_EQ(moved.request_id(), a->requests()[0].request_id());
  EXPECT_EQ(moved.sampling().seed(), 1234u);
  EXPECT_EQ(moved.sampling().max_tokens(), 8u) << "resumed tokens count as output";
  EXPECT_EQ(a->calls(), 1);
  EXPECT_EQ(M("kvrelay_router_migrations_total"), 1);
  EXPECT_EQ(Requests("OK"), 1);
  EXPECT_EQ(Requests("UNAVAILABLE"), 0);
  EXPECT_EQ(M("kvrelay_router_generated_tokens_total"), 8) << "every token once";
  EXPECT_EQ(M("kvrelay_router_inter_token_seconds"), 7);
  EXPECT_EQ(M("kvrelay_router_ttft_seconds"), 1);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), static_cast<double>(prompt.size()))
      << "the migrated prompt is not counted again";
}

TEST_F(GenerationServiceTest, MigratesWhenTheWorkersServerGoesAway) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 6);
  // A streams two tokens, then stops responding; its process then dies (server gone).
  FakeWorker* a = AddWorker("fake-a", StreamUntilCancelled(Slice(out, 0, 2)));
  const std::vector<int32_t> prompt = Prompt();
  AsyncGenerate call(stub_.get(), Request(prompt, 6));
  ASSERT_TRUE(a->WaitCalls(1));
  // A's two tokens reached the client (so the router has them) before A goes away.
  ASSERT_TRUE(call.WaitTokens(2));
  FakeWorker* b = AddWorker("fake-b", Complete(Slice(out, 2, 6)));
  a->Kill();
  const Result& r = call.Join();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_THAT(r.tokens, ElementsAreArray(out));
  EXPECT_EQ(r.text, TextOf(prompt, out));
  EXPECT_EQ(r.final.route().migrations(), 1);
  EXPECT_EQ(r.final.route().decode_worker(), "fake-b");
  EXPECT_EQ(r.final.usage().completion_tokens(), 6);
  ASSERT_EQ(b->calls(), 1);
  // The router took A's tokens from what it had streamed, whatever A got to write.
  const v1::DecodeRequest moved = b->requests()[0];
  const int resumed = moved.resumed_tokens();
  EXPECT_EQ(resumed, 2);
  EXPECT_THAT(moved.prompt_token_ids(), ElementsAreArray(Concat(prompt, Slice(out, 0, 2))));
}

TEST_F(GenerationServiceTest, MigrationLimitZeroFailsNamingTheWorker) {
  GenerationOptions g;
  g.migration_limit = 0;
  ASSERT_NO_FATAL_FAILURE(StartRouter(g));
  const std::vector<int32_t> out = Slice(Output(), 0, 8);
  FakeWorker* a = AddWorker(
      "fake-a", AfterRelease(FailAfter(
                    Slice(out, 0, 3), grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake a died"))));
  AsyncGenerate call(stub_.get(), Request(Prompt(), 8));
  ASSERT_TRUE(a->WaitCalls(1));
  FakeWorker* b = AddWorker("fake-b", Complete(Slice(out, 3, 8)));
  a->Release();
  const Result& r = call.Join();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("fake-a"));
  EXPECT_THAT(r.status.error_message(), HasSubstr("fake a died"));
  EXPECT_THAT(r.tokens, ElementsAreArray(Slice(out, 0, 3))) << "what was streamed stays sent";
  EXPECT_EQ(r.finals, 0);
  EXPECT_EQ(b->calls(), 0);
  EXPECT_EQ(Requests("UNAVAILABLE"), 1);
  EXPECT_EQ(M("kvrelay_router_migrations_total"), 0);
  EXPECT_EQ(M("kvrelay_router_generated_tokens_total"), 3);
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "local"}}), 0) << "no final message";
}

TEST_F(GenerationServiceTest, MigrationStopsWhenNoOtherWorkerIsLeft) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 8);
  AddWorker("fake-a", FailAfter(Slice(out, 0, 2),
                                grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake a died")));
  const Result r = Generate(Request(Prompt(), 8));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("fake-a"));
  EXPECT_THAT(r.tokens, ElementsAreArray(Slice(out, 0, 2)));
}

// A worker that fails right after the request's last token: the output is complete, the
// router finishes it itself and calls no other worker.
TEST_F(GenerationServiceTest, CompleteOutputIsFinishedByTheRouterAfterAFailure) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 4);
  const std::vector<int>& eos = model().config.eos_token_ids;
  ASSERT_FALSE(eos.empty()) << "the tiny model has an eos id";
  const grpc::Status died(grpc::StatusCode::UNAVAILABLE, "fake died");
  struct Case {
    std::string name;
    std::vector<int32_t> streamed;
    bool ignore_eos;
    std::vector<int32_t> stop_token_ids;
    std::string finish;  // empty: must migrate
  };
  const std::vector<Case> cases = {
      {"max_tokens-th token", out, false, {}, "length"},
      {"eos", {out[0], out[1], eos[0]}, false, {}, "stop"},
      {"stop token id", {out[0], out[1]}, false, {out[1]}, "stop"},
      {"eos ignored", {out[0], eos[0]}, true, {}, ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    workers_.clear();
    ASSERT_TRUE(WaitFor([&] { return router_->registry().Alive(v1::WORKER_ROLE_DECODE) == 0; }));
    FakeWorker* a = AddWorker("fake-a-" + absl::StrCat(&c - &cases[0]),
                              AfterRelease(FailAfter(c.streamed, died)));
    v1::GenerateRequest req = Request(Prompt(), 4);
    req.mutable_sampling()->set_ignore_eos(c.ignore_eos);
    for (int32_t id : c.stop_token_ids) req.mutable_sampling()->add_stop_token_ids(id);
    AsyncGenerate call(stub_.get(), req);
    ASSERT_TRUE(a->WaitCalls(1));
    FakeWorker* b = AddWorker("fake-b-" + absl::StrCat(&c - &cases[0]),
                              Complete(Slice(out, c.streamed.size(), 4)));
    a->Release();
    const Result& r = call.Join();
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    if (c.finish.empty()) {
      EXPECT_EQ(b->calls(), 1);
      EXPECT_EQ(r.final.route().migrations(), 1);
      EXPECT_EQ(r.final.route().decode_worker(), b->id());
      EXPECT_EQ(r.final.usage().completion_tokens(), 4);
      continue;
    }
    EXPECT_EQ(b->calls(), 0);
    EXPECT_THAT(r.tokens, ElementsAreArray(c.streamed));
    EXPECT_EQ(r.final.finish_reason(), c.finish);
    EXPECT_EQ(r.final.usage().completion_tokens(), static_cast<int64_t>(c.streamed.size()));
    EXPECT_EQ(r.final.route().decode_worker(), a->id());
  }
}

// The request above never moved to another worker, so its route must say so.
TEST_F(GenerationServiceTest, RequestFinishedByTheRouterReportsNoMigration) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 4);
  AddWorker("fake-a", FailAfter(out, grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake died")));
  const Result r = Generate(Request(Prompt(), 4));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.finish_reason(), "length");
  EXPECT_EQ(r.final.route().decode_worker(), "fake-a");
  EXPECT_EQ(r.final.route().migrations(), 0)
      << "a request finished by the router after its worker failed reports a migration";
}

// Same with migration_limit 0: the output is complete, nothing needs to migrate, and a
// client must not get an error (it would retry a finished request).
TEST_F(GenerationServiceTest, CompleteOutputIsFinishedEvenWithMigrationLimitZero) {
  GenerationOptions g;
  g.migration_limit = 0;
  ASSERT_NO_FATAL_FAILURE(StartRouter(g));
  const std::vector<int32_t> out = Slice(Output(), 0, 4);
  AddWorker("fake-a", FailAfter(out, grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake died")));
  const Result r = Generate(Request(Prompt(), 4));
  EXPECT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
  EXPECT_THAT(r.tokens, ElementsAreArray(out));
  EXPECT_EQ(r.final.finish_reason(), "length");
}

TEST_F(GenerationServiceTest, RequestErrorsOfTheWorkerArePassedThrough) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 2);
  // Both workers would refuse it: however the router picks, exactly one is called.
  const grpc::Status refused(grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_k is odd (fake)");
  FakeWorker* a = AddWorker("fake-a", FailAfter(out, refused));
  FakeWorker* b = AddWorker("fake-b", FailAfter(out, refused));
  const Result r = Generate(Request(Prompt(), 8));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(r.status.error_message(), "sampling.top_k is odd (fake)");
  EXPECT_EQ(a->calls() + b->calls(), 1) << "a request error is not migrated";
}

// A decode worker that refuses for load (its queue is full, its pool too small) before
// streaming anything: the request goes to another one (not counted as a migration); when
// every one refuses, the client gets RESOURCE_EXHAUSTED.
TEST_F(GenerationServiceTest, AWorkerRefusingForLoadIsSkipped) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 3);
  const grpc::Status full(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "decode engine queue is full (fake)");
  FakeWorker* a = AddWorker("fake-a", FailAfter({}, full));
  FakeWorker* b = AddWorker("fake-b", FailAfter({}, full));
  Result r = Generate(Request(Prompt(), 3));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(r.status.error_message(), "decode engine queue is full (fake)");
  EXPECT_EQ(a->calls(), 1);
  EXPECT_EQ(b->calls(), 1);
  // One of them has room again.
  b->SetScript(Complete(out));
  r = Generate(Request(Prompt(), 3));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, out);
  EXPECT_EQ(r.final.route().decode_worker(), "fake-b");
  EXPECT_EQ(r.final.route().migrations(), 0);
}

TEST_F(GenerationServiceTest, StopStringAcrossTokensCutsTheTextAndCancelsTheWorker) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> prompt = Prompt();
  const std::vector<int32_t> out = Output();
  // Each token's text (in the prompt's context), to pick a stop string spanning the
  // boundary between two tokens, well into the text: the end of one token's text and
  // the start of the next one's (up to two characters of each).
  tokenizer::StreamingDetokenizer d(&tok(), true);
  d.SetPrefix(prompt);
  std::vector<std::string> pieces;
  for (int32_t id : out) pieces.push_back(d.Push(id));
  const std::string full = TextOf(prompt, out);
  auto ascii = [](const std::string& t) {
    for (unsigned char ch : t) {
      if (ch >= 0x80) return false;
    }
    return true;
  };
  std::string stop;
  size_t start = 0, second = 0;  // where the stop string starts; the token completing it
  size_t end = 0;                // end of pieces[0..i] in `full`
  for (size_t i = 0; i + 2 < out.size() && stop.empty(); ++i) {
    end += pieces[i].size();
    if (end < 20 || pieces[i].empty() || pieces[i + 1].empty()) continue;
    const std::string left =
        pieces[i].substr(pieces[i].size() - std::min<size_t>(2, pieces[i].size()));
    const std::string right = pieces[i + 1].substr(0, 2);
    const std::string s = left + right;
    if (!ascii(s) || full.find(s) != end - left.size()) continue;  // first occurrence here
    stop = s;
    start = end - left.size();
    second = i + 1;
  }
  ASSERT_FALSE(stop.empty()) << "no two-token stop string in '" << full << "'";
  SCOPED_TRACE(absl::StrCat("stop '", stop, "' in '", full, "'"));

  FakeWorker* a = AddWorker("fake-a", StreamUntilCancelled(out));
  v1::GenerateRequest req = Request(prompt, 100);
  req.mutable_sampling()->add_stop("no-such-stop");
  req.mutable_sampling()->add_stop(stop);
  const Result r = Generate(req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, full.substr(0, start));
  EXPECT_EQ(r.final.finish_reason(), "stop");
  EXPECT_EQ(r.final.stop_reason(), stop);
  EXPECT_THAT(r.tokens, ElementsAreArray(Slice(out, 0, second + 1)))
      << "tokens up to the one completing the stop string, none after";
  EXPECT_EQ(r.final.usage().completion_tokens(), static_cast<int64_t>(second + 1));
  EXPECT_TRUE(a->WaitCancelledCalls(1)) << "the worker's call must be cancelled";
  EXPECT_EQ(a->calls(), 1);
}

TEST_F(GenerationServiceTest, ClientCancelReachesTheWorker) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  const std::vector<int32_t> out = Slice(Output(), 0, 2);
  FakeWorker* a = AddWorker("fake-a", StreamUntilCancelled(out));
  grpc::ClientContext ctx;
  ctx.set_deadline(In(kWait));
  auto reader = stub_->Generate(&ctx, Request(Prompt(), 100));
  std::vector<int32_t> got;
  v1::GenerateResponse m;
  while (got.size() < out.size() && reader->Read(&m)) {
    got.insert(got.end(), m.token_ids().begin(), m.token_ids().end());
  }
  EXPECT_THAT(got, ElementsAreArray(out));
  ctx.TryCancel();
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(a->WaitCancelledCalls(1)) << "the client's cancel must reach the worker";
  EXPECT_TRUE(WaitFor([&] { return Requests("CANCELLED") == 1; }));
  // The router released what it had noted on the worker.
  EXPECT_TRUE(WaitFor([&] {
    FleetView v = router_->registry().View({});
    return v.decode.size() == 1 && v.decode[0].active_blocks == 0;
  }));
}

TEST_F(GenerationServiceTest, ClientDeadlineIsForwardedToTheWorker) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  FakeWorker* a = AddWorker("fake-a", Complete(Slice(Output(), 0, 1)));
  // No deadline: none on the worker's call either.
  {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, Request(Prompt(), 1));
    const Result r = ReadAll(reader.get());
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  }
  ASSERT_EQ(a->deadlines().size(), 1u);
  EXPECT_GT(a->deadlines()[0], In(absl::Hours(24 * 365)));
  // A deadline: the worker's is the client's (gRPC sends it as a timeout, so each hop's
  // receiver may see it a little later than its sender: allow a second).
  const auto client_deadline = In(absl::Seconds(90));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(client_deadline);
    auto reader = stub_->Generate(&ctx, Request(Prompt(), 1));
    const Result r = ReadAll(reader.get());
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  }
  ASSERT_EQ(a->deadlines().size(), 2u);
  const auto worker_deadline = a->deadlines()[1];
  EXPECT_LE(worker_deadline, client_deadline + std::chrono::seconds(1));
  EXPECT_GE(worker_deadline, client_deadline - std::chrono::seconds(30));

  // A deadline the worker cannot meet: its call is cancelled when it passes.
  a->SetScript(StreamUntilCancelled(Slice(Output(), 0, 1)));
  const Result r = Generate(Request(Prompt(), 100), absl::Seconds(2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  EXPECT_TRUE(a->WaitCancelledCalls(1));
  EXPECT_TRUE(WaitFor([&] { return Requests("DEADLINE_EXCEEDED") == 1; }));
  EXPECT_EQ(Requests("OK"), 2);
  EXPECT_EQ(Requests("CANCELLED"), 0);
}

TEST_F(GenerationServiceTest, RoutePlanIsRemoteOnlyForLongUncachedPromptsWithAPrefillWorker) {
  GenerationOptions g;
  g.scheduler.local_prefill_max_tokens = 2 * kBlock;
  ASSERT_NO_FATAL_FAILURE(StartRouter(g));
  const std::vector<int32_t> one = Slice(Output(), 0, 1);
  FakeWorker* d1 = AddWorker("fake-d1", Complete(one));
  FakeWorker* d2 = AddWorker("fake-d2", Complete(one));
  std::vector<int32_t> long_prompt;  // 3 full blocks, >= local_prefill_max_tokens
  for (int i = 0; i < 3 * kBlock; ++i) long_prompt.push_back(20 + (i * 7) % 300);
  const std::vector<int32_t> short_prompt = Slice(long_prompt, 0, 8);

  // Sends `prompt`; the DecodeRequest a decode fake got for it, and the final.
  auto run = [&](const std::vector<int32_t>& prompt, const std::string& id, v1::DecodeRequest* got,
                 v1::Final* final) {
    v1::GenerateRequest req = Request(prompt, 1);
    req.set_request_id(id);
    const Result r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    *final = r.final;
    int found = 0;
    for (FakeWorker* w : {d1, d2}) {
      for (const v1::DecodeRequest& dr : w->requests()) {
        if (dr.request_id() == id) {
          *got = dr;
          ++found;
        }
      }
    }
    ASSERT_EQ(found, 1);
    EXPECT_THAT(got->prompt_token_ids(), ElementsAreArray(prompt));
  };
  v1::DecodeRequest dr;
  v1::Final f;

  // No prefill worker: local, however long.
  ASSERT_NO_FATAL_FAILURE(run(long_prompt, "long-no-p", &dr, &f));
  EXPECT_EQ(dr.plan().mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_TRUE(dr.plan().prefill_address().empty());
  ASSERT_NO_FATAL_FAILURE(run(short_prompt, "short-no-p", &dr, &f));
  EXPECT_EQ(dr.plan().mode(), v1::PREFILL_MODE_LOCAL);

  // A prefill worker (it serves nothing here: the decode worker gets the plan).
  FakeWorker* p = AddWorker("fake-p", nullptr, v1::WORKER_ROLE_PREFILL);
  ASSERT_NO_FATAL_FAILURE(run(long_prompt, "long-p", &dr, &f));
  EXPECT_EQ(dr.plan().mode(), v1::PREFILL_MODE_REMOTE);
  EXPECT_EQ(dr.plan().prefill_address(), p->address());
  EXPECT_EQ(f.route().prefill_mode(), v1::PREFILL_MODE_REMOTE);
  EXPECT_EQ(f.route().prefill_worker(), "fake-p");
  ASSERT_NO_FATAL_FAILURE(run(short_prompt, "short-p", &dr, &f));
  EXPECT_EQ(dr.plan().mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_TRUE(dr.plan().prefill_address().empty());
  EXPECT_TRUE(f.route().prefill_worker().empty());
  EXPECT_EQ(p->calls(), 0);

  // d1 holds the long prompt's first two blocks: 16 tokens uncached there, below the
  // threshold, so d1 prefills locally (and is chosen for its overlap).
  const std::vector<uint64_t> hashes =
      kvcache::BlockHashes(kvcache::RootHash(model().model_id, ""), long_prompt, kBlock);
  absl::StatusOr<std::vector<int32_t>> blocks = d1->cache().Allocate(2);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  d1->cache().Store(std::nullopt, *blocks, absl::MakeConstSpan(hashes).subspan(0, 2),
                    absl::MakeConstSpan(long_prompt).subspan(0, 2 * kBlock));
  d1->cache().Release(*blocks);
  const int d1_slot = SlotOf("fake-d1");
  ASSERT_GE(d1_slot, 0);
  ASSERT_TRUE(WaitFor([&] { return router_->registry().View(hashes).overlaps[d1_slot] == 2; }))
      << router_->registry().List().ShortDebugString();
  const int d1_calls = d1->calls();
  ASSERT_NO_FATAL_FAILURE(run(long_prompt, "long-cached", &dr, &f));
  EXPECT_EQ(d1->calls(), d1_calls + 1) << "the worker holding the prefix is chosen";
  EXPECT_EQ(dr.plan().mode(), v1::PREFILL_MODE_LOCAL);
  EXPECT_EQ(f.route().decode_worker(), "fake-d1");
  EXPECT_EQ(f.route().predicted_cached_tokens(), 2 * kBlock);
  EXPECT_EQ(p->calls(), 0);
  // As done (the fakes report the plan's mode): one remote of five.
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "remote"}}), 1);
  EXPECT_EQ(M("kvrelay_router_prefill_total", {{"mode", "local"}}), 4);
  EXPECT_EQ(M("kvrelay_router_prefix_predicted_tokens_total"), 2 * kBlock);
  EXPECT_EQ(M("kvrelay_router_prefix_available_tokens_total"), 2 * kBlock);
  EXPECT_EQ(M("kvrelay_router_prefix_delivered_tokens_total"), 0) << "the fakes report none";
}

TEST_F(GenerationServiceTest, TokenizeAndListModels) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  {
    v1::TokenizeRequest req;
    req.set_prompt("Hello there, kvrelay!");
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(kWait));
    grpc::Status st = stub_->Tokenize(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_THAT(resp.token_ids(), ElementsAreArray(tok().Encode("Hello there, kvrelay!", true)));
    EXPECT_EQ(resp.max_context(), model().config.max_position_embeddings);
  }
  {
    v1::TokenizeRequest req;
    req.set_prompt("Hello there, kvrelay!");
    req.set_add_special_tokens(false);
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(kWait));
    grpc::Status st = stub_->Tokenize(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_THAT(resp.token_ids(), ElementsAreArray(tok().Encode("Hello there, kvrelay!", false)));
  }
  {
    v1::TokenizeRequest req;
    v1::ChatMessage* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content("hi");
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(kWait));
    grpc::Status st = stub_->Tokenize(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_GT(resp.token_ids_size(), 0);
  }
  {
    v1::TokenizeRequest req;  // no input
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(kWait));
    grpc::Status st = stub_->Tokenize(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  }

  auto list = [&] {
    v1::ListModelsResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(kWait));
    grpc::Status st = stub_->ListModels(&ctx, v1::ListModelsRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.models_size(), 1);
    return resp.models_size() == 1 ? resp.models(0) : v1::ModelInfo();
  };
  v1::ModelInfo info = list();
  EXPECT_EQ(info.id(), model().model_id);
  EXPECT_EQ(info.id(), "llama_gqa") << "default: the folder's name";
  EXPECT_EQ(info.max_context(), model().config.max_position_embeddings);
  EXPECT_EQ(info.block_size(), kBlock);
  EXPECT_EQ(info.decode_workers(), 0);
  EXPECT_EQ(info.prefill_workers(), 0);
  EXPECT_EQ(info.chat_template(), tokenizer::ChatFormatName(model().chat_format));
  AddWorker("fake-d", nullptr);
  AddWorker("fake-p", nullptr, v1::WORKER_ROLE_PREFILL);
  info = list();
  EXPECT_EQ(info.decode_workers(), 1);
  EXPECT_EQ(info.prefill_workers(), 1);
}

TEST_F(GenerationServiceTest, TextThatIsNotUtf8IsInvalidArgument) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  FakeWorker* a = AddWorker("fake-a", Complete(Slice(Output(), 0, 1)));
  const std::string bad =
      "\xff\xfe"
      "a";
  // GenerateRequest.prompt is field 3, TokenizeRequest.prompt field 2 (length-delimited).
  std::string generate_wire = {0x1a, static_cast<char>(bad.size())};
  generate_wire += bad;
  std::string tokenize_wire = {0x12, static_cast<char>(bad.size())};
  tokenize_wire += bad;
  grpc::Status st = RawServerStreaming(channel_, "/kvrelay.v1.Generation/Generate", generate_wire);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(),
              HasSubstr("field 'prompt' is not valid UTF-8 (byte offset 0 of its value)"));
  st = RawUnary(channel_, "/kvrelay.v1.Generation/Tokenize", tokenize_wire);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("field 'prompt' is not valid UTF-8"));
  // Chat content: the field's path and the offset inside it.
  v1::GenerateRequest chat;
  chat.mutable_chat()->add_messages()->set_role("user");
  chat.mutable_chat()->mutable_messages(0)->set_content("fine");
  chat.mutable_chat()->add_messages()->set_role("assistant");
  chat.mutable_chat()->mutable_messages(1)->set_content("ok \xc3\xa9 then \xc3(");
  std::string chat_wire;
  ASSERT_TRUE(chat.SerializePartialToString(&chat_wire));  // no UTF-8 check on output
  st = RawServerStreaming(channel_, "/kvrelay.v1.Generation/Generate", chat_wire);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(),
              HasSubstr("field 'chat.messages[1].content' is not valid UTF-8 (byte offset 11 "
                        "of its value)"));
  // Malformed bytes too.
  st = RawUnary(channel_, "/kvrelay.v1.Generation/Tokenize", std::string("\x12\x7f", 2));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("malformed"));
  EXPECT_EQ(a->calls(), 0);
  // The same text as valid UTF-8 goes through.
  std::string good_wire = {0x1a, 2, 'h', 'i'};
  st = RawServerStreaming(channel_, "/kvrelay.v1.Generation/Generate", good_wire);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(a->calls(), 1);
}

TEST_F(GenerationServiceTest, BadRequestFieldsAreRefusedBeforeRouting) {
  ASSERT_NO_FATAL_FAILURE(StartRouter());
  FakeWorker* a = AddWorker("fake-a", Complete(Slice(Output(), 0, 1)));
  v1::GenerateRequest none;  // no input
  Result r = Generate(none);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  v1::GenerateRequest model = Request(Prompt(), 1);
  model.set_model("no-such-model");
  r = Generate(model);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::NOT_FOUND) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("no-such-model"));
  v1::GenerateRequest stop = Request(Prompt(), 1);
  stop.mutable_sampling()->add_stop("");
  r = Generate(stop);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("sampling.stop"));
  EXPECT_EQ(a->calls(), 0);
  EXPECT_EQ(Requests("INVALID_ARGUMENT"), 2);
  EXPECT_EQ(Requests("NOT_FOUND"), 1);
  EXPECT_EQ(M("kvrelay_router_prompt_tokens_total"), 0);
}

// A request whose client gives up while it waits in the queue must not leave load noted
// on a worker (routing would see it busier than it is).
TEST_F(GenerationServiceTest, RequestCancelledWhileQueuedLeavesNoLoadBehind) {
  GenerationOptions g;
  g.max_running = 1;
  ASSERT_NO_FATAL_FAILURE(StartRouter(g));
  const std::vector<int32_t> one = Slice(Output(), 0, 1);
  FakeWorker* a = AddWorker("fake-a", AfterRelease(Complete(one)));
  v1::GenerateRequest first = Request(Prompt(), 1);
  first.set_request_id("first");
  AsyncGenerate running(stub_.get(), first);
  ASSERT_TRUE(a->WaitCalls(1));
  a->SetScript(Complete(one));
  // Queued behind it; its deadline passes there.
  v1::GenerateRequest queued = Request(Prompt(), 1);
  queued.set_request_id("queued");
  const Result q = Generate(queued, absl::Milliseconds(300));
  EXPECT_EQ(q.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << q.status.error_message();
  // The router has seen the deadline pass too (its clock, not the client's) and took the
  // request off the queue before the runner frees up.
  ASSERT_TRUE(testing::WaitFor([&] { return M("kvrelay_router_queue_depth") == 0; }));
  a->Release();
  EXPECT_TRUE(running.Join().status.ok()) << running.Join().status.error_message();
  // One runner, in order: once this one is done the expired one was taken off the queue.
  v1::GenerateRequest last = Request(Prompt(), 1);
  last.set_request_id("last");
  const Result l = Generate(last);
  ASSERT_TRUE(l.status.ok()) << l.status.error_message();
  std::vector<std::string> ids;
  for (const v1::DecodeRequest& dr : a->requests()) ids.push_back(dr.request_id());
  EXPECT_THAT(ids, ElementsAreArray({"first", "last"}));
  const FleetView v = router_->registry().View({});
  ASSERT_EQ(v.decode.size(), 1u);
  EXPECT_EQ(v.decode[0].active_blocks, 0)
      << "load noted for a request that never reached the worker was not released";
  EXPECT_EQ(Requests("OK"), 2);
  EXPECT_EQ(Requests("DEADLINE_EXCEEDED"), 1) << "its deadline passed while it was queued";
  EXPECT_EQ(M("kvrelay_router_queue_seconds"), 2) << "it never left the queue for a runner";
  EXPECT_EQ(M("kvrelay_router_request_duration_seconds"), 3);
  EXPECT_EQ(M("kvrelay_router_queue_depth"), 0);
}

}  // namespace
}  // namespace kvrelay::router
