// Prometheus metrics (DESIGN §7): one registry per process, served on /metrics by an
// optional HTTP exposer (prometheus-cpp). Components take the registry and add their
// families to it; names start with `kvrelay_`, units are seconds and bytes, label values
// are bounded (no request ids).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvrelay::metrics {

// Serves a registry on http://<listen>/metrics.
class MetricsServer {
 public:
  // `listen` is host:port (port 0: any free port). UNAVAILABLE if it cannot bind,
  // INVALID_ARGUMENT for a malformed address.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Registry> registry);
  int port() const { return port_; }

  // For a binary's --metrics_listen flag: nullptr when `listen` is empty (metrics
  // off); else Start, and "METRICS <port>" on stdout (before the binary's READY line).
  static absl::StatusOr<std::unique_ptr<MetricsServer>> StartFromFlag(
      const std::string& listen, std::shared_ptr<prometheus::Registry> registry);

 private:
  MetricsServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Registry> registry_;
  int port_ = 0;
};

// Histogram buckets in seconds for request latencies (1 ms .. 120 s).
prometheus::Histogram::BucketBoundaries LatencyBuckets();
// Buckets in seconds for short steps (50 us .. 5 s): a forward pass, a transfer.
prometheus::Histogram::BucketBoundaries StepBuckets();
// Buckets for counts (1 .. 4096, powers of two): batch sizes, tokens.
prometheus::Histogram::BucketBoundaries CountBuckets();

}  // namespace kvrelay::metrics
