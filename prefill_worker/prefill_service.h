// PrefillWorker gRPC service (callback API): validates a PrefillRequest, runs it on the
// prefill engine and answers with the first token, the block checksums and the stats.
// A cancelled call (client cancel or deadline) cancels the job.
#pragma once

#include <array>
#include <memory>

#include "common/rpc/call_tracker.h"
#include "common/rpc/security.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prefill_worker/prefill_engine.h"
#include "prometheus/counter.h"

namespace kvrelay::prefill {

// The engine job for a PrefillRequest: INVALID_ARGUMENT naming the field.
absl::StatusOr<PrefillJob> FromProto(const v1::PrefillRequest& request);

class PrefillService final : public v1::PrefillWorker::CallbackService {
 public:
  // Adds kvrelay_prefill_requests_total{code} (finished Prefill calls by gRPC code name:
  // OK, CANCELLED, INVALID_ARGUMENT, ...) to the engine's metrics registry.
  // `security`: who may call (rpc::Security::CheckInternalCaller; default: anyone).
  explicit PrefillService(PrefillEngine* engine, rpc::Security security = rpc::Security());

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* context,
                                    const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context,
                                  const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;

  const rpc::Security& security() const { return security_; }
  // Calls in progress (graceful shutdown waits for none).
  rpc::CallTracker& calls() { return calls_; }

  // Counts a Prefill call that ends with `code`.
  void CountFinished(grpc::StatusCode code);

 private:
  PrefillEngine* engine_;
  const rpc::Security security_;
  rpc::CallTracker calls_;
  std::shared_ptr<prometheus::Registry> registry_;   // keeps requests_ alive
  std::array<prometheus::Counter*, 17> requests_{};  // by code, OK (0) .. UNAUTHENTICATED (16)
};

}  // namespace kvrelay::prefill
