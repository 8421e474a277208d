// Decode and prefill throughput of a ~100M-parameter random Llama-shaped model
// (GPT-2-small-sized: 12 layers, hidden 768, 12 heads, vocab 32000, bf16 weights).
// Reports tokens/s, bytes read per token, and that traffic divided by the memcpy
// bandwidth measured in the same run (goal at batch 1: >= 0.7).
//
//   build/bin/decode_bench [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/kvcache/block_allocator.h"
#include "common/kvcache/kv_pool.h"
#include "common/model/model.h"
#include "common/model/model_maker.h"
#include "common/util/file.h"
#include "kernels/ops.h"
#include "tests/bench/bench_model.h"
#include "tests/bench/bench_util.h"

namespace kvrelay::bench {
namespace {

struct Fixture {
  std::unique_ptr<kernels::ThreadPool> pool;
  std::unique_ptr<model::Model> model;
  std::unique_ptr<kvcache::KvPool> kv;
  std::unique_ptr<kvcache::BlockAllocator> blocks;
  double memcpy_bw = 0;
};

Fixture& Get() {
  static Fixture* f = [] {
    auto* f = new Fixture();
    const std::string dir = EnsureBenchModel();
    f->pool = std::make_unique<kernels::ThreadPool>(0);
    f->model = std::move(*model::Model::Load(dir, f->pool.get()));
    f->kv = std::move(*kvcache::KvPool::Create(f->model->KvLayout(kernels::DType::kF32, 16), 2048));
    f->blocks = std::make_unique<kvcache::BlockAllocator>(*kvcache::BlockAllocator::Create(2048));
    f->memcpy_bw = MemcpyBandwidth();
    std::fprintf(stderr, "model: %.1fM parameters, %.1f MB of weights; isa %s; memcpy %.2f GB/s\n",
                 f->model->weights().parameter_count / 1e6,
                 f->model->weights().parameter_bytes / 1e6,
                 kernels::IsaName(kernels::ActiveKernels().isa), f->memcpy_bw / 1e9);
    return f;
  }();
  return *f;
}

// Decode `batch` sequences of `context` tokens each, one token per sequence per step.
void BM_Decode(benchmark::State& state) {
  Fixture& f = Get();
  const int batch = static_cast<int>(state.range(0));
  const int context = 128;
  const int bs = f.kv->layout().block_size;
  std::vector<std::vector<int32_t>> tables(batch);
  std::vector<int32_t> prompt(context, 0);
  for (int i = 0; i < context; ++i) prompt[i] = (i * 7919) % 32000;
  for (auto& t : tables)
    t = *f.blocks->Allocate(kvcache::BlocksFor(context + 4096 / 16, bs), -1, nullptr);
  // Prefill every sequence once.
  for (auto& t : tables) {
    model::SeqChunk c{absl::MakeConstSpan(prompt), 0, t, true};
    std::vector<float> logits;
    (void)f.model->Forward({c}, f.kv->view(), &logits);
  }
  int64_t pos = context;
  std::vector<int32_t> next(batch, 1);
  std::vector<float> logits;
  for (auto _ : state) {
    std::vector<model::SeqChunk> chunks;
    for (int b = 0; b < batch; ++b) {
      chunks.push_back(model::SeqChunk{absl::MakeConstSpan(&next[b], 1), pos, tables[b], true});
    }
    logits.clear();
    (void)f.model->Forward(chunks, f.kv->view(), &logits);
    benchmark::DoNotOptimize(logits.data());
    if (++pos >= context + 200) pos = context;  // stay within the allocated blocks
  }
  for (auto& t : tables) f.blocks->Release(t);
  const auto& L = f.kv->layout();
  const double kv_bytes =
      static_cast<double>(L.token_bytes()) * 2 * L.num_layers * (context + 100) * batch;
  // Every weight is read once per step except the embedding table (one row per token)
  // when the lm_head is a separate matrix.
  const auto& w = f.model->weights();
  const double embed_bytes = w.lm_head.w == w.embed
                                 ? 0.0
                                 : static_cast<double>(f.model->config().vocab_size) *
                                       f.model->config().hidden_size *
                                       kernels::DTypeSize(w.embed_dtype);
  const double bytes_per_step = w.parameter_bytes - embed_bytes + kv_bytes;
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes_per_step_MB"] = bytes_per_step / 1e6;
  state.counters["read_GBps"] =
      benchmark::Counter(bytes_per_step / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["memcpy_GBps"] = f.memcpy_bw / 1e9;
}
BENCHMARK(BM_Decode)
    ->Arg(1)
    ->Arg(4)
    ->Arg(16)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3.0);

void BM_Prefill(benchmark::State& state) {
  Fixture& f = Get();
  const int n = static_cast<int>(state.range(0));
  std::vector<int32_t> prompt(n);
  for (int i = 0; i < n; ++i) prompt[i] = (i * 104729) % 32000;
  std::vector<int32_t> table =
      *f.blocks->Allocate(kvcache::BlocksFor(n, f.kv->layout().block_size), -1, nullptr);
  std::vector<float> logits;
  for (auto _ : state) {
    logits.clear();
    model::SeqChunk c{absl::MakeConstSpan(prompt), 0, table, true};
    (void)f.model->Forward({c}, f.kv->view(), &logits);
  }
  f.blocks->Release(table);
  const auto& c = f.model->config();
  // Matmul FLOPs (2 per weight per token, excluding the embedding gather and counting the
  // lm_head once) plus attention (QK and PV: 2 * 2 * heads * head_dim per attended pair).
  const double embed = static_cast<double>(c.vocab_size) * c.hidden_size;
  const double matmul_params =
      f.model->weights().parameter_count - embed - (c.tie_word_embeddings ? 0 : embed);
  const double flops =
      2.0 * matmul_params * n + 2.0 * embed +
      4.0 * c.num_layers * c.num_heads * c.head_dim * (static_cast<double>(n) * (n + 1) / 2);
  state.counters["tokens_per_s"] =
      benchmark::Counter(n, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPps"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Prefill)
    ->Arg(128)
    ->Arg(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3.0);

}  // namespace
}  // namespace kvrelay::bench

BENCHMARK_MAIN();
