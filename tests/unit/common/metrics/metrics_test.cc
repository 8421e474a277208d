#include "common/metrics/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/http.h"

namespace kvrelay::metrics {
namespace {

using ::testing::HasSubstr;

// One exposer for the binary: prometheus-cpp's takes ~2 s to shut down.
TEST(MetricsServerTest, ServesTheRegistryAndPassesPromtool) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto& requests = prometheus::BuildCounter()
                       .Name("kvrelay_test_requests_total")
                       .Help("Requests handled, by result.")
                       .Register(*registry);
  requests.Add({{"code", "OK"}}).Increment(3);
  auto& latency = prometheus::BuildHistogram()
                      .Name("kvrelay_test_latency_seconds")
                      .Help("Latency.")
                      .Register(*registry);
  auto& h = latency.Add({}, LatencyBuckets());
  h.Observe(0.003);
  h.Observe(7);
  auto server = MetricsServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  const std::optional<std::string> text = testing::HttpGet((*server)->port(), "/metrics");
  ASSERT_TRUE(text.has_value());
  EXPECT_THAT(*text, HasSubstr("kvrelay_test_requests_total{code=\"OK\"} 3"));
  EXPECT_THAT(*text, HasSubstr("kvrelay_test_latency_seconds_count 2"));
  EXPECT_THAT(*text, HasSubstr("kvrelay_test_latency_seconds_bucket{le=\"0.005\"} 1"));
  std::string promtool;
  EXPECT_TRUE(testing::PromtoolCheckMetrics(*text, &promtool)) << promtool;

  // The same port again cannot be had.
  auto clash = MetricsServer::Start("127.0.0.1:" + std::to_string((*server)->port()), registry);
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kUnavailable);
}

TEST(MetricsServerTest, BadAddressesAreInvalidArgument) {
  auto registry = std::make_shared<prometheus::Registry>();
  for (const char* bad : {"", "127.0.0.1", ":80", "127.0.0.1:x", "127.0.0.1:70000"}) {
    EXPECT_EQ(MetricsServer::Start(bad, registry).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(MetricsBucketsTest, AreIncreasing) {
  for (const auto& b : {LatencyBuckets(), StepBuckets(), CountBuckets()}) {
    ASSERT_FALSE(b.empty());
    for (size_t i = 1; i < b.size(); ++i) EXPECT_LT(b[i - 1], b[i]);
  }
}

}  // namespace
}  // namespace kvrelay::metrics
