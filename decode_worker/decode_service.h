// DecodeWorker gRPC service (callback API): validates a DecodeRequest, hands it to the
// engine and streams one DecodeResponse per step, then a final message with the finish
// reason and usage. A client cancel or deadline cancels the request in the engine.
#pragma once

#include <array>
#include <memory>

#include "common/rpc/call_tracker.h"
#include "common/rpc/security.h"
#include "decode_worker/engine.h"
#include "kvrelay/v1/worker.grpc.pb.h"
#include "prometheus/counter.h"

namespace kvrelay::decode {

// The engine request for a DecodeRequest: INVALID_ARGUMENT naming the field
// ("request_id is required", "prompt_token_ids is empty", "sampling.top_p ...").
absl::StatusOr<EngineRequest> FromProto(const v1::DecodeRequest& request);

class DecodeService final : public v1::DecodeWorker::CallbackService {
 public:
  // Adds kvrelay_decode_requests_total{code} (finished Generate calls by gRPC code name:
  // OK, CANCELLED, INVALID_ARGUMENT, ...) to the engine's metrics registry.
  // `security`: who may call (rpc::Security::CheckInternalCaller; default: anyone).
  explicit DecodeService(Engine* engine, rpc::Security security = rpc::Security());

  grpc::ServerWriteReactor<v1::DecodeResponse>* Generate(grpc::CallbackServerContext* context,
                                                         const v1::DecodeRequest* request) override;

  const rpc::Security& security() const { return security_; }
  // Calls in progress (graceful shutdown waits for none).
  rpc::CallTracker& calls() { return calls_; }

  // Counts a Generate call that ends with `code`.
  void CountFinished(grpc::StatusCode code);

 private:
  Engine* engine_;
  const rpc::Security security_;
  rpc::CallTracker calls_;
  std::shared_ptr<prometheus::Registry> registry_;   // keeps requests_ alive
  std::array<prometheus::Counter*, 17> requests_{};  // by code, OK (0) .. UNAUTHENTICATED (16)
};

}  // namespace kvrelay::decode
