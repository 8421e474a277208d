// A minimal HTTP/1.0 GET over loopback for tests that scrape /metrics.
#pragma once

#include <optional>
#include <string>

#include "absl/time/time.h"

namespace kvrelay::testing {

// The body of http://127.0.0.1:<port><path> if the status is 200; nullopt otherwise or
// when no complete answer arrives within `timeout`.
std::optional<std::string> HttpGet(int port, const std::string& path,
                                   absl::Duration timeout = absl::Seconds(30));

// The /metrics text of 127.0.0.1:<port> ("" when it does not answer).
std::string ScrapeMetrics(int port);

// Sum of the samples of `name` (a whole series name, e.g. "x_total" or "x_count") in the
// Prometheus text `text` whose label set contains `label` (e.g. code="OK"; empty: any).
// -1 when there is none.
double MetricSum(const std::string& text, const std::string& name, const std::string& label = "");

// Runs `promtool check metrics` on `text`; its output, and whether it passed.
bool PromtoolCheckMetrics(const std::string& text, std::string* output);

}  // namespace kvrelay::testing
