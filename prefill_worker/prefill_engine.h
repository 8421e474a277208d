// The prefill worker's engine (DESIGN §1 step 5): for each job, reuse the prompt's
// cached prefix, compute the rest in chunks, and push every finished run of blocks
// from the prompt's first_block on into the decode worker's pool while the next chunk
// computes; when all writes are remotely complete, sample the first token and report
// the per-block checksums. Jobs run one at a time on the engine thread, in order, from
// a bounded queue.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "common/sampling/sampler.h"
#include "common/transfer/kv_transport.h"
#include "common/worker/kv_tiers.h"
#include "prometheus/registry.h"

namespace kvrelay::prefill {

struct PrefillEngineOptions {
  int prefill_chunk = 256;             // tokens per forward pass
  size_t max_queue = 256;              // jobs waiting beyond this get RESOURCE_EXHAUSTED
  transfer::TransferOptions transfer;  // chunking, window, timeout of each write
  // Where the engine's Prometheus series go (DESIGN §7; the prefill service adds its
  // own to the same registry). Null: a registry of the engine's own.
  std::shared_ptr<prometheus::Registry> metrics = nullptr;
  // The pool's lower tiers (host memory, disk), or null: a job first copies back up the
  // blocks of its prompt that follow its pool prefix hit and that a lower tier holds, and
  // ships them like cached blocks, without recomputing them. Outlives the engine.
  worker::KvTierStore* tiers = nullptr;
};

struct PrefillJob {
  std::string id;
  std::vector<int32_t> prompt;
  sampling::SamplingParams params;  // for the first token
  std::string cache_salt;
  transfer::PoolDescriptor destination;
  int64_t first_block = 0;                  // prompt blocks before this are not sent
  std::vector<int32_t> destination_blocks;  // for prompt blocks first_block, first_block+1, ...
  // The destination's KV: must equal this worker's (FAILED_PRECONDITION otherwise).
  std::string model_id;
  int block_size = 0;
  std::string kv_dtype;
  uint64_t lease_generation = 0;  // with id, names the decode worker's lease
};

struct PrefillOutcome {
  sampling::SampleResult first;
  std::vector<uint64_t> checksums;  // of each sent block, in order
  int64_t cached_tokens = 0;
  int64_t host_cached_tokens = 0;  // of cached_tokens, reloaded from the host tier
  int64_t disk_cached_tokens = 0;  // ... and from the disk tier
  int64_t computed_tokens = 0;
  uint64_t transfer_bytes = 0;
  int64_t puts = 0;
  double transfer_seconds = 0;       // first write issued to last write complete
  double transfer_wait_seconds = 0;  // end of the computation to last write complete
  double prefill_seconds = 0;        // whole job
  std::string transport;
};

// Runs exactly once: the outcome, or CANCELLED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED
// (pool too small), UNAVAILABLE (the destination failed), DEADLINE_EXCEEDED (a write
// timed out). On the engine thread, except for a job cancelled while still queued (on
// the caller of Cancel). Whatever the status, no write of the job can land in the
// destination any more when it runs: that is the decode worker's acknowledgement.
using PrefillDone = std::function<void(absl::StatusOr<PrefillOutcome>)>;

class PrefillEngine {
 public:
  // `memory` is `pool`'s memory, registered with `transport` (the source of writes).
  PrefillEngine(const model::Model* model, kvcache::KvPool* pool,
                const transfer::RegisteredMemory* memory, kvcache::PrefixCache* cache,
                transfer::KvTransport* transport, std::string model_id,
                const PrefillEngineOptions& options);
  // Ends queued jobs with UNAVAILABLE after the running one finishes or is cancelled.
  ~PrefillEngine();

  // Checks the job (INVALID_ARGUMENT naming what is wrong: prompt, sampling, the
  // destination's geometry, the block list) and queues it.
  absl::StatusOr<uint64_t> Submit(PrefillJob job, PrefillDone done);
  // Ends a job with CANCELLED: it stops computing and writing; its in-flight writes are
  // cancelled and the endpoint flushed before `done` runs. No effect once it ended.
  void Cancel(uint64_t handle);

  // Cancels the job(s) of this request id and lease generation, queued or running;
  // `ended(found)` runs once they have ended (their `done` has run), or at once with
  // false when there is none. On the engine thread or the caller's.
  void Abort(const std::string& request_id, uint64_t lease_generation,
             std::function<void(bool found)> ended);

  int64_t queued() const;

  // For load reports: jobs running (0 or 1) and queued, and the prompt tokens they
  // still cover (an upper bound on what is left to compute: cached blocks not counted).
  struct Load {
    int64_t running = 0;
    int64_t queued = 0;
    int64_t tokens = 0;
  };
  Load load() const;

  // The registry holding the engine's series: options.metrics, or the engine's own.
  // Series (updated per job or per forward pass):
  //   kvrelay_prefill_queue_depth, kvrelay_prefill_seconds (successful jobs),
  //   kvrelay_prefill_{computed,cached}_tokens_total,
  //   kvrelay_kv_transfer_bytes_total{transport}, kvrelay_kv_transfer_puts_total{transport},
  //   kvrelay_kv_transfer_seconds{transport} (first write issued to last write complete,
  //     jobs whose writes all succeeded),
  //   kvrelay_kv_transfer_failures_total{reason} (unavailable | timeout | cancelled |
  //     invalid | other), kvrelay_kv_blocks{state} (free | in_use | cached_free),
  //   kvrelay_kv_evictions_total.
  const std::shared_ptr<prometheus::Registry>& metrics() const { return registry_; }
  // Sets kvrelay_kv_blocks from the prefix cache now. The engine does after every job;
  // the worker's load-report path calls it too. Any thread.
  void UpdateKvBlockGauges();

 private:
  struct Job;
  struct Metrics;
  void Loop();
  absl::StatusOr<PrefillOutcome> Run(Job& job);
  void SetQueueDepth() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const model::Model* model_;
  kvcache::KvPool* pool_;
  const transfer::RegisteredMemory* memory_;
  kvcache::PrefixCache* cache_;
  transfer::KvTransport* transport_;
  const std::string model_id_;
  const PrefillEngineOptions options_;
  const std::shared_ptr<prometheus::Registry> registry_;
  const std::unique_ptr<Metrics> metrics_;  // its series live in registry_

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<Job> running_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
  std::thread thread_;
};

// INVALID_ARGUMENT unless `job` fits `model` and a pool of `layout` (same block bytes
// as the destination, one destination block per prompt block from first_block on,
// each inside the destination pool, no repeats).
absl::Status ValidateJob(const model::Model& model, const kernels::PagedKvLayout& layout,
                         const PrefillJob& job);
// FAILED_PRECONDITION unless the job's model id, block size and KV dtype are these.
absl::Status CheckSameKv(const PrefillJob& job, const std::string& model_id,
                         const kernels::PagedKvLayout& layout);

}  // namespace kvrelay::prefill
