// The decode worker's engine (DESIGN §1 step 6): continuous batching over one model, one
// KV pool and its prefix cache. Every step is one forward pass over the running
// sequences: one token for each sequence that is decoding, and prefill chunks of the
// others under a per-step token budget, so prefill is chunked and interleaved with
// decode. Sequences join and leave at every step. When the pool runs out of blocks
// the most recently admitted sequence is preempted (its blocks freed; its full blocks
// stay in the prefix cache) and recomputed later from its prompt plus the tokens it has
// generated, so its output is unchanged. One thread runs the loop; Submit and Cancel
// may be called from any thread; callbacks run on the engine thread.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/kv_sequence.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "common/sampling/sampler.h"

namespace kvrelay::decode {

struct EngineOptions {
  int max_batch_tokens = 512;  // tokens per forward pass: decode tokens + prefill chunks
  int max_running = 64;        // sequences in the running batch
  int prefill_chunk = 256;     // most tokens of one sequence's prefill per step
  size_t max_waiting = 1024;   // requests queued beyond that get RESOURCE_EXHAUSTED
};

struct EngineRequest {
  std::string id;  // for messages
  std::vector<int32_t> prompt;
  sampling::SamplingParams params;
  std::string cache_salt;
};

// Tokens produced by one step for one request (one token per step today).
struct StepOutput {
  std::vector<int32_t> tokens;
  std::vector<sampling::SampleResult> samples;
};

struct RequestSummary {
  std::string finish_reason;  // "stop", "length"; empty on error
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens reused from the prefix cache (first admission)
  int64_t preemptions = 0;
  double queue_seconds = 0;  // submit to first admission
  double ttft_seconds = 0;   // submit to first token
};

struct RequestCallbacks {
  std::function<void(const StepOutput&)> on_tokens;
  // Exactly once: OK with the finish reason, or CANCELLED, RESOURCE_EXHAUSTED (the prompt
  // can never fit the pool), UNAVAILABLE (engine shutting down), INTERNAL.
  std::function<void(const absl::Status&, const RequestSummary&)> on_done;
};

struct EngineStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t last_batch_sequences = 0;
  int64_t last_batch_tokens = 0;
  int64_t max_batch_sequences = 0;  // most sequences in one step so far
};

class Engine {
 public:
  // `cache` manages `pool`'s blocks; both and `model` outlive the engine. `model_id`
  // names the model in block hashes. INVALID_ARGUMENT on bad options.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const model::Model* model,
                                                        kvcache::KvPool* pool,
                                                        kvcache::PrefixCache* cache,
                                                        std::string model_id,
                                                        const EngineOptions& options);
  // Stops the loop; requests still queued or running end with UNAVAILABLE.
  ~Engine();

  // Queues a request; returns its handle. INVALID_ARGUMENT (bad prompt or sampling
  // parameters, naming what is wrong), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE
  // (draining). On error no callback runs.
  absl::StatusOr<uint64_t> Submit(EngineRequest request, RequestCallbacks callbacks);
  // Ends a request with CANCELLED and releases its blocks (at the next step boundary).
  // No effect once it has ended.
  void Cancel(uint64_t handle);
  // New requests get UNAVAILABLE from now on.
  void StopAccepting();
  // Stops accepting requests and waits until every accepted one has ended.
  void Drain();

  EngineStats stats() const;
  const model::Model& model() const { return *model_; }

 private:
  struct Seq;
  Engine(const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
         std::string model_id, const EngineOptions& options);
  void Loop();
  void Step();
  bool Admit(Seq* s);
  void Preempt(Seq* s);
  void Finish(Seq* s, const absl::Status& status, std::string finish_reason);

  const model::Model* model_;
  kvcache::KvPool* pool_;
  kvcache::PrefixCache* cache_;
  const std::string model_id_;
  const EngineOptions options_;

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Seq>> incoming_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t active_ ABSL_GUARDED_BY(mu_) = 0;  // accepted and not yet ended
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);

  // Engine thread only.
  absl::flat_hash_map<uint64_t, std::unique_ptr<Seq>> seqs_;
  std::deque<Seq*> waiting_;   // not admitted, or preempted (front: next to admit)
  std::vector<Seq*> running_;  // in admission order
  std::vector<float> logits_;

  std::thread thread_;
};

}  // namespace kvrelay::decode
