// Helpers for integration tests that run kvrelay's own binaries as processes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "tests/testing/subprocess.h"

namespace kvrelay::testing {

// Generous: a loaded 2-core CI machine.
constexpr absl::Duration kProcessTimeout = absl::Seconds(120);

// Random token ids below `vocab`.
std::vector<int32_t> RandomPrompt(int n, uint32_t seed, int vocab = 400);

// `kvrelay generate --model dir --prompt-ids ... --max-tokens n --ignore-eos --json`:
// the generated token ids (the single-process reference). Fails the test on error.
std::vector<int32_t> CliGenerate(const std::string& model_dir, const std::vector<int32_t>& prompt,
                                 int max_tokens, const std::vector<std::string>& extra = {});

// A worker binary (kvrelay-decode, kvrelay-prefill) started with `args`, once it has
// printed "READY <port>".
struct WorkerProcess {
  std::optional<Subprocess> process;
  int port = 0;
  int metrics_port = 0;            // with --metrics_listen: from its "METRICS <port>" line
  int http_port = 0;               // kvrelay-router --http_listen: from its "HTTP <port>" line
  std::string host = "127.0.0.1";  // where it listens
  std::string address() const { return host + ":" + std::to_string(port); }
};
// Empty `process` (and a test failure) if it does not start. `wrapper` runs it, e.g.
// {"ip", "netns", "exec", "ns1"} (then `host` should say where it listens).
WorkerProcess StartWorker(const std::string& binary, const std::vector<std::string>& args,
                          const std::vector<std::string>& wrapper = {},
                          const std::string& host = "127.0.0.1");

}  // namespace kvrelay::testing
