// What `kvrelay bench serve` prints and writes: the result table of one run (vLLM's
// layout), one row per point of a sweep, the JSON file (every request record and the
// summary of every point) and the figures (gnuplot, PNG).
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "tools/bench/runner.h"
#include "tools/bench/stats.h"

namespace kvrelay::bench {

// One measured point: a whole run at one request rate / concurrency.
struct Point {
  std::string label;        // e.g. "concurrency=4", "rate=inf"
  double request_rate = 0;  // +inf: all at once
  int max_concurrency = 0;  // 0: unbounded
  RunResult run;
  Summary summary;
};

void PrintSummary(const Point& p, const Slo& slo, std::ostream& out);
// One row per point (header first).
void PrintSweepTable(const std::vector<Point>& points, const Slo& slo, std::ostream& out);

nlohmann::ordered_json RecordJson(const RequestRecord& r);
nlohmann::ordered_json SummaryJson(const Summary& s, const Slo& slo);
// {"config": config, "points": [{label, request_rate, max_concurrency, interrupted,
//  summary, requests: [...]}]}
nlohmann::ordered_json ReportJson(const nlohmann::ordered_json& config,
                                  const std::vector<Point>& points, const Slo& slo);

// Writes into `dir` (created): ttft_cdf.png, tpot_cdf.png, throughput_over_time.png and,
// for two points or more, latency_vs_throughput.png, plus the .dat/.gp files gnuplot read.
// FAILED_PRECONDITION when gnuplot is not installed; INTERNAL with gnuplot's output when
// it fails. `paths` (optional) receives the PNGs written.
absl::Status WritePlots(const std::vector<Point>& points, const std::string& dir,
                        std::vector<std::string>* paths = nullptr);

}  // namespace kvrelay::bench
