// kernels::PagedAttention alone, at the bench model's attention shape (decode_bench /
// multi_turn_bench: 12 layers, 12 heads, head_dim 64, block 16): one iteration runs the
// attention of all 12 layers, as one forward pass does, over a pool whose blocks are
// scattered (shuffled block table) and filled with random K/V.
//
//   BM_PrefillChunk/new:N/context:C/dtype:D/kv_heads:K/threads:T — N query tokens of one
//     sequence at positions [C - N, C): a prefill chunk behind a cached prefix (205 new
//     tokens after 1,843 cached = the multi-turn case of a 2,048-token prompt 90% cached).
//   BM_DecodeBatch/batch:B/context:C/dtype:D/threads:T — one query token per sequence, B
//     sequences of C tokens each (a continuous-batching decode step).
//
// dtype: 0 f32, 1 f16, 2 bf16, 3 int8. threads: 1 = the calling thread only, no pool (the
// CPU column is then the whole cost: the steadiest figure on a shared machine); 0 = a
// ThreadPool(0), one thread per CPU, as the model runs. KVRELAY_ISA=scalar: scalar path.
//
//   build/bin/attention_bench [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"

namespace kvrelay::bench {
namespace {

constexpr int kLayers = 12, kHeads = 12, kHeadDim = 64, kBlock = 16;

kernels::DType DTypeArg(int64_t a) {
  switch (a) {
    case 1:
      return kernels::DType::kF16;
    case 2:
      return kernels::DType::kBF16;
    case 3:
      return kernels::DType::kI8;
    default:
      return kernels::DType::kF32;
  }
}

// threads == 1: none (PagedAttention runs on the caller); otherwise ThreadPool(threads).
kernels::ThreadPool* Pool(int threads) {
  static kernels::ThreadPool* pools[65] = {};
  if (threads == 1) return nullptr;
  if (pools[threads] == nullptr) pools[threads] = new kernels::ThreadPool(threads);
  return pools[threads];
}

// A pool holding `seqs` sequences of `context` tokens (all layers written), block tables
// scattered over the pool.
struct Cache {
  kernels::PagedKvView view;
  std::unique_ptr<uint8_t[]> mem;
  std::vector<std::vector<int32_t>> tables;

  Cache(kernels::DType dt, int kv_heads, int seqs, int64_t context) {
    view.layout.dtype = dt;
    view.layout.num_layers = kLayers;
    view.layout.block_size = kBlock;
    view.layout.num_kv_heads = kv_heads;
    view.layout.head_dim = kHeadDim;
    const int64_t per_seq = (context + kBlock - 1) / kBlock;
    view.num_blocks = per_seq * seqs;
    const size_t bytes = view.layout.block_bytes() * static_cast<size_t>(view.num_blocks);
    mem.reset(new uint8_t[bytes]);
    view.base = mem.get();
    std::vector<int32_t> ids(view.num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::mt19937 rng(7);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::uniform_real_distribution<float> d(-2.0f, 2.0f);
    std::vector<float> k(kv_heads * kHeadDim), v(kv_heads * kHeadDim);
    for (int s = 0; s < seqs; ++s) {
      tables.emplace_back(ids.begin() + s * per_seq, ids.begin() + (s + 1) * per_seq);
      for (int64_t p = 0; p < context; ++p)
        for (int layer = 0; layer < kLayers; ++layer) {
          for (float& x : k) x = d(rng);
          for (float& x : v) x = d(rng);
          kernels::WriteKv(view, tables[s][p / kBlock], static_cast<int>(p % kBlock), layer,
                           k.data(), v.data());
        }
    }
  }
};

void Run(benchmark::State& state, int threads, const Cache& c,
         const std::vector<const int32_t*>& bt, const std::vector<int64_t>& pos, int64_t attended) {
  const int64_t n = static_cast<int64_t>(pos.size());
  std::vector<float> q(n * kHeads * kHeadDim), out(q.size());
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-2.0f, 2.0f);
  for (float& x : q) x = d(rng);
  const float scale = 1.0f / 8.0f;
  kernels::ThreadPool* pool = Pool(threads);
  for (auto _ : state) {
    for (int layer = 0; layer < kLayers; ++layer)
      kernels::PagedAttention(pool, c.view, layer, q.data(), n, bt.data(), pos.data(), kHeads,
                              scale, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["query_tokens_per_s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  // QK and PV: 2 FLOPs each per (query head, attended key, element).
  state.counters["GFLOPps"] =
      benchmark::Counter(4.0 * kLayers * kHeads * kHeadDim * static_cast<double>(attended) / 1e9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_PrefillChunk(benchmark::State& state) {
  const int64_t fresh = state.range(0), context = state.range(1);
  const kernels::DType dt = DTypeArg(state.range(2));
  const int kv_heads = static_cast<int>(state.range(3));
  const int threads = static_cast<int>(state.range(4));
  const Cache c(dt, kv_heads, 1, context);
  std::vector<const int32_t*> bt(fresh, c.tables[0].data());
  std::vector<int64_t> pos(fresh);
  int64_t attended = 0;
  for (int64_t i = 0; i < fresh; ++i) attended += (pos[i] = context - fresh + i) + 1;
  state.SetLabel(std::string(kernels::DTypeName(dt)) + ", " +
                 kernels::IsaName(kernels::ActiveKernels().isa));
  Run(state, threads, c, bt, pos, attended);
}
BENCHMARK(BM_PrefillChunk)
    ->ArgNames({"new", "context", "dtype", "kv_heads", "threads"})
    ->Args({205, 2048, 0, 12, 1})
    ->Args({205, 2048, 0, 12, 0})
    ->Args({205, 2048, 1, 12, 1})
    ->Args({205, 2048, 2, 12, 1})
    ->Args({205, 2048, 3, 12, 1})
    ->Args({205, 2048, 0, 3, 1})
    ->Args({256, 256, 0, 12, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

void BM_DecodeBatch(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int64_t context = state.range(1);
  const kernels::DType dt = DTypeArg(state.range(2));
  const int threads = static_cast<int>(state.range(3));
  const Cache c(dt, kHeads, batch, context);
  std::vector<const int32_t*> bt;
  for (int b = 0; b < batch; ++b) bt.push_back(c.tables[b].data());
  std::vector<int64_t> pos(batch, context - 1);
  state.SetLabel(std::string(kernels::DTypeName(dt)) + ", " +
                 kernels::IsaName(kernels::ActiveKernels().isa));
  Run(state, threads, c, bt, pos, context * batch);
}
BENCHMARK(BM_DecodeBatch)
    ->ArgNames({"batch", "context", "dtype", "threads"})
    ->Args({1, 2048, 0, 1})
    ->Args({16, 512, 0, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace
}  // namespace kvrelay::bench

BENCHMARK_MAIN();
