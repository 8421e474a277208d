#include "common/process/worker_flags.h"

#include <string>

#include "absl/flags/flag.h"
#include "common/rpc/registry_client.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder (required)");
ABSL_FLAG(std::string, model_id, "", "model id in block hashes (default: the folder's name)");
ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port to serve on (port 0: any free port)");
ABSL_FLAG(int64_t, kv_blocks, 0, "KV pool size in blocks (0: use --kv_bytes)");
ABSL_FLAG(uint64_t, kv_bytes, 0, "KV pool size in bytes (0 with --kv_blocks 0: 4 contexts)");
ABSL_FLAG(uint64_t, kv_host_bytes, 0,
          "host-memory KV tier: bytes of host memory that blocks evicted from the pool are copied "
          "down to and reloaded from on a prefix hit (0: no host tier)");
ABSL_FLAG(std::string, kv_disk_dir, "",
          "disk KV tier: a folder of block files (one per block, kept across restarts) that blocks "
          "the host tier evicts go down to (empty: no disk tier)");
ABSL_FLAG(uint64_t, kv_disk_bytes, 0, "disk KV tier: bytes of block files kept in --kv_disk_dir");
ABSL_FLAG(int, block_size, 16, "tokens per KV block (the same on every worker and the router)");
ABSL_FLAG(std::string, kv_dtype, "f32",
          "KV dtype: f32 | f16 | bf16 | int8 (the same on prefill and decode workers)");
ABSL_FLAG(std::string, device, "auto",
          "where the forward pass runs: cpu | cuda | auto (cuda when built with CUDA and a GPU is "
          "found, else cpu)");
ABSL_FLAG(bool, cuda_split_k_decode, false,
          "cuda: decode steps through the split-K flash-decoding kernel (faster at long contexts; "
          "a token's last bits may then differ between a decode step and a prefill chunk)");
ABSL_FLAG(int, threads, 0, "CPU threads for the forward pass on the cpu device (0: all cores)");
ABSL_FLAG(std::string, router, "",
          "routers to register with: host:port[,...]; dns:///host:port means every address the "
          "name resolves to, e.g. a headless Service (empty: none)");
ABSL_FLAG(double, router_resolve_seconds, 10,
          "how often dns:///host:port --router entries are resolved again");
ABSL_FLAG(std::string, worker_id, "",
          "this worker's id in the registry (default: ROLE-HOST:PORT, ROLE decode or prefill)");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "host routers and other workers use to reach this worker");

namespace kvrelay::process {

absl::Status ApplyWorkerFlags(const Process& p, worker::WorkerOptions& o) {
  o.model_dir = absl::GetFlag(FLAGS_model);
  o.model_id = absl::GetFlag(FLAGS_model_id);
  o.listen = absl::GetFlag(FLAGS_listen);
  o.kv.kv_blocks = absl::GetFlag(FLAGS_kv_blocks);
  o.kv.kv_bytes = absl::GetFlag(FLAGS_kv_bytes);
  o.kv.block_size = absl::GetFlag(FLAGS_block_size);
  o.kv.kv_dtype = absl::GetFlag(FLAGS_kv_dtype);
  o.kv.tiers.host_bytes = absl::GetFlag(FLAGS_kv_host_bytes);
  o.kv.tiers.disk_dir = absl::GetFlag(FLAGS_kv_disk_dir);
  o.kv.tiers.disk_bytes = absl::GetFlag(FLAGS_kv_disk_bytes);
  o.device = absl::GetFlag(FLAGS_device);
  o.backend.cuda_split_k_decode = absl::GetFlag(FLAGS_cuda_split_k_decode);
  o.threads = absl::GetFlag(FLAGS_threads);
  absl::StatusOr<std::vector<std::string>> routers =
      rpc::ParseRouterList(absl::GetFlag(FLAGS_router), "--router");
  if (!routers.ok()) return routers.status();
  o.registry.routers = *std::move(routers);
  o.registry.worker_id = absl::GetFlag(FLAGS_worker_id);
  if (!(absl::GetFlag(FLAGS_router_resolve_seconds) > 0)) {
    return absl::InvalidArgumentError("--router_resolve_seconds must be > 0");
  }
  o.registry.resolve_interval = absl::Seconds(absl::GetFlag(FLAGS_router_resolve_seconds));
  o.registry.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  o.security = p.security;
  o.metrics = p.metrics;
  return absl::OkStatus();
}

}  // namespace kvrelay::process
