// Every process of a running cluster (router, prefill and decode worker as real
// processes on 127.0.0.1) serves /metrics: after real traffic each scrape passes
// `promtool check metrics`, and the values moved as they should (DESIGN §7).
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
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

using testing::RandomPrompt;

std::string ModelDir() { return testing::ModelDir(testing::TinyVariants()[0]); }

// Sum of the samples of `name` (a whole series name, e.g. "x_total" or "x_count") whose
// label set contains `label` (e.g. code="OK"; empty: any). -1 when there is none.
double Sum(const std::string& text, const std::string& name, const std::string& label = "") {
  double sum = 0;
  bool found = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    if (!absl::ConsumePrefix(&line, name)) continue;
    if (line.empty() || (line[0] != ' ' && line[0] != '{')) continue;  // a longer name
    if (!label.empty() && line.find(label) == absl::string_view::npos) continue;
    const size_t space = line.rfind(' ');
    double v = 0;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &v)) continue;
    sum += v;
    found = true;
  }
  return found ? sum : -1;
}

std::string Scrape(int port) {
  std::optional<std::string> text = testing::HttpGet(port, "/metrics");
  EXPECT_TRUE(text.has_value()) << "no /metrics on port " << port;
  return text.value_or("");
}

bool Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& req, v1::Final* final,
              grpc::Status* status = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (m.has_final()) *final = m.final();
  }
  const grpc::Status st = reader->Finish();
  if (status != nullptr) *status = st;
  return st.ok();
}

v1::GenerateRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.mutable_token_ids()->add_ids(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

TEST(MetricsProcessTest, EveryProcessServesValidMetricsThatMove) {
  const std::vector<std::string> metrics = {"--metrics_listen", "127.0.0.1:0"};
  std::vector<std::string> args = {
      "--model", ModelDir(), "--local_prefill_max_tokens", "40", "--exit_linger_seconds", "0"};
  args.insert(args.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess router = testing::StartWorker("kvrelay-router", args);
  ASSERT_TRUE(router.process);
  ASSERT_GT(router.metrics_port, 0);
  std::vector<std::string> worker = {"--model",  ModelDir(),       "--threads",
                                     "1",        "--kv_blocks",    "256",
                                     "--router", router.address(), "--exit_linger_seconds",
                                     "0"};
  worker.insert(worker.end(), metrics.begin(), metrics.end());
  testing::WorkerProcess prefill = testing::StartWorker("kvrelay-prefill", worker);
  testing::WorkerProcess decode = testing::StartWorker("kvrelay-decode", worker);
  ASSERT_TRUE(prefill.process && decode.process);
  ASSERT_GT(prefill.metrics_port, 0);
  ASSERT_GT(decode.metrics_port, 0);

  auto channel = grpc::CreateChannel(router.address(), grpc::InsecureChannelCredentials());
  auto gen = v1::Generation::NewStub(channel);
  auto registry = v1::Registry::NewStub(channel);
  // Both workers registered and their caches in the index.
  const absl::Time deadline = absl::Now() + testing::kProcessTimeout;
  auto synced = [&](int64_t min_blocks) {
    while (absl::Now() < deadline) {
      grpc::ClientContext ctx;
      v1::ListWorkersResponse r;
      int n = 0;
      int64_t blocks = 0;
      if (registry->ListWorkers(&ctx, v1::ListWorkersRequest(), &r).ok()) {
        for (const auto& w : r.workers()) {
          n += w.alive() && w.synced() ? 1 : 0;
          if (w.registration().role() == v1::WORKER_ROLE_DECODE) blocks += w.indexed_blocks();
        }
      }
      if (n == 2 && blocks >= min_blocks) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  };
  ASSERT_TRUE(synced(0));

  // A long prompt (remote prefill: KV over UCX), then the same prefix again (a hit on the
  // decode worker, known to the index), then a bad request.
  const auto prompt = RandomPrompt(100, 42);
  v1::Final first, second;
  ASSERT_TRUE(Generate(*gen, Greedy(prompt, 6), &first));
  EXPECT_EQ(first.route().prefill_mode(), v1::PREFILL_MODE_REMOTE);
  ASSERT_TRUE(synced(6));
  auto longer = prompt;
  longer.push_back(7);
  ASSERT_TRUE(Generate(*gen, Greedy(longer, 6), &second));
  EXPECT_GE(second.usage().cached_tokens(), 96);
  v1::Final unused;
  grpc::Status bad;
  EXPECT_FALSE(Generate(*gen, Greedy({}, 4), &unused, &bad));
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Counters of finished requests are updated before the stream ends; gauges fed by load
  // reports may lag, so only counters and histograms are checked.
  const std::map<std::string, int> ports = {{"router", router.metrics_port},
                                            {"prefill", prefill.metrics_port},
                                            {"decode", decode.metrics_port}};
  std::map<std::string, std::string> text;
  for (const auto& [name, port] : ports) {
    text[name] = Scrape(port);
    std::string promtool;
    EXPECT_TRUE(testing::PromtoolCheckMetrics(text[name], &promtool)) << name << ": " << promtool;
    EXPECT_THAT(text[name], ::testing::HasSubstr("kvrelay_")) << name;
  }
  const std::string& r = text["router"];
  EXPECT_EQ(Sum(r, "kvrelay_router_requests_total", "code=\"OK\""), 2);
  EXPECT_EQ(Sum(r, "kvrelay_router_requests_total", "code=\"INVALID_ARGUMENT\""), 1);
  EXPECT_EQ(Sum(r, "kvrelay_router_ttft_seconds_count"), 2);
  EXPECT_EQ(Sum(r, "kvrelay_router_prompt_tokens_total"), 201);
  EXPECT_EQ(Sum(r, "kvrelay_router_generated_tokens_total"), 12);
  EXPECT_GE(Sum(r, "kvrelay_router_prefix_delivered_tokens_total"), 96);  // hit rate > 0
  EXPECT_GE(Sum(r, "kvrelay_router_prefix_predicted_tokens_total"), 96);
  EXPECT_GE(Sum(r, "kvrelay_router_prefix_available_tokens_total"), 96);
  EXPECT_EQ(Sum(r, "kvrelay_router_prefill_total", "mode=\"remote\""), 1);
  EXPECT_GE(Sum(r, "kvrelay_router_workers", "state=\"alive\""), 2);

  const std::string& d = text["decode"];
  EXPECT_EQ(Sum(d, "kvrelay_decode_requests_total", "code=\"OK\""), 2);
  EXPECT_EQ(Sum(d, "kvrelay_decode_generated_tokens_total"), 12);
  EXPECT_GE(Sum(d, "kvrelay_decode_cached_tokens_total"), 96);
  EXPECT_GT(Sum(d, "kvrelay_decode_steps_total"), 0);
  EXPECT_GT(Sum(d, "kvrelay_kv_transfer_received_bytes_total"), 0);
  EXPECT_EQ(Sum(d, "kvrelay_decode_remote_prefills_total", "result=\"ok\""), 1);

  const std::string& p = text["prefill"];
  EXPECT_EQ(Sum(p, "kvrelay_prefill_requests_total", "code=\"OK\""), 1);
  EXPECT_GT(Sum(p, "kvrelay_kv_transfer_bytes_total"), 0);  // labelled by the transport used
  EXPECT_GT(Sum(p, "kvrelay_kv_transfer_seconds_count"), 0);
  EXPECT_GT(Sum(p, "kvrelay_prefill_computed_tokens_total"), 0);
}

}  // namespace
}  // namespace kvrelay
