#include "common/worker/kv_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"
#include "kernels/backend.h"

namespace kvrelay::worker {

absl::StatusOr<KvStore> CreateKvStore(transfer::KvTransport& transport, const model::Model& model,
                                      const KvStoreOptions& options, const std::string& model_id,
                                      std::shared_ptr<prometheus::Registry> metrics) {
  if (options.block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be >= 1, got ", options.block_size));
  }
  kernels::DType kv_dtype;
  if (!kernels::ParseDType(options.kv_dtype, &kv_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype must be f32, f16, bf16 or int8, got '", options.kv_dtype, "'"));
  }
  const kernels::PagedKvLayout layout = model.KvLayout(kv_dtype, options.block_size);
  int64_t blocks = options.kv_blocks;
  if (blocks <= 0 && options.kv_bytes > 0) {
    blocks = static_cast<int64_t>(options.kv_bytes / layout.block_bytes());
    if (blocks < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv-bytes ", options.kv_bytes, " holds no block of ", layout.block_bytes(), " bytes"));
    }
  }
  if (blocks <= 0) {
    blocks = 4 * kvcache::BlocksFor(std::min(model.config().max_position_embeddings, 8192),
                                    options.block_size);
  }
  // The pool lives where the model's backend computes (device memory for CUDA), allocated
  // and registered by the transport so that peers write straight into it.
  kernels::Backend& backend = model.backend();
  const kernels::MemoryKind kind = backend.memory_kind();
  const transfer::MemoryType type = kind == kernels::MemoryKind::kCuda
                                        ? transfer::MemoryType::kCuda
                                        : transfer::MemoryType::kHost;
  KvStore s;
  absl::StatusOr<std::unique_ptr<transfer::RegisteredMemory>> memory =
      transport.AllocatePool(layout.block_bytes(), blocks, type);
  if (!memory.ok()) {
    if (type == transfer::MemoryType::kHost) return memory.status();
    return absl::Status(
        memory.status().code(),
        absl::StrCat("KV pool in GPU memory through the ", transport.name(),
                     " transport: ", memory.status().message(),
                     " (GPU-direct KV transfer needs UCX built with CUDA support, e.g. "
                     "deploy/docker/Dockerfile.cuda; Debian's libucx0 has none)"));
  }
  s.memory = std::move(*memory);
  // What peers get a key for (the descriptor) is the pool and nothing else: a peer can
  // write only where this process lets its KV be written (README "Security").
  const transfer::PoolDescriptor& d = s.memory->descriptor();
  const uint64_t pool_bytes = layout.block_bytes() * static_cast<uint64_t>(blocks);
  if (d.bytes != pool_bytes || s.memory->size() != pool_bytes ||
      d.base_address != reinterpret_cast<uint64_t>(s.memory->data()) || d.num_blocks != blocks ||
      d.block_bytes != layout.block_bytes()) {
    return absl::InternalError(absl::StrCat(
        "the ", transport.name(), " transport exports ", d.bytes, " bytes at ", d.base_address,
        " for a KV pool of ", pool_bytes, " bytes: refusing to expose more than the pool"));
  }
  KVR_RETURN_IF_ERROR(backend.Zero(s.memory->data(), s.memory->size()));
  KVR_RETURN_IF_ERROR(backend.Synchronize());
  KVR_ASSIGN_OR_RETURN(
      s.pool, kvcache::KvPool::Wrap(layout, blocks, s.memory->data(), s.memory->size(), kind));
  kvcache::PrefixCache::Options co;
  co.num_blocks = blocks;
  co.block_size = options.block_size;
  co.incarnation = kvcache::NewIncarnationId();
  KVR_ASSIGN_OR_RETURN(s.cache, kvcache::PrefixCache::Create(co));
  if (options.tiers.enabled()) {
    KvTierOptions to = options.tiers;
    to.model_id = model_id;
    to.metrics = std::move(metrics);
    KVR_ASSIGN_OR_RETURN(s.tiers, KvTierStore::Create(to, s.pool.get(), s.cache.get(), &backend));
  }
  return s;
}

}  // namespace kvrelay::worker
