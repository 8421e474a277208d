#include "router/generation_service.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_pool.h"
#include "common/metrics/metrics.h"
#include "common/rpc/convert.h"
#include "common/rpc/keepalive.h"
#include "common/rpc/queued_write_reactor.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "router/output_stream.h"

namespace kvrelay::router {

namespace {

grpc::ByteBuffer ToByteBuffer(const google::protobuf::Message& m) {
  const std::string bytes = m.SerializeAsString();
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// INVALID_ARGUMENT when the bytes are not a `T` (malformed, or a text field that is
// not UTF-8).
template <typename T>
absl::Status ParseRequest(const grpc::ByteBuffer& buffer, size_t max_bytes, T* out) {
  // A call the client cancelled before its request message arrived comes with no message
  // at all (an invalid buffer, not an empty one): CANCELLED, not the bad (empty) request
  // it would parse into. The call's context may not know of the cancel yet.
  if (!buffer.Valid()) return absl::CancelledError("the call ended before its request arrived");
  if (buffer.Length() > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the request has ", buffer.Length(), " bytes; the limit is ", max_bytes));
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (buffer.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  if (!out->ParseFromString(bytes)) {
    if (std::optional<std::string> bad = rpc::FindInvalidUtf8(bytes, out->GetDescriptor())) {
      return absl::InvalidArgumentError(
          absl::StrCat("the request is not a valid ", out->GetTypeName(), ": ", *bad));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("the request is not a valid ", out->GetTypeName(), ": malformed bytes"));
  }
  return absl::OkStatus();
}

// UNAUTHENTICATED unless the call's "authorization" metadata carries one of `keys`
// (always OK without keys).
std::optional<grpc::Status> CheckKey(const ApiKeys& keys, const grpc::ServerContextBase& context) {
  if (keys.empty()) return std::nullopt;
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it != md.end() && keys.Allows(absl::string_view(it->second.data(), it->second.size()))) {
    return std::nullopt;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      it == md.end() ? "missing API key: send metadata 'authorization: Bearer KEY'"
                                     : "incorrect API key provided");
}

}  // namespace

// One Generate stream. The runner serving it queues messages with Send and ends it
// with End (exactly once); gRPC writes them one at a time. OnCancel (the client went
// away or its deadline passed) cancels the current decode worker call. `this` is
// deleted in OnDone, which gRPC calls only after Finish, and Finish only follows End:
// the runner never touches the call after End.
class GenerationService::Call final : public rpc::QueuedWriteReactor<grpc::ByteBuffer> {
 public:
  Call(GenerationService* service, grpc::CallbackServerContext* context)
      : service_(service),
        context_(context),
        deadline_(context->deadline()),
        accepted_(absl::Now()) {
    service_->calls_.Started();
  }

  PreparedRequest request;

  absl::Time accepted() const { return accepted_; }
  // The client's deadline, if it set one.
  std::optional<std::chrono::system_clock::time_point> deadline() const {
    if (deadline_ == std::chrono::system_clock::time_point::max()) return std::nullopt;
    return deadline_;
  }

  void Send(const v1::GenerateResponse& m) { QueuedWriteReactor::Send(ToByteBuffer(m)); }

  // Ends the call (the first status wins) and counts it, once, in the metrics: before
  // the client can see the status, so a scrape after the call ended includes it.
  void End(grpc::Status status) {
    if (!ended_.exchange(true)) {
      grpc::StatusCode code = status.error_code();
      // A deadline passing cancels the call: the client sees DEADLINE_EXCEEDED. (gRPC's
      // timers and the system clock differ by a few ms: a cancel that close counts too.)
      if (code == grpc::StatusCode::CANCELLED && deadline() &&
          std::chrono::system_clock::now() + std::chrono::milliseconds(50) >= *deadline()) {
        code = grpc::StatusCode::DEADLINE_EXCEEDED;
      }
      service_->RecordEnd(*this, code, admitted);
    }
    QueuedWriteReactor::End(std::move(status));  // `this` may be gone after it
  }

  // Load shedding: ends the call RESOURCE_EXHAUSTED with `message`, telling the client
  // when to retry (grpc-retry-pushback-ms). Only by the thread that owns ending the call
  // (it took the call off the queue, or never queued it): trailing metadata must precede
  // the Finish that End starts.
  void Refuse(const std::string& message, absl::Duration pushback) {
    context_->AddTrailingMetadata(
        "grpc-retry-pushback-ms",
        absl::StrCat(std::max<int64_t>(0, absl::ToInt64Milliseconds(pushback))));
    End(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, message));
  }

  // Set (under the service's mu_) when the call enters the queue; read by whoever ends
  // it, which took it off the queue under mu_ (or is the thread that set it).
  bool admitted = false;
  absl::Time queued_at;  // likewise

  // The decode worker call now in progress; false (nothing attached) if the client
  // has already cancelled.
  bool Attach(grpc::ClientContext* ctx) {
    absl::MutexLock l(&mu_);
    if (cancelled_) return false;
    worker_call_ = ctx;
    return true;
  }
  void Detach() {
    absl::MutexLock l(&mu_);
    worker_call_ = nullptr;
  }
  bool cancelled() const {
    absl::MutexLock l(&mu_);
    return cancelled_;
  }

  void OnCancel() override {
    {
      absl::MutexLock l(&mu_);
      cancelled_ = true;
      if (worker_call_ != nullptr) worker_call_->TryCancel();
    }
    // Still waiting for a runner: leave the queue now (its place goes to a live request).
    if (service_->RemoveQueued(this)) {
      End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while queued"));
    }
  }

  void OnDone() override {
    GenerationService* service = service_;
    delete this;
    service->calls_.Done();
  }

 private:
  GenerationService* service_;
  grpc::CallbackServerContext* const context_;  // valid until OnDone
  const std::chrono::system_clock::time_point deadline_;
  const absl::Time accepted_;
  std::atomic<bool> ended_{false};
  mutable absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* worker_call_ ABSL_GUARDED_BY(mu_) = nullptr;
};

GenerationService::Metrics::Metrics(prometheus::Registry& r) {
  auto& by_code = prometheus::BuildCounter()
                      .Name("kvrelay_router_requests_total")
                      .Help("Finished Generate calls by gRPC status code (refused ones included)")
                      .Register(r);
  for (size_t c = 0; c < requests.size(); ++c) {  // codes 0..16, named as gRPC names them
    requests[c] =
        &by_code.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
  }
  auto histogram = [&r](const char* name, const char* help,
                        const prometheus::Histogram::BucketBoundaries& buckets) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, buckets);
  };
  ttft = histogram("kvrelay_router_ttft_seconds",
                   "Time from accepting a Generate call to its first token, in seconds",
                   metrics::LatencyBuckets());
  inter_token =
      histogram("kvrelay_router_inter_token_seconds",
                "Time between consecutive tokens of a request (one per token), in seconds",
                metrics::StepBuckets());
  duration = histogram("kvrelay_router_request_duration_seconds",
                       "Time from accepting an admitted Generate call to its end, any status, "
                       "in seconds",
                       metrics::LatencyBuckets());
  queue = histogram("kvrelay_router_queue_seconds",
                    "Time an admitted Generate call waited in the router's queue, in seconds",
                    metrics::LatencyBuckets());
  auto counter = [&r](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
  };
  prompt_tokens = counter("kvrelay_router_prompt_tokens_total",
                          "Prompt tokens of routed requests (counted at the first route)");
  generated_tokens =
      counter("kvrelay_router_generated_tokens_total", "Generated tokens streamed to clients");
  prefix_available = counter(
      "kvrelay_router_prefix_available_tokens_total",
      "Prompt tokens of routed requests cached anywhere in the fleet per the prefix index "
      "(longest cached prefix); divide by kvrelay_router_prompt_tokens_total for the hit rate");
  prefix_predicted =
      counter("kvrelay_router_prefix_predicted_tokens_total",
              "Prompt tokens of routed requests the prefix index predicted cached on the chosen "
              "worker(s); divide by kvrelay_router_prompt_tokens_total for the hit rate");
  prefix_delivered = counter(
      "kvrelay_router_prefix_delivered_tokens_total",
      "Prompt tokens of routed requests the workers reported reused from their caches; divide "
      "by kvrelay_router_prompt_tokens_total for the hit rate");
  auto& tier_tokens =
      prometheus::BuildCounter()
          .Name("kvrelay_router_prefix_tier_tokens_total")
          .Help(
              "The prefix hit rate per KV tier: prompt tokens of routed requests cached in a "
              "worker's pool, host-memory tier or disk tier, as available (on the worker "
              "holding the longest prefix), predicted (on the chosen worker) and delivered "
              "(reported by it); divide by kvrelay_router_prompt_tokens_total")
          .Register(r);
  for (int k = 0; k < 3; ++k) {
    static constexpr const char* kKinds[] = {"available", "predicted", "delivered"};
    static constexpr const char* kTiers[] = {"pool", "host", "disk"};
    for (int t = 0; t < 3; ++t) {
      prefix_tier[k][t] = &tier_tokens.Add({{"kind", kKinds[k]}, {"tier", kTiers[t]}});
    }
  }
  auto& prefill = prometheus::BuildCounter()
                      .Name("kvrelay_router_prefill_total")
                      .Help(
                          "Finished requests by how their prompt was prefilled (local on the "
                          "decode worker, or remote on a prefill worker)")
                      .Register(r);
  prefill_local = &prefill.Add({{"mode", "local"}});
  prefill_remote = &prefill.Add({{"mode", "remote"}});
  migrations = counter("kvrelay_router_migrations_total",
                       "Requests moved to another decode worker after theirs failed mid-stream");
  running = &prometheus::BuildGauge()
                 .Name("kvrelay_router_requests_running")
                 .Help("Generate calls being served (routed and streaming)")
                 .Register(r)
                 .Add({});
  queue_depth = &prometheus::BuildGauge()
                     .Name("kvrelay_router_queue_depth")
                     .Help("Admitted Generate calls waiting for a runner")
                     .Register(r)
                     .Add({});
  auto& shed = prometheus::BuildCounter()
                   .Name("kvrelay_router_shed_total")
                   .Help(
                       "Generate calls refused RESOURCE_EXHAUSTED by admission control: the "
                       "queue was full (--max_queued), or the call waited longer than "
                       "--max_queue_seconds")
                   .Register(r);
  shed_queue_full = &shed.Add({{"reason", "queue_full"}});
  shed_queue_timeout = &shed.Add({{"reason", "queue_timeout"}});
}

GenerationService::GenerationService(const ModelContext* model, WorkerRegistry* registry,
                                     GenerationOptions options,
                                     std::shared_ptr<prometheus::Registry> metrics)
    : model_(model),
      registry_(registry),
      options_(std::move(options)),
      metrics_registry_(metrics != nullptr ? std::move(metrics)
                                           : std::make_shared<prometheus::Registry>()),
      m_(*metrics_registry_) {
  for (int i = 0; i < std::max(1, options_.max_running); ++i) {
    runners_.emplace_back([this] {
      pthread_setname_np(pthread_self(), "kvr-route");
      RunLoop();
    });
  }
  if (options_.max_queue_time > absl::ZeroDuration()) {
    shedder_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "kvr-shed");
      ShedLoop();
    });
  }
}

GenerationService::~GenerationService() {
  {
    absl::MutexLock l(&mu_);
    accepting_ = false;
    stop_ = true;
  }
  for (std::thread& t : runners_) t.join();
  if (shedder_.joinable()) shedder_.join();
}

void GenerationService::ShedLoop() {
  absl::MutexLock l(&mu_);
  while (!stop_) {
    // The queue is FIFO: its front waited longest.
    std::vector<Call*> expired;
    const absl::Time now = absl::Now();
    while (!queue_.empty() && now - queue_.front()->queued_at >= options_.max_queue_time) {
      expired.push_back(queue_.front());
      queue_.pop_front();
    }
    if (!expired.empty()) {
      m_.queue_depth->Set(static_cast<double>(queue_.size()));
      const absl::Duration pushback = RetryPushback(queue_.size());
      mu_.Unlock();
      // Taken off the queue here: this thread owns ending them.
      for (Call* call : expired) {
        m_.shed_queue_timeout->Increment();
        call->Refuse(absl::StrCat("waited ", absl::FormatDuration(now - call->queued_at),
                                  " in the router's queue, longer than --max_queue_seconds (",
                                  absl::ToDoubleSeconds(options_.max_queue_time), " s)"),
                     pushback);
      }
      mu_.Lock();
      continue;
    }
    if (queue_.empty()) {
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); };
      mu_.Await(absl::Condition(&wake));
    } else {
      // Until the front expires (a later front, after a cancel, expires later still).
      mu_.AwaitWithDeadline(absl::Condition(&stop_),
                            queue_.front()->queued_at + options_.max_queue_time);
    }
  }
}

absl::Duration GenerationService::RetryPushback(size_t queued) const {
  const int64_t us = recent_call_us_.load(std::memory_order_relaxed);
  if (us <= 0) return absl::Seconds(1);  // nothing served yet
  const absl::Duration drain = absl::Microseconds(us) * static_cast<double>(queued + 1) /
                               static_cast<double>(std::max(1, options_.max_running));
  return std::clamp(drain, absl::Milliseconds(100), absl::Seconds(30));
}

void GenerationService::StopAccepting() {
  absl::MutexLock l(&mu_);
  accepting_ = false;
}

void GenerationService::RunLoop() {
  while (true) {
    Call* call = nullptr;
    {
      absl::MutexLock l(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stop_
      call = queue_.front();
      queue_.pop_front();
      ++busy_;
      m_.queue_depth->Set(static_cast<double>(queue_.size()));
      m_.running->Set(busy_);
    }
    Serve(call);
    absl::MutexLock l(&mu_);
    --busy_;
    m_.running->Set(busy_);
  }
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw) {
  auto* call = new Call(this, context);
  v1::GenerateRequest parsed;
  if (std::optional<grpc::Status> denied = CheckKey(options_.api_keys, *context)) {
    call->End(*denied);
    return call;
  }
  if (absl::Status st = ParseRequest(*raw, options_.max_request_bytes, &parsed); !st.ok()) {
    call->End(rpc::RefusalStatus(*context, st));
    return call;
  }
  const v1::GenerateRequest* request = &parsed;
  std::string generated_id;
  {
    absl::MutexLock l(&mu_);
    generated_id = absl::StrCat("req-", registry_->options().router_id, "-", next_id_++);
  }
  absl::StatusOr<PreparedRequest> p = Prepare(*model_, *request, generated_id);
  if (!p.ok()) {
    call->End(rpc::RefusalStatus(*context, p.status()));
    return call;
  }
  call->request = *std::move(p);
  std::optional<grpc::Status> refused;
  std::optional<absl::Duration> queue_full;  // its retry pushback
  {
    absl::MutexLock l(&mu_);
    if (!accepting_) {
      refused = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down");
    } else if (queue_.size() >= options_.max_queued) {
      queue_full = RetryPushback(queue_.size());
    } else {
      call->admitted = true;
      call->queued_at = absl::Now();
      queue_.push_back(call);
      m_.queue_depth->Set(static_cast<double>(queue_.size()));
    }
  }
  if (refused) {
    call->End(*refused);
  } else if (queue_full) {
    m_.shed_queue_full->Increment();
    call->Refuse(absl::StrCat("the router's queue is full (", options_.max_queued,
                              " requests waiting, --max_queued; ", options_.max_running,
                              " running, --max_running)"),
                 *queue_full);
  }
  return call;
}

bool GenerationService::RemoveQueued(Call* call) {
  absl::MutexLock l(&mu_);
  auto it = std::find(queue_.begin(), queue_.end(), call);
  if (it == queue_.end()) return false;
  queue_.erase(it);
  m_.queue_depth->Set(static_cast<double>(queue_.size()));
  return true;
}

void GenerationService::RecordEnd(const Call& call, grpc::StatusCode code, bool admitted) {
  const size_t c = static_cast<size_t>(code);
  m_.requests[c < m_.requests.size() ? c : static_cast<size_t>(grpc::StatusCode::UNKNOWN)]
      ->Increment();
  if (admitted) {
    const absl::Duration d = absl::Now() - call.accepted();
    m_.duration->Observe(absl::ToDoubleSeconds(d));
    if (code == grpc::StatusCode::OK) {
      // The pace RetryPushback assumes: a moving average over ~16 calls (racy
      // read-modify-write: an estimate, a lost update does not matter).
      const int64_t us = absl::ToInt64Microseconds(d);
      const int64_t old = recent_call_us_.load(std::memory_order_relaxed);
      recent_call_us_.store(old <= 0 ? us : old + (us - old) / 16, std::memory_order_relaxed);
    }
  }
}

std::shared_ptr<grpc::Channel> GenerationService::ChannelTo(const std::string& address) {
  absl::MutexLock l(&channels_mu_);
  std::shared_ptr<grpc::Channel>& c = channels_[address];
  if (c == nullptr) c = rpc::CreateInternalChannel(address, options_.security);
  return c;
}

namespace {

bool IsRequestError(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::UNIMPLEMENTED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:  // e.g. the prompt can never fit the pool
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return true;
    default:
      return false;
  }
}

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

}  // namespace

void GenerationService::Serve(Call* call) {
  const PreparedRequest& req = call->request;
  const model::ModelConfig& cfg = model_->config;
  const int bs = model_->block_size;
  const uint64_t root = kvcache::RootHash(model_->model_id, req.cache_salt);
  const int64_t prompt_tokens = static_cast<int64_t>(req.prompt.size());
  m_.queue->Observe(Seconds(absl::Now() - call->accepted()));
  OutputStream out(model_->tokenizer.get(), req.prompt, req.stop);
  std::vector<int> excluded;
  int migrations = 0;
  std::optional<absl::Time> dispatched, first_token, last_token;
  int64_t predicted_cached = 0;
  std::string decode_id, prefill_id;
  grpc::Status last_failure;
  std::optional<grpc::Status> busy;  // a decode worker refused for load: others are tried
  bool sent_any = false;
  bool delivered_counted = false;  // the prefix hit the workers reported (once per request)

  auto send_final = [&](const std::string& finish_reason, const v1::DecodeUsage* usage) {
    v1::GenerateResponse g;
    if (!sent_any) g.set_request_id(req.id);
    out.Flush(&g);
    v1::Final* f = g.mutable_final();
    f->set_finish_reason(out.matched_stop() ? "stop" : finish_reason);
    if (out.matched_stop()) f->set_stop_reason(*out.matched_stop());
    const int64_t n = static_cast<int64_t>(out.generated().size());
    f->mutable_usage()->set_prompt_tokens(prompt_tokens);
    f->mutable_usage()->set_completion_tokens(n);
    const absl::Time now = absl::Now();
    v1::Timing* t = f->mutable_timing();
    t->set_queue_seconds(Seconds((dispatched ? *dispatched : now) - call->accepted()));
    if (first_token) t->set_ttft_seconds(Seconds(*first_token - call->accepted()));
    if (n > 1) t->set_mean_itl_seconds(Seconds(*last_token - *first_token) / (n - 1));
    t->set_total_seconds(Seconds(now - call->accepted()));
    v1::Route* r = f->mutable_route();
    r->set_decode_worker(decode_id);
    r->set_prefill_worker(prefill_id);
    r->set_predicted_cached_tokens(predicted_cached);
    r->set_migrations(migrations);
    r->set_prefill_mode(prefill_id.empty() ? v1::PREFILL_MODE_LOCAL : v1::PREFILL_MODE_REMOTE);
    if (usage != nullptr) {
      const int64_t cached =
          std::min(prompt_tokens, std::max(usage->cached_tokens(), usage->prefill_cached_tokens()));
      f->mutable_usage()->set_cached_tokens(cached);
      f->mutable_usage()->set_host_cached_tokens(std::min(cached, usage->host_cached_tokens()));
      f->mutable_usage()->set_disk_cached_tokens(std::min(cached, usage->disk_cached_tokens()));
      r->set_prefill_mode(usage->prefill_mode());
      if (usage->prefill_mode() != v1::PREFILL_MODE_REMOTE) r->clear_prefill_worker();
      f->mutable_transfer()->set_bytes(usage->transfer_bytes());
      f->mutable_transfer()->set_seconds(usage->transfer_seconds());
      f->mutable_transfer()->set_transport(usage->transport());
    }
    (r->prefill_mode() == v1::PREFILL_MODE_REMOTE ? m_.prefill_remote : m_.prefill_local)
        ->Increment();
    call->Send(g);
    call->End(grpc::Status::OK);
  };

  // The finish reason if the tokens streamed so far already end the request (a worker
  // that failed after the last token), else empty.
  auto complete = [&]() -> std::string {
    const std::vector<int32_t>& gen = out.generated();
    if (gen.empty()) return "";
    const int32_t last = gen.back();
    const bool eos = !req.params.ignore_eos &&
                     std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), last) !=
                         cfg.eos_token_ids.end();
    const bool stop_id =
        std::find(req.params.stop_token_ids.begin(), req.params.stop_token_ids.end(), last) !=
        req.params.stop_token_ids.end();
    if (eos || stop_id) return "stop";
    if (static_cast<int64_t>(gen.size()) >= req.params.max_tokens ||
        static_cast<int64_t>(req.prompt.size() + gen.size()) >= cfg.max_position_embeddings) {
      return "length";
    }
    return "";
  };

  while (true) {
    const std::vector<int32_t>& gen = out.generated();
    std::vector<int32_t> tokens = req.prompt;
    tokens.insert(tokens.end(), gen.begin(), gen.end());
    const std::vector<uint64_t> hashes = kvcache::BlockHashes(root, tokens, bs);
    absl::StatusOr<RouteDecision> d =
        registry_->Route(options_.scheduler, hashes, static_cast<int64_t>(tokens.size()), excluded);
    if (!d.ok()) {
      if (busy) return call->End(*busy);  // every decode worker left refused it
      if (migrations > 0) {
        return call->End(grpc::Status(
            grpc::StatusCode::UNAVAILABLE,
            absl::StrCat(
                "decode worker ", decode_id, " failed (", last_failure.error_message(),
                ") and no other decode worker can take the request: ", d.status().message())));
      }
      return call->End(rpc::ToGrpc(d.status()));
    }
    const std::optional<WorkerRef> dw = registry_->Worker(d->decode_slot);
    if (!dw) {  // died since the view was taken
      excluded.push_back(d->decode_slot);
      continue;
    }
    std::optional<WorkerRef> pw;
    // A resumed request prefills on its new decode worker: the prefill worker would
    // sample its first token as if no output existed yet (penalties).
    if (d->prefill_slot >= 0 && gen.empty()) pw = registry_->Worker(d->prefill_slot);
    const int prefill_slot = pw ? d->prefill_slot : -1;
    const int64_t load_blocks =
        kvcache::BlocksFor(static_cast<int64_t>(tokens.size()) + req.params.max_tokens -
                               static_cast<int64_t>(gen.size()),
                           bs);
    const int64_t load_tokens = pw ? d->uncached_tokens : 0;
    registry_->NoteChosen(d->decode_slot, prefill_slot, load_blocks, load_tokens);
    if (!dispatched) {
      dispatched = absl::Now();
      const int32_t blocks = pw ? std::max(d->decode_overlap_blocks, d->prefill_overlap_blocks)
                                : d->decode_overlap_blocks;
      predicted_cached = std::min(prompt_tokens, static_cast<int64_t>(blocks) * bs);
      // The hit rate three ways, over the prompts of routed requests (delivered: when the
      // worker reports it).
      m_.prompt_tokens->Increment(static_cast<double>(prompt_tokens));
      m_.prefix_available->Increment(static_cast<double>(
          std::min(prompt_tokens, static_cast<int64_t>(d->max_overlap_blocks) * bs)));
      m_.prefix_predicted->Increment(static_cast<double>(predicted_cached));
      const PrefixIndex::TierSplit& ps = pw && d->prefill_overlap_blocks > d->decode_overlap_blocks
                                             ? d->prefill_split
                                             : d->decode_split;
      m_.CountTiers(1, ps, bs, prompt_tokens);
      m_.CountTiers(0, d->max_overlap_split, bs, prompt_tokens);
    }
    decode_id = dw->id;
    prefill_id = pw ? pw->id : "";

    v1::DecodeRequest dr;
    dr.set_request_id(req.id);
    *dr.mutable_prompt_token_ids() = {tokens.begin(), tokens.end()};
    *dr.mutable_sampling() = req.forward;
    dr.set_cache_salt(req.cache_salt);
    dr.set_resumed_tokens(static_cast<int32_t>(gen.size()));
    if (pw) {
      dr.mutable_plan()->set_mode(v1::PREFILL_MODE_REMOTE);
      dr.mutable_plan()->set_prefill_address(pw->address);
    } else {
      dr.mutable_plan()->set_mode(v1::PREFILL_MODE_LOCAL);
    }
    grpc::ClientContext ctx;
    if (auto deadline = call->deadline()) ctx.set_deadline(*deadline);
    if (!call->Attach(&ctx)) {
      registry_->NoteDone(d->decode_slot, prefill_slot, load_blocks, load_tokens);
      return call->End(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled"));
    }
    auto stub = v1::DecodeWorker::NewStub(ChannelTo(dw->address));
    std::unique_ptr<grpc::ClientReader<v1::DecodeResponse>> reader = stub->Generate(&ctx, dr);
    v1::DecodeResponse m;
    bool stopped = false;
    bool got_tokens = false;
    std::optional<v1::DecodeUsage> usage;
    std::string finish;
    const bool resumed = !gen.empty();
    while (reader->Read(&m)) {
      if (m.token_ids_size() > 0) {
        got_tokens = true;
        v1::GenerateResponse g;
        if (!sent_any) g.set_request_id(req.id);
        const size_t before = out.generated().size();
        stopped = out.Push(m, &g);
        const size_t added = out.generated().size() - before;
        const absl::Time now = absl::Now();
        // One inter-token observation per token: the tokens of one message share the gap
        // since the previous message (the first token has none).
        size_t gaps = added;
        if (!first_token) {
          first_token = now;
          m_.ttft->Observe(Seconds(now - call->accepted()));
          gaps = added > 0 ? added - 1 : 0;
          last_token = now;
        }
        const double gap = added > 0 ? Seconds(now - *last_token) / static_cast<double>(added) : 0;
        for (size_t i = 0; i < gaps; ++i) m_.inter_token->Observe(gap);
        m_.generated_tokens->Increment(static_cast<double>(added));
        last_token = now;
        sent_any = true;
        call->Send(g);
        if (stopped) {
          ctx.TryCancel();  // a stop string ended it: the worker stops generating
          break;
        }
      }
      if (m.has_usage()) {
        usage = m.usage();  // the first token's, then the final one
        // The prompt's prefix reuse, from the first attempt that computed the prompt
        // itself (a resumed one also caches the tokens streamed before).
        if (!delivered_counted && !resumed) {
          delivered_counted = true;
          const int64_t cached = std::min(
              prompt_tokens, std::max(usage->cached_tokens(), usage->prefill_cached_tokens()));
          m_.prefix_delivered->Increment(static_cast<double>(cached));
          const int64_t host = std::min(cached, usage->host_cached_tokens());
          const int64_t disk = std::min(cached - host, usage->disk_cached_tokens());
          m_.prefix_tier[2][0]->Increment(static_cast<double>(cached - host - disk));
          m_.prefix_tier[2][1]->Increment(static_cast<double>(host));
          m_.prefix_tier[2][2]->Increment(static_cast<double>(disk));
        }
      }
      if (!m.finish_reason().empty()) finish = m.finish_reason();
    }
    const grpc::Status st = reader->Finish();
    call->Detach();
    registry_->NoteDone(d->decode_slot, prefill_slot, load_blocks, load_tokens);
    if (stopped || (st.ok() && !finish.empty())) {
      return send_final(finish.empty() ? "stop" : finish, usage ? &*usage : nullptr);
    }
    if (call->cancelled()) {
      // The worker's call carries the client's deadline: it ends with it.
      if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) return call->End(st);
      return call->End(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled"));
    }
    if (st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED && !got_tokens) {
      // Its queue is full, or its pool too small for this prompt: another decode worker
      // may take it (not a migration: nothing was streamed).
      busy = st;
      excluded.push_back(d->decode_slot);
      continue;
    }
    if (!st.ok() && IsRequestError(st.error_code())) return call->End(st);
    // The decode worker failed (died, shut down, lost the connection) ...
    if (const std::string reason = complete(); !reason.empty()) {
      return send_final(reason, usage ? &*usage : nullptr);  // ... after the last token
    }
    // ... mid-stream: migrate.
    last_failure = st.ok() ? grpc::Status(grpc::StatusCode::INTERNAL, "stream ended early") : st;
    if (migrations >= options_.migration_limit) {
      return call->End(grpc::Status(
          grpc::StatusCode::UNAVAILABLE,
          absl::StrCat("decode worker ", decode_id, " failed (", last_failure.error_message(),
                       "); migration limit (", options_.migration_limit, ") reached")));
    }
    ++migrations;
    m_.migrations->Increment();
    excluded.push_back(d->decode_slot);
  }
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* raw,
                                                      grpc::ByteBuffer* raw_response) {
  auto* reactor = context->DefaultReactor();
  v1::TokenizeRequest request;
  if (std::optional<grpc::Status> denied = CheckKey(options_.api_keys, *context)) {
    reactor->Finish(*denied);
    return reactor;
  }
  if (absl::Status st = ParseRequest(*raw, options_.max_request_bytes, &request); !st.ok()) {
    reactor->Finish(rpc::RefusalStatus(*context, st));
    return reactor;
  }
  absl::StatusOr<std::vector<int32_t>> ids = TokenizeInput(*model_, request);
  if (!ids.ok()) {
    reactor->Finish(rpc::RefusalStatus(*context, ids.status()));
    return reactor;
  }
  v1::TokenizeResponse response;
  *response.mutable_token_ids() = {ids->begin(), ids->end()};
  response.set_max_context(model_->config.max_position_embeddings);
  *raw_response = ToByteBuffer(response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::ListModels(grpc::CallbackServerContext* context,
                                                        const v1::ListModelsRequest* request,
                                                        v1::ListModelsResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (std::optional<grpc::Status> denied = CheckKey(options_.api_keys, *context)) {
    reactor->Finish(*denied);
    return reactor;
  }
  v1::ModelInfo* m = response->add_models();
  m->set_id(model_->model_id);
  m->set_max_context(model_->config.max_position_embeddings);
  m->set_vocab_size(model_->config.vocab_size);
  m->set_block_size(model_->block_size);
  m->set_prefill_workers(registry_->Alive(v1::WORKER_ROLE_PREFILL));
  m->set_decode_workers(registry_->Alive(v1::WORKER_ROLE_DECODE));
  m->set_chat_template(tokenizer::ChatFormatName(model_->chat_format));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvrelay::router
