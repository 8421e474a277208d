#include "prefill_worker/prefill_service.h"

#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "common/rpc/convert.h"

namespace kvrelay::prefill {

absl::StatusOr<PrefillJob> FromProto(const v1::PrefillRequest& request) {
  if (request.request_id().empty()) return absl::InvalidArgumentError("request_id is required");
  if (request.prompt_token_ids().empty()) {
    return absl::InvalidArgumentError("prompt_token_ids is empty");
  }
  if (!request.has_destination()) return absl::InvalidArgumentError("destination is required");
  PrefillJob job;
  job.id = request.request_id();
  job.prompt.assign(request.prompt_token_ids().begin(), request.prompt_token_ids().end());
  absl::StatusOr<sampling::SamplingParams> params = rpc::FromProto(request.sampling());
  if (!params.ok()) return params.status();
  job.params = *std::move(params);
  job.cache_salt = request.cache_salt();
  absl::StatusOr<transfer::PoolDescriptor> d = rpc::FromProto(request.destination(), "destination");
  if (!d.ok()) return d.status();
  job.destination = *std::move(d);
  job.first_block = request.first_block();
  job.destination_blocks.assign(request.destination_blocks().begin(),
                                request.destination_blocks().end());
  job.model_id = request.model_id();
  job.block_size = request.block_size();
  job.kv_dtype = request.kv_dtype();
  job.lease_generation = request.lease_generation();
  return job;
}

namespace {

// One Prefill call. The engine's done callback fills the response and finishes the
// call; `this` is deleted in OnDone, which gRPC runs only after Finish.
class PrefillReactor final : public grpc::ServerUnaryReactor {
 public:
  PrefillReactor(PrefillService* service, PrefillEngine* engine, const v1::PrefillRequest& request,
                 v1::PrefillResponse* response, grpc::CallbackServerContext* context)
      : service_(service), engine_(engine), response_(response) {
    service_->calls().Started();
    if (std::optional<grpc::Status> denied = service_->security().CheckInternalCaller(*context)) {
      FinishCall(*denied);
      return;
    }
    absl::StatusOr<PrefillJob> job = FromProto(request);
    if (!job.ok()) {
      FinishCall(rpc::RefusalStatus(*context, job.status()));
      return;
    }
    absl::StatusOr<uint64_t> h =
        engine_->Submit(*std::move(job), [this](absl::StatusOr<PrefillOutcome> r) { Done(r); });
    if (!h.ok()) {
      FinishCall(rpc::RefusalStatus(*context, h.status()));
      return;
    }
    bool cancel = false;
    {
      absl::MutexLock l(&mu_);
      handle_ = *h;
      cancel = cancelled_;
    }
    if (cancel) engine_->Cancel(*h);
  }

  void OnCancel() override {
    std::optional<uint64_t> h;
    {
      absl::MutexLock l(&mu_);
      cancelled_ = true;
      h = handle_;
    }
    if (h) engine_->Cancel(*h);
  }

  void OnDone() override {
    PrefillService* service = service_;
    delete this;
    service->calls().Done();
  }

 private:
  void Done(const absl::StatusOr<PrefillOutcome>& r) {
    if (!r.ok()) {
      FinishCall(rpc::ToGrpc(r.status()));
      return;
    }
    response_->set_first_token(r->first.token);
    rpc::ToProto(r->first, response_->mutable_first_logprobs());
    for (uint64_t c : r->checksums) response_->add_block_checksums(c);
    v1::PrefillStats* s = response_->mutable_stats();
    s->set_cached_tokens(r->cached_tokens);
    s->set_host_cached_tokens(r->host_cached_tokens);
    s->set_disk_cached_tokens(r->disk_cached_tokens);
    s->set_computed_tokens(r->computed_tokens);
    s->set_transfer_bytes(r->transfer_bytes);
    s->set_puts(r->puts);
    s->set_transfer_seconds(r->transfer_seconds);
    s->set_transport(r->transport);
    s->set_prefill_seconds(r->prefill_seconds);
    s->set_transfer_wait_seconds(r->transfer_wait_seconds);
    FinishCall(grpc::Status::OK);  // last use of `this`
  }

  // Finish, counted (every path finishes the call exactly once).
  void FinishCall(const grpc::Status& status) {
    service_->CountFinished(status.error_code());
    Finish(status);
  }

  PrefillService* service_;
  PrefillEngine* engine_;
  v1::PrefillResponse* response_;
  absl::Mutex mu_;
  std::optional<uint64_t> handle_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

// One Abort call: answers once the job has ended.
class AbortReactor final : public grpc::ServerUnaryReactor {
 public:
  AbortReactor(PrefillService* service, PrefillEngine* engine, const v1::AbortRequest& request,
               v1::AbortResponse* response, grpc::CallbackServerContext* context)
      : service_(service) {
    service_->calls().Started();
    if (std::optional<grpc::Status> denied = service_->security().CheckInternalCaller(*context)) {
      Finish(*denied);
      return;
    }
    if (request.request_id().empty()) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id is required"));
      return;
    }
    engine->Abort(request.request_id(), request.lease_generation(), [this, response](bool found) {
      response->set_found(found);
      Finish(grpc::Status::OK);
    });
  }
  void OnDone() override {
    PrefillService* service = service_;
    delete this;
    service->calls().Done();
  }

 private:
  PrefillService* service_;
};

}  // namespace

PrefillService::PrefillService(PrefillEngine* engine, rpc::Security security)
    : engine_(engine), security_(std::move(security)), registry_(engine->metrics()) {
  auto& family = prometheus::BuildCounter()
                     .Name("kvrelay_prefill_requests_total")
                     .Help("Finished Prefill calls on this prefill worker by gRPC status code")
                     .Register(*registry_);
  for (size_t c = 0; c < requests_.size(); ++c) {
    requests_[c] =
        &family.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
  }
}

void PrefillService::CountFinished(grpc::StatusCode code) {
  const size_t c = static_cast<size_t>(code);
  requests_[c < requests_.size() ? c : static_cast<size_t>(grpc::StatusCode::UNKNOWN)]->Increment();
}

grpc::ServerUnaryReactor* PrefillService::Abort(grpc::CallbackServerContext* context,
                                                const v1::AbortRequest* request,
                                                v1::AbortResponse* response) {
  return new AbortReactor(this, engine_, *request, response, context);
}

grpc::ServerUnaryReactor* PrefillService::Prefill(grpc::CallbackServerContext* context,
                                                  const v1::PrefillRequest* request,
                                                  v1::PrefillResponse* response) {
  return new PrefillReactor(this, engine_, *request, response, context);
}

}  // namespace kvrelay::prefill
