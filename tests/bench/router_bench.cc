// Router hot-path costs (DESIGN §5), without gRPC:
//   - BM_IndexLookup: PrefixIndex::Overlaps on an index of 8 workers x ~100k blocks
//     (chains of 512 blocks, the first 32 of every chain a system prompt all workers
//     share), for random 512-block prompts of which one worker holds a long prefix
//     (256..512 blocks) and the rest is new. items_per_second = block-hash lookups per
//     second, counting the probes Overlaps actually makes (it stops one block after the
//     longest match).
//   - BM_RouteDecision8k: the full decision for an 8,192-token prompt with 16 workers
//     (12 decode, 4 prefill): chained block hashes of the tokens (block_hash.h),
//     Overlaps, ChooseRoute.
//
//   taskset -c 0 build/bin/router_bench [--benchmark_filter=...] [--benchmark_min_time=1]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "common/kvcache/block_hash.h"
#include "router/prefix_index.h"
#include "router/scheduler.h"

namespace kvrelay::router {
namespace {

constexpr int kBlockSize = 16;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "router_bench: %s\n", what.c_str());
  std::exit(1);
}

void Check(const absl::Status& s) {
  if (!s.ok()) Die(s.ToString());
}

// ---- Index lookup ----------------------------------------------------------------------

constexpr int kLookupWorkers = 8;
constexpr int kChainBlocks = 512;
constexpr int kChainsPerWorker = 200;  // 200 x 512 = 102,400 blocks per worker
constexpr int kSharedBlocks = 32;
constexpr int kPrompts = 1024;

struct LookupFixture {
  PrefixIndex index;
  std::vector<std::vector<uint64_t>> prompts;
  std::vector<int64_t> probes;  // lookups Overlaps makes for each prompt
};

LookupFixture& Lookups() {
  static LookupFixture* f = [] {
    auto* f = new LookupFixture;
    // Block hashes are XXH3 outputs; uniformly random 64-bit values are equivalent and
    // much quicker to make than hashing 800k blocks of tokens.
    std::mt19937_64 rng(7);
    std::vector<uint64_t> shared(kSharedBlocks);
    for (uint64_t& h : shared) h = rng();
    std::vector<std::vector<std::vector<uint64_t>>> chains(kLookupWorkers);
    for (int w = 0; w < kLookupWorkers; ++w) {
      for (int c = 0; c < kChainsPerWorker; ++c) {
        std::vector<uint64_t> chain(shared);
        while (chain.size() < kChainBlocks) chain.push_back(rng());
        Check(f->index.Store(w, chain));
        chains[w].push_back(std::move(chain));
      }
    }
    for (int i = 0; i < kPrompts; ++i) {
      const auto& chain = chains[rng() % kLookupWorkers][rng() % kChainsPerWorker];
      const size_t held = 256 + rng() % 257;  // 256..512 leading blocks
      std::vector<uint64_t> prompt(chain.begin(), chain.begin() + held);
      while (prompt.size() < kChainBlocks) prompt.push_back(rng());
      f->probes.push_back(std::min<int64_t>(kChainBlocks, f->index.MaxOverlap(prompt) + 1));
      f->prompts.push_back(std::move(prompt));
    }
    std::fprintf(stderr, "router_bench: index of %zu hashes, %d workers x %lld blocks\n",
                 f->index.size(), kLookupWorkers, static_cast<long long>(f->index.blocks(0)));
    return f;
  }();
  return *f;
}

void BM_IndexLookup(benchmark::State& state) {
  LookupFixture& f = Lookups();
  std::vector<int32_t> out(kLookupWorkers);
  int64_t lookups = 0;
  size_t i = 0;
  for (auto _ : state) {
    f.index.Overlaps(f.prompts[i], absl::MakeSpan(out));
    benchmark::DoNotOptimize(out.data());
    lookups += f.probes[i];
    if (++i == f.prompts.size()) i = 0;
  }
  state.SetItemsProcessed(lookups);
}
BENCHMARK(BM_IndexLookup)->Unit(benchmark::kMicrosecond);

// ---- Full routing decision -------------------------------------------------------------

constexpr int kDecodeWorkers = 12;
constexpr int kPrefillWorkers = 4;
constexpr int kRouteTokens = 8192;
constexpr int kStoredPromptsPerWorker = 24;  // 24 x 512 blocks = 12,288 blocks each

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, size_t n) {
  std::uniform_int_distribution<int32_t> tok(0, 127999);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = tok(rng);
  return t;
}

struct RouteFixture {
  PrefixIndex index;
  uint64_t root = 0;
  std::vector<std::vector<int32_t>> prompts;  // each shares a prefix with a stored prompt
  std::vector<WorkerLoadView> decode, prefill;
};

RouteFixture& Routes() {
  static RouteFixture* f = [] {
    auto* f = new RouteFixture;
    f->root = kvcache::RootHash("kvrelay-bench", "");
    std::mt19937_64 rng(11);
    const std::vector<int32_t> system = RandomTokens(rng, 1024);
    std::vector<std::vector<int32_t>> stored;
    for (int w = 0; w < kDecodeWorkers + kPrefillWorkers; ++w) {
      for (int c = 0; c < kStoredPromptsPerWorker; ++c) {
        std::vector<int32_t> tokens = system;
        const std::vector<int32_t> rest = RandomTokens(rng, kRouteTokens - system.size());
        tokens.insert(tokens.end(), rest.begin(), rest.end());
        Check(f->index.Store(w, kvcache::BlockHashes(f->root, tokens, kBlockSize)));
        stored.push_back(std::move(tokens));
      }
    }
    // A follow-up turn: a stored prompt's first 4,096..8,192 tokens, then new tokens.
    for (int i = 0; i < 64; ++i) {
      std::vector<int32_t> tokens = stored[rng() % stored.size()];
      const size_t keep = 4096 + rng() % 4097;
      const std::vector<int32_t> rest = RandomTokens(rng, kRouteTokens - keep);
      std::copy(rest.begin(), rest.end(), tokens.begin() + keep);
      f->prompts.push_back(std::move(tokens));
    }
    for (int w = 0; w < kDecodeWorkers + kPrefillWorkers; ++w) {
      WorkerLoadView v;
      v.slot = w;
      v.id = "worker-" + std::to_string(w);
      v.num_blocks = 65536;
      v.active_blocks = static_cast<int64_t>(rng() % 40000);
      v.running = static_cast<int64_t>(rng() % 64);
      v.waiting = static_cast<int64_t>(rng() % 8);
      v.queued_prefill_tokens = w < kDecodeWorkers ? 0 : static_cast<int64_t>(rng() % 30000);
      v.last_chosen = rng() % 1000;
      (w < kDecodeWorkers ? f->decode : f->prefill).push_back(std::move(v));
    }
    return f;
  }();
  return *f;
}

void BM_RouteDecision8k(benchmark::State& state) {
  RouteFixture& f = Routes();
  const SchedulerOptions options;
  std::vector<uint64_t> hashes;
  std::vector<int32_t> overlaps(kDecodeWorkers + kPrefillWorkers);
  size_t i = 0;
  int64_t remote = 0;
  for (auto _ : state) {
    const std::vector<int32_t>& tokens = f.prompts[i];
    hashes.clear();
    kvcache::ExtendBlockHashes(f.root, tokens, kBlockSize, &hashes);
    f.index.Overlaps(hashes, absl::MakeSpan(overlaps));
    absl::StatusOr<RouteDecision> d = ChooseRoute(options, static_cast<int64_t>(tokens.size()),
                                                  kBlockSize, overlaps, f.decode, f.prefill, {});
    if (!d.ok()) Die(d.status().ToString());
    remote += d->prefill_slot >= 0;
    benchmark::DoNotOptimize(d->decode_slot);
    if (++i == f.prompts.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["remote_frac"] =
      static_cast<double>(remote) / static_cast<double>(std::max<int64_t>(1, state.iterations()));
}
BENCHMARK(BM_RouteDecision8k)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvrelay::router

BENCHMARK_MAIN();
