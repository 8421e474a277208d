// Decode engine step time with Prometheus metrics on vs off (issue 7: overhead < 2%).
//
//   build/bin/engine_metrics_bench [--benchmark_min_time=20]
//
// Two decode::Engine instances on the same model, one recording metrics and one not, serve
// the same kind of batch in turn: 8 requests (32-token prompts, 64 generated tokens each,
// greedy, ignore_eos). Reported: wall time per engine step of each (prefill, mixed and
// decode steps; every step records its series) and the overhead in percent. "on" is what a worker
// with --metrics_listen does (every step updates counters, gauges and histograms) plus a
// scraper serialising the whole registry every 100 ms (10-100x a usual scrape rate);
// "off" records nothing (EngineOptions::record_metrics = false).
// Two models: "tiny" (2 layers, hidden 64: sub-millisecond steps, so a fixed per-step cost
// weighs the most; the worst case) and the ~134M-parameter bench model.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "decode_worker/engine.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "tests/bench/bench_model.h"

namespace kvrelay::bench {
namespace {

constexpr int kBatch = 8;
constexpr int kPrompt = 32;
constexpr int kGenerate = 64;
constexpr int kBlocks = 512;

struct LoadedModel {
  std::unique_ptr<kernels::ThreadPool> pool;
  std::unique_ptr<model::Model> model;
};

const model::Model& Model(int which) {
  static LoadedModel* models = [] {
    auto* m = new LoadedModel[2];
    const std::string dirs[2] = {EnsureTinyBenchModel(), EnsureBenchModel()};
    for (int i = 0; i < 2; ++i) {
      m[i].pool = std::make_unique<kernels::ThreadPool>(0);
      auto loaded = model::Model::Load(dirs[i], m[i].pool.get());
      if (!loaded.ok()) std::abort();
      m[i].model = *std::move(loaded);
    }
    return m;
  }();
  return *models[which].model;
}

// Serialises the registry every `period` until destroyed (what a Prometheus scrape costs
// the worker: Collect takes every family's lock).
class Scraper {
 public:
  Scraper(std::shared_ptr<prometheus::Registry> registry, absl::Duration period)
      : registry_(std::move(registry)), thread_([this, period] {
          while (!stop_.WaitForNotificationWithTimeout(period)) {
            const std::string text = prometheus::TextSerializer().Serialize(registry_->Collect());
            bytes_ += text.size();
          }
        }) {}
  ~Scraper() {
    stop_.Notify();
    thread_.join();
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  absl::Notification stop_;
  std::atomic<size_t> bytes_{0};
  std::thread thread_;
};

// One decode engine over its own pool, with or without metrics.
struct EngineUnderTest {
  std::unique_ptr<kvcache::KvPool> pool;
  std::unique_ptr<kvcache::PrefixCache> cache;
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<decode::Engine> engine;
  std::unique_ptr<Scraper> scraper;
  absl::Duration time;
  int64_t steps = 0;

  absl::Status Start(const model::Model& m, bool metrics) {
    auto p = kvcache::KvPool::Create(m.KvLayout(kernels::DType::kF32, 16), kBlocks);
    if (!p.ok()) return p.status();
    pool = *std::move(p);
    kvcache::PrefixCache::Options co;
    co.num_blocks = kBlocks;
    co.block_size = 16;
    auto c = kvcache::PrefixCache::Create(co);
    if (!c.ok()) return c.status();
    cache = *std::move(c);
    decode::EngineOptions o;
    o.metrics = registry;
    o.record_metrics = metrics;
    auto e = decode::Engine::Create(&m, pool.get(), cache.get(), "bench", o);
    if (!e.ok()) return e.status();
    engine = *std::move(e);
    if (metrics) scraper = std::make_unique<Scraper>(registry, absl::Milliseconds(100));
    return absl::OkStatus();
  }

  // Serves one batch of kBatch fresh requests; adds its wall time and engine steps.
  void RunBatch(const model::Model& m, uint32_t* seed) {
    sampling::SamplingParams p;
    p.max_tokens = kGenerate;
    p.ignore_eos = true;
    const int vocab = m.config().vocab_size;
    absl::Mutex mu;
    int done = 0;
    const int64_t before = engine->stats().steps;
    const absl::Time start = absl::Now();
    for (int r = 0; r < kBatch; ++r) {
      decode::EngineRequest req;
      req.id = "r" + std::to_string(*seed);
      req.params = p;
      for (int t = 0; t < kPrompt; ++t) {  // fresh prompts: no prefix hits
        req.prompt.push_back(static_cast<int32_t>((*seed * 7919u + t * 104729u) % vocab));
      }
      ++*seed;
      decode::RequestCallbacks cb;
      cb.on_tokens = [](const decode::StepOutput&) {};
      cb.on_done = [&](const absl::Status&, const decode::RequestSummary&) {
        absl::MutexLock l(&mu);
        ++done;
      };
      if (!engine->Submit(std::move(req), std::move(cb)).ok()) std::abort();
    }
    {
      absl::MutexLock l(&mu);
      mu.Await(absl::Condition(
          +[](int* d) { return *d == kBatch; }, &done));
    }
    time += absl::Now() - start;
    steps += engine->stats().steps - before;
  }

  double StepMicros() const {
    return absl::ToDoubleMicroseconds(time) / static_cast<double>(std::max<int64_t>(steps, 1));
  }
};

// Arg: model (0 tiny, 1 bench). Every iteration serves one batch on the engine without
// metrics and one on the engine with them, in alternating order, so load from elsewhere
// on the machine falls on both alike; the counters are the per-step means of each.
void BM_MetricsOverhead(benchmark::State& state) {
  const model::Model& m = Model(static_cast<int>(state.range(0)));
  EngineUnderTest off, on;
  if (!off.Start(m, false).ok() || !on.Start(m, true).ok()) {
    state.SkipWithError("engine");
    return;
  }
  uint32_t seed = 1;
  bool off_first = true;
  for (auto _ : state) {
    EngineUnderTest* order[2] = {&off, &on};
    if (!off_first) std::swap(order[0], order[1]);
    for (EngineUnderTest* e : order) e->RunBatch(m, &seed);
    off_first = !off_first;
  }
  state.counters["off_step_us"] = off.StepMicros();
  state.counters["on_step_us"] = on.StepMicros();
  state.counters["overhead_pct"] = 100.0 * (on.StepMicros() / off.StepMicros() - 1.0);
  state.SetLabel(state.range(0) == 0 ? "tiny model" : "bench model");
}
BENCHMARK(BM_MetricsOverhead)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("model")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace kvrelay::bench

BENCHMARK_MAIN();
