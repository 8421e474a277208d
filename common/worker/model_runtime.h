// The model a worker serves, on the backend chosen at start-up (`--device auto|cpu|cuda`,
// DESIGN §2): the CPU thread pool, the backend and the loaded model, owned together so they
// are torn down in the right order (the model's buffers are freed through the backend, the
// CPU backend runs on the pool).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/kvcache/kv_pool.h"
#include "common/model/model.h"
#include "kernels/backend.h"
#include "kernels/thread_pool.h"

namespace kvrelay::worker {

struct ModelRuntime {
  std::unique_ptr<kernels::ThreadPool> threads;  // the CPU backend's (null on CUDA)
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<model::Model> model;  // declared last: destroyed first
  std::string device_note;              // what was chosen and why, for the start-up log
};

// Loads `model_dir` on the backend `device` ("auto", "cpu" or "cuda"; see
// kernels::ResolveDevice) with `threads` CPU threads (0: all cores; CPU backend only) and
// the backend's `options`.
// INVALID_ARGUMENT naming --device or --threads when bad; CreateBackend's error when the
// device cannot be used (e.g. --device cuda without a GPU); the loader's errors.
absl::StatusOr<ModelRuntime> LoadModelRuntime(const std::string& model_dir,
                                              absl::string_view device, int threads,
                                              const kernels::BackendOptions& options = {});

// A zero-filled KV pool of num_blocks blocks of `layout` in `backend`'s own memory, for a
// single process (no transport: `kvrelay generate`, benchmarks). The pool must die before
// `memory`, and both before the backend.
struct BackendKvPool {
  kernels::Buffer memory;
  std::unique_ptr<kvcache::KvPool> pool;
};
// KvPool::Create's errors for a bad geometry; the backend's when memory cannot be had.
absl::StatusOr<BackendKvPool> AllocateKvPool(kernels::Backend& backend,
                                             const kernels::PagedKvLayout& layout,
                                             int64_t num_blocks);

}  // namespace kvrelay::worker
