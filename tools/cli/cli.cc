#include "tools/cli/cli.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <ostream>

#include "common/model/model_maker.h"
#include "common/util/file.h"

namespace kvrelay::cli {

absl::StatusOr<std::string> EnsureDemoModel(std::ostream& err) {
  std::string home;
  if (const char* h = std::getenv("KVRELAY_HOME"); h != nullptr && *h != '\0') {
    home = h;
  } else if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    home = JoinPath(xdg, "kvrelay");
  } else {
    const char* user_home = std::getenv("HOME");
    home = JoinPath(user_home != nullptr ? user_home : "/tmp", ".cache/kvrelay");
  }
  const std::string dir = JoinPath(home, "demo-model");
  if (FileExists(JoinPath(dir, "model.safetensors"))) return dir;
  err << "kvrelay: writing the demo model (random weights) to " << dir << "\n";
  // Write to a temporary folder and rename, so a concurrent or interrupted run never
  // leaves a half-written demo model behind.
  const std::string tmp = dir + ".tmp." + std::to_string(::getpid());
  model::MakeModelOptions options;
  options.layers = 4;
  options.hidden = 256;
  options.heads = 8;
  options.kv_heads = 4;
  options.vocab = 1024;
  absl::Status s = model::MakeModel(options, tmp);
  std::error_code ignored;
  if (!s.ok()) {
    std::filesystem::remove_all(tmp, ignored);
    return s;
  }
  if (std::rename(tmp.c_str(), dir.c_str()) != 0 &&
      !FileExists(JoinPath(dir, "model.safetensors"))) {
    return absl::InternalError("cannot move " + tmp + " to " + dir);
  }
  std::filesystem::remove_all(tmp, ignored);  // only left when another run won the rename
  return dir;
}

namespace {

void Usage(std::ostream& out) {
  out << "usage: kvrelay <command> [flags]\n\n"
         "commands:\n"
         "  make-model   write a small random-weight Hugging Face model folder\n"
         "  generate     generate text: from a model folder (single process), or from a\n"
         "               server with --server HOST:PORT\n"
         "  local        run the router, prefill and decode workers on this machine\n"
         "  bench serve  drive a running service with a workload; latency, throughput,\n"
         "               goodput, prefix hit rate (table, JSON, PNG figures)\n"
         "  health       ask a kvrelay port's gRPC health service (TLS and mTLS too)\n"
         "  help         this text\n\n"
         "Run 'kvrelay <command> --help' for the flags of a command.\n";
}

}  // namespace

int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err) {
  if (argc < 2) {
    Usage(err);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "make-model") return RunMakeModel(argc, argv, out, err);
  if (cmd == "generate") return RunGenerate(argc, argv, out, err);
  if (cmd == "local") return RunLocal(argc, argv, out, err);
  if (cmd == "bench") return RunBench(argc, argv, out, err);
  if (cmd == "health") return RunHealth(argc, argv, out, err);
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    Usage(out);
    return 0;
  }
  err << "kvrelay: unknown command '" << cmd << "'\n";
  Usage(err);
  return 2;
}

}  // namespace kvrelay::cli
