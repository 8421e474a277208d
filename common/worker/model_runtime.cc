#include "common/worker/model_runtime.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"

namespace kvrelay::worker {

absl::StatusOr<ModelRuntime> LoadModelRuntime(const std::string& model_dir,
                                              absl::string_view device, int threads,
                                              const kernels::BackendOptions& options) {
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  ModelRuntime r;
  KVR_ASSIGN_OR_RETURN(const kernels::Device d, kernels::ResolveDevice(device, &r.device_note));
  if (d == kernels::Device::kCpu) r.threads = std::make_unique<kernels::ThreadPool>(threads);
  absl::StatusOr<std::unique_ptr<kernels::Backend>> backend =
      kernels::CreateBackend(d, r.threads.get(), options);
  if (!backend.ok()) {
    return absl::Status(backend.status().code(),
                        absl::StrCat("--device ", device, ": ", backend.status().message()));
  }
  r.backend = std::move(*backend);
  KVR_ASSIGN_OR_RETURN(r.model, model::Model::Load(model_dir, r.backend.get()));
  return r;
}

absl::StatusOr<BackendKvPool> AllocateKvPool(kernels::Backend& backend,
                                             const kernels::PagedKvLayout& layout,
                                             int64_t num_blocks) {
  KVR_RETURN_IF_ERROR(kvcache::KvPool::CheckGeometry(layout, num_blocks));
  BackendKvPool p;
  const size_t bytes = layout.block_bytes() * static_cast<size_t>(num_blocks);
  KVR_ASSIGN_OR_RETURN(p.memory, backend.Allocate(bytes));
  KVR_RETURN_IF_ERROR(backend.Zero(p.memory.data(), bytes));
  KVR_RETURN_IF_ERROR(backend.Synchronize());
  KVR_ASSIGN_OR_RETURN(p.pool, kvcache::KvPool::Wrap(layout, num_blocks, p.memory.as<uint8_t>(),
                                                     bytes, backend.memory_kind()));
  return p;
}

}  // namespace kvrelay::worker
