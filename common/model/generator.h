// Single-sequence generation over a Model, a KvPool and its PrefixCache: reuse of the
// cached prompt prefix, chunked prefill of the rest, then one decode step per token,
// sampling and stop conditions; every full block is left in the prefix cache. The building block of
// `kvrelay generate`; the workers' continuous batching (later issues) uses the
// same Model::Forward.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "common/sampling/sampler.h"

namespace kvrelay::model {

struct GenerationResult {
  std::vector<int32_t> token_ids;
  std::vector<sampling::SampleResult> samples;  // one per token
  std::string finish_reason;                    // "stop" (eos / stop token) or "length"
  int64_t cached_tokens = 0;                    // prompt tokens whose KV was reused
  std::vector<std::vector<float>> logits;       // per token, with GenerateOptions::keep_logits
  double prefill_seconds = 0;
  double decode_seconds = 0;  // total over the decode steps (tokens after the first)
};

// INVALID_ARGUMENT unless the prompt is non-empty, shorter than the context length and
// made of token ids in [0, vocab_size); the message names the offending token.
absl::Status ValidatePrompt(const Model& model, absl::Span<const int32_t> prompt);

struct GenerateOptions {
  // Called after each token; returning false stops generation (finish_reason "abort").
  std::function<bool(int32_t)> on_token;
  // Tenant isolation: requests reuse each other's KV only under the same salt.
  std::string cache_salt;
  bool keep_logits = false;  // fill GenerationResult::logits (tests, tools)
};

class Generator {
 public:
  // `cache` manages the blocks of `pool` (same block size). `model_id` names the model in
  // the block hashes (DESIGN §3). `prefill_chunk` tokens per prefill forward pass (> 0).
  Generator(const Model* model, kvcache::KvPool* pool, kvcache::PrefixCache* cache,
            std::string model_id, int prefill_chunk = 256);

  // Generates up to params.max_tokens tokens after `prompt`, reusing cached KV of its
  // leading full blocks (result.cached_tokens says how many tokens).
  // INVALID_ARGUMENT: empty prompt, bad token id, prompt not shorter than the context length,
  // bad sampling parameters. RESOURCE_EXHAUSTED: the KV pool is too small.
  absl::StatusOr<GenerationResult> Generate(const std::vector<int32_t>& prompt,
                                            const sampling::SamplingParams& params,
                                            const GenerateOptions& options = {});

  // Logits of the last prompt token only (no sampling; the prefix cache is used and
  // filled as by Generate): for tests and tools. *cached_tokens (optional) gets the reuse.
  absl::StatusOr<std::vector<float>> PromptLogits(const std::vector<int32_t>& prompt,
                                                  const std::string& cache_salt = "",
                                                  int64_t* cached_tokens = nullptr);

 private:
  const Model* model_;
  kvcache::KvPool* pool_;
  kvcache::PrefixCache* cache_;
  std::string model_id_;
  int prefill_chunk_;
};

}  // namespace kvrelay::model
