// kvrelay.v1.Generation on the router (DESIGN §1, §5): checks and tokenizes each
// request, admits it (a bounded queue; RESOURCE_EXHAUSTED past it), routes it with the
// global prefix index and the workers' load, streams the decode worker's tokens to the
// client as text and ids (stop strings applied here), and migrates the request to
// another decode worker when its worker fails mid-stream. gRPC deadlines and client
// cancels reach the decode worker (and from there the prefill worker).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "common/rpc/call_tracker.h"
#include "grpcpp/channel.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "router/model_context.h"
#include "router/scheduler.h"
#include "router/worker_registry.h"

namespace kvrelay::router {

struct GenerationOptions {
  int max_running = 64;      // requests being served at once (each holds a runner thread)
  size_t max_queued = 1024;  // admitted requests waiting for a runner; beyond: RESOURCE_EXHAUSTED
  int migration_limit = 2;   // times a request may move to another decode worker
  size_t max_request_bytes = 4 << 20;  // larger Generate/Tokenize requests: RESOURCE_EXHAUSTED
  SchedulerOptions scheduler;
};

// Generate and Tokenize take their requests as raw bytes and parse them here: text
// fields that are not UTF-8 make protobuf's parser fail, which gRPC would report as
// an unhelpful UNIMPLEMENTED; parsed here they get INVALID_ARGUMENT saying so.
class GenerationService final
    : public v1::Generation::WithRawCallbackMethod_Generate<
          v1::Generation::WithRawCallbackMethod_Tokenize<v1::Generation::CallbackService>> {
 public:
  GenerationService(const ModelContext* model, WorkerRegistry* registry, GenerationOptions options);
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
  void RunLoop();
  // Takes a call off the queue; false if a runner already has it (or it never queued).
  bool RemoveQueued(Call* call);
  void Serve(Call* call);
  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& address);

  const ModelContext* model_;
  WorkerRegistry* registry_;
  const GenerationOptions options_;
  rpc::CallTracker calls_;

  absl::Mutex mu_;
  std::deque<Call*> queue_ ABSL_GUARDED_BY(mu_);
  int busy_ ABSL_GUARDED_BY(mu_) = 0;  // runners serving a call
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<std::thread> runners_;

  absl::Mutex channels_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::Channel>> channels_
      ABSL_GUARDED_BY(channels_mu_);
};

}  // namespace kvrelay::router
