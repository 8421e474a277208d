// The router process (DESIGN §1, §5): the public API (kvrelay.v1.Generation), the
// registry workers dial (kvrelay.v1.Registry), the standard health service (service
// "kvrelay.v1.Generation" is SERVING while at least one decode worker is registered)
// and server reflection, on one gRPC port. main.cc only parses flags.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "prometheus/registry.h"
#include "router/api_keys.h"
#include "router/generation_service.h"
#include "router/model_context.h"
#include "router/openai_server.h"
#include "router/registry_service.h"
#include "router/worker_registry.h"

namespace kvrelay::router {

struct RouterOptions {
  std::string model_dir;    // tokenizer, config and chat template (no weights needed)
  std::string model_id;     // default: the folder's name (as the workers)
  std::string chat_format;  // empty: detected from the folder
  int block_size = 16;
  std::string listen = "127.0.0.1:0";
  std::string router_id;            // default: "router-<port>"
  int max_request_bytes = 4 << 20;  // larger messages: RESOURCE_EXHAUSTED (gRPC)
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration heartbeat_timeout = absl::Seconds(5);
  int max_workers = PrefixIndex::kDefaultMaxWorkers;  // registrations beyond: RESOURCE_EXHAUSTED
  GenerationOptions generation;
  // The OpenAI HTTP API (router/openai_server.h) on this HOST:PORT; empty: none.
  std::string http_listen;
  int http_threads = 128;
  absl::Duration http_request_timeout = absl::ZeroDuration();  // past it: 504 (zero: none)
  // HTTPS on http_listen: the certificate (chain) and key, PEM; both empty: plaintext.
  std::string http_tls_cert_pem, http_tls_key_pem;
  // API keys of the public API, gRPC and HTTP alike (none: open).
  ApiKeys api_keys;
  // TLS of the port (public API and Registry) and of the calls to the workers; who may
  // use the Registry (rpc/security.h).
  rpc::Security security;
  // Where the router's metrics (kvrelay_router_*) go, e.g. the registry main.cc serves
  // on /metrics; nullptr: a private registry.
  std::shared_ptr<prometheus::Registry> metrics;
};

class Router {
 public:
  // INVALID_ARGUMENT naming the bad option; the loader's errors for the model folder;
  // UNAVAILABLE when the port cannot be had.
  static absl::StatusOr<std::unique_ptr<Router>> Start(const RouterOptions& options);
  ~Router();

  int port() const { return port_; }
  int http_port() const { return http_ != nullptr ? http_->port() : 0; }
  WorkerRegistry& registry() { return *registry_; }
  const ModelContext& model() const { return *model_; }

  // Health NOT_SERVING, new requests UNAVAILABLE; running ones finish (up to `grace`,
  // then they are cancelled); connections stay open for `linger`; the server stops.
  void Shutdown(absl::Duration grace, absl::Duration linger = absl::ZeroDuration());

 private:
  Router() = default;
  void UpdateHealth();

  std::unique_ptr<ModelContext> model_;
  std::unique_ptr<WorkerRegistry> registry_;
  std::unique_ptr<GenerationService> generation_;
  std::unique_ptr<RegistryService> registry_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<OpenAIServer> http_;  // stopped before server_
  absl::Mutex health_mu_;
  bool serving_known_ ABSL_GUARDED_BY(health_mu_) = false;
  bool serving_ ABSL_GUARDED_BY(health_mu_) = false;
  bool shut_down_ = false;
  int port_ = 0;
};

}  // namespace kvrelay::router
