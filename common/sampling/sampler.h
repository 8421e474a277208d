// Token sampling: greedy, temperature, top-k, top-p, min-p, repetition /
// frequency / presence penalties, top-N logprobs. Randomness is keyed by
// (seed, position) so a seeded run continued from any position is identical.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvrelay::sampling {

struct SamplingParams {
  int max_tokens = 16;
  float temperature = 0.0f;         // 0 => greedy (argmax, lowest id on ties)
  int top_k = 0;                    // 0 or -1 => disabled
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; HF/vLLM semantics over prompt + output tokens
  float frequency_penalty = 0.0f;   // [-2, 2]; OpenAI semantics over output tokens
  float presence_penalty = 0.0f;    // [-2, 2]
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int logprobs = 0;  // top-N logprobs to return per token, [0, 20]
};

// INVALID_ARGUMENT naming the field ("temperature must be >= 0, got -1") when out of range.
absl::Status ValidateSamplingParams(const SamplingParams& params);

struct SampleResult {
  int32_t token = -1;
  float logprob = 0.0f;  // log-softmax of the raw (unpenalised, untempered) logits
  std::vector<std::pair<int32_t, float>> top_logprobs;  // params.logprobs entries, best first
};

// Samples the token for sequence position `position` (index the new token will
// occupy in prompt + output). `logits` has `vocab` entries and is not modified.
// Deterministic for the same (logits, params incl. seed, history, position).
SampleResult Sample(absl::Span<const float> logits, const SamplingParams& params,
                    absl::Span<const int32_t> prompt_tokens,
                    absl::Span<const int32_t> output_tokens, int64_t position);

// A uniform double in [0, 1) from (seed, position): the only randomness Sample() uses.
double UniformForPosition(uint64_t seed, int64_t position);

}  // namespace kvrelay::sampling
