#include "common/worker/kv_store.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"

namespace kvrelay::worker {

absl::StatusOr<KvStore> CreateKvStore(transfer::KvTransport& transport, const model::Model& model,
                                      const KvStoreOptions& options) {
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
  KvStore s;
  KVR_ASSIGN_OR_RETURN(s.memory, transport.AllocatePool(layout.block_bytes(), blocks));
  std::memset(s.memory->data(), 0, s.memory->size());
  KVR_ASSIGN_OR_RETURN(s.pool,
                       kvcache::KvPool::Wrap(layout, blocks, s.memory->data(), s.memory->size()));
  kvcache::PrefixCache::Options co;
  co.num_blocks = blocks;
  co.block_size = options.block_size;
  co.incarnation = kvcache::NewIncarnationId();
  KVR_ASSIGN_OR_RETURN(s.cache, kvcache::PrefixCache::Create(co));
  return s;
}

}  // namespace kvrelay::worker
