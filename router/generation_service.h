// kvrelay.v1.Generation on the router (DESIGN §1, §5): checks and tokenizes each
// request, admits it (a bounded queue; RESOURCE_EXHAUSTED past it), routes it with the
// global prefix index and the workers' load, streams the decode worker's tokens to the
// client as text and ids (stop strings applied here), and migrates the request to
// another decode worker when its worker fails mid-stream. gRPC deadlines and client
// cancels reach the decode worker (and from there the prefill worker).
//
// Metrics (DESIGN §7), in the registry given (or a private one):
//   kvrelay_router_requests_total{code}            counter: finished Generate calls by gRPC code
//       name, refused ones included (a call its client's deadline ended: DEADLINE_EXCEEDED)
//   kvrelay_router_ttft_seconds                    histogram: accepted -> first token
//   kvrelay_router_inter_token_seconds             histogram: one observation per token gap
//   kvrelay_router_request_duration_seconds        histogram: admitted calls, accepted -> end
//   kvrelay_router_queue_seconds                   histogram: accepted -> taken by a runner
//   kvrelay_router_prompt_tokens_total             counter: prompt tokens of routed requests
//   kvrelay_router_generated_tokens_total          counter: tokens streamed to clients
//   kvrelay_router_prefix_{available,predicted,delivered}_tokens_total  counters: the prefix
//       hit rate three ways over the same prompts (divide by prompt_tokens_total)
//   kvrelay_router_prefill_total{mode}             counter: finished requests, local | remote
//   kvrelay_router_migrations_total                counter
//   kvrelay_router_requests_running, kvrelay_router_queue_depth   gauges
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/call_tracker.h"
#include "common/rpc/security.h"
#include "grpcpp/channel.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "router/api_keys.h"
#include "router/model_context.h"
#include "router/scheduler.h"
#include "router/worker_registry.h"

namespace kvrelay::router {

struct GenerationOptions {
  int max_running = 64;      // requests being served at once (each holds a runner thread)
  size_t max_queued = 1024;  // admitted requests waiting for a runner; beyond: RESOURCE_EXHAUSTED
  // A request that waited this long for a runner is refused RESOURCE_EXHAUSTED (load
  // shedding: the client or its load balancer retries elsewhere). Zero: wait forever.
  // Both refusals carry grpc-retry-pushback-ms trailing metadata.
  absl::Duration max_queue_time = absl::ZeroDuration();
  int migration_limit = 2;             // times a request may move to another decode worker
  size_t max_request_bytes = 4 << 20;  // larger Generate/Tokenize requests: RESOURCE_EXHAUSTED
  SchedulerOptions scheduler;
  // Keys the public API requires (metadata "authorization: Bearer KEY"); none: open.
  ApiKeys api_keys;
  // TLS and the cluster token of the calls to the workers (set by Router).
  rpc::Security security;
};

// Generate and Tokenize take their requests as raw bytes and parse them here: text
// fields that are not UTF-8 make protobuf's parser fail, which gRPC would report as
// an unhelpful UNIMPLEMENTED; parsed here they get INVALID_ARGUMENT saying so.
class GenerationService final
    : public v1::Generation::WithRawCallbackMethod_Generate<
          v1::Generation::WithRawCallbackMethod_Tokenize<v1::Generation::CallbackService>> {
 public:
  // `metrics`: the registry the service's metrics join (nullptr: a private one).
  GenerationService(const ModelContext* model, WorkerRegistry* registry, GenerationOptions options,
                    std::shared_ptr<prometheus::Registry> metrics = nullptr);
  // Joins the runners once the queue is empty. The server must have been shut down
  // first: that cancels every call, so queued ones end at once (Router does this).
  ~GenerationService() override;

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

  // New requests get UNAVAILABLE; queued and running ones go on.
  void StopAccepting();
  rpc::CallTracker& calls() { return calls_; }

  class Call;  // one Generate stream (generation_service.cc)

 private:
  struct Metrics {
    explicit Metrics(prometheus::Registry& r);
    std::array<prometheus::Counter*, 17> requests{};  // by grpc::StatusCode (0..16)
    prometheus::Histogram* ttft;
    prometheus::Histogram* inter_token;
    prometheus::Histogram* duration;
    prometheus::Histogram* queue;
    prometheus::Counter* prompt_tokens;
    prometheus::Counter* generated_tokens;
    prometheus::Counter* prefix_available;
    prometheus::Counter* prefix_predicted;
    prometheus::Counter* prefix_delivered;
    // kvrelay_router_prefix_tier_tokens_total: [available | predicted | delivered][tier].
    prometheus::Counter* prefix_tier[3][3];
    void CountTiers(int kind, const PrefixIndex::TierSplit& s, int block_size,
                    int64_t prompt_tokens) const {
      int64_t left = prompt_tokens;  // never more than the prompt
      const int32_t blocks[3] = {s.pool, s.host, s.disk};
      for (int t = 0; t < 3; ++t) {
        const int64_t n = std::min(left, static_cast<int64_t>(blocks[t]) * block_size);
        prefix_tier[kind][t]->Increment(static_cast<double>(n));
        left -= n;
      }
    }
    prometheus::Counter* prefill_local;
    prometheus::Counter* prefill_remote;
    prometheus::Counter* migrations;
    prometheus::Gauge* running;
    prometheus::Gauge* queue_depth;
    prometheus::Counter* shed_queue_full;  // kvrelay_router_shed_total{reason}
    prometheus::Counter* shed_queue_timeout;
  };

  void RunLoop();
  // Sheds the calls that waited longer than max_queue_time (a thread, when it is set).
  void ShedLoop();
  // How long a refused client should wait before retrying: the time the queue ahead of it
  // takes to drain at the recent pace (clamped to [100 ms, 30 s]).
  absl::Duration RetryPushback(size_t queued) const;
  // A Generate call ends with `code` (counted once per call; `admitted`: it was queued).
  void RecordEnd(const Call& call, grpc::StatusCode code, bool admitted);
  // Takes a call off the queue; false if a runner already has it (or it never queued).
  bool RemoveQueued(Call* call);
  void Serve(Call* call);
  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& address);

  const ModelContext* model_;
  WorkerRegistry* registry_;
  const GenerationOptions options_;
  const std::shared_ptr<prometheus::Registry> metrics_registry_;  // owns what m_ points to
  const Metrics m_;
  rpc::CallTracker calls_;

  absl::Mutex mu_;
  std::deque<Call*> queue_ ABSL_GUARDED_BY(mu_);
  int busy_ ABSL_GUARDED_BY(mu_) = 0;  // runners serving a call
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<std::thread> runners_;
  std::thread shedder_;
  // Recent duration of a served call (exponential moving average, microseconds; 0: none yet).
  std::atomic<int64_t> recent_call_us_{0};

  absl::Mutex channels_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::Channel>> channels_
      ABSL_GUARDED_BY(channels_mu_);
};

}  // namespace kvrelay::router
