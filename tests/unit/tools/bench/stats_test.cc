#include "tools/bench/stats.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::bench {
namespace {

using ::testing::HasSubstr;

TEST(StatsTest, PercentilesInterpolateLikeNumpy) {
  const std::vector<double> v = {5, 1, 4, 2, 3};  // sorted: 1 2 3 4 5
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 3);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 4.6);  // numpy.percentile([1..5], 90)
  EXPECT_DOUBLE_EQ(Percentile(v, 99), 4.96);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 5);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  const Distribution d = Describe(v);
  EXPECT_EQ(d.count, 5);
  EXPECT_DOUBLE_EQ(d.mean, 3);
  EXPECT_DOUBLE_EQ(d.min, 1);
  EXPECT_DOUBLE_EQ(d.max, 5);
  EXPECT_LE(d.median, d.p90);
  EXPECT_LE(d.p90, d.p99);
}

TEST(StatsTest, LatenciesFromMessages) {
  RequestRecord r;
  // Sent at 1.0; a first message with 1 token at 1.5, one with 2 tokens at 1.7, one with
  // 1 at 1.8; the stream ends at 1.9.
  ComputeLatencies(1.0, {{1.5, 1}, {1.7, 2}, {1.8, 1}}, 1.9, &r);
  EXPECT_EQ(r.output_tokens, 4);
  EXPECT_DOUBLE_EQ(r.ttft_seconds, 0.5);
  ASSERT_EQ(r.itl_seconds.size(), 3u);        // output - 1
  EXPECT_NEAR(r.itl_seconds[0], 0.1, 1e-12);  // 0.2 over 2 tokens
  EXPECT_NEAR(r.itl_seconds[1], 0.1, 1e-12);
  EXPECT_NEAR(r.itl_seconds[2], 0.1, 1e-12);
  EXPECT_NEAR(r.e2e_seconds, 0.9, 1e-12);
  EXPECT_NEAR(r.tpot_seconds, 0.4 / 3, 1e-12);
  EXPECT_EQ(r.token_times.size(), 4u);
  RequestRecord one;
  ComputeLatencies(0, {{0.2, 1}}, 0.3, &one);
  EXPECT_EQ(one.tpot_seconds, 0);
  EXPECT_TRUE(one.itl_seconds.empty());
}

RequestRecord Req(double start, double ttft_ms, double tpot_ms, int out, bool ok = true) {
  RequestRecord r;
  r.start_seconds = start;
  r.ok = ok;
  r.code = ok ? "OK" : "UNAVAILABLE";
  r.ttft_seconds = ttft_ms / 1e3;
  r.tpot_seconds = tpot_ms / 1e3;
  r.output_tokens = out;
  r.input_tokens = 100;
  r.cached_tokens = 25;
  r.e2e_seconds = r.ttft_seconds + r.tpot_seconds * (out - 1);
  r.itl_seconds.assign(out - 1, r.tpot_seconds);
  return r;
}

TEST(StatsTest, SummaryThroughputGoodputHitRateAndErrors) {
  std::vector<RequestRecord> rs = {Req(0, 100, 10, 11), Req(0, 300, 10, 11), Req(0.5, 100, 60, 11),
                                   Req(1, 0, 0, 1, /*ok=*/false)};
  absl::StatusOr<Slo> slo = ParseSlo("ttft=200,tpot=50");
  ASSERT_TRUE(slo.ok());
  const Summary s = Summarize(rs, 2.0, *slo);
  EXPECT_EQ(s.requests, 4);
  EXPECT_EQ(s.completed, 3);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.errors_by_code.at("UNAVAILABLE"), 1);
  EXPECT_EQ(s.output_tokens, 33);
  EXPECT_DOUBLE_EQ(s.request_throughput, 1.5);
  EXPECT_DOUBLE_EQ(s.output_throughput, 16.5);
  EXPECT_EQ(s.good, 1);  // only the first meets both
  EXPECT_DOUBLE_EQ(s.goodput, 0.5);
  EXPECT_LE(s.goodput, s.request_throughput);
  EXPECT_DOUBLE_EQ(s.prefix_hit_rate, 0.25);
  EXPECT_EQ(s.ttft_ms.count, 3);
  EXPECT_DOUBLE_EQ(s.ttft_ms.median, 100);
  EXPECT_EQ(s.itl_ms.count, 30);
  // [0, 0.2] and [0, 0.4] overlap (the zero-length failure at 1 overlaps nothing).
  EXPECT_EQ(s.max_concurrency_seen, 2);
  // Without SLOs every completed request is good.
  EXPECT_EQ(Summarize(rs, 2.0, Slo()).good, 3);
}

TEST(StatsTest, SloSyntax) {
  absl::StatusOr<Slo> s = ParseSlo("ttft=500ms,tpot=50,e2e=2000");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->ttft_ms, 500);
  EXPECT_EQ(s->tpot_ms, 50);
  EXPECT_EQ(s->e2e_ms, 2000);
  for (const char* bad : {"", "ttft", "ttft=", "ttft=-1", "ttft=x", "latency=5", "ttft=5,,"}) {
    EXPECT_EQ(ParseSlo(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(ParseSlo("latency=5").status().message(), HasSubstr("unknown metric 'latency'"));
}

TEST(StatsTest, PoissonArrivalsHaveTheRequestedMeanRate) {
  for (double burstiness : {1.0, 0.5, 4.0}) {
    ArrivalProcess a(8.0, burstiness, /*seed=*/42);
    const int n = 20000;
    double sum = 0, sq = 0;
    for (int i = 0; i < n; ++i) {
      const double g = a.NextGap();
      ASSERT_GE(g, 0);
      sum += g;
      sq += g * g;
    }
    const double mean = sum / n, var = sq / n - mean * mean;
    EXPECT_NEAR(n / sum, 8.0, 8.0 * 0.03) << burstiness;
    // Gamma(k, 1/(k rate)): coefficient of variation^2 = 1/k (1 for Poisson).
    EXPECT_NEAR(var / (mean * mean), 1.0 / burstiness, 0.1 / burstiness) << burstiness;
  }
  ArrivalProcess a(3, 1, 7), b(3, 1, 7);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.NextGap(), b.NextGap());
  ArrivalProcess inf(std::numeric_limits<double>::infinity(), 1, 0);
  EXPECT_EQ(inf.NextGap(), 0);
}

}  // namespace
}  // namespace kvrelay::bench
