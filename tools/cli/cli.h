// The `kvrelay` command line: subcommands as functions over (argc, argv), so
// tests can run them in-process and main.cc stays a one-liner.
#pragma once

#include <iosfwd>
#include <string>

#include "absl/status/statusor.h"

namespace kvrelay::cli {

// Dispatches argv[1] (make-model, generate, local, bench, health, help). Returns the
// process exit code.
int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err);

int RunMakeModel(int argc, char** argv, std::ostream& out, std::ostream& err);
// Single process with --model (or the demo model), or a client of a server with --server.
int RunGenerate(int argc, char** argv, std::ostream& out, std::ostream& err);
// Router + prefill + decode workers as child processes on this machine (tools/cli/local_cmd.cc).
int RunLocal(int argc, char** argv, std::ostream& out, std::ostream& err);
// `bench serve`: the load generator against a running service (tools/cli/bench_cmd.cc).
int RunBench(int argc, char** argv, std::ostream& out, std::ostream& err);
// `health`: the gRPC health check of a kvrelay port, TLS and mTLS included (the Helm
// chart's exec probe when TLS is on: kubelet's gRPC probes speak plaintext only).
int RunHealth(int argc, char** argv, std::ostream& out, std::ostream& err);

// The demo model folder ($KVRELAY_HOME/demo-model, else ~/.cache/kvrelay/demo-model),
// written with make-model's defaults when it does not exist yet.
absl::StatusOr<std::string> EnsureDemoModel(std::ostream& err);

}  // namespace kvrelay::cli
