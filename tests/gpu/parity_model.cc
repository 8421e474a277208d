// End-to-end parity: the whole model on the CUDA backend against the CPU backend, for every
// tiny test model (Llama family: GQA, MHA + tied embeddings, Llama-3 RoPE scaling, Qwen2
// biases, bf16 weights; GPT-2), written by the project's own make-model code.
//  - model_greedy: greedy generation through model::Generator (chunked prefill, decode steps,
//    then the same prompt again so its prefix comes from the cache) gives the same tokens.
//  - model_logits: the logits of every generated position agree within a tolerance (the GPU
//    sums in other orders: cuBLASLt tiles, tree reductions, CUDA's expf).
//  - model_batch_invariance (default and split-K decode attention): on the GPU, a decode step
//    of three sequences batched together, and with a prefill chunk of a fourth in the same
//    pass, gives each sequence's logits bit for bit as when it is stepped alone (the "cpu"
//    side of the comparison is the GPU alone).
//  - model_serving_paths (default attention): on the GPU, the logits of a sequence's last
//    token are the same bits whether it is prefilled in one chunk, in chunks of 5, or
//    prefilled in chunks of 7 and then decoded as a one-token step (reuse == recompute).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/generator.h"
#include "common/model/model.h"
#include "common/worker/model_runtime.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "tests/gpu/parity.h"
#include "tests/testing/test_models.h"

namespace kvrelay::kernels::parity {
namespace {

constexpr Tolerance kLogitsTol{2e-4, 2e-3};
constexpr int kBlockSize = 4;
constexpr int64_t kBlocks = 96;
constexpr int kMaxTokens = 16;

std::vector<int32_t> Prompt(const model::Model& m, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(3, m.config().vocab_size - 1);
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int32_t& t : p) t = id(rng);
  return p;
}

// Greedy generation of `prompt` twice (the second reuses the cached prefix) on `backend`:
// tokens of both runs, and the logits of every generated position.
struct Greedy {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  int64_t cached = 0;
};

absl::StatusOr<Greedy> GenerateOn(Backend* backend, const std::string& dir, DType kv_dtype,
                                  uint32_t seed) {
  absl::StatusOr<std::unique_ptr<model::Model>> m = model::Model::Load(dir, backend);
  if (!m.ok()) return m.status();
  absl::StatusOr<worker::BackendKvPool> pool =
      worker::AllocateKvPool(*backend, (*m)->KvLayout(kv_dtype, kBlockSize), kBlocks);
  if (!pool.ok()) return pool.status();
  kvcache::PrefixCache::Options co;
  co.num_blocks = kBlocks;
  co.block_size = kBlockSize;
  co.incarnation = 1;
  absl::StatusOr<std::unique_ptr<kvcache::PrefixCache>> cache = kvcache::PrefixCache::Create(co);
  if (!cache.ok()) return cache.status();
  model::Generator gen(m->get(), pool->pool.get(), cache->get(), "parity", /*prefill_chunk=*/7);
  sampling::SamplingParams params;
  params.max_tokens = kMaxTokens;
  params.ignore_eos = true;
  model::GenerateOptions options;
  options.keep_logits = true;
  const std::vector<int32_t> prompt = Prompt(**m, 23, seed);
  Greedy g;
  for (int run = 0; run < 2; ++run) {
    absl::StatusOr<model::GenerationResult> r = gen.Generate(prompt, params, options);
    if (!r.ok()) return r.status();
    g.tokens.insert(g.tokens.end(), r->token_ids.begin(), r->token_ids.end());
    for (const std::vector<float>& l : r->logits)
      g.logits.insert(g.logits.end(), l.begin(), l.end());
    g.cached += r->cached_tokens;
  }
  return g;
}

// Both backends' greedy runs of one model and KV dtype, computed once for the two cases.
struct Pair {
  absl::Status status;
  Greedy cpu, gpu;
};

std::shared_ptr<Pair> RunPair(const std::string& dir, DType kv_dtype, uint32_t seed) {
  auto p = std::make_shared<Pair>();
  CpuBackend cpu(nullptr);
  absl::StatusOr<Greedy> c = GenerateOn(&cpu, dir, kv_dtype, seed);
  if (!c.ok()) {
    p->status = c.status();
    return p;
  }
  absl::StatusOr<std::unique_ptr<Backend>> gpu = CreateBackend(Device::kCuda, nullptr);
  if (!gpu.ok()) {
    p->status = gpu.status();
    return p;
  }
  absl::StatusOr<Greedy> g = GenerateOn(gpu->get(), dir, kv_dtype, seed);
  if (!g.ok()) {
    p->status = g.status();
    return p;
  }
  if (c->cached == 0 || g->cached != c->cached) {
    p->status = absl::InternalError(
        absl::StrCat("prefix reuse: cpu cached ", c->cached, " tokens, gpu ", g->cached));
    return p;
  }
  p->cpu = *std::move(c);
  p->gpu = *std::move(g);
  return p;
}

// One decode step of every sequence in `steps` (token at position) in one Forward, plus an
// optional prefill chunk; the logits of the decode sequences, in order.
absl::StatusOr<std::vector<float>> Step(const model::Model& m, const PagedKvView& kv,
                                        const std::vector<std::vector<int32_t>>& tables,
                                        const std::vector<std::vector<int32_t>>& tokens,
                                        const std::vector<int64_t>& positions,
                                        const std::vector<size_t>& which,
                                        const model::SeqChunk* extra) {
  std::vector<model::SeqChunk> batch;
  for (size_t i : which) {
    model::SeqChunk c;
    c.tokens = absl::MakeConstSpan(&tokens[i][positions[i]], 1);
    c.start_pos = positions[i];
    c.block_table = tables[i];
    batch.push_back(c);
  }
  if (extra != nullptr) batch.push_back(*extra);
  std::vector<float> logits;
  RETURN_IF_ERROR(m.Forward(batch, kv, &logits));
  logits.resize(which.size() * static_cast<size_t>(m.config().vocab_size));  // drop the chunk's
  return logits;
}

// A model on a CUDA backend with an f32 KV pool of kBlocks blocks (the backend outlives the
// rest: declared first).
struct OnGpu {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<model::Model> model;
  worker::BackendKvPool pool;
};

absl::StatusOr<std::unique_ptr<OnGpu>> LoadOnGpu(const std::string& dir,
                                                 const BackendOptions& options) {
  auto g = std::make_unique<OnGpu>();
  absl::StatusOr<std::unique_ptr<Backend>> be = CreateBackend(Device::kCuda, nullptr, options);
  if (!be.ok()) return be.status();
  g->backend = *std::move(be);
  absl::StatusOr<std::unique_ptr<model::Model>> m = model::Model::Load(dir, g->backend.get());
  if (!m.ok()) return m.status();
  g->model = *std::move(m);
  absl::StatusOr<worker::BackendKvPool> pool =
      worker::AllocateKvPool(*g->backend, g->model->KvLayout(DType::kF32, kBlockSize), kBlocks);
  if (!pool.ok()) return pool.status();
  g->pool = *std::move(pool);
  return g;
}

absl::Status BatchInvariance(const std::string& dir, bool split_k, Outputs* o) {
  BackendOptions options;
  options.cuda_split_k_decode = split_k;
  absl::StatusOr<std::unique_ptr<OnGpu>> g = LoadOnGpu(dir, options);
  if (!g.ok()) return g.status();
  const model::Model* m = (*g)->model.get();
  const PagedKvView& kv = (*g)->pool.pool->view();
  // Four sequences on disjoint blocks: three are prefilled then decoded; the fourth is a
  // prefill chunk riding along in the batched step.
  const int lens[] = {5, 19, 33, 12};
  std::vector<std::vector<int32_t>> tokens, tables;
  int32_t next_block = 0;
  for (int i = 0; i < 4; ++i) {
    tokens.push_back(Prompt(*m, lens[i] + 1, 100 + i));
    std::vector<int32_t> t;
    for (int b = 0; b * kBlockSize < lens[i] + 1; ++b) t.push_back(next_block++);
    tables.push_back(t);
  }
  for (int i = 0; i < 3; ++i) {  // prefill [0, len) of the three decoding sequences
    model::SeqChunk c;
    c.tokens = absl::MakeConstSpan(tokens[i].data(), lens[i]);
    c.block_table = tables[i];
    std::vector<float> unused;
    RETURN_IF_ERROR(m->Forward({c}, kv, &unused));
  }
  const std::vector<int64_t> pos = {lens[0], lens[1], lens[2]};
  model::SeqChunk chunk;
  chunk.tokens = absl::MakeConstSpan(tokens[3].data(), lens[3]);
  chunk.block_table = tables[3];
  // Alone, one by one (the reference), then all three, then all three with the chunk.
  for (size_t i = 0; i < 3; ++i) {
    absl::StatusOr<std::vector<float>> l = Step(*m, kv, tables, tokens, pos, {i}, nullptr);
    if (!l.ok()) return l.status();
    o->cpu.insert(o->cpu.end(), l->begin(), l->end());
  }
  o->cpu.insert(o->cpu.end(), o->cpu.begin(), o->cpu.end());  // twice: two batched forms
  const model::SeqChunk* const extras[] = {nullptr, &chunk};
  for (const model::SeqChunk* extra : extras) {
    absl::StatusOr<std::vector<float>> l = Step(*m, kv, tables, tokens, pos, {0, 1, 2}, extra);
    if (!l.ok()) return l.status();
    o->gpu.insert(o->gpu.end(), l->begin(), l->end());
  }
  return absl::OkStatus();
}

// Logits of the last of `tokens` after feeding them in chunks of `chunk` tokens (the last
// chunk holding the rest) on blocks [first_block, ...).
absl::StatusOr<std::vector<float>> LastLogits(const model::Model& m, const PagedKvView& kv,
                                              const std::vector<int32_t>& tokens, size_t chunk,
                                              int32_t first_block) {
  std::vector<int32_t> table;
  for (size_t b = 0; b * kBlockSize < tokens.size(); ++b) {
    table.push_back(first_block + static_cast<int32_t>(b));
  }
  std::vector<float> logits;
  for (size_t at = 0; at < tokens.size(); at += chunk) {
    model::SeqChunk c;
    c.tokens = absl::MakeConstSpan(tokens.data() + at, std::min(chunk, tokens.size() - at));
    c.start_pos = static_cast<int64_t>(at);
    c.block_table = table;
    logits.clear();
    RETURN_IF_ERROR(m.Forward({c}, kv, &logits));
  }
  return logits;
}

absl::Status ServingPaths(const std::string& dir, Outputs* o) {
  absl::StatusOr<std::unique_ptr<OnGpu>> g = LoadOnGpu(dir, {});
  if (!g.ok()) return g.status();
  const model::Model* m = (*g)->model.get();
  const PagedKvView& kv = (*g)->pool.pool->view();
  const std::vector<int32_t> tokens = Prompt(*m, 30, 55);  // 8 blocks of 4 per path
  absl::StatusOr<std::vector<float>> whole = LastLogits(*m, kv, tokens, tokens.size(), 0);
  if (!whole.ok()) return whole.status();
  absl::StatusOr<std::vector<float>> fives = LastLogits(*m, kv, tokens, 5, 8);
  if (!fives.ok()) return fives.status();
  // Chunks of 7 over the first 29 tokens, then token 29 alone: 7, 7, 7, 7, 1, 1.
  std::vector<int32_t> table;
  for (int32_t b = 16; b < 24; ++b) table.push_back(b);
  std::vector<float> decoded;
  for (size_t at = 0; at < tokens.size();) {
    const size_t n = at + 1 == tokens.size() ? 1 : std::min<size_t>(7, tokens.size() - 1 - at);
    model::SeqChunk c;
    c.tokens = absl::MakeConstSpan(tokens.data() + at, n);
    c.start_pos = static_cast<int64_t>(at);
    c.block_table = table;
    decoded.clear();
    RETURN_IF_ERROR(m->Forward({c}, kv, &decoded));
    at += n;
  }
  o->cpu = *whole;
  o->cpu.insert(o->cpu.end(), whole->begin(), whole->end());
  o->gpu = *std::move(fives);
  o->gpu.insert(o->gpu.end(), decoded.begin(), decoded.end());
  return absl::OkStatus();
}

void AddModelCases(std::vector<Case>* cases) {
  for (const testing::ModelVariant& v : testing::TinyVariants()) {
    for (DType kv : {DType::kF32, DType::kBF16, DType::kI8}) {
      const std::string params = absl::StrCat(v.name, ",kv=", DTypeName(kv));
      // Computed by whichever of the two cases runs first.
      auto pair = std::make_shared<std::shared_ptr<Pair>>();
      auto get = [v, kv, pair]() -> std::shared_ptr<Pair> {
        if (*pair == nullptr) *pair = RunPair(testing::ModelDir(v), kv, 7);
        return *pair;
      };
      cases->push_back(
          {"model_greedy", params, kExact, [get](cudaStream_t, Outputs* o) -> absl::Status {
             const std::shared_ptr<Pair> p = get();
             if (!p->status.ok()) return p->status;
             o->cpu.assign(p->cpu.tokens.begin(), p->cpu.tokens.end());
             o->gpu.assign(p->gpu.tokens.begin(), p->gpu.tokens.end());
             return absl::OkStatus();
           }});
      cases->push_back(
          {"model_logits", params, kLogitsTol, [get](cudaStream_t, Outputs* o) -> absl::Status {
             const std::shared_ptr<Pair> p = get();
             if (!p->status.ok()) return p->status;
             o->cpu = p->cpu.logits;
             o->gpu = p->gpu.logits;
             return absl::OkStatus();
           }});
    }
    for (bool split_k : {false, true}) {
      cases->push_back({"model_batch_invariance",
                        absl::StrCat(v.name, split_k ? ",split-k decode" : ""), kExact,
                        [v, split_k](cudaStream_t, Outputs* o) -> absl::Status {
                          return BatchInvariance(testing::ModelDir(v), split_k, o);
                        }});
    }
    cases->push_back(
        {"model_serving_paths", v.name, kExact, [v](cudaStream_t, Outputs* o) -> absl::Status {
           return ServingPaths(testing::ModelDir(v), o);
         }});
  }
}
KVR_PARITY_CASES(AddModelCases);

}  // namespace
}  // namespace kvrelay::kernels::parity
