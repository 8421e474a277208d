// The flags and start-up every kvrelay server process shares (router, decode and prefill
// workers), written once: --metrics_listen, --drain_seconds, --exit_linger_seconds, and
// the transport security flags (--tls_cert, --tls_key, --tls_ca,
// --tls_require_client_cert, --tls_server_name, --cluster_token_file).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/metrics/metrics.h"
#include "common/rpc/security.h"
#include "prometheus/registry.h"

namespace kvrelay::process {

// What SetUp made from the shared flags.
struct Process {
  std::string name;  // e.g. "kvrelay-decode", the prefix of every line it prints
  std::shared_ptr<prometheus::Registry> metrics;           // served on --metrics_listen
  std::unique_ptr<metrics::MetricsServer> metrics_server;  // null without --metrics_listen
  rpc::Security security;

  // Failed(name, status): for main's returns after SetUp.
  int Fail(const absl::Status& status) const;
  // Prints "READY <port>", then waits for SIGTERM/SIGINT and calls
  // `shutdown(--drain_seconds, --exit_linger_seconds)`. Returns main's exit code.
  int ServeUntilStopped(
      int port,
      const std::function<void(absl::Duration grace, absl::Duration linger)>& shutdown) const;
};

// Parses the command line (absl flags), installs the stop signals, loads the security
// files (warning on stderr when internal ports stay open) and starts /metrics.
absl::StatusOr<Process> SetUp(const char* name, const char* usage, int argc, char** argv);

// Prints "<name>: <status>" on stderr; returns main's exit code: 2 for bad flags
// (INVALID_ARGUMENT, NOT_FOUND), else 1.
int Failed(const std::string& name, const absl::Status& status);

// The security flags alone (for tests and tools that parse flags themselves).
absl::StatusOr<rpc::Security> SecurityFromFlags();

}  // namespace kvrelay::process
