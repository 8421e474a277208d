// What both worker kinds own for KV (DESIGN §3, §4): one KV pool in memory registered
// with the KV transport (peers write into the decode worker's; the prefill worker's is
// the source of its writes) and the pool's prefix cache.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/kvcache/kv_pool.h"
#include "common/kvcache/prefix_cache.h"
#include "common/model/model.h"
#include "common/transfer/kv_transport.h"
#include "common/worker/kv_tiers.h"

namespace kvrelay::worker {

struct KvStoreOptions {
  int64_t kv_blocks = 0;  // pool size in blocks; 0: from kv_bytes
  uint64_t kv_bytes = 0;  // pool size in bytes; 0 (and kv_blocks 0): 4 contexts' worth
  int block_size = 16;
  std::string kv_dtype = "f32";
  // The lower tiers (host memory, disk); off unless tiers.enabled(). model_id and metrics
  // are CreateKvStore's.
  KvTierOptions tiers;
};

struct KvStore {
  std::unique_ptr<transfer::RegisteredMemory> memory;  // declared first: outlives `pool`
  std::unique_ptr<kvcache::KvPool> pool;
  std::unique_ptr<kvcache::PrefixCache> cache;
  std::unique_ptr<KvTierStore> tiers;  // null without lower tiers; declared last: dies first
};

// The pool (zero-filled) and its cache (new incarnation id) for `model`, in the memory of the
// model's backend (host, or GPU memory the transport maps as CUDA memory).
// With options.tiers enabled, the lower tiers too (their disk blocks named by `model_id`,
// their series in `metrics`).
// INVALID_ARGUMENT naming the flag (--block-size, --kv-dtype, --kv-bytes, --kv_host_bytes,
// --kv_disk_bytes) when bad.
absl::StatusOr<KvStore> CreateKvStore(transfer::KvTransport& transport, const model::Model& model,
                                      const KvStoreOptions& options,
                                      const std::string& model_id = "",
                                      std::shared_ptr<prometheus::Registry> metrics = nullptr);

}  // namespace kvrelay::worker
