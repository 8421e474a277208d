#include "decode_worker/decode_service.h"

#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics/metrics.h"
#include "common/rpc/convert.h"
#include "common/rpc/queued_write_reactor.h"

namespace kvrelay::decode {

absl::StatusOr<EngineRequest> FromProto(const v1::DecodeRequest& request) {
  if (request.request_id().empty()) return absl::InvalidArgumentError("request_id is required");
  if (request.prompt_token_ids().empty()) {
    return absl::InvalidArgumentError("prompt_token_ids is empty");
  }
  EngineRequest r;
  r.id = request.request_id();
  r.prompt.assign(request.prompt_token_ids().begin(), request.prompt_token_ids().end());
  absl::StatusOr<sampling::SamplingParams> params = rpc::FromProto(request.sampling());
  if (!params.ok()) return params.status();
  r.params = *std::move(params);
  r.cache_salt = request.cache_salt();
  if (request.resumed_tokens() < 0 || request.resumed_tokens() >= request.prompt_token_ids_size()) {
    return absl::InvalidArgumentError(
        "resumed_tokens must be >= 0 and leave at least one prompt token");
  }
  r.resumed_tokens = request.resumed_tokens();
  switch (request.plan().mode()) {
    case v1::PREFILL_MODE_UNSPECIFIED:
    case v1::PREFILL_MODE_LOCAL:
      break;
    case v1::PREFILL_MODE_REMOTE:
      if (request.plan().prefill_address().empty()) {
        return absl::InvalidArgumentError(
            "plan.prefill_address is required for PREFILL_MODE_REMOTE");
      }
      r.prefill_address = request.plan().prefill_address();
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("plan.mode has unknown value ", request.plan().mode()));
  }
  return r;
}

namespace {

void FillUsage(const RequestSummary& s, v1::DecodeUsage* u) {
  u->set_prompt_tokens(s.prompt_tokens);
  u->set_completion_tokens(s.completion_tokens);
  u->set_cached_tokens(s.cached_tokens);
  u->set_host_cached_tokens(s.host_cached_tokens);
  u->set_disk_cached_tokens(s.disk_cached_tokens);
  u->set_prefill_mode(s.remote_prefill ? v1::PREFILL_MODE_REMOTE : v1::PREFILL_MODE_LOCAL);
  u->set_prefill_cached_tokens(s.prefill_cached_tokens);
  u->set_transfer_bytes(s.transfer_bytes);
  u->set_transfer_seconds(s.transfer_seconds);
  u->set_transfer_wait_seconds(s.transfer_wait_seconds);
  u->set_transport(s.transport);
  u->set_queue_seconds(s.queue_seconds);
  u->set_ttft_seconds(s.ttft_seconds);
  u->set_preemptions(s.preemptions);
  u->set_kv_incarnation(s.kv_incarnation);
  u->set_kv_event_seq(s.kv_event_seq);
}

// One Generate call. Engine callbacks (engine thread) queue messages; gRPC writes them
// one at a time. `this` is deleted in OnDone, which gRPC calls only after Finish, and
// End (hence Finish) comes only after the engine's on_done (or before anything was
// submitted), so no engine callback can run afterwards.
class GenerateReactor final : public rpc::QueuedWriteReactor<v1::DecodeResponse> {
 public:
  GenerateReactor(DecodeService* service, Engine* engine, const v1::DecodeRequest& request,
                  grpc::CallbackServerContext* context)
      : service_(service), engine_(engine) {
    service_->calls().Started();
    if (std::optional<grpc::Status> denied = service_->security().CheckInternalCaller(*context)) {
      EndCall(*std::move(denied));
      return;
    }
    absl::StatusOr<EngineRequest> r = FromProto(request);
    if (!r.ok()) {
      EndCall(rpc::RefusalStatus(*context, r.status()));
      return;
    }
    // The caller's deadline also bounds the call to the prefill worker.
    const std::chrono::system_clock::time_point deadline = context->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      r->deadline = absl::FromChrono(deadline);
    }
    logprobs_ = r->params.logprobs > 0;
    RequestCallbacks cb;
    cb.on_tokens = [this](const StepOutput& out) { OnTokens(out); };
    cb.on_done = [this](const absl::Status& st, const RequestSummary& s) { OnEngineDone(st, s); };
    absl::StatusOr<uint64_t> h = engine_->Submit(*std::move(r), std::move(cb));
    if (!h.ok()) {
      EndCall(rpc::RefusalStatus(*context, h.status()));
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
    DecodeService* service = service_;
    delete this;
    service->calls().Done();
  }

 private:
  void OnTokens(const StepOutput& out) {
    v1::DecodeResponse m;
    if (out.prefill) FillUsage(*out.prefill, m.mutable_usage());
    for (size_t i = 0; i < out.tokens.size(); ++i) {
      m.add_token_ids(out.tokens[i]);
      if (logprobs_) rpc::ToProto(out.samples[i], m.add_logprobs());
    }
    Send(std::move(m));
  }

  void OnEngineDone(const absl::Status& st, const RequestSummary& s) {
    if (st.ok()) {
      v1::DecodeResponse m;
      m.set_finish_reason(s.finish_reason);
      FillUsage(s, m.mutable_usage());
      Send(std::move(m));
    }
    EndCall(rpc::ToGrpc(st));
  }

  // End, counted once (every path ends the call exactly once).
  void EndCall(grpc::Status status) {
    service_->CountFinished(status.error_code());
    End(std::move(status));  // `this` may be gone after it
  }

  DecodeService* service_;
  Engine* engine_;
  bool logprobs_ = false;
  absl::Mutex mu_;
  std::optional<uint64_t> handle_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

DecodeService::DecodeService(Engine* engine, rpc::Security security)
    : engine_(engine), security_(std::move(security)), registry_(engine->metrics()) {
  auto& family = prometheus::BuildCounter()
                     .Name("kvrelay_decode_requests_total")
                     .Help("Finished Generate calls on this decode worker by gRPC status code")
                     .Register(*registry_);
  for (size_t c = 0; c < requests_.size(); ++c) {
    requests_[c] =
        &family.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
  }
}

void DecodeService::CountFinished(grpc::StatusCode code) {
  const size_t c = static_cast<size_t>(code);
  requests_[c < requests_.size() ? c : static_cast<size_t>(grpc::StatusCode::UNKNOWN)]->Increment();
}

grpc::ServerWriteReactor<v1::DecodeResponse>* DecodeService::Generate(
    grpc::CallbackServerContext* context, const v1::DecodeRequest* request) {
  return new GenerateReactor(this, engine_, *request, context);
}

}  // namespace kvrelay::decode
