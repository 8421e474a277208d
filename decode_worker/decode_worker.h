// A decode worker process: its model, KV pool, prefix cache and engine, served over
// gRPC (DecodeWorker + the standard health service). main.cc only parses flags.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/model/model.h"
#include "common/rpc/registry_client.h"
#include "common/transfer/kv_transport.h"
#include "common/worker/kv_store.h"
#include "common/worker/model_runtime.h"
#include "common/worker/worker_options.h"
#include "decode_worker/decode_service.h"
#include "decode_worker/engine.h"
#include "decode_worker/prefill_client.h"
#include "grpcpp/server.h"

namespace kvrelay::decode {

// The shared part (model, pool, listen address, registry, security, metrics) comes
// from worker::WorkerOptions.
struct DecodeWorkerOptions : worker::WorkerOptions {
  EngineOptions engine;
  absl::Duration prefill_timeout = absl::Seconds(60);  // one remote prefill call
};

class DecodeWorker {
 public:
  // Loads the model, allocates the pool and starts serving. INVALID_ARGUMENT on bad
  // options (naming the option); the loader's errors for a bad model folder.
  static absl::StatusOr<std::unique_ptr<DecodeWorker>> Start(const DecodeWorkerOptions& options);
  ~DecodeWorker();

  int port() const { return port_; }
  // The backend the model runs on and why it was chosen (for the start-up log).
  const std::string& device_note() const { return runtime_.device_note; }
  Engine& engine() { return *engine_; }
  // The registry holding this worker's series (options.metrics or its own).
  const std::shared_ptr<prometheus::Registry>& metrics() const { return metrics_; }
  kvcache::PrefixCache& cache() { return *kv_.cache; }
  // Routers whose registry stream is open (0 without --router).
  int registered_routers() const { return registry_ ? registry_->connected() : 0; }

  // Graceful: health turns NOT_SERVING and new requests get UNAVAILABLE; running ones
  // finish and their streams are fully sent (up to `grace`; then they are cancelled).
  // Then connections stay open for `linger`, so that clients read the last messages
  // before the server closes them (closing a socket with unread input resets it, and
  // the peer loses what it had not read yet), and the server stops.
  void Shutdown(absl::Duration grace, absl::Duration linger = absl::ZeroDuration());

 private:
  DecodeWorker() = default;

  std::shared_ptr<prometheus::Registry> metrics_;
  worker::ModelRuntime runtime_;  // the model on its backend
  std::unique_ptr<transfer::KvTransport> transport_;
  worker::KvStore kv_;  // destroyed before the transport
  std::unique_ptr<PrefillClient> prefill_client_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<DecodeService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<rpc::RegistryClient> registry_;  // stopped first: routers stop sending
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace kvrelay::decode
