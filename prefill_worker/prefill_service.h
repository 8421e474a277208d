// PrefillWorker gRPC service (callback API): validates a PrefillRequest, runs it on the
// prefill engine and answers with the first token, the block checksums and the stats.
// A cancelled call (client cancel or deadline) cancels the job.
#pragma once

#include "common/rpc/call_tracker.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prefill_worker/prefill_engine.h"

namespace kvrelay::prefill {

// The engine job for a PrefillRequest: INVALID_ARGUMENT naming the field.
absl::StatusOr<PrefillJob> FromProto(const v1::PrefillRequest& request);

class PrefillService final : public v1::PrefillWorker::CallbackService {
 public:
  explicit PrefillService(PrefillEngine* engine) : engine_(engine) {}

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* context,
                                    const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context,
                                  const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;

  // Calls in progress (graceful shutdown waits for none).
  rpc::CallTracker& calls() { return calls_; }

 private:
  PrefillEngine* engine_;
  rpc::CallTracker calls_;
};

}  // namespace kvrelay::prefill
