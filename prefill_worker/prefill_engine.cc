#include "prefill_worker/prefill_engine.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_sequence.h"
#include "common/metrics/metrics.h"
#include "common/model/generator.h"
#include "common/util/status.h"
#include "common/worker/kv_pool_metrics.h"
#include "kernels/backend.h"

namespace kvrelay::prefill {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Distinct transport labels kept before further ones are counted as "other".
constexpr size_t kMaxTransportLabels = 16;

}  // namespace

// The engine's Prometheus series (DESIGN §7), looked up once: an update is an atomic
// add or a histogram observation. Updated per job or per forward pass.
struct PrefillEngine::Metrics {
  explicit Metrics(prometheus::Registry& r) : kv_pool(r, "jobs") {
    queue_depth = &prometheus::BuildGauge()
                       .Name("kvrelay_prefill_queue_depth")
                       .Help("Prefill jobs queued behind the running one")
                       .Register(r)
                       .Add({});
    prefill_seconds = &prometheus::BuildHistogram()
                           .Name("kvrelay_prefill_seconds")
                           .Help(
                               "Duration of a successful prefill job: prefix lookup, "
                               "computation and KV transfer until remotely complete")
                           .Register(r)
                           .Add({}, metrics::LatencyBuckets());
    computed_tokens = &prometheus::BuildCounter()
                           .Name("kvrelay_prefill_computed_tokens_total")
                           .Help("Prompt tokens computed by this prefill worker")
                           .Register(r)
                           .Add({});
    cached_tokens = &prometheus::BuildCounter()
                         .Name("kvrelay_prefill_cached_tokens_total")
                         .Help("Prompt tokens reused from this prefill worker's prefix cache")
                         .Register(r)
                         .Add({});
    bytes = &prometheus::BuildCounter()
                 .Name("kvrelay_kv_transfer_bytes_total")
                 .Help("Bytes of KV written into decode workers' pools, by transport")
                 .Register(r);
    puts = &prometheus::BuildCounter()
                .Name("kvrelay_kv_transfer_puts_total")
                .Help("Put operations issued for KV transfers, by transport")
                .Register(r);
    seconds = &prometheus::BuildHistogram()
                   .Name("kvrelay_kv_transfer_seconds")
                   .Help(
                       "KV transfer of one prefill job, first write issued to last write "
                       "remotely complete (jobs whose writes all succeeded), by transport")
                   .Register(r);
    auto& failures = prometheus::BuildCounter()
                         .Name("kvrelay_kv_transfer_failures_total")
                         .Help(
                             "Prefill jobs whose KV transfer failed, by reason: unavailable "
                             "(peer gone), timeout, cancelled, invalid, other")
                         .Register(r);
    const char* reasons[] = {"unavailable", "timeout", "cancelled", "invalid", "other"};
    for (int i = 0; i < 5; ++i) this->failures[i] = &failures.Add({{"reason", reasons[i]}});
  }

  struct ByTransport {
    prometheus::Counter* bytes;
    prometheus::Counter* puts;
    prometheus::Histogram* seconds;
  };
  // Engine thread only.
  const ByTransport& For(const std::string& transport) {
    const std::string label = transport.empty() ? "unknown" : transport;
    auto it = by_transport.find(label);
    if (it != by_transport.end()) return it->second;
    const std::string key = by_transport.size() < kMaxTransportLabels ? label : "other";
    it = by_transport.find(key);
    if (it != by_transport.end()) return it->second;
    const prometheus::Labels l = {{"transport", key}};
    return by_transport
        .emplace(key, ByTransport{&bytes->Add(l), &puts->Add(l),
                                  &seconds->Add(l, metrics::StepBuckets())})
        .first->second;
  }

  prometheus::Counter& Failure(const absl::Status& st) {
    switch (st.code()) {
      case absl::StatusCode::kUnavailable:
        return *failures[0];
      case absl::StatusCode::kDeadlineExceeded:
        return *failures[1];
      case absl::StatusCode::kCancelled:
        return *failures[2];
      case absl::StatusCode::kInvalidArgument:
        return *failures[3];
      default:
        return *failures[4];
    }
  }

  prometheus::Gauge* queue_depth;
  prometheus::Histogram* prefill_seconds;
  prometheus::Counter* computed_tokens;
  prometheus::Counter* cached_tokens;
  prometheus::Family<prometheus::Counter>* bytes;
  prometheus::Family<prometheus::Counter>* puts;
  prometheus::Family<prometheus::Histogram>* seconds;
  prometheus::Counter* failures[5];
  absl::flat_hash_map<std::string, ByTransport> by_transport;
  worker::KvPoolMetrics kv_pool;
};

absl::Status ValidateJob(const model::Model& model, const kernels::PagedKvLayout& layout,
                         const PrefillJob& job) {
  KVR_RETURN_IF_ERROR(model::ValidatePrompt(model, job.prompt));
  KVR_RETURN_IF_ERROR(sampling::ValidateSamplingParams(job.params));
  if (job.destination.block_bytes != layout.block_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "destination.block_bytes is ", job.destination.block_bytes, "; this worker's blocks are ",
        layout.block_bytes(), " bytes (model, block size and KV dtype must match)"));
  }
  const int64_t nblocks =
      kvcache::BlocksFor(static_cast<int64_t>(job.prompt.size()), layout.block_size);
  if (job.first_block < 0 || job.first_block >= nblocks) {
    return absl::InvalidArgumentError(absl::StrCat("first_block must be in [0, ", nblocks,
                                                   ") for a prompt of ", job.prompt.size(),
                                                   " tokens, got ", job.first_block));
  }
  const int64_t want = nblocks - job.first_block;
  if (static_cast<int64_t>(job.destination_blocks.size()) != want) {
    return absl::InvalidArgumentError(absl::StrCat("destination_blocks has ",
                                                   job.destination_blocks.size(),
                                                   " entries; the prompt needs ", want));
  }
  absl::flat_hash_set<int32_t> seen;
  for (size_t i = 0; i < job.destination_blocks.size(); ++i) {
    const int32_t b = job.destination_blocks[i];
    if (b < 0 || b >= job.destination.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("destination_blocks[", i, "] = ", b,
                                                     " is outside the destination pool of ",
                                                     job.destination.num_blocks, " blocks"));
    }
    if (!seen.insert(b).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("destination_blocks[", i, "] = ", b, " repeats an earlier block"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSameKv(const PrefillJob& job, const std::string& model_id,
                         const kernels::PagedKvLayout& layout) {
  const std::string dtype = kernels::DTypeName(layout.dtype);
  if (job.model_id != model_id || job.block_size != layout.block_size || job.kv_dtype != dtype) {
    return absl::FailedPreconditionError(
        absl::StrCat("the destination holds KV of model '", job.model_id, "', block size ",
                     job.block_size, ", ", job.kv_dtype, "; this prefill worker computes model '",
                     model_id, "', block size ", layout.block_size, ", ", dtype));
  }
  return absl::OkStatus();
}

struct PrefillEngine::Job {
  uint64_t handle = 0;
  PrefillJob spec;
  PrefillDone done;
  std::atomic<bool> cancelled{false};
  std::vector<std::function<void(bool)>> on_ended;  // Abort callers; under mu_
};

PrefillEngine::PrefillEngine(const model::Model* model, kvcache::KvPool* pool,
                             const transfer::RegisteredMemory* memory, kvcache::PrefixCache* cache,
                             transfer::KvTransport* transport, std::string model_id,
                             const PrefillEngineOptions& options)
    : model_(model),
      pool_(pool),
      memory_(memory),
      cache_(cache),
      transport_(transport),
      model_id_(std::move(model_id)),
      options_(options),
      registry_(options.metrics ? options.metrics : std::make_shared<prometheus::Registry>()),
      metrics_(std::make_unique<Metrics>(*registry_)),
      thread_([this] {
        pthread_setname_np(pthread_self(), "kvr-prefill");
        Loop();
      }) {
  UpdateKvBlockGauges();
}

void PrefillEngine::UpdateKvBlockGauges() { metrics_->kv_pool.Update(cache_->counts()); }

void PrefillEngine::SetQueueDepth() {
  metrics_->queue_depth->Set(static_cast<double>(queue_.size()));
}

PrefillEngine::~PrefillEngine() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    if (running_) running_->cancelled = true;
  }
  thread_.join();
}

absl::StatusOr<uint64_t> PrefillEngine::Submit(PrefillJob spec, PrefillDone done) {
  KVR_RETURN_IF_ERROR(ValidateJob(*model_, pool_->layout(), spec));
  KVR_RETURN_IF_ERROR(CheckSameKv(spec, model_id_, pool_->layout()));
  auto job = std::make_shared<Job>();
  job->spec = std::move(spec);
  job->done = std::move(done);
  absl::MutexLock l(&mu_);
  if (stop_) return absl::UnavailableError("prefill engine is shutting down");
  if (queue_.size() >= options_.max_queue) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prefill queue is full (", options_.max_queue, " jobs)"));
  }
  job->handle = next_handle_++;
  queue_.push_back(job);
  SetQueueDepth();
  return job->handle;
}

void PrefillEngine::Cancel(uint64_t handle) {
  std::shared_ptr<Job> queued;
  {
    absl::MutexLock l(&mu_);
    if (running_ && running_->handle == handle) {
      running_->cancelled = true;
      return;
    }
    auto it = std::find_if(queue_.begin(), queue_.end(),
                           [handle](const auto& j) { return j->handle == handle; });
    if (it == queue_.end()) return;
    queued = *it;
    queue_.erase(it);
    SetQueueDepth();
  }
  queued->done(absl::CancelledError("prefill cancelled before it started"));
}

void PrefillEngine::Abort(const std::string& request_id, uint64_t lease_generation,
                          std::function<void(bool)> ended) {
  auto matches = [&](const Job& j) {
    return j.spec.id == request_id && j.spec.lease_generation == lease_generation;
  };
  std::vector<std::shared_ptr<Job>> removed;
  bool running = false;
  {
    absl::MutexLock l(&mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (matches(**it)) {
        removed.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    SetQueueDepth();
    if (running_ && matches(*running_)) {
      running_->cancelled = true;
      running_->on_ended.push_back(std::move(ended));
      running = true;
    }
  }
  for (auto& j : removed) j->done(absl::CancelledError("prefill aborted before it started"));
  if (!running) ended(!removed.empty());
}

int64_t PrefillEngine::queued() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(queue_.size());
}

PrefillEngine::Load PrefillEngine::load() const {
  absl::MutexLock l(&mu_);
  Load out;
  out.queued = static_cast<int64_t>(queue_.size());
  for (const auto& job : queue_) out.tokens += static_cast<int64_t>(job->spec.prompt.size());
  if (running_ != nullptr) {
    out.running = 1;
    out.tokens += static_cast<int64_t>(running_->spec.prompt.size());
  }
  return out;
}

void PrefillEngine::Loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      absl::MutexLock l(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); };
      mu_.Await(absl::Condition(&ready));
      if (stop_) break;
      job = queue_.front();
      queue_.pop_front();
      SetQueueDepth();
      running_ = job;
    }
    absl::StatusOr<PrefillOutcome> r = Run(*job);
    UpdateKvBlockGauges();  // the job's blocks are back
    std::vector<std::function<void(bool)>> on_ended;
    {
      absl::MutexLock l(&mu_);
      running_.reset();
      on_ended.swap(job->on_ended);
    }
    job->done(std::move(r));
    for (auto& f : on_ended) f(true);
  }
  std::deque<std::shared_ptr<Job>> left;
  {
    absl::MutexLock l(&mu_);
    left.swap(queue_);
    SetQueueDepth();
  }
  for (auto& j : left) j->done(absl::UnavailableError("prefill engine stopped"));
}

absl::StatusOr<PrefillOutcome> PrefillEngine::Run(Job& job) {
  const double t0 = Now();
  const PrefillJob& spec = job.spec;
  const int B = cache_->block_size();
  const uint64_t block_bytes = pool_->layout().block_bytes();
  const int64_t n = static_cast<int64_t>(spec.prompt.size());
  const int64_t nblocks = kvcache::BlocksFor(n, B);
  PrefillOutcome out;
  kvcache::KvSequence seq(cache_, kvcache::RootHash(model_id_, spec.cache_salt));
  out.cached_tokens = seq.AcquirePrefix(spec.prompt);
  KVR_RETURN_IF_ERROR(seq.Reserve(n));
  if (options_.tiers != nullptr) {  // blocks below the pool: copied up, not recomputed
    const std::vector<uint64_t>& hashes = seq.hashes();
    const size_t k = static_cast<size_t>(out.cached_tokens / B);
    if (k < hashes.size()) {
      std::optional<uint64_t> parent;
      if (k > 0) parent = hashes[k - 1];
      worker::KvTierStore::ReloadPlan plan =
          options_.tiers->Lookup(parent, absl::MakeConstSpan(hashes).subspan(k),
                                 absl::MakeConstSpan(spec.prompt).subspan(k * B));
      if (!plan.empty()) {
        std::vector<int32_t> dest(seq.blocks().begin() + k,
                                  seq.blocks().begin() + k + static_cast<size_t>(plan.size()));
        const worker::KvTierStore::ReloadResult r =
            options_.tiers->ReloadNow(std::move(plan), std::move(dest));
        out.cached_tokens += r.loaded * B;
        out.host_cached_tokens = r.from_host * B;
        out.disk_cached_tokens = r.from_disk * B;
        seq.Commit(spec.prompt, out.cached_tokens);
      }
    }
  }
  out.computed_tokens = n - out.cached_tokens;
  metrics_->cached_tokens->Increment(static_cast<double>(out.cached_tokens));

  // Writes in flight; their callbacks run on the transport's thread.
  struct Writes {
    absl::Mutex mu;
    std::vector<transfer::TransferId> ids ABSL_GUARDED_BY(mu);
    int outstanding ABSL_GUARDED_BY(mu) = 0;
    absl::Status error ABSL_GUARDED_BY(mu);
    double first_issued = 0;  // engine thread only
    double last_done ABSL_GUARDED_BY(mu) = 0;
  } writes;
  int64_t sent = spec.first_block;  // prompt blocks [first_block, sent) are on their way
  absl::Status send_error;          // a write that could not be issued
  auto send = [&](int64_t upto) -> absl::Status {
    if (upto <= sent) return absl::OkStatus();
    std::vector<int32_t> src(seq.blocks().begin() + sent, seq.blocks().begin() + upto);
    std::vector<int32_t> dst(spec.destination_blocks.begin() + (sent - spec.first_block),
                             spec.destination_blocks.begin() + (upto - spec.first_block));
    absl::StatusOr<std::vector<transfer::WriteRange>> ranges =
        transfer::CoalesceBlocks(src, dst, block_bytes);
    if (!ranges.ok()) {
      send_error = ranges.status();
      return send_error;
    }
    if (writes.first_issued == 0) writes.first_issued = Now();
    absl::MutexLock l(&writes.mu);
    ++writes.outstanding;
    absl::StatusOr<transfer::TransferId> id =
        transport_->Write(*memory_, spec.destination, *std::move(ranges), options_.transfer,
                          [&writes, &out](transfer::TransferResult r) {
                            absl::MutexLock l(&writes.mu);
                            --writes.outstanding;
                            writes.last_done = Now();
                            out.transfer_bytes += r.stats.bytes;
                            out.puts += r.stats.puts;
                            if (!r.stats.transport.empty()) out.transport = r.stats.transport;
                            if (!r.status.ok() && writes.error.ok()) writes.error = r.status;
                          });
    if (!id.ok()) {
      --writes.outstanding;
      send_error = id.status();
      return send_error;
    }
    writes.ids.push_back(*id);
    sent = upto;
    return absl::OkStatus();
  };
  // Ends every write: cancels what is still running when `abort`, waits for all
  // callbacks, and (after an abort) flushes the endpoint so nothing lands later.
  auto finish_writes = [&](bool abort) {
    std::vector<transfer::TransferId> ids;
    {
      absl::MutexLock l(&writes.mu);
      ids = writes.ids;
    }
    if (abort) {
      for (transfer::TransferId id : ids) transport_->Cancel(id);
    }
    {
      absl::MutexLock l(&writes.mu);
      writes.mu.Await(absl::Condition(
          +[](int* outstanding) { return *outstanding == 0; }, &writes.outstanding));
    }
    if (abort && !ids.empty()) {
      (void)transport_->Flush(spec.destination, options_.transfer.timeout);
    }
  };

  absl::Status st = send(std::min(out.cached_tokens / B, nblocks));
  std::vector<float> logits;
  for (int64_t start = out.cached_tokens; st.ok() && start < n; start += options_.prefill_chunk) {
    if (job.cancelled) {
      st = absl::CancelledError("prefill cancelled");
      break;
    }
    {
      absl::MutexLock l(&writes.mu);
      if (!writes.error.ok()) {
        st = writes.error;
        break;
      }
    }
    const int64_t len = std::min<int64_t>(options_.prefill_chunk, n - start);
    model::SeqChunk c;
    c.tokens = absl::MakeConstSpan(spec.prompt.data() + start, len);
    c.start_pos = start;
    c.block_table = seq.blocks();
    c.want_logits = start + len == n;
    st = model_->Forward({c}, pool_->view(), &logits);
    if (!st.ok()) break;
    metrics_->computed_tokens->Increment(static_cast<double>(len));
    seq.Commit(spec.prompt, start + len);
    st = send(start + len == n ? nblocks : (start + len) / B);
  }
  if (st.ok() && job.cancelled) st = absl::CancelledError("prefill cancelled");
  const double compute_end = Now();
  finish_writes(/*abort=*/!st.ok());
  out.transfer_wait_seconds = Now() - compute_end;
  {  // Transfer metrics, once per job that issued writes (or tried to).
    absl::MutexLock l(&writes.mu);
    const absl::Status& error = !writes.error.ok() ? writes.error : send_error;
    if (writes.first_issued > 0 || !error.ok()) {
      const Metrics::ByTransport& m = metrics_->For(out.transport);
      m.bytes->Increment(static_cast<double>(out.transfer_bytes));
      m.puts->Increment(static_cast<double>(out.puts));
      if (error.ok()) {
        m.seconds->Observe(writes.last_done - writes.first_issued);
      } else {
        metrics_->Failure(error).Increment();
      }
    }
  }
  if (!st.ok()) return st;
  {
    absl::MutexLock l(&writes.mu);
    if (!writes.error.ok()) return writes.error;
    out.transfer_seconds = writes.first_issued > 0 ? writes.last_done - writes.first_issued : 0;
  }
  if (job.cancelled) return absl::CancelledError("prefill cancelled");

  const std::vector<int32_t> sent_blocks(seq.blocks().begin() + spec.first_block,
                                         seq.blocks().begin() + nblocks);
  // Computed where the pool lives (the model's backend: host or GPU memory).
  out.checksums.resize(sent_blocks.size());
  KVR_RETURN_IF_ERROR(model_->backend().BlockChecksums(
      pool_->view().base, pool_->num_blocks(), block_bytes, sent_blocks, out.checksums.data()));
  const int vocab = model_->config().vocab_size;
  out.first =
      sampling::Sample(absl::MakeConstSpan(logits.data(), vocab), spec.params, spec.prompt, {}, n);
  out.prefill_seconds = Now() - t0;
  metrics_->prefill_seconds->Observe(out.prefill_seconds);
  return out;
}

}  // namespace kvrelay::prefill
