#include "decode_worker/decode_worker.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/metrics/metrics.h"
#include "common/rpc/server.h"
#include "common/transfer/ucx/ucx_transport.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "grpcpp/health_check_service_interface.h"

namespace kvrelay::decode {

absl::StatusOr<std::unique_ptr<DecodeWorker>> DecodeWorker::Start(
    const DecodeWorkerOptions& options) {
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required");
  std::unique_ptr<DecodeWorker> w(new DecodeWorker());
  KVR_ASSIGN_OR_RETURN(w->runtime_, worker::LoadModelRuntime(options.model_dir, options.device,
                                                             options.threads, options.backend));
  KVR_ASSIGN_OR_RETURN(w->transport_, transfer::NewUcxTransport());
  const std::string model_id =
      options.model_id.empty() ? BaseName(options.model_dir) : options.model_id;
  EngineOptions engine_options = options.engine;
  if (options.metrics) engine_options.metrics = options.metrics;
  if (!engine_options.metrics) engine_options.metrics = std::make_shared<prometheus::Registry>();
  w->metrics_ = engine_options.metrics;
  KVR_ASSIGN_OR_RETURN(w->kv_, worker::CreateKvStore(*w->transport_, *w->runtime_.model, options.kv,
                                                     model_id, w->metrics_));
  engine_options.tiers = w->kv_.tiers.get();
  EngineRemote remote;
  w->prefill_client_ = std::make_unique<PrefillClient>(options.security);
  remote.client = w->prefill_client_.get();
  remote.memory = w->kv_.memory.get();
  remote.prefill_timeout = options.prefill_timeout;
  KVR_ASSIGN_OR_RETURN(
      w->engine_, Engine::Create(w->runtime_.model.get(), w->kv_.pool.get(), w->kv_.cache.get(),
                                 model_id, engine_options, remote));
  w->service_ = std::make_unique<DecodeService>(w->engine_.get(), options.security);
  rpc::ServerSpec spec;
  spec.listen = options.listen;
  spec.security = options.security;
  spec.services = {w->service_.get()};
  KVR_ASSIGN_OR_RETURN(w->server_, rpc::StartServer(spec, &w->port_));
  DecodeWorker* self = w.get();
  KVR_ASSIGN_OR_RETURN(w->registry_, rpc::StartRegistryClient(
                                         options.registry, v1::WORKER_ROLE_DECODE, w->port_,
                                         model_id, w->kv_.cache.get(), options.kv.kv_dtype,
                                         [self] {
                                           self->engine_->UpdateKvBlockGauges();
                                           const EngineStats s = self->engine_->stats();
                                           const kvcache::PrefixCacheCounts c =
                                               self->kv_.cache->counts();
                                           v1::LoadReport r;
                                           r.set_running(s.running);
                                           r.set_waiting(s.waiting);
                                           r.set_active_blocks(c.in_use);
                                           r.set_free_blocks(c.free + c.cached_free);
                                           return r;
                                         },
                                         options.security));
  return w;
}

void DecodeWorker::Shutdown(absl::Duration grace, absl::Duration linger) {
  if (shut_down_) return;
  shut_down_ = true;
  if (registry_) registry_->Stop();  // routers drop this worker: no new requests
  if (auto* health = server_->GetHealthCheckService(); health != nullptr) {
    health->Shutdown();  // health checks now answer NOT_SERVING
  }
  engine_->StopAccepting();
  if (service_->calls().WaitIdle(grace)) absl::SleepFor(linger);
  // Anything still running past the grace period is cancelled now.
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  engine_->Drain();
}

DecodeWorker::~DecodeWorker() {
  if (server_ != nullptr) Shutdown(absl::ZeroDuration());
  engine_.reset();  // ends anything left before the pool and cache go
}

}  // namespace kvrelay::decode
