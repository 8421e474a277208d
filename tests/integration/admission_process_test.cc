// The router's accounting and admission as real processes on 127.0.0.1 (kvrelay-router,
// kvrelay-prefill, kvrelay-decode, each serving /metrics):
//  - calls a client cancels right after sending them (before or while the request
//    arrives) or after a few messages are counted CANCELLED on every process, never as
//    bad requests (INVALID_ARGUMENT), and leave nothing running or allocated.
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

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

std::string Scrape(int port) {
  std::optional<std::string> text = testing::HttpGet(port, "/metrics");
  EXPECT_TRUE(text.has_value()) << "no /metrics on port " << port;
  return text.value_or("");
}

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

}  // namespace
}  // namespace kvrelay
