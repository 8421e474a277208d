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
#include "absl/time/time.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/kv_sequence.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "common/sampling/sampler.h"
#include "common/transfer/kv_transport.h"
#include "common/worker/kv_tiers.h"
#include "decode_worker/prefill_client.h"
#include "kvrelay/v1/worker.pb.h"
#include "prometheus/registry.h"

namespace kvrelay::decode {

struct EngineOptions {
  int max_batch_tokens = 512;  // tokens per forward pass: decode tokens + prefill chunks
  int max_running = 64;        // sequences in the running batch
  int prefill_chunk = 256;     // most tokens of one sequence's prefill per step
  size_t max_waiting = 1024;   // requests queued beyond that get RESOURCE_EXHAUSTED
  // Where the engine's Prometheus series go (DESIGN §7; the decode service adds its own
  // to the same registry). Null: a registry of the engine's own.
  std::shared_ptr<prometheus::Registry> metrics = nullptr;
  // False: the engine records no series at all (the metrics-off baseline of
  // tests/bench/engine_metrics_bench.cc).
  bool record_metrics = true;
  // The pool's lower tiers (host memory, disk), or null. On admission the blocks of the
  // prompt that follow the pool's prefix hit and that a lower tier holds are copied back
  // up (off the step loop: the sequence waits, the others keep stepping) before the rest
  // is prefilled. Outlives the engine.
  worker::KvTierStore* tiers = nullptr;
};

struct EngineRequest {
  std::string id;  // unique; also names the prefill job on a prefill worker
  std::vector<int32_t> prompt;
  sampling::SamplingParams params;
  std::string cache_salt;
  // Remote plan: host:port of the prefill worker that computes the prompt's KV and
  // pushes it into this pool. Empty: prefill here.
  std::string prefill_address;
  // Migration: the last `resumed_tokens` of `prompt` were generated for this request
  // earlier (by another decode worker). They count as output (penalties, max_tokens)
  // and generation continues after them. Local prefill only.
  int64_t resumed_tokens = 0;
  // The client's deadline: a remote prefill call gets at most the time left.
  absl::Time deadline = absl::InfiniteFuture();
};

// What remote prefill needs: a client of prefill workers and this pool's memory as
// registered with the KV transport (its descriptor is sent to the prefill worker).
struct EngineRemote {
  PrefillClient* client = nullptr;
  const transfer::RegisteredMemory* memory = nullptr;
  absl::Duration prefill_timeout = absl::Seconds(60);
  absl::Duration abort_retry = absl::Milliseconds(500);
};

// Tokens produced by one step for one request (one token per step today).
struct RequestSummary;
struct StepOutput {
  std::vector<int32_t> tokens;
  std::vector<sampling::SampleResult> samples;
  // With the request's first token: how its prompt was prefilled (cached tokens, prefill
  // mode, transfer), so a stream cut short (stop string, failure) still reports it.
  std::shared_ptr<const RequestSummary> prefill;
};

struct RequestSummary {
  std::string finish_reason;  // "stop", "length"; empty on error
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;       // prompt tokens reused from the prefix cache (first admission)
  int64_t host_cached_tokens = 0;  // of cached_tokens, reloaded from the host tier
  int64_t disk_cached_tokens = 0;  // ... and from the disk tier
  int64_t preemptions = 0;
  double queue_seconds = 0;           // submit to first admission
  double ttft_seconds = 0;            // submit to first token
  bool remote_prefill = false;        // the prompt's KV came from a prefill worker
  int64_t remote_failures = 0;        // remote prefills that failed (then done here)
  int64_t prefill_cached_tokens = 0;  // reused on the prefill worker
  uint64_t transfer_bytes = 0;
  double transfer_seconds = 0;
  double transfer_wait_seconds = 0;  // transfer not overlapped with the prefill
  std::string transport;
  // The pool's KV event stream once the request's blocks are back in the prefix cache:
  // a reader that has applied event kv_event_seq of kv_incarnation knows them.
  uint64_t kv_incarnation = 0;
  uint64_t kv_event_seq = 0;
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
  int64_t quarantined_blocks = 0;   // held until the prefill worker acks or is gone
  int64_t remote_prefills = 0;
  int64_t remote_prefill_failures = 0;
};

class Engine {
 public:
  // `cache` manages `pool`'s blocks; both and `model` outlive the engine. `model_id`
  // names the model in block hashes. INVALID_ARGUMENT on bad options.
  // `remote` enables remote plans (requests with a prefill_address).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
      std::string model_id, const EngineOptions& options, const EngineRemote& remote = {});
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

  // The registry holding the engine's series: options.metrics, or the engine's own.
  // Series (all updated per step or per request, never per token):
  //   kvrelay_decode_steps_total{phase}, kvrelay_decode_step_seconds{phase}
  //     (phase: decode | prefill | mixed), kvrelay_decode_batch_sequences,
  //   kvrelay_decode_batch_tokens, kvrelay_decode_running_sequences,
  //   kvrelay_decode_waiting_sequences, kvrelay_decode_preemptions_total,
  //   kvrelay_decode_{generated,prompt,cached}_tokens_total,
  //   kvrelay_decode_remote_prefills_total{result} (ok | failed | checksum_mismatch |
  //     cancelled), kvrelay_kv_checksum_failures_total,
  //   kvrelay_kv_transfer_received_bytes_total{transport},
  //   kvrelay_decode_quarantined_blocks, kvrelay_kv_blocks{state} (free | in_use |
  //     cached_free), kvrelay_kv_evictions_total.
  const std::shared_ptr<prometheus::Registry>& metrics() const { return registry_; }
  // Sets kvrelay_kv_blocks from the prefix cache now. The engine does after every loop
  // turn; the worker's load-report path calls it too. Any thread.
  void UpdateKvBlockGauges();

 private:
  struct Seq;
  struct Metrics;
  enum class RemoteOutcome { kOk, kFailed, kChecksumMismatch, kCancelled };
  struct RemoteResult {
    uint64_t handle = 0;
    absl::Status status;
    v1::PrefillResponse response;
  };
  struct ReloadDone {
    uint64_t handle = 0;
    worker::KvTierStore::ReloadResult result;
  };
  struct AbortResult {
    uint64_t quarantine_id = 0;
    absl::Status status;
    bool found = false;
  };
  // Destination blocks of a remote prefill that failed or was cancelled: kept from
  // reuse until the prefill worker says its job has ended (Abort) or is gone, since a
  // late write would otherwise corrupt another request's KV (DESIGN §4).
  struct Quarantined {
    std::unique_ptr<kvcache::KvSequence> kv;
    std::string address;
    std::string request_id;
    uint64_t handle = 0;
    bool prefill_done = false;  // the Prefill call has completed
    bool abort_in_flight = false;
    double next_abort = 0;
  };
  Engine(const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
         std::string model_id, const EngineOptions& options, const EngineRemote& remote);
  void Loop();
  void Step();
  bool Admit(Seq* s);
  // Starts copying the lower tiers' blocks that continue s's pool prefix into its blocks.
  void StartReload(Seq* s);
  void OnReloadDone(const ReloadDone& r);
  void StartRemotePrefill(Seq* s);
  void OnRemoteResult(RemoteResult r);
  void Quarantine(Seq* s);
  void OnAbortResult(const AbortResult& r);
  void DriveQuarantine();
  // Appends a sampled token to s, reports it and applies the stop conditions.
  void Emit(Seq* s, sampling::SampleResult r);
  void Preempt(Seq* s);
  void Finish(Seq* s, const absl::Status& status, std::string finish_reason);
  // Metric updates: one call per step, per remote prefill, per loop turn.
  void RecordStep(int decode_items, int prefill_items, double seconds, int64_t sequences,
                  int64_t tokens);
  void RecordRemote(RemoteOutcome outcome);
  void RecordLoopGauges(int64_t quarantined_blocks);

  const model::Model* model_;
  kvcache::KvPool* pool_;
  kvcache::PrefixCache* cache_;
  const std::string model_id_;
  const EngineOptions options_;
  const EngineRemote remote_;
  const std::shared_ptr<prometheus::Registry> registry_;
  const std::unique_ptr<Metrics> metrics_;  // its series live in registry_

  mutable absl::Mutex mu_;
  std::vector<RemoteResult> remote_results_ ABSL_GUARDED_BY(mu_);
  std::vector<AbortResult> abort_results_ ABSL_GUARDED_BY(mu_);
  std::vector<ReloadDone> reload_results_ ABSL_GUARDED_BY(mu_);
  int64_t outstanding_rpcs_ ABSL_GUARDED_BY(mu_) = 0;
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
  absl::flat_hash_map<uint64_t, Quarantined> quarantine_;
  // Blocks of requests that ended while the tier store was still copying into them: kept
  // until the copy is done (by handle).
  absl::flat_hash_map<uint64_t, std::unique_ptr<kvcache::KvSequence>> reload_hold_;
  // Lease generations are this + the request's handle: unique across restarts too.
  const uint64_t lease_generation_base_ = kvcache::NewIncarnationId() << 20;
  uint64_t next_quarantine_id_ = 1;

  std::thread thread_;
};

}  // namespace kvrelay::decode
