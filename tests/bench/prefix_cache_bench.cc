// Prefix-cache bookkeeping costs (DESIGN §3), without any model:
//   - chained block hashes (XXH3) of a 4,096- and a 65,536-token prompt, block size 16;
//   - lookup of a fully cached 4,096-token prompt (256 blocks): hashing + Lookup, Lookup
//     alone on precomputed hashes, Acquire + Release (what a sequence does), and a miss on
//     the first block;
//   - Allocate(n) + Release of those n blocks on a 65,536-block BlockAllocator and
//     PrefixCache, n = 1 and 16: on an empty pool; on a pool filled with n-block
//     allocations of which a random half was released (for n = 16 every hole is a
//     multiple of 16 blocks); on a pool filled with 1-block allocations, a random half
//     released (holes of 16 are rare, so n = 16 takes several pieces); and (PrefixCache)
//     on a pool full of cached blocks, so that every allocation evicts.
//
//   build/bin/prefix_cache_bench [--benchmark_filter=...] [--benchmark_min_time=0.5]
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "common/kvcache/block_allocator.h"
#include "common/kvcache/block_hash.h"
#include "common/kvcache/prefix_cache.h"

namespace kvrelay::kvcache {
namespace {

constexpr int kBlockSize = 16;
constexpr int kLookupTokens = 4096;  // 256 blocks
constexpr int64_t kPoolBlocks = 65536;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "prefix_cache_bench: %s\n", what.c_str());
  std::exit(1);
}

std::vector<int32_t> RandomTokens(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(0, 31999);
  std::vector<int32_t> out(n);
  for (int32_t& t : out) t = tok(rng);
  return out;
}

uint64_t Root() { return RootHash("kvrelay-bench", ""); }

// ---- Hashing ---------------------------------------------------------------------------

void BM_BlockHashes(benchmark::State& state) {
  const std::vector<int32_t> tokens = RandomTokens(static_cast<size_t>(state.range(0)), 1);
  const uint64_t root = Root();
  for (auto _ : state) {
    std::vector<uint64_t> h = BlockHashes(root, tokens, kBlockSize);
    benchmark::DoNotOptimize(h.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(tokens.size()) * 4);
  state.counters["blocks_per_s"] =
      benchmark::Counter(static_cast<double>(tokens.size() / kBlockSize),
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_BlockHashes)->Arg(4096)->Arg(65536)->Unit(benchmark::kMicrosecond);

// ---- Lookup ----------------------------------------------------------------------------

// A PrefixCache holding the 256 blocks of one 4,096-token prompt (cached-free: stored,
// then released, as after a finished request).
struct LookupFixture {
  std::unique_ptr<PrefixCache> cache;
  std::vector<int32_t> tokens;
  std::vector<uint64_t> hashes;
};

LookupFixture& Lookups() {
  static LookupFixture* f = [] {
    auto* f = new LookupFixture();
    PrefixCache::Options o;
    o.num_blocks = 1024;
    o.block_size = kBlockSize;
    o.incarnation = 1;
    auto cache = PrefixCache::Create(o);
    if (!cache.ok()) Die(std::string(cache.status().message()));
    f->cache = std::move(cache).value();
    f->tokens = RandomTokens(kLookupTokens, 2);
    f->hashes = BlockHashes(Root(), f->tokens, kBlockSize);
    auto blocks = f->cache->Allocate(static_cast<int64_t>(f->hashes.size()));
    if (!blocks.ok()) Die(std::string(blocks.status().message()));
    f->cache->Store(std::nullopt, *blocks, f->hashes, f->tokens);
    f->cache->Release(*blocks);
    if (f->cache->counts().cached != kLookupTokens / kBlockSize) Die("fixture not cached");
    return f;
  }();
  return *f;
}

void ReportHits(benchmark::State& state, int64_t hits) {
  state.counters["hit_blocks"] = static_cast<double>(hits);
  state.counters["blocks_per_s"] =
      benchmark::Counter(static_cast<double>(kLookupTokens / kBlockSize),
                         benchmark::Counter::kIsIterationInvariantRate);
}

// What a request pays before prefill: hash its prompt, then look the chain up.
void BM_HashAndLookup(benchmark::State& state) {
  LookupFixture& f = Lookups();
  const uint64_t root = Root();
  int64_t hits = 0;
  for (auto _ : state) {
    std::vector<uint64_t> h = BlockHashes(root, f.tokens, kBlockSize);
    hits = f.cache->Lookup(h, f.tokens);
    benchmark::DoNotOptimize(hits);
  }
  ReportHits(state, hits);
}
BENCHMARK(BM_HashAndLookup)->Unit(benchmark::kMicrosecond);

// Lookup alone (hash map probe, parent check and token comparison per block).
void BM_Lookup(benchmark::State& state) {
  LookupFixture& f = Lookups();
  int64_t hits = 0;
  for (auto _ : state) {
    hits = f.cache->Lookup(f.hashes, f.tokens);
    benchmark::DoNotOptimize(hits);
  }
  ReportHits(state, hits);
}
BENCHMARK(BM_Lookup)->Unit(benchmark::kMicrosecond);

// Acquire (lookup + a reference on every hit) and Release of the 256 blocks.
void BM_AcquireRelease(benchmark::State& state) {
  LookupFixture& f = Lookups();
  int64_t hits = 0;
  for (auto _ : state) {
    std::vector<int32_t> blocks = f.cache->Acquire(f.hashes, f.tokens);
    hits = static_cast<int64_t>(blocks.size());
    f.cache->Release(blocks);
  }
  ReportHits(state, hits);
}
BENCHMARK(BM_AcquireRelease)->Unit(benchmark::kMicrosecond);

// The first block differs (so does every chained hash): hashing + a one-probe miss.
void BM_HashAndLookupMiss(benchmark::State& state) {
  LookupFixture& f = Lookups();
  std::vector<int32_t> tokens = f.tokens;
  tokens[0] = (tokens[0] + 1) % 32000;
  const uint64_t root = Root();
  int64_t hits = 0;
  for (auto _ : state) {
    std::vector<uint64_t> h = BlockHashes(root, tokens, kBlockSize);
    hits = f.cache->Lookup(h, tokens);
    benchmark::DoNotOptimize(hits);
  }
  state.counters["hit_blocks"] = static_cast<double>(hits);
}
BENCHMARK(BM_HashAndLookupMiss)->Unit(benchmark::kMicrosecond);

// Lookup alone of the missing prompt (hashes precomputed).
void BM_LookupMiss(benchmark::State& state) {
  LookupFixture& f = Lookups();
  std::vector<int32_t> tokens = f.tokens;
  tokens[0] = (tokens[0] + 1) % 32000;
  const std::vector<uint64_t> h = BlockHashes(Root(), tokens, kBlockSize);
  int64_t hits = 0;
  for (auto _ : state) {
    hits = f.cache->Lookup(h, tokens);
    benchmark::DoNotOptimize(hits);
  }
  state.counters["hit_blocks"] = static_cast<double>(hits);
}
BENCHMARK(BM_LookupMiss)->Unit(benchmark::kNanosecond);

// ---- Allocate / release ----------------------------------------------------------------

// Pool states for the allocation benchmarks (second argument). Each iteration leaves the
// pool as it found it, so the state holds for the whole run.
enum Mode : int64_t {
  kEmpty = 0,        // nothing else in the pool
  kFragmented = 1,   // filled with n-block allocations, a random half released
  kEvicting = 2,     // (PrefixCache) every block cached-free: each iteration allocates n
                     // (evicting the n LRU blocks), stores them under new hashes, releases
  kFragmented1 = 3,  // filled with 1-block allocations, a random half released
};

const char* ModeName(int64_t mode) {
  switch (mode) {
    case kEmpty:
      return "empty pool";
    case kFragmented:
      return "half of n-block allocs live";
    case kFragmented1:
      return "half of 1-block allocs live";
    default:
      return "full of cached blocks, evicts (+ Store)";
  }
}

// Cheap deterministic picks.
struct Rng {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  size_t Below(size_t n) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<size_t>(s % n);
  }
};

// Allocations of `unit` blocks until the pool is full, then a random half released (the
// rest is returned, still allocated). `alloc` and `release` wrap the allocator under test.
template <typename AllocFn, typename ReleaseFn>
std::vector<std::vector<int32_t>> Fragment(int64_t unit, AllocFn alloc, ReleaseFn release) {
  Rng rng;
  std::vector<std::vector<int32_t>> live;
  for (int64_t i = 0; i + unit <= kPoolBlocks; i += unit) live.push_back(alloc(unit));
  for (size_t i = live.size(); i > 1; --i) std::swap(live[i - 1], live[rng.Below(i)]);
  for (size_t i = live.size() / 2; i > 0; --i) {
    release(live.back());
    live.pop_back();
  }
  return live;
}

int64_t FragmentUnit(int64_t mode, int64_t n) {
  return mode == kFragmented1 ? 1 : mode == kFragmented ? n : 0;
}

// Items are operations: one Allocate(n) and one Release of the n blocks per iteration.
void ReportAlloc(benchmark::State& state) {
  state.SetItemsProcessed(state.iterations() * 2);
  state.SetLabel(ModeName(state.range(1)));
}

void BM_AllocatorAllocRelease(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto created = BlockAllocator::Create(kPoolBlocks);
  if (!created.ok()) Die(std::string(created.status().message()));
  BlockAllocator a = std::move(created).value();
  auto alloc = [&a](int64_t k) {
    auto r = a.Allocate(k, -1, nullptr);
    if (!r.ok()) Die(std::string(r.status().message()));
    return std::move(r).value();
  };
  auto release = [&a](const std::vector<int32_t>& b) { a.Release(b); };
  std::vector<std::vector<int32_t>> live;
  if (const int64_t unit = FragmentUnit(state.range(1), n); unit > 0) {
    live = Fragment(unit, alloc, release);
  }
  int64_t pieces = 0;  // contiguous runs making up the last allocation
  for (auto _ : state) {
    std::vector<int32_t> got = alloc(n);
    pieces = 1;
    for (size_t i = 1; i < got.size(); ++i) pieces += got[i] != got[i - 1] + 1;
    release(got);
  }
  state.counters["free_runs"] = static_cast<double>(a.free_runs());
  state.counters["pieces"] = static_cast<double>(pieces);
  ReportAlloc(state);
}
BENCHMARK(BM_AllocatorAllocRelease)
    ->ArgNames({"n", "mode"})
    ->Args({1, kEmpty})
    ->Args({16, kEmpty})
    ->Args({1, kFragmented})
    ->Args({16, kFragmented})
    ->Args({16, kFragmented1});

void BM_PrefixCacheAllocRelease(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int64_t mode = state.range(1);
  PrefixCache::Options o;
  o.num_blocks = kPoolBlocks;
  o.block_size = kBlockSize;
  o.incarnation = 1;
  auto created = PrefixCache::Create(o);
  if (!created.ok()) Die(std::string(created.status().message()));
  PrefixCache& c = **created;
  auto alloc = [&c](int64_t k) {
    auto r = c.Allocate(k);
    if (!r.ok()) Die(std::string(r.status().message()));
    return std::move(r).value();
  };
  auto release = [&c](const std::vector<int32_t>& b) { c.Release(b); };
  if (mode != kEvicting) {
    std::vector<std::vector<int32_t>> live;
    if (const int64_t unit = FragmentUnit(mode, n); unit > 0) {
      live = Fragment(unit, alloc, release);
    }
    for (auto _ : state) release(alloc(n));
  } else {
    // Fill the pool with cached-free blocks (distinct hashes; the token ids do not
    // matter to allocation), then cycle: every allocation evicts the n oldest.
    const std::vector<int32_t> tokens = RandomTokens(static_cast<size_t>(n) * kBlockSize, 3);
    uint64_t next_hash = 1;
    auto store = [&](const std::vector<int32_t>& blocks) {
      std::vector<uint64_t> h(blocks.size());
      for (uint64_t& x : h) x = next_hash++;
      c.Store(std::nullopt, blocks, h, tokens);
    };
    for (int64_t i = 0; i + n <= kPoolBlocks; i += n) {
      std::vector<int32_t> b = alloc(n);
      store(b);
      release(b);
    }
    if (c.counts().cached_free < kPoolBlocks - n) Die("evicting fixture not full");
    for (auto _ : state) {
      std::vector<int32_t> b = alloc(n);
      store(b);
      release(b);
    }
  }
  state.counters["free_blocks"] = static_cast<double>(c.counts().free);
  ReportAlloc(state);
}
BENCHMARK(BM_PrefixCacheAllocRelease)
    ->ArgNames({"n", "mode"})
    ->Args({1, kEmpty})
    ->Args({16, kEmpty})
    ->Args({1, kFragmented})
    ->Args({16, kFragmented})
    ->Args({16, kFragmented1})
    ->Args({1, kEvicting})
    ->Args({16, kEvicting});

}  // namespace
}  // namespace kvrelay::kvcache

BENCHMARK_MAIN();
