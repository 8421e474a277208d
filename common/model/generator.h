// Single-sequence generation over a Model and a KvPool: chunked prefill, then
// one decode step per token, sampling and stop conditions. The building block of
// `kvrelay generate`; the workers' continuous batching (later issues) uses the
// same Model::Forward.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kvcache/kv_pool.h"
#include "common/model/model.h"
#include "common/sampling/sampler.h"

namespace kvrelay::model {

struct GenerationResult {
  std::vector<int32_t> token_ids;
  std::vector<sampling::SampleResult> samples;  // one per token
  std::string finish_reason;                    // "stop" (eos / stop token) or "length"
  int64_t cached_tokens = 0;                    // prompt tokens whose KV was reused
  double prefill_seconds = 0;
  double decode_seconds = 0;  // total over the decode steps (tokens after the first)
};

class Generator {
 public:
  // `prefill_chunk` tokens per prefill forward pass (> 0).
  Generator(const Model* model, kvcache::KvPool* pool, int prefill_chunk = 256);

  // Generates up to params.max_tokens tokens after `prompt`. `on_token` (optional) is called
  // after each token; returning false stops generation (finish_reason "abort").
  // INVALID_ARGUMENT: empty prompt, bad token id, prompt not shorter than the context length,
  // bad sampling parameters. RESOURCE_EXHAUSTED: the KV pool is too small.
  absl::StatusOr<GenerationResult> Generate(const std::vector<int32_t>& prompt,
                                            const sampling::SamplingParams& params,
                                            const std::function<bool(int32_t)>& on_token = nullptr);

  // Logits of the last prompt token only (no sampling): for tests and tools.
  absl::StatusOr<std::vector<float>> PromptLogits(const std::vector<int32_t>& prompt);

 private:
  const Model* model_;
  kvcache::KvPool* pool_;
  int prefill_chunk_;
};

}  // namespace kvrelay::model
