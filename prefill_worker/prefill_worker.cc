#include "prefill_worker/prefill_worker.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/rpc/server.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "grpcpp/health_check_service_interface.h"

namespace kvrelay::prefill {

absl::StatusOr<std::unique_ptr<PrefillWorker>> PrefillWorker::Start(
    const PrefillWorkerOptions& options) {
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required");
  if (options.engine.prefill_chunk < 1) {
    return absl::InvalidArgumentError("--prefill_chunk must be >= 1");
  }
  std::unique_ptr<PrefillWorker> w(new PrefillWorker());
  KVR_ASSIGN_OR_RETURN(w->runtime_, worker::LoadModelRuntime(options.model_dir, options.device,
                                                             options.threads, options.backend));
  KVR_ASSIGN_OR_RETURN(w->transport_, transfer::NewUcxTransport());
  const std::string model_id =
      options.model_id.empty() ? BaseName(options.model_dir) : options.model_id;
  PrefillEngineOptions engine_options = options.engine;
  if (options.metrics) engine_options.metrics = options.metrics;
  if (!engine_options.metrics) engine_options.metrics = std::make_shared<prometheus::Registry>();
  w->metrics_ = engine_options.metrics;
  KVR_ASSIGN_OR_RETURN(w->kv_, worker::CreateKvStore(*w->transport_, *w->runtime_.model, options.kv,
                                                     model_id, w->metrics_));
  engine_options.tiers = w->kv_.tiers.get();
  w->engine_ = std::make_unique<PrefillEngine>(w->runtime_.model.get(), w->kv_.pool.get(),
                                               w->kv_.memory.get(), w->kv_.cache.get(),
                                               w->transport_.get(), model_id, engine_options);
  w->service_ = std::make_unique<PrefillService>(w->engine_.get(), options.security);
  rpc::ServerSpec spec;
  spec.listen = options.listen;
  spec.security = options.security;
  spec.services = {w->service_.get()};
  KVR_ASSIGN_OR_RETURN(w->server_, rpc::StartServer(spec, &w->port_));
  PrefillWorker* self = w.get();
  KVR_ASSIGN_OR_RETURN(w->registry_, rpc::StartRegistryClient(
                                         options.registry, v1::WORKER_ROLE_PREFILL, w->port_,
                                         model_id, w->kv_.cache.get(), options.kv.kv_dtype,
                                         [self] {
                                           self->engine_->UpdateKvBlockGauges();
                                           const PrefillEngine::Load load = self->engine_->load();
                                           const kvcache::PrefixCacheCounts c =
                                               self->kv_.cache->counts();
                                           v1::LoadReport r;
                                           r.set_running(load.running);
                                           r.set_waiting(load.queued);
                                           r.set_queued_prefill_tokens(load.tokens);
                                           r.set_active_blocks(c.in_use);
                                           r.set_free_blocks(c.free + c.cached_free);
                                           return r;
                                         },
                                         options.security));
  return w;
}

void PrefillWorker::Shutdown(absl::Duration grace, absl::Duration linger) {
  if (shut_down_) return;
  shut_down_ = true;
  if (registry_) registry_->Stop();  // routers drop this worker: no new requests
  if (auto* health = server_->GetHealthCheckService(); health != nullptr) health->Shutdown();
  if (service_->calls().WaitIdle(grace)) absl::SleepFor(linger);
  server_->Shutdown(std::chrono::system_clock::now());  // cancels what is left
  server_->Wait();
}

PrefillWorker::~PrefillWorker() {
  if (server_ != nullptr) Shutdown(absl::ZeroDuration());
  engine_.reset();  // before the pool, cache and transport
}

}  // namespace kvrelay::prefill
