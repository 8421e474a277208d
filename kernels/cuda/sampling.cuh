// Token sampling on the GPU: the CUDA twin of sampling::Sample (common/sampling/sampler.h)
// for a batch of logits rows, each with its own parameters and history. For the same logits,
// parameters, history and (seed, position) it picks the token the CPU sampler picks
// (penalties, temperature, top-k, top-p, min-p, the (seed, position)-keyed draw, greedy when
// temperature is 0 or top_k is 1) and the log-probability of that token under the raw
// logits; see sampling.cu for the one case where equality is not guaranteed.
//
// kernels/ cannot depend on common/ (DESIGN §2): the parameters are restated here; the
// caller copies them from sampling::SamplingParams field by field.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvrelay::kernels::cuda {

// The fields of sampling::SamplingParams that choose the token, with the same meaning and
// defaults, plus the position the new token will occupy (Sample's `position`).
struct SamplingRowParams {
  float temperature = 0.0f;  // 0 => greedy (argmax, lowest id on ties)
  int32_t top_k = 0;         // 0 or -1 => disabled
  float top_p = 1.0f;        // (0, 1]
  float min_p = 0.0f;        // [0, 1]
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  uint64_t seed = 0;
  int64_t position = 0;
};

// One row of a batch: its parameters and its history in host memory (ids outside the
// vocabulary are ignored, as on the CPU). The spans are read during Sampler::Sample only.
struct SamplingRow {
  SamplingRowParams params;
  absl::Span<const int32_t> prompt_tokens;
  absl::Span<const int32_t> output_tokens;
};

// INVALID_ARGUMENT naming the field, with the ranges of sampling::ValidateSamplingParams;
// also when the prompt + output history reaches 2^31 tokens.
absl::Status ValidateSamplingRow(const SamplingRow& row);

// Per-device state for sampling up to max_rows rows over a fixed vocabulary: a scratch row of
// vocab floats per CTA, and a staging buffer for the row parameters and histories.
// Not thread-safe: calls share the buffers, so use one Sampler per stream, or order the
// streams yourself.
class Sampler {
 public:
  // INVALID_ARGUMENT: max_rows < 1, vocab < 1 or vocab >= 2^31. UNAVAILABLE without a device.
  static absl::StatusOr<std::unique_ptr<Sampler>> Create(int64_t max_rows, int64_t vocab);
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // tokens[r] (device int32) = the token sampled for row r from logits[r * vocab ...] (device
  // f32, [rows.size(), vocab], not modified); logprobs[r] (device f32, may be null) = its
  // log-softmax under the raw logits. rows.size() <= max_rows; an empty batch is a no-op.
  // The parameters and histories are copied to the device before this returns (so the spans
  // may be released); the sampling itself is asynchronous on `stream`. Growing the staging
  // buffer synchronises the stream.
  absl::Status Sample(const float* logits, absl::Span<const SamplingRow> rows, int32_t* tokens,
                      float* logprobs, cudaStream_t stream);

  int64_t max_rows() const;
  int64_t vocab() const;

 private:
  struct Impl;
  explicit Sampler(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvrelay::kernels::cuda
