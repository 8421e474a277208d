#include "decode_worker/engine.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/kvcache/block_hash.h"
#include "common/model/generator.h"
#include "common/util/status.h"

namespace kvrelay::decode {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

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
  bool cancelled = false;
  RequestSummary summary;
  double submitted = 0;

  int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const model::Model* model,
                                                       kvcache::KvPool* pool,
                                                       kvcache::PrefixCache* cache,
                                                       std::string model_id,
                                                       const EngineOptions& options) {
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
  return std::unique_ptr<Engine>(new Engine(model, pool, cache, std::move(model_id), options));
}

Engine::Engine(const model::Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
               std::string model_id, const EngineOptions& options)
    : model_(model),
      pool_(pool),
      cache_(cache),
      model_id_(std::move(model_id)),
      options_(options),
      thread_([this] {
        pthread_setname_np(pthread_self(), "kvr-engine");
        Loop();
      }) {}

Engine::~Engine() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::StatusOr<uint64_t> Engine::Submit(EngineRequest request, RequestCallbacks callbacks) {
  KVR_RETURN_IF_ERROR(sampling::ValidateSamplingParams(request.params));
  KVR_RETURN_IF_ERROR(model::ValidatePrompt(*model_, request.prompt));
  auto s = std::make_unique<Seq>();
  s->req = std::move(request);
  s->cb = std::move(callbacks);
  s->root = kvcache::RootHash(model_id_, s->req.cache_salt);
  s->tokens = s->req.prompt;
  s->prompt_len = static_cast<int64_t>(s->tokens.size());
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

void Engine::Loop() {
  for (;;) {
    std::deque<std::unique_ptr<Seq>> incoming;
    std::vector<uint64_t> cancels;
    bool stop = false;
    {
      absl::MutexLock l(&mu_);
      // Only the guarded fields: absl may evaluate the condition on another thread.
      auto has_news = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !incoming_.empty() || !cancels_.empty();
      };
      if (seqs_.empty()) mu_.Await(absl::Condition(&has_news));
      incoming.swap(incoming_);
      cancels.swap(cancels_);
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
    if (stop) {
      std::vector<Seq*> all;
      for (auto& [h, s] : seqs_) all.push_back(s.get());
      for (Seq* s : all) Finish(s, absl::UnavailableError("decode engine stopped"), "");
      return;
    }
    if (!seqs_.empty()) Step();
    absl::MutexLock l(&mu_);
    stats_.running = static_cast<int64_t>(running_.size());
    stats_.waiting = static_cast<int64_t>(waiting_.size());
  }
}

// Takes blocks for s's known tokens (reusing cached ones). False, holding nothing, if
// the pool cannot provide them now.
bool Engine::Admit(Seq* s) {
  auto kv = std::make_unique<kvcache::KvSequence>(cache_, s->root);
  const int64_t cached = kv->AcquirePrefix(s->tokens);
  if (!kv->Reserve(static_cast<int64_t>(s->tokens.size())).ok()) return false;
  s->kv = std::move(kv);
  s->computed = cached;
  if (!s->admitted_once) {
    s->admitted_once = true;
    s->summary.cached_tokens = cached;
    s->summary.queue_seconds = Now() - s->submitted;
  }
  return true;
}

void Engine::Preempt(Seq* s) {
  s->kv.reset();  // full blocks stay cached: readmission recomputes little
  s->computed = 0;
  ++s->summary.preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), s));
  waiting_.push_front(s);
  absl::MutexLock l(&mu_);
  ++stats_.preemptions;
}

void Engine::Finish(Seq* s, const absl::Status& status, std::string finish_reason) {
  s->kv.reset();
  auto r = std::find(running_.begin(), running_.end(), s);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), s);
  if (w != waiting_.end()) waiting_.erase(w);
  s->summary.finish_reason = std::move(finish_reason);
  s->summary.completion_tokens = s->generated();
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
  }
  if (running_.empty()) return;

  // Every decoding sequence needs a block for its next token; preempt the most recently
  // admitted sequences until they all have one.
  for (size_t i = 0; i < running_.size();) {
    Seq* s = running_[i];
    if (s->kv->Reserve(static_cast<int64_t>(s->tokens.size())).ok()) {
      ++i;
      continue;
    }
    Seq* victim = running_.back();
    Preempt(victim);
    if (victim == s) break;  // s was the last one: everything before it is served
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
    const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->computed;
    if (left == 1) {
      items.push_back({s, s->computed + 1});
      --budget;
    }
  }
  for (Seq* s : running_) {
    const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->computed;
    if (left <= 1 || budget <= 0) continue;
    const int64_t n = std::min<int64_t>({left, options_.prefill_chunk, budget});
    items.push_back({s, s->computed + n});
    budget -= static_cast<int>(n);
  }
  std::vector<model::SeqChunk> batch;
  batch.reserve(items.size());
  int64_t batch_tokens = 0;
  for (const Item& it : items) {
    model::SeqChunk c;
    c.tokens =
        absl::MakeConstSpan(it.seq->tokens.data() + it.seq->computed, it.end - it.seq->computed);
    c.start_pos = it.seq->computed;
    c.block_table = it.seq->kv->blocks();
    c.want_logits = it.end == static_cast<int64_t>(it.seq->tokens.size());
    batch_tokens += it.end - it.seq->computed;
    batch.push_back(c);
  }
  logits_.clear();
  const absl::Status st = model_->Forward(batch, pool_->view(), &logits_);
  {
    absl::MutexLock l(&mu_);
    ++stats_.steps;
    stats_.last_batch_sequences = static_cast<int64_t>(items.size());
    stats_.last_batch_tokens = batch_tokens;
    stats_.max_batch_sequences =
        std::max(stats_.max_batch_sequences, static_cast<int64_t>(items.size()));
  }
  if (!st.ok()) {
    for (const Item& it : items) Finish(it.seq, absl::InternalError(st.ToString()), "");
    return;
  }

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
    sampling::SampleResult r = sampling::Sample(absl::MakeConstSpan(lg, c.vocab_size),
                                                s->req.params, prompt, output, position);
    const int32_t tok = r.token;
    s->tokens.push_back(tok);
    if (s->generated() == 1) s->summary.ttft_seconds = Now() - s->submitted;
    if (s->cb.on_tokens) {
      StepOutput out;
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
}

}  // namespace kvrelay::decode
