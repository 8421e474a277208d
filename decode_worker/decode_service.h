// DecodeWorker gRPC service (callback API): validates a DecodeRequest, hands it to the
// engine and streams one DecodeResponse per step, then a final message with the finish
// reason and usage. A client cancel or deadline cancels the request in the engine.
#pragma once

#include "common/rpc/call_tracker.h"
#include "decode_worker/engine.h"
#include "kvrelay/v1/worker.grpc.pb.h"

namespace kvrelay::decode {

// The engine request for a DecodeRequest: INVALID_ARGUMENT naming the field
// ("request_id is required", "prompt_token_ids is empty", "sampling.top_p ...").
absl::StatusOr<EngineRequest> FromProto(const v1::DecodeRequest& request);

class DecodeService final : public v1::DecodeWorker::CallbackService {
 public:
  explicit DecodeService(Engine* engine) : engine_(engine) {}

  grpc::ServerWriteReactor<v1::DecodeResponse>* Generate(grpc::CallbackServerContext* context,
                                                         const v1::DecodeRequest* request) override;

  // Calls in progress (graceful shutdown waits for none).
  rpc::CallTracker& calls() { return calls_; }

 private:
  Engine* engine_;
  rpc::CallTracker calls_;
};

}  // namespace kvrelay::decode
