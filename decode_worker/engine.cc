#include "decode_worker/engine.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/kvcache/block_hash.h"
#include "common/metrics/metrics.h"
#include "common/model/generator.h"
#include "common/rpc/convert.h"
#include "common/transfer/checksum.h"
#include "common/transfer/fault_hooks.h"
#include "common/util/status.h"
#include "common/worker/kv_pool_metrics.h"
#include "kernels/backend.h"

namespace kvrelay::decode {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Distinct transport labels kept before further ones are counted as "other": the
// label comes from the prefill worker's stats, so a bounded set is enforced here too.
constexpr size_t kMaxTransportLabels = 16;

}  // namespace

// The engine's Prometheus series (DESIGN §7), looked up once: an update is an atomic
// add (a histogram observation: a short search of its buckets and a lock it alone
// takes). Updated once per step, per request or per loop turn, never per token.
struct Engine::Metrics {
  explicit Metrics(prometheus::Registry& r) : kv_pool(r, "sequences") {
    auto& steps = prometheus::BuildCounter()
                      .Name("kvrelay_decode_steps_total")
                      .Help(
                          "Decode engine steps (one forward pass each) by phase: decode (only "
                          "decode tokens), prefill (only prefill chunks), mixed")
                      .Register(r);
    auto& step_seconds = prometheus::BuildHistogram()
                             .Name("kvrelay_decode_step_seconds")
                             .Help(
                                 "Duration of the forward pass of one decode engine step (all its "
                                 "sequences) by phase")
                             .Register(r);
    const char* phases[] = {"decode", "prefill", "mixed"};
    for (int i = 0; i < 3; ++i) {
      this->steps[i] = &steps.Add({{"phase", phases[i]}});
      this->step_seconds[i] = &step_seconds.Add({{"phase", phases[i]}}, metrics::StepBuckets());
    }
    batch_sequences = &prometheus::BuildHistogram()
                           .Name("kvrelay_decode_batch_sequences")
                           .Help("Sequences in one decode engine step")
                           .Register(r)
                           .Add({}, metrics::CountBuckets());
    batch_tokens = &prometheus::BuildHistogram()
                        .Name("kvrelay_decode_batch_tokens")
                        .Help("Tokens (decode tokens and prefill chunks) in one decode engine step")
                        .Register(r)
                        .Add({}, metrics::CountBuckets());
    running = &prometheus::BuildGauge()
                   .Name("kvrelay_decode_running_sequences")
                   .Help("Sequences in the running batch (holding KV blocks)")
                   .Register(r)
                   .Add({});
    waiting = &prometheus::BuildGauge()
                   .Name("kvrelay_decode_waiting_sequences")
                   .Help("Requests waiting for admission (new or preempted)")
                   .Register(r)
                   .Add({});
    preemptions = &prometheus::BuildCounter()
                       .Name("kvrelay_decode_preemptions_total")
                       .Help("Sequences preempted for lack of KV blocks (recomputed later)")
                       .Register(r)
                       .Add({});
    generated_tokens = &prometheus::BuildCounter()
                            .Name("kvrelay_decode_generated_tokens_total")
                            .Help("Tokens generated and streamed by this decode worker")
                            .Register(r)
                            .Add({});
    prompt_tokens = &prometheus::BuildCounter()
                         .Name("kvrelay_decode_prompt_tokens_total")
                         .Help("Prompt tokens of admitted requests (counted at first admission)")
                         .Register(r)
                         .Add({});
    cached_tokens = &prometheus::BuildCounter()
                         .Name("kvrelay_decode_cached_tokens_total")
                         .Help(
                             "Prompt tokens reused from this worker's prefix cache at first "
                             "admission (delivered hit rate: cached / prompt tokens)")
                         .Register(r)
                         .Add({});
    auto& remote = prometheus::BuildCounter()
                       .Name("kvrelay_decode_remote_prefills_total")
                       .Help(
                           "Remote prefills by result: ok, failed (the call failed; prefilled "
                           "here instead), checksum_mismatch (KV arrived corrupt; prefilled "
                           "here instead), cancelled (the request ended first)")
                       .Register(r);
    const char* results[] = {"ok", "failed", "checksum_mismatch", "cancelled"};
    for (int i = 0; i < 4; ++i) remote_prefills[i] = &remote.Add({{"result", results[i]}});
    checksum_failures = &prometheus::BuildCounter()
                             .Name("kvrelay_kv_checksum_failures_total")
                             .Help("KV blocks from remote prefills whose checksum did not match")
                             .Register(r)
                             .Add({});
    received_bytes = &prometheus::BuildCounter()
                          .Name("kvrelay_kv_transfer_received_bytes_total")
                          .Help(
                              "Bytes of KV written into this worker's pool by remote prefills "
                              "(as the prefill worker reports them), by transport")
                          .Register(r);
    quarantined = &prometheus::BuildGauge()
                       .Name("kvrelay_decode_quarantined_blocks")
                       .Help(
                           "KV blocks held from reuse until a failed or cancelled remote "
                           "prefill is known to have ended")
                       .Register(r)
                       .Add({});
  }

  // Engine thread only.
  prometheus::Counter& ReceivedBytes(const std::string& transport) {
    const std::string label = transport.empty() ? "unknown" : transport;
    auto it = received_by_transport.find(label);
    if (it != received_by_transport.end()) return *it->second;
    const std::string key = received_by_transport.size() < kMaxTransportLabels ? label : "other";
    prometheus::Counter* c = &received_bytes->Add({{"transport", key}});
    received_by_transport.emplace(key, c);
    return *c;
  }

  prometheus::Counter* steps[3];
  prometheus::Histogram* step_seconds[3];
  prometheus::Histogram* batch_sequences;
  prometheus::Histogram* batch_tokens;
  prometheus::Gauge* running;
  prometheus::Gauge* waiting;
  prometheus::Counter* preemptions;
  prometheus::Counter* generated_tokens;
  prometheus::Counter* prompt_tokens;
  prometheus::Counter* cached_tokens;
  prometheus::Counter* remote_prefills[4];  // by RemoteOutcome
  prometheus::Counter* checksum_failures;
  prometheus::Family<prometheus::Counter>* received_bytes;
  absl::flat_hash_map<std::string, prometheus::Counter*> received_by_transport;
  prometheus::Gauge* quarantined;
  worker::KvPoolMetrics kv_pool;
};

struct Engine::Seq {
  uint64_t handle = 0;
  EngineRequest req;
  RequestCallbacks cb;
  uint64_t root = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t prompt_len = 0;
  std::unique_ptr<kvcache::KvSequence> kv;  // null while waiting
  int64_t computed = 0;                     // tokens whose KV is in kv's blocks
  bool admitted_once = false;
  bool remote_tried = false;    // a remote plan is tried on the first admission only
  bool remote_pending = false;  // waiting for the prefill worker; not scheduled
  bool reload_pending = false;  // waiting for blocks from a lower tier; not scheduled
  bool reload_first = false;    // ... on its first admission (counted as cached tokens)
  int64_t first_block = 0;      // remote: prompt blocks sent, first_block ...
  std::vector<int32_t> dest_blocks;
  RequestSummary summary;
  double submitted = 0;

  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
    std::string model_id, const EngineOptions& options, const EngineRemote& remote) {
  if (options.max_batch_tokens < 1 || options.max_running < 1 || options.prefill_chunk < 1 ||
      options.max_waiting < 1) {
    return absl::InvalidArgumentError(
        "engine: max_batch_tokens, max_running, prefill_chunk and max_waiting must be >= 1");
  }
  if (options.max_batch_tokens < options.max_running) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: max_batch_tokens (", options.max_batch_tokens, ") must be >= max_running (",
        options.max_running, "): every running sequence decodes"));
  }
  if ((remote.client == nullptr) != (remote.memory == nullptr)) {
    return absl::InvalidArgumentError("engine: remote prefill needs both a client and the memory");
  }
  return std::unique_ptr<Engine>(
      new Engine(model, pool, cache, std::move(model_id), options, remote));
}

Engine::Engine(const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
               std::string model_id, const EngineOptions& options, const EngineRemote& remote)
    : model_(model),
      pool_(pool),
      cache_(cache),
      model_id_(std::move(model_id)),
      options_(options),
      remote_(remote),
      registry_(options.metrics ? options.metrics : std::make_shared<prometheus::Registry>()),
      metrics_(options.record_metrics ? std::make_unique<Metrics>(*registry_) : nullptr),
      thread_([this] {
        pthread_setname_np(pthread_self(), "kvr-engine");
        Loop();
      }) {
  UpdateKvBlockGauges();
}

Engine::~Engine() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
  // Prefill and Abort calls still out call back into this object: wait for them (their
  // deadlines bound the wait).
  absl::MutexLock l(&mu_);
  mu_.Await(absl::Condition(
      +[](int64_t* n) { return *n == 0; }, &outstanding_rpcs_));
}

absl::StatusOr<uint64_t> Engine::Submit(EngineRequest request, RequestCallbacks callbacks) {
  KVR_RETURN_IF_ERROR(sampling::ValidateSamplingParams(request.params));
  KVR_RETURN_IF_ERROR(model::ValidatePrompt(*model_, request.prompt));
  if (!request.prefill_address.empty() && remote_.client == nullptr) {
    return absl::UnimplementedError("this engine has no remote prefill");
  }
  if (request.resumed_tokens < 0 ||
      request.resumed_tokens >= static_cast<int64_t>(request.prompt.size())) {
    return absl::InvalidArgumentError(absl::StrCat("resumed_tokens must be in [0, ",
                                                   request.prompt.size(), "), got ",
                                                   request.resumed_tokens));
  }
  if (request.resumed_tokens > 0 && !request.prefill_address.empty()) {
    return absl::InvalidArgumentError("resumed_tokens needs a local plan");
  }
  auto s = std::make_unique<Seq>();
  s->req = std::move(request);
  s->cb = std::move(callbacks);
  s->root = kvcache::RootHash(model_id_, s->req.cache_salt);
  s->tokens = s->req.prompt;
  s->prompt_len = static_cast<int64_t>(s->tokens.size()) - s->req.resumed_tokens;
  s->summary.prompt_tokens = s->prompt_len;
  s->submitted = Now();
  absl::MutexLock l(&mu_);
  if (draining_ || stop_) return absl::UnavailableError("decode engine is shutting down");
  if (incoming_.size() + static_cast<size_t>(stats_.waiting) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("decode engine queue is full (", options_.max_waiting, " waiting)"));
  }
  s->handle = next_handle_++;
  const uint64_t handle = s->handle;
  incoming_.push_back(std::move(s));
  ++active_;
  return handle;
}

void Engine::Cancel(uint64_t handle) {
  absl::MutexLock l(&mu_);
  cancels_.push_back(handle);
}

void Engine::StopAccepting() {
  absl::MutexLock l(&mu_);
  draining_ = true;
}

void Engine::Drain() {
  absl::MutexLock l(&mu_);
  draining_ = true;
  mu_.Await(absl::Condition(
      +[](int64_t* active) { return *active == 0; }, &active_));
}

EngineStats Engine::stats() const {
  absl::MutexLock l(&mu_);
  return stats_;
}

void Engine::UpdateKvBlockGauges() {
  if (metrics_) metrics_->kv_pool.Update(cache_->counts());
}

void Engine::RecordStep(int decode_items, int prefill_items, double seconds, int64_t sequences,
                        int64_t tokens) {
  if (!metrics_) return;
  const int phase = prefill_items == 0 ? 0 : decode_items == 0 ? 1 : 2;
  Metrics& m = *metrics_;
  m.steps[phase]->Increment();
  m.step_seconds[phase]->Observe(seconds);
  m.batch_sequences->Observe(static_cast<double>(sequences));
  m.batch_tokens->Observe(static_cast<double>(tokens));
}

void Engine::RecordRemote(RemoteOutcome outcome) {
  if (metrics_) metrics_->remote_prefills[static_cast<int>(outcome)]->Increment();
}

void Engine::RecordLoopGauges(int64_t quarantined_blocks) {
  if (!metrics_) return;
  metrics_->running->Set(static_cast<double>(running_.size()));
  metrics_->waiting->Set(static_cast<double>(waiting_.size()));
  metrics_->quarantined->Set(static_cast<double>(quarantined_blocks));
  UpdateKvBlockGauges();
}

void Engine::Loop() {
  bool idle = false;  // the last step could do nothing: wait for news
  for (;;) {
    std::deque<std::unique_ptr<Seq>> incoming;
    std::vector<uint64_t> cancels;
    std::vector<RemoteResult> remote_results;
    std::vector<AbortResult> abort_results;
    std::vector<ReloadDone> reload_results;
    bool stop = false;
    {
      absl::MutexLock l(&mu_);
      // Only the guarded fields: absl may evaluate the condition on another thread.
      auto has_news = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !incoming_.empty() || !cancels_.empty() || !remote_results_.empty() ||
               !abort_results_.empty() || !reload_results_.empty();
      };
      if (seqs_.empty() || idle) {
        if (quarantine_.empty()) {
          mu_.Await(absl::Condition(&has_news));
        } else {  // abort retries are due from time to time
          mu_.AwaitWithTimeout(absl::Condition(&has_news), remote_.abort_retry);
        }
      }
      incoming.swap(incoming_);
      cancels.swap(cancels_);
      remote_results.swap(remote_results_);
      abort_results.swap(abort_results_);
      reload_results.swap(reload_results_);
      stop = stop_;
    }
    for (auto& s : incoming) {
      Seq* raw = s.get();
      seqs_.emplace(raw->handle, std::move(s));
      waiting_.push_back(raw);
    }
    for (uint64_t h : cancels) {
      auto it = seqs_.find(h);
      if (it != seqs_.end())
        Finish(it->second.get(), absl::CancelledError("request cancelled"), "");
    }
    for (RemoteResult& r : remote_results) OnRemoteResult(std::move(r));
    for (const AbortResult& r : abort_results) OnAbortResult(r);
    for (const ReloadDone& r : reload_results) OnReloadDone(r);
    if (stop) {
      std::vector<Seq*> all;
      for (auto& [h, s] : seqs_) all.push_back(s.get());
      for (Seq* s : all) Finish(s, absl::UnavailableError("decode engine stopped"), "");
      quarantine_.clear();
      RecordLoopGauges(0);
      return;
    }
    DriveQuarantine();
    const int64_t steps_before = stats().steps;
    const size_t seqs_before = seqs_.size(), running_before = running_.size();
    if (!seqs_.empty()) Step();
    idle = stats().steps == steps_before && seqs_.size() == seqs_before &&
           running_.size() == running_before;
    int64_t q = 0;
    for (const auto& [id, e] : quarantine_) q += static_cast<int64_t>(e.kv->blocks().size());
    RecordLoopGauges(q);
    absl::MutexLock l(&mu_);
    stats_.running = static_cast<int64_t>(running_.size());
    stats_.waiting = static_cast<int64_t>(waiting_.size());
    stats_.quarantined_blocks = q;
  }
}

void Engine::StartRemotePrefill(Seq* s) {
  const int B = cache_->block_size();
  const int64_t n = static_cast<int64_t>(s->tokens.size());
  const int64_t nblocks = kvcache::BlocksFor(n, B);
  s->remote_tried = true;
  s->remote_pending = true;
  s->first_block = s->computed / B;
  s->dest_blocks.assign(s->kv->blocks().begin() + s->first_block,
                        s->kv->blocks().begin() + nblocks);
  v1::PrefillRequest req;
  req.set_request_id(s->req.id);
  for (int32_t t : s->tokens) req.add_prompt_token_ids(t);
  *req.mutable_sampling() = rpc::ToProto(s->req.params);
  req.set_cache_salt(s->req.cache_salt);
  *req.mutable_destination() = rpc::ToProto(remote_.memory->descriptor());
  req.set_first_block(s->first_block);
  req.set_model_id(model_id_);
  req.set_block_size(cache_->block_size());
  req.set_kv_dtype(kernels::DTypeName(pool_->layout().dtype));
  req.set_lease_generation(lease_generation_base_ + s->handle);  // unique per lease
  for (int32_t b : s->dest_blocks) req.add_destination_blocks(b);
  {
    absl::MutexLock l(&mu_);
    ++outstanding_rpcs_;
    ++stats_.remote_prefills;
  }
  const uint64_t handle = s->handle;
  const absl::Duration timeout = std::max(
      absl::ZeroDuration(), std::min(remote_.prefill_timeout, s->req.deadline - absl::Now()));
  remote_.client->Prefill(s->req.prefill_address, std::move(req), timeout,
                          [this, handle](const absl::Status& st, const v1::PrefillResponse& resp) {
                            absl::MutexLock l(&mu_);
                            remote_results_.push_back({handle, st, resp});
                            --outstanding_rpcs_;
                          });
}

void Engine::OnRemoteResult(RemoteResult r) {
  // A cancelled request's call: its blocks wait in quarantine for this.
  for (auto& [id, q] : quarantine_) {
    if (q.handle == r.handle) q.prefill_done = true;
  }
  auto it = seqs_.find(r.handle);
  if (it == seqs_.end() || !it->second->remote_pending) return;
  Seq* s = it->second.get();
  s->remote_pending = false;
  absl::Status st = r.status;
  RemoteOutcome outcome = RemoteOutcome::kFailed;
  if (st.ok()) {
    const v1::PrefillStats& ps = r.response.stats();
    if (metrics_ && ps.transfer_bytes() > 0) {
      metrics_->ReceivedBytes(ps.transport()).Increment(static_cast<double>(ps.transfer_bytes()));
    }
    std::vector<uint64_t> sums(r.response.block_checksums().begin(),
                               r.response.block_checksums().end());
    const uint64_t block_bytes = pool_->layout().block_bytes();
    // Test-only (KVRELAY_FAULT_INJECTION): a byte corrupted on the way, for the fault
    // suite to check that the checksums catch it. Host pools only.
    if (!s->dest_blocks.empty() && transfer::fault::CorruptNextReceivedTransfer() &&
        model_->backend().memory_kind() == kernels::MemoryKind::kHost) {
      pool_->view()
          .base[static_cast<uint64_t>(s->dest_blocks[0]) * block_bytes + block_bytes / 2] ^= 0x5a;
    }
    // Computed where the pool lives (the model's backend: host or GPU memory).
    std::vector<uint64_t> got(s->dest_blocks.size());
    st = model_->backend().BlockChecksums(pool_->view().base, pool_->num_blocks(), block_bytes,
                                          s->dest_blocks, got.data());
    if (st.ok()) st = transfer::CompareBlockChecksums(s->dest_blocks, got, sums);
    if (absl::IsDataLoss(st)) {  // count the bad blocks (only on this failure path)
      outcome = RemoteOutcome::kChecksumMismatch;
      int64_t bad = 0;
      for (size_t i = 0; i < got.size() && i < sums.size(); ++i) bad += got[i] != sums[i];
      if (metrics_) metrics_->checksum_failures->Increment(static_cast<double>(bad));
    }
  }
  if (!st.ok()) {
    RecordRemote(outcome);
    // Fall back to prefill here, on other blocks; these wait in quarantine.
    ++s->summary.remote_failures;
    {
      absl::MutexLock l(&mu_);
      ++stats_.remote_prefill_failures;
    }
    Quarantine(s);
    auto q = std::find_if(quarantine_.begin(), quarantine_.end(),
                          [&](const auto& e) { return e.second.handle == s->handle; });
    if (q != quarantine_.end()) q->second.prefill_done = true;
    running_.erase(std::find(running_.begin(), running_.end(), s));
    s->computed = 0;
    waiting_.push_front(s);
    return;
  }
  const v1::PrefillStats& ps = r.response.stats();
  s->summary.remote_prefill = true;
  s->summary.prefill_cached_tokens = ps.cached_tokens();
  if (ps.cached_tokens() > s->summary.cached_tokens) {  // the prefill worker's hit counts
    s->summary.host_cached_tokens = ps.host_cached_tokens();
    s->summary.disk_cached_tokens = ps.disk_cached_tokens();
  }
  s->summary.transfer_bytes = ps.transfer_bytes();
  s->summary.transfer_seconds = ps.transfer_seconds();
  s->summary.transfer_wait_seconds = ps.transfer_wait_seconds();
  s->summary.transport = ps.transport();
  s->computed = static_cast<int64_t>(s->tokens.size());
  s->kv->Commit(s->tokens, s->computed);
  RecordRemote(RemoteOutcome::kOk);
  if (metrics_) metrics_->generated_tokens->Increment();
  Emit(s, rpc::FromProto(r.response.first_logprobs()));
}

void Engine::Quarantine(Seq* s) {
  Quarantined q;
  q.kv = std::move(s->kv);
  q.address = s->req.prefill_address;
  q.request_id = s->req.id;
  q.handle = s->handle;
  quarantine_.emplace(next_quarantine_id_++, std::move(q));
  s->remote_pending = false;
}

void Engine::DriveQuarantine() {
  const double now = Now();
  for (auto& [id, q] : quarantine_) {
    if (q.abort_in_flight || now < q.next_abort) continue;
    q.abort_in_flight = true;
    {
      absl::MutexLock l(&mu_);
      ++outstanding_rpcs_;
    }
    const uint64_t qid = id;
    remote_.client->Abort(q.address, q.request_id, lease_generation_base_ + q.handle,
                          absl::Seconds(5), [this, qid](const absl::Status& st, bool found) {
                            absl::MutexLock l(&mu_);
                            abort_results_.push_back({qid, st, found});
                            --outstanding_rpcs_;
                          });
  }
}

void Engine::OnAbortResult(const AbortResult& r) {
  auto it = quarantine_.find(r.quarantine_id);
  if (it == quarantine_.end()) return;
  Quarantined& q = it->second;
  q.abort_in_flight = false;
  // Safe once the prefill worker says the job has ended (found), or that none runs
  // after our call has completed (not found: it cannot start later), or once nothing
  // listens at its address any more (the process is gone).
  const bool acked = r.status.ok() && (r.found || q.prefill_done);
  if (acked || PeerIsGone(r.status)) {
    quarantine_.erase(it);  // the blocks go back to the pool
    return;
  }
  q.next_abort = Now() + absl::ToDoubleSeconds(remote_.abort_retry);
}

// Takes blocks for s's known tokens (reusing cached ones). False, holding nothing, if
// the pool cannot provide them now.
bool Engine::Admit(Seq* s) {
  auto kv = std::make_unique<kvcache::KvSequence>(cache_, s->root);
  const int64_t cached = kv->AcquirePrefix(s->tokens);
  if (!kv->Reserve(static_cast<int64_t>(s->tokens.size())).ok()) return false;
  s->kv = std::move(kv);
  s->computed = cached;
  const bool first = !s->admitted_once;
  if (!s->admitted_once) {
    s->admitted_once = true;
    s->summary.cached_tokens = cached;
    s->summary.queue_seconds = Now() - s->submitted;
    if (metrics_) {
      metrics_->prompt_tokens->Increment(static_cast<double>(s->prompt_len));
      // A resumed request's cached blocks may cover generated tokens too: the hit rate
      // counts prompt tokens only.
      metrics_->cached_tokens->Increment(static_cast<double>(std::min(cached, s->prompt_len)));
    }
  }
  if (options_.tiers != nullptr) {
    StartReload(s);
    if (s->reload_pending) s->reload_first = first;
  }
  return true;
}

void Engine::StartReload(Seq* s) {
  const int B = cache_->block_size();
  const std::vector<uint64_t>& hashes = s->kv->hashes();  // blocks before the last token
  const size_t k = static_cast<size_t>(s->computed / B);
  if (k >= hashes.size()) return;
  std::optional<uint64_t> parent;
  if (k > 0) parent = hashes[k - 1];
  worker::KvTierStore::ReloadPlan plan =
      options_.tiers->Lookup(parent, absl::MakeConstSpan(hashes).subspan(k),
                             absl::MakeConstSpan(s->tokens).subspan(k * B));
  if (plan.empty()) return;
  std::vector<int32_t> dest(s->kv->blocks().begin() + k,
                            s->kv->blocks().begin() + k + static_cast<size_t>(plan.size()));
  s->reload_pending = true;
  {
    absl::MutexLock l(&mu_);
    ++outstanding_rpcs_;
  }
  const uint64_t handle = s->handle;
  options_.tiers->Reload(std::move(plan), std::move(dest),
                         [this, handle](const worker::KvTierStore::ReloadResult& r) {
                           absl::MutexLock l(&mu_);
                           reload_results_.push_back({handle, r});
                           --outstanding_rpcs_;
                         });
}

void Engine::OnReloadDone(const ReloadDone& r) {
  if (reload_hold_.erase(r.handle) > 0) return;  // the request ended meanwhile
  auto it = seqs_.find(r.handle);
  if (it == seqs_.end() || !it->second->reload_pending) return;
  Seq* s = it->second.get();
  s->reload_pending = false;
  const int64_t B = cache_->block_size();
  const int64_t loaded = r.result.loaded;
  if (loaded > 0) {
    s->computed += loaded * B;
    s->kv->Commit(s->tokens, s->computed);  // the blocks join the pool's prefix cache
  }
  if (s->reload_first) {
    const int64_t tokens = loaded * B;
    const int64_t before = s->summary.cached_tokens;
    s->summary.cached_tokens += tokens;
    s->summary.host_cached_tokens = r.result.from_host * B;
    s->summary.disk_cached_tokens = r.result.from_disk * B;
    if (metrics_) {
      // Prompt tokens only, as in Admit.
      const int64_t counted = std::max<int64_t>(
          0, std::min(s->summary.cached_tokens, s->prompt_len) - std::min(before, s->prompt_len));
      metrics_->cached_tokens->Increment(static_cast<double>(counted));
    }
  }
  if (!s->remote_tried && !s->req.prefill_address.empty()) StartRemotePrefill(s);
}

void Engine::Preempt(Seq* s) {
  s->kv.reset();  // full blocks stay cached: readmission recomputes little
  s->computed = 0;
  ++s->summary.preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), s));
  waiting_.push_front(s);
  if (metrics_) metrics_->preemptions->Increment();
  absl::MutexLock l(&mu_);
  ++stats_.preemptions;
}

void Engine::Finish(Seq* s, const absl::Status& status, std::string finish_reason) {
  if (s->remote_pending) {  // the prefill worker may still be writing
    RecordRemote(RemoteOutcome::kCancelled);
    Quarantine(s);
  }
  if (s->reload_pending) {  // the tier store is still writing into its blocks
    s->reload_pending = false;
    reload_hold_.emplace(s->handle, std::move(s->kv));
  }
  s->kv.reset();
  auto r = std::find(running_.begin(), running_.end(), s);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), s);
  if (w != waiting_.end()) waiting_.erase(w);
  s->summary.finish_reason = std::move(finish_reason);
  s->summary.completion_tokens = s->generated();
  s->summary.kv_incarnation = cache_->incarnation();
  s->summary.kv_event_seq = cache_->last_event_seq();  // after s->kv released its blocks
  std::unique_ptr<Seq> owned = std::move(seqs_[s->handle]);
  seqs_.erase(s->handle);
  if (owned->cb.on_done) owned->cb.on_done(status, owned->summary);
  absl::MutexLock l(&mu_);
  --active_;
}

void Engine::Step() {
  // Admit waiting sequences in order while there is room.
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    Seq* s = waiting_.front();
    if (!Admit(s)) {
      if (running_.empty()) {
        const int64_t blocks =
            kvcache::BlocksFor(static_cast<int64_t>(s->tokens.size()), cache_->block_size());
        Finish(s,
               absl::ResourceExhaustedError(absl::StrCat("request ", s->req.id, " needs ", blocks,
                                                         " KV blocks; the pool has ",
                                                         cache_->num_blocks())),
               "");
        continue;
      }
      break;  // wait for running sequences to free blocks
    }
    waiting_.pop_front();
    running_.push_back(s);
    if (!s->remote_tried && !s->req.prefill_address.empty() && !s->reload_pending) {
      StartRemotePrefill(s);  // (after a reload: once its blocks are in, OnReloadDone)
    }
  }
  if (running_.empty()) return;

  // Every decoding sequence needs a block for its next token; preempt the most recently
  // admitted sequences until they all have one.
  // (Sequences waiting for a remote prefill or a reload hold their blocks and are never
  // preempted: the prefill worker or the tier store is writing into them.)
  for (size_t i = 0; i < running_.size();) {
    Seq* s = running_[i];
    if (s->remote_pending || s->reload_pending ||
        s->kv->Reserve(static_cast<int64_t>(s->tokens.size())).ok()) {
      ++i;
      continue;
    }
    auto victim = std::find_if(running_.rbegin(), running_.rend(),
                               [](Seq* v) { return !v->remote_pending && !v->reload_pending; });
    Seq* v = *victim;  // exists: s itself qualifies
    Preempt(v);
    if (v == s) break;  // everything before s is served
  }
  if (running_.empty()) return;

  // The batch: one token per decoding sequence first, then prefill chunks in admission
  // order under the token budget.
  struct Item {
    Seq* seq;
    int64_t end;
  };
  std::vector<Item> items;
  int budget = options_.max_batch_tokens;
  for (Seq* s : running_) {
    if (s->remote_pending || s->reload_pending) continue;
    const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->computed;
    if (left == 1) {
      items.push_back({s, s->computed + 1});
      --budget;
    }
  }
  const int decode_items = static_cast<int>(items.size());
  for (Seq* s : running_) {
    if (s->remote_pending || s->reload_pending) continue;
    const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->computed;
    if (left <= 1 || budget <= 0) continue;
    const int64_t n = std::min<int64_t>({left, options_.prefill_chunk, budget});
    items.push_back({s, s->computed + n});
    budget -= static_cast<int>(n);
  }
  if (items.empty()) return;  // everything waits for remote prefills
  std::vector<model::SeqChunk> batch;
  batch.reserve(items.size());
  int64_t batch_tokens = 0, sampled = 0;
  for (const Item& it : items) {
    model::SeqChunk c;
    c.tokens =
        absl::MakeConstSpan(it.seq->tokens.data() + it.seq->computed, it.end - it.seq->computed);
    c.start_pos = it.seq->computed;
    c.block_table = it.seq->kv->blocks();
    c.want_logits = it.end == static_cast<int64_t>(it.seq->tokens.size());
    sampled += c.want_logits ? 1 : 0;
    batch_tokens += it.end - it.seq->computed;
    batch.push_back(c);
  }
  logits_.clear();
  const double started = Now();
  const absl::Status st = model_->Forward(batch, pool_->view(), &logits_);
  const double forward_seconds = Now() - started;
  {
    absl::MutexLock l(&mu_);
    ++stats_.steps;
    stats_.last_batch_sequences = static_cast<int64_t>(items.size());
    stats_.last_batch_tokens = batch_tokens;
    stats_.max_batch_sequences =
        std::max(stats_.max_batch_sequences, static_cast<int64_t>(items.size()));
  }
  // Recorded before any token of the step is reported: a client that has seen its
  // stream end sees its steps and tokens counted.
  RecordStep(decode_items, static_cast<int>(items.size()) - decode_items, forward_seconds,
             static_cast<int64_t>(items.size()), batch_tokens);
  if (!st.ok()) {
    for (const Item& it : items) Finish(it.seq, absl::InternalError(st.ToString()), "");
    return;
  }
  if (metrics_ && sampled > 0) metrics_->generated_tokens->Increment(static_cast<double>(sampled));

  const model::ModelConfig& c = model_->config();
  size_t row = 0;
  for (const Item& it : items) {
    Seq* s = it.seq;
    s->computed = it.end;
    s->kv->Commit(s->tokens, s->computed);
    if (s->computed < static_cast<int64_t>(s->tokens.size())) continue;  // prefill continues
    const float* lg = logits_.data() + row * static_cast<size_t>(c.vocab_size);
    ++row;
    const int64_t position = static_cast<int64_t>(s->tokens.size());
    auto prompt = absl::MakeConstSpan(s->tokens.data(), s->prompt_len);
    auto output = absl::MakeConstSpan(s->tokens.data() + s->prompt_len, s->generated());
    Emit(s, sampling::Sample(absl::MakeConstSpan(lg, c.vocab_size), s->req.params, prompt, output,
                             position));
  }
}

void Engine::Emit(Seq* s, sampling::SampleResult r) {
  const model::ModelConfig& c = model_->config();
  const int64_t position = static_cast<int64_t>(s->tokens.size());
  const int32_t tok = r.token;
  s->tokens.push_back(tok);
  const bool first = s->generated() == s->req.resumed_tokens + 1;
  if (first) s->summary.ttft_seconds = Now() - s->submitted;
  if (s->cb.on_tokens) {
    StepOutput out;
    if (first) out.prefill = std::make_shared<const RequestSummary>(s->summary);
    out.tokens.push_back(tok);
    out.samples.push_back(std::move(r));
    s->cb.on_tokens(out);
  }
  const auto& p = s->req.params;
  const bool eos = !p.ignore_eos && std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(),
                                              tok) != c.eos_token_ids.end();
  const bool stop_id =
      std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), tok) != p.stop_token_ids.end();
  if (eos || stop_id) {
    Finish(s, absl::OkStatus(), "stop");
  } else if (s->generated() >= p.max_tokens || position + 1 >= c.max_position_embeddings) {
    Finish(s, absl::OkStatus(), "length");
  }
}

}  // namespace kvrelay::decode
