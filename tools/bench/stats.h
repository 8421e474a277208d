// Statistics of `kvrelay bench serve`: per-request records, percentiles, the summary a
// run reports (vLLM `bench serve` / SGLang `bench_serving` definitions), goodput under
// SLOs, and the arrival process.
//
// Definitions (per request, from the token stream as the client saw it):
//   TTFT  send -> first token.
//   ITL   the gap before every later token; a message carrying k tokens after a gap g
//         gives k gaps of g / k (SGLang's rule), so a request has output_tokens - 1 ITLs.
//   TPOT  (E2E - TTFT) / (output_tokens - 1), for requests with >= 2 output tokens.
//   E2E   send -> end of stream.
// Summary distributions are over successful requests only (ITL over all their gaps).
// Goodput: successful requests meeting every given SLO, per second of the run.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::bench {

struct RequestRecord {
  int64_t index = 0;  // in send order
  int conversation = 0;
  int turn = 0;
  double start_seconds = 0;  // since the run began
  bool ok = false;
  std::string code = "OK";  // gRPC status code name
  std::string error;        // the status message, when !ok
  double ttft_seconds = 0;  // 0 when no token arrived
  double e2e_seconds = 0;
  double tpot_seconds = 0;  // 0 when output_tokens < 2
  std::vector<double> itl_seconds;
  // When each token arrived, since the run began (for throughput over time).
  std::vector<double> token_times;
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;           // tokens received
  int64_t expected_output_tokens = 0;  // max_tokens asked for
  int64_t cached_tokens = 0;           // from the final message
  std::string finish_reason;
  std::string prefill_mode;  // local | remote | "" (no final message)
  std::string decode_worker;
  std::string prefill_worker;
  int32_t migrations = 0;
  // The server's own timing (final message), for comparison with the client's.
  double server_ttft_seconds = 0;
  double server_queue_seconds = 0;
};

// Fills ttft/itl/tpot/e2e from the send time, the arrival time and token count of every
// message and the end time (all in seconds since the run began).
void ComputeLatencies(double send, const std::vector<std::pair<double, int>>& messages, double end,
                      RequestRecord* r);

// Linear interpolation between closest ranks (numpy's default): p in [0, 100].
// 0 for an empty set.
double Percentile(std::vector<double> values, double p);

struct Distribution {
  int64_t count = 0;
  double mean = 0, median = 0, p90 = 0, p99 = 0, min = 0, max = 0;
};
Distribution Describe(const std::vector<double>& values);

// --slo ttft=MS,tpot=MS[,itl=MS][,e2e=MS]: a negative value is an unset SLO.
struct Slo {
  double ttft_ms = -1, tpot_ms = -1, e2e_ms = -1;
  bool any() const { return ttft_ms >= 0 || tpot_ms >= 0 || e2e_ms >= 0; }
};
// INVALID_ARGUMENT saying what is wrong (unknown key, missing or negative number).
absl::StatusOr<Slo> ParseSlo(const std::string& text);
bool MeetsSlo(const RequestRecord& r, const Slo& slo);

struct Summary {
  double duration_seconds = 0;
  int64_t requests = 0;  // sent
  int64_t completed = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors_by_code;
  int64_t input_tokens = 0;   // of completed requests
  int64_t output_tokens = 0;  // of completed requests
  int64_t cached_tokens = 0;
  double request_throughput = 0;      // completed / s
  double output_throughput = 0;       // output tokens / s
  double total_token_throughput = 0;  // (input + output) / s
  int64_t good = 0;                   // completed meeting every SLO (all completed when no SLO)
  double goodput = 0;                 // good / s
  double prefix_hit_rate = 0;         // cached / input tokens
  Distribution ttft_ms, tpot_ms, itl_ms, e2e_ms;
  int64_t max_concurrency_seen = 0;
};
Summary Summarize(const std::vector<RequestRecord>& records, double duration_seconds,
                  const Slo& slo);

// Seconds between successive arrivals: gamma-distributed with mean 1 / rate and shape
// `burstiness` (1 = Poisson; < 1 burstier, > 1 steadier), as vLLM. rate = +inf: all 0.
// Deterministic for a seed (own sampler, not the library's unspecified one).
class ArrivalProcess {
 public:
  ArrivalProcess(double rate, double burstiness, uint64_t seed);
  double NextGap();

 private:
  double Unit();
  double Normal();
  double Gamma(double shape);
  double rate_, burstiness_;
  uint64_t state_;
};

}  // namespace kvrelay::bench
