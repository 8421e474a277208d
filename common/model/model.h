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

namespace kvrelay::kernels {
class Backend;  // kernels/backend.h
}  // namespace kvrelay::kernels

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
  // Runs on a CPU backend (owned by the model) whose ops use `pool`, which must outlive the
  // model.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     kernels::ThreadPool* pool);
  // The same on `backend` (which must outlive the model): the weights are uploaded once,
  // here (on the CPU backend that copies nothing: its buffers are the host weights).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     kernels::Backend* backend);
  static absl::StatusOr<std::unique_ptr<Model>> FromParts(ModelConfig config,
                                                          std::unique_ptr<Weights> weights,
                                                          kernels::ThreadPool* pool);
  static absl::StatusOr<std::unique_ptr<Model>> FromParts(ModelConfig config,
                                                          std::unique_ptr<Weights> weights,
                                                          kernels::Backend* backend);
  ~Model();

  const ModelConfig& config() const { return config_; }
  // The host weights as loaded (what was uploaded to the backend).
  const Weights& weights() const { return *weights_; }
  // The CPU thread pool given to Load/FromParts; null when loaded on a given backend.
  kernels::ThreadPool* pool() const { return pool_; }
  // What Forward runs on.
  kernels::Backend& backend() const { return *backend_; }

  // KV pool geometry for this model.
  kernels::PagedKvLayout KvLayout(kernels::DType kv_dtype, int block_size) const;

  // Runs one forward pass over `batch` on the backend, writing the K/V of every token into
  // `kv`, and appends to *logits (host memory) one row of vocab_size floats per chunk with
  // want_logits (in order). The batch's metadata is uploaded once; the activations live in
  // backend buffers reused across calls. Safe to call from several threads at once.
  // INVALID_ARGUMENT on an out-of-range token id, a position past the context length,
  // a block table too short or naming a block outside the pool, or a layout mismatch;
  // FAILED_PRECONDITION when the pool's memory is not the backend's kind; a backend's
  // error as it comes.
  absl::Status Forward(absl::Span<const SeqChunk> batch, const kernels::PagedKvView& kv,
                       std::vector<float>* logits) const;

 private:
  struct OnBackend;  // the weights' backend buffers and the pool of workspaces
  struct Workspace;  // one Forward call's buffers

  Model(ModelConfig config, std::unique_ptr<Weights> weights, kernels::ThreadPool* pool,
        std::unique_ptr<kernels::Backend> owned_backend, kernels::Backend* backend);
  absl::Status Upload();

  ModelConfig config_;
  std::unique_ptr<Weights> weights_;
  kernels::ThreadPool* pool_;
  std::unique_ptr<kernels::Backend> owned_backend_;  // outlives on_backend_ (declared first)
  kernels::Backend* backend_;
  std::vector<float> inv_freq_;  // RoPE (Llama family), head_dim / 2 entries
  std::unique_ptr<OnBackend> on_backend_;
};

// HF RoPE inverse frequencies incl. Llama-3 scaling.
std::vector<float> RopeInvFreq(const ModelConfig& config);

}  // namespace kvrelay::model
