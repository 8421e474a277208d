#include "router/router.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/rpc/server.h"
#include "common/util/status.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace kvrelay::router {

namespace {
constexpr char kServiceName[] = "kvrelay.v1.Generation";
}

absl::StatusOr<std::unique_ptr<Router>> Router::Start(const RouterOptions& options) {
  KVR_RETURN_IF_ERROR(Validate(options.generation.scheduler));
  if (options.generation.max_running < 1) {
    return absl::InvalidArgumentError("--max_running must be >= 1");
  }
  if (options.generation.max_queued < 1) {
    return absl::InvalidArgumentError("--max_queued must be >= 1");
  }
  if (options.generation.max_queue_time < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--max_queue_seconds must be >= 0");
  }
  if (options.generation.migration_limit < 0) {
    return absl::InvalidArgumentError("--migration_limit must be >= 0");
  }
  if (options.heartbeat_interval <= absl::ZeroDuration() ||
      options.heartbeat_timeout <= options.heartbeat_interval) {
    return absl::InvalidArgumentError(
        "--heartbeat_interval_ms must be > 0 and below --heartbeat_timeout_ms");
  }
  if (options.max_workers < 1) return absl::InvalidArgumentError("--max_workers must be >= 1");
  if (options.max_request_bytes < 1024) {
    return absl::InvalidArgumentError("--max_request_bytes must be >= 1024");
  }
  std::unique_ptr<Router> r(new Router());
  KVR_ASSIGN_OR_RETURN(r->model_, ModelContext::Load(options.model_dir, options.model_id,
                                                     options.block_size, options.chat_format));
  RegistryOptions ro;
  ro.model_id = r->model_->model_id;
  ro.block_size = options.block_size;
  ro.heartbeat_interval = options.heartbeat_interval;
  ro.heartbeat_timeout = options.heartbeat_timeout;
  ro.max_workers = options.max_workers;
  ro.scheduler = options.generation.scheduler;  // the busy rule of the load order
  // The id is needed before the port is known; a random suffix keeps replicas apart.
  ro.router_id = options.router_id.empty()
                     ? absl::StrCat("router-", absl::Hex(absl::ToUnixNanos(absl::Now()) & 0xffffff))
                     : options.router_id;
  std::shared_ptr<prometheus::Registry> metrics =
      options.metrics != nullptr ? options.metrics : std::make_shared<prometheus::Registry>();
  r->registry_ = std::make_unique<WorkerRegistry>(ro, metrics);
  GenerationOptions generation = options.generation;
  generation.max_request_bytes = static_cast<size_t>(options.max_request_bytes);
  generation.api_keys = options.api_keys;
  generation.security = options.security;
  r->generation_ =
      std::make_unique<GenerationService>(r->model_.get(), r->registry_.get(), generation, metrics);
  Router* self = r.get();
  r->registry_service_ = std::make_unique<RegistryService>(
      r->registry_.get(), [self] { self->UpdateHealth(); }, options.security);

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  rpc::ServerSpec spec;
  spec.listen = options.listen;
  spec.security = options.security;
  spec.public_port = true;  // applications reach the API here without a certificate
  // Generate and Tokenize enforce max_request_bytes themselves; the server's limit only
  // bounds the registry's messages (a snapshot of a 16M-block pool is 128 MiB).
  spec.max_receive_bytes = std::max(options.max_request_bytes, 256 << 20);
  spec.services = {r->generation_.get(), r->registry_service_.get()};
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<grpc::Server> server, rpc::StartServer(spec, &r->port_));
  {
    absl::MutexLock l(&r->health_mu_);  // a worker may register at once (UpdateHealth)
    r->server_ = std::move(server);
  }
  r->UpdateHealth();
  if (!options.http_listen.empty()) {
    OpenAIServerOptions ho;
    ho.listen = options.http_listen;
    ho.threads = options.http_threads;
    ho.max_body_bytes = static_cast<size_t>(options.max_request_bytes);
    ho.keys = options.api_keys;
    ho.request_timeout = options.http_request_timeout;
    ho.tls_cert_pem = options.http_tls_cert_pem;
    ho.tls_key_pem = options.http_tls_key_pem;
    // The HTTP layer is a client of this very server's Generation service.
    KVR_ASSIGN_OR_RETURN(
        r->http_, OpenAIServer::Start(ho, r->server_->InProcessChannel(grpc::ChannelArguments()),
                                      r->model_.get(), metrics));
  }
  return r;
}

void Router::UpdateHealth() {
  absl::MutexLock l(&health_mu_);  // read and applied together: no stale status wins
  if (server_ == nullptr || shut_down_) return;
  const bool serving = registry_->Alive(v1::WORKER_ROLE_DECODE) > 0;
  if (serving_known_ && serving == serving_) return;
  serving_known_ = true;
  serving_ = serving;
  if (auto* health = server_->GetHealthCheckService(); health != nullptr) {
    health->SetServingStatus(kServiceName, serving);
  }
}

void Router::Shutdown(absl::Duration grace, absl::Duration linger) {
  {
    absl::MutexLock l(&health_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (auto* health = server_->GetHealthCheckService(); health != nullptr) health->Shutdown();
  generation_->StopAccepting();
  // HTTP requests are gRPC calls of the in-process channel: the drain below waits for
  // them too; the HTTP server stops after the gRPC one has cancelled what is left.
  if (generation_->calls().WaitIdle(grace)) absl::SleepFor(linger);
  server_->Shutdown(std::chrono::system_clock::now());  // cancels what is left (and streams)
  server_->Wait();
  http_.reset();
}

Router::~Router() {
  if (server_ != nullptr) Shutdown(absl::ZeroDuration());
  generation_.reset();  // joins the runners
  registry_service_.reset();
}

}  // namespace kvrelay::router
