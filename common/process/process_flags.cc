#include "common/process/process_flags.h"

#include <cstdio>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/util/stop_signal.h"

ABSL_FLAG(std::string, metrics_listen, "",
          "host:port serving Prometheus /metrics (port 0: any free port; empty: off)");
ABSL_FLAG(double, drain_seconds, 30, "on SIGTERM, how long running requests may finish");
ABSL_FLAG(double, exit_linger_seconds, 1,
          "after draining, how long connections stay open before the server closes them: "
          "closing at once resets connections whose clients have not read the last messages");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate (chain) this process presents: its gRPC port speaks TLS (empty: "
          "plaintext)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle the peers' certificates are verified against (clients dial TLS)");
ABSL_FLAG(bool, tls_require_client_cert, false,
          "mutual TLS: internal RPCs (workers' services, the router's Registry) accept only "
          "callers presenting a certificate signed by --tls_ca");
ABSL_FLAG(std::string, tls_server_name, "",
          "name the certificates of internal peers are checked against instead of the host "
          "dialled (e.g. one name every node certificate carries)");
ABSL_FLAG(std::string, cluster_token_file, "",
          "file holding the shared cluster token every internal RPC carries and requires "
          "(empty: none)");

namespace kvrelay::process {

int Failed(const std::string& name, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", name.c_str(), status.ToString().c_str());
  return absl::IsInvalidArgument(status) || absl::IsNotFound(status) ? 2 : 1;
}

int Process::Fail(const absl::Status& status) const { return Failed(name, status); }

int Process::ServeUntilStopped(
    int port,
    const std::function<void(absl::Duration grace, absl::Duration linger)>& shutdown) const {
  std::printf("READY %d\n", port);
  std::fflush(stdout);
  const int sig = WaitForStopSignal();
  std::fprintf(stderr, "%s: signal %d, draining\n", name.c_str(), sig);
  shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)),
           absl::Seconds(absl::GetFlag(FLAGS_exit_linger_seconds)));
  return 0;
}

absl::StatusOr<rpc::Security> SecurityFromFlags() {
  rpc::SecurityOptions o;
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  o.require_client_cert = absl::GetFlag(FLAGS_tls_require_client_cert);
  o.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  o.cluster_token_file = absl::GetFlag(FLAGS_cluster_token_file);
  return rpc::Security::Load(o);
}

absl::StatusOr<Process> SetUp(const char* name, const char* usage, int argc, char** argv) {
  absl::SetProgramUsageMessage(usage);
  absl::ParseCommandLine(argc, argv);
  Process p;
  p.name = name;
  if (absl::Status s = InstallStopSignals(); !s.ok()) return absl::InternalError(s.ToString());
  absl::StatusOr<rpc::Security> security = SecurityFromFlags();
  if (!security.ok()) return security.status();
  p.security = *std::move(security);
  std::fprintf(stderr, "%s: %s\n", name, p.security.Describe().c_str());
  if (!p.security.internal_authenticated()) {
    std::fprintf(stderr,
                 "%s: warning: internal RPCs are open to anyone who reaches this port (set "
                 "--cluster_token_file or --tls_require_client_cert)\n",
                 name);
  }
  p.metrics = std::make_shared<prometheus::Registry>();
  p.security.CountRefusalsIn(*p.metrics);
  absl::StatusOr<std::unique_ptr<metrics::MetricsServer>> m =
      metrics::MetricsServer::StartFromFlag(absl::GetFlag(FLAGS_metrics_listen), p.metrics);
  if (!m.ok()) return m.status();
  p.metrics_server = *std::move(m);
  return p;
}

}  // namespace kvrelay::process
