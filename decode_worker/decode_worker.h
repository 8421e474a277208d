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
#include "decode_worker/decode_service.h"
#include "decode_worker/engine.h"
#include "decode_worker/prefill_client.h"
#include "grpcpp/server.h"

namespace kvrelay::decode {

struct DecodeWorkerOptions {
  std::string model_dir;  // a Hugging Face model folder
  std::string model_id;   // names the model in block hashes; default: the folder's name
  std::string listen = "127.0.0.1:0";  // host:port; port 0 picks a free one
  worker::KvStoreOptions kv;
  std::string device = "auto";      // auto | cpu | cuda (kernels::ResolveDevice)
  kernels::BackendOptions backend;  // e.g. --cuda_split_k_decode
  int threads = 0;                  // CPU threads for the forward pass (CPU backend); 0: all cores
  EngineOptions engine;
  absl::Duration prefill_timeout = absl::Seconds(60);  // one remote prefill call
  rpc::RegistrySettings registry;                      // routers to register with
  // The process's Prometheus registry (served on /metrics by the caller); the engine's
  // and the service's series go there. Null: a registry of the worker's own. Takes
  // precedence over engine.metrics.
  std::shared_ptr<prometheus::Registry> metrics = nullptr;
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
  PrefillClient prefill_client_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<DecodeService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<rpc::RegistryClient> registry_;  // stopped first: routers stop sending
  int port_ = 0;
  bool shut_down_ = false;
};

}  // namespace kvrelay::decode
