// A prefill worker process: its model, KV pool (registered with the UCX transport, the
// source of its writes), prefix cache and prefill engine, served over gRPC
// (PrefillWorker + the standard health service). main.cc only parses flags.
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
#include "grpcpp/server.h"
#include "prefill_worker/prefill_engine.h"
#include "prefill_worker/prefill_service.h"

namespace kvrelay::prefill {

// The shared part (model, pool, listen address, registry, security, metrics) comes
// from worker::WorkerOptions.
struct PrefillWorkerOptions : worker::WorkerOptions {
  PrefillEngineOptions engine;
};

class PrefillWorker {
 public:
  // INVALID_ARGUMENT on bad options (naming the option); the loader's errors for a bad
  // model folder; UNAVAILABLE when UCX or the listening port cannot be had.
  static absl::StatusOr<std::unique_ptr<PrefillWorker>> Start(const PrefillWorkerOptions& options);
  ~PrefillWorker();

  int port() const { return port_; }
  // The backend the model runs on and why it was chosen (for the start-up log).
  const std::string& device_note() const { return runtime_.device_note; }
  kvcache::PrefixCache& cache() { return *kv_.cache; }
  PrefillEngine& engine() { return *engine_; }
  // The registry holding this worker's series (options.metrics or its own).
  const std::shared_ptr<prometheus::Registry>& metrics() const { return metrics_; }

  // Health turns NOT_SERVING; running calls finish (up to `grace`, then they are
  // cancelled); connections stay open for `linger`; then the server stops.
  void Shutdown(absl::Duration grace, absl::Duration linger = absl::ZeroDuration());

 private:
  PrefillWorker() = default;

  std::shared_ptr<prometheus::Registry> metrics_;
  worker::ModelRuntime runtime_;  // the model on its backend
  std::unique_ptr<transfer::KvTransport> transport_;
  worker::KvStore kv_;  // destroyed before the transport
  std::unique_ptr<PrefillEngine> engine_;
  std::unique_ptr<PrefillService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<rpc::RegistryClient> registry_;  // stopped first: routers stop sending
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace kvrelay::prefill
