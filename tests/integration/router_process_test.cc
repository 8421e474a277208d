// The whole service as real processes on 127.0.0.1 (DESIGN §1, §5): kvrelay-router,
// prefill and decode workers that register with it over the registry stream, KV over
// UCX, and a client of the public API (kvrelay.v1.Generation). Outputs are compared
// with the single-process `kvrelay generate`.
#include <signal.h>

#include <atomic>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::RandomPrompt;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

// Prompts of at least this many uncached tokens are prefilled remotely.
constexpr int kLocalMax = 40;

struct Result {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  v1::Final final;
  int messages = 0;
};

v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.mutable_token_ids()->add_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

// One Generate call; `on_message` sees every message as it arrives.
Result Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& req,
                const std::function<void(const v1::GenerateResponse&)>& on_message = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(180));
  Result out;
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    ++out.messages;
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    out.text += m.text();
    if (m.has_final()) out.final = m.final();
    if (on_message) on_message(m);
  }
  out.status = reader->Finish();
  return out;
}

class Cluster {
 public:
  // A router and `prefill` + `decode` workers registered with it.
  Cluster(int prefill, int decode, std::vector<std::string> router_flags = {})
      : prefill_(prefill), decode_(decode), router_flags_(std::move(router_flags)) {
    StartRouter();
    for (int i = 0; i < prefill; ++i)
      StartWorkerProcess("kvrelay-prefill", "prefill-" + std::to_string(i));
    for (int i = 0; i < decode; ++i)
      StartWorkerProcess("kvrelay-decode", "decode-" + std::to_string(i));
    WaitForWorkers(
        [&](const v1::ListWorkersResponse& r) { return AliveSynced(r) == prefill + decode; });
  }

  void StartRouter(int port = 0) {
    std::vector<std::string> args = {"--model",
                                     ModelDir(),
                                     "--listen",
                                     absl::StrCat("127.0.0.1:", port),
                                     "--local_prefill_max_tokens",
                                     std::to_string(kLocalMax),
                                     "--heartbeat_interval_ms",
                                     "200",
                                     "--heartbeat_timeout_ms",
                                     "10000",
                                     "--exit_linger_seconds",
                                     "0"};
    args.insert(args.end(), router_flags_.begin(), router_flags_.end());
    router_ =
        std::make_unique<testing::WorkerProcess>(testing::StartWorker("kvrelay-router", args));
    ASSERT_TRUE(router_->process);
    auto channel = grpc::CreateChannel(router_->address(), grpc::InsecureChannelCredentials());
    generation_ = v1::Generation::NewStub(channel);
    registry_ = v1::Registry::NewStub(channel);
  }

  void StartWorkerProcess(const std::string& binary, const std::string& id) {
    testing::WorkerProcess w =
        testing::StartWorker(binary, {"--model", ModelDir(), "--threads", "1", "--kv_blocks", "256",
                                      "--prefill_chunk", "24", "--router", router_->address(),
                                      "--worker_id", id, "--exit_linger_seconds", "0"});
    ASSERT_TRUE(w.process) << id;
    workers_.erase(id);
    workers_.emplace(id, std::move(w));
  }

  static int AliveSynced(const v1::ListWorkersResponse& r) {
    int n = 0;
    for (const auto& w : r.workers()) n += w.alive() && w.synced() ? 1 : 0;
    return n;
  }

  v1::ListWorkersResponse List() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ListWorkersResponse r;
    EXPECT_TRUE(registry_->ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok());
    return r;
  }

  // Polls the router's registry until `pred` holds (bounded).
  void WaitForWorkers(const std::function<bool(const v1::ListWorkersResponse&)>& pred) {
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline) {
      if (pred(List())) return;
      absl::SleepFor(absl::Milliseconds(20));
    }
    ADD_FAILURE() << "the router's registry never reached the expected state: "
                  << List().DebugString();
  }

  const v1::WorkerStatus* Find(const v1::ListWorkersResponse& r, const std::string& id) {
    for (const auto& w : r.workers()) {
      if (w.registration().worker_id() == id) return &w;
    }
    return nullptr;
  }

  int64_t IndexedBlocks(const std::string& id) {
    const v1::ListWorkersResponse r = List();
    const v1::WorkerStatus* w = Find(r, id);
    return w != nullptr && w->alive() ? w->indexed_blocks() : -1;
  }

  v1::Generation::Stub& gen() { return *generation_; }
  testing::WorkerProcess& worker(const std::string& id) { return workers_.at(id); }
  testing::WorkerProcess& router() { return *router_; }

 private:
  int prefill_, decode_;
  std::vector<std::string> router_flags_;
  std::unique_ptr<testing::WorkerProcess> router_;
  std::map<std::string, testing::WorkerProcess> workers_;
  std::unique_ptr<v1::Generation::Stub> generation_;
  std::unique_ptr<v1::Registry::Stub> registry_;
};

class RouterProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { cluster_ = new Cluster(2, 2); }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  static Cluster* cluster_;
};
Cluster* RouterProcessTest::cluster_ = nullptr;

TEST_F(RouterProcessTest, GreedyOutputsMatchSingleProcessGeneration) {
  // Short (local prefill), exactly block aligned, long with several prefill chunks.
  const std::vector<int> lengths = {5, 32, 100, 170};
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto prompt = RandomPrompt(lengths[i], 100 + static_cast<uint32_t>(i));
    const Result r = Generate(cluster_->gen(), Greedy(prompt, 12));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, testing::CliGenerate(ModelDir(), prompt, 12)) << lengths[i];
    EXPECT_EQ(r.final.finish_reason(), "length");
    EXPECT_EQ(r.final.usage().prompt_tokens(), lengths[i]);
    EXPECT_EQ(r.final.usage().completion_tokens(), 12);
    EXPECT_FALSE(r.final.route().decode_worker().empty());
    EXPECT_GT(r.final.timing().ttft_seconds(), 0);
    // The decision is in the final message: short uncached prompts prefill on the
    // decode worker, long ones on a prefill worker, whose KV arrives over UCX.
    if (lengths[i] < kLocalMax) {
      EXPECT_EQ(r.final.route().prefill_mode(), v1::PREFILL_MODE_LOCAL) << lengths[i];
      EXPECT_TRUE(r.final.route().prefill_worker().empty());
    } else {
      EXPECT_EQ(r.final.route().prefill_mode(), v1::PREFILL_MODE_REMOTE) << lengths[i];
      EXPECT_THAT(r.final.route().prefill_worker(), ::testing::StartsWith("prefill-"));
      EXPECT_GT(r.final.transfer().bytes(), 0u);
    }
  }
}

TEST_F(RouterProcessTest, ConcurrentRequestsAreExact) {
  constexpr int kN = 8;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kN; ++i) prompts.push_back(RandomPrompt(10 + 13 * i, 500 + i));
  std::vector<Result> results(kN);
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i) {
    threads.emplace_back(
        [&, i] { results[i] = Generate(cluster_->gen(), Greedy(prompts[i], 10)); });
  }
  for (auto& t : threads) t.join();
  std::set<std::string> decode_workers;
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, testing::CliGenerate(ModelDir(), prompts[i], 10)) << i;
    decode_workers.insert(results[i].final.route().decode_worker());
  }
  EXPECT_EQ(decode_workers.size(), 2u);  // unrelated prompts spread over both
}

TEST_F(RouterProcessTest, RoutingFollowsTheCache) {
  const auto prefix = RandomPrompt(96, 900);
  const v1::ListWorkersResponse before = cluster_->List();
  const Result first = Generate(cluster_->gen(), Greedy(prefix, 4));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const std::string holder = first.final.route().decode_worker();
  // The decode worker's KV events reach the index: its 6 new full prompt blocks (the
  // pool is large enough that nothing is evicted meanwhile).
  const int64_t had = cluster_->Find(before, holder)->indexed_blocks();
  cluster_->WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster_->Find(r, holder);
    return w != nullptr && w->indexed_blocks() >= had + 6;
  });
  // Requests sharing the long prefix go where it is cached, whatever else is going on.
  for (int i = 0; i < 3; ++i) {
    // The holder's load report no longer counts the previous request's blocks as active
    // (a stale report would make the other worker cheaper).
    cluster_->WaitForWorkers([&](const v1::ListWorkersResponse& r) {
      const v1::WorkerStatus* w = cluster_->Find(r, holder);
      return w != nullptr && w->load().active_blocks() == 0;
    });
    auto prompt = prefix;
    const auto tail = RandomPrompt(20, 901 + i);
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    const Result r = Generate(cluster_->gen(), Greedy(prompt, 4));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.final.route().decode_worker(), holder) << i;
    EXPECT_GE(r.final.usage().cached_tokens(), 96) << i;
    EXPECT_GE(r.final.route().predicted_cached_tokens(), 96) << i;
    EXPECT_EQ(r.tokens, testing::CliGenerate(ModelDir(), prompt, 4)) << i;
  }
}

TEST_F(RouterProcessTest, StopStringsTokenizeAndListModels) {
  // Text in, text out; a stop string cuts the text where it starts.
  v1::GenerateRequest req;
  req.set_prompt("The quick brown fox");
  req.mutable_sampling()->set_max_tokens(24);
  req.mutable_sampling()->set_ignore_eos(true);
  const Result plain = Generate(cluster_->gen(), req);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  ASSERT_GT(plain.text.size(), 4u);
  // Stop at two ASCII characters from the second half of the generated text.
  size_t from = plain.text.size() / 2;
  while (from + 1 < plain.text.size() &&
         (static_cast<unsigned char>(plain.text[from]) >= 0x80 ||
          static_cast<unsigned char>(plain.text[from + 1]) >= 0x80)) {
    ++from;
  }
  ASSERT_LT(from + 1, plain.text.size()) << "no ASCII pair in " << plain.text;
  const std::string stop = plain.text.substr(from, 2);
  const size_t at = plain.text.find(stop);
  req.mutable_sampling()->add_stop(stop);
  const Result stopped = Generate(cluster_->gen(), req);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.text, plain.text.substr(0, at));
  EXPECT_EQ(stopped.final.finish_reason(), "stop");
  EXPECT_EQ(stopped.final.stop_reason(), stop);
  EXPECT_LE(stopped.tokens.size(), plain.tokens.size());

  grpc::ClientContext ctx;
  v1::TokenizeRequest treq;
  treq.set_prompt("The quick brown fox");
  v1::TokenizeResponse tres;
  ASSERT_TRUE(cluster_->gen().Tokenize(&ctx, treq, &tres).ok());
  EXPECT_GT(tres.token_ids_size(), 0);
  EXPECT_EQ(tres.max_context(), 512);
  EXPECT_EQ(plain.final.usage().prompt_tokens(), tres.token_ids_size());

  grpc::ClientContext ctx2;
  v1::ListModelsResponse models;
  ASSERT_TRUE(cluster_->gen().ListModels(&ctx2, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).decode_workers(), 2);
  EXPECT_EQ(models.models(0).prefill_workers(), 2);
}

TEST_F(RouterProcessTest, BadRequestsAreRefusedAndTheServiceKeepsServing) {
  auto expect_code = [&](const v1::GenerateRequest& req, grpc::StatusCode code,
                         const std::string& words) {
    const Result r = Generate(cluster_->gen(), req);
    EXPECT_EQ(r.status.error_code(), code) << words << ": " << r.status.error_message();
    EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr(words));
  };
  v1::GenerateRequest empty;
  empty.set_prompt("");
  expect_code(empty, grpc::StatusCode::INVALID_ARGUMENT, "prompt is empty");
  expect_code(v1::GenerateRequest(), grpc::StatusCode::INVALID_ARGUMENT, "input is required");
  expect_code(Greedy(RandomPrompt(600, 1), 4), grpc::StatusCode::INVALID_ARGUMENT,
              "context length");
  auto bad_id = Greedy({1, 2, 400}, 4);
  expect_code(bad_id, grpc::StatusCode::INVALID_ARGUMENT, "token_ids.ids[2]");
  auto temp = Greedy({1, 2, 3}, 4);
  temp.mutable_sampling()->set_temperature(-1);
  expect_code(temp, grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature");
  auto top_p = Greedy({1, 2, 3}, 4);
  top_p.mutable_sampling()->set_top_p(1.5f);
  expect_code(top_p, grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p");
  auto logprobs = Greedy({1, 2, 3}, 4);
  logprobs.mutable_sampling()->set_logprobs(50);
  expect_code(logprobs, grpc::StatusCode::INVALID_ARGUMENT, "sampling.logprobs");
  auto stop = Greedy({1, 2, 3}, 4);
  stop.mutable_sampling()->add_stop("");
  expect_code(stop, grpc::StatusCode::INVALID_ARGUMENT, "sampling.stop");
  auto model = Greedy({1, 2, 3}, 4);
  model.set_model("no-such-model");
  expect_code(model, grpc::StatusCode::NOT_FOUND, "no-such-model");
  v1::GenerateRequest big;
  big.set_prompt(std::string(5 << 20, 'a'));  // over the 4 MiB message limit
  expect_code(big, grpc::StatusCode::RESOURCE_EXHAUSTED, "");

  // Bad UTF-8 sent as raw bytes (a protobuf library would not serialise it as a string).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    std::string wire;
    wire.push_back(0x1a);  // field 3 (prompt), length-delimited
    wire.push_back(3);
    wire +=
        "\xff\xfe"
        "a";
    grpc::GenericStub generic(
        grpc::CreateChannel(cluster_->router().address(), grpc::InsecureChannelCredentials()));
    grpc::Slice slice(wire);
    grpc::ByteBuffer request(&slice, 1);
    grpc::CompletionQueue cq;
    auto call = generic.PrepareCall(&ctx, "/kvrelay.v1.Generation/Generate", &cq);
    void* tag = nullptr;
    bool ok = false;
    call->StartCall(reinterpret_cast<void*>(1));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    call->Write(request, reinterpret_cast<void*>(2));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    call->WritesDone(reinterpret_cast<void*>(3));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    grpc::ByteBuffer response;
    call->Read(&response, reinterpret_cast<void*>(4));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    grpc::Status status;
    call->Finish(&status, reinterpret_cast<void*>(5));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    EXPECT_NE(status.error_code(), grpc::StatusCode::OK);
    std::cerr << "bad UTF-8 prompt: code " << status.error_code() << " " << status.error_message()
              << "\n";
    EXPECT_NE(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  }

  // Still serving.
  const auto prompt = RandomPrompt(7, 77);
  const Result ok = Generate(cluster_->gen(), Greedy(prompt, 5));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens, testing::CliGenerate(ModelDir(), prompt, 5));
}

TEST_F(RouterProcessTest, ClientCancelAndDeadlineReachTheWorkers) {
  // Long generations through a remote prefill; the client goes away after the first
  // token (cancel) or sets a deadline it cannot meet. The workers' own load reports
  // (blocks in use, jobs running) return to zero: nothing stays allocated.
  for (int round = 0; round < 2; ++round) {
    grpc::ClientContext ctx;
    const bool cancel = round == 0;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     (cancel ? std::chrono::milliseconds(180000) : std::chrono::milliseconds(40)));
    auto reader = cluster_->gen().Generate(&ctx, Greedy(RandomPrompt(120, 7000 + round), 380));
    v1::GenerateResponse m;
    int tokens = 0;
    while (reader->Read(&m)) {
      tokens += m.token_ids_size();
      if (cancel && tokens > 0) ctx.TryCancel();
    }
    const grpc::Status st = reader->Finish();
    if (cancel) {
      EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
    } else if (!st.ok()) {  // a fast machine may finish within the deadline
      EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
    }
    cluster_->WaitForWorkers([](const v1::ListWorkersResponse& r) {
      for (const auto& w : r.workers()) {
        if (w.load().active_blocks() != 0 || w.load().running() != 0 || w.load().waiting() != 0) {
          return false;
        }
      }
      return true;
    });
  }
}

// Failures get a cluster of their own.
TEST(RouterFailureTest, DecodeWorkerKilledMidStreamRequestsMigrate) {
  Cluster cluster(1, 2);
  constexpr int kN = 20;
  constexpr int kTokens = 200;  // long enough that streams are still running at the kill
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kN; ++i) prompts.push_back(RandomPrompt(8 + 7 * i, 3000 + i));
  auto run_all = [&](const std::function<void(int, const v1::GenerateResponse&)>& on_message) {
    std::vector<Result> results(kN);
    std::vector<std::thread> threads;
    for (int i = 0; i < kN; ++i) {
      threads.emplace_back([&, i] {
        results[i] = Generate(cluster.gen(), Greedy(prompts[i], kTokens),
                              [&, i](const v1::GenerateResponse& m) { on_message(i, m); });
      });
    }
    for (auto& t : threads) t.join();
    return results;
  };
  // No-failure streams first.
  const std::vector<Result> reference = run_all([](int, const v1::GenerateResponse&) {});
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(reference[i].status.ok()) << i;

  // Again; once every stream has delivered a token, decode-1 is killed.
  absl::Mutex mu;
  std::set<int> started;
  bool killed = false;
  std::thread killer([&] {
    absl::MutexLock l(&mu);
    auto all = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      return static_cast<int>(started.size()) == kN;
    };
    mu.AwaitWithTimeout(absl::Condition(&all), testing::kProcessTimeout);
    cluster.worker("decode-1").process->Kill(SIGKILL);
    killed = true;
  });
  const std::vector<Result> results = run_all([&](int i, const v1::GenerateResponse& m) {
    if (m.token_ids_size() > 0) {
      absl::MutexLock l(&mu);
      started.insert(i);
    }
  });
  killer.join();
  ASSERT_TRUE(killed);
  int migrated = 0;
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, reference[i].tokens) << i;  // nothing repeated or missing
    EXPECT_EQ(results[i].text, reference[i].text) << i;
    EXPECT_EQ(results[i].final.usage().completion_tokens(), kTokens);
    migrated += results[i].final.route().migrations();
    if (results[i].final.route().migrations() > 0) {
      EXPECT_EQ(results[i].final.route().decode_worker(), "decode-0");
    }
  }
  EXPECT_GT(migrated, 0);
  // The dead worker left the index.
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, "decode-1");
    return w != nullptr && !w->alive() && w->indexed_blocks() == 0;
  });
}

TEST(RouterBusyTest, ABusyHolderIsSkippedUntilItIsNotBusy) {
  // Busy: more than 5% of the 256-block pool in use.
  Cluster cluster(0, 2, {"--decode_busy_threshold", "0.05"});
  const auto prefix = RandomPrompt(96, 5000);
  auto with_tail = [&](uint32_t seed) {
    auto p = prefix;
    const auto tail = RandomPrompt(20, seed);
    p.insert(p.end(), tail.begin(), tail.end());
    return p;
  };
  const v1::ListWorkersResponse before = cluster.List();
  const Result first = Generate(cluster.gen(), Greedy(prefix, 4));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const std::string holder = first.final.route().decode_worker();
  const int64_t had = cluster.Find(before, holder)->indexed_blocks();
  // The holder's blocks are indexed and its load report no longer counts the first
  // request's blocks as active (a stale report would make the idle worker cheaper).
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, holder);
    return w != nullptr && w->indexed_blocks() >= had + 6 && w->load().active_blocks() == 0;
  });
  // A long request sharing the prefix goes to the holder and keeps it busy (31 blocks).
  absl::Notification first_token;
  Result long_result;
  std::thread long_request([&] {
    long_result =
        Generate(cluster.gen(), Greedy(with_tail(5001), 380), [&](const v1::GenerateResponse& m) {
          if (m.token_ids_size() > 0 && !first_token.HasBeenNotified()) {
            first_token.Notify();
          }
        });
  });
  ASSERT_TRUE(first_token.WaitForNotificationWithTimeout(testing::kProcessTimeout));
  // Meanwhile a request with the same prefix goes to the other, idle worker.
  const Result other = Generate(cluster.gen(), Greedy(with_tail(5002), 4));
  long_request.join();
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  ASSERT_TRUE(long_result.status.ok()) << long_result.status.error_message();
  EXPECT_EQ(long_result.final.route().decode_worker(), holder);
  EXPECT_GE(long_result.final.usage().cached_tokens(), 96);
  EXPECT_NE(other.final.route().decode_worker(), holder);
  EXPECT_EQ(other.final.usage().cached_tokens(), 0);
  // Once the holder is idle again (its load report says so), the prefix brings requests
  // back to it.
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, holder);
    return w != nullptr && w->load().active_blocks() == 0;
  });
  const Result back = Generate(cluster.gen(), Greedy(with_tail(5003), 4));
  ASSERT_TRUE(back.status.ok()) << back.status.error_message();
  EXPECT_EQ(back.final.route().decode_worker(), holder);
  EXPECT_GE(back.final.usage().cached_tokens(), 96);
}

TEST(RouterFailureTest, RestartedWorkerAndRestartedRouter) {
  Cluster cluster(0, 2);
  const auto prompt = RandomPrompt(80, 4000);
  const Result first = Generate(cluster.gen(), Greedy(prompt, 4));
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const std::string holder = first.final.route().decode_worker();
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, holder);
    return w != nullptr && w->indexed_blocks() >= 5;
  });
  const int64_t before = cluster.IndexedBlocks(holder);

  // The router restarts on the same port: the workers redial and their snapshots
  // rebuild the index; the cached prefix is found again.
  const int port = cluster.router().port;
  cluster.router().process->Kill(SIGKILL);
  ASSERT_TRUE(cluster.router().process->Wait(testing::kProcessTimeout));
  cluster.StartRouter(port);
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, holder);
    return Cluster::AliveSynced(r) == 2 && w != nullptr && w->indexed_blocks() == before;
  });
  const Result again = Generate(cluster.gen(), Greedy(prompt, 4));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.final.route().decode_worker(), holder);
  EXPECT_EQ(again.final.usage().cached_tokens(), 64);  // the last prompt token is computed
  EXPECT_EQ(again.tokens, first.tokens);

  // The holder restarts (new process, same id): its old blocks leave the index, and
  // nothing is predicted to be cached there.
  cluster.worker(holder).process->Kill(SIGKILL);
  ASSERT_TRUE(cluster.worker(holder).process->Wait(testing::kProcessTimeout));
  cluster.WaitForWorkers([&](const v1::ListWorkersResponse& r) {
    const v1::WorkerStatus* w = cluster.Find(r, holder);
    return w != nullptr && !w->alive() && w->indexed_blocks() == 0;
  });
  cluster.StartWorkerProcess("kvrelay-decode", holder);
  cluster.WaitForWorkers(
      [&](const v1::ListWorkersResponse& r) { return Cluster::AliveSynced(r) == 2; });
  EXPECT_EQ(cluster.IndexedBlocks(holder), 0);
  const Result after = Generate(cluster.gen(), Greedy(prompt, 4));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.final.route().predicted_cached_tokens(), 0);
  EXPECT_EQ(after.final.usage().cached_tokens(), 0);
  EXPECT_EQ(after.tokens, first.tokens);
}

}  // namespace
}  // namespace kvrelay
