// A loaded model and its forward pass over the paged KV cache (DESIGN §6): one
// code path for prefill chunks and decode steps, any mix of sequences in a batch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model/config.h"
#include "common/model/weights.h"
#include "kernels/paged_kv.h"
#include "kernels/thread_pool.h"

namespace kvrelay::model {

// A run of consecutive tokens of one sequence to process in a forward pass.
struct SeqChunk {
  absl::Span<const int32_t> tokens;       // token ids at positions [start_pos, start_pos + size)
  int64_t start_pos = 0;                  // positions before this are already in the cache
  absl::Span<const int32_t> block_table;  // the sequence's blocks, covering every position used
  bool want_logits = true;                // logits of the chunk's last token
};

class Model {
 public:
  // Reads config.json (+ generation_config.json) and the safetensors weights of `dir`.
  // `pool` runs the ops and must outlive the model.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     kernels::ThreadPool* pool);
  static absl::StatusOr<std::unique_ptr<Model>> FromParts(ModelConfig config,
                                                          std::unique_ptr<Weights> weights,
                                                          kernels::ThreadPool* pool);

  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return *weights_; }
  kernels::ThreadPool* pool() const { return pool_; }

  // KV pool geometry for this model.
  kernels::PagedKvLayout KvLayout(kernels::DType kv_dtype, int block_size) const;

  // Runs one forward pass over `batch`, writing the K/V of every token into `kv`, and
  // appends to *logits one row of vocab_size floats per chunk with want_logits (in order).
  // INVALID_ARGUMENT on an out-of-range token id, a position past the context length,
  // a block table too short or naming a block outside the pool, or a layout mismatch.
  absl::Status Forward(absl::Span<const SeqChunk> batch, const kernels::PagedKvView& kv,
                       std::vector<float>* logits) const;

 private:
  Model(ModelConfig config, std::unique_ptr<Weights> weights, kernels::ThreadPool* pool);

  ModelConfig config_;
  std::unique_ptr<Weights> weights_;
  kernels::ThreadPool* pool_;
  std::vector<float> inv_freq_;  // RoPE (Llama family), head_dim / 2 entries
};

// HF RoPE inverse frequencies incl. Llama-3 scaling.
std::vector<float> RopeInvFreq(const ModelConfig& config);

}  // namespace kvrelay::model
