// DecodeWorker gRPC service (callback API): validates a DecodeRequest, hands it to the
// engine and streams one DecodeResponse per step, then a final message with the finish
// reason and usage. A client cancel or deadline cancels the request in the engine.
#pragma once

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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

  // Waits until no Generate call is in progress (every one has sent its status); false
  // if some still are after `timeout`.
  bool WaitIdle(absl::Duration timeout);

  // Called by each call when it starts and when gRPC is done with it.
  void CallStarted();
  void CallDone();

 private:
  Engine* engine_;
  absl::Mutex mu_;
  int64_t active_calls_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrelay::decode
