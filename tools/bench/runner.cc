#include "tools/bench/runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <queue>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/convert.h"
#include "grpcpp/client_context.h"
#include "kvrelay/v1/kvrelay.grpc.pb.h"

namespace kvrelay::bench {
namespace {

using Clock = std::chrono::steady_clock;

void SetDeadline(grpc::ClientContext& ctx, double seconds) {
  if (seconds > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
  }
}

class Runner;

// One Generate call. Owned by the Runner, which deletes it only after OnDone.
class Call final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  Call(Runner* runner, int64_t index, int conv_slot, int conversation, int turn)
      : conv_slot(conv_slot), runner_(runner) {
    record.index = index;
    record.conversation = conversation;
    record.turn = turn;
  }

  void Start(v1::Generation::Stub* stub, Clock::time_point t0, double timeout) {
    t0_ = t0;
    SetDeadline(ctx, timeout);
    send_ = Seconds(Clock::now());
    record.start_seconds = send_;
    stub->async()->Generate(&ctx, &request, this);
    StartRead(&msg_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const double now = Seconds(Clock::now());
    if (msg_.token_ids_size() > 0) {
      messages_.push_back({now, msg_.token_ids_size()});
      reply.insert(reply.end(), msg_.token_ids().begin(), msg_.token_ids().end());
    }
    if (msg_.has_final()) {
      final_ = msg_.final();
      has_final_ = true;
    }
    StartRead(&msg_);
  }

  void OnDone(const grpc::Status& s) override;

  // Fills `record` once the call is over (called by the runner thread).
  void Finish() {
    ComputeLatencies(send_, messages_, end_, &record);
    record.ok = status_.ok() && has_final_;
    if (!status_.ok()) {
      const absl::Status st = rpc::FromGrpc(status_);
      record.code = absl::StatusCodeToString(st.code());
      record.error = std::string(st.message());
    } else if (!has_final_) {
      record.code = "INTERNAL";
      record.error = "the stream ended without its final message";
    }
    if (has_final_) {
      record.cached_tokens = final_.usage().cached_tokens();
      record.finish_reason = final_.finish_reason();
      record.prefill_mode = rpc::PrefillModeName(final_.route().prefill_mode());
      record.decode_worker = final_.route().decode_worker();
      record.prefill_worker = final_.route().prefill_worker();
      record.migrations = final_.route().migrations();
      record.server_ttft_seconds = final_.timing().ttft_seconds();
      record.server_queue_seconds = final_.timing().queue_seconds();
      if (final_.usage().completion_tokens() != record.output_tokens && record.ok) {
        record.ok = false;
        record.code = "DATA_LOSS";
        record.error =
            absl::StrCat("the final message counts ", final_.usage().completion_tokens(),
                         " completion tokens, the stream carried ", record.output_tokens);
      }
    }
  }

  grpc::ClientContext ctx;
  v1::GenerateRequest request;
  RequestRecord record;
  std::vector<int32_t> reply;    // the tokens received (for the next turn's history)
  std::vector<int32_t> history;  // this turn's prompt
  const int conv_slot;           // the runner's conversation state

 private:
  double Seconds(Clock::time_point t) const {
    return std::chrono::duration<double>(t - t0_).count();
  }

  Runner* const runner_;
  Clock::time_point t0_;
  double send_ = 0, end_ = 0;
  v1::GenerateResponse msg_;
  std::vector<std::pair<double, int>> messages_;  // (arrival, tokens)
  v1::Final final_;
  bool has_final_ = false;
  grpc::Status status_;
};

class Runner {
 public:
  Runner(const std::shared_ptr<grpc::Channel>& channel, const std::vector<Conversation>& dataset,
         const RunOptions& o)
      : stub_(v1::Generation::NewStub(channel)),
        dataset_(dataset),
        o_(o),
        arrivals_(o.request_rate, o.burstiness, o.seed) {}

  RunResult Run() ABSL_LOCKS_EXCLUDED(mu_);

  void Ended(Call* call) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock l(&mu_);
    ended_.push_back(call);
  }

  double Now() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }

 private:
  struct Ready {
    double at;
    int64_t seq;       // FIFO among equal times
    int conversation;  // index into convs_
    bool operator>(const Ready& r) const { return at != r.at ? at > r.at : seq > r.seq; }
  };
  struct ConvState {
    const Conversation* spec;
    int dataset_index;
    int next_turn = 0;
    std::vector<int32_t> history;
  };

  void Send(int conv);

  std::unique_ptr<v1::Generation::Stub> stub_;
  const std::vector<Conversation>& dataset_;
  const RunOptions& o_;
  ArrivalProcess arrivals_;
  Clock::time_point t0_;
  absl::Mutex mu_;
  std::vector<Call*> ended_ ABSL_GUARDED_BY(mu_);
  std::map<Call*, std::unique_ptr<Call>> in_flight_;  // runner thread only
  std::vector<ConvState> convs_;
  int64_t sent_ = 0;
};

void Call::OnDone(const grpc::Status& s) {
  status_ = s;
  end_ = Seconds(Clock::now());
  runner_->Ended(this);  // the last touch of `this`: the runner may delete it from now on
}

void Runner::Send(int conv) {
  ConvState& c = convs_[conv];
  const TurnSpec& turn = c.spec->turns[c.next_turn];
  auto call = std::make_unique<Call>(this, sent_, conv, c.dataset_index, c.next_turn);
  call->history = c.history;
  call->history.insert(call->history.end(), turn.tokens.begin(), turn.tokens.end());
  v1::GenerateRequest& req = call->request;
  req.set_request_id(absl::StrCat(o_.request_id_prefix, "-", sent_));
  req.set_model(o_.model);
  req.mutable_token_ids()->mutable_ids()->Add(call->history.begin(), call->history.end());
  *req.mutable_sampling() = o_.sampling;
  req.mutable_sampling()->set_max_tokens(turn.max_tokens);
  req.set_cache_salt(o_.cache_salt);
  call->record.input_tokens = static_cast<int64_t>(call->history.size());
  call->record.expected_output_tokens = turn.max_tokens;
  ++sent_;
  Call* raw = call.get();
  in_flight_[raw] = std::move(call);
  raw->Start(stub_.get(), t0_, o_.request_timeout_seconds);
}

RunResult Runner::Run() {
  RunResult result;
  t0_ = Clock::now();
  const bool cycle = o_.duration_seconds > 0;
  const int64_t total = cycle ? 0 : CountRequests(dataset_);
  std::priority_queue<Ready, std::vector<Ready>, std::greater<Ready>> ready;
  int64_t ready_seq = 0;
  double next_arrival = 0;
  size_t started = 0;  // conversations
  bool stop_new = false, cancelled = false;
  double last_progress = -1;
  int64_t output_tokens = 0;
  std::vector<RequestRecord> records;
  // Whether another conversation may start. Cycling the dataset at an infinite rate
  // (closed loop: --duration with --max-concurrency) keeps only enough ready requests to
  // refill the free slots instead of starting infinitely many at once.
  auto more_arrivals = [&] {
    if (!cycle) return started < dataset_.size();
    return !std::isinf(o_.request_rate) ||
           static_cast<int64_t>(ready.size() + in_flight_.size()) < o_.max_concurrency;
  };
  for (;;) {
    // Calls that ended: record them, make their conversation's next turn ready.
    std::vector<Call*> ended;
    {
      absl::MutexLock l(&mu_);
      ended.swap(ended_);
    }
    for (Call* call : ended) {
      auto it = in_flight_.find(call);
      std::unique_ptr<Call> owned = std::move(it->second);
      in_flight_.erase(it);
      owned->Finish();
      output_tokens += owned->record.output_tokens;
      ConvState& c = convs_[owned->conv_slot];
      if (owned->record.ok && ++c.next_turn < static_cast<int>(c.spec->turns.size())) {
        c.history = std::move(owned->history);
        c.history.insert(c.history.end(), owned->reply.begin(), owned->reply.end());
        ready.push({Now() + c.spec->think_seconds[c.next_turn], ready_seq++, owned->conv_slot});
      }
      records.push_back(std::move(owned->record));
    }
    const double now = Now();
    if (!cancelled && o_.stop != nullptr && o_.stop->load()) {
      result.interrupted = true;
      cancelled = stop_new = true;
      for (auto& [raw, call] : in_flight_) call->ctx.TryCancel();
    }
    if (cycle && now >= o_.duration_seconds) stop_new = true;
    if (!stop_new) {
      while (more_arrivals() && next_arrival <= now) {
        const int idx = static_cast<int>(started % dataset_.size());
        convs_.push_back({&dataset_[idx], idx, 0, {}});
        ready.push({next_arrival, ready_seq++, static_cast<int>(convs_.size() - 1)});
        ++started;
        next_arrival += arrivals_.NextGap();
      }
      while (
          !ready.empty() && ready.top().at <= now &&
          (o_.max_concurrency <= 0 || static_cast<int>(in_flight_.size()) < o_.max_concurrency)) {
        const int conv = ready.top().conversation;
        ready.pop();
        Send(conv);
      }
    }
    const bool nothing_left =
        in_flight_.empty() && (stop_new || (ready.empty() && !cycle && started >= dataset_.size()));
    if (o_.progress && (now - last_progress >= 0.25 || nothing_left)) {
      last_progress = now;
      o_.progress({static_cast<int64_t>(records.size()), total,
                   static_cast<int64_t>(in_flight_.size()), output_tokens, now,
                   o_.duration_seconds});
    }
    if (nothing_left) break;
    // Sleep until the next thing to do: an arrival, a ready turn, a progress tick, or a
    // call ending (which wakes us at once).
    double wake = now + 0.25;
    if (!stop_new) {
      if (more_arrivals()) wake = std::min(wake, next_arrival);
      if (!ready.empty() &&
          (o_.max_concurrency <= 0 || static_cast<int>(in_flight_.size()) < o_.max_concurrency)) {
        wake = std::min(wake, ready.top().at);
      }
      if (cycle) wake = std::min(wake, o_.duration_seconds);
    }
    absl::MutexLock l(&mu_);
    const double left = wake - Now();
    if (ended_.empty() && left > 0) {
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](std::vector<Call*>* e) { return !e->empty(); }, &ended_),
                           absl::Seconds(left));
    }
  }
  double first = 0, last = 0;
  bool any = false;
  for (const RequestRecord& r : records) {
    first = any ? std::min(first, r.start_seconds) : r.start_seconds;
    last = std::max(last, r.start_seconds + r.e2e_seconds);
    any = true;
  }
  std::sort(records.begin(), records.end(),
            [](const RequestRecord& a, const RequestRecord& b) { return a.index < b.index; });
  result.records = std::move(records);
  result.duration_seconds = any ? last - first : 0;
  return result;
}

}  // namespace

absl::StatusOr<v1::ModelInfo> FetchModelInfo(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& server, const std::string& model,
                                             double timeout_seconds) {
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout_seconds);
  ctx.set_wait_for_ready(true);  // ride out the connection attempt, up to the deadline
  v1::ListModelsResponse resp;
  if (grpc::Status s = stub->ListModels(&ctx, v1::ListModelsRequest(), &resp); !s.ok()) {
    const absl::Status st = rpc::FromGrpc(s);
    return absl::UnavailableError(absl::StrCat("cannot reach a kvrelay router at ", server, ": ",
                                               absl::StatusCodeToString(st.code()), ": ",
                                               st.message()));
  }
  for (const v1::ModelInfo& m : resp.models()) {
    if (model.empty() || m.id() == model) return m;
  }
  if (resp.models().empty()) return absl::NotFoundError(server + " serves no model");
  return absl::NotFoundError(absl::StrCat(server, " does not serve model '", model,
                                          "' (it serves '", resp.models(0).id(), "')"));
}

absl::Status TokenizeTexts(const std::shared_ptr<grpc::Channel>& channel, const std::string& model,
                           std::vector<Conversation>* dataset) {
  auto stub = v1::Generation::NewStub(channel);
  for (size_t i = 0; i < dataset->size(); ++i) {
    for (TurnSpec& turn : (*dataset)[i].turns) {
      if (turn.text.empty()) continue;
      v1::TokenizeRequest req;
      req.set_model(model);
      req.set_prompt(turn.text);
      req.set_add_special_tokens(true);
      v1::TokenizeResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(ctx, 60);
      if (grpc::Status s = stub->Tokenize(&ctx, req, &resp); !s.ok()) {
        const absl::Status st = rpc::FromGrpc(s);
        return absl::Status(st.code(),
                            absl::StrCat("tokenizing request ", i + 1, ": ", st.message()));
      }
      turn.tokens.assign(resp.token_ids().begin(), resp.token_ids().end());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RunResult> RunBenchmark(const std::shared_ptr<grpc::Channel>& channel,
                                       const std::vector<Conversation>& dataset,
                                       const RunOptions& o) {
  if (dataset.empty()) return absl::InvalidArgumentError("the dataset is empty");
  if (!(o.request_rate > 0)) return absl::InvalidArgumentError("--request-rate must be > 0 or inf");
  if (!(o.burstiness > 0) || std::isinf(o.burstiness)) {
    return absl::InvalidArgumentError("--burstiness must be a number > 0");
  }
  if (o.max_concurrency < 0) return absl::InvalidArgumentError("--max-concurrency must be >= 0");
  if (o.duration_seconds < 0 || std::isinf(o.duration_seconds)) {
    return absl::InvalidArgumentError("--duration must be a number of seconds >= 0");
  }
  if (o.duration_seconds > 0 && std::isinf(o.request_rate) && o.max_concurrency <= 0) {
    return absl::InvalidArgumentError(
        "--duration at an infinite --request-rate needs --max-concurrency (or a finite rate)");
  }
  for (const Conversation& c : dataset) {
    for (const TurnSpec& t : c.turns) {
      if (t.tokens.empty())
        return absl::InvalidArgumentError("a request of the dataset has no tokens");
    }
  }
  Runner runner(channel, dataset, o);
  return runner.Run();
}

}  // namespace kvrelay::bench
