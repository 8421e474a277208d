// The `kvrelay` command line: subcommands as functions over (argc, argv), so
// tests can run them in-process and main.cc stays a one-liner.
#pragma once

#include <iosfwd>
#include <string>

#include "absl/status/statusor.h"

namespace kvrelay::cli {

// Dispatches argv[1] (make-model, generate, help). Returns the process exit code.
int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err);

int RunMakeModel(int argc, char** argv, std::ostream& out, std::ostream& err);
int RunGenerate(int argc, char** argv, std::ostream& out, std::ostream& err);

// The demo model folder ($KVRELAY_HOME/demo-model, else ~/.cache/kvrelay/demo-model),
// written with make-model's defaults when it does not exist yet.
absl::StatusOr<std::string> EnsureDemoModel(std::ostream& err);

}  // namespace kvrelay::cli
