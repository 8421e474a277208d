// router_sim: the real router library -- WorkerRegistry with its prefix index, load order
// and scheduler, no gRPC -- routing a request trace over N simulated decode workers, to
// measure the router at fleet sizes we cannot start here (issue 15).
//
// Each simulated worker has a real kvcache::PrefixCache (block allocation, LRU eviction,
// the KV event log) of --blocks_per_worker blocks. Simulated time advances by events:
//   - Requests come from the `bench serve` generators (tools/bench/dataset.h): new
//     conversations arrive as a Poisson process whose rate keeps --load requests running
//     per worker on average (Little's law); a multi-turn conversation sends its next turn,
//     with the whole history, a think time after the previous reply.
//   - Each request is routed by WorkerRegistry::Route (timed), then starts on the chosen
//     worker: it acquires the cached prefix, allocates the rest (evicting, which emits
//     `removed` events) and caches its prompt blocks (`stored`). It holds its blocks for
//     uncached_tokens x --prefill_us_per_token + output x --decode_ms_per_token, then
//     caches its reply's full blocks and releases everything. A worker runs at most
//     --max_running requests; more wait in its queue (reported as `waiting`).
//   - Every --report_ms, each worker whose cache or load changed sends its new KV
//     events (or a snapshot when the router asks) and a load report, as the registry
//     stream would: the router's index lags the caches by up to that much.
// For every decision it records:
//   - achieved: the leading blocks the chosen worker really holds (its PrefixCache),
//   - oracle:   the most any worker really holds (a router that knew every cache exactly
//               and ignored load), both at decision time;
//   - load: max / mean requests (running + waiting) per worker, sampled every report tick;
//   - every --check_every-th decision is also made by ChooseRoute over a full copy of the
//     fleet (WorkerRegistry::View, the O(workers) path the router used before): the two
//     must agree (counted), and that path is timed too.
// Statistics cover the decisions made in the second half (--warmup) of the time new
// conversations arrive: caches full, load steady. The run ends with the last arrival.
//
//   taskset -c 0 build/bin/router_sim --workers=1000,10000 --dataset=multi-turn
//   taskset -c 0 build/bin/router_sim --workers=1000,10000 --dataset=prefix
//
// Prints one result block and one markdown row per fleet size. Exit 1 on a setup error or
// when the two routing paths disagreed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <optional>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/rpc/registry_client.h"
#include "router/scheduler.h"
#include "router/worker_registry.h"
#include "tools/bench/dataset.h"

ABSL_FLAG(std::string, workers, "1000,10000", "fleet sizes to simulate, comma-separated");
ABSL_FLAG(std::string, dataset, "multi-turn", "request trace: multi-turn | prefix | random");
ABSL_FLAG(int, requests_per_worker, 120, "requests in the trace per simulated worker");
ABSL_FLAG(int, input_len, 512, "tokens a turn / prompt adds");
ABSL_FLAG(int, output_len, 128, "tokens of each reply");
ABSL_FLAG(double, range_ratio, 0.5, "input and output lengths vary by this fraction");
ABSL_FLAG(int, prefix_groups, 0, "prefix: shared system prompts (0: workers / 4)");
ABSL_FLAG(int, prefix_len, 1024, "prefix: tokens per shared system prompt");
ABSL_FLAG(int, turns, 4, "multi-turn: turns per conversation");
ABSL_FLAG(double, think_seconds, 1.0, "multi-turn: mean think time between turns");
ABSL_FLAG(double, load, 8.0, "mean requests running per worker (sets the arrival rate)");
ABSL_FLAG(int, blocks_per_worker, 2048, "KV pool blocks per worker");
ABSL_FLAG(int, block_size, 16, "tokens per KV block");
ABSL_FLAG(int, max_running, 64, "requests a worker runs at once; more wait");
ABSL_FLAG(double, prefill_us_per_token, 50.0, "simulated prefill time per uncached token");
ABSL_FLAG(double, decode_ms_per_token, 10.0, "simulated decode time per output token");
ABSL_FLAG(double, report_ms, 20.0, "workers send KV events and load reports this often");
ABSL_FLAG(int, check_every, 50, "also decide every N-th request over the full fleet copy");
ABSL_FLAG(double, warmup, 0.5, "fraction of the arrival span left out of the statistics");
ABSL_FLAG(int, oracle_every, 0,
          "ask the oracle about every N-th measured decision (0: workers / 500, at least 1)");
ABSL_FLAG(double, overlap_weight, 1.0, "routing cost of each prompt block a worker lacks");
ABSL_FLAG(double, decode_max_load_ratio, 0, "the router's balance guard (0: off)");
ABSL_FLAG(uint64_t, seed, 1, "dataset and simulation seed");

namespace kvrelay::router {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "router_sim: %s\n", what.c_str());
  std::exit(1);
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) Die(absl::StrCat(what, ": ", s.ToString()));
}

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct Config {
  bench::DatasetOptions dataset;
  int requests_per_worker = 0;
  double load = 0;
  int blocks_per_worker = 0;
  int block_size = 0;
  int max_running = 0;
  double prefill_s_per_token = 0;
  double decode_s_per_token = 0;
  double report_s = 0;
  int check_every = 0;
  double warmup = 0;
  double overlap_weight = 1;
  double max_load_ratio = 0;
  int64_t oracle_every = 1;  // ask the oracle about every N-th measured decision
  uint64_t seed = 0;
};

struct Result {
  int workers = 0;
  int64_t decisions = 0;
  double route_seconds = 0;      // in Route() only
  double router_seconds = 0;     // every registry call: Route, Note*, events, loads
  std::vector<double> route_ns;  // per decision
  int64_t full_checks = 0, full_mismatches = 0;
  double full_seconds = 0;                         // View + ChooseRoute on the checked decisions
  int64_t prompt_tokens = 0, achieved_tokens = 0;  // every measured decision
  int64_t predicted_tokens = 0;                    // what the index said the chosen worker holds
  // The decisions the oracle was asked about (every oracle_every-th).
  int64_t sample_prompt_tokens = 0, sample_achieved_tokens = 0, sample_oracle_tokens = 0;
  double blocks_imbalance_sum = 0;  // max/mean active blocks, summed over samples
  int64_t load_reports = 0, oracle_samples = 0;
  double imbalance_sum = 0;  // sum over samples of max/mean
  double imbalance_max = 0;
  int64_t imbalance_samples = 0;
  double mean_active = 0;  // mean requests per worker over the samples
  size_t index_bytes = 0, index_blocks = 0;
  int64_t evicted = 0;
  double sim_seconds = 0, wall_seconds = 0;
};

class Simulation {
 public:
  Simulation(const Config& c, int n, std::vector<bench::Conversation> convs)
      : c_(c),
        n_(n),
        convs_(std::move(convs)),
        history_(convs_.size()),
        rng_(c.seed ^ (0x9e3779b97f4a7c15ull * n)) {
    RegistryOptions ro;
    ro.model_id = "sim";
    ro.block_size = c.block_size;
    ro.heartbeat_interval = absl::Hours(1);
    ro.heartbeat_timeout = absl::Hours(2);  // never expires within a run
    ro.max_workers = n;
    opt_.overlap_weight = c.overlap_weight;
    opt_.decode_max_load_ratio = c.max_load_ratio;
    ro.scheduler = opt_;
    registry_ = std::make_unique<WorkerRegistry>(ro);
    root_ = kvcache::RootHash("sim", "");
  }

  Result Run() {
    const auto wall0 = Clock::now();
    Start();
    // Conversations arrive as a Poisson process of the rate that keeps c_.load requests
    // running per worker: rate x turns x service = n x load (think time adds no load).
    const double mean_service =
        c_.dataset.output_len * c_.decode_s_per_token +
        c_.dataset.input_len * c_.prefill_s_per_token;  // an upper bound on prefill
    const double turns = static_cast<double>(bench::CountRequests(convs_)) / convs_.size();
    const double rate = n_ * c_.load / (turns * mean_service);
    std::exponential_distribution<double> gap(rate);
    double t = 0;
    for (size_t i = 0; i < convs_.size(); ++i) {
      t += gap(rng_);
      Push(t, kArrive, static_cast<int64_t>(i) << 8);
    }
    // Measured: the decisions in [warmup x t, t], while conversations still arrive (the
    // caches have filled and the load is steady); the run ends with the last arrival.
    end_ = t;
    start_ = c_.warmup * t;
    Push(c_.report_s, kTick, 0);
    while (!events_.empty()) {
      const Event e = events_.top();
      events_.pop();
      if (e.time > end_) break;
      now_ = e.time;
      switch (e.kind) {
        case kArrive: {
          const int conv = static_cast<int>(e.arg >> 8);
          const int turn = static_cast<int>(e.arg & 0xff);
          Arrive(conv, turn);
          break;
        }
        case kFinish:
          Finish(static_cast<int>(e.arg));
          break;
        case kTick:
          Tick();
          Push(now_ + c_.report_s, kTick, 0);
          break;
      }
    }
    r_.workers = n_;
    r_.index_bytes = registry_->IndexMemoryBytes();
    r_.index_blocks = registry_->IndexBlocks();
    for (const auto& w : workers_) r_.evicted += w.cache->counts().evicted;
    r_.sim_seconds = now_;
    r_.wall_seconds = Seconds(Clock::now() - wall0);
    return std::move(r_);
  }

 private:
  enum Kind { kArrive, kFinish, kTick };
  struct Event {
    double time;
    uint64_t order;  // FIFO among equal times: the run is deterministic
    Kind kind;
    int64_t arg;
    bool operator>(const Event& o) const {
      return time != o.time ? time > o.time : order > o.order;
    }
  };
  struct Worker {
    std::unique_ptr<kvcache::PrefixCache> cache;
    uint64_t conn = 0;
    uint64_t next_seq = 1;
    bool need_snapshot = true;  // right after registering
    bool dirty = true;
    int running = 0;
    int64_t active_blocks = 0;
    std::deque<int> waiting;
  };
  struct Request {
    int conv = 0, turn = 0;
    std::vector<int32_t> tokens;  // the prompt (history + this turn)
    std::vector<uint64_t> hashes;
    int output = 0;
    int slot = -1;    // the registry's
    int worker = -1;  // workers_[worker]
    int64_t load_blocks = 0;
    std::vector<int32_t> blocks;
    bool measured = false;
  };

  void Push(double t, Kind k, int64_t arg) { events_.push(Event{t, order_++, k, arg}); }

  // Registers the fleet (each worker sends its registration, then its snapshot).
  void Start() {
    workers_.resize(n_);
    for (int i = 0; i < n_; ++i) {
      Worker& w = workers_[i];
      kvcache::PrefixCache::Options po;
      po.num_blocks = c_.blocks_per_worker;
      po.block_size = c_.block_size;
      po.incarnation = static_cast<uint64_t>(i) + 1;
      absl::StatusOr<std::unique_ptr<kvcache::PrefixCache>> pc = kvcache::PrefixCache::Create(po);
      Check(pc.status(), "PrefixCache");
      w.cache = *std::move(pc);
      w.conn = registry_->NewConnection();
      v1::WorkerRegistration reg;
      reg.set_worker_id(absl::StrCat("d", i));
      reg.set_role(v1::WORKER_ROLE_DECODE);
      reg.set_address(absl::StrCat("10.0.", i / 256, ".", i % 256, ":7000"));
      reg.set_model_id("sim");
      reg.set_block_size(c_.block_size);
      reg.set_num_blocks(c_.blocks_per_worker);
      reg.set_incarnation(po.incarnation);
      Check(registry_->OnRegister(w.conn, reg, Now()), "OnRegister");
    }
    // Slots are the registry's; map them back to workers by id.
    slot_to_worker_.assign(n_, -1);
    for (int s = 0; s < n_; ++s) {
      std::optional<WorkerRef> ref = registry_->Worker(s);
      if (!ref) Die(absl::StrCat("no worker in slot ", s));
      int id = -1;
      if (!absl::SimpleAtoi(absl::string_view(ref->id).substr(1), &id) || id < 0 || id >= n_) {
        Die(absl::StrCat("unexpected worker id ", ref->id));
      }
      slot_to_worker_[s] = id;
    }
    Tick();
  }

  absl::Time Now() const { return absl::UnixEpoch() + absl::Seconds(now_); }

  // The worker side of the registry stream for every worker that changed.
  void Tick() {
    int64_t active = 0, max_active = 0, blocks = 0, max_blocks = 0;
    for (Worker& w : workers_) {
      const int64_t a = w.running + static_cast<int64_t>(w.waiting.size());
      active += a;
      max_active = std::max(max_active, a);
      blocks += w.active_blocks;
      max_blocks = std::max(max_blocks, w.active_blocks);
      if (!w.dirty) continue;
      w.dirty = false;
      if (!w.need_snapshot) {
        const kvcache::KvEventBatch b = w.cache->ReadEvents(w.next_seq, 1 << 20);
        if (b.need_snapshot) {
          w.need_snapshot = true;
        } else if (!b.events.empty()) {
          const v1::KvEventBatchMsg m = rpc::ToProto(b);
          const auto t0 = Clock::now();
          w.need_snapshot = !registry_->OnEvents(w.conn, m, Now());
          r_.router_seconds += Seconds(Clock::now() - t0);
          w.next_seq = b.next_seq;
        }
      }
      if (w.need_snapshot) {
        const kvcache::KvSnapshot s = w.cache->Snapshot();
        const v1::KvSnapshotMsg m = rpc::ToProto(s);
        const auto t0 = Clock::now();
        registry_->OnSnapshot(w.conn, m, Now());
        r_.router_seconds += Seconds(Clock::now() - t0);
        w.next_seq = s.seq + 1;
        w.need_snapshot = false;
      }
      v1::LoadReport load;
      load.set_running(w.running);
      load.set_waiting(static_cast<int64_t>(w.waiting.size()));
      load.set_active_blocks(w.active_blocks);
      load.set_free_blocks(c_.blocks_per_worker - w.active_blocks);
      const auto t0 = Clock::now();
      if (!registry_->OnLoad(w.conn, load, Now())) w.need_snapshot = true, w.dirty = true;
      r_.router_seconds += Seconds(Clock::now() - t0);
      ++r_.load_reports;
    }
    if (now_ >= start_ && active > 0) {
      const double mean = static_cast<double>(active) / n_;
      const double ratio = static_cast<double>(max_active) / mean;
      r_.imbalance_sum += ratio;
      r_.imbalance_max = std::max(r_.imbalance_max, ratio);
      r_.mean_active += mean;
      r_.blocks_imbalance_sum +=
          static_cast<double>(max_blocks) / (static_cast<double>(blocks) / n_);
      ++r_.imbalance_samples;
    }
  }

  void Arrive(int conv, int turn) {
    const bench::Conversation& cv = convs_[conv];
    const int id = static_cast<int>(requests_.size());
    requests_.emplace_back();
    Request& q = requests_.back();
    q.conv = conv;
    q.turn = turn;
    q.tokens = history_[conv];
    q.tokens.insert(q.tokens.end(), cv.turns[turn].tokens.begin(), cv.turns[turn].tokens.end());
    std::vector<int32_t>().swap(convs_[conv].turns[turn].tokens);  // used: free it
    q.output = std::max(1, cv.turns[turn].max_tokens);
    q.hashes = kvcache::BlockHashes(root_, q.tokens, c_.block_size);
    q.measured = now_ >= start_;
    const int64_t prompt = static_cast<int64_t>(q.tokens.size());
    q.load_blocks = kvcache::BlocksFor(prompt + q.output, c_.block_size);

    const auto t0 = Clock::now();
    absl::StatusOr<RouteDecision> d = registry_->Route(opt_, q.hashes, prompt, {});
    const auto t1 = Clock::now();
    Check(d.status(), "Route");
    r_.router_seconds += Seconds(t1 - t0);
    ++r_.decisions;
    if (q.measured) {
      r_.route_seconds += Seconds(t1 - t0);
      r_.route_ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
    }
    if (c_.check_every > 0 && r_.decisions % c_.check_every == 0) {
      // The same decision over a full copy of the fleet (the O(workers) path).
      const auto f0 = Clock::now();
      const FleetView v = registry_->View(q.hashes);
      absl::StatusOr<RouteDecision> full =
          ChooseRoute(opt_, prompt, c_.block_size, v.overlaps, v.decode, v.prefill, {});
      r_.full_seconds += Seconds(Clock::now() - f0);
      ++r_.full_checks;
      if (!full.ok() || full->decode_slot != d->decode_slot ||
          full->prefill_slot != d->prefill_slot ||
          full->decode_overlap_blocks != d->decode_overlap_blocks ||
          full->uncached_tokens != d->uncached_tokens ||
          full->max_overlap_blocks != d->max_overlap_blocks) {
        ++r_.full_mismatches;
      }
    }
    {
      const auto n0 = Clock::now();
      registry_->NoteChosen(d->decode_slot, -1, q.load_blocks, 0);
      r_.router_seconds += Seconds(Clock::now() - n0);
    }
    q.slot = d->decode_slot;
    q.worker = slot_to_worker_[q.slot];

    if (q.measured) {
      const int64_t achieved = workers_[q.worker].cache->Lookup(q.hashes, q.tokens);
      r_.prompt_tokens += prompt;
      r_.achieved_tokens += std::min(prompt, achieved * c_.block_size);
      r_.predicted_tokens +=
          std::min(prompt, static_cast<int64_t>(d->decode_overlap_blocks) * c_.block_size);
      if (++sampled_ % c_.oracle_every == 0) {  // the oracle looks at every worker's cache
        int64_t oracle = 0;
        for (const Worker& w : workers_) {
          oracle = std::max(oracle, w.cache->Lookup(q.hashes, q.tokens));
        }
        ++r_.oracle_samples;
        r_.sample_prompt_tokens += prompt;
        r_.sample_achieved_tokens += std::min(prompt, achieved * c_.block_size);
        r_.sample_oracle_tokens += std::min(prompt, oracle * c_.block_size);
      }
    }
    Worker& w = workers_[q.worker];
    w.waiting.push_back(id);
    w.dirty = true;
    Admit(q.worker);
  }

  // Starts waiting requests on worker `wi` while it has room.
  void Admit(int wi) {
    Worker& w = workers_[wi];
    while (!w.waiting.empty() && w.running < c_.max_running) {
      Request& q = requests_[w.waiting.front()];
      const int id = w.waiting.front();
      std::vector<int32_t> hits = w.cache->Acquire(q.hashes, q.tokens);
      const int64_t hit = static_cast<int64_t>(hits.size());
      absl::StatusOr<std::vector<int32_t>> fresh = w.cache->Allocate(q.load_blocks - hit);
      if (!fresh.ok()) {  // no room until a running request ends
        w.cache->Release(hits);
        if (w.running == 0) Die(absl::StrCat("a request of ", q.load_blocks, " blocks never fits"));
        break;
      }
      w.waiting.pop_front();
      q.blocks = std::move(hits);
      q.blocks.insert(q.blocks.end(), fresh->begin(), fresh->end());
      const int64_t full = static_cast<int64_t>(q.hashes.size());
      if (full > hit) {
        w.cache->Store(
            hit > 0 ? std::optional<uint64_t>(q.hashes[hit - 1]) : std::nullopt,
            absl::MakeSpan(q.blocks).subspan(hit, full - hit),
            absl::MakeSpan(q.hashes).subspan(hit, full - hit),
            absl::MakeSpan(q.tokens).subspan(hit * c_.block_size, (full - hit) * c_.block_size));
      }
      ++w.running;
      w.active_blocks += static_cast<int64_t>(q.blocks.size());
      w.dirty = true;
      const int64_t uncached = static_cast<int64_t>(q.tokens.size()) - hit * c_.block_size;
      Push(now_ + uncached * c_.prefill_s_per_token + q.output * c_.decode_s_per_token, kFinish,
           id);
    }
  }

  void Finish(int id) {
    Request& q = requests_[id];
    Worker& w = workers_[q.worker];
    // The reply: made-up tokens, cached with the prompt (its full blocks).
    std::uniform_int_distribution<int32_t> tok(0, c_.dataset.vocab_size - 1);
    std::vector<int32_t> all = q.tokens;
    for (int i = 0; i < q.output; ++i) all.push_back(tok(rng_));
    const std::vector<uint64_t> hashes = kvcache::BlockHashes(root_, all, c_.block_size);
    const int64_t from = static_cast<int64_t>(q.hashes.size());
    const int64_t to = std::min<int64_t>(static_cast<int64_t>(hashes.size()),
                                         static_cast<int64_t>(q.blocks.size()));
    if (to > from) {
      w.cache->Store(
          from > 0 ? std::optional<uint64_t>(hashes[from - 1]) : std::nullopt,
          absl::MakeSpan(q.blocks).subspan(from, to - from),
          absl::MakeSpan(hashes).subspan(from, to - from),
          absl::MakeSpan(all).subspan(from * c_.block_size, (to - from) * c_.block_size));
    }
    w.cache->Release(q.blocks);
    w.active_blocks -= static_cast<int64_t>(q.blocks.size());
    --w.running;
    w.dirty = true;
    {
      const auto t0 = Clock::now();
      registry_->NoteDone(q.slot, -1, q.load_blocks, 0);
      r_.router_seconds += Seconds(Clock::now() - t0);
    }
    const bench::Conversation& cv = convs_[q.conv];
    if (q.turn + 1 < static_cast<int>(cv.turns.size())) {
      history_[q.conv] = std::move(all);
      Push(now_ + cv.think_seconds[q.turn + 1], kArrive,
           (static_cast<int64_t>(q.conv) << 8) | (q.turn + 1));
    } else {
      history_[q.conv].clear();
      history_[q.conv].shrink_to_fit();
    }
    q.tokens.clear();
    q.tokens.shrink_to_fit();
    q.hashes.clear();
    q.hashes.shrink_to_fit();
    q.blocks.clear();
    q.blocks.shrink_to_fit();
    Admit(q.worker);
  }

  const Config c_;
  const int n_;
  std::vector<bench::Conversation> convs_;
  std::vector<std::vector<int32_t>> history_;  // by conversation: the turns so far
  std::mt19937_64 rng_;
  SchedulerOptions opt_;
  std::unique_ptr<WorkerRegistry> registry_;
  uint64_t root_ = 0;
  std::vector<Worker> workers_;
  std::vector<int> slot_to_worker_;
  std::deque<Request> requests_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  uint64_t order_ = 0;
  double now_ = 0;
  double start_ = 0, end_ = 0;
  int64_t sampled_ = 0;
  Result r_;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

std::vector<int> ParseSizes(const std::string& text) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1) {
      Die(absl::StrCat("--workers: '", part, "' is not a positive number"));
    }
    out.push_back(n);
  }
  if (out.empty()) Die("--workers is empty");
  return out;
}

int Main() {
  Config c;
  absl::StatusOr<bench::DatasetKind> kind = bench::ParseDatasetKind(absl::GetFlag(FLAGS_dataset));
  Check(kind.status(), "--dataset");
  if (*kind == bench::DatasetKind::kJsonl) Die("--dataset: jsonl traces are not simulated");
  c.dataset.kind = *kind;
  c.dataset.input_len = absl::GetFlag(FLAGS_input_len);
  c.dataset.output_len = absl::GetFlag(FLAGS_output_len);
  c.dataset.range_ratio = absl::GetFlag(FLAGS_range_ratio);
  c.dataset.prefix_len = absl::GetFlag(FLAGS_prefix_len);
  c.dataset.turns = absl::GetFlag(FLAGS_turns);
  c.dataset.think_seconds = absl::GetFlag(FLAGS_think_seconds);
  c.dataset.vocab_size = 32000;
  c.requests_per_worker = absl::GetFlag(FLAGS_requests_per_worker);
  c.load = absl::GetFlag(FLAGS_load);
  c.blocks_per_worker = absl::GetFlag(FLAGS_blocks_per_worker);
  c.block_size = absl::GetFlag(FLAGS_block_size);
  c.max_running = absl::GetFlag(FLAGS_max_running);
  c.prefill_s_per_token = absl::GetFlag(FLAGS_prefill_us_per_token) * 1e-6;
  c.decode_s_per_token = absl::GetFlag(FLAGS_decode_ms_per_token) * 1e-3;
  c.report_s = absl::GetFlag(FLAGS_report_ms) * 1e-3;
  c.check_every = absl::GetFlag(FLAGS_check_every);
  c.warmup = absl::GetFlag(FLAGS_warmup);
  c.overlap_weight = absl::GetFlag(FLAGS_overlap_weight);
  c.max_load_ratio = absl::GetFlag(FLAGS_decode_max_load_ratio);
  c.seed = absl::GetFlag(FLAGS_seed);
  if (c.requests_per_worker < 1 || c.load <= 0 || c.blocks_per_worker < 1 || c.block_size < 1 ||
      c.max_running < 1 || c.report_s <= 0 || c.warmup < 0 || c.warmup >= 1 ||
      c.prefill_s_per_token < 0 || c.decode_s_per_token <= 0) {
    Die("--requests_per_worker, --load, --blocks_per_worker, --block_size, --max_running, "
        "--report_ms and "
        "--decode_ms_per_token must be > 0, --prefill_us_per_token >= 0, --warmup in [0, 1)");
  }
  if (c.dataset.turns > 255) Die("--turns must be <= 255");
  const std::vector<int> sizes = ParseSizes(absl::GetFlag(FLAGS_workers));

  std::vector<std::string> rows;
  int mismatched = 0;
  for (int n : sizes) {
    bench::DatasetOptions d = c.dataset;
    d.seed = c.seed;
    const int turns = d.kind == bench::DatasetKind::kMultiTurn ? std::max(1, d.turns) : 1;
    d.num_prompts =
        std::max(1, static_cast<int>(static_cast<int64_t>(c.requests_per_worker) * n / turns));
    d.prefix_groups = absl::GetFlag(FLAGS_prefix_groups) > 0 ? absl::GetFlag(FLAGS_prefix_groups)
                                                             : std::max(1, n / 4);
    absl::StatusOr<std::vector<bench::Conversation>> convs = bench::MakeDataset(d);
    Check(convs.status(), "dataset");
    const int oracle_every = absl::GetFlag(FLAGS_oracle_every);
    Config cn = c;
    cn.oracle_every = std::max(1, oracle_every > 0 ? oracle_every : n / 500);
    const Result r = Simulation(cn, n, *std::move(convs)).Run();

    const double measured = static_cast<double>(r.route_ns.size());
    const double per_s = r.route_seconds > 0 ? measured / r.route_seconds : 0;
    const double router_per_s =
        r.router_seconds > 0 ? static_cast<double>(r.decisions) / r.router_seconds : 0;
    const double full_per_s = r.full_seconds > 0 ? r.full_checks / r.full_seconds : 0;
    const double p50 = Percentile(r.route_ns, 0.5) * 1e-3;
    const double p99 = Percentile(r.route_ns, 0.99) * 1e-3;
    const double hit =
        r.prompt_tokens > 0 ? static_cast<double>(r.achieved_tokens) / r.prompt_tokens : 0;
    const double sample_hit = r.sample_prompt_tokens > 0
                                  ? static_cast<double>(r.sample_achieved_tokens) /
                                        static_cast<double>(r.sample_prompt_tokens)
                                  : 0;
    const double oracle = r.sample_prompt_tokens > 0
                              ? static_cast<double>(r.sample_oracle_tokens) /
                                    static_cast<double>(r.sample_prompt_tokens)
                              : 0;
    const double of_oracle = oracle > 0 ? sample_hit / oracle : 0;
    const double blocks_imbalance =
        r.imbalance_samples > 0 ? r.blocks_imbalance_sum / r.imbalance_samples : 0;
    const double predicted =
        r.prompt_tokens > 0 ? static_cast<double>(r.predicted_tokens) / r.prompt_tokens : 0;
    const double imbalance = r.imbalance_samples > 0 ? r.imbalance_sum / r.imbalance_samples : 0;
    const double mean_active = r.imbalance_samples > 0 ? r.mean_active / r.imbalance_samples : 0;
    const double bytes_per_block =
        r.index_blocks > 0 ? static_cast<double>(r.index_bytes) / r.index_blocks : 0;
    std::printf(
        "workers %d, dataset %s, %lld decisions (%lld measured), %.1f s simulated in %.1f s\n"
        "  routing decisions/s (Route, one core)        %.0f   p50 %.2f us  p99 %.2f us\n"
        "  router work/s (Route, Note*, %lld load reports, events)  %.0f\n"
        "  full-copy decision (View + ChooseRoute)/s    %.0f   (%lld checked, %lld differ)\n"
        "  prefix hit rate: achieved %.3f (index predicted %.3f); on %lld oracle samples "
        "achieved %.3f, oracle %.3f: %.1f %% of the oracle\n"
        "  load: mean %.2f requests per worker; max/mean requests %.2f (mean over ticks, "
        "worst %.2f), max/mean active blocks %.2f\n"
        "  index: %zu blocks, %.1f bytes per block (%.1f MiB); %lld evictions\n",
        n, absl::GetFlag(FLAGS_dataset).c_str(), static_cast<long long>(r.decisions),
        static_cast<long long>(r.route_ns.size()), r.sim_seconds, r.wall_seconds, per_s, p50, p99,
        static_cast<long long>(r.load_reports), router_per_s, full_per_s,
        static_cast<long long>(r.full_checks), static_cast<long long>(r.full_mismatches), hit,
        predicted, static_cast<long long>(r.oracle_samples), sample_hit, oracle, 100 * of_oracle,
        mean_active, imbalance, r.imbalance_max, blocks_imbalance, r.index_blocks, bytes_per_block,
        static_cast<double>(r.index_bytes) / (1 << 20), static_cast<long long>(r.evicted));
    std::fflush(stdout);
    rows.push_back(absl::StrFormat(
        "| %d | %s | %.0fk | %.2f | %.0fk | %.1fk | %.3f | %.3f | %.1f %% | %.2f | %.2f | %.0f |",
        n, absl::GetFlag(FLAGS_dataset), per_s / 1e3, p99, router_per_s / 1e3, full_per_s / 1e3,
        sample_hit, oracle, 100 * of_oracle, imbalance, blocks_imbalance, bytes_per_block));
    if (r.full_mismatches > 0) ++mismatched;
  }
  std::printf(
      "\n| workers | dataset | decisions/s | p99 us | router work/s | full-copy/s | hit | oracle "
      "| of oracle | max/mean requests | max/mean blocks | index B/block |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& row : rows) std::printf("%s\n", row.c_str());
  if (mismatched > 0) {
    std::fprintf(stderr, "router_sim: the fast and the full-copy decisions differed\n");
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvrelay::router

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "simulates the router over thousands of workers: router_sim --workers=1000,10000");
  absl::ParseCommandLine(argc, argv);
  return kvrelay::router::Main();
}
