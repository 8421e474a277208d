// The router's accounting and admission as real processes on 127.0.0.1 (kvrelay-router,
// kvrelay-prefill, kvrelay-decode, each serving /metrics):
//  - calls a client cancels right after sending them (before or while the request
//    arrives) or after a few messages are counted CANCELLED on every process, never as
//    bad requests (INVALID_ARGUMENT), and leave nothing running or allocated;
//  - overload is shed: with 2 running and 4 queued, 10x that many calls get
//    RESOURCE_EXHAUSTED at once (queue full) or after --max_queue_seconds (waited too
//    long), with grpc-retry-pushback-ms; the admitted ones complete with exact tokens.
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/registry.grpc.pb.h"
#include "tests/testing/http.h"
#include "tests/testing/processes.h"
#include "tests/testing/test_models.h"

namespace kvrelay {
namespace {

using testing::MetricSum;
using testing::RandomPrompt;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

std::string Scrape(int port) { return testing::ScrapeMetrics(port); }

// A router + 1 prefill + 1 decode worker, all with /metrics.
struct Cluster {
  std::unique_ptr<testing::WorkerProcess> router, prefill, decode;
  std::unique_ptr<v1::Generation::Stub> gen;

  static std::unique_ptr<testing::WorkerProcess> Start(const std::string& binary,
                                                       const std::vector<std::string>& args) {
    return std::make_unique<testing::WorkerProcess>(testing::StartWorker(binary, args));
  }

  explicit Cluster(const std::vector<std::string>& router_flags = {}) {
    const std::vector<std::string> metrics = {"--metrics_listen", "127.0.0.1:0"};
    std::vector<std::string> args = {
        "--model", ModelDir(), "--local_prefill_max_tokens", "40", "--exit_linger_seconds", "0"};
    args.insert(args.end(), metrics.begin(), metrics.end());
    args.insert(args.end(), router_flags.begin(), router_flags.end());
    router = Start("kvrelay-router", args);
    if (!router->process) return;
    std::vector<std::string> worker = {"--model",  ModelDir(),        "--threads",
                                       "1",        "--kv_blocks",     "256",
                                       "--router", router->address(), "--exit_linger_seconds",
                                       "0"};
    worker.insert(worker.end(), metrics.begin(), metrics.end());
    prefill = Start("kvrelay-prefill", worker);
    decode = Start("kvrelay-decode", worker);
    gen = v1::Generation::NewStub(
        grpc::CreateChannel(router->address(), grpc::InsecureChannelCredentials()));
  }
  bool ok() const {
    return router && router->process && prefill && prefill->process && decode && decode->process &&
           router->metrics_port > 0 && prefill->metrics_port > 0 && decode->metrics_port > 0;
  }

  // Both workers registered (the router's health: a decode worker is there, and the
  // prefill worker is counted alive).
  bool WaitForWorkers() {
    auto registry = v1::Registry::NewStub(
        grpc::CreateChannel(router->address(), grpc::InsecureChannelCredentials()));
    const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
    while (absl::Now() < deadline) {
      grpc::ClientContext ctx;
      v1::ListWorkersResponse r;
      int n = 0;
      if (registry->ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok()) {
        for (const auto& w : r.workers()) n += w.alive() && w.synced() ? 1 : 0;
      }
      if (n == 2) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }
};

// One asynchronous Generate call that cancels itself after `cancel_after` messages
// (0: right after starting it, before its request can have arrived).
class CancellingCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  CancellingCall(v1::Generation::Stub* stub, v1::GenerateRequest req, int cancel_after)
      : req_(std::move(req)), cancel_after_(cancel_after) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    stub->async()->Generate(&ctx_, &req_, this);
    StartRead(&msg_);
    StartCall();
    if (cancel_after_ == 0) ctx_.TryCancel();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (++messages_ == cancel_after_) ctx_.TryCancel();
    StartRead(&msg_);
  }
  void OnDone(const grpc::Status& s) override {
    absl::MutexLock l(&mu_);
    status_ = s;
    done_ = true;
  }
  grpc::Status Wait() {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(&done_));
    return status_;
  }

 private:
  grpc::ClientContext ctx_;
  v1::GenerateRequest req_;
  v1::GenerateResponse msg_;
  const int cancel_after_;
  int messages_ = 0;
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

// One asynchronous Generate call, recorded: its tokens, status, trailing metadata and
// how long it took.
class RecordingCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  RecordingCall(v1::Generation::Stub* stub, v1::GenerateRequest req) : req_(std::move(req)) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    stub->async()->Generate(&ctx_, &req_, this);
    StartRead(&msg_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    {
      absl::MutexLock l(&mu_);
      tokens_.insert(tokens_.end(), msg_.token_ids().begin(), msg_.token_ids().end());
    }
    StartRead(&msg_);
  }
  void OnDone(const grpc::Status& s) override {
    absl::MutexLock l(&mu_);
    status_ = s;
    elapsed_ = absl::Now() - started_;
    for (const auto& [k, v] : ctx_.GetServerTrailingMetadata()) {
      if (std::string(k.data(), k.size()) == "grpc-retry-pushback-ms") {
        pushback_ = std::string(v.data(), v.size());
      }
    }
    done_ = true;
  }
  void Wait() {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(&done_));
  }
  bool done() {
    absl::MutexLock l(&mu_);
    return done_;
  }
  // After Wait():
  grpc::Status status() { return Locked(&status_); }
  std::vector<int32_t> tokens() { return Locked(&tokens_); }
  std::optional<std::string> pushback() { return Locked(&pushback_); }
  absl::Duration elapsed() { return Locked(&elapsed_); }

 private:
  template <typename T>
  T Locked(const T* v) {
    absl::MutexLock l(&mu_);
    return *v;
  }
  grpc::ClientContext ctx_;
  v1::GenerateRequest req_;
  v1::GenerateResponse msg_;
  const absl::Time started_ = absl::Now();
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  std::optional<std::string> pushback_ ABSL_GUARDED_BY(mu_);
  absl::Duration elapsed_ ABSL_GUARDED_BY(mu_);
};

v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.mutable_token_ids()->add_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

// Polls `port`'s /metrics until `pred` holds on it (bounded); the last scrape.
template <typename Pred>
std::string ScrapeUntil(int port, Pred pred) {
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  std::string text = Scrape(port);
  while (!pred(text) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    text = Scrape(port);
  }
  return text;
}

TEST(AdmissionProcessTest, CancelledCallsAreCountedCancelledNeverInvalid) {
  Cluster c;
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorkers());
  // 60 calls cancelled at once and 20 after 1 or 2 messages; short prompts prefill on
  // the decode worker, long ones (>= 40 uncached tokens) on the prefill worker.
  std::vector<std::unique_ptr<CancellingCall>> calls;
  for (int i = 0; i < 80; ++i) {
    const int len = i % 2 == 0 ? 12 : 80;
    const int cancel_after = i < 60 ? 0 : 1 + i % 2;
    calls.push_back(std::make_unique<CancellingCall>(
        c.gen.get(), Greedy(RandomPrompt(len, 1000 + i), 400), cancel_after));
  }
  int cancelled_seen = 0;
  for (auto& call : calls) {
    const grpc::Status s = call->Wait();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
    cancelled_seen += s.error_code() == grpc::StatusCode::CANCELLED;
  }
  EXPECT_EQ(cancelled_seen, 80);
  // Nothing left running: the router's queue and running gauges, the decode worker's
  // sequences, no block held or quarantined on either worker.
  const std::string router = ScrapeUntil(c.router->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_router_requests_running") == 0 &&
           MetricSum(t, "kvrelay_router_queue_depth") == 0;
  });
  const std::string decode = ScrapeUntil(c.decode->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_decode_running_sequences") == 0 &&
           MetricSum(t, "kvrelay_decode_waiting_sequences") == 0 &&
           MetricSum(t, "kvrelay_kv_blocks", "state=\"in_use\"") == 0 &&
           MetricSum(t, "kvrelay_decode_quarantined_blocks") <= 0;
  });
  const std::string prefill = ScrapeUntil(c.prefill->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_kv_blocks", "state=\"in_use\"") == 0 &&
           MetricSum(t, "kvrelay_prefill_queue_depth") <= 0;
  });
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_running"), 0);
  EXPECT_EQ(MetricSum(router, "kvrelay_router_queue_depth"), 0);
  EXPECT_EQ(MetricSum(decode, "kvrelay_decode_running_sequences"), 0);
  EXPECT_EQ(MetricSum(decode, "kvrelay_kv_blocks", "state=\"in_use\""), 0);
  EXPECT_EQ(MetricSum(prefill, "kvrelay_kv_blocks", "state=\"in_use\""), 0);
  // Every call the router saw is counted CANCELLED; no process counts a bad request or
  // any other code. (A call cancelled before it left the client is counted nowhere.)
  const std::map<std::string, std::pair<std::string, std::string>> counters = {
      {"router", {router, "kvrelay_router_requests_total"}},
      {"decode", {decode, "kvrelay_decode_requests_total"}},
      {"prefill", {prefill, "kvrelay_prefill_requests_total"}}};
  for (const auto& [name, tc] : counters) {
    const auto& [text, metric] = tc;
    const double all = MetricSum(text, metric);
    const double cancelled = MetricSum(text, metric, "code=\"CANCELLED\"");
    EXPECT_EQ(MetricSum(text, metric, "code=\"INVALID_ARGUMENT\""), 0) << name << "\n" << text;
    if (name == "prefill") {
      // A prefill can finish before the client's cancel reaches it: OK is fine there.
      EXPECT_EQ(all, cancelled + MetricSum(text, metric, "code=\"OK\"")) << name << "\n" << text;
    } else {
      EXPECT_EQ(all, cancelled) << name << ": every finished call CANCELLED\n" << text;
    }
    if (name == "router") {
      // The 20 cancelled after a message certainly reached the router.
      EXPECT_GE(cancelled, 20) << text;
    }
  }
}

TEST(AdmissionProcessTest, OverloadIsShedWithResourceExhaustedAndAdmittedOnesStayExact) {
  // Capacity: 2 running + 4 queued; a queued call may wait 1 s. The heartbeat timeout is
  // long so that the stopped decode worker below is not declared dead.
  Cluster c({"--max_running", "2", "--max_queued", "4", "--max_queue_seconds", "1",
             "--heartbeat_timeout_ms", "60000"});
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c.WaitForWorkers());
  const int kTokens = 24;
  const std::vector<int32_t> p0 = RandomPrompt(12, 501), p1 = RandomPrompt(12, 502);
  const std::vector<int32_t> want0 = testing::CliGenerate(ModelDir(), p0, kTokens);
  const std::vector<int32_t> want1 = testing::CliGenerate(ModelDir(), p1, kTokens);

  // The decode worker stopped (SIGSTOP: a slow worker, not a dead one), the two runners
  // are held by the first two calls whatever the machine's speed.
  const pid_t decode_pid = c.decode->process->pid();
  ASSERT_EQ(kill(decode_pid, SIGSTOP), 0);
  auto running0 = std::make_unique<RecordingCall>(c.gen.get(), Greedy(p0, kTokens));
  auto running1 = std::make_unique<RecordingCall>(c.gen.get(), Greedy(p1, kTokens));
  const std::string busy = ScrapeUntil(c.router->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_router_requests_running") == 2;
  });
  ASSERT_EQ(MetricSum(busy, "kvrelay_router_requests_running"), 2) << busy;

  // 10x the capacity (6) at once: 4 fit the queue, 54 find it full.
  std::vector<std::unique_ptr<RecordingCall>> flood;
  for (int i = 0; i < 58; ++i) {
    flood.push_back(
        std::make_unique<RecordingCall>(c.gen.get(), Greedy(RandomPrompt(12, 600 + i), kTokens)));
  }
  int full = 0, timed_out = 0;
  absl::Duration slowest_full, fastest_timeout = absl::InfiniteDuration();
  for (auto& call : flood) {
    call->Wait();
    const grpc::Status s = call->status();
    ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    ASSERT_TRUE(call->pushback().has_value()) << "no grpc-retry-pushback-ms: " << s.error_message();
    int64_t ms = -1;
    EXPECT_TRUE(absl::SimpleAtoi(*call->pushback(), &ms) && ms >= 100 && ms <= 30000)
        << *call->pushback();
    EXPECT_TRUE(call->tokens().empty());
    if (absl::StrContains(s.error_message(), "--max_queued")) {
      ++full;
      slowest_full = std::max(slowest_full, call->elapsed());
    } else {
      EXPECT_THAT(s.error_message(), ::testing::HasSubstr("--max_queue_seconds"));
      ++timed_out;
      fastest_timeout = std::min(fastest_timeout, call->elapsed());
      // Promptly: about the 1 s limit, far below the 120 s deadline.
      EXPECT_LT(call->elapsed(), absl::Seconds(30));
    }
  }
  EXPECT_EQ(full, 54);
  EXPECT_EQ(timed_out, 4);
  EXPECT_LT(slowest_full, absl::Seconds(30));  // refused on arrival, not after a wait
  EXPECT_GE(fastest_timeout, absl::Seconds(1));
  EXPECT_FALSE(running0->done());
  EXPECT_FALSE(running1->done());

  // The worker resumes: the admitted calls complete, token for token.
  ASSERT_EQ(kill(decode_pid, SIGCONT), 0);
  running0->Wait();
  running1->Wait();
  EXPECT_TRUE(running0->status().ok()) << running0->status().error_message();
  EXPECT_TRUE(running1->status().ok()) << running1->status().error_message();
  EXPECT_EQ(running0->tokens(), want0);
  EXPECT_EQ(running1->tokens(), want1);

  // Nobody died; queue, runners and blocks are back to baseline; the counters agree.
  for (const auto* w : {c.router.get(), c.prefill.get(), c.decode.get()}) {
    int status = 0;
    EXPECT_EQ(waitpid(w->process->pid(), &status, WNOHANG), 0) << "a process exited";
  }
  const std::string router = ScrapeUntil(c.router->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_router_requests_running") == 0 &&
           MetricSum(t, "kvrelay_router_queue_depth") == 0;
  });
  const std::string decode = ScrapeUntil(c.decode->metrics_port, [](const std::string& t) {
    return MetricSum(t, "kvrelay_decode_running_sequences") == 0 &&
           MetricSum(t, "kvrelay_kv_blocks", "state=\"in_use\"") == 0;
  });
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_running"), 0);
  EXPECT_EQ(MetricSum(router, "kvrelay_router_queue_depth"), 0);
  EXPECT_EQ(MetricSum(decode, "kvrelay_kv_blocks", "state=\"in_use\""), 0);
  EXPECT_EQ(MetricSum(router, "kvrelay_router_shed_total", "reason=\"queue_full\""), 54) << router;
  EXPECT_EQ(MetricSum(router, "kvrelay_router_shed_total", "reason=\"queue_timeout\""), 4);
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_total", "code=\"RESOURCE_EXHAUSTED\""), 58);
  EXPECT_EQ(MetricSum(router, "kvrelay_router_requests_total", "code=\"OK\""), 2);
}

}  // namespace
}  // namespace kvrelay
