// The load generator's engine: replays a dataset against a running kvrelay service
// (kvrelay.v1.Generation on the router) and records what every request's stream did.
//
// Arrival: conversations start at the times of an ArrivalProcess (rate, burstiness);
// a conversation's later turns become ready when the previous reply has ended plus its
// think time. A ready request is sent at once unless `max_concurrency` requests are in
// flight, then it waits for one to end (so latencies are measured from the actual send,
// as vLLM does). With `duration_seconds` the dataset is cycled and no request is sent
// after that time; requests in flight then finish. A failed turn ends its conversation.
//
// All calls are asynchronous (gRPC callback API): token arrival times are taken in the
// read callbacks, one client thread schedules. `stop` (e.g. set by a SIGINT handler)
// cancels everything in flight; the result then holds what had finished and is marked
// interrupted (cancelled requests are recorded with code CANCELLED).
#pragma once

#include <atomic>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "kvrelay/v1/kvrelay.pb.h"
#include "tools/bench/dataset.h"
#include "tools/bench/stats.h"

namespace kvrelay::bench {

// The served model, from ListModels. UNAVAILABLE naming the server when it cannot be
// reached within `timeout_seconds`; NOT_FOUND when `model` (non-empty) is not served.
absl::StatusOr<v1::ModelInfo> FetchModelInfo(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& server, const std::string& model,
                                             double timeout_seconds);

// Tokenizes the text prompts of a jsonl dataset on the server (special tokens added, as
// for a text prompt), so that the run sends token ids and knows every input length.
absl::Status TokenizeTexts(const std::shared_ptr<grpc::Channel>& channel, const std::string& model,
                           std::vector<Conversation>* dataset);

struct Progress {
  int64_t done = 0;   // requests ended
  int64_t total = 0;  // requests to send; 0 when unknown (--duration)
  int64_t in_flight = 0;
  int64_t output_tokens = 0;
  double elapsed_seconds = 0;
  double duration_seconds = 0;  // --duration, or 0
};

struct RunOptions {
  std::string model;  // empty: the served one
  double request_rate = std::numeric_limits<double>::infinity();
  double burstiness = 1.0;
  int max_concurrency = 0;      // 0: unbounded
  double duration_seconds = 0;  // 0: send the dataset once
  v1::SamplingParams sampling;  // max_tokens is set per turn
  std::string cache_salt;
  double request_timeout_seconds = 0;  // 0: no deadline
  uint64_t seed = 0;                   // arrival process
  const std::atomic<bool>* stop = nullptr;
  std::function<void(const Progress&)> progress;  // every ~0.25 s, from the client thread
  std::string request_id_prefix = "bench";
};

struct RunResult {
  std::vector<RequestRecord> records;  // in send order
  double duration_seconds = 0;         // first send to last end
  bool interrupted = false;
};

// INVALID_ARGUMENT for bad options (naming them); otherwise runs to the end (failed
// requests are recorded, not returned as an error).
absl::StatusOr<RunResult> RunBenchmark(const std::shared_ptr<grpc::Channel>& channel,
                                       const std::vector<Conversation>& dataset,
                                       const RunOptions& options);

}  // namespace kvrelay::bench
