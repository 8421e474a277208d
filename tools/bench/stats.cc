#include "tools/bench/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvrelay::bench {

void ComputeLatencies(double send, const std::vector<std::pair<double, int>>& messages, double end,
                      RequestRecord* r) {
  r->itl_seconds.clear();
  r->token_times.clear();
  r->ttft_seconds = 0;
  r->tpot_seconds = 0;
  r->e2e_seconds = end - send;
  int64_t tokens = 0;
  double last = send;
  for (const auto& [t, k] : messages) {
    if (k <= 0) continue;
    if (tokens == 0) {
      r->ttft_seconds = t - send;
      // Tokens after the first in the first message arrived with no gap.
      for (int i = 1; i < k; ++i) r->itl_seconds.push_back(0.0);
    } else {
      for (int i = 0; i < k; ++i) r->itl_seconds.push_back((t - last) / k);
    }
    for (int i = 0; i < k; ++i) r->token_times.push_back(t);
    tokens += k;
    last = t;
  }
  r->output_tokens = tokens;
  if (tokens >= 2) r->tpot_seconds = (r->e2e_seconds - r->ttft_seconds) / (tokens - 1);
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * (v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - lo);
}

Distribution Describe(const std::vector<double>& values) {
  Distribution d;
  d.count = static_cast<int64_t>(values.size());
  if (values.empty()) return d;
  d.mean = std::accumulate(values.begin(), values.end(), 0.0) / values.size();
  d.median = Percentile(values, 50);
  d.p90 = Percentile(values, 90);
  d.p99 = Percentile(values, 99);
  auto [mn, mx] = std::minmax_element(values.begin(), values.end());
  d.min = *mn;
  d.max = *mx;
  return d;
}

absl::StatusOr<Slo> ParseSlo(const std::string& text) {
  Slo slo;
  if (text.empty()) return absl::InvalidArgumentError("--slo: empty (want e.g. ttft=500,tpot=50)");
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<absl::string_view> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    double ms = 0;
    absl::string_view value = kv.size() == 2 ? absl::StripSuffix(kv[1], "ms") : "";
    if (kv.size() != 2 || !absl::SimpleAtod(value, &ms) || !std::isfinite(ms) || ms < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--slo: '", part, "' is not KEY=MILLISECONDS (e.g. ttft=500,tpot=50)"));
    }
    if (kv[0] == "ttft") {
      slo.ttft_ms = ms;
    } else if (kv[0] == "tpot") {
      slo.tpot_ms = ms;
    } else if (kv[0] == "e2e" || kv[0] == "e2el") {
      slo.e2e_ms = ms;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--slo: unknown metric '", kv[0], "' (known: ttft, tpot, e2e)"));
    }
  }
  return slo;
}

bool MeetsSlo(const RequestRecord& r, const Slo& slo) {
  if (!r.ok) return false;
  if (slo.ttft_ms >= 0 && r.ttft_seconds * 1e3 > slo.ttft_ms) return false;
  if (slo.tpot_ms >= 0 && r.tpot_seconds * 1e3 > slo.tpot_ms) return false;
  if (slo.e2e_ms >= 0 && r.e2e_seconds * 1e3 > slo.e2e_ms) return false;
  return true;
}

Summary Summarize(const std::vector<RequestRecord>& records, double duration, const Slo& slo) {
  Summary s;
  s.duration_seconds = duration;
  std::vector<double> ttft, tpot, itl, e2e;
  std::vector<std::pair<double, int>> edges;  // (time, +1 start / -1 end)
  for (const RequestRecord& r : records) {
    ++s.requests;
    edges.push_back({r.start_seconds, +1});
    edges.push_back({r.start_seconds + r.e2e_seconds, -1});
    if (!r.ok) {
      ++s.failed;
      ++s.errors_by_code[r.code];
      continue;
    }
    ++s.completed;
    s.input_tokens += r.input_tokens;
    s.output_tokens += r.output_tokens;
    s.cached_tokens += r.cached_tokens;
    if (r.output_tokens >= 1) ttft.push_back(r.ttft_seconds * 1e3);
    if (r.output_tokens >= 2) tpot.push_back(r.tpot_seconds * 1e3);
    for (double g : r.itl_seconds) itl.push_back(g * 1e3);
    e2e.push_back(r.e2e_seconds * 1e3);
    if (MeetsSlo(r, slo)) ++s.good;
  }
  // Ends sort before starts at the same instant: back-to-back requests do not overlap.
  std::sort(edges.begin(), edges.end());
  int64_t live = 0;
  for (const auto& e : edges)
    s.max_concurrency_seen = std::max(s.max_concurrency_seen, live += e.second);
  if (duration > 0) {
    s.request_throughput = s.completed / duration;
    s.output_throughput = s.output_tokens / duration;
    s.total_token_throughput = (s.input_tokens + s.output_tokens) / duration;
    s.goodput = s.good / duration;
  }
  if (s.input_tokens > 0) s.prefix_hit_rate = static_cast<double>(s.cached_tokens) / s.input_tokens;
  s.ttft_ms = Describe(ttft);
  s.tpot_ms = Describe(tpot);
  s.itl_ms = Describe(itl);
  s.e2e_ms = Describe(e2e);
  return s;
}

ArrivalProcess::ArrivalProcess(double rate, double burstiness, uint64_t seed)
    : rate_(rate), burstiness_(burstiness), state_(seed ^ 0x9E3779B97F4A7C15ull) {}

// splitmix64: a fixed, portable sequence.
double ArrivalProcess::Unit() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53;  // in (0, 1)
}

double ArrivalProcess::Normal() {  // Box-Muller
  const double u1 = Unit(), u2 = Unit();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// Marsaglia & Tsang; shape < 1 via the boost Gamma(shape + 1) x U^(1 / shape).
double ArrivalProcess::Gamma(double shape) {
  if (shape < 1) return Gamma(shape + 1) * std::pow(Unit(), 1.0 / shape);
  const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x, v;
    do {
      x = Normal();
      v = 1.0 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = Unit();
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v;
  }
}

double ArrivalProcess::NextGap() {
  if (std::isinf(rate_)) return 0;
  // Gamma(shape k, scale theta) has mean k x theta = 1 / rate.
  return Gamma(burstiness_) / (burstiness_ * rate_);
}

}  // namespace kvrelay::bench
